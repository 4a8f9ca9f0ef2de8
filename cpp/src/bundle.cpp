#include "bundle.hpp"

#include "dspark/dspark.hpp"
#include "files.hpp"
#include "sha256.hpp"

namespace dspark {
namespace {

ModelConfig model_config(const json::Value& config) {
  ModelConfig c;
  c.vocab_size = static_cast<int>(config.at("vocab_size").integer("vocab_size"));
  c.hidden_size = static_cast<int>(config.at("hidden_size").integer("hidden_size"));
  c.num_layers = static_cast<int>(config.at("num_layers").integer("num_layers"));
  c.num_kv_heads = static_cast<int>(config.at("num_kv_heads").integer("num_kv_heads"));
  c.head_dim = static_cast<int>(config.at("head_dim").integer("head_dim"));
  return c;
}

std::vector<int64_t> int_list(const json::Value& v, const char* what) {
  std::vector<int64_t> out;
  for (const auto& x : v.items(what)) out.push_back(x.integer(what));
  return out;
}

std::string join_ints(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

std::vector<TensorSpec> tensor_specs(const json::Value& list) {
  std::vector<TensorSpec> out;
  for (const auto& t : list.items("graph inputs/outputs")) {
    TensorSpec s;
    s.name = t.at("name").str("name");
    s.dtype = t.at("dtype").str("dtype");
    for (const auto& d : t.at("shape").items("shape"))
      s.shape.push_back(d.is_string() ? d.str() : std::to_string(d.integer("dimension")));
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace

const TensorSpec* GraphSpec::input(const std::string& n) const {
  for (const auto& t : inputs)
    if (t.name == n) return &t;
  return nullptr;
}

const TensorSpec* GraphSpec::output(const std::string& n) const {
  for (const auto& t : outputs)
    if (t.name == n) return &t;
  return nullptr;
}

const GraphSpec& Bundle::graph(const std::string& name) const {
  auto it = graphs.find(name);
  if (it == graphs.end()) throw Error(dir + ": the manifest has no graph '" + name + "'; re-export the bundle");
  return it->second;
}

bool Bundle::lists(const std::string& rel) const {
  const json::Value* files = manifest.find("files");
  return files && files->has(rel);
}

std::optional<json::Value> Bundle::read_json(const std::string& rel) const {
  if (!lists(rel)) return std::nullopt;
  auto text = read_file(file(rel));
  if (!text) throw Error(file(rel) + " cannot be read; re-export the bundle");
  return json::Value::parse(*text);
}

Bundle::Bundle(const std::string& folder, bool verify_sha256) : dir(folder) {
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  if (!is_dir(dir)) throw Error("bundle folder not found: " + dir + " (create one with 'dspark export')");
  std::string mpath = dir + "/manifest.json";
  auto text = file_size(mpath) < 0 ? std::nullopt : read_file(mpath);
  if (!text) throw Error(dir + " has no manifest.json; it is not a dspark bundle (create one with 'dspark export')");
  try {
    manifest = json::Value::parse(*text);
  } catch (const std::exception& e) {
    throw Error(mpath + " is not valid JSON: " + e.what());
  }
  const json::Value* version = manifest.find("schema_version");
  if (!version || !version->is_number() || version->integer("schema_version") != kSchemaVersion) {
    std::string got = version && version->is_number() ? std::to_string(version->integer()) : "(none)";
    throw Error(dir + ": manifest schema version " + got + " is not the " + std::to_string(kSchemaVersion) +
                " this host reads; re-export it");
  }
  try {
    // every file the manifest names: sizes always, sha256 unless switched off
    std::vector<std::string> problems;
    for (const auto& [rel, record] : manifest.at("files").members("files")) {
      long long size = file_size(file(rel));
      long long want = record.at("bytes").integer("bytes");
      if (size < 0) problems.push_back(rel + " is missing");
      else if (size != want)
        problems.push_back(rel + " has " + std::to_string(size) + " bytes, the manifest says " + std::to_string(want));
      else if (verify_sha256 && sha256_file(file(rel)) != record.at("sha256").str("sha256"))
        problems.push_back(rel + " has changed (sha256 differs from the manifest)");
    }
    if (!problems.empty()) {
      std::string msg = "bundle " + dir + " does not match its manifest: ";
      for (size_t i = 0; i < problems.size(); ++i) msg += (i ? "; " : "") + problems[i];
      throw Error(msg + "; re-export it");
    }
    dtype = manifest.at("dtype").str("dtype");
    // the caches this host owns are [layer, row, kv_head, position, head_dim]; another layout would be misread
    std::vector<std::string> axes;
    for (const auto& a : manifest.at("kv_layout").at("axes").items("kv_layout.axes")) axes.push_back(a.str("axis"));
    if (axes != std::vector<std::string>{"layer", "batch", "kv_head", "position", "head_dim"})
      throw Error(dir + ": the manifest's KV layout is not [layer, batch, kv_head, position, head_dim], the one this "
                  "host runs; re-export the bundle with this dspark version");
    const auto& limits = manifest.at("limits");
    max_batch = static_cast<int>(limits.at("max_batch").integer("max_batch"));
    max_context = static_cast<int>(limits.at("max_context").integer("max_context"));
    prefill_chunk = static_cast<int>(limits.at("prefill_chunk").integer("prefill_chunk"));
    max_verify_tokens = static_cast<int>(limits.at("max_verify_tokens").integer("max_verify_tokens"));
    const auto& models = manifest.at("models");
    const auto& t = models.at("target");
    target = model_config(t.at("config"));
    if (const auto* taps = t.find("tap_layers")) tap_layers = int_list(*taps, "tap_layers");
    for (const auto& [name, g] : manifest.at("graphs").members("graphs")) {
      GraphSpec spec;
      spec.name = name;
      spec.file = g.at("file").str("file");
      const auto* flavour = g.find("flavour");
      spec.flavour = flavour ? flavour->str("flavour") : "standard";
      spec.inputs = tensor_specs(g.at("inputs"));
      spec.outputs = tensor_specs(g.at("outputs"));
      if (const auto* dims = g.find("dims"))
        for (const auto& [sym, range] : dims->members("dims"))
          spec.dims[sym] = {range.items()[0].integer(), range.items()[1].integer()};
      graphs[name] = std::move(spec);
    }
    const auto& tok = manifest.at("tokenizer");
    eos_ids = int_list(tok.at("eos_token_ids"), "eos_token_ids");
    const json::Value* d = models.find("draft");
    if (d && !d->is_null()) {
      has_draft = true;
      draft_method = d->at("method").str("method");
      draft_length = static_cast<int>(d->at("draft_length").integer("draft_length"));
      const auto& c = d->at("config");
      draft = model_config(c);
      if (const auto* ids = d->find("draft_vocab")) draft_vocab = int_list(*ids, "draft_vocab");
      if (draft_method != "draft-lm") {
        confidence_head = c.at("enable_confidence_head").boolean("enable_confidence_head");
        target_layer_ids = int_list(c.at("target_layer_ids"), "target_layer_ids");
      }
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw Error(mpath + " is not a manifest this host reads (" + e.what() + "); re-export the bundle");
  }
  if (!has_draft) return;
  // a drafter made for another target: refuse it before any graph runs (the export refuses it too)
  std::string why;
  // a reduced draft LM has one id per draft-vocabulary entry and one for every other token
  bool reduced_lm = draft_method == "draft-lm" && !draft_vocab.empty();
  if (reduced_lm ? draft.vocab_size != static_cast<int>(draft_vocab.size()) + 1 : draft.vocab_size != target.vocab_size)
    why = "its vocabulary has " + std::to_string(draft.vocab_size) + " tokens, the target's " +
          std::to_string(target.vocab_size);
  else if (draft_method == "draft-lm" && graphs.count("draft") == 0)
    why = "the manifest has no 'draft' graph";
  else if (draft_method != "draft-lm" && target_layer_ids != tap_layers)
    why = "it reads target layers " + join_ints(target_layer_ids) + " but the target graph taps " + join_ints(tap_layers);
  else if (draft_method != "draft-lm") {
    const TensorSpec* hidden = graph("target").output("hidden");
    const TensorSpec* feats = graph("draft_context").input("features");
    if (!hidden || !feats || hidden->shape.back() != feats->shape.back())
      why = "its context graph takes features of width " + (feats ? feats->shape.back() : std::string("?")) +
            " but the target returns " + (hidden ? hidden->shape.back() : std::string("none"));
  }
  if (!why.empty())
    throw Error("bundle " + dir + ": the " + draft_method + " drafter was made for another target (" + why +
                "); export it with its own target, or use --no-draft");
}

}  // namespace dspark
