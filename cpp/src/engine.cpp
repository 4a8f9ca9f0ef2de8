// The speculative loop with continuous batching, as dspark/runtime/generate.py: admit -> propose -> verify ->
// accept -> commit, plain decoding being the same loop with no draft tokens. Rows are the running sequences,
// compacted; newcomers are prefilled on their own rows and appended. Every choice that decides an emitted
// token (batch composition, cache capacity, the order of random draws) follows the Python runtime, so both give
// the same tokens and traces for the same bundle and seeds.
#include <algorithm>
#include <chrono>
#include <deque>
#include <map>
#include <set>

#include "bundle.hpp"
#include "decoder.hpp"
#include "dspark/dspark.hpp"
#include "dspark/tokenizer.hpp"
#include "proposers.hpp"
#include "sampling.hpp"
#include "scheduler.hpp"
#include "sequence.hpp"

namespace dspark {

using Clock = std::chrono::steady_clock;

void SamplingParams::check() const {
  if (!(temperature >= 0)) throw Error("temperature must be >= 0, got " + std::to_string(temperature));
  if (!(top_p > 0 && top_p <= 1)) throw Error("top-p must be in (0, 1], got " + std::to_string(top_p));
  if (top_k < 0) throw Error("top-k must be >= 0 (0 disables it), got " + std::to_string(top_k));
}

struct Engine::Impl {
  Impl(const std::string& dir, const Options& o)
      : options(o),
        bundle(dir, o.verify_sha256),
        tokenizer(Tokenizer::from_file(bundle.file("tokenizer.json"))),
        eos(bundle.eos_ids.begin(), bundle.eos_ids.end()),
        target(make_decoder(make_runner(bundle, "target", o), bundle.graph("target"))),
        cache(decoder_cache(bundle.target, 0, bundle)) {
    if (o.max_batch < 0) throw Error("max-batch must be positive, got " + std::to_string(o.max_batch));
    if (o.num_draft_tokens < 0)
      throw Error("num-draft-tokens must be positive, got " + std::to_string(o.num_draft_tokens));
    max_batch = o.max_batch ? std::min(o.max_batch, bundle.max_batch) : bundle.max_batch;
    proposer = make_proposer(bundle, o);
    scheduler = std::make_unique<Scheduler>(bundle, o, proposer && proposer->has_confidence());
    block_schedule = make_block_schedule(o.block_schedule);
  }

  Options options;
  Bundle bundle;
  std::unique_ptr<Tokenizer> tokenizer;
  std::set<int64_t> eos;
  std::unique_ptr<Decoder> target;
  KVCache cache;
  std::unique_ptr<Proposer> proposer;
  std::unique_ptr<Scheduler> scheduler;
  std::unique_ptr<BlockSchedule> block_schedule;  // unset: the draft length at every batch size
  int max_batch = 1;
  std::vector<Sequence*> running;
  std::deque<Sequence*> waiting;
  std::map<uint64_t, std::unique_ptr<Sequence>> sequences;  // every submitted request until released
  uint64_t next_id = 1;
  RoundClock clock;

  int k() const { return proposer ? proposer->k : 0; }

  void admit() {
    std::vector<Sequence*> fresh;
    while (!waiting.empty() && running.size() + fresh.size() < static_cast<size_t>(max_batch)) {
      fresh.push_back(waiting.front());
      waiting.pop_front();
    }
    if (fresh.empty()) return;
    // prefill the newcomers on their own rows: the running rows are not recomputed
    KVCache rows = cache.empty_like(static_cast<int>(fresh.size()));
    std::vector<std::vector<int64_t>> prompts;
    for (auto* s : fresh) prompts.push_back(s->tokens);
    std::vector<std::vector<float>> features(fresh.size());
    bool taps = proposer && proposer->wants_features();
    auto logits = feed(*target, rows, prompts, bundle.prefill_chunk, taps ? &features : nullptr);
    cache.add_rows(rows);
    if (proposer) proposer->add(static_cast<int>(fresh.size()), taps ? &features : nullptr);
    running.insert(running.end(), fresh.begin(), fresh.end());
    for (size_t i = 0; i < fresh.size(); ++i) {
      Sequence& s = *fresh[i];
      const SamplingParams& p = s.request.sampling;
      int vocab = target->vocab;
      int64_t token = p.greedy() ? argmax(logits[i].data(), vocab)
                                 : sample(probabilities(logits[i].data(), vocab, p), s.rng.random());
      emit(s, {token});
    }
  }

