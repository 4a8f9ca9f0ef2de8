#include "proposers.hpp"

#include <algorithm>
#include <cmath>

#include "sampling.hpp"
#include "store.hpp"

namespace dspark {
namespace {

// fill a graph input of the manifest's float type (float32 or float16) from doubles
TensorView float_input(const GraphSpec& spec, const char* name, const std::vector<double>& values,
                       std::vector<float>& f32, std::vector<uint16_t>& f16, std::vector<int64_t> shape) {
  if (spec.input(name) && spec.input(name)->dtype == "float16") {
    f16.resize(values.size());
    for (size_t i = 0; i < values.size(); ++i) f16[i] = float_to_half(static_cast<float>(values[i]));
    return {DType::F16, std::move(shape), f16.data()};
  }
  f32.assign(values.begin(), values.end());
  return {DType::F32, std::move(shape), f32.data()};
}

// n laws of `width` entries over a draft vocabulary appended to `out` as laws over the target's `vocab` tokens:
// copied when the two are the same, else entry i placed at target id ids[i] and zero elsewhere
template <typename T>
void append_target_laws(std::vector<double>& out, const T* law, int n, int width, const std::vector<int64_t>& ids,
                        int vocab) {
  size_t base = out.size();
  if (width == vocab) {
    out.insert(out.end(), law, law + static_cast<size_t>(n) * vocab);
    return;
  }
  out.resize(base + static_cast<size_t>(n) * vocab, 0.0);
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < width; ++i)
      out[base + static_cast<size_t>(j) * vocab + ids[i]] = law[static_cast<size_t>(j) * width + i];
}

class DraftLMProposer : public Proposer {
 public:
  DraftLMProposer(const Bundle& bundle, const Options& options, int num_draft_tokens)
      : bundle_(bundle),
        decoder_(make_decoder(make_runner(bundle, "draft", options), bundle.graph("draft"))),
        cache_(decoder_cache(bundle.draft, 0, bundle)) {
    k = num_draft_tokens;
    // a reduced draft LM reads and scores its own ids: N drafted ones (the target ids in draft_vocab), then one id
    // for every other target token, which it never drafts
    width_ = bundle.draft_vocab.empty() ? decoder_->vocab : static_cast<int>(bundle.draft_vocab.size());
    if (!bundle.draft_vocab.empty()) {
      index_.assign(static_cast<size_t>(bundle.target.vocab_size), width_);
      for (int i = 0; i < width_; ++i) index_[bundle.draft_vocab[i]] = i;
    }
  }

  void keep(const std::vector<int>& rows) override { cache_.keep_rows(rows); }
  void add(int count, std::vector<std::vector<float>>*) override { cache_.add_rows(cache_.empty_like(count)); }

  int backlog(const std::vector<Sequence*>& seqs) const override {
    int64_t unread = 0;
    for (size_t r = 0; r < seqs.size(); ++r)
      unread = std::max(unread, static_cast<int64_t>(seqs[r]->tokens.size()) - cache_.lens[r]);
    return static_cast<int>(std::max<int64_t>(0, unread - kRoundReads));
  }

  std::vector<Proposal> propose(std::vector<Sequence*>& seqs, const std::vector<int>& row_caps) override {
    std::vector<Proposal> proposals(seqs.size());
    for (auto& p : proposals) p.has_confidence = true;
    std::vector<int> caps(row_caps);
    int longest = *std::max_element(caps.begin(), caps.end());
    if (longest == 0) return proposals;
    // first step: catch up on every committed token this draft has not read
    std::vector<std::vector<int64_t>> pending(seqs.size());
    for (size_t r = 0; r < seqs.size(); ++r)
      if (caps[r]) pending[r] = draft_ids(seqs[r]->tokens.begin() + cache_.lens[r], seqs[r]->tokens.end());
    std::vector<std::vector<float>> logits = feed(*decoder_, cache_, pending, bundle_.prefill_chunk);
    std::vector<double> survival(seqs.size(), 1.0);
    for (int step = 0; step < longest; ++step) {
      for (size_t r = 0; r < seqs.size(); ++r)
        if (step < caps[r]) {
          survival[r] *= draw(*seqs[r], proposals[r], logits[r].data());
          if (survival[r] < kStopSurvival) caps[r] = step + 1;  // later drafts would rarely pay for their slots
        }
      longest = *std::max_element(caps.begin(), caps.end());
      if (step + 1 == longest) break;
      std::vector<std::vector<int64_t>> parts(seqs.size());
      std::vector<int> counts(seqs.size(), 0);
      for (size_t r = 0; r < seqs.size(); ++r)
        if (step + 1 < caps[r]) {
          parts[r] = draft_ids(proposals[r].tokens.end() - 1, proposals[r].tokens.end());
          counts[r] = 1;
        }
      decoder_->run(cache_, parts, true);
      for (size_t r = 0; r < seqs.size(); ++r) {
        const float* row = decoder_->logits(static_cast<int>(r), 0);
        logits[r].assign(row, row + decoder_->vocab);
      }
      decoder_->commit(cache_, counts);
    }
    return proposals;
  }

