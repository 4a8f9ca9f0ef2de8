// Calls of a decoder step graph (target or draft LM) over ragged rows, and committing what they computed to the
// KV cache. Two graph flavours, one interface:
//  - standard: the graph reads past_k/past_v and returns new_k/new_v; commit copies the new rows into the cache
//  - ort: the graph writes the new tokens' K/V into the cache in place (present_* bound to past_* memory);
//    commit only raises the row lengths, rollback is not counting them
#pragma once

#include <memory>
#include <vector>

#include "kv.hpp"
#include "runner.hpp"

namespace dspark {

class Decoder {
 public:
  virtual ~Decoder() = default;
  // One call on `parts` (right-padded to the longest); nothing is committed. With `last_only`, only each row's
  // last real position needs logits (prefill); logits(r, j) is then valid for j = parts[r].size() - 1.
  virtual void run(KVCache& cache, const std::vector<std::vector<int64_t>>& parts, bool last_only) = 0;
  virtual void commit(KVCache& cache, const std::vector<int>& counts) = 0;
  virtual const float* logits(int row, int position) const = 0;  // [vocab] of the last run
  virtual const float* hidden(int row, int position) const = 0;  // tapped features, or nullptr
  int vocab = 0, hidden_width = 0;
};

std::unique_ptr<Decoder> make_decoder(std::unique_ptr<GraphRunner> runner, const GraphSpec& spec);

// A cache for a decoder model of the bundle (the manifest's KV layout and dtype)
KVCache decoder_cache(const ModelConfig& config, int rows, const Bundle& bundle);

// Feed pieces[r] through the decoder in chunks, committing all; returns each row's last logits (empty for rows
// with nothing to feed). With `features`, each row's tapped features are appended to features[r].
std::vector<std::vector<float>> feed(Decoder& dec, KVCache& cache, const std::vector<std::vector<int64_t>>& pieces,
                                     int chunk, std::vector<std::vector<float>>* features = nullptr);

}  // namespace dspark