  static double since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

  void round() {
    auto started = Clock::now();
    std::vector<Sequence*>& seqs = running;
    size_t n = seqs.size();
    int rows = static_cast<int>(n);
    int draft_length = block_schedule ? block_schedule->cap(rows, k()) : k();
    std::vector<int64_t> anchors(n), left(n);  // left: tokens a row may still generate
    int64_t total_left = 0;
    for (size_t r = 0; r < n; ++r) {
      Sequence& s = *seqs[r];
      anchors[r] = static_cast<int64_t>(s.tokens.size()) - 1;
      left[r] = s.done() ? 0
                         : std::min<int64_t>(s.request.max_new_tokens - static_cast<int64_t>(s.result.generated.size()),
                                             bundle.max_context - static_cast<int64_t>(s.tokens.size()));
      total_left += left[r];
    }
    double mean_left = static_cast<double>(total_left) / static_cast<double>(n);
    if (draft_length)
      draft_length = scheduler->should_draft(rows, proposer->backlog(seqs), mean_left)
                         ? scheduler->draft_positions(rows, draft_length)
                         : 0;  // the scheduler expects no pay here
    std::vector<int> caps(n);
    for (size_t r = 0; r < n; ++r)
      caps[r] = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(draft_length, left[r] - 1)));
    auto drafting = Clock::now();
    std::vector<Proposal> proposals = proposer ? proposer->propose(seqs, caps) : std::vector<Proposal>(n);
    if (proposer) clock.draft_s += since(drafting);
    std::vector<std::vector<int64_t>> parts(n);
    std::vector<int> lengths = scheduler->choose(proposals), drafted(n);
    std::vector<Proposal> verified(n);  // each row's first lengths[r] drafts, with their laws
    for (size_t r = 0; r < n; ++r) {
      Proposal& p = proposals[r];
      drafted[r] = static_cast<int>(p.tokens.size());
      verified[r].tokens.assign(p.tokens.begin(), p.tokens.begin() + lengths[r]);
      if (!p.probs.empty()) {  // only acceptance reads the laws: moved, not copied
        size_t width = p.probs.size() / p.tokens.size();
        verified[r].probs = std::move(p.probs);
        verified[r].probs.resize(width * static_cast<size_t>(lengths[r]));
      }
      if (seqs[r]->done()) continue;
      parts[r].push_back(seqs[r]->tokens.back());
      parts[r].insert(parts[r].end(), verified[r].tokens.begin(), verified[r].tokens.end());
    }
    auto verifying = Clock::now();
    target->run(cache, parts, false);
    clock.verify_s += since(verifying);
    std::vector<int> accepted(n, 0), counts(n, 0);
    std::vector<std::vector<int64_t>> emitted(n);
    for (size_t r = 0; r < n; ++r) {
      if (parts[r].empty()) continue;
      const Proposal& p = verified[r];
      Verdict v = dspark::accept(target->logits(static_cast<int>(r), 0), target->vocab, p.tokens, p.probs,
                                 seqs[r]->request.sampling, seqs[r]->rng);
      accepted[r] = v.accepted;
      emitted[r].assign(p.tokens.begin(), p.tokens.begin() + v.accepted);
      emitted[r].push_back(v.token);
      counts[r] = static_cast<int>(emitted[r].size());
    }
    target->commit(cache, counts);
    if (proposer) proposer->commit(*target, anchors, drafted, lengths, accepted);
    for (size_t r = 0; r < n; ++r) {
      if (parts[r].empty()) continue;
      Sequence& s = *seqs[r];
      Result& res = s.result;
      res.drafted.push_back(drafted[r]);
      res.verified.push_back(lengths[r]);
      res.accepted.push_back(accepted[r]);
      std::vector<int64_t> committed = emit(s, emitted[r]);
      if (s.trace) {
        TraceRound row;
        row.round = static_cast<int>(res.accepted.size());
        row.position = anchors[r];
        row.draft_tokens = proposals[r].tokens;
        row.has_confidence = proposals[r].has_confidence;
        for (double z : proposals[r].confidence) row.confidence.push_back(sigmoid(z));
        row.verify_length = lengths[r];
        row.accepted = accepted[r];
        row.emitted = committed;
        res.trace.push_back(std::move(row));
      }
    }
    double seconds = since(started);
    clock.rounds += 1;
    clock.round_s += seconds;
    if (block_schedule) {
      int tokens = 0;
      for (const auto& e : emitted) tokens += static_cast<int>(e.size());
      block_schedule->observe(rows, draft_length > 0, tokens, seconds);
    }
  }

  // commit tokens in order until a stop condition; return the ones committed
  std::vector<int64_t> emit(Sequence& s, const std::vector<int64_t>& tokens) {
    std::vector<int64_t> committed;
    Result& res = s.result;
    for (int64_t t : tokens) {
      s.tokens.push_back(t);
      res.generated.push_back(t);
      committed.push_back(t);
      if (res.time_to_first_token_ms < 0)
        res.time_to_first_token_ms = std::chrono::duration<double, std::milli>(Clock::now() - s.submitted).count();
      if (eos.count(t) && !s.request.ignore_eos) res.finish_reason = "stop";
      else if (static_cast<int>(res.generated.size()) >= s.request.max_new_tokens ||
               static_cast<int>(s.tokens.size()) >= bundle.max_context)
        res.finish_reason = "length";
      if (s.done()) break;
    }
    std::vector<int64_t> text_ids;
    for (int64_t t : res.generated)
      if (!eos.count(t)) text_ids.push_back(t);
    std::string delta = s.stream.update(text_ids, s.done());
    if (s.stream.stopped && !s.done()) res.finish_reason = "stop";
    res.text = s.stream.text;
    if (s.on_text && !delta.empty()) s.on_text(delta);
    return committed;
  }

  // requests the caller released while they held a row: gone once their row is
  void forget_released() {
    for (auto it = sequences.begin(); it != sequences.end();)
      it = it->second->released && it->second->done() ? sequences.erase(it) : std::next(it);
  }

  void retire() {
    size_t alive = 0;
    for (Sequence* s : running)
      if (s->done()) s->result.elapsed_s = std::chrono::duration<double>(Clock::now() - s->submitted).count();
      else ++alive;
    if (alive == running.size()) return;
    // Python's fill_order: rows within the new count keep their slots and the survivors past it fill the finished
    // ones' slots, so a finished request moves at most one row of the caches
    std::vector<int> keep;
    std::vector<Sequence*> still;
    size_t mover = alive;
    for (size_t r = 0; r < alive; ++r) {
      if (running[r]->done()) {
        while (running[mover]->done()) ++mover;
        keep.push_back(static_cast<int>(mover++));
      } else {
        keep.push_back(static_cast<int>(r));
      }
      still.push_back(running[static_cast<size_t>(keep.back())]);
    }
    running = still;
    cache.keep_rows(keep);
    if (proposer) proposer->keep(keep);
  }
};