  void commit(const Decoder&, const std::vector<int64_t>& anchors, const std::vector<int>& drafted,
              const std::vector<int>&, const std::vector<int>& accepted) override {
    // keep the cache rows that hold committed tokens: the anchor and the accepted drafts it has read
    for (size_t r = 0; r < drafted.size(); ++r)
      if (drafted[r]) cache_.lens[r] = anchors[r] + 1 + std::min(accepted[r], drafted[r] - 1);
  }

 private:
  template <typename It>
  std::vector<int64_t> draft_ids(It begin, It end) const {
    std::vector<int64_t> ids(begin, end);
    if (!index_.empty())
      for (int64_t& t : ids) t = index_[t];
    return ids;
  }

  int64_t target_id(int draft_id) const { return index_.empty() ? draft_id : bundle_.draft_vocab[draft_id]; }

  // draft one token and record it with its confidence logit; returns the confidence: the likeliest token's
  // probability under the law drafted from (T = 1 when greedy)
  double draw(Sequence& seq, Proposal& p, const float* logits) {
    const SamplingParams& params = seq.request.sampling;
    double others;  // (1 - p) / p of the likeliest token
    if (params.greedy()) {
      int best = argmax(logits, width_);
      p.tokens.push_back(target_id(best));
      double sum = 0.0;
      for (int i = 0; i < width_; ++i) sum += std::exp(static_cast<double>(logits[i]) - logits[best]);
      others = sum - 1.0;
    } else {
      std::vector<double> q = probabilities(logits, width_, params);
      p.tokens.push_back(target_id(sample(q, seq.rng.random())));
      append_target_laws(p.probs, q.data(), 1, width_, bundle_.draft_vocab, bundle_.target.vocab_size);
      double top = *std::max_element(q.begin(), q.end());
      others = (1.0 - top) / top;
    }
    p.confidence.push_back(-std::log(std::max(others, 1e-300)));
    return 1.0 / (1.0 + others);
  }

  static constexpr double kStopSurvival = 0.1;  // DraftLMProposer.STOP_SURVIVAL
  static constexpr int kRoundReads = 1;  // DraftLMProposer.ROUND_READS: the anchor

  const Bundle& bundle_;
  std::unique_ptr<Decoder> decoder_;
  KVCache cache_;
  int width_ = 0;               // entries of a drafted token's law: the target's vocabulary or the draft's subset
  std::vector<int64_t> index_;  // target id -> draft id for a reduced draft LM (empty: the same ids)
};

class BlockProposer : public Proposer {
 public:
  BlockProposer(const Bundle& bundle, const Options& options, int num_draft_tokens)
      : bundle_(bundle),
        context_spec_(bundle.graph("draft_context")),
        propose_spec_(bundle.graph("draft_propose")),
        context_(make_runner(bundle, "draft_context", options)),
        drafter_(make_runner(bundle, "draft_propose", options)),
        cache_(decoder_cache(bundle.draft, 0, bundle)) {
    k = num_draft_tokens;
    width_ = std::stoi(context_spec_.input("features")->shape.back());
    chunk_ = static_cast<int>(context_spec_.dims.at("context").second);
    // the graph's law is over the drafter's vocabulary: the target's (bundles before 0.4.3 scattered a reduced
    // one into it in the graph) or its reduced subset, placed in the target's only for sampled rows
    law_width_ = std::stoi(propose_spec_.output("draft_probs")->shape.back());
    if (law_width_ != bundle.target.vocab_size && static_cast<int>(bundle.draft_vocab.size()) != law_width_)
      throw Error(bundle.dir + ": the drafter's law covers " + std::to_string(law_width_) + " tokens but the manifest lists " +
                  std::to_string(bundle.draft_vocab.size()) + " draft-vocabulary ids; re-export the bundle");
  }

  bool wants_features() const override { return true; }
  bool has_confidence() const override { return bundle_.confidence_head; }

  void keep(const std::vector<int>& rows) override {
    cache_.keep_rows(rows);
    std::vector<std::vector<float>> kept;
    for (int r : rows) kept.push_back(std::move(pending_[r]));
    pending_ = std::move(kept);
  }

