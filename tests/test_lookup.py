"""Prompt lookup: a row whose last tokens occurred before drafts what followed them, alone or in front of a draft
LM or a DSpark drafter, and greedy output stays plain decoding's (the sampling law: test_sampling.py)."""

from __future__ import annotations

import json

import pytest

from conftest import assert_speculative_equals_plain
from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.export.bundle import ExportOptions, export_bundle
from dspark.runtime.generate import Generator, Request
from dspark.runtime.proposers import LookupProposer

# repetitive prompts find matches at once; the others only once the output repeats
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [3] * 40, [11, 12], list(range(1, 70)) + list(range(1, 20))]


def test_lookup_takes_the_longest_then_most_recent_match(qwen3_bundle):
    lookup = LookupProposer(Bundle.open(qwen3_bundle), None, draft_length=3, min_match=2, max_match=4)
    assert lookup.lookup([1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 3) == [4, 7, 1]  # [1, 2]: the most recent occurrence
    assert lookup.lookup([5, 1, 2, 3, 8, 6, 1, 2, 4, 9, 1, 2, 3], 3) == [8, 6, 1]  # longest first: [1, 2, 3]
    assert lookup.lookup([1, 2, 3, 4], 3) == []  # nothing repeats
    assert lookup.lookup([7, 7, 7], 3) == [7]  # the match may end where the suffix starts
    assert lookup.lookup([4, 5, 4, 5, 4, 5], 2) == [4, 5]


@pytest.mark.parametrize("draft", ["none", "draft-lm", "dspark"])
def test_greedy_with_lookup_equals_plain(qwen3_bundle, dspark_bundle, draft, backend):
    bundle = dspark_bundle if draft == "dspark" else qwen3_bundle
    spec = Generator(bundle, backend=backend, lookup=2, use_draft=draft != "none")
    plain = Generator(bundle, backend=backend, use_draft=False)
    assert_speculative_equals_plain(spec, plain, PROMPTS, 30)
    seqs = spec.generate([Request(p, max_new_tokens=30, ignore_eos=True) for p in PROMPTS], trace=True)
    looked = []
    for seq in seqs:
        tokens = seq.request.prompt_ids + seq.generated
        for r in seq.trace:
            found = spec.proposer.lookup(tokens[: r["position"] + 1], spec.draft_length)
            if found:  # a row with a match drafts it (cut to the room left)
                assert r["draft_tokens"] == found[: len(r["draft_tokens"])]
                looked.append(r)
    assert looked and any(r["accepted"] for r in looked)


def test_lookup_without_a_draft_needs_a_verify_window(qwen3_pair, tmp_path):
    _, target_dir, _ = qwen3_pair
    options = dict(max_batch=2, max_context=128, prefill_chunk=16)
    export_bundle(target_dir, tmp_path / "plain", None, ExportOptions(**options), progress=False)
    with pytest.raises(DsparkError, match="--num-draft-tokens"):
        Generator(tmp_path / "plain", lookup=2)
    export_bundle(target_dir, tmp_path / "k4", None, ExportOptions(**options, num_draft_tokens=4), progress=False)
    manifest = json.loads((tmp_path / "k4" / "manifest.json").read_text())
    assert manifest["limits"]["max_verify_tokens"] == 5
    gen = Generator(tmp_path / "k4", lookup=1)
    assert gen.draft_length == 4
    assert_speculative_equals_plain(gen, Generator(tmp_path / "k4", use_draft=False), PROMPTS, 20)
