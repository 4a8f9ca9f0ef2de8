"""The speculative loop: propose -> verify -> accept -> commit, over rows with independent lengths.

Invariants, per row: ``tokens`` is prompt + committed output; the target cache holds every token but the last
(the anchor), which the next verify call re-reads as its first row; a proposer's cache may lag and catches
up from ``tokens`` when it next runs. Plain decoding is the same loop with no draft tokens, so speculative and
plain runs share every line that decides what is emitted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.runtime.kv import KVCache
from dspark.runtime.runners import GraphRunner, make_runner
from dspark.runtime.sampling import SamplingParams, accept, probabilities, sample
from dspark.runtime.tokenizer import TextStream, Tokenizer, check_prompt


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Sequence:
    """A request's state while it runs, and its result when it is done."""

    request: Request
    rng: np.random.Generator
    tokens: list[int]
    stream: TextStream | None = None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    proposed: list[int] = field(default_factory=list)  # draft tokens verified, per round
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted, per round
    trace: list[dict] = field(default_factory=list)
    started: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def stats(self) -> dict:
        rounds = len(self.accepted)
        longest = max(self.proposed, default=0)
        by_position = []
        for k in range(longest):
            verified = sum(1 for p in self.proposed if p > k)
            survived = sum(1 for a in self.accepted if a > k)
            by_position.append(survived / verified if verified else None)
        elapsed = (self.finished_at or time.perf_counter()) - self.started
        return {
            "rounds": rounds,
            "generated_tokens": len(self.generated),
            "mean_accepted_length": (sum(self.accepted) + rounds) / rounds if rounds else None,
            "acceptance_by_position": by_position,
            "draft_tokens_proposed": sum(self.proposed),
            "draft_tokens_accepted": sum(self.accepted),
            "tokens_per_second": len(self.generated) / elapsed if elapsed > 0 else None,
            "time_to_first_token_ms": 1000 * (self.first_token_at - self.started) if self.first_token_at else None,
            "elapsed_s": elapsed,
        }


def feed(runner: GraphRunner, cache: KVCache, pieces: list[list[int]], chunk: int, features=None) -> list:
    """Run ``pieces[r]`` through a decoder graph in chunks, committing all of it; return each row's last logits.

    Rows with nothing to feed ride along on one dummy token that is never committed (their result is None).
    With a ``features`` list, each row's tapped target features are appended to ``features[r]``.
    """
    rows = len(pieces)
    last = [None] * rows
    offset = 0
    while offset == 0 or any(len(p) > offset for p in pieces):
        parts = [p[offset : offset + chunk] for p in pieces]
        out = run_decoder(runner, cache, parts)
        cache.append(out["new_k"], out["new_v"], [len(p) for p in parts])
        for r, part in enumerate(parts):
            if part:
                last[r] = out["logits"][r, len(part) - 1].copy()
                if features is not None:
                    features[r].append(out["hidden"][r, : len(part)].copy())
        offset += chunk
    return last


def run_decoder(runner: GraphRunner, cache: KVCache, parts: list[list[int]]) -> dict[str, np.ndarray]:
    """One decoder-graph call on ragged rows (right-padded); nothing is committed."""
    width = max(1, max(len(p) for p in parts))
    ids = np.zeros((len(parts), width), dtype=np.int64)
    for r, part in enumerate(parts):
        ids[r, : len(part)] = part
    positions = cache.lens[:, None] + np.arange(width, dtype=np.int64)[None, :]
    return runner.run(
        {"input_ids": ids, "position_ids": positions, "cache_lens": cache.lens.copy(), "past_k": cache.k, "past_v": cache.v}
    )


def decoder_cache(config: dict, rows: int, bundle: Bundle) -> KVCache:
    dtype = np.float16 if bundle.manifest["dtype"] == "fp16" else np.float32
    return KVCache(
        config["num_layers"], rows, config["num_kv_heads"], config["head_dim"], dtype, bundle.limits["max_context"]
    )


@dataclass
class Proposal:
    tokens: list[int]
    probs: np.ndarray | None  # [len(tokens), V] distribution each token was drawn from (None when greedy)
    confidence: list[float] | None = None