  void add(int count, std::vector<std::vector<float>>* features) override {
    cache_.add_rows(cache_.empty_like(count));
    for (int i = 0; i < count; ++i) pending_.push_back(std::move((*features)[i]));
  }

  int backlog(const std::vector<Sequence*>&) const override {
    size_t unread = 0;
    for (const auto& p : pending_) unread = std::max(unread, p.size() / static_cast<size_t>(width_));
    return std::max(0, static_cast<int>(unread) - kRoundReads);
  }

  std::vector<Proposal> propose(std::vector<Sequence*>& seqs, const std::vector<int>& caps) override {
    std::vector<Proposal> proposals(seqs.size());
    for (auto& p : proposals) p.has_confidence = bundle_.confidence_head;
    if (*std::max_element(caps.begin(), caps.end()) == 0) return proposals;
    flush_context();
    // the graph drafts the bundle's whole block; each row keeps its cap
    int rows = static_cast<int>(seqs.size()), block = bundle_.draft_length;
    std::vector<double> noise(static_cast<size_t>(rows) * block, 0.0), temperature(rows);
    std::vector<int64_t> anchor(rows), start(rows);
    for (int r = 0; r < rows; ++r) {
      const Sequence& s = *seqs[r];
      if (caps[r] && !s.request.sampling.greedy())
        for (int j = 0; j < block; ++j) noise[static_cast<size_t>(r) * block + j] = static_cast<float>(seqs[r]->rng.random());
      anchor[r] = s.tokens.back();
      start[r] = static_cast<int64_t>(s.tokens.size()) - 1;
      temperature[r] = static_cast<float>(s.request.sampling.temperature);
    }
    std::vector<int64_t> lens = cache_.lens;
    Feeds feeds{{"anchor", {DType::I64, {rows}, anchor.data()}},
                {"start", {DType::I64, {rows}, start.data()}},
                {"cache_lens", {DType::I64, {rows}, lens.data()}},
                {"past_k", cache_.k_view()},
                {"past_v", cache_.v_view()},
                {"temperature", float_input(propose_spec_, "temperature", temperature, t32_, t16_, {rows})},
                {"noise", float_input(propose_spec_, "noise", noise, n32_, n16_, {rows, block})}};
    Feeds out = drafter_->run(feeds);
    const int64_t* tokens = out.at("draft_tokens").as<int64_t>();
    int vocab = bundle_.target.vocab_size;
    const float* probs = as_float(out.at("draft_probs"), probs_scratch_);
    const float* conf = bundle_.confidence_head ? as_float(out.at("confidence_logits"), conf_scratch_) : nullptr;
    for (int r = 0; r < rows; ++r) {
      Proposal& p = proposals[r];
      int n = caps[r];
      p.tokens.assign(tokens + static_cast<size_t>(r) * block, tokens + static_cast<size_t>(r) * block + n);
      if (!seqs[r]->request.sampling.greedy() && n)
        append_target_laws(p.probs, probs + static_cast<size_t>(r) * block * law_width_, n, law_width_,
                           bundle_.draft_vocab, vocab);
      if (conf) p.confidence.assign(conf + static_cast<size_t>(r) * block, conf + static_cast<size_t>(r) * block + n);
    }
    return proposals;
  }

  void commit(const Decoder& target, const std::vector<int64_t>& anchors, const std::vector<int>&,
              const std::vector<int>&, const std::vector<int>& accepted) override {
    // features of the anchor and the accepted drafts become the next round's context
    for (size_t r = 0; r < anchors.size(); ++r) {
      const float* h = target.hidden(static_cast<int>(r), 0);
      pending_[r].insert(pending_[r].end(), h, h + static_cast<size_t>(accepted[r] + 1) * width_);
    }
  }

 private:
  // turn pending feature rows into context K/V at each row's next positions
  void flush_context() {
    int rows = static_cast<int>(pending_.size());
    bool half = cache_.dtype() == DType::F16;
    for (size_t offset = 0;; offset += chunk_) {
      std::vector<int> counts(rows);
      int widest = 0;
      for (int r = 0; r < rows; ++r) {
        size_t have = pending_[r].size() / width_;
        counts[r] = have > offset ? static_cast<int>(std::min<size_t>(chunk_, have - offset)) : 0;
        widest = std::max(widest, counts[r]);
      }
      if (widest == 0) break;
      size_t n = static_cast<size_t>(rows) * widest * width_;
      feats_.assign(n, 0.0f);
      positions_.resize(static_cast<size_t>(rows) * widest);
      for (int r = 0; r < rows; ++r) {
        std::copy_n(pending_[r].begin() + offset * width_, static_cast<size_t>(counts[r]) * width_,
                    feats_.begin() + static_cast<size_t>(r) * widest * width_);
        for (int j = 0; j < widest; ++j) positions_[static_cast<size_t>(r) * widest + j] = cache_.lens[r] + j;
      }
      TensorView f{DType::F32, {rows, widest, width_}, feats_.data()};
      if (half) {  // the cache's dtype, as the Python runtime builds the features array
        feats16_.resize(n);
        for (size_t i = 0; i < n; ++i) feats16_[i] = float_to_half(feats_[i]);
        f = {DType::F16, {rows, widest, width_}, feats16_.data()};
      }
      Feeds out = context_->run({{"features", f}, {"positions", {DType::I64, {rows, widest}, positions_.data()}}});
      cache_.append(out.at("ctx_k"), out.at("ctx_v"), counts);
    }
    for (auto& p : pending_) p.clear();
  }

