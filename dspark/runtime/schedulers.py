"""Verify-length schedulers: how many of each row's draft tokens the target checks this round.

Schedulers only choose lengths; acceptance never changes. Every rule here is non-anticipating: whether draft
position k of a row is verified depends on that row's confidences c_1..c_k, and c_k depends on draft tokens
before k only (spec §6.2), never on the token at k itself, so the output law stays the target's.

- ``fixed``: verify everything proposed.
- ``threshold``: stop at the first position whose calibrated per-step confidence is below a value.
- ``sps``: paper Algorithm 1 over the whole batch. Prefix survival a_{r,j} = prod_{i<=j} c_{r,i}; candidates
  are admitted in turn, each time re-evaluating expected throughput tau * SPS(cost), and the search stops at the
  first admission that does not improve it (the early stop is what keeps it lossless; Appendix A). Our verify
  call pads ragged rows to the longest one, so its cost is looked up by (rows, 1 + longest length), not by the
  sum of lengths the paper's packed batches use, and a candidate is a width: every row's next position at once.

A batch-size -> block-length schedule caps the proposal length by the number of active rows (0 = plain
decoding); ``auto`` learns it while running, from measured tokens per second of drafting and of plain rounds. Without confidences (no confidence head) or, for ``sps``, without a profiled table, a scheduler
falls back to ``fixed``: it says so once in the log and counts it.
"""

from __future__ import annotations

import bisect
import collections
import logging
import math
import os
import platform
import re
from dataclasses import dataclass, field

import numpy as np

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.runtime.sampling import sigmoid

log = logging.getLogger("dspark")
CALIBRATION_FILE = "calibration.json"  # written by 'dspark calibrate' (calibration.py)


@dataclass(frozen=True)
class Calibration:
    """What 'dspark calibrate' fitted per draft position k: confidence c_k = sigmoid(z_k / t_k + b_k) of a raw
    confidence logit z_k. Positions past the fitted ones keep their raw confidence."""

    temperatures: np.ndarray
    biases: np.ndarray

    def __call__(self, z: np.ndarray) -> np.ndarray:
        """Calibrated confidences of raw logits z for positions 1..len(z)."""
        z = np.asarray(z, dtype=np.float64)
        n = min(len(z), len(self.temperatures))
        scaled = z.copy()
        scaled[:n] = z[:n] / self.temperatures[:n] + self.biases[:n]
        return sigmoid(scaled)


def load_calibration(bundle: Bundle) -> Calibration | None:
    """The bundle's STS fit, or None when it was not calibrated."""
    data = bundle.read_json(CALIBRATION_FILE)
    if data is None:
        return None
    temperatures = np.asarray(data["sts_temperatures"], dtype=np.float64)
    # a calibration written before biases were fitted (dspark 0.4.4 and older) holds temperatures alone
    biases = np.asarray(data.get("sts_biases", np.zeros_like(temperatures)), dtype=np.float64)
    return Calibration(temperatures, biases)


def device_name(device: str = "cpu") -> str:
    """A file-name-safe name of the machine a backend runs on: the CPU model and core count, or the GPU model."""
    if device.startswith("cuda"):
        import torch

        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(torch.device(device)).lower()).strip("-")
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
            model = found.group(1) if found else model
    except OSError:
        pass
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    return f"cpu-{slug}-{os.cpu_count()}c"


def profile_key(backend: str, device: str = "cpu") -> str:
    return f"profiles/{backend}-{device_name(device)}.json"


def load_table(bundle: Bundle, backend: str, device: str = "cpu") -> dict | None:
    """The profile 'dspark profile' wrote for this backend on this machine (profile.py), or None."""
    return bundle.read_json(profile_key(backend, device))