class DraftLMProposer:
    """A small LM with the target's tokenizer, drafting K tokens one step at a time."""

    def __init__(self, bundle: Bundle, runner: GraphRunner, num_draft_tokens: int):
        self.bundle = bundle
        self.runner = runner
        self.k = num_draft_tokens
        self.config = bundle.draft["config"]
        self.cache: KVCache | None = None

    def start(self, rows: int) -> None:
        self.cache = decoder_cache(self.config, rows, self.bundle)

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[Proposal]:
        cache, chunk = self.cache, self.bundle.limits["prefill_chunk"]
        proposals = [Proposal([], [] if not s.request.sampling.greedy else None) for s in seqs]
        if not any(lengths):
            return proposals
        # first step: catch up on every committed token the draft has not read (the anchor, maybe one more)
        pending = [s.tokens[cache.lens[r] :] if lengths[r] else [] for r, s in enumerate(seqs)]
        logits = feed(self.runner, cache, pending, chunk)
        for step in range(max(lengths, default=0)):
            for r, s in enumerate(seqs):
                if step < lengths[r]:
                    self._draw(s, proposals[r], logits[r])
            if step + 1 == max(lengths):
                break
            parts = [[proposals[r].tokens[-1]] if step + 1 < lengths[r] else [] for r in range(len(seqs))]
            out = run_decoder(self.runner, cache, parts)
            cache.append(out["new_k"], out["new_v"], [len(p) for p in parts])
            logits = list(out["logits"][:, 0])
        for p in proposals:
            p.probs = np.stack(p.probs) if p.probs else None
        return proposals

    @staticmethod
    def _draw(seq: Sequence, proposal: Proposal, logits: np.ndarray) -> None:
        params = seq.request.sampling
        if params.greedy:
            proposal.tokens.append(int(logits.argmax()))
            return
        q = probabilities(logits, params)
        proposal.tokens.append(sample(q, seq.rng.random()))
        proposal.probs.append(q)

    def commit(self, active: list[bool], anchors: list[int], lengths: list[int], accepted: list[int], _out) -> None:
        """Keep the draft's cache rows that hold committed tokens: the anchor and accepted drafts it has read."""
        for r, length in enumerate(lengths):
            if length:
                self.cache.lens[r] = anchors[r] + 1 + min(accepted[r], length - 1)


