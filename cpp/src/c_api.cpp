// The C API: every entry point catches every exception and turns it into dspark_last_error().
#include <algorithm>
#include <cstdlib>
#include <map>
#include <cstring>
#include <new>

#include "dspark/dspark.h"
#include "dspark/dspark.hpp"
#include "dspark/tokenizer.hpp"

struct dspark_engine {
  std::unique_ptr<dspark::Engine> engine;
  std::map<int64_t, std::string> json, trace;  // strings handed out per request id
};

struct dspark_tokenizer {
  std::unique_ptr<dspark::Tokenizer> tokenizer;
};

struct dspark_results {
  std::vector<dspark::Result> results;
  std::vector<std::string> json, trace;
};

namespace {

thread_local std::string last_error;

template <class R, class F> R guarded(R on_error, F&& f) {
  try {
    last_error.clear();
    return f();
  } catch (const std::bad_alloc&) {
    last_error = "out of memory";
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown error";
  }
  return on_error;
}

bool check_index(const dspark_results* r, size_t i) {
  if (r && i < r->results.size()) return true;
  last_error = r ? "result index " + std::to_string(i) + " is out of range" : "results handle is NULL";
  return false;
}

long copy_ids(const std::vector<int64_t>& out, int64_t* ids, size_t capacity) {
  if (ids) std::memcpy(ids, out.data(), std::min(capacity, out.size()) * sizeof(int64_t));
  return static_cast<long>(out.size());
}

char* copy_string(const std::string& text) {
  char* out = static_cast<char*>(std::malloc(text.size() + 1));
  if (!out) throw std::bad_alloc();
  std::memcpy(out, text.c_str(), text.size() + 1);
  return out;
}

dspark::Request to_request(const dspark_request& r, size_t i) {
  dspark::Request out;
  if (!r.prompt_ids && r.prompt_len) throw dspark::Error("request " + std::to_string(i) + " has NULL prompt_ids");
  out.prompt_ids.assign(r.prompt_ids, r.prompt_ids + r.prompt_len);
  out.max_new_tokens = r.max_new_tokens;
  out.sampling = {r.temperature, r.top_p, r.top_k};
  out.seed = r.seed;
  out.ignore_eos = r.ignore_eos != 0;
  if (!r.stop && r.stop_count) throw dspark::Error("request " + std::to_string(i) + " has NULL stop strings");
  for (size_t k = 0; k < r.stop_count; ++k)
    if (r.stop[k]) out.stop.emplace_back(r.stop[k]);
  return out;
}

std::string trace_lines(const dspark::Result& r) {
  std::string lines;
  for (const auto& row : r.trace) lines += dspark::Result::trace_json(row) + "\n";
  return lines;
}

dspark::Engine& engine_of(dspark_engine* e) {
  if (!e) throw dspark::Error("engine is NULL");
  return *e->engine;
}

}  // namespace