Engine::Engine(const std::string& bundle_dir, const Options& options) : impl_(std::make_unique<Impl>(bundle_dir, options)) {}
Engine::~Engine() = default;

std::vector<int64_t> Engine::encode(const std::string& text) const { return impl_->tokenizer->encode(text); }
std::string Engine::decode(const std::vector<int64_t>& ids) const { return impl_->tokenizer->decode(ids); }
const Tokenizer& Engine::tokenizer() const { return *impl_->tokenizer; }
int Engine::num_draft_tokens() const { return impl_->k(); }
int Engine::max_context() const { return impl_->bundle.max_context; }
const RoundClock& Engine::clock() const { return impl_->clock; }
std::string Engine::draft_method() const { return impl_->proposer ? impl_->bundle.draft_method : ""; }

uint64_t Engine::submit(const Request& r, bool trace, std::function<void(const std::string&)> on_text) {
  Impl& m = *impl_;
  if (r.prompt_ids.empty()) throw Error("the prompt is empty; give at least one token of text");
  if (static_cast<int64_t>(r.prompt_ids.size()) + 1 > m.bundle.max_context)
    throw Error("the prompt has " + std::to_string(r.prompt_ids.size()) + " tokens but the bundle's max context is " +
                std::to_string(m.bundle.max_context) + "; shorten the prompt or re-export with a larger --max-context");
  for (int64_t id : r.prompt_ids)
    if (id < 0 || id >= m.target->vocab)
      throw Error("prompt token id " + std::to_string(id) + " is outside the vocabulary (0.." +
                  std::to_string(m.target->vocab - 1) + ")");
  if (r.max_new_tokens < 1) throw Error("max-new-tokens must be at least 1, got " + std::to_string(r.max_new_tokens));
  r.sampling.check();
  uint64_t id = m.next_id++;
  auto seq = std::make_unique<Sequence>(r, *m.tokenizer, trace, std::move(on_text));
  m.waiting.push_back(seq.get());
  m.sequences[id] = std::move(seq);
  return id;
}

