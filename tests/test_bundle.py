"""The typed manifest: Bundle.open reads every field the runtimes use once, and refuses a bad one in one line."""

from __future__ import annotations

import copy
import json

import pytest

from dspark.bundle import SCHEMA_VERSION, Bundle, GraphSpec, Limits, ModelConfig, TensorSpec
from dspark.errors import DsparkError

SIZES = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "hidden_size": 64, "vocab_size": 96}
MANIFEST = {
    "schema_version": SCHEMA_VERSION,
    "dtype": "fp16",
    "quantize": None,
    "files": {},
    "limits": {"max_batch": 4, "max_context": 128, "prefill_chunk": 16, "max_verify_tokens": 5},
    "graphs": {
        "target": {"file": "target.onnx", "flavour": "ort",
                   "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "new_tokens"]},
                              {"name": "past_key.0", "dtype": "float16", "shape": ["batch", 2, "cache", 64]}],
                   "outputs": [{"name": "hidden", "dtype": "float16", "shape": ["batch", "new_tokens", 128]}],
                   "dims": {"batch": [1, 4], "new_tokens": [1, 16]}, "profiles": {}},
        "draft_propose": {"file": "draft_propose.onnx", "inputs": [], "outputs": [], "dims": {"batch": [1, 4]},
                          "profiles": {"decode": {"batch": [1, 1, 4]}}},
    },
    "models": {
        "target": {"source": "/ckpt/target", "config": dict(SIZES, family="qwen3"), "graphs": ["target"],
                   "tap_layers": [0, 1]},
        "draft": {"method": "dspark", "source": "/ckpt/draft", "graphs": ["draft_propose"], "draft_length": 4,
                  "config": dict(SIZES, target_layer_ids=[0, 1], enable_confidence_head=True, markov_rank=8)},
    },
    "tokenizer": {"files": ["tokenizer.json"], "eos_token_ids": [2], "bos_token_id": None, "has_chat_template": False},
}


def write(folder, manifest) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_manifest_becomes_typed_fields(tmp_path):
    write(tmp_path, MANIFEST)
    bundle = Bundle.open(tmp_path)
    assert bundle.dtype == "fp16" and bundle.quantize is None
    assert bundle.limits == Limits(max_batch=4, max_context=128, prefill_chunk=16, max_verify_tokens=5)
    assert bundle.target.config == ModelConfig(**SIZES) and bundle.target.tap_layers == (0, 1)
    draft = bundle.draft
    assert (draft.method, draft.block, draft.draft_length) == ("dspark", True, 4)
    assert draft.target_layer_ids == (0, 1) and draft.confidence_head and draft.raw_config["markov_rank"] == 8
    target = bundle.graph("target")
    assert isinstance(target, GraphSpec) and target.fused and target.in_place and target.dims["new_tokens"] == (1, 16)
    assert target.outputs == (TensorSpec("hidden", "float16", ("batch", "new_tokens", 128)),)
    propose = bundle.graph("draft_propose")
    assert propose.flavour == "standard" and not propose.fused and not propose.in_place and propose.profiles == {"decode": {"batch": (1, 1, 4)}}
    assert bundle.tokenizer.eos_token_ids == (2,) and bundle.tokenizer.bos_token_id is None
    assert list(bundle.models) == ["target", "draft"]


def test_a_bundle_without_draft_has_none(tmp_path):
    manifest = copy.deepcopy(MANIFEST)
    del manifest["models"]["draft"]
    write(tmp_path, manifest)
    bundle = Bundle.open(tmp_path)
    assert bundle.draft is None and list(bundle.models) == ["target"]


def drop(path: str):
    def change(m):
        *parents, key = path.split(".")
        for p in parents:
            m = m[p]
        del m[key]
    return change


def put(path: str, value):
    def change(m):
        *parents, key = path.split(".")
        for p in parents:
            m = m[p]
        m[key] = value
    return change


@pytest.mark.parametrize("change,words", [
    (put("schema_version", 1), ["schema version 1 is not the 2", "re-export it"]),
    (drop("limits"), ["'limits' is missing"]),
    (put("limits.max_context", 0), ["'limits.max_context' must be at least 1, got 0"]),
    (put("limits.max_batch", True), ["'limits.max_batch' must be an integer, not true"]),
    (drop("models.target.config.num_kv_heads"), ["'models.target.config.num_kv_heads' is missing"]),
    (put("graphs.target.inputs", {}), ["'graphs.target.inputs' must be an array"]),
    (put("graphs.target.dims.batch", [1]), ["'graphs.target.dims.batch' must hold 2 integers"]),
    (put("graphs.target.outputs", [{"name": "x", "dtype": "float32", "shape": [1.5]}]),
     ["'graphs.target.outputs[0].shape[0]' must be a size or a dimension name"]),
    (drop("models.draft.draft_length"), ["'models.draft.draft_length' is missing"]),
    (put("models.draft.method", "medusa"), ["'models.draft.method' must be one of draft-lm, dspark, dflash"]),
    (put("models.draft.config.target_layer_ids", ["a"]), ["'models.draft.config.target_layer_ids[0]' must be an integer"]),
    (put("tokenizer.eos_token_ids", 2), ["'tokenizer.eos_token_ids' must be an array"]),
    (put("files", {"a.onnx": {"bytes": 3}}), ["files['a.onnx'] needs 'bytes' and 'sha256'"]),
])
def test_a_bad_field_is_refused_in_one_line_naming_it(tmp_path, change, words):
    manifest = copy.deepcopy(MANIFEST)
    change(manifest)
    write(tmp_path, manifest)
    with pytest.raises(DsparkError) as error:
        Bundle.open(tmp_path)
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message
    if manifest["schema_version"] == SCHEMA_VERSION:
        assert message.endswith("re-export the bundle")
