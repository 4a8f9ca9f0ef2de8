// The JSON the host prints: the same objects, keys, order and number formatting as `dspark generate --json`
// and its --trace lines (Python's json.dumps), so the two can be compared line for line.
#include <algorithm>
#include <numeric>

#include "dspark/dspark.hpp"
#include "json.hpp"

namespace dspark {
namespace {

template <class T> std::string int_list(const std::vector<T>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

std::string ratio(double num, double den) { return json::number(num / den); }

}  // namespace

std::string Result::stats_json() const {
  int rounds = static_cast<int>(accepted.size());
  int max_verified = verified.empty() ? 0 : *std::max_element(verified.begin(), verified.end());
  std::string by_position = "[", per_pos = "[";
  for (int k = 0; k < max_verified; ++k) {
    int checked = 0, survived = 0;
    for (int v : verified) checked += v > k;
    for (int a : accepted) survived += a > k;
    by_position += (k ? ", " : "") + (checked ? ratio(survived, checked) : std::string("null"));
    per_pos += (k ? ", " : "") + std::to_string(survived);
  }
  by_position += "]";
  per_pos += "]";
  long sum_accepted = std::accumulate(accepted.begin(), accepted.end(), 0L);
  long sum_verified = std::accumulate(verified.begin(), verified.end(), 0L);
  long emitted = sum_accepted + rounds;
  std::string s = "{\"rounds\": " + std::to_string(rounds);
  s += ", \"generated_tokens\": " + std::to_string(generated.size());
  s += ", \"mean_accepted_length\": " + (rounds ? ratio(emitted, rounds) : "null");
  s += ", \"acceptance_by_position\": " + by_position;
  s += ", \"verify_tokens_per_accepted\": " + (rounds ? ratio(sum_verified + rounds, emitted) : "null");
  s += ", \"tokens_per_second\": " + (elapsed_s > 0 ? ratio(generated.size(), elapsed_s) : "null");
  s += ", \"time_to_first_token_ms\": " + (time_to_first_token_ms >= 0 ? json::number(time_to_first_token_ms) : "null");
  s += ", \"elapsed_s\": " + json::number(elapsed_s);
  s += ", \"spec_decode\": {\"num_drafts\": " + std::to_string(rounds) + ", \"num_draft_tokens\": " +
       std::to_string(sum_verified) + ", \"num_accepted_tokens\": " + std::to_string(sum_accepted) +
       ", \"num_accepted_tokens_per_pos\": " + per_pos + "}}";
  return s;
}

std::string Result::json() const {
  return "{\"text\": " + json::quote(text) + ", \"token_ids\": " + int_list(generated) + ", \"finish_reason\": " +
         (finish_reason.empty() ? std::string("null") : json::quote(finish_reason)) + ", \"stats\": " + stats_json() + "}";
}

std::string Result::trace_json(const TraceRound& row, int prompt_index) {
  std::string confidence = "null";
  if (row.has_confidence) {
    confidence = "[";
    for (size_t i = 0; i < row.confidence.size(); ++i) confidence += (i ? ", " : "") + json::number(row.confidence[i]);
    confidence += "]";
  }
  std::string s = "{\"round\": " + std::to_string(row.round) + ", \"position\": " + std::to_string(row.position) +
                  ", \"draft_tokens\": " + int_list(row.draft_tokens) + ", \"confidence\": " + confidence +
                  ", \"verify_length\": " + std::to_string(row.verify_length) +
                  ", \"accepted\": " + std::to_string(row.accepted) + ", \"emitted\": " + int_list(row.emitted);
  if (prompt_index >= 0) s += ", \"prompt\": " + std::to_string(prompt_index);
  return s + "}";
}

}  // namespace dspark