@dataclass
class StepsPerSecond:
    """Profiled verify throughput: steps/s of one target call with ``rows`` rows of ``width`` new tokens; and, where
    the profile timed the bundle's drafter, the seconds of one draft round by the same rows."""

    rows: list[int]
    widths: list[int]
    steps_per_second: list[list[float]]  # [len(rows)][len(widths)]
    draft_seconds: list[float] | None = None  # [len(rows)]
    # a draft LM's round is one call per drafted position and stops early: draft_seconds times all draft_length of
    # them, and a round that drafts fewer costs that share (a block drafter's one call costs the same whatever)
    draft_length: int | None = None
    draft_cost_per_position: bool = False
    # [len(rows)]: seconds that each further token a round's drafter reads first (beyond what a profiled round reads:
    # a drafter that sat out rounds, or a new row's prompt) adds to its round; None where not profiled
    draft_read_seconds: list[float] | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "StepsPerSecond":
        return cls(d["rows"], d["widths"], d["steps_per_second"], d.get("draft_seconds"), d.get("draft_length"),
                   bool(d.get("draft_cost_per_position", False)), d.get("draft_read_seconds"))

    def draft_cost(self, rows: int) -> float:
        """Seconds of a draft round over ``rows`` rows."""
        return self._by_rows(self.draft_seconds, rows)

    def read_cost(self, rows: int, backlog: int) -> float:
        """Seconds that a drafter's backlog (``backlog`` tokens beyond a round's own, on its widest row: a call pads
        every row to it) adds to its next round over ``rows`` rows; 0 where the profile did not time reading."""
        return backlog * self._by_rows(self.draft_read_seconds, rows) if backlog and self.draft_read_seconds else 0.0

    def _by_rows(self, values: list[float], rows: int) -> float:
        """A per-row-count profile value at ``rows``: linear between profiled counts, and beyond the last in
        proportion to the rows (as verify calls beyond the table)."""
        axis = self.rows
        if rows >= axis[-1]:
            return values[-1] * rows / axis[-1]
        i = max(bisect.bisect_right(axis, rows) - 1, 0)
        if rows <= axis[i]:
            return values[i]
        return values[i] + (rows - axis[i]) * (values[i + 1] - values[i]) / (axis[i + 1] - axis[i])

    def __call__(self, rows: int, width: int) -> float:
        r = self._interp_index(self.rows, rows)
        w = self._interp_index(self.widths, width)
        table = np.asarray(self.steps_per_second, dtype=np.float64)
        value = self._bilinear(table, r, w)
        # beyond the profiled range a call is assumed throughput-bound: cost grows with tokens
        scale = max(1.0, rows / self.rows[-1]) * max(1.0, width / self.widths[-1])
        return value / scale

    @staticmethod
    def _interp_index(axis: list[int], x: float) -> float:
        x = min(max(x, axis[0]), axis[-1])
        i = min(bisect.bisect_right(axis, x) - 1, len(axis) - 2) if len(axis) > 1 else 0
        if len(axis) == 1:
            return 0.0
        return i + (x - axis[i]) / (axis[i + 1] - axis[i])

    @staticmethod
    def _bilinear(table: np.ndarray, r: float, w: float) -> float:
        r0, w0 = int(math.floor(r)), int(math.floor(w))
        r1, w1 = min(r0 + 1, table.shape[0] - 1), min(w0 + 1, table.shape[1] - 1)
        fr, fw = r - r0, w - w0
        top = table[r0, w0] * (1 - fw) + table[r0, w1] * fw
        bottom = table[r1, w0] * (1 - fw) + table[r1, w1] * fw
        return float(top * (1 - fr) + bottom * fr)


@dataclass
class SchedulerStats:
    rounds: int = 0
    proposed: int = 0
    scheduled: int = 0
    fallbacks: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"rounds": self.rounds, "proposed_tokens": self.proposed, "scheduled_tokens": self.scheduled,
                "fallbacks": dict(self.fallbacks)}


