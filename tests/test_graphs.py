"""Exported decoder graphs run by ONNX Runtime match transformers' own forward (fp32, <= 1e-4), in both flavours:
ONNX Runtime's fused operators with the KV cache updated in place, and the standard operators TensorRT takes."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from conftest import VOCAB, assert_token_numbers_ignore_the_call, hf_model, save_hf
from dspark.bundle import Bundle
from dspark.export.bundle import ExportOptions, export_bundle
from dspark.runtime.decoder import commit, decoder_cache, run_decoder
from dspark.runtime.runners import OrtRunner

TOL = 1e-4


@pytest.fixture(scope="module", params=[(f, r) for f in ("qwen3", "qwen2", "llama") for r in ("ort", "tensorrt")],
                ids=lambda p: "-".join(p))
def exported(request, tmp_path_factory):
    family, runtime = request.param
    # qwen2 with tied embeddings, the others untied: both layouts are exercised
    model = hf_model(family, VOCAB, seed=7, tie_word_embeddings=family == "qwen2")
    root = tmp_path_factory.mktemp(family)
    save_hf(model, root / "hf", VOCAB)
    export_bundle(root / "hf", root / "bundle", options=ExportOptions(max_context=64, prefill_chunk=16, runtime=runtime),
                  progress=False)
    return model, Bundle.open(root / "bundle")


def reference(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_ragged_prefill_then_ragged_steps(exported):
    model, bundle = exported
    runner = OrtRunner(bundle, "target")
    rng = np.random.default_rng(0)
    cache = decoder_cache(bundle.target.config, 3, bundle)
    cache.reserve(64)
    # garbage everywhere: entries past each row's length must have no effect
    cache.k[:] = rng.normal(0, 3, cache.k.shape)
    cache.v[:] = rng.normal(0, 3, cache.v.shape)
    history = [list(rng.integers(1, VOCAB, n)) for n in (5, 11, 8)]
    out = run_decoder(runner, cache, history)
    for r, ids in enumerate(history):
        np.testing.assert_allclose(out["logits"][r, : len(ids)], reference(model, ids), atol=TOL, rtol=0)
    commit(cache, out, [len(h) for h in history])
    # speculative-style steps: rows feed different counts and keep a random prefix of them
    for width in (1, 4, 3, 8, 2):
        parts = [list(rng.integers(1, VOCAB, rng.integers(1, width + 1))) for _ in history]
        out = run_decoder(runner, cache, parts)
        kept = []
        for r, part in enumerate(parts):
            expected = reference(model, history[r] + part)[len(history[r]) :]
            np.testing.assert_allclose(out["logits"][r, : len(part)], expected, atol=TOL, rtol=0)
            kept.append(int(rng.integers(1, len(part) + 1)))
            history[r] = history[r] + part[: kept[-1]]
        commit(cache, out, kept)
    assert list(cache.lens) == [len(h) for h in history]


def test_a_tokens_numbers_do_not_depend_on_the_call(exported):
    _, bundle = exported
    if bundle.graph("target").flavour != "ort":
        pytest.skip("the standard flavour is TensorRT's: its engine picks kernels per shape and profile, and "
                    "ONNX Runtime running it here says nothing about what TensorRT will do")
    assert_token_numbers_ignore_the_call(bundle.path)


def test_runners_of_one_graph_share_a_session(exported):
    """Two runners of one graph share the process's session (one copy of the weights) yet keep their own bindings
    and buffers: calls on different caches, interleaved, each match transformers; the session goes with them."""
    model, bundle = exported
    first, second = OrtRunner(bundle, "target"), OrtRunner(bundle, "target")
    assert first.session is second.session
    histories = {first: [4, 8, 15, 16, 23], second: [42, 7, 1]}
    caches = {}
    for runner, ids in histories.items():
        caches[runner] = decoder_cache(bundle.target.config, 1, bundle)
        caches[runner].reserve(64)
    for step in range(4):
        for runner, ids in histories.items():
            new = ids if step == 0 else [(ids[-1] * 3 + step) % VOCAB]
            history = (ids if step == 0 else ids + new)
            out = run_decoder(runner, caches[runner], [new])
            np.testing.assert_allclose(out["logits"][0, : len(new)], reference(model, history)[-len(new):],
                                       atol=TOL, rtol=0)
            commit(caches[runner], out, [len(new)])
            histories[runner] = history
    session = weakref.ref(first.session)
    del first, second, runner, histories, caches
    gc.collect()
    assert session() is None


def test_new_keys_match_transformers_cache(exported):
    model, bundle = exported
    runner = OrtRunner(bundle, "target")
    ids = [3, 9, 27, 81 % VOCAB, 5, 6, 7]
    cache = decoder_cache(bundle.target.config, 1, bundle)
    commit(cache, run_decoder(runner, cache, [ids]), [len(ids)])
    with torch.no_grad():
        hf_cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    for layer in range(model.config.num_hidden_layers):
        np.testing.assert_allclose(cache.k[layer, 0, :, : len(ids)], hf_cache.layers[layer].keys[0].numpy(), atol=TOL, rtol=0)
        np.testing.assert_allclose(cache.v[layer, 0, :, : len(ids)], hf_cache.layers[layer].values[0].numpy(), atol=TOL, rtol=0)


def test_manifest_records_dynamic_dims(exported):
    _, bundle = exported
    graph = bundle.graph("target")
    shapes = {spec.name: spec.shape for spec in graph.inputs + graph.outputs}
    assert shapes["input_ids"] == ("batch", "new_tokens")
    if graph.flavour == "ort":
        assert shapes["past_key.0"] == shapes["present_key.0"] == ("batch", 2, "cache", 16)
        assert shapes["logits"] == ("batch", "logit_rows", VOCAB)
        assert graph.dims == {"batch": (1, 8), "new_tokens": (1, 16), "logit_rows": (1, 16), "cache": (1, 81)}
        return
    assert shapes["past_k"][1] == "batch" and shapes["past_k"][3] == "cache"
    assert shapes["logits"] == ("batch", "new_tokens", VOCAB)
    assert shapes["new_k"][3] == "new_tokens"
    assert graph.dims == {"batch": (1, 8), "new_tokens": (1, 16), "cache": (0, 64)}
    assert set(graph.profiles) == {"prefill", "decode"}