class BlockProposer:
    """A DSpark or DFlash drafter: one call drafts a whole block from the target's tapped features.

    The drafter's only state is a cache of context K/V, one entry per committed position, fed exactly once
    from the target features of the anchor and accepted drafts (spec §4.4), so it never rolls back.
    """

    def __init__(self, bundle: Bundle, backend: str, threads: int, num_draft_tokens: int):
        self.bundle = bundle
        self.context = make_runner(bundle, "draft_context", backend, threads)
        self.drafter = make_runner(bundle, "draft_propose", backend, threads)
        self.config = bundle.draft["config"]
        self.k = num_draft_tokens
        self.cache: KVCache | None = None
        self.pending: list[list[np.ndarray]] = []

    def start(self, rows: int) -> None:
        c = self.config
        dtype = np.float16 if self.bundle.manifest["dtype"] == "fp16" else np.float32
        self.cache = KVCache(c["num_layers"], rows, c["num_kv_heads"], c["head_dim"], dtype, self.bundle.limits["max_context"])
        self.pending = [[] for _ in range(rows)]

    def _flush_context(self) -> None:
        """Turn pending feature rows into context K/V at each row's next positions."""
        rows = [np.concatenate(p) if p else None for p in self.pending]
        chunk = self.bundle.graph("draft_context")["dims"]["context"][1]
        offset = 0
        while any(r is not None and len(r) > offset for r in rows):
            parts = [r[offset : offset + chunk] if r is not None else None for r in rows]
            counts = [len(p) if p is not None else 0 for p in parts]
            feats = np.zeros((len(rows), max(1, max(counts)), next(p.shape[1] for p in parts if p is not None)), np.float32)
            for i, part in enumerate(parts):
                if counts[i]:
                    feats[i, : counts[i]] = part
            positions = self.cache.lens[:, None] + np.arange(feats.shape[1], dtype=np.int64)[None, :]
            out = self.context.run({"features": feats.astype(self.cache.k.dtype), "positions": positions})
            self.cache.append(out["ctx_k"], out["ctx_v"], counts)
            offset += chunk
        self.pending = [[] for _ in rows]

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[Proposal]:
        if not any(lengths):
            return [Proposal([], None, [] if self.config["enable_confidence_head"] else None) for _ in seqs]
        self._flush_context()
        block = self.config["block_size"]
        noise = np.zeros((len(seqs), block), dtype=np.float32)
        for r, s in enumerate(seqs):
            if lengths[r] and not s.request.sampling.greedy:
                noise[r] = s.rng.random(block)
        out = self.drafter.run(
            {
                "anchor": np.array([s.tokens[-1] for s in seqs], dtype=np.int64),
                "start": np.array([len(s.tokens) - 1 for s in seqs], dtype=np.int64),
                "cache_lens": self.cache.lens.copy(),
                "past_k": self.cache.k,
                "past_v": self.cache.v,
                "temperature": np.array([s.request.sampling.temperature for s in seqs], dtype=np.float32),
                "noise": noise,
            }
        )
        confidence = 1 / (1 + np.exp(-out["confidence_logits"].astype(np.float64)))
        has_head = self.config["enable_confidence_head"]
        proposals = []
        for r, s in enumerate(seqs):
            n = lengths[r]
            probs = None if s.request.sampling.greedy or not n else out["draft_probs"][r, :n].astype(np.float64)
            conf = [float(c) for c in confidence[r, :n]] if has_head else None
            proposals.append(Proposal([int(t) for t in out["draft_tokens"][r, :n]], probs, conf))
        return proposals

    def commit(self, active: list[bool], anchors: list[int], lengths: list[int], accepted: list[int], out) -> None:
        """Features of the anchor and accepted drafts become the next round's context."""
        for r, is_active in enumerate(active):
            if is_active:
                self.pending[r].append(out["hidden"][r, : accepted[r] + 1].copy())


