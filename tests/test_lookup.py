"""Prompt lookup: a row whose last tokens occurred before drafts what followed them, alone or in front of a draft
LM or a DSpark drafter, and greedy output stays plain decoding's (the sampling law: test_sampling.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import assert_speculative_equals_plain
from dspark.bundle import Bundle
from dspark.cli import main
from dspark.errors import DsparkError
from dspark.export.bundle import ExportOptions, export_bundle
from dspark.runtime.generate import Generator, Request
from dspark.runtime.proposers import LookupProposer
from dspark.runtime.store import STORE_FILE, TokenStore

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


def test_store_continues_by_majority_longest_match_first():
    tokens = np.array([1, 2, 3, 9, 9, 1, 2, 3, 9, 8, 1, 2, 3, 9, 9, 5, 2, 3, 7, 4, 6], dtype=np.int64)
    store = TokenStore(tokens, 2, 4)
    assert store.continuation([0, 1, 2, 3], 2) == [9, 9]  # [1, 2, 3] three times: 9 then 9 (twice) over 8 (once)
    assert store.continuation([5, 2, 3], 3) == [7, 4, 6]  # the longest suffix wins: [5, 2, 3] once, before [2, 3]
    assert store.continuation([6, 6], 3) == []  # not in the store
    assert store.continuation([4, 6], 3) == []  # at the end: nothing follows
    assert store.continuation([7, 4], 5) == [6]  # cut where the store ends


def test_lookup_store_drafts_when_own_tokens_do_not_match(qwen3_bundle, tmp_path):
    """A store of the target's own answers drafts them back; output stays plain decoding's; a bad source is refused
    with the fix and the bundle is left as it was."""
    bundle = tmp_path / "bundle"
    shutil.copytree(qwen3_bundle, bundle)
    prompts = [[11, 12], list(range(1, 30)), [40, 41, 42, 43]]
    plain = Generator(bundle, use_draft=False)
    answers = [s.generated for s in plain.generate([Request(p, max_new_tokens=24, ignore_eos=True) for p in prompts])]
    np.save(tmp_path / "ids.npy", np.concatenate([np.array(p + a) for p, a in zip(prompts, answers)]))
    manifest = (bundle / "manifest.json").read_text()
    vocab = Bundle.open(bundle).target.config.vocab_size
    np.save(tmp_path / "bad.npy", np.array([1, vocab]))
    for bad, problem in ((tmp_path / "bad.npy", "must lie in"), (tmp_path / "none", "no token file")):
        result = CliRunner().invoke(main, ["lookup-data", str(bundle), str(bad)])
        assert result.exit_code == 2 and problem in result.output, result.output
    assert (bundle / "manifest.json").read_text() == manifest and not (bundle / STORE_FILE).exists()
    result = CliRunner().invoke(main, ["lookup-data", str(bundle), str(tmp_path / "ids.npy")])
    assert result.exit_code == 0, result.output
    gen = Generator(bundle, use_draft=False, lookup=2)
    assert gen.proposer.store is not None
    seqs = gen.generate([Request(p, max_new_tokens=24, ignore_eos=True) for p in prompts], trace=True)
    assert [s.generated for s in seqs] == answers
    from_store = []
    for seq in seqs:
        tokens = seq.request.prompt_ids + seq.generated
        for r in seq.trace:
            history = tokens[: r["position"] + 1]
            if r["draft_tokens"] and not gen.proposer.lookup(history, gen.draft_length):
                assert r["draft_tokens"] == gen.proposer.store.continuation(history, len(r["draft_tokens"]))
                from_store.append(r)
    assert from_store and sum(r["accepted"] for r in from_store) >= len(from_store)  # mostly its own answers back
    assert gen.proposer.trials[gen.proposer.STORE, 0] > 0
    # another Generator of the bundle reads the same index instead of building its own
    assert Generator(bundle, use_draft=False, lookup=2).proposer.store is gen.proposer.store
    # with the bundle's draft, rows without a match of their own get the draft's drafts, not the store's
    spec = Generator(bundle, lookup=2)
    assert spec.proposer.store is None and spec.proposer.inner is not None
    seqs = spec.generate([Request(p, max_new_tokens=24, ignore_eos=True) for p in prompts], trace=True)
    assert [s.generated for s in seqs] == answers
    assert not spec.proposer.trials[spec.proposer.STORE].any()
