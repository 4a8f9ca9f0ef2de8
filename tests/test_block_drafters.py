"""DSpark (vanilla, gated, rnn Markov heads) and DFlash drafters exported into bundles and run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import VARIANTS, VOCAB, deepspec_drafter, reduced_vocab
from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.export.bundle import ExportOptions, export_bundle
from dspark.runtime.generate import Generator, Request
from dspark.runtime.sampling import SamplingParams

BLOCK = 5
PROMPTS = [[5, 6, 7, 8, 9], [3] * 40, list(range(1, 70))]


def make_drafter(target, target_dir, folder, variant):
    return deepspec_drafter(target, target_dir, folder, variant, block_size=BLOCK)


@pytest.fixture(scope="module", params=list(VARIANTS))
def block_bundle(request, qwen3_pair, tmp_path_factory):
    target, target_dir, _ = qwen3_pair
    root = tmp_path_factory.mktemp(request.param)
    draft_dir = make_drafter(target, target_dir, root / "draft", request.param)
    export_bundle(target_dir, root / "bundle", draft_dir, ExportOptions(max_context=256, prefill_chunk=32), progress=False)
    return request.param, root / "bundle"


def test_manifest_records_the_drafter(block_bundle):
    variant, path = block_bundle
    bundle = Bundle.open(path)
    draft = bundle.draft
    rank, kind, confidence = VARIANTS[variant]
    assert draft.method == ("dflash" if variant == "dflash" else "dspark") and draft.block
    # the block size is the draft length, stored once
    assert draft.draft_length == BLOCK and "block_size" not in draft.raw_config
    assert draft.target_layer_ids == (0, 1) and draft.raw_config["mask_token_id"] == VOCAB - 1
    assert draft.raw_config["markov_rank"] == rank and draft.raw_config["markov_head_type"] == kind
    assert draft.confidence_head == confidence
    assert bundle.target.tap_layers == (0, 1)
    assert bundle.limits.max_verify_tokens == BLOCK + 1
    hidden = next(o for o in bundle.graph("target").outputs if o.name == "hidden")
    assert hidden.shape == ("batch", "new_tokens", 2 * 64)
    # the drafter's embedding and LM head are the target's: stored once, in the target's data file (a reduced
    # vocabulary's head is a subset of the target's rows: stored with the drafter)
    shared = 1 if variant == "reduced" else 2
    assert bundle.manifest["models"]["draft"]["shared_tensors"]["draft_propose.onnx"] == shared * VOCAB * 64 * 4
    assert draft.raw_config.get("draft_vocab_size", 0) == (VOCAB // 2 if variant == "reduced" else 0)
    # a reduced drafter's law is over its subset (no full-vocabulary law in a greedy round), whose ids are listed
    law = next(o for o in bundle.graph("draft_propose").outputs if o.name == "draft_probs")
    assert law.shape[-1] == (VOCAB // 2 if variant == "reduced" else VOCAB)
    assert list(draft.draft_vocab) == (reduced_vocab(VOCAB) if variant == "reduced" else [])
    graph = bundle.file("draft_propose.onnx").read_bytes()
    assert b"target.onnx.data" in graph


def test_greedy_equals_plain(block_bundle, backend):
    _, path = block_bundle
    spec, plain = Generator(path, backend=backend), Generator(path, use_draft=False, backend=backend)
    for prompt in PROMPTS:
        req = Request(prompt, max_new_tokens=40, ignore_eos=True)
        assert spec.generate([req])[0].generated == plain.generate([req])[0].generated
    # a verify prefix shorter than the block (the drafter still drafts its full block)
    short = Generator(path, num_draft_tokens=2, backend=backend)
    req = Request(PROMPTS[0], max_new_tokens=30, ignore_eos=True)
    assert short.generate([req])[0].generated == plain.generate([req])[0].generated


def test_reduced_vocabulary_drafts_only_inside_it(qwen3_pair, tmp_path):
    target, target_dir, _ = qwen3_pair
    draft_dir = make_drafter(target, target_dir, tmp_path / "draft", "reduced")
    path = tmp_path / "bundle"
    export_bundle(target_dir, path, draft_dir, ExportOptions(max_batch=1, max_context=128, prefill_chunk=32),
                  progress=False)
    allowed = set(reduced_vocab(VOCAB))
    for params in (SamplingParams(), SamplingParams(1.0)):
        seq = Generator(path).generate([Request(PROMPTS[1], max_new_tokens=30, sampling=params, ignore_eos=True)],
                                       trace=True)[0]
        drafted = [t for r in seq.trace for t in r["draft_tokens"]]
        assert drafted and set(drafted) <= allowed
        assert any(t not in allowed for t in seq.generated) or params.greedy  # the target still writes any token


def test_ragged_batch_equals_each_alone(block_bundle, backend):
    _, path = block_bundle
    spec = Generator(path, backend=backend)
    requests = [Request(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, (9, 31, 22))]
    together = spec.generate(requests)
    for req, seq in zip(requests, together):
        assert seq.generated == spec.generate([req])[0].generated


def test_trace_records_block_and_confidence(block_bundle, backend):
    variant, path = block_bundle
    spec = Generator(path, backend=backend)
    req = Request(PROMPTS[1], max_new_tokens=30, ignore_eos=True)
    first, second = (spec.generate([req], trace=True)[0] for _ in range(2))
    assert first.trace == second.trace
    for row in first.trace:
        assert len(row["draft_tokens"]) == row["verify_length"]
        if variant == "dflash":
            assert row["confidence"] is None
        else:
            assert len(row["confidence"]) == row["verify_length"]
            assert all(0 < c < 1 for c in row["confidence"])
    assert first.trace[0]["verify_length"] == BLOCK


def test_sampled_run_is_reproducible(block_bundle, backend):
    from dspark.runtime.sampling import SamplingParams

    _, path = block_bundle
    spec = Generator(path, backend=backend)
    req = Request(PROMPTS[0], max_new_tokens=25, sampling=SamplingParams(1.0), seed=4, ignore_eos=True)
    a, b = spec.generate([req])[0], spec.generate([req])[0]
    assert a.generated == b.generated
    assert np.isfinite(a.stats()["mean_accepted_length"])


def test_drafter_for_another_target_is_refused(qwen3_pair, tmp_path):
    target, target_dir, _ = qwen3_pair
    draft_dir = make_drafter(target, target_dir, tmp_path / "draft", "vanilla")
    cfg = json.loads((draft_dir / "config.json").read_text())
    cfg["mask_token_id"] = VOCAB + 5
    (draft_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DsparkError, match="mask_token_id"):
        export_bundle(target_dir, tmp_path / "b", draft_dir, progress=False)
    cfg["mask_token_id"], cfg["target_layer_ids"] = VOCAB - 1, [0, 2]
    (draft_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DsparkError, match="target_layer_ids"):
        export_bundle(target_dir, tmp_path / "b", draft_dir, progress=False)
    assert not (tmp_path / "b").exists()


def test_drafter_without_frozen_copies_loads_beside_its_target(qwen3_pair, tmp_path):
    import torch

    from dspark.graphs.decoder import DecoderConfig
    from dspark.graphs.drafter import Drafter, save_deepspec

    target, target_dir, _ = qwen3_pair
    full_dir = make_drafter(target, target_dir, tmp_path / "full", "gated")
    target_config = DecoderConfig.from_hf(json.loads((target_dir / "config.json").read_text()))
    full = Drafter.from_pretrained(full_dir, target_config)
    slim_dir = save_deepspec(tmp_path / "slim", json.loads((full_dir / "config.json").read_text()), full,
                             frozen_copies=False)
    assert (slim_dir / "model.safetensors").stat().st_size < (full_dir / "model.safetensors").stat().st_size
    with pytest.raises(DsparkError, match="embed_tokens.weight"):
        Drafter.from_pretrained(slim_dir, target_config)
    slim = Drafter.from_pretrained(slim_dir, target_config, target_dir=target_dir)
    for (name, a), (_, b) in zip(full.state_dict().items(), slim.state_dict().items()):
        assert torch.equal(a, b), name
    # the torch backend and `dspark check` rebuild it from a bundle's manifest, beside the target recorded there
    from dspark.runtime.torch_runner import load_module

    export_bundle(target_dir, tmp_path / "bundle", slim_dir, ExportOptions(max_context=128, prefill_chunk=32),
                  progress=False)
    rebuilt = load_module(Bundle.open(tmp_path / "bundle"), "draft")
    for (name, a), (_, b) in zip(full.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), name


def test_quantized_drafter_is_still_lossless(qwen3_pair, tmp_path):
    """--draft-quantize on a DSpark drafter: its products become MatMulNBits, the output stays the target's."""
    import onnx

    target, target_dir, _ = qwen3_pair
    draft_dir = make_drafter(target, target_dir, tmp_path / "draft", "reduced")
    path = tmp_path / "bundle"
    export_bundle(target_dir, path, draft_dir, ExportOptions(max_batch=2, max_context=128, prefill_chunk=32,
                                                            draft_quantize="int4"), progress=False)
    for graph in ("draft_propose.onnx", "draft_context.onnx"):
        ops = [n.op_type for n in onnx.load(path / graph, load_external_data=False).graph.node]
        assert "MatMulNBits" in ops, graph
    spec, plain = Generator(path), Generator(path, use_draft=False)
    for prompt in PROMPTS:
        req = Request(prompt, max_new_tokens=30, ignore_eos=True)
        got = spec.generate([req])[0]
        assert got.generated == plain.generate([req])[0].generated and got.accepted
