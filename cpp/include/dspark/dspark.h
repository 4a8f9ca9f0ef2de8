/* dspark C API: a plain C interface over the C++ host, for other languages to bind (ctypes, cgo, JNI...).
 *
 * Handles are opaque. Functions that can fail return NULL or a negative value and leave a message for
 * dspark_last_error() (per thread, valid until the next call on that thread). Strings the library returns
 * belong to the handle they came from, except those from dspark_decode and dspark_tokenizer_decode, which the caller frees with
 * dspark_free_string. Nothing here throws or aborts on bad input.
 */
#ifndef DSPARK_H
#define DSPARK_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dspark_engine dspark_engine;
typedef struct dspark_results dspark_results;
typedef struct dspark_tokenizer dspark_tokenizer;

typedef struct {
  int use_draft;          /* 0: plain decoding with the target alone */
  int num_draft_tokens;   /* 0: the bundle's */
  int max_batch;          /* 0: the bundle's */
  int threads;            /* ONNX Runtime intra-op threads; 0: all cores */
  int verify_sha256;      /* file sizes are always checked; sha256 too when non-zero */
  const char* backend;    /* "ort" (default when NULL) or "trt" */
  const char* provider;   /* "cpu" (default when NULL), "cuda", "tensorrt" */
  int lookup;             /* prompt lookup from earlier occurrences of a row's last N+ tokens; 0: off */
  const char* scheduler;  /* verify lengths: "auto" (default when NULL), "fixed", "threshold", "sps" */
  const char* block_schedule; /* draft length by running rows: "auto", "1:7,4:4,16:0"; NULL or "off": always draft */
  double threshold;       /* scheduler "threshold": verify up to the first draft whose confidence is below it */
} dspark_options;

typedef struct {
  const int64_t* prompt_ids;
  size_t prompt_len;
  int max_new_tokens;
  double temperature, top_p;
  int top_k;
  uint64_t seed;
  int ignore_eos;
  const char* const* stop;  /* stop strings (cut from the text), `stop_count` of them; may be NULL */
  size_t stop_count;
} dspark_request;

/* where the engine's rounds spent their time since it was opened (prefill excluded): the rounds, and of them the
 * proposer's calls and the target's verify calls; the rest is host work */
typedef struct {
  int64_t rounds;
  double round_s, draft_s, verify_s;
} dspark_clock;

/* called with each request's new text as it becomes safe to show */
typedef void (*dspark_text_callback)(size_t request_index, const char* delta, void* user);

const char* dspark_last_error(void);
void dspark_options_init(dspark_options* options);
void dspark_request_init(dspark_request* request);

dspark_engine* dspark_open(const char* bundle_dir, const dspark_options* options); /* NULL on error */
void dspark_close(dspark_engine* engine);

/* token ids of `text`: writes at most `capacity` ids, returns how many there are (-1 on error) */
long dspark_encode(dspark_engine* engine, const char* text, int64_t* ids, size_t capacity);
char* dspark_decode(dspark_engine* engine, const int64_t* ids, size_t count); /* NULL on error */
void dspark_free_string(char* text);

/* a tokenizer.json on its own (the same code an engine uses) */
dspark_tokenizer* dspark_tokenizer_open(const char* tokenizer_json); /* NULL on error */
long dspark_tokenizer_encode(dspark_tokenizer* tokenizer, const char* text, int64_t* ids, size_t capacity);
char* dspark_tokenizer_decode(dspark_tokenizer* tokenizer, const int64_t* ids, size_t count);
void dspark_tokenizer_close(dspark_tokenizer* tokenizer);

/* run `count` requests to completion (continuously batched); NULL on error */
dspark_results* dspark_generate(dspark_engine* engine, const dspark_request* requests, size_t count, int trace,
                                dspark_text_callback on_text, void* user);
/* The same engine step by step (a server or a closed loop): submit queues a request and returns its id (-1 on
 * error); step admits waiting requests, runs one speculative round and returns how many requests finished (-1 on
 * error); a request's tokens, JSON and trace stay readable until dspark_release, which also cancels it. */
int64_t dspark_submit(dspark_engine* engine, const dspark_request* request, int trace);
int dspark_step(dspark_engine* engine);
int dspark_has_work(dspark_engine* engine);
const int64_t* dspark_request_tokens(dspark_engine* engine, int64_t id, size_t* count, int* done); /* NULL: no id */
const char* dspark_request_json(dspark_engine* engine, int64_t id);  /* valid until the next call for this id */
const char* dspark_request_trace(dspark_engine* engine, int64_t id);
void dspark_release(dspark_engine* engine, int64_t id);
int dspark_set_max_batch(dspark_engine* engine, int max_batch);  /* 0 ok, -1 on error */
int dspark_num_draft_tokens(dspark_engine* engine);              /* 0: plain decoding */
int dspark_read_clock(dspark_engine* engine, dspark_clock* clock); /* 0 ok, -1 on error */

size_t dspark_results_count(const dspark_results* results);
const int64_t* dspark_results_tokens(const dspark_results* results, size_t index, size_t* count);
const char* dspark_results_text(const dspark_results* results, size_t index);
const char* dspark_results_finish_reason(const dspark_results* results, size_t index);
/* the `dspark generate --json` object of one request, and its --trace lines (newline-terminated) */
const char* dspark_results_json(const dspark_results* results, size_t index);
const char* dspark_results_trace(const dspark_results* results, size_t index);
void dspark_results_free(dspark_results* results);

#ifdef __cplusplus
}
#endif

#endif /* DSPARK_H */
