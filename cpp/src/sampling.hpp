// Warping (temperature, top-k, top-p), inverse-CDF sampling and the acceptance rule, as dspark/runtime/sampling.py:
// the same float64 arithmetic in the same order (numpy's pairwise sums included), so that one seed gives the
// Python runtime's tokens.
#pragma once
#include <cstdint>
#include <vector>

#include "dspark/dspark.hpp"
#include "rng.hpp"

namespace dspark {

// the warped distribution of one row of logits (float64)
std::vector<double> probabilities(const float* logits, int vocab, const SamplingParams& params);
int sample(const std::vector<double>& probs, double u);  // inverse CDF with uniform u in [0, 1)
int argmax(const float* row, int n);                     // first index of the largest value, as numpy
double sigmoid(double x);

struct Verdict {
  int accepted;  // draft tokens accepted
  int token;     // the correction or bonus token
};

// Judge `drafts` against target rows `logits` [drafts.size()+1, vocab]. `draft_probs` [drafts.size(), vocab]
// holds the law each draft token was drawn from; empty when greedy or when each was proposed with certainty (a
// point mass: prompt lookup), which needs no vocabulary-sized array per draft.
Verdict accept(const float* logits, int vocab, const std::vector<int64_t>& drafts, const std::vector<double>& draft_probs,
               const SamplingParams& params, Rng& rng);

}  // namespace dspark
