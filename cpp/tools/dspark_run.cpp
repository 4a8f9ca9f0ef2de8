// dspark-run: the C++ host's command line, the counterpart of `dspark generate` (same JSON objects and trace
// lines). Exit codes: 0 success, 2 bad input (one line on stderr naming the problem and the fix), 1 a failure.
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "dspark/dspark.hpp"
#include "../src/json.hpp"

namespace {

const char* kHelp = R"(usage: dspark-run BUNDLE (--prompt TEXT | --prompt-ids IDS | --prompts-file FILE)... [options]

Generate completions with a dspark bundle (plain or speculative decoding over its ONNX graphs), the way
`dspark generate` does: the same tokens, JSON objects and trace lines.

prompts (repeat --prompt / --prompt-ids for several requests, run together with continuous batching):
  --prompt TEXT            prompt text (encoded with the bundle's tokenizer.json)
  --prompt-ids IDS         prompt token ids, comma separated (e.g. 1,2,3)
  --prompts-file FILE      one prompt per line, or JSON lines with a "prompt" field

options:
  --max-new-tokens N       most tokens to generate per prompt (default 128)
  --temperature T          sampling temperature; 0 is greedy (default 0)
  --top-p P                nucleus sampling mass; 1 disables it (default 1)
  --top-k K                sample among the K most likely tokens; 0 disables it (default 0)
  --seed S                 seed for sampling; prompt i uses S+i, the same draws as `dspark generate` (default 0)
  --num-draft-tokens K     draft tokens per round (default: the bundle's; at most the block for DSpark)
  --no-draft               plain decoding with the target alone
  --lookup N               prompt lookup: a request whose last N or more tokens (longest match up to 4)
                           occurred earlier in its prompt or output drafts what followed them there; the
                           other requests use the bundle's draft, or with --no-draft what most often followed
                           their last tokens in the bundle's lookup store (`dspark lookup-data`), if it has
                           one; 0: off (default 0)
  --scheduler NAME         how many drafts to verify: fixed (all), threshold (up to the first whose confidence
                           is below --threshold), sps (the paper's Algorithm 1 over the table `dspark profile`
                           wrote for this machine), auto (sps where the bundle has that table and the draft
                           carries confidences, else fixed; default)
  --threshold C            per-position confidence cut for --scheduler threshold, in [0, 1] (default 0.5)
  --block-schedule SPEC    draft length by number of running requests: auto (draft at a batch size only while
                           drafting rounds there emit more tokens/s than plain rounds, both measured as it
                           runs), BATCH:LENGTH pairs (e.g. 1:7,4:4,16:0: the largest BATCH at or below the
                           running requests decides; 0 is plain decoding), or off (always draft; default)
  --max-batch N            most requests running at once (default and ceiling: the bundle's)
  --ignore-eos             keep generating past end-of-sequence tokens
  --stop TEXT              stop when this text appears (repeatable); it is not included in the output
  --threads N              ONNX Runtime intra-op threads; 0 uses all cores (default 0)
  --backend NAME           ort (ONNX Runtime, default) or trt (TensorRT engines from `dspark build`)
  --provider NAME          ONNX Runtime execution provider: cpu (default), cuda, tensorrt
  --engines DIR            trt backend: the engine folder (default: BUNDLE/engines/sm<gpu>-trt<version>)
  --skip-sha256            check file sizes only, not their sha256 (faster start on large bundles)
  --json                   print one JSON object per prompt (text, token_ids, finish_reason, stats), in order
  --trace FILE             write one JSON line per speculative round to FILE
  -h, --help               show this help
)";

struct BadInput : std::runtime_error {
  using std::runtime_error::runtime_error;
};

long long to_int(const std::string& opt, const std::string& v) {
  char* end = nullptr;
  errno = 0;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || errno) throw BadInput(opt + " needs an integer, got '" + v + "'");
  return x;
}

double to_double(const std::string& opt, const std::string& v) {
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end) throw BadInput(opt + " needs a number, got '" + v + "'");
  return x;
}

std::vector<int64_t> parse_ids(const std::string& v) {
  std::vector<int64_t> ids;
  std::stringstream ss(v);
  std::string item;
  while (std::getline(ss, item, ',')) ids.push_back(to_int("--prompt-ids", item));
  if (ids.empty()) throw BadInput("--prompt-ids needs comma-separated token ids, e.g. 1,2,3");
  return ids;
}

std::vector<std::string> read_prompts(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw BadInput("prompts file not found: " + path);
  std::vector<std::string> out;
  std::string line;
  for (int n = 1; std::getline(f, line); ++n) {
    size_t first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos) continue;
    if (line[first] != '{') { out.push_back(line); continue; }
    try {
      out.push_back(dspark::json::Value::parse(line).at("prompt").str());
    } catch (const std::exception&) {
      throw BadInput(path + ":" + std::to_string(n) + ": a JSON line needs a string 'prompt' field");
    }
  }
  if (out.empty()) throw BadInput(path + " has no prompts");
  return out;
}

