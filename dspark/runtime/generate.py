"""The speculative loop with continuous batching: admit -> propose -> schedule -> verify -> accept -> commit.

Invariants, per row: ``tokens`` is prompt + committed output; the target cache holds every token but the last
(the anchor), which the next verify call re-reads as its first row; a proposer's cache may lag and catches up
from ``tokens`` when it next runs. Plain decoding is the same loop with no draft tokens, so speculative and plain
runs share every line that decides what is emitted.

Rows are the running sequences, compacted: a finished sequence's row is dropped and a new sequence's rows are
appended after its prompt is prefilled on its own, so every graph call works on live rows only. Requests can be
submitted at any time (``submit``) while another thread calls ``step``; ``generate`` is submit-all-and-drain.

A round runs on the host (runners of any backend, acceptance in numpy) or, for the torch backend on a GPU, on
the device (``cuda.DeviceStep``: drafting, verification, acceptance and KV commit in one captured step); both
feed the same bookkeeping (``_record``), so stop conditions, streaming, stats and traces are one code.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.runtime.decoder import commit, decoder_cache, feed, run_decoder
from dspark.runtime.kv import fill_order
from dspark.runtime.proposers import Proposal, make_proposer
from dspark.runtime.backends import check_backend, make_runner
from dspark.runtime.sampling import SamplingParams, accept, probabilities, sample, sigmoid
from dspark.runtime.schedulers import (BlockSchedule, load_calibration, load_table, make_block_schedule,
                                       make_scheduler)
from dspark.runtime.tokenizer import TextStream, Tokenizer, check_prompt

log = logging.getLogger("dspark")

W8A8_NOT_EXACT = ("this bundle's target is w8a8, which quantizes each call's activations with one scale for all "
                  "the call's tokens: speculative output can differ from plain decoding where two tokens nearly tie "
                  "(SmolLM2: it did on held-out prompts). For exact speculation export with --quantize int4 or int8.")


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
    stream: TextStream
    on_text: Callable[[str], None] | None = None
    trace_rounds: bool = False
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    drafted: list[int] = field(default_factory=list)  # draft tokens proposed, per round
    verified: list[int] = field(default_factory=list)  # draft tokens the target checked, per round
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted, per round
    trace: list[dict] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    done_event: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def stats(self) -> dict:
        rounds = len(self.accepted)
        by_position, per_pos = [], []
        for k in range(max(self.verified, default=0)):
            checked = sum(1 for v in self.verified if v > k)
            survived = sum(1 for a in self.accepted if a > k)
            by_position.append(survived / checked if checked else None)
            per_pos.append(survived)
        elapsed = (self.finished_at or time.perf_counter()) - self.submitted
        emitted = sum(self.accepted) + rounds
        return {
            "rounds": rounds,
            "generated_tokens": len(self.generated),
            "mean_accepted_length": emitted / rounds if rounds else None,
            "acceptance_by_position": by_position,
            "verify_tokens_per_accepted": (sum(self.verified) + rounds) / emitted if rounds else None,
            "tokens_per_second": len(self.generated) / elapsed if elapsed > 0 else None,
            "time_to_first_token_ms": 1000 * (self.first_token_at - self.submitted) if self.first_token_at else None,
            "elapsed_s": elapsed,
            # vLLM's spec_decode counters for this request
            "spec_decode": {
                "num_drafts": rounds,
                "num_draft_tokens": sum(self.verified),
                "num_accepted_tokens": sum(self.accepted),
                "num_accepted_tokens_per_pos": per_pos,
            },
        }


@dataclass
class RoundClock:
    """Where the rounds' time went, summed since it was made: the round (caps to commit, prefill excluded), and of
    it the proposer's calls and the target's verify call (host rounds; a device round counts as a whole)."""

    rounds: int = 0
    round_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0


class Generator:
    """Plain or speculative generation over a bundle's graphs, many requests at once.

    ``backend``/``device`` pick the runners (``backends.make_runner``); ``cuda_graphs`` lets a device backend
    replay captured graphs per shape bucket; ``device_step`` runs each round on the device (default: for the
    torch backend on a GPU, decoding plainly or with a block drafter, the fixed scheduler and no lookup).
    """

    def __init__(
        self,
        bundle: Bundle | str,
        backend: str = "ort",
        threads: int = 0,
        use_draft: bool = True,
        num_draft_tokens: int | None = None,
        scheduler: str = "auto",
        threshold: float = 0.5,
        block_schedule: BlockSchedule | dict[int, int] | str | None = None,
        max_batch: int | None = None,
        device: str = "cpu",
        cuda_graphs: bool = True,
        device_step: bool | None = None,
        lookup: int = 0,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        limits = self.bundle.limits
        if max_batch is not None and max_batch < 1:
            raise DsparkError(f"--max-batch {max_batch}: run at least 1 request at once")
        self.max_batch = min(max_batch or limits.max_batch, limits.max_batch)
        self.tokenizer = Tokenizer(self.bundle)
        self.eos_ids = set(self.bundle.tokenizer.eos_token_ids)
        use_draft = use_draft and self.bundle.draft is not None
        check_backend(backend, device)
        if device_step is None:
            # the torch backend on a GPU runs the round on the device where that step can: plain decoding, or a
            # DSpark/DFlash block verified whole; a draft LM, lookup or a confidence scheduler take the host loop
            device_step = (backend == "torch" and device != "cpu" and scheduler in ("auto", "fixed") and not lookup
                           and (not use_draft or self.bundle.draft.block))
        self.device_step = None
        self.target = self.proposer = None
        if device_step:
            from dspark.runtime.cuda import DeviceStep  # imports torch, which the host loop over ONNX Runtime never needs

            if backend != "torch" or scheduler not in ("auto", "fixed") or lookup:
                raise DsparkError(f"the device step runs the torch modules and verifies whole blocks: it takes "
                                  f"--backend torch and --scheduler fixed without --lookup, not {backend} and "
                                  f"{scheduler}" + (" with --lookup" if lookup else ""))
            self.device_step = DeviceStep(self.bundle, use_draft, num_draft_tokens, cuda_graphs, device)
        else:
            runner = functools.partial(make_runner, self.bundle, backend=backend, threads=threads, device=device,
                                       cuda_graphs=cuda_graphs)
            self.target = runner("target")
            self.proposer = make_proposer(self.bundle, runner, num_draft_tokens, use_draft, lookup)
        if self.draft_length and self.bundle.quantize == "w8a8":
            warnings.warn(W8A8_NOT_EXACT, stacklevel=2)
        # auto: fixed where nothing is proposed (plain decoding, or the device step's whole blocks)
        table = load_table(self.bundle, backend, device)
        self.scheduler = make_scheduler(scheduler, threshold, table,
                                        has_confidence=bool(self.proposer and self.proposer.has_confidence))
        timed = {"draft_seconds", "draft_read_seconds"}  # a draft round, and what a backlog adds to it
        if self.scheduler.name == "sps" and table and not timed <= table.keys() and self.draft_length and use_draft:
            log.warning("this bundle's profile did not time its drafter (a round, and reading what it has not read), "
                        "so sps cannot weigh a draft round's cost before drafting and may draft where it does not pay "
                        "(many requests at once); run 'dspark profile %s' again", self.bundle.path)
        self.calibration = load_calibration(self.bundle)
        self.block_schedule = make_block_schedule(block_schedule)
        self.cache = decoder_cache(self.bundle.target.config, 0, self.bundle,
                                   device=self.target.cache_device if self.target else None)
        self.clock = RoundClock()  # replace it to start counting afresh
        self.running: list[Sequence] = []
        self.waiting: collections.deque[Sequence] = collections.deque()

    @property
    def draft_length(self) -> int:
        """Draft tokens per round (0: plain decoding)."""
        if self.device_step:
            return self.device_step.draft_length
        return self.proposer.draft_length if self.proposer else 0

    # ------------------------------------------------------------------------------------------- requests
    def submit(self, request: Request, trace: bool = False, on_text: Callable[[str], None] | None = None) -> Sequence:
        """Queue a request; it joins the running batch at the next step with a free row."""
        check_prompt(request.prompt_ids, self.bundle.limits.max_context)
        if request.max_new_tokens < 1:
            raise DsparkError(f"max-new-tokens must be at least 1, got {request.max_new_tokens}")
        seq = Sequence(
            request=request,
            rng=np.random.default_rng(request.seed),
            tokens=list(request.prompt_ids),
            stream=TextStream(self.tokenizer, request.stop),
            on_text=on_text,
            trace_rounds=trace,
        )
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a request (a client went away); its row is freed at the next step."""
        if not seq.done:
            seq.finish_reason = "cancelled"

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def generate(self, requests: list[Request], trace: bool = False, on_text=None) -> list[Sequence]:
        """Run requests to completion; ``on_text(index, delta)`` streams each request's text."""
        seqs = [
            self.submit(req, trace, None if on_text is None else (lambda delta, i=i: on_text(i, delta)))
            for i, req in enumerate(requests)
        ]
        for seq in seqs:  # in order: a scan of all of them per step would cost O(requests) each round
            while not seq.done:
                self.step()
        return seqs

    def step(self) -> list[Sequence]:
        """Admit waiting requests into free rows, run one speculative round, retire finished rows."""
        self.admit()
        if any(not s.done for s in self.running):
            self._round()
        finished = [s for s in self.running if s.done]
        if finished:
            keep = fill_order([not s.done for s in self.running])
            self.running = [self.running[r] for r in keep]
            if self.device_step:
                self.device_step.keep(keep)
            else:
                self.cache.keep_rows(keep)
                if self.proposer:
                    self.proposer.keep(keep)
            for s in finished:
                self._finish(s)
        return finished

    def metrics(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "scheduler": self.scheduler.name,
                **self.scheduler.stats.to_dict()}

    # ------------------------------------------------------------------------------------------- the loop
    def admit(self) -> None:
        """Prefill waiting requests into free rows (``step`` does this first; alone, it readies rows to time a
        round on)."""
        new = []
        while self.waiting and len(self.running) + len(new) < self.max_batch:
            seq = self.waiting.popleft()
            if not seq.done:  # cancelled while waiting
                new.append(seq)
            else:
                self._finish(seq)
        if not new:
            return
        # prefill the newcomers on their own rows: the running rows are not recomputed
        if self.device_step:
            logits = self.device_step.add([s.tokens for s in new])
        else:
            cache = self.cache.empty_like(len(new))
            features = [[] for _ in new] if self.proposer and self.proposer.reads_features else None
            logits = feed(self.target, cache, [s.tokens for s in new], self.bundle.limits.prefill_chunk, features)
            self.cache.add_rows(cache)
            if self.proposer:
                self.proposer.add(len(new), features)
        self.running += new
        for seq, row_logits in zip(new, logits):
            params = seq.request.sampling
            token = int(row_logits.argmax()) if params.greedy else sample(probabilities(row_logits, params), seq.rng.random())
            self._emit(seq, [token])

    def _round(self) -> None:
        seqs = self.running
        max_context = self.bundle.limits.max_context
        schedule = self.block_schedule
        draft_length = schedule.cap(len(seqs), self.draft_length) if schedule else self.draft_length
        left = [0 if s.done else min(s.request.max_new_tokens - len(s.generated), max_context - len(s.tokens))
                for s in seqs]
        proposer = self.proposer  # None on the device step, which verifies whole blocks (the fixed scheduler)
        if draft_length and proposer and proposer.has_confidence:
            if self.scheduler.should_draft(len(seqs), proposer.backlog(seqs), sum(left) / len(seqs)):
                draft_length = self.scheduler.draft_positions(len(seqs), draft_length)
            else:
                draft_length = 0  # the scheduler expects a draft not to pay here
        caps = [max(0, min(draft_length, n - 1)) for n in left]
        start = time.perf_counter()
        emitted = self._device_round(seqs, caps) if self.device_step else self._host_round(seqs, caps)
        seconds = time.perf_counter() - start
        self.clock.rounds += 1
        self.clock.round_s += seconds
        if schedule:
            schedule.observe(len(seqs), draft_length > 0, emitted, seconds)

    def _host_round(self, seqs: list[Sequence], caps: list[int]) -> int:
        """Propose, schedule, verify, accept and commit on the host; returns the number of tokens emitted."""
        anchors = [len(s.tokens) - 1 for s in seqs]
        if self.proposer:
            drafting = time.perf_counter()
            proposals = self.proposer.propose(seqs, caps)
            self.clock.draft_s += time.perf_counter() - drafting
        else:
            proposals = [Proposal([]) for _ in seqs]
        confidences = [self._confidence(p) for p in proposals]
        lengths = self.scheduler.choose(confidences, [len(p.tokens) for p in proposals]) if self.proposer else caps
        verified = [p.truncated(n) for p, n in zip(proposals, lengths)]
        parts = [[] if s.done else [s.tokens[-1]] + v.tokens for s, v in zip(seqs, verified)]
        verifying = time.perf_counter()
        out = run_decoder(self.target, self.cache, parts)
        self.clock.verify_s += time.perf_counter() - verifying
        accepted, emitted = [0] * len(seqs), [[] for _ in seqs]
        for r, s in enumerate(seqs):
            if parts[r]:
                v = verified[r]
                accepted[r], token = accept(out["logits"][r, : len(parts[r])], v.tokens, v.probs, s.request.sampling, s.rng)
                emitted[r] = v.tokens[: accepted[r]] + [token]
        commit(self.cache, out, [len(e) for e in emitted])
        if self.proposer:
            self.proposer.commit(anchors, [len(p.tokens) for p in proposals], lengths, accepted, out)
        for r, s in enumerate(seqs):
            if parts[r]:
                self._record(s, proposals[r], lengths[r], accepted[r], emitted[r])
        return sum(len(e) for e in emitted)

    def _device_round(self, seqs: list[Sequence], caps: list[int]) -> int:
        """The round on the device: drafts, verify, acceptance and KV commit in one (captured) step."""
        active = [not s.done for s in seqs]
        # drafting, verification and acceptance are one captured call here: the clock counts it as the verify
        # call (draft_s stays 0), so a round's host work is what remains around it, as on the host loop
        verifying = time.perf_counter()
        out = self.device_step.round(seqs, caps)
        self.clock.verify_s += time.perf_counter() - verifying
        first = self.device_step.draft_length + 2  # out[r]: accepted count, the emitted tokens, then the drafts
        emitted = 0
        for r, s in enumerate(seqs):
            if active[r]:
                n = int(out[r, 0])
                drafts = [int(t) for t in out[r, first : first + caps[r]]]
                self._record(s, Proposal(drafts), caps[r], n, [int(t) for t in out[r, 1 : n + 2]])
                emitted += n + 1
        return emitted

    def _record(self, seq: Sequence, proposal: Proposal, verified: int, accepted: int, emitted: list[int]) -> None:
        """Emit a round's tokens and count it (stats, trace): the same for the host and the device round."""
        position = len(seq.tokens) - 1
        seq.drafted.append(len(proposal.tokens))
        seq.verified.append(verified)
        seq.accepted.append(accepted)
        committed = self._emit(seq, emitted)
        if seq.trace_rounds:
            logits = proposal.confidence_logits
            seq.trace.append(
                {
                    "round": len(seq.accepted),
                    "position": position,
                    "draft_tokens": proposal.tokens,
                    "confidence": None if logits is None else [float(c) for c in sigmoid(logits)],
                    "verify_length": verified,
                    "accepted": accepted,
                    "emitted": committed,
                }
            )

    def _confidence(self, proposal: Proposal) -> np.ndarray | None:
        """Per-position acceptance estimates, STS-calibrated when the bundle has a calibration."""
        z = proposal.confidence_logits
        if z is None:
            return None
        return self.calibration(z) if self.calibration is not None and proposal.sts else sigmoid(z)

    def _emit(self, seq: Sequence, tokens: list[int]) -> list[int]:
        """Commit tokens in order until a stop condition; return the ones committed."""
        committed = []
        for token in tokens:
            seq.tokens.append(token)
            seq.generated.append(token)
            committed.append(token)
            if seq.first_token_at is None:
                seq.first_token_at = time.perf_counter()
            if token in self.eos_ids and not seq.request.ignore_eos:
                seq.finish_reason = "stop"
            elif len(seq.generated) >= seq.request.max_new_tokens or len(seq.tokens) >= self.bundle.limits.max_context:
                seq.finish_reason = "length"
            if seq.done:
                break
        delta = seq.stream.push([t for t in committed if t not in self.eos_ids], final=seq.done)
        if seq.stream.stopped and not seq.done:
            seq.finish_reason = "stop"
        seq.text = seq.stream.text
        if seq.on_text is not None and delta:
            seq.on_text(delta)
        return committed

    @staticmethod
    def _finish(seq: Sequence) -> None:
        seq.finished_at = time.perf_counter()
        seq.done_event.set()