extern "C" {

const char* dspark_last_error(void) { return last_error.c_str(); }

void dspark_options_init(dspark_options* o) {
  if (!o) return;
  *o = dspark_options{1, 0, 0, 0, 1, nullptr, nullptr, 0, nullptr, nullptr, 0.5};
}

void dspark_request_init(dspark_request* r) {
  if (!r) return;
  *r = dspark_request{nullptr, 0, 128, 0.0, 1.0, 0, 0, 0, nullptr, 0};
}

dspark_engine* dspark_open(const char* bundle_dir, const dspark_options* options) {
  return guarded<dspark_engine*>(nullptr, [&]() -> dspark_engine* {
    if (!bundle_dir) throw dspark::Error("bundle_dir is NULL");
    dspark_options defaults;
    dspark_options_init(&defaults);
    const dspark_options& o = options ? *options : defaults;
    dspark::Options opts;
    opts.use_draft = o.use_draft != 0;
    opts.num_draft_tokens = o.num_draft_tokens;
    opts.lookup = o.lookup;
    opts.max_batch = o.max_batch;
    opts.threads = o.threads;
    opts.verify_sha256 = o.verify_sha256 != 0;
    if (o.backend) opts.backend = o.backend;
    if (o.provider) opts.provider = o.provider;
    if (o.scheduler) opts.scheduler = o.scheduler;
    if (o.block_schedule) opts.block_schedule = o.block_schedule;
    opts.threshold = o.threshold;
    auto* handle = new dspark_engine{std::make_unique<dspark::Engine>(bundle_dir, opts), {}, {}};
    return handle;
  });
}

void dspark_close(dspark_engine* engine) { delete engine; }

long dspark_encode(dspark_engine* engine, const char* text, int64_t* ids, size_t capacity) {
  return guarded<long>(-1, [&]() -> long {
    if (!engine || !text) throw dspark::Error("engine or text is NULL");
    return copy_ids(engine->engine->encode(text), ids, capacity);
  });
}

char* dspark_decode(dspark_engine* engine, const int64_t* ids, size_t count) {
  return guarded<char*>(nullptr, [&]() -> char* {
    if (!engine || (!ids && count)) throw dspark::Error("engine or ids is NULL");
    return copy_string(engine->engine->decode(std::vector<int64_t>(ids, ids + count)));
  });
}

dspark_tokenizer* dspark_tokenizer_open(const char* path) {
  return guarded<dspark_tokenizer*>(nullptr, [&]() -> dspark_tokenizer* {
    if (!path) throw dspark::Error("tokenizer path is NULL");
    return new dspark_tokenizer{dspark::Tokenizer::from_file(path)};
  });
}

long dspark_tokenizer_encode(dspark_tokenizer* tok, const char* text, int64_t* ids, size_t capacity) {
  return guarded<long>(-1, [&]() -> long {
    if (!tok || !text) throw dspark::Error("tokenizer or text is NULL");
    return copy_ids(tok->tokenizer->encode(text), ids, capacity);
  });
}

char* dspark_tokenizer_decode(dspark_tokenizer* tok, const int64_t* ids, size_t count) {
  return guarded<char*>(nullptr, [&]() -> char* {
    if (!tok || (!ids && count)) throw dspark::Error("tokenizer or ids is NULL");
    return copy_string(tok->tokenizer->decode(std::vector<int64_t>(ids, ids + count)));
  });
}

void dspark_tokenizer_close(dspark_tokenizer* tok) { delete tok; }

void dspark_free_string(char* text) { std::free(text); }

dspark_results* dspark_generate(dspark_engine* engine, const dspark_request* requests, size_t count, int trace,
                                dspark_text_callback on_text, void* user) {
  return guarded<dspark_results*>(nullptr, [&]() -> dspark_results* {
    if (!engine || (!requests && count)) throw dspark::Error("engine or requests is NULL");
    std::vector<dspark::Request> reqs;
    for (size_t i = 0; i < count; ++i) reqs.push_back(to_request(requests[i], i));
    std::function<void(size_t, const std::string&)> cb;
    if (on_text) cb = [&](size_t i, const std::string& delta) { on_text(i, delta.c_str(), user); };
    auto out = std::make_unique<dspark_results>();
    out->results = engine->engine->generate(reqs, trace != 0, cb);
    for (const auto& r : out->results) {
      out->json.push_back(r.json());
      out->trace.push_back(trace_lines(r));
    }
    return out.release();
  });
}

int64_t dspark_submit(dspark_engine* engine, const dspark_request* request, int trace) {
  return guarded<int64_t>(-1, [&]() -> int64_t {
    if (!request) throw dspark::Error("request is NULL");
    return static_cast<int64_t>(engine_of(engine).submit(to_request(*request, 0), trace != 0));
  });
}

int dspark_step(dspark_engine* engine) {
  return guarded<int>(-1, [&]() -> int { return static_cast<int>(engine_of(engine).step().size()); });
}

int dspark_has_work(dspark_engine* engine) {
  return guarded<int>(0, [&]() -> int { return engine_of(engine).has_work() ? 1 : 0; });
}

const int64_t* dspark_request_tokens(dspark_engine* engine, int64_t id, size_t* count, int* done) {
  return guarded<const int64_t*>(nullptr, [&]() -> const int64_t* {
    const dspark::Result& r = engine_of(engine).result(static_cast<uint64_t>(id));
    if (count) *count = r.generated.size();
    if (done) *done = r.finish_reason.empty() ? 0 : 1;
    static const int64_t none = 0;  // a valid pointer for requests with no token yet
    return r.generated.empty() ? &none : r.generated.data();
  });
}

const char* dspark_request_json(dspark_engine* engine, int64_t id) {
  return guarded<const char*>(nullptr, [&]() -> const char* {
    std::string text = engine_of(engine).result(static_cast<uint64_t>(id)).json();
    return (engine->json[id] = std::move(text)).c_str();
  });
}

const char* dspark_request_trace(dspark_engine* engine, int64_t id) {
  return guarded<const char*>(nullptr, [&]() -> const char* {
    std::string text = trace_lines(engine_of(engine).result(static_cast<uint64_t>(id)));
    return (engine->trace[id] = std::move(text)).c_str();
  });
}

void dspark_release(dspark_engine* engine, int64_t id) {
  guarded<int>(0, [&]() -> int {
    engine_of(engine).release(static_cast<uint64_t>(id));
    engine->json.erase(id);  // engine_of has checked it is not NULL
    engine->trace.erase(id);
    return 0;
  });
}

int dspark_set_max_batch(dspark_engine* engine, int max_batch) {
  return guarded<int>(-1, [&]() -> int {
    engine_of(engine).set_max_batch(max_batch);
    return 0;
  });
}

int dspark_num_draft_tokens(dspark_engine* engine) {
  return guarded<int>(0, [&]() -> int { return engine_of(engine).num_draft_tokens(); });
}

int dspark_read_clock(dspark_engine* engine, dspark_clock* clock) {
  return guarded<int>(-1, [&]() -> int {
    if (!clock) throw dspark::Error("clock must not be NULL");
    const dspark::RoundClock& k = engine_of(engine).clock();
    *clock = {k.rounds, k.round_s, k.draft_s, k.verify_s};
    return 0;
  });
}

size_t dspark_results_count(const dspark_results* r) { return r ? r->results.size() : 0; }

const int64_t* dspark_results_tokens(const dspark_results* r, size_t i, size_t* count) {
  if (!check_index(r, i)) return nullptr;
  if (count) *count = r->results[i].generated.size();
  return r->results[i].generated.data();
}

const char* dspark_results_text(const dspark_results* r, size_t i) {
  return check_index(r, i) ? r->results[i].text.c_str() : nullptr;
}

const char* dspark_results_finish_reason(const dspark_results* r, size_t i) {
  return check_index(r, i) ? r->results[i].finish_reason.c_str() : nullptr;
}

const char* dspark_results_json(const dspark_results* r, size_t i) { return check_index(r, i) ? r->json[i].c_str() : nullptr; }
const char* dspark_results_trace(const dspark_results* r, size_t i) { return check_index(r, i) ? r->trace[i].c_str() : nullptr; }

void dspark_results_free(dspark_results* r) { delete r; }

}  // extern "C"