int run(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string bundle, trace_path;
  struct Prompt { bool ids; std::string text; std::vector<int64_t> id_list; };
  std::vector<Prompt> prompts;
  dspark::Options options;
  dspark::Request base;
  bool as_json = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= args.size()) throw BadInput(a + " needs a value (see --help)");
      return args[++i];
    };
    if (a == "-h" || a == "--help") { std::cout << kHelp; return 0; }
    else if (a == "--prompt") prompts.push_back({false, value(), {}});
    else if (a == "--prompt-ids") prompts.push_back({true, "", parse_ids(value())});
    else if (a == "--prompts-file") for (auto& t : read_prompts(value())) prompts.push_back({false, t, {}});
    else if (a == "--max-new-tokens") base.max_new_tokens = static_cast<int>(to_int(a, value()));
    else if (a == "--temperature") base.sampling.temperature = to_double(a, value());
    else if (a == "--top-p") base.sampling.top_p = to_double(a, value());
    else if (a == "--top-k") base.sampling.top_k = static_cast<int>(to_int(a, value()));
    else if (a == "--seed") base.seed = static_cast<uint64_t>(to_int(a, value()));
    else if (a == "--num-draft-tokens") options.num_draft_tokens = static_cast<int>(to_int(a, value()));
    else if (a == "--no-draft") options.use_draft = false;
    else if (a == "--lookup") options.lookup = static_cast<int>(to_int(a, value()));
    else if (a == "--scheduler") options.scheduler = value();
    else if (a == "--threshold") options.threshold = to_double(a, value());
    else if (a == "--block-schedule") options.block_schedule = value();
    else if (a == "--max-batch") options.max_batch = static_cast<int>(to_int(a, value()));
    else if (a == "--ignore-eos") base.ignore_eos = true;
    else if (a == "--stop") base.stop.push_back(value());
    else if (a == "--threads") options.threads = static_cast<int>(to_int(a, value()));
    else if (a == "--backend") options.backend = value();
    else if (a == "--provider") options.provider = value();
    else if (a == "--engines") options.engines_dir = value();
    else if (a == "--skip-sha256") options.verify_sha256 = false;
    else if (a == "--json") as_json = true;
    else if (a == "--trace") trace_path = value();
    else if (a.rfind("-", 0) == 0) throw BadInput("unknown option " + a + " (see --help)");
    else if (bundle.empty()) bundle = a;
    else throw BadInput("unexpected argument '" + a + "'; give one BUNDLE folder (see --help)");
  }
  if (bundle.empty()) throw BadInput("give the BUNDLE folder (see --help)");
  if (prompts.empty()) throw BadInput("give a prompt: --prompt TEXT, --prompt-ids IDS or --prompts-file FILE");
  if (options.num_draft_tokens < 0) throw BadInput("--num-draft-tokens must be positive");
  if (options.max_batch < 0) throw BadInput("--max-batch must be positive");
  if (options.lookup < 0) throw BadInput("--lookup must be >= 0 (0 turns it off)");
  base.sampling.check();

  dspark::Engine engine(bundle, options);
  std::vector<dspark::Request> requests;
  for (size_t i = 0; i < prompts.size(); ++i) {
    dspark::Request r = base;
    r.prompt_ids = prompts[i].ids ? prompts[i].id_list : engine.encode(prompts[i].text);
    r.seed = base.seed + i;
    requests.push_back(std::move(r));
  }
  bool stream = !as_json && requests.size() == 1;
  auto on_text = [](size_t, const std::string& delta) { std::cout << delta << std::flush; };
  std::vector<dspark::Result> results = engine.generate(requests, !trace_path.empty(),
                                                        stream ? std::function<void(size_t, const std::string&)>(on_text)
                                                               : nullptr);
  if (!trace_path.empty()) {
    std::ofstream t(trace_path, std::ios::binary);
    for (size_t i = 0; i < results.size(); ++i)
      for (const auto& row : results[i].trace)
        t << dspark::Result::trace_json(row, results.size() > 1 ? static_cast<int>(i) : -1) << "\n";
    if (!t) throw std::runtime_error("cannot write the trace to " + trace_path);
  }
  for (const auto& r : results) {
    if (as_json) { std::cout << r.json() << "\n"; continue; }
    if (results.size() > 1) std::cout << r.text;
    std::cout << std::endl;
    int rounds = static_cast<int>(r.accepted.size());
    long emitted = rounds;
    for (int a : r.accepted) emitted += a;
    char line[256];
    std::snprintf(line, sizeof line, "[%zu tokens, %.1f tok/s, %d rounds, mean accepted length %.2f, %s]\n",
                  r.generated.size(), r.elapsed_s > 0 ? r.generated.size() / r.elapsed_s : 0.0, rounds,
                  rounds ? static_cast<double>(emitted) / rounds : 0.0, r.finish_reason.c_str());
    std::cerr << line;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const BadInput& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const dspark::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