class Scheduler:
    name = "fixed"

    def __init__(self):
        self.stats = SchedulerStats()

    def choose(self, confidences: list[np.ndarray | None], proposed: list[int]) -> list[int]:
        """Verify lengths (each <= proposed[r]) for rows whose per-position confidences are given."""
        lengths = self._choose(confidences, proposed)
        self.stats.rounds += 1
        self.stats.proposed += sum(proposed)
        self.stats.scheduled += sum(lengths)
        return lengths

    def _choose(self, confidences, proposed):
        return list(proposed)

    def should_draft(self, rows: int, backlog: int = 0, tokens_left: float = math.inf) -> bool:
        """Whether a round over ``rows`` rows should draft at all (False: it decodes plainly), its drafter first
        reading ``backlog`` tokens beyond a round's own, with ``tokens_left`` tokens a row still to generate. It reads
        these and past rounds only, never this round's drafts, so output stays exact."""
        return True

    def draft_positions(self, rows: int, length: int) -> int:
        """How many of ``length`` positions a round over ``rows`` rows that drafts should draft (past rounds only)."""
        return length

    def _fallback(self, reason: str) -> None:
        if reason not in self.stats.fallbacks:
            log.warning("scheduler %s falls back to fixed: %s", self.name, reason)
        self.stats.fallbacks[reason] = self.stats.fallbacks.get(reason, 0) + 1

    def _needs_confidence(self, confidences, proposed) -> bool:
        missing = any(c is None for c, n in zip(confidences, proposed) if n)
        if missing:
            self._fallback("the drafter has no confidence head")
        return not missing


class ThresholdScheduler(Scheduler):
    name = "threshold"

    def __init__(self, threshold: float):
        super().__init__()
        if not 0 <= threshold <= 1:
            raise DsparkError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = threshold

    def _choose(self, confidences, proposed):
        if not self._needs_confidence(confidences, proposed):
            return list(proposed)
        lengths = []
        for conf, n in zip(confidences, proposed):
            below = np.nonzero(np.asarray(conf[:n]) < self.threshold)[0] if n else []
            lengths.append(int(below[0]) if len(below) else n)
        return lengths