  const Bundle& bundle_;
  const GraphSpec& context_spec_;
  const GraphSpec& propose_spec_;
  std::unique_ptr<GraphRunner> context_, drafter_;
  KVCache cache_;
  int width_ = 0, chunk_ = 0;
  std::vector<std::vector<float>> pending_;  // per row: target feature rows not yet in the context cache
  static constexpr int kRoundReads = 2;  // BlockProposer.ROUND_READS: the anchor's feature and one accepted draft's
  std::vector<float> feats_, t32_, n32_, probs_scratch_, conf_scratch_;
  int law_width_ = 0;  // entries of a drafted token's law: the target's vocabulary or the drafter's subset
  std::vector<uint16_t> feats16_, t16_, n16_;
  std::vector<int64_t> positions_;
};

// Prompt lookup in front of another proposer (or none): a row whose last max_match .. min_match tokens (longest
// first) occurred earlier in its own tokens drafts what followed their most recent occurrence; the other rows
// get the wrapped proposer's drafts, or, without one, what most often followed their last tokens in the bundle's
// lookup store (store.hpp). A lookup draft's law is a point mass. Its confidence at draft position j is the
// acceptance rate of recent drafts from the same source (own tokens or store) at j given the positions before it
// were accepted: counts that start at kPrior worth kPriorRounds drafts and fade by kFade per draft of that source,
// as the Python runtime's LookupProposer.
class LookupProposer : public Proposer {
 public:
  LookupProposer(const Bundle& bundle, std::unique_ptr<Proposer> inner, int num_draft_tokens, int min_match)
      : inner_(std::move(inner)), min_(min_match), max_(std::max(min_match, 4)) {
    k = num_draft_tokens;
    if (!inner_) store_ = TokenStore::open(bundle, min_, max_);  // the store does not stand in front of a draft
    for (auto* counts : {&trials_, &hits_})
      for (auto& per_position : *counts) per_position.assign(static_cast<size_t>(num_draft_tokens), 0.0);
  }

  static constexpr double kPrior = 0.85, kPriorRounds = 4.0, kFade = 0.97;
  enum Source { kNone = -1, kOwn = 0, kStore = 1 };

  bool wants_features() const override { return inner_ && inner_->wants_features(); }
  // lookup rows carry a confidence wherever the other rows do (or there are no others)
  bool has_confidence() const override { return !inner_ || inner_->has_confidence(); }
  void keep(const std::vector<int>& rows) override {
    if (inner_) inner_->keep(rows);
  }
  void add(int count, std::vector<std::vector<float>>* features) override {
    if (inner_) inner_->add(count, features);
  }
  int backlog(const std::vector<Sequence*>& seqs) const override { return inner_ ? inner_->backlog(seqs) : 0; }

  // the continuation of the most recent, longest earlier occurrence of the last tokens (at most cap tokens)
  std::vector<int64_t> lookup(const std::vector<int64_t>& tokens, int cap) const {
    int64_t size = static_cast<int64_t>(tokens.size());
    for (int64_t n = std::min<int64_t>(max_, size - 1); n >= min_; --n) {
      // windows that end before the last token, so each has at least one token after it
      for (int64_t start = size - 1 - n; start >= 0; --start) {
        if (std::equal(tokens.end() - n, tokens.end(), tokens.begin() + start)) {
          int64_t from = start + n, to = std::min<int64_t>(size, from + cap);
          return std::vector<int64_t>(tokens.begin() + from, tokens.begin() + to);
        }
      }
    }
    return {};
  }

