#include "decoder.hpp"

#include <algorithm>
#include <cctype>

namespace dspark {
namespace {

// cache slots an in-place target graph writes past each call's chunk (dspark.bundle.SLOTS_PAST_CALL: its
// attention sees one zero row beyond the chunk, so a token's numbers do not depend on the call)
constexpr int64_t kSlotsPastCall = 1;

// the fixed last dimension of an output (vocabulary, feature width), 0 when the graph has no such output
int64_t last_dim(const GraphSpec& g, const char* name) {
  const TensorSpec* t = g.output(name);
  if (!t) return 0;
  const std::string& d = t->shape.back();
  if (d.empty() || !std::isdigit(static_cast<unsigned char>(d[0])))
    throw Error("graph " + g.name + ": output " + name + " has no fixed last dimension; re-export the bundle");
  return std::stoll(d);
}

// shared by both flavours: input ids, logits and tapped features of the last call
class DecoderBase : public Decoder {
 public:
  DecoderBase(std::unique_ptr<GraphRunner> runner, const GraphSpec& spec) : runner_(std::move(runner)), spec_(spec) {
    vocab = static_cast<int>(last_dim(spec, "logits"));
    if (vocab <= 0) throw Error("graph " + spec.name + " returns no logits; re-export the bundle");
    hidden_width = static_cast<int>(last_dim(spec, "hidden"));
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

// an integer graph input in the dtype the manifest gives it (int32 or int64)
TensorView int_input(const GraphSpec& spec, const char* name, const std::vector<int64_t>& values,
                     std::vector<int32_t>& i32, std::vector<int64_t>& i64, std::vector<int64_t> shape) {
  const TensorSpec* t = spec.input(name);
  if (!t) throw Error("graph " + spec.name + " has no input '" + name + "'; re-export the bundle");
  if (t->dtype == "int32") {
    i32.assign(values.begin(), values.end());
    return {DType::I32, std::move(shape), i32.data()};
  }
  i64 = values;
  return {DType::I64, std::move(shape), i64.data()};
}

// ONNX Runtime's fused flavour: GroupQueryAttention writes each row's query_lens[r] new tokens' K/V into the
// cache at cache_lens[r]; every layer's past_key.i / present_key.i (and value) share one cache slice
class InPlaceDecoder : public DecoderBase {
 public:
  InPlaceDecoder(std::unique_ptr<GraphRunner> runner, const GraphSpec& spec) : DecoderBase(std::move(runner), spec) {
    for (const auto& in : spec.inputs)
      if (in.name.rfind("past_key.", 0) == 0) ++layers_;
    for (int i = 0; i < layers_; ++i)
      for (const char* kind : {"key", "value"})
        if (!spec.input(std::string("past_") + kind + "." + std::to_string(i)) ||
            !spec.output(std::string("present_") + kind + "." + std::to_string(i)))
          throw Error("graph " + spec.name + " lacks past/present " + kind + " " + std::to_string(i) +
                      "; re-export the bundle");
  }

  void run(KVCache& cache, const std::vector<std::vector<int64_t>>& parts, bool last_only) override {
    last_only_ = last_only;
    pack(parts);
    int rows = static_cast<int>(parts.size());
    std::vector<int64_t> counts(rows);
    int64_t need = 0, longest = 0;
    for (int r = 0; r < rows; ++r) {
      counts[r] = static_cast<int64_t>(parts[r].size());
      need = std::max(need, cache.lens[r] + counts[r]);
      longest = std::max(longest, cache.lens[r]);
    }
    // every row's padded chunk is written at its length, so each needs room for the whole width and the target
    // graph's slots past it
    cache.reserve(need, longest + width_ + kSlotsPastCall);
    std::vector<int64_t> index;
    int logit_rows = last_only ? 1 : width_;
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < logit_rows; ++j) index.push_back(last_only ? std::max<int64_t>(counts[r] - 1, 0) : j);
    index_ = index;
    Feeds feeds{{"input_ids", {DType::I64, {rows, width_}, ids_.data()}},
                {"cache_lens", int_input(spec_, "cache_lens", cache.lens, lens32_, lens64_, {rows})},
                {"query_lens", int_input(spec_, "query_lens", counts, query32_, query64_, {rows})},
                {"logit_index", {DType::I64, {rows, logit_rows}, index_.data()}}};
    Feeds bound;
    for (int i = 0; i < layers_; ++i) {
      std::string n = std::to_string(i);
      feeds["past_key." + n] = bound["present_key." + n] = cache.layer_view(true, i);
      feeds["past_value." + n] = bound["present_value." + n] = cache.layer_view(false, i);
    }
    read(runner_->run(feeds, bound));
  }

  void commit(KVCache& cache, const std::vector<int>& counts) override {
    for (size_t r = 0; r < counts.size(); ++r) cache.lens[r] += counts[r];  // already written in place
  }

 private:
  int layers_ = 0;
  std::vector<int32_t> lens32_, query32_;
  std::vector<int64_t> lens64_, query64_, index_;
};

}  // namespace

std::unique_ptr<Decoder> make_decoder(std::unique_ptr<GraphRunner> runner, const GraphSpec& spec) {
  if (spec.flavour == "standard") return std::make_unique<StandardDecoder>(std::move(runner), spec);
  if (spec.flavour == "ort") return std::make_unique<InPlaceDecoder>(std::move(runner), spec);
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