class SpsScheduler(Scheduler):
    name = "sps"

    def __init__(self, table: StepsPerSecond | None, early_stop: bool = True):
        super().__init__()
        self.table = table
        # early_stop=False is the retrospective global search of Appendix A; it exists to test that it is biased
        self.early_stop = early_stop
        # what the last MEMORY drafting rounds' drafts were worth: each round's prefix survival by position averaged
        # over its drafting rows (a row that drafted fewer positions adds 0 past them), and the positions the round
        # drafted (its longest row's)
        self.recent: collections.deque[tuple[np.ndarray, int]] = collections.deque(maxlen=self.MEMORY)
        # by row count: what a replayed round of the memory loses against plain decoding and emits (replay) under
        # this scheduler's table, until the memory changes; rounds priced out change nothing, and replaying them anew
        # cost 0.1 ms a round in Python (10 us with this)
        self.replayed: dict[int, tuple[float, float, int]] = {}
        self.refused = 0  # rounds in a row should_draft priced out

    def _choose(self, confidences, proposed):
        if self.table is None:
            self._fallback("no steps-per-second table for this device and backend (run 'dspark profile')")
            return list(proposed)
        if not self._needs_confidence(confidences, proposed):
            return list(proposed)
        gains = summed_survival(confidences, proposed)
        if len(gains):
            self.recent.append((gains / sum(1 for n in proposed if n), len(gains)))
            self.replayed.clear()
        width, _ = best_width(len(proposed), gains, self.table, self.early_stop)
        return [min(n, width) for n in proposed]

    # drafting rounds remembered: enough to average over, few enough to follow the text
    MEMORY = 24
    # after this many rounds priced out in a row, one drafts anyway: the memory only learns from rounds that draft,
    # and without it one bad stretch turned drafting off for good (SmolLM2 int4's draft LM: off after 9 rounds of
    # the first prompt, 1.0x where drafting ran 1.28x). Where a drafting round is priced far below plain decoding,
    # the wait grows so that probes cost at most PROBE_SHARE of the time, as the replayed rounds price them: at 16
    # rows of SmolLM2 int4 a probe every 17 rounds ran 0.95x plain (the DSpark drafter's probe about 33 ms beside a
    # 34 ms step); doubling the wait after each probe instead cut that, but kept SmolLM2 fp32's DSpark drafter off
    # at one request, where its drafts are priced near plain (tau 1.72 against 2.19, 1.30x against 1.46x)
    PROBE_EVERY = 16
    PROBE_SHARE = 0.02

    def should_draft(self, rows: int, backlog: int = 0, tokens_left: float = math.inf) -> bool:
        """No round drafts where not even every row's sure first draft would pay for the wider verify call (the
        early stop would end the search there). Where the profile timed the drafter, a round drafts only if the
        remembered rounds, replayed at ``rows`` rows (each at the width sps chooses for rows of its survival, with
        its draft call priced in: a draft LM's by the positions it drafted), emit more tokens per second than plain
        decoding: sps weighs verify calls alone once the drafts exist, and at 16 requests on SmolLM2 fp32 drafting
        rounds of the DSpark drafter (10 ms a round beside a 29 ms step) emitted 5% fewer tokens per second than
        plain rounds. No margin on top: with draft rounds and widths timed as a run calls them (profile.py), a 10%
        margin turned off SmolLM2 int4's draft LM at one request (1.02x against 1.09x drafting every round) and
        changed nothing at 16 requests. Rounds are replayed one by one, not their mean survival, because sps
        verifies each round as far as its own drafts are sure: the mean priced SmolLM2 int4's draft LM at 1.07x
        plain where it ran 1.28x.

        A drafter that has not read every committed token (``backlog``: tokens beyond a round's own on its widest
        row, a new row's prompt or the rounds it sat out) reads them first, once: drafting starts only where what
        the replayed rounds gain over the rounds left (``tokens_left``, a row's mean tokens still to generate, at
        the replayed tokens a round) repays it. Unpriced, SmolLM2 fp32's draft LM at 16 requests spent 137 ms on its
        first round (16 prompts read) and 38 ms on each probe (16 rounds sat out) beside 47 ms steps: 0.94x plain.

        After ``PROBE_EVERY`` rounds priced out, one drafts to refresh the memory (a probe), or after more where a
        probe (a replayed round's loss and the backlog) costs more than ``PROBE_SHARE`` of the plain steps between
        probes."""
        table = self.table
        if table is None or not self.early_stop:
            return True
        if not 2 * table(rows, 2) > table(rows, 1):
            return False
        if table.draft_seconds is None or not self.recent:
            return True
        loss, tokens_a_round, _ = self._replayed(rows)
        debt = table.read_cost(rows, backlog) * table(rows, 1)  # in plain steps
        pays = loss < 0 and (not debt or -loss * tokens_left / tokens_a_round > debt)
        if pays or self.refused >= max(self.PROBE_EVERY, (loss + debt) / self.PROBE_SHARE):
            self.refused = 0
            return True
        self.refused += 1
        return False

    def draft_positions(self, rows: int, length: int) -> int:
        """How many of ``length`` positions a round over ``rows`` rows that drafts should draft: for a drafter that
        pays by the position (a draft LM), one past the widest verify any remembered round gets replayed at these
        rows, since positions past the verify are drafted for nothing (SmolLM2 fp32's draft LM drafted 5.8
        positions a round where sps verified 2.6 at 4 requests, 6.2 against 1.6 at 8: 3-5 draft steps of 0.8 ms
        a round). One past it, because a round remembers only the positions it drafted: so the memory still learns
        that a wider verify pays, a position more each round. Past rounds only, so output stays exact."""
        table = self.table
        if (table is None or not self.early_stop or not self.recent or table.draft_seconds is None
                or not table.draft_cost_per_position):
            return length
        return min(length, self._replayed(rows)[2] + 1)

    def _replayed(self, rows: int) -> tuple[float, float, int]:
        replayed = self.replayed.get(rows)
        if replayed is None:
            replayed = self.replayed[rows] = self.replay(rows)
        return replayed

    def replay(self, rows: int) -> tuple[float, float, int]:
        """The remembered rounds replayed at ``rows`` rows (each at the width sps chooses for rows of its survival,
        its draft call priced in): the plain steps a round costs beyond plain decoding of the tokens it is expected
        to emit (below 0 where they pay), the tokens a row is expected to emit a round, and the widest verify."""
        table = self.table
        longest = max(positions for _, positions in self.recent)
        rates = [table(rows, 1 + j) for j in range(longest + 1)]
        tokens = seconds = 0.0
        widest = 0
        for survival, positions in self.recent:
            width, expected = best_width(rows, rows * survival, lambda _, w: rates[w - 1])
            tokens += expected
            seconds += self.draft_cost(rows, positions) + 1 / rates[width]
            widest = max(widest, width)
        plain = rows * rates[0]  # tokens/s
        rounds = len(self.recent)
        return (seconds - tokens / plain) / rounds * rates[0], tokens / rounds / rows, widest

    def draft_cost(self, rows: int, positions: int) -> float:
        """Seconds of a draft round over ``rows`` rows that drafted ``positions`` positions: the profiled round, or
        for a drafter that pays by the position (a draft LM) its share."""
        table, seconds = self.table, self.table.draft_cost(rows)
        if not table.draft_cost_per_position or not table.draft_length:
            return seconds
        return seconds * min(1.0, positions / table.draft_length)


