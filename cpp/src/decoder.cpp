#include "decoder.hpp"

#include <algorithm>

namespace dspark {
namespace {

int64_t last_dim(const TensorSpec* t) { return t ? std::stoll(t->shape.back()) : 0; }

// shared by both flavours: input ids, logits and tapped features of the last call
class DecoderBase : public Decoder {
 public:
  DecoderBase(std::unique_ptr<GraphRunner> runner, const GraphSpec& spec) : runner_(std::move(runner)), spec_(spec) {
    vocab = static_cast<int>(last_dim(spec.output("logits")));
    hidden_width = static_cast<int>(last_dim(spec.output("hidden")));
  }
  const float* logits(int row, int position) const override {
    return logits_ + (static_cast<size_t>(row) * logit_rows_ + (last_only_ ? 0 : position)) * vocab;
  }
  const float* hidden(int row, int position) const override {
    return hidden_ ? hidden_ + (static_cast<size_t>(row) * width_ + position) * hidden_width : nullptr;
  }

 protected:
  std::unique_ptr<GraphRunner> runner_;
  const GraphSpec& spec_;
  std::vector<int64_t> ids_;
  int width_ = 0, logit_rows_ = 0;
  bool last_only_ = false;
  const float* logits_ = nullptr;
  const float* hidden_ = nullptr;
  std::vector<float> logit_scratch_, hidden_scratch_;

  void pack(const std::vector<std::vector<int64_t>>& parts) {
    width_ = 1;
    for (const auto& p : parts) width_ = std::max(width_, static_cast<int>(p.size()));
    ids_.assign(parts.size() * width_, 0);
    for (size_t r = 0; r < parts.size(); ++r) std::copy(parts[r].begin(), parts[r].end(), ids_.begin() + r * width_);
  }
  void read(const Feeds& out) {
    logits_ = as_float(out.at("logits"), logit_scratch_);
    logit_rows_ = static_cast<int>(out.at("logits").shape[1]);
    auto h = out.find("hidden");
    hidden_ = h == out.end() ? nullptr : as_float(h->second, hidden_scratch_);
  }
};

class StandardDecoder : public DecoderBase {
 public:
  using DecoderBase::DecoderBase;

  void run(KVCache& cache, const std::vector<std::vector<int64_t>>& parts, bool /*last_only*/) override {
    // this flavour always returns logits for every new position
    last_only_ = false;
    pack(parts);
    int rows = static_cast<int>(parts.size());
    positions_.resize(ids_.size());
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < width_; ++j) positions_[static_cast<size_t>(r) * width_ + j] = cache.lens[r] + j;
    lens_ = cache.lens;
    Feeds feeds{{"input_ids", {DType::I64, {rows, width_}, ids_.data()}},
                {"position_ids", {DType::I64, {rows, width_}, positions_.data()}},
                {"cache_lens", {DType::I64, {rows}, lens_.data()}},
                {"past_k", cache.k_view()},
                {"past_v", cache.v_view()}};
    out_ = runner_->run(feeds);
    read(out_);
  }

  void commit(KVCache& cache, const std::vector<int>& counts) override {
    cache.append(out_.at("new_k"), out_.at("new_v"), counts);
  }

 private:
  std::vector<int64_t> positions_, lens_;
  Feeds out_;
};

}  // namespace

std::unique_ptr<Decoder> make_decoder(std::unique_ptr<GraphRunner> runner, const GraphSpec& spec) {
  if (spec.flavour == "standard") return std::make_unique<StandardDecoder>(std::move(runner), spec);
  throw Error("graph " + spec.name + " has flavour '" + spec.flavour +
              "', which this host does not run; update the host or re-export the bundle");
}

KVCache decoder_cache(const ModelConfig& c, int rows, const Bundle& bundle) {
  return KVCache(c.num_layers, rows, c.num_kv_heads, c.head_dim, bundle.dtype == "fp16" ? DType::F16 : DType::F32,
                 bundle.max_context);
}

std::vector<std::vector<float>> feed(Decoder& dec, KVCache& cache, const std::vector<std::vector<int64_t>>& pieces,
                                     int chunk, std::vector<std::vector<float>>* features) {
  std::vector<std::vector<float>> last(pieces.size());
  size_t longest = 0;
  for (const auto& p : pieces) longest = std::max(longest, p.size());
  for (size_t offset = 0; offset == 0 || offset < longest; offset += chunk) {
    std::vector<std::vector<int64_t>> parts(pieces.size());
    std::vector<int> counts(pieces.size());
    for (size_t r = 0; r < pieces.size(); ++r) {
      if (offset < pieces[r].size()) {
        size_t end = std::min(pieces[r].size(), offset + chunk);
        parts[r].assign(pieces[r].begin() + offset, pieces[r].begin() + end);
      }
      counts[r] = static_cast<int>(parts[r].size());
    }
    dec.run(cache, parts, true);
    for (size_t r = 0; r < pieces.size(); ++r) {
      if (parts[r].empty()) continue;
      const float* row = dec.logits(static_cast<int>(r), counts[r] - 1);
      last[r].assign(row, row + dec.vocab);
      if (features) {
        const float* h = dec.hidden(static_cast<int>(r), 0);
        (*features)[r].insert((*features)[r].end(), h, h + static_cast<size_t>(counts[r]) * dec.hidden_width);
      }
    }
    dec.commit(cache, counts);
  }
  return last;
}

}  // namespace dspark
