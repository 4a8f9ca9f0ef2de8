// The bundle's manifest as the host reads it (see dspark/bundle.py): schema version, files with sizes and
// sha256, graphs with their I/O, limits, models, tokenizer. Opening checks the files against the manifest.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "json.hpp"

namespace dspark {

constexpr int kSchemaVersion = 2;  // 2: the draft length stored once, as models.draft.draft_length

struct TensorSpec {
  std::string name, dtype;
  std::vector<std::string> shape;  // a dimension is a number or a symbol ("batch", "cache", ...)
};

struct GraphSpec {
  std::string name, file, flavour;  // flavour: "standard" (new_k/new_v out) or "ort" (in-place KV)
  std::vector<TensorSpec> inputs, outputs;
  std::map<std::string, std::pair<int64_t, int64_t>> dims;  // symbol -> [min, max]
  const TensorSpec* input(const std::string& n) const;
  const TensorSpec* output(const std::string& n) const;
};

struct ModelConfig {
  int vocab_size = 0, hidden_size = 0, num_layers = 0, num_kv_heads = 0, head_dim = 0;
};

class Bundle {
 public:
  // throws Error: folder or manifest missing, bad JSON, unknown schema, a file missing/resized/changed,
  // inconsistent draft and target
  Bundle(const std::string& dir, bool verify_sha256);

  std::string dir;
  json::Value manifest;
  std::string dtype;  // "fp32" or "fp16"
  int max_batch = 0, max_context = 0, prefill_chunk = 0, max_verify_tokens = 0;
  ModelConfig target, draft;
  bool has_draft = false;
  std::string draft_method;  // "draft-lm", "dspark", "dflash"
  int draft_length = 0;  // tokens drafted per round: a draft LM's K, a block drafter's block
  // block drafters
  bool confidence_head = false;
  std::vector<int64_t> target_layer_ids, tap_layers;
  std::vector<int64_t> draft_vocab;  // a reduced draft vocabulary: the target ids the drafter's law is over
  std::vector<int64_t> eos_ids;
  std::map<std::string, GraphSpec> graphs;

  const GraphSpec& graph(const std::string& name) const;
  std::string file(const std::string& rel) const { return dir + "/" + rel; }
  bool lists(const std::string& rel) const;  // whether the manifest lists this file (checked when it opened)
  // a JSON file the manifest lists (checked when the bundle opened), or nullopt where it lists none by that name
  // (as dspark/bundle.py's read_json: a profile or a calibration the bundle may not have)
  std::optional<json::Value> read_json(const std::string& rel) const;
};

}  // namespace dspark
