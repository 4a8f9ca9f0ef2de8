#include "sampling.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace dspark {
namespace {

// numpy's pairwise summation of a contiguous float64 run (what np.sum does along a contiguous axis): below 8
// items a plain loop, up to 128 eight interleaved accumulators, above that the halves (cut at a multiple of 8)
double pairwise_sum(const double* a, size_t n) {
  if (n < 8) {
    double s = 0.0;  // numpy starts from -0.0 and adds; the result is the same for our non-negative inputs
    for (size_t i = 0; i < n; ++i) s += a[i];
    return s;
  }
  if (n <= 128) {
    double r[8];
    for (int k = 0; k < 8; ++k) r[k] = a[k];
    size_t i = 8;
    for (; i < n - n % 8; i += 8)
      for (int k = 0; k < 8; ++k) r[k] += a[i + k];
    double s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) s += a[i];
    return s;
  }
  size_t half = n / 2;
  half -= half % 8;
  return pairwise_sum(a, half) + pairwise_sum(a + half, n - half);
}

void normalise(std::vector<double>& p) {
  double total = pairwise_sum(p.data(), p.size());
  for (double& x : p) x /= total;
}

}  // namespace

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

int argmax(const float* row, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i)
    if (row[i] > row[best]) best = i;
  return best;
}

std::vector<double> probabilities(const float* logits, int vocab, const SamplingParams& params) {
  std::vector<double> x(vocab);
  for (int i = 0; i < vocab; ++i) x[i] = static_cast<double>(logits[i]) / params.temperature;
  if (params.top_k > 0 && params.top_k < vocab) {
    std::vector<double> sorted = x;
    std::nth_element(sorted.begin(), sorted.begin() + (vocab - params.top_k), sorted.end());
    double kth = sorted[vocab - params.top_k];
    for (double& v : x)
      if (!(v >= kth)) v = -std::numeric_limits<double>::infinity();
  }
  double top = *std::max_element(x.begin(), x.end());
  for (double& v : x) v = std::exp(v - top);
  normalise(x);
  if (params.top_p < 1) {
    // keep the smallest prefix (by descending probability, ties in index order) whose mass reaches top_p
    std::vector<int> order(vocab);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return -x[a] < -x[b]; });
    std::vector<char> keep(vocab, 0);
    double cum = 0.0;
    for (int i = 0; i < vocab; ++i) {
      double p = x[order[i]];
      cum += p;
      keep[order[i]] = (cum - p) < params.top_p;
    }
    for (int i = 0; i < vocab; ++i)
      if (!keep[i]) x[i] = 0.0;
    normalise(x);
  }
  return x;
}

int sample(const std::vector<double>& probs, double u) {
  std::vector<double> cdf(probs.size());
  std::partial_sum(probs.begin(), probs.end(), cdf.begin());
  double target = u * cdf.back();
  // searchsorted(side="right"): the number of cdf entries <= target
  size_t i = std::upper_bound(cdf.begin(), cdf.end(), target) - cdf.begin();
  return static_cast<int>(std::min(i, probs.size() - 1));
}

Verdict accept(const float* logits, int vocab, const std::vector<int64_t>& drafts, const std::vector<double>& draft_probs,
               const SamplingParams& params, Rng& rng) {
  int n = static_cast<int>(drafts.size());
  if (params.greedy()) {
    int k = 0;
    while (k < n && drafts[k] == argmax(logits + static_cast<size_t>(k) * vocab, vocab)) ++k;
    return {k, argmax(logits + static_cast<size_t>(k) * vocab, vocab)};
  }
  for (int k = 0; k < n; ++k) {
    std::vector<double> p = probabilities(logits + static_cast<size_t>(k) * vocab, vocab, params);
    int64_t token = drafts[k];
    std::vector<double> residual(vocab);
    if (draft_probs.empty()) {  // point mass on the token: accepted with probability p(token), else p without it
      if (rng.random() < p[token]) continue;
      residual = p;
      residual[token] = 0.0;
    } else {
      const double* q = draft_probs.data() + static_cast<size_t>(k) * vocab;
      double ratio = p[token] / std::max(q[token], 1e-30);
      if (rng.random() < std::min(1.0, ratio)) continue;
      for (int i = 0; i < vocab; ++i) residual[i] = std::max(p[i] - q[i], 0.0);
    }
    if (pairwise_sum(residual.data(), residual.size()) <= 1e-12) residual = p;
    return {k, sample(residual, rng.random())};
  }
  return {n, sample(probabilities(logits + static_cast<size_t>(n) * vocab, vocab, params), rng.random())};
}

}  // namespace dspark