def sps_lengths(confidences, proposed, sps: StepsPerSecond, early_stop: bool = True) -> list[int]:
    """Algorithm 1 over a padded verify call: widths are admitted in turn, each adding every row's next position
    (its prefix survival counts toward tau), and the search stops at the first width that does not raise tau x SPS.

    Whether position j of a row is verified then depends on survivals up to j (of every row) only, never on c_{j+1},
    which reads draft token j: the early stop keeps it lossless as in the paper. Admitting candidates one by one
    across rows, as the paper's packed batches price them, is myopic here: the first row's next position pays for
    the wider call alone and is refused, although every row's would pay for it together (SmolLM2 fp32 at 4 rows: a
    2-token verify costs 1.19-1.26 steps, so one row's sure draft never paid, and the draft LM never drafted)."""
    width, _ = best_width(len(proposed), summed_survival(confidences, proposed), sps, early_stop)
    return [min(n, width) for n in proposed]


def summed_survival(confidences, proposed) -> np.ndarray:
    """By draft position j: the prefix survival of every row's position j, summed (rows that drafted fewer add 0)."""
    gains = np.zeros(max(proposed, default=0))
    for conf, n in zip(confidences, proposed):
        if n:
            gains[:n] += np.cumprod(np.asarray(conf[:n], dtype=np.float64))
    return gains


def best_width(rows: int, gains, sps: StepsPerSecond, early_stop: bool = True) -> tuple[int, float]:
    """The verify width sps admits for ``rows`` rows whose position j adds ``gains[j - 1]`` expected tokens, and the
    expected tokens (tau) at that width; the search stops at the first width that does not raise tau x SPS."""
    tau = float(rows)
    best, width, expected = tau * sps(rows, 1), 0, tau
    for j, gain in enumerate(gains, start=1):
        tau += gain
        throughput = tau * sps(rows, 1 + j)
        if throughput > best:
            best, width, expected = throughput, j, tau
        elif early_stop:
            break
    return width, expected


