// A request's state while it runs (dspark/runtime/generate.py's Sequence), shared by the loop and the proposers.
#pragma once

#include <memory>
#include <vector>

#include "dspark/dspark.hpp"
#include "rng.hpp"
#include "textstream.hpp"

namespace dspark {

struct Sequence {
  Sequence(const Request& r, const Tokenizer& tok, size_t index)
      : request(r), rng(r.seed), tokens(r.prompt_ids), stream(tok, r.stop), index(index) {}
  Request request;
  Rng rng;
  std::vector<int64_t> tokens;  // prompt + committed output
  TextStream stream;
  size_t index;  // position in the caller's request list
  Result result;
  bool done() const { return !result.finish_reason.empty(); }
};

struct Proposal {
  std::vector<int64_t> tokens;
  std::vector<double> probs;        // [tokens, vocab]: the law each token was drawn from (empty when greedy)
  std::vector<double> confidence;   // raw confidence-head logits, one per token
  bool has_confidence = false;
};

}  // namespace dspark