class Generator:
    """Plain or speculative generation over a bundle's graphs."""

    def __init__(
        self,
        bundle: Bundle | str,
        backend: str = "ort",
        threads: int = 0,
        use_draft: bool = True,
        num_draft_tokens: int | None = None,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        self.target = make_runner(self.bundle, "target", backend, threads)
        self.tokenizer = Tokenizer(self.bundle)
        self.eos_ids = set(self.bundle.tokenizer["eos_token_ids"])
        self.proposer = None
        draft = self.bundle.draft
        if use_draft and draft is not None:
            k = num_draft_tokens or draft["num_draft_tokens"]
            if k + 1 > self.bundle.limits["max_verify_tokens"]:
                raise DsparkError(
                    f"--num-draft-tokens {k} needs {k + 1}-token verify calls; this bundle was exported for at most "
                    f"{self.bundle.limits['max_verify_tokens'] - 1} (re-export with --num-draft-tokens {k})"
                )
            if draft["method"] == "draft-lm":
                self.proposer = DraftLMProposer(self.bundle, make_runner(self.bundle, "draft", backend, threads), k)
            else:
                self.proposer = BlockProposer(self.bundle, backend, threads, k)

    @property
    def num_draft_tokens(self) -> int:
        return self.proposer.k if self.proposer else 0

    def generate(self, requests: list[Request], trace: bool = False, on_text=None) -> list[Sequence]:
        """Run requests to completion, ``max_batch`` rows at a time; ``on_text(index, delta)`` streams text."""
        results = []
        step = self.bundle.limits["max_batch"]
        for first in range(0, len(requests), step):
            batch = requests[first : first + step]
            callback = None if on_text is None else (lambda i, delta, base=first: on_text(base + i, delta))
            results.extend(self._run_batch(batch, trace, callback))
        return results

    def _run_batch(self, requests: list[Request], trace: bool, on_text) -> list[Sequence]:
        max_context = self.bundle.limits["max_context"]
        for req in requests:
            check_prompt(req.prompt_ids, max_context)
            if req.max_new_tokens < 1:
                raise DsparkError(f"max-new-tokens must be at least 1, got {req.max_new_tokens}")
        started = time.perf_counter()
        seqs = [
            Sequence(
                request=req,
                rng=np.random.default_rng(req.seed),
                tokens=list(req.prompt_ids),
                stream=TextStream(self.tokenizer, req.stop),
                started=started,
            )
            for req in requests
        ]
        rows = len(seqs)
        cache = decoder_cache(self.bundle.target["config"], rows, self.bundle)
        if self.proposer:
            self.proposer.start(rows)
        # prefill: the whole prompt enters the target cache; its last logits give the first token
        # (a block drafter takes the prompt's target features as its first context)
        features = self.proposer.pending if isinstance(self.proposer, BlockProposer) else None
        logits = feed(self.target, cache, [s.tokens for s in seqs], self.bundle.limits["prefill_chunk"], features)
        for r, s in enumerate(seqs):
            params = s.request.sampling
            token = int(logits[r].argmax()) if params.greedy else sample(probabilities(logits[r], params), s.rng.random())
            self._emit(r, s, [token], on_text)
        while not all(s.done for s in seqs):
            self._round(seqs, cache, trace, on_text)
        return seqs

    def _round(self, seqs: list[Sequence], cache: KVCache, trace: bool, on_text) -> None:
        max_context = self.bundle.limits["max_context"]
        anchors = [len(s.tokens) - 1 for s in seqs]
        lengths = []
        for s in seqs:
            room = min(s.request.max_new_tokens - len(s.generated), max_context - len(s.tokens)) - 1
            lengths.append(0 if s.done else max(0, min(self.num_draft_tokens, room)))
        proposals = self.proposer.propose(seqs, lengths) if self.proposer else [Proposal([], None) for _ in seqs]
        parts = [[] if s.done else [s.tokens[-1]] + p.tokens for s, p in zip(seqs, proposals)]
        out = run_decoder(self.target, cache, parts)
        accepted, counts = [0] * len(seqs), [0] * len(seqs)
        emitted_by_row = [[] for _ in seqs]
        for r, s in enumerate(seqs):
            if s.done:
                continue
            p = proposals[r]
            n, token = accept(out["logits"][r, : len(parts[r])], p.tokens, p.probs, s.request.sampling, s.rng)
            accepted[r], counts[r] = n, n + 1
            emitted_by_row[r] = p.tokens[:n] + [token]
        cache.append(out["new_k"], out["new_v"], counts)
        if self.proposer:
            self.proposer.commit([bool(p) for p in parts], anchors, lengths, accepted, out)
        for r, s in enumerate(seqs):
            if not parts[r]:
                continue
            s.proposed.append(lengths[r])
            s.accepted.append(accepted[r])
            emitted = self._emit(r, s, emitted_by_row[r], on_text)
            if trace:
                s.trace.append(
                    {
                        "round": len(s.accepted),
                        "position": anchors[r],
                        "draft_tokens": proposals[r].tokens,
                        "confidence": proposals[r].confidence,
                        "verify_length": lengths[r],
                        "accepted": accepted[r],
                        "emitted": emitted,
                    }
                )

    def _emit(self, row: int, seq: Sequence, tokens: list[int], on_text) -> list[int]:
        """Commit tokens in order until a stop condition; return the ones committed."""
        emitted = []
        for token in tokens:
            seq.tokens.append(token)
            seq.generated.append(token)
            emitted.append(token)
            if seq.first_token_at is None:
                seq.first_token_at = time.perf_counter()
            if token in self.eos_ids and not seq.request.ignore_eos:
                seq.finish_reason = "stop"
            elif len(seq.generated) >= seq.request.max_new_tokens:
                seq.finish_reason = "length"
            elif len(seq.tokens) >= self.bundle.limits["max_context"]:
                seq.finish_reason = "length"
            if seq.done:
                break
        text_ids = [t for t in seq.generated if t not in self.eos_ids]
        delta = seq.stream.update(text_ids, final=seq.done)
        if seq.stream.stopped and not seq.done:
            seq.finish_reason = "stop"
        seq.text = seq.stream.text
        if on_text is not None and delta:
            on_text(row, delta)
        if seq.done:
            seq.finished_at = time.perf_counter()
        return emitted