class BlockSchedule:
    """Draft length by number of running rows, from a {rows: length} table (0 = plain decoding there)."""

    def __init__(self, table: dict[int, int]):
        if not table or any(k < 1 or v < 0 for k, v in table.items()):
            raise DsparkError(f"block schedule {table}: give BATCH:LENGTH pairs with BATCH >= 1 and LENGTH >= 0")
        self.table = dict(sorted(table.items()))

    def cap(self, rows: int, default: int) -> int:
        """Draft length for a round over ``rows`` running rows (``default``: the proposer's)."""
        sizes = list(self.table)
        i = bisect.bisect_right(sizes, rows) - 1
        return min(default, self.table[sizes[max(i, 0)]])

    def observe(self, rows: int, drafted: bool, tokens: int, seconds: float) -> None:
        """A round's outcome (a fixed table learns nothing from it)."""

    def describe(self) -> str:
        """The schedule as ``--block-schedule`` takes it (the C++ host reads the same)."""
        return ",".join(f"{rows}:{length}" for rows, length in self.table.items())


class AdaptiveBlockSchedule(BlockSchedule):
    """``auto``: drafts at a batch size only while drafting rounds there have emitted more tokens per second than
    plain rounds, both measured on this run (so the drafter's cost, the verify width and the acceptance all count,
    on this machine, for this traffic). After ``probe_every`` rounds it tries the other mode once, so a changed
    regime is noticed. A probe slower than the chosen mode's median doubles the wait before the next one (up to
    ``max_backoff`` times), since a probe round costs (a drafting probe among plain rounds first feeds the drafter
    every token since its last round: 5% of the run at 16 rows with a fixed period); a faster one starts over, so
    a changed regime gathers the rounds that flip the decision quickly. A decision depends on past rounds only,
    never on the current round's draft, so output stays lossless. Batch sizes are bucketed by powers of two (1,
    2-3, 4-7, ...).

    A mode's rate is its tokens over its seconds across its last ``window`` rounds, not a median of per-round
    rates: a drafting round's tokens are skewed (most rounds of a draft with τ 2 accept nothing, a few accept
    many), so the median round of a drafter that is 1.5x faster than plain decoding is slower than a plain round.
    A bucket drafts for its first rounds before it compares (one round says little about a skewed mode), and the
    first round of each mode is forgotten once a second one arrives: a first call warms up its graph.

    Drafting is turned off only when its rate is below plain's by more than ``margin`` standard errors of it: a
    window of skewed rounds is noisy, and a false "off" is what costs (while off, drafting is seen only through
    single probes, so the stale window stands for hundreds of rounds), while a false "on" is corrected within a
    window. Measured with SmolLM2's DSpark drafter at one request (bench, 16 prompts x 64 tokens): with a window of 8,
    4 exploring rounds and no margin it drafted in few rounds, τ 1.11 and 1.03x against 1.44x with drafting always
    on; simulated with its acceptance and round times (2,000 rounds, 20 seeds): 9% of rounds drafted then, 93% now,
    and where drafting is 0.73x of plain it still drafts in 3% (probes included)."""

    window = 32  # rounds per (bucket, mode) whose tokens and seconds count
    explore = 8  # drafting rounds a bucket counts (after the first) before it may turn drafting off
    margin = 2.0  # standard errors by which drafting's rate must fall short of plain's to turn it off

    def __init__(self, probe_every: int = 24, max_backoff: int = 16):
        self.probe_every, self.max_backoff = probe_every, max_backoff
        self.rates: dict[tuple[int, bool], collections.deque] = {}
        self.since_probe: dict[int, int] = {}
        self.interval: dict[int, int] = {}  # per bucket: rounds between probes
        self.probing: dict[int, bool] = {}  # per bucket: the mode of the probe whose round is not yet observed
        self.warmed: set[tuple[int, bool]] = set()  # (bucket, mode) whose first round was forgotten

    def rate(self, rows: int, drafted: bool) -> float | None:
        seen = self.rates.get((rows.bit_length(), drafted))
        return sum(t for t, _ in seen) / sum(s for _, s in seen) if seen else None

    def rate_error(self, rows: int, drafted: bool) -> float:
        """Standard error of ``rate`` (a ratio estimate: the spread of tokens - rate x seconds over the rounds)."""
        seen = self.rates[rows.bit_length(), drafted]
        n, rate = len(seen), self.rate(rows, drafted)
        if n < 2:
            return math.inf
        spread = sum((t - rate * s) ** 2 for t, s in seen) / (n - 1)
        return math.sqrt(spread / n) / (sum(s for _, s in seen) / n)

    def cap(self, rows: int, default: int) -> int:
        drafting, plain = self.rate(rows, True), self.rate(rows, False)
        if drafting is None or len(self.rates[rows.bit_length(), True]) < self.explore:
            return default
        if plain is None:
            return 0
        bucket = rows.bit_length()
        drafts = drafting + self.margin * self.rate_error(rows, True) >= plain
        if self.since_probe.get(bucket, 0) >= self.interval.get(bucket, self.probe_every):
            self.since_probe[bucket] = 0
            self.probing[bucket] = not drafts
            return 0 if drafts else default  # the other mode, once
        self.since_probe[bucket] = self.since_probe.get(bucket, 0) + 1
        return default if drafts else 0

    def observe(self, rows: int, drafted: bool, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        bucket, rate = rows.bit_length(), tokens / seconds
        key = (bucket, drafted)
        if self.probing.get(bucket) == drafted:
            del self.probing[bucket]
            chosen = self.rate(rows, not drafted)
            slower = chosen is not None and rate < chosen
            interval = self.interval.get(bucket, self.probe_every)
            self.interval[bucket] = min(2 * interval, self.probe_every * self.max_backoff) if slower else self.probe_every
        seen = self.rates.setdefault(key, collections.deque(maxlen=self.window))
        if len(seen) == 1 and key not in self.warmed:  # the mode's first round counts only until a second one
            self.warmed.add(key)
            seen.clear()
        seen.append((tokens, seconds))

    def describe(self) -> str:
        return "auto"


def make_block_schedule(value: dict[int, int] | str | BlockSchedule | None) -> BlockSchedule | None:
    """A block schedule from ``auto``, ``'1:7,4:4,16:0'``, a {rows: length} dict, or None or ``off`` (always draft)."""
    if value is None or isinstance(value, BlockSchedule):
        return value
    if isinstance(value, str) and value.strip() == "off":
        return None
    if isinstance(value, dict):
        return BlockSchedule(value)
    if value.strip() == "auto":
        return AdaptiveBlockSchedule()
    try:
        return BlockSchedule({int(k): int(v) for k, v in (item.split(":") for item in value.split(","))})
    except ValueError:
        raise DsparkError(f"block schedule {value!r}: use auto, off or BATCH:LENGTH pairs separated by commas, "
                          "for example 1:7,4:4,16:0") from None


def make_scheduler(name: str, threshold: float = 0.5, table: dict | None = None,
                   has_confidence: bool = True) -> Scheduler:
    """``auto`` is ``sps`` where it has what it needs (drafts with confidences, a steps-per-second table profiled for
    this backend and device), else ``fixed``. Measured on SmolLM2 (16 held-out prompts, one request, one run per
    precision): DSpark 1.38x against 1.23x at fp32 and 1.00x against 0.79x at int4, its draft LM 1.92x against
    1.92x and 1.22x against 1.17x; every method within 1% of ``fixed`` or faster."""
    if name == "auto":
        name = "sps" if has_confidence and table else "fixed"
    if name == "fixed":
        return Scheduler()
    if name == "threshold":
        return ThresholdScheduler(threshold)
    if name == "sps":
        return SpsScheduler(StepsPerSecond.from_dict(table) if table else None)
    raise DsparkError(f"scheduler {name!r} is unknown; choose auto, fixed, threshold or sps")
