// A request's state while it runs (dspark/runtime/generate.py's Sequence), shared by the loop and the proposers.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <vector>

#include "dspark/dspark.hpp"
#include "rng.hpp"
#include "textstream.hpp"

namespace dspark {

struct Sequence {
  Sequence(const Request& r, const Tokenizer& tok, bool trace, std::function<void(const std::string&)> on_text)
      : request(r), rng(r.seed), tokens(r.prompt_ids), stream(tok, r.stop), trace(trace), on_text(std::move(on_text)),
        submitted(std::chrono::steady_clock::now()) {}
  Request request;
  Rng rng;
  std::vector<int64_t> tokens;  // prompt + committed output
  TextStream stream;
  bool trace;
  std::function<void(const std::string&)> on_text;
  std::chrono::steady_clock::time_point submitted;
  Result result;
  bool reported = false;  // step() has returned it as finished
  bool released = false;  // the caller let go of it while it still held a row
  bool done() const { return !result.finish_reason.empty(); }
};

struct Proposal {
  std::vector<int64_t> tokens;
  std::vector<double> probs;        // [tokens, vocab]: the law each token was drawn from (empty: greedy or point mass)
  std::vector<double> confidence;   // raw confidence-head logits, one per token
  bool has_confidence = false;
  bool sts = true;  // the STS fit applies to them (a lookup draft's are its measured acceptance rates)
};

}  // namespace dspark