  std::vector<Proposal> propose(std::vector<Sequence*>& seqs, const std::vector<int>& caps) override {
    size_t n = seqs.size();
    std::vector<std::vector<int64_t>> found(n);
    std::vector<int> rest(caps);
    sources_.assign(n, kNone);
    for (size_t r = 0; r < n; ++r) {
      if (!caps[r]) continue;
      found[r] = lookup(seqs[r]->tokens, caps[r]);
      if (!found[r].empty()) sources_[r] = kOwn;
      else if (store_ && !(found[r] = store_->continuation(seqs[r]->tokens, caps[r])).empty()) sources_[r] = kStore;
      if (sources_[r] != kNone) rest[r] = 0;
    }
    std::vector<Proposal> proposals = inner_ ? inner_->propose(seqs, rest) : std::vector<Proposal>(n);
    for (size_t r = 0; r < n; ++r) {
      if (sources_[r] == kNone) continue;
      Proposal p;
      p.tokens = std::move(found[r]);  // no probs: a point-mass law (see accept)
      p.has_confidence = has_confidence();
      p.sts = false;
      if (p.has_confidence) {
        const auto &hits = hits_[sources_[r]], &trials = trials_[sources_[r]];
        for (size_t j = 0; j < p.tokens.size(); ++j) {
          double rate = (hits[j] + kPrior * kPriorRounds) / (trials[j] + kPriorRounds);
          p.confidence.push_back(std::log(rate / (1 - rate)));
        }
      }
      proposals[r] = std::move(p);
    }
    return proposals;
  }

  // count the looked-up rows' outcomes; the wrapped proposer drafted nothing on them this round: it is told so
  void commit(const Decoder& target, const std::vector<int64_t>& anchors, const std::vector<int>& drafted,
              const std::vector<int>& verified, const std::vector<int>& accepted) override {
    for (int source : {kOwn, kStore}) {
      // a round's drafts of one source fade its counts together, so the rates do not depend on the order of rows
      double fade = std::pow(kFade, static_cast<double>(std::count(sources_.begin(), sources_.end(), source)));
      if (fade == 1) continue;
      auto &trials = trials_[source], &hits = hits_[source];
      for (size_t j = 0; j < trials.size(); ++j) {
        trials[j] *= fade;
        hits[j] *= fade;
      }
      for (size_t r = 0; r < sources_.size(); ++r) {
        if (sources_[r] != source) continue;
        // positions up to the first rejection (if verified), and the accepted ones
        for (int j = 0; j < std::min(accepted[r] + 1, verified[r]); ++j) trials[static_cast<size_t>(j)] += 1;
        for (int j = 0; j < accepted[r]; ++j) hits[static_cast<size_t>(j)] += 1;
      }
    }
    if (!inner_) return;
    std::vector<int> inner(drafted);
    for (size_t r = 0; r < inner.size(); ++r)
      if (sources_[r] != kNone) inner[r] = 0;
    inner_->commit(target, anchors, inner, verified, accepted);
  }

 private:
  std::unique_ptr<Proposer> inner_;
  std::shared_ptr<const TokenStore> store_;  // only without a wrapped proposer
  int min_, max_;
  std::vector<int> sources_;  // per row: where this round's draft came from (a Source)
  // per source and draft position: faded counts of verified and of accepted lookup drafts
  std::vector<double> trials_[2], hits_[2];
};

}  // namespace

std::unique_ptr<Proposer> make_proposer(const Bundle& bundle, const Options& options) {
  bool use_draft = options.use_draft && bundle.has_draft;
  if (options.lookup < 0) throw Error("lookup must be >= 0 (0 turns it off), got " + std::to_string(options.lookup));
  if (!use_draft && !options.lookup) return nullptr;
  int k = options.num_draft_tokens ? options.num_draft_tokens
                                   : (bundle.has_draft ? bundle.draft_length : bundle.max_verify_tokens - 1);
  if (k < 1)
    throw Error("prompt lookup on a bundle without a draft needs room to verify drafts: re-export it with "
                "--num-draft-tokens K");
  if (k + 1 > bundle.max_verify_tokens)
    throw Error("--num-draft-tokens " + std::to_string(k) + " needs " + std::to_string(k + 1) +
                "-token verify calls; this bundle was exported for at most " +
                std::to_string(bundle.max_verify_tokens - 1) + " (re-export with --num-draft-tokens " +
                std::to_string(k) + ")");
  std::unique_ptr<Proposer> inner;
  if (use_draft && bundle.draft_method == "draft-lm") inner = std::make_unique<DraftLMProposer>(bundle, options, k);
  else if (use_draft) inner = std::make_unique<BlockProposer>(bundle, options, k);
  if (!options.lookup) return inner;
  return std::make_unique<LookupProposer>(bundle, std::move(inner), k, options.lookup);
}

}  // namespace dspark
