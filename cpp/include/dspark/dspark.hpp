// dspark C++ host: open a bundle folder (manifest.json + ONNX graphs + tokenizer) and run plain or speculative
// decoding over it with ONNX Runtime (or TensorRT engines), producing the tokens `dspark generate` produces.
//
//   dspark::Engine engine("bundles/qwen3", dspark::Options{});
//   dspark::Request req;
//   req.prompt_ids = engine.encode("def fib(n):");
//   auto results = engine.generate({req}, [](size_t i, const std::string& delta) { std::cout << delta; });
//
// Errors (a bundle that does not match its manifest, a prompt longer than the context, bad options) are thrown
// as dspark::Error with one line naming the problem and the fix.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace dspark {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct SamplingParams {
  double temperature = 0.0;  // 0 is greedy
  double top_p = 1.0;        // nucleus mass; 1 disables it
  int top_k = 0;             // 0 disables it
  bool greedy() const { return temperature == 0.0; }
  void check() const;  // throws Error for out-of-range values
};

struct Request {
  std::vector<int64_t> prompt_ids;
  int max_new_tokens = 128;
  SamplingParams sampling;
  uint64_t seed = 0;               // numpy default_rng(seed) stream: the Python runtime's draws
  std::vector<std::string> stop;   // stop strings (cut from the text)
  bool ignore_eos = false;
};

struct Options {
  bool use_draft = true;          // false: plain decoding with the target alone
  int num_draft_tokens = 0;       // 0: the bundle's
  int lookup = 0;                 // prompt lookup from earlier occurrences of a row's last N+ tokens; 0: off
  std::string scheduler = "auto";  // verify lengths: "fixed" (all drafts), "threshold", "sps" (profiled), "auto"
  double threshold = 0.5;         // "threshold": verify drafts up to the first whose confidence is below this
  std::string block_schedule;     // draft length by running rows: "auto", "1:7,4:4,16:0", "" or "off" (always draft)
  int max_batch = 0;              // 0: the bundle's (and its ceiling)
  int threads = 0;                // ONNX Runtime intra-op threads; 0: all cores
  bool verify_sha256 = true;      // file sizes are always checked; sha256 too unless false
  std::string backend = "ort";    // "ort" (ONNX Runtime) or "trt" (TensorRT engines from `dspark build`)
  std::string provider = "cpu";   // ONNX Runtime execution provider: cpu, cuda, tensorrt
  std::string engines_dir;        // trt backend: bundle/engines/<gpu>-<trt>; empty: the only one there
};

struct TraceRound {
  int round = 0;
  int64_t position = 0;
  std::vector<int64_t> draft_tokens;
  std::vector<double> confidence;  // empty and has_confidence false when the drafter has no confidence head
  bool has_confidence = false;
  int verify_length = 0;
  int accepted = 0;
  std::vector<int64_t> emitted;
};

struct Result {
  std::vector<int64_t> generated;
  std::string text;
  std::string finish_reason;  // "stop", "length"; "cancelled" or "error" for requests cut short
  std::vector<int> drafted, verified, accepted;  // per round
  std::vector<TraceRound> trace;                 // when tracing
  double elapsed_s = 0, time_to_first_token_ms = -1;

  std::string stats_json() const;  // the `stats` object of `dspark generate --json`
  std::string json() const;        // {"text", "token_ids", "finish_reason", "stats"}
  static std::string trace_json(const TraceRound& row, int prompt_index = -1);  // one --trace line
};

// Where an engine's speculative rounds spent their time since it was opened (prefill excluded): the round, and of
// it the proposer's calls and the target's verify call; the rest is host work. As the Python runtime's RoundClock.
struct RoundClock {
  int64_t rounds = 0;
  double round_s = 0, draft_s = 0, verify_s = 0;
};

class Tokenizer;  // dspark/tokenizer.hpp

// A bundle opened for generation: its graphs, KV caches and tokenizer. Not thread-safe: one caller at a time.
class Engine {
 public:
  Engine(const std::string& bundle_dir, const Options& options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  std::vector<int64_t> encode(const std::string& text) const;
  std::string decode(const std::vector<int64_t>& ids) const;
  const Tokenizer& tokenizer() const;

  // Run the requests to completion, continuously batched (at most max_batch at once, admitted in order).
  // on_text(i, delta) streams request i's text as it becomes safe to show.
  std::vector<Result> generate(const std::vector<Request>& requests, bool trace = false,
                               const std::function<void(size_t, const std::string&)>& on_text = nullptr);

  // The same engine step by step, for servers and closed loops: submit queues a request (checked now; throws
  // Error) and returns its id; step admits waiting requests into free rows, runs one speculative round and
  // returns the ids that finished; result(id) is valid until release(id), which also cancels a running request.
  uint64_t submit(const Request& request, bool trace = false,
                  std::function<void(const std::string&)> on_text = nullptr);
  std::vector<uint64_t> step();
  bool has_work() const;
  const Result& result(uint64_t id) const;  // tokens so far while running
  void release(uint64_t id);
  void set_max_batch(int max_batch);  // capped at the bundle's

  int num_draft_tokens() const;  // 0 for plain decoding
  int max_context() const;
  const RoundClock& clock() const;
  std::string draft_method() const;  // "", "draft-lm", "dspark" or "dflash"

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dspark
