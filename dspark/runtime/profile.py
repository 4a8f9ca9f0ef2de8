"""``dspark profile``: how many target verify steps per second this machine runs, by rows and new tokens, and what
a draft round of the bundle's drafter costs by rows.

The table feeds the ``sps`` scheduler. Method: for each row count on the bundle's ladder in turn, warm up every
width, then time repeated verify calls on a cache filled to ``context`` entries, round-robin over the widths so
drift hits every width alike (sps weighs widths against each other at one row count), and keep the median. Then,
with a drafter, the median of repeated draft rounds at every row count on the ladder (rows anchored after
``context`` tokens of the built-in code prompts), and what each token of a backlog the drafter reads first adds to
a round there. Stored in the bundle as ``profiles/<backend>-<device>.json``.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
from tqdm import tqdm

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.prompts import builtin_prompts
from dspark.runtime.decoder import decoder_cache, run_decoder
from dspark.runtime.backends import make_runner
from dspark.runtime.schedulers import device_name, profile_key


# tokens a row's drafter reads first in the rounds that time reading (its cost per token: the timed round with them
# less the round without, over them)
BACKLOG = 32


def ladder(limit: int) -> list[int]:
    values, v = [], 1
    while v < limit:
        values.append(v)
        v *= 2
    return values + [limit]


def profile_bundle(bundle_dir, backend: str = "ort", threads: int = 0, context: int = 256, repeats: int = 20,
                   warmup: int = 3, progress: bool = True, device: str = "cpu") -> dict:
    if repeats < 1 or warmup < 0 or context < 0:
        raise DsparkError(f"need --repeats >= 1, --warmup >= 0 and --context >= 0 (got {repeats}, {warmup}, "
                          f"{context})")
    bundle = Bundle.open(bundle_dir)
    runner = make_runner(bundle, "target", backend, threads, device)
    limits = bundle.limits
    rows = ladder(limits.max_batch)
    widths = list(range(1, limits.max_verify_tokens + 1))
    context = min(context, limits.max_context - widths[-1])
    caches = {}
    for r in rows:
        cache = decoder_cache(bundle.target.config, r, bundle, device=runner.cache_device)
        cache.reserve(context + widths[-1])
        cache.lens[:] = context
        caches[r] = cache
    pairs = [(r, w) for r in rows for w in widths]
    vocab = bundle.target.config.vocab_size
    rng = np.random.default_rng(0)
    calls = {p: (lambda r=p[0], w=p[1]: run_decoder(runner, caches[r], [list(rng.integers(0, vocab, w)) for _ in range(r)]))
             for p in pairs}
    times = {p: [] for p in pairs}
    bar = tqdm(total=len(rows) * repeats, desc="profile", disable=not progress, unit="pass")
    for r in rows:
        # one row count at a time, as a run changes its rows slowly and its widths every round: round-robin over all
        # pairs put a 16-row call before a 1-row one, which then cost 4.9 ms instead of 3.6 (SmolLM2 int4, one row)
        # and made a 2-token verify look as cheap as a 1-token step
        row_pairs = [(r, w) for w in widths]
        for p in row_pairs:
            for _ in range(warmup):
                calls[p]()
        for _ in range(repeats):
            for p in row_pairs:
                start = time.perf_counter()
                calls[p]()
                times[p].append(time.perf_counter() - start)
            bar.update()
    bar.close()
    table = {
        "backend": backend,
        "device": device_name(device),
        "threads": threads,
        "context": context,
        "repeats": repeats,
        "method": "median seconds per verify call, round-robin over widths after warm-up, one row count at a time",
        "rows": rows,
        "widths": widths,
        "steps_per_second": [[1 / statistics.median(times[(r, w)]) for w in widths] for r in rows],
        "measured_unix": int(time.time()),
    }
    drafts = draft_seconds(bundle, backend, threads, device, rows, context, repeats, warmup, progress)
    if drafts:
        table["draft_length"], table["draft_seconds"], table["draft_read_seconds"] = drafts
        # a draft LM's round is a call per position, and in a run it stops early (StepsPerSecond's field)
        table["draft_cost_per_position"] = bundle.draft.method == "draft-lm"
    bundle.add_file(profile_key(backend, device), json.dumps(table, indent=2) + "\n")
    return table


def draft_seconds(bundle: Bundle, backend: str, threads: int, device: str, rows: list[int], context: int, repeats: int,
                  warmup: int, progress: bool) -> tuple[int, list[float], list[float]] | None:
    """The bundle's draft length, the median seconds of one draft round at each of ``rows``, and the seconds each
    token of a backlog adds to it there (None without a drafter the host loop calls): what a round pays before its
    verify call, which ``sps`` weighs against what the drafts are expected to gain before it lets a round draft. The
    rows are timed one count after another (each count's rows are set up apart), not round-robin as the verify table
    is, and every timed round follows a target verify call, as in a run: the target's weights pass through the
    caches between two draft rounds (SmolLM2's int4 DSpark drafter, one row: 1.4 ms a round back to back, 1.9 ms
    after a verify call, 1.55 ms measured in a run). Rounds with a ``BACKLOG`` to read alternate with plain ones."""
    from dspark.runtime.generate import Generator
    from dspark.runtime.proposers import DraftLMProposer

    if bundle.draft is None:
        return None
    gen = Generator(bundle, backend=backend, threads=threads, device=device, scheduler="fixed")
    if gen.device_step is not None or gen.proposer is None:
        return None
    # a draft LM stops drafting rows it is unsure of, and on the built-in prompts it would stop early: time the
    # whole draft length, what a round costs where the drafts are worth most (SmolLM2's draft LM at 16 rows: 10.9
    # ms; 1.2 ms with the stop; 5.6-7.0 ms measured in a run)
    if isinstance(gen.proposer, DraftLMProposer):
        gen.proposer.STOP_SURVIVAL = 0.0
    tokens = [t for p in builtin_prompts("code") for t in gen.tokenizer.encode(p.text)]
    text = (tokens * (context // len(tokens) + 1))[: max(context, BACKLOG + 2)]
    seconds, reads = [], []
    for r in tqdm(rows, desc="profile drafts", disable=not progress, unit="rows"):
        _, calls, clean_up = cost_probe(gen, r, text, BACKLOG)
        try:
            for _ in range(warmup):
                calls["t_draft_ms"]()
                calls["t_draft_backlog_ms"]()
            times = {"t_draft_ms": [], "t_draft_backlog_ms": []}
            for _ in range(repeats):
                for name, timed in times.items():
                    calls["t_verify_ms"]()
                    start = time.perf_counter()
                    calls[name]()
                    timed.append(time.perf_counter() - start)
        finally:
            clean_up()
        seconds.append(statistics.median(times["t_draft_ms"]))
        reads.append(max(0.0, statistics.median(times["t_draft_backlog_ms"]) - seconds[-1]) / BACKLOG)
    return gen.draft_length, seconds, reads


def cost_probe(gen, rows: int, text: list[int], backlog: int = 0):
    """The calls a round of ``gen`` is made of, each a closure over ``rows`` rows with a cache filled to ``len(text)``:
    ``t1_ms`` (a target call of 1 token a row) and, with a proposer, ``t_verify_ms`` (draft_length + 1 tokens a
    row) and ``t_draft_ms`` (one draft round, reading the proposer's ``ROUND_READS`` first; a lookup draft runs no
    graph, so a round costs what the draft it wraps costs on rows without a match, and it drafts after ``text``: a
    draft LM that stops early where it is unsure drafts what it would on real text), and with ``backlog``
    ``t_draft_backlog_ms`` (the round reading that many tokens a row more first); returned with the context used (at
    most the bundle's limit allows) and the clean-up that drops the rows it set up. None for the device step, whose
    round is one captured call that cannot be timed apart."""
    from dspark.runtime.decoder import decoder_cache, run_decoder
    from dspark.runtime.generate import Request

    if gen.device_step is not None:
        return None
    bundle, draft_length = gen.bundle, gen.draft_length
    text = text[: bundle.limits.max_context - draft_length - 2] or [1]
    context = len(text)
    cache = decoder_cache(bundle.target.config, rows, bundle, device=gen.target.cache_device)
    cache.reserve(context + draft_length + 1)
    cache.lens[:] = context
    calls = {"t1_ms": lambda: run_decoder(gen.target, cache, [[1]] * rows)}
    proposer = getattr(gen.proposer, "inner", gen.proposer)
    if not gen.proposer:
        return context, calls, lambda: None
    calls["t_verify_ms"] = lambda: run_decoder(gen.target, cache, [[1] * (draft_length + 1)] * rows)
    if proposer is None:
        return context, calls, lambda: None
    # one draft round for ``rows`` rows anchored at ``context``, the proposer cut back to read again what it reads
    gen.max_batch = rows
    seqs = [gen.submit(Request(list(text), max_new_tokens=draft_length + 2, ignore_eos=True)) for _ in range(rows)]
    gen.admit()
    anchors = [len(s.tokens) - 1 for s in seqs]
    proposer.propose(seqs, [draft_length] * rows)  # a draft LM reads the context here, once

    def draft_round(reads: int):
        reads = min(reads, *anchors)
        if getattr(proposer, "reads_features", False):
            # a block drafter's round first turns the target features of what the last round accepted into context
            # (its draft_context call), then drafts (SmolLM2's int4 DSpark drafter, one row: 0.95 ms a round without
            # that call, 1.55 ms measured in a run)
            starts = [a - reads for a in anchors]
            fed = {"hidden": np.zeros((rows, reads, proposer.feature_width), dtype=proposer.cache.k.dtype)}

            def run():
                proposer.rewind(starts)
                proposer.commit(starts, None, None, [reads - 1] * rows, fed)
                proposer.propose(seqs, [draft_length] * rows)
        else:
            starts = [a + 1 - reads for a in anchors]  # a draft LM reads from its cache's end to the anchor

            def run():
                proposer.rewind(starts)
                proposer.propose(seqs, [draft_length] * rows)
        return run

    def clean_up():
        for s in seqs:
            gen.cancel(s)
        gen.step()  # drops the cancelled rows from the target and draft caches

    calls["t_draft_ms"] = draft_round(proposer.ROUND_READS)
    if backlog:
        calls["t_draft_backlog_ms"] = draft_round(proposer.ROUND_READS + backlog)
    return context, calls, clean_up
