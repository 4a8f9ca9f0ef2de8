"""Greedy speculative decoding is token-identical to plain greedy decoding and to transformers' generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import VOCAB, assert_speculative_equals_plain, reduced_vocab
from dspark.runtime.generate import Generator, Request
from dspark.runtime.sampling import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], [3] * 40, [11, 12], list(range(1, 70))]


@pytest.fixture(scope="module")
def spec(qwen3_bundle, backend):
    return Generator(qwen3_bundle, backend=backend)


@pytest.fixture(scope="module")
def plain(qwen3_bundle, backend):
    return Generator(qwen3_bundle, use_draft=False, backend=backend)


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        # eos_token_id=None: no early stop and no EOS suppression, like ignore_eos
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_equals_plain_and_transformers(spec, plain, qwen3_pair, k, backend):
    target = qwen3_pair[0]
    spec = Generator(spec.bundle, num_draft_tokens=k, backend=backend)
    outputs = assert_speculative_equals_plain(spec, plain, PROMPTS, 40)
    for prompt, output in zip(PROMPTS, outputs):
        assert output == hf_greedy(target, prompt, 40)


def test_standard_flavour_greedy_equals_plain(qwen3_trt_bundle, plain, backend):
    """The TensorRT flavour (K/V returned, committed by copy) decodes the same tokens through the same loop."""
    assert_speculative_equals_plain(Generator(qwen3_trt_bundle, backend=backend), plain, PROMPTS, 40)


def test_reduced_vocabulary_draft_lm_is_lossless(reduced_lm_bundle, plain, qwen3_pair, backend):
    """A draft LM over half the vocabulary drafts only inside it, in target ids, and changes no output token."""
    from dspark.bundle import Bundle

    bundle = Bundle.open(reduced_lm_bundle)
    assert list(bundle.draft.draft_vocab) == reduced_vocab(VOCAB) and bundle.draft.config.vocab_size == VOCAB // 2 + 1
    spec = Generator(reduced_lm_bundle, backend=backend)
    outputs = assert_speculative_equals_plain(spec, plain, PROMPTS, 40)
    assert outputs[0] == hf_greedy(qwen3_pair[0], PROMPTS[0], 40)
    allowed = set(reduced_vocab(VOCAB))
    for params in (SamplingParams(), SamplingParams(1.0)):
        seq = spec.generate([Request(PROMPTS[1], max_new_tokens=30, sampling=params, ignore_eos=True)], trace=True)[0]
        drafted = [t for r in seq.trace for t in r["draft_tokens"]]
        assert drafted and set(drafted) <= allowed
        assert sum(r["accepted"] for r in seq.trace)  # drafts mapped back to target ids are accepted


def test_rows_without_draft_work_beside_others(qwen3_bundle, plain, backend):
    """Requests admitted together where some have no room to draft (one token to go) decode as plain does: a draft
    row with nothing cached and nothing to feed rides along in the draft call (it used to fail as seqlens -1)."""
    spec = Generator(qwen3_bundle, backend=backend)
    requests = [Request([5, 6, 7], max_new_tokens=1, ignore_eos=True), Request([8, 9, 10, 11], max_new_tokens=20, ignore_eos=True),
                Request([3] * 9, max_new_tokens=2, ignore_eos=True)]
    got, want = spec.generate(requests), plain.generate(requests)
    assert [s.generated for s in got] == [s.generated for s in want]
    assert [len(s.generated) for s in got] == [1, 20, 2]


def test_full_acceptance_rounds_happen(spec):
    seq = spec.generate([Request(PROMPTS[0], max_new_tokens=60, ignore_eos=True)], trace=True)[0]
    assert any(r["accepted"] == r["verify_length"] for r in seq.trace)
    assert any(r["accepted"] < r["verify_length"] for r in seq.trace)


def test_ragged_batch_equals_each_alone(spec):
    requests = [Request(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, (7, 30, 19, 25))]
    together = spec.generate(requests)
    for req, seq in zip(requests, together):
        assert seq.generated == spec.generate([req])[0].generated
        assert len(seq.generated) == req.max_new_tokens


def test_trace_is_exact_and_deterministic(spec):
    req = Request(PROMPTS[1], max_new_tokens=33, ignore_eos=True)
    first = spec.generate([req], trace=True)[0]
    second = spec.generate([req], trace=True)[0]
    assert first.trace == second.trace
    position = len(req.prompt_ids)
    emitted = [first.generated[0]]  # the first token comes from prefill, before any round
    for n, row in enumerate(first.trace, start=1):
        assert row["round"] == n
        assert row["position"] == position
        # a draft LM's confidence in each draft: the probability its law gives its likeliest token there
        assert len(row["confidence"]) == len(row["draft_tokens"]) == row["verify_length"]
        assert all(0 < c <= 1 for c in row["confidence"])
        accepted = row["draft_tokens"][: row["accepted"]]
        assert row["emitted"][: len(accepted)] == accepted
        emitted += row["emitted"]
        position += len(row["emitted"])
    assert emitted == first.generated


def test_stops_on_eos_inside_accepted_drafts(spec, plain):
    free = plain.generate([Request(PROMPTS[0], max_new_tokens=40, ignore_eos=True)])[0].generated
    stop_token = free[17]
    for gen in (spec, plain):
        gen.eos_ids = {stop_token}
    try:
        got = spec.generate([Request(PROMPTS[0], max_new_tokens=40)])[0]
        want = plain.generate([Request(PROMPTS[0], max_new_tokens=40)])[0]
    finally:
        spec.eos_ids = plain.eos_ids = set(spec.bundle.tokenizer.eos_token_ids)
    cut = free.index(stop_token) + 1
    assert got.generated == want.generated == free[:cut]
    assert got.finish_reason == "stop"


def test_stop_string_cuts_text(spec):
    free = spec.generate([Request(PROMPTS[2], max_new_tokens=30, ignore_eos=True)])[0]
    words = free.text.split()
    stop = " ".join(words[10:12])
    seq = spec.generate([Request(PROMPTS[2], max_new_tokens=30, ignore_eos=True, stop=(stop,))])[0]
    assert seq.finish_reason == "stop"
    assert seq.text == free.text[: free.text.index(stop)]


def test_sampling_is_reproducible_from_seed(spec):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20)
    a = spec.generate([Request(PROMPTS[0], 30, params, seed=5, ignore_eos=True)])[0].generated
    b = spec.generate([Request(PROMPTS[0], 30, params, seed=5, ignore_eos=True)])[0].generated
    c = spec.generate([Request(PROMPTS[0], 30, params, seed=6, ignore_eos=True)])[0].generated
    assert a == b and a != c


def test_stats_fields(spec):
    seq = spec.generate([Request(PROMPTS[0], max_new_tokens=25, ignore_eos=True)])[0]
    stats = seq.stats()
    assert stats["generated_tokens"] == 25
    assert stats["rounds"] == len(seq.accepted)
    assert stats["mean_accepted_length"] == pytest.approx((sum(seq.accepted) + len(seq.accepted)) / len(seq.accepted))
    assert len(stats["acceptance_by_position"]) == 6
    assert stats["tokens_per_second"] > 0 and stats["time_to_first_token_ms"] > 0


def test_fp16_bundle_decodes_losslessly(qwen3_pair, qwen3_bundle, tmp_path, backend):
    from dspark.export.bundle import ExportOptions, export_bundle

    _, target_dir, draft_dir = qwen3_pair
    export_bundle(target_dir, tmp_path / "fp16", draft_dir, ExportOptions(max_context=128, dtype="fp16"), progress=False)
    req = Request(PROMPTS[0], max_new_tokens=24, ignore_eos=True)
    spec16 = Generator(tmp_path / "fp16", backend=backend).generate([req])[0]
    assert spec16.generated == Generator(tmp_path / "fp16", use_draft=False, backend=backend).generate([req])[0].generated
    fp32 = Generator(qwen3_bundle, use_draft=False, backend=backend).generate([req])[0].generated
    # fp16 rounding may flip a near-tie late in the run; the start must agree
    assert spec16.generated[:8] == fp32[:8]


def test_draft_lm_stops_drafting_when_unsure(qwen3_bundle, plain, monkeypatch, backend):
    """A row stops drafting once the product of the draft LM's confidences falls below STOP_SURVIVAL: with a bar
    set high, rounds draft fewer tokens than the cap, and the output is still plain decoding's."""
    from dspark.runtime.proposers import DraftLMProposer

    monkeypatch.setattr(DraftLMProposer, "STOP_SURVIVAL", 0.999)
    spec = Generator(qwen3_bundle, backend=backend)
    assert_speculative_equals_plain(spec, plain, PROMPTS, 40)
    drafted = [r for s in spec.generate([Request(p, max_new_tokens=40, ignore_eos=True) for p in PROMPTS], trace=True)
               for r in s.trace]
    assert any(0 < len(r["draft_tokens"]) < spec.draft_length for r in drafted)
    for r in drafted:  # each draft but the last had a survival product of at least the bar
        assert np.prod(r["confidence"][:-1]) >= 0.999
