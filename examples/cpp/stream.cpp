// Embedding the dspark C++ host: open a bundle, encode a prompt, stream a speculative completion to stdout.
//
//   ./dspark-stream-example bundles/qwen3 "def fib(n):" [max_new_tokens]
#include <cstdlib>
#include <iostream>

#include "dspark/dspark.hpp"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " BUNDLE PROMPT [MAX_NEW_TOKENS]\n";
    return 2;
  }
  try {
    dspark::Engine engine(argv[1], dspark::Options{});  // the bundle's drafter, ONNX Runtime on the CPU
    dspark::Request request;
    request.prompt_ids = engine.encode(argv[2]);
    request.max_new_tokens = argc > 3 ? std::atoi(argv[3]) : 64;
    std::cout << argv[2];
    auto results = engine.generate({request}, false, [](size_t, const std::string& delta) {
      std::cout << delta << std::flush;  // text arrives as each speculative round commits tokens
    });
    const dspark::Result& r = results[0];
    std::cout << "\n[" << r.generated.size() << " tokens in " << r.accepted.size() << " rounds, "
              << r.finish_reason << "]\n";
  } catch (const dspark::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  }
  return 0;
}