std::vector<uint64_t> Engine::step() {
  Impl& m = *impl_;
  std::vector<uint64_t> finished;
  try {
    m.admit();
    bool live = false;
    for (auto* s : m.running) live = live || !s->done();
    if (live) m.round();
    m.retire();
  } catch (...) {
    // leave the engine usable: the rows of this step end with an error, their caches are dropped
    for (auto* s : m.running)
      if (!s->done()) s->result.finish_reason = "error";
    m.running.clear();
    m.cache.keep_rows({});
    if (m.proposer) m.proposer->keep({});
    m.forget_released();
    throw;
  }
  m.forget_released();
  for (auto& [id, s] : m.sequences)
    if (s->done() && !s->reported) {
      s->reported = true;
      finished.push_back(id);
    }
  return finished;
}

bool Engine::has_work() const { return !impl_->waiting.empty() || !impl_->running.empty(); }

const Result& Engine::result(uint64_t id) const {
  auto it = impl_->sequences.find(id);
  if (it == impl_->sequences.end()) throw Error("no request with id " + std::to_string(id));
  return it->second->result;
}

void Engine::release(uint64_t id) {
  Impl& m = *impl_;
  auto it = m.sequences.find(id);
  if (it == m.sequences.end()) return;
  Sequence* s = it->second.get();
  if (!s->done()) s->result.finish_reason = "cancelled";  // a running row is dropped at the next step
  m.waiting.erase(std::remove(m.waiting.begin(), m.waiting.end(), s), m.waiting.end());
  bool in_use = std::find(m.running.begin(), m.running.end(), s) != m.running.end();
  if (!in_use) m.sequences.erase(it);
  else s->released = true;
}

void Engine::set_max_batch(int max_batch) {
  if (max_batch < 1) throw Error("max-batch must be at least 1, got " + std::to_string(max_batch));
  impl_->max_batch = std::min(max_batch, impl_->bundle.max_batch);
}

std::vector<Result> Engine::generate(const std::vector<Request>& requests, bool trace,
                                     const std::function<void(size_t, const std::string&)>& on_text) {
  if (has_work()) throw Error("the engine is running other requests; use submit/step alongside them");
  std::vector<uint64_t> ids;
  try {
    for (size_t i = 0; i < requests.size(); ++i)  // every request is checked before any runs
      ids.push_back(submit(requests[i], trace, on_text ? std::function<void(const std::string&)>(
                                                             [&on_text, i](const std::string& d) { on_text(i, d); })
                                                       : nullptr));
    while (has_work()) step();
  } catch (...) {
    for (uint64_t id : ids) release(id);
    impl_->waiting.clear();
    throw;
  }
  std::vector<Result> results;
  for (uint64_t id : ids) {
    results.push_back(result(id));
    release(id);
  }
  return results;
}

}  // namespace dspark
