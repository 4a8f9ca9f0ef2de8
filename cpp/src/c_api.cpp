// The C API: every entry point catches every exception and turns it into dspark_last_error().
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "dspark/dspark.h"
#include "dspark/dspark.hpp"
#include "dspark/tokenizer.hpp"

struct dspark_engine {
  std::unique_ptr<dspark::Engine> engine;
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

}  // namespace

extern "C" {

const char* dspark_last_error(void) { return last_error.c_str(); }

void dspark_options_init(dspark_options* o) {
  if (!o) return;
  *o = dspark_options{1, 0, 0, 0, 1, nullptr, nullptr};
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
    opts.max_batch = o.max_batch;
    opts.threads = o.threads;
    opts.verify_sha256 = o.verify_sha256 != 0;
    if (o.backend) opts.backend = o.backend;
    if (o.provider) opts.provider = o.provider;
    auto* handle = new dspark_engine{std::make_unique<dspark::Engine>(bundle_dir, opts)};
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
    std::vector<dspark::Request> reqs(count);
    for (size_t i = 0; i < count; ++i) {
      const dspark_request& r = requests[i];
      if (!r.prompt_ids && r.prompt_len) throw dspark::Error("request " + std::to_string(i) + " has NULL prompt_ids");
      reqs[i].prompt_ids.assign(r.prompt_ids, r.prompt_ids + r.prompt_len);
      reqs[i].max_new_tokens = r.max_new_tokens;
      reqs[i].sampling = {r.temperature, r.top_p, r.top_k};
      reqs[i].seed = r.seed;
      reqs[i].ignore_eos = r.ignore_eos != 0;
      if (!r.stop && r.stop_count) throw dspark::Error("request " + std::to_string(i) + " has NULL stop strings");
      for (size_t k = 0; k < r.stop_count; ++k)
        if (r.stop[k]) reqs[i].stop.emplace_back(r.stop[k]);
    }
    std::function<void(size_t, const std::string&)> cb;
    if (on_text) cb = [&](size_t i, const std::string& delta) { on_text(i, delta.c_str(), user); };
    auto out = std::make_unique<dspark_results>();
    out->results = engine->engine->generate(reqs, trace != 0, cb);
    for (const auto& r : out->results) {
      out->json.push_back(r.json());
      std::string lines;
      for (const auto& row : r.trace) lines += dspark::Result::trace_json(row) + "\n";
      out->trace.push_back(lines);
    }
    return out.release();
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
