"""``dspark bench``: plain against speculative decoding, every configuration in one process on the same prompts.

A configuration is (method, scheduler, concurrency). ``plain`` is the bundle's target alone (``use_draft=False``);
a speculative method is named by its bundle's draft (``models.draft.method``: draft-lm, dspark, dflash). Extra
bundles that share the first bundle's target add their own methods. With ``lookup`` (prompt lookup from n-gram
matches of at least that many tokens) come ``lookup`` (the first bundle's target with lookup drafts alone) and
``<method>+lookup``. Plain is always run: it is the baseline.

How it is measured:

- After ``warmup`` untimed passes, ``repeats`` passes run every configuration once each, round-robin, in an
  order shuffled every pass (seeded by ``seed``), so machine drift hits all configurations alike, and so does
  the cost of following another engine: a C++ engine's 16-request prefill took 1.4 s after another C++ engine
  and 2.7 s after a Python one in the same process, and a rotated order gave each configuration the same
  predecessor in every pass (cpp-plain ran at 0.74x of the C++ drafters' plain rounds). At concurrency 1 the
  round-robin goes request by request (every configuration decodes a prompt before any decodes the next), since
  a shared 2-core machine's speed swings by 10-30% within the tens of seconds a whole pass takes.
- Concurrency c: c requests in flight through one engine with ``max_batch=c`` (a closed loop: when one finishes
  the next prompt is submitted), over max(#prompts, c) requests, prompts cycled. Every request generates exactly
  ``max_new_tokens`` (end-of-sequence tokens are ignored) so all configurations do the same work.
- tokens/s: generated tokens of all requests / wall time of the run; the median over repeats is reported.
- speed-up: the median over passes of tokens/s / plain tokens/s at the same concurrency in the same pass. It counts
  each request's prefill, which speculation does not shorten (SmolLM2 fp32, one request, 64 new tokens: 8% of
  plain decoding's time, 17% of a 1.9x draft LM's); ``decode_speedup`` is the same over the rounds alone (tokens
  the rounds emitted, all but each request's first, over the rounds' time).
- TTFT: submit to first token of each request (prefill plus any wait for a free row); median over requests.
- ITL: gaps between successive emitted tokens of a request. Tokens of one speculative round are emitted at
  once and share the round's timestamp, so speculative ITL is bursty (many 0 gaps, then one round's time);
  p50 and p99 over all gaps are reported as they are. ``tpot_ms`` = (last - first token time) / (tokens - 1).
- τ (mean accepted length): emitted tokens per round, the bonus token included (plain: 1).
- acceptance by position: P(draft position k accepted | position k verified), pooled over rounds.
- verify tokens per accepted token: target tokens verified (K' drafts + 1) per emitted token.
- ideal speed-up: τ × T(1) / (T_draft + T_verify), the speed-up the graph calls alone would give (no host work).
  ``ideal_speedup`` takes the calls as they cost inside the timed runs (``draft_ms``, ``verify_ms`` below, T(1)
  the plain run's ``verify_ms`` at the same concurrency), so ``of_ideal`` (``decode_speedup`` over it) measures
  host work only;
  ``ideal_speedup_alone`` takes call costs measured in this process at concurrency c, each call alone (outside
  the loop): T(1) a target call with c rows of 1 token, T_verify c rows of K+1 tokens, T_draft one draft round for
  c rows, all on a cache filled to the mean prompt length + max_new_tokens/2 with the prompts' tokens (medians).
  They are measured once per method (its schedulers and the C++ host make the same calls), every method's calls
  in turn, repeat after repeat, so drift moves them alike. It assumes full-width rounds, so it understates
  methods whose rounds vary in width (prompt lookup, ``sps``, a draft LM that stops early).
- where a round's time goes, measured inside the timed runs (the generator's ``RoundClock``): ``round_ms`` per
  round (prefill excluded), of it ``draft_ms`` (the proposer's calls), ``verify_ms`` (the target's call) and
  ``host_ms``, the rest: sampling, acceptance, bookkeeping and Python around the calls. All four come from the
  timed pass with the median round time, so they add up. ``verify_ms`` is over the widths the rounds verified,
  ``call_costs_ms``' T_verify over full ones: compare the two for what a round's drafts cost the target. The C++
  host keeps the same clock in C++. On the device step (the torch backend on CUDA) drafting, verification and
  acceptance are one captured call, counted as ``verify_ms`` (``draft_ms`` 0); its calls cannot be timed apart,
  so ``call_costs_ms`` and ``ideal_speedup_alone`` are None.
- a block schedule (``block_schedule``, rows -> draft tokens, as ``dspark generate --block-schedule``) caps the
  draft length by how many rows are in flight; 0 turns drafting off there; ``auto`` learns it per method as it
  runs (each generator has its own).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.prompts import Prompt
from dspark.runtime.generate import RoundClock
from dspark.runtime.profile import cost_probe
from dspark.runtime.schedulers import make_block_schedule

REPORT_FIELDS = ("method", "scheduler", "concurrency", "tokens_per_second", "ttft_ms", "itl_p50_ms", "itl_p99_ms",
                 "mean_accepted_length", "acceptance_by_position", "verify_tokens_per_accepted", "speedup",
                 "ideal_speedup")


def parse_int_list(value: str | list | tuple, name: str) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    try:
        values = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise DsparkError(f"{name}: use integers separated by commas, e.g. 1,4,16; got {value!r}") from None
    if not values or any(v < 1 for v in values):
        raise DsparkError(f"{name}: need one or more integers >= 1; got {value!r}")
    return sorted(set(values))


def parse_names(value: str | list | tuple | None) -> list[str] | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [v.strip() for v in items if v.strip()]
    return list(dict.fromkeys(names)) or None


# ------------------------------------------------------------------------------------------------ statistics
def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else 0.0


def pooled_acceptance(seqs) -> dict:
    """τ, acceptance by position, verify tokens per accepted token and the τ histogram over all rounds."""
    rounds = emitted = verified = 0
    checked, survived = collections.Counter(), collections.Counter()
    histogram = collections.Counter()
    for s in seqs:
        for v, a in zip(s.verified, s.accepted):
            rounds += 1
            emitted += a + 1
            verified += v + 1
            histogram[a + 1] += 1
            for k in range(v):
                checked[k] += 1
                survived[k] += a > k
    width = max(checked, default=-1) + 1
    return {
        "rounds": rounds,
        "mean_accepted_length": emitted / rounds if rounds else 1.0,
        "acceptance_by_position": [survived[k] / checked[k] for k in range(width)],
        "verify_tokens_per_accepted": verified / emitted if emitted else 1.0,
        "accepted_length_histogram": {str(n): histogram[n] for n in sorted(histogram)},
    }


# ------------------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    wall_s: float
    seqs: list
    stamps: list[list[float]]  # per request: time of each generated token
    clock: RoundClock  # the generator's rounds over this run


@dataclass
class Configuration:
    method: str
    scheduler: str | None
    concurrency: int
    generator: object
    bundle: Bundle
    runs: list[Run] = field(default_factory=list)

    @property
    def name(self) -> str:
        sched = f"/{self.scheduler}" if self.scheduler else ""
        return f"{self.method}{sched}@c{self.concurrency}"


def settle(step_s: float = 0.005, quiet_s: float = 0.001, limit_s: float = 0.5) -> None:
    """Wait until this process's threads are idle. ONNX Runtime's idle pool threads spin for about 50 ms after a
    call returns (onnxruntime 1.32, 2 cores: a whole core), so the engine timed next would share the cores with the
    one timed before: a SmolLM2 prefill after another engine's run took 15-37 ms longer, depending on the order."""
    deadline = time.perf_counter() + limit_s
    while time.perf_counter() < deadline:
        busy = time.process_time()
        time.sleep(step_s)
        if time.process_time() - busy < quiet_s:
            return


def run_closed_loop(gen, requests: list, concurrency: int) -> Run:
    """Keep ``concurrency`` requests in flight until all are done; time every emitted token. The process settles
    first, so what ran before does not share the cores."""
    if gen.has_work():
        raise DsparkError("the engine still has work from a previous run")
    settle()
    gen.max_batch = concurrency
    gen.clock = RoundClock()  # counts afresh
    pending = collections.deque(requests)
    inflight: dict[int, tuple] = {}  # id(seq) -> (seq, index)
    seqs, stamps, counts = [None] * len(requests), [[] for _ in requests], [0] * len(requests)
    start = time.perf_counter()

    def top_up():
        while pending and len(inflight) < concurrency:
            i = len(requests) - len(pending)
            seq = gen.submit(pending.popleft())
            seqs[i] = seq
            inflight[id(seq)] = (seq, i)

    top_up()
    while inflight:
        gen.step()
        now = time.perf_counter()
        for key, (seq, i) in list(inflight.items()):
            n = len(seq.generated)
            if n > counts[i]:
                new = n - counts[i]
                if counts[i] == 0:
                    stamps[i].append(seq.first_token_at)
                    new -= 1
                stamps[i] += [now] * new
                counts[i] = n
            if seq.done:
                del inflight[key]
        top_up()
    return Run(time.perf_counter() - start, seqs, stamps, gen.clock)


def joined(runs: list[Run]) -> Run:
    """One run made of runs one after the other (a pass decoded request by request)."""
    clock = RoundClock(**{f.name: sum(getattr(r.clock, f.name) for r in runs) for f in fields(RoundClock)})
    return Run(sum(r.wall_s for r in runs), [s for r in runs for s in r.seqs], [t for r in runs for t in r.stamps],
               clock)


def summarize(config: Configuration) -> dict:
    rates = [sum(len(s.generated) for s in r.seqs) / r.wall_s for r in config.runs]
    seqs = [s for r in config.runs for s in r.seqs]
    ttft = [s.stats()["time_to_first_token_ms"] for s in seqs]
    gaps, tpot = [], []
    for r in config.runs:
        for st in r.stamps:
            gaps += [1000 * (b - a) for a, b in zip(st, st[1:])]
            if len(st) > 1:
                tpot.append(1000 * (st[-1] - st[0]) / (len(st) - 1))
    pooled = pooled_acceptance(seqs)
    by_domain = {}
    for domain in sorted({getattr(s, "bench_domain", "custom") for s in seqs}):
        chosen = [s for s in seqs if getattr(s, "bench_domain", "custom") == domain]
        by_domain[domain] = {"mean_accepted_length": pooled_acceptance(chosen)["mean_accepted_length"],
                             "requests": len(chosen)}
    return {
        "method": config.method,
        "scheduler": config.scheduler,
        "concurrency": config.concurrency,
        "num_draft_tokens": config.generator.draft_length,
        "requests": len(config.runs[0].seqs),
        "generated_tokens": sum(len(s.generated) for s in config.runs[0].seqs),
        "tokens_per_second": statistics.median(rates),
        "tokens_per_second_runs": rates,
        "wall_s_runs": [r.wall_s for r in config.runs],
        "ttft_ms": statistics.median(ttft),
        "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(gaps, 50),
        "itl_p99_ms": percentile(gaps, 99),
        "tpot_ms": statistics.mean(tpot) if tpot else 0.0,
        **pooled,
        "by_domain": by_domain,
    }


# ------------------------------------------------------------------------------------------------ call costs
def call_costs(generators: dict, rows: int, text: list[int], repeats: int) -> dict:
    """Median ms of each generator's round calls (``cost_probe``) at ``rows`` rows, keyed as ``generators``.

    The calls go round-robin, every generator's once per repeat after one untimed call each, so a machine whose
    speed drifts during the measurement (a shared 2-core host's does, by 10-30%) moves every generator's costs
    alike and their ratios stay fair. Without a proposer T_verify is T(1); without a draft graph T_draft is 0."""
    probes = {key: cost_probe(gen, rows, text) for key, gen in generators.items()}
    live = {key: probe for key, probe in probes.items() if probe is not None}
    times = {key: {name: [] for name in calls} for key, (_, calls, _) in live.items()}
    try:
        for _, calls, _ in live.values():
            for fn in calls.values():
                fn()
        for _ in range(repeats):
            for key, (_, calls, _) in live.items():
                settle()  # each generator's calls as in its own loop: the last one's pool is not spinning beside them
                for name, fn in calls.items():
                    start = time.perf_counter()
                    fn()
                    times[key][name].append(time.perf_counter() - start)
    finally:
        for _, _, clean_up in live.values():
            clean_up()
    costs = {}
    for key, probe in probes.items():
        if probe is None:
            costs[key] = None
            continue
        c = {"context": probe[0], **{name: 1000 * statistics.median(t) for name, t in times[key].items()}}
        c.setdefault("t_verify_ms", c["t1_ms"])
        c.setdefault("t_draft_ms", 0.0)
        costs[key] = c
    return costs


# ------------------------------------------------------------------------------------------------ machine and peers
def machine_info(threads: int) -> dict:
    import onnxruntime

    import dspark
    from dspark.runtime.schedulers import device_name

    info = {"device": device_name(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": threads, "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "onnxruntime": onnxruntime.__version__, "dspark": dspark.__version__}
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def peer_module(name: str):
    """``bench/peers/<name>.py`` from the source tree, or None when this install has no source tree."""
    path = Path(__file__).resolve().parents[1] / "bench" / "peers" / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"dspark_bench_peer_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same_greedy_tokens(ours: list[list[int]], theirs: list[list[int]], stop_ids) -> bool:
    """Whether a peer wrote our tokens for every request, up to our first end-of-sequence token: dspark ignores it
    and writes on, while peers that run to length hold it back (onnxruntime-genai's min_length, llama.cpp's
    --ignore-eos), so the two runs part there by design."""
    def cut(tokens: list[int]) -> list[int]:
        ends = [i for i, t in enumerate(tokens) if t in stop_ids]
        return tokens[: ends[0]] if ends else tokens

    return len(theirs) <= len(ours) and all(cut(a) == b[: len(cut(a))] for a, b in zip(ours, theirs))


def peer_script_arguments(parser) -> None:
    """The options every ``bench/peers`` script takes when it runs alone: dspark bench's prompts and sizes."""
    parser.add_argument("--prompts", default="all", help="code, prose, all (built-in sets) or a prompts file")
    parser.add_argument("--num-prompts", type=int, help="only the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
    parser.add_argument("--threads", type=int, default=0, help="0: the engine's default")


def peer_prompt_ids(bundle_dir, prompts: str, num_prompts: int | None) -> list[list[int]]:
    """The prompt ids dspark bench feeds, from a peer script's --prompts and --num-prompts."""
    from dspark.prompts import load_prompts
    from dspark.runtime.tokenizer import Tokenizer

    bundle = Bundle.open(bundle_dir)
    tokenizer = Tokenizer(bundle)
    return [tokenizer.encode(p.text) or [tokenizer_fallback(bundle)] for p in load_prompts(prompts, num_prompts)]


@dataclass
class PeerOptions:
    """Which peers ``dspark bench --peers`` runs besides transformers (always tried): onnxruntime-genai on a model
    its builder made (``genai_model``), llama.cpp from a folder of its binaries (``llama_cpp``) on ``llama_gguf``
    (default: the bundle's target when it was exported from a GGUF file), speculative with ``llama_draft_gguf``."""

    genai_model: Path | None = None
    llama_cpp: Path | None = None
    llama_gguf: Path | None = None
    llama_draft_gguf: Path | None = None


def llama_gguf(bundle: Bundle, chosen: Path | None) -> Path | None:
    """The GGUF file llama.cpp runs: the one given, else the file the bundle's target was converted from."""
    return chosen or (Path(bundle.target.gguf.file) if bundle.target.gguf else None)


def run_peers(main: Bundle, spec_bundles: dict, prompts: list[Prompt], prompt_ids: list[list[int]],
              max_new_tokens: int, temperature: float, draft_length: int | None, threads: int, repeats: int,
              options: PeerOptions, log) -> dict[str, dict]:
    """Each peer's report (status ok / skipped / failed with a reason), same prompts, one request at a time."""
    if temperature != 0:
        return {"all": {"status": "skipped", "reason": "the peer comparison is greedy; run with --temperature 0"}}
    lm = next((b for m, b in spec_bundles.items() if m == "draft-lm"), main)  # assisted generation needs a draft LM
    calls = {"transformers": ("hf_assisted", lambda m: m.run_peer(lm.path, prompt_ids, max_new_tokens, draft_length,
                                                                  threads=threads, repeats=repeats, log=log))}
    if options.genai_model:
        calls["onnxruntime-genai"] = ("ort_genai", lambda m: m.run_peer_isolated(options.genai_model, prompt_ids,
                                                                                  max_new_tokens, threads, repeats,
                                                                                  log=log))
    if options.llama_cpp:
        calls["llama.cpp"] = ("llama_cpp", lambda m: m.run_peer(
            options.llama_cpp, llama_gguf(main, options.llama_gguf), [p.text for p in prompts], max_new_tokens,
            threads, repeats, draft=options.llama_draft_gguf, draft_length=draft_length or 4,
            context=main.limits.max_context, log=log))
    results = {}
    for name, (file, call) in calls.items():
        log(f"peers: {name} ...")
        module = peer_module(file)
        if module is None:
            results[name] = {"status": "skipped", "reason": f"bench/peers/{file}.py not found (it ships with the "
                                                            "source tree)"}
            continue
        try:
            results[name] = call(module)
        except Exception as e:  # an optional comparison: report it, keep our own results
            results[name] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
    return results


def open_bundles(bundle_dir, extra_bundles=()) -> tuple[Bundle, dict[str, Bundle]]:
    """The main bundle and every speculative method by name; extra bundles must share the main target. A second
    bundle with the same kind of draft (two checkpoints of one drafter, say) is the method ``<kind>@<its folder
    name>``: both are timed in the same interleaved passes, which is how two drafts compare on a noisy machine."""
    main = Bundle.open(bundle_dir)
    methods: dict[str, Bundle] = {}
    for b in [main] + [Bundle.open(p) for p in extra_bundles]:
        if b.target.raw_config != main.target.raw_config or b.dtype != main.dtype:
            raise DsparkError(f"{b.path} has a different target than {main.path}; bench compares drafts of one target")
        if b.draft is None:
            continue
        method = b.draft.method
        if method in methods:
            method = f"{method}@{b.path.name}"
            if method in methods:
                raise DsparkError(f"two bundles named {b.path.name} have a {b.draft.method} draft "
                                  f"({methods[method].path}, {b.path}); give one, or rename a folder")
        methods[method] = b
    return main, methods


def run_bench(bundle_dir, prompts: list[Prompt], *, extra_bundles=(), methods=None, concurrency=(1, 4),
              schedulers=("fixed",), threshold: float = 0.5, max_new_tokens: int = 64, temperature: float = 0.0,
              num_draft_tokens: int | None = None, repeats: int = 3, warmup: int = 1, cost_repeats: int = 20,
              threads: int = 0, seed: int = 0, peers: bool = False, cpp_host: str | Path | None = None,
              block_schedule: dict[int, int] | str | None = None, lookup: int = 0,
              peer_options: PeerOptions | None = None,
              progress: bool = True, log=print, backend: str = "ort", device: str = "cpu") -> dict:
    """Run every configuration, interleaved; return the report (see the module docstring for definitions).

    ``cpp_host`` (a built ``libdspark.so``) adds the C++ host as methods ``cpp-<method>`` (with the same schedulers,
    threshold and block schedule), timed in the same closed loop; their speed-up is over ``cpp-plain``, their call
    costs are the Python runtime's (same graphs, same ONNX Runtime)."""
    from tqdm import tqdm

    from dspark.runtime.generate import Generator, Request
    from dspark.runtime.sampling import SamplingParams

    if max_new_tokens < 1 or repeats < 1 or warmup < 0 or cost_repeats < 1:
        raise DsparkError("need --max-new-tokens >= 1, --repeats >= 1, --warmup >= 0 and --cost-repeats >= 1")
    main, spec_bundles = open_bundles(bundle_dir, extra_bundles)
    schedule = make_block_schedule(block_schedule)  # checked, and its description (None: off); each generator
    # builds its own from it, since an adaptive one learns per generator

    def engine(method: str) -> tuple[Bundle, bool, int]:
        """(bundle, use its draft, prompt lookup) of a method name."""
        name = method.removesuffix("+lookup")
        looked = lookup if method.endswith("lookup") else 0
        return (main, False, looked) if name in ("plain", "lookup") else (spec_bundles[name], True, looked)

    available = ["plain"] + list(spec_bundles)
    if lookup:
        available += ["lookup"] + [f"{m}+lookup" for m in spec_bundles]
    chosen = list(methods) if methods else available
    unknown = [m for m in chosen if m not in available]
    if unknown:
        raise DsparkError(f"unknown method {', '.join(unknown)}: these bundles offer {', '.join(available)}"
                          + ("" if lookup else " (add --lookup N for prompt-lookup methods)"))
    if "plain" not in chosen:
        chosen.insert(0, "plain")  # the baseline every speed-up is measured against
    concurrency = sorted(set(concurrency))
    for m in chosen:
        b = engine(m)[0]
        if concurrency[-1] > b.limits.max_batch:
            raise DsparkError(f"--concurrency {concurrency[-1]} exceeds the bundle's max_batch "
                              f"{b.limits.max_batch} ({b.path}); re-export with --max-batch {concurrency[-1]}")
    for s in schedulers:
        if s not in ("auto", "fixed", "threshold", "sps"):
            raise DsparkError(f"unknown scheduler {s!r}: use auto, fixed, threshold or sps")

    machine = machine_info(threads)
    generators = {("plain", None): Generator(main, backend=backend, threads=threads, use_draft=False,
                                             max_batch=concurrency[-1], device=device)}
    for m in chosen:
        if m == "plain":
            continue
        bundle, use_draft, looked = engine(m)
        for s in schedulers:
            generators[(m, s)] = Generator(bundle, backend=backend, threads=threads, use_draft=use_draft,
                                           num_draft_tokens=num_draft_tokens, scheduler=s, threshold=threshold,
                                           block_schedule=block_schedule, max_batch=concurrency[-1], device=device,
                                           lookup=looked)
    if cpp_host is not None:
        from dspark.cpp_host import CppGenerator

        for m in chosen:
            bundle, use_draft, looked = engine(m)
            for s in [None] if m == "plain" else schedulers:
                generators[(f"cpp-{m}", s)] = CppGenerator(
                    cpp_host, bundle.path, use_draft=use_draft, num_draft_tokens=num_draft_tokens, threads=threads,
                    max_batch=concurrency[-1], lookup=looked, scheduler=s or "fixed", threshold=threshold,
                    block_schedule=schedule.describe() if schedule else "off")
    tokenizer = generators[("plain", None)].tokenizer
    ids = [tokenizer.encode(p.text) or [tokenizer_fallback(main)] for p in prompts]
    sampling = SamplingParams(temperature)

    def requests_for(c: int) -> tuple[list, list[str]]:
        n = max(len(prompts), c)
        reqs = [Request(list(ids[i % len(ids)]), max_new_tokens, sampling, seed + i, (), True) for i in range(n)]
        return reqs, [prompts[i % len(prompts)].domain for i in range(n)]

    configs = [Configuration(m, s, c, g, g.bundle) for c in concurrency for (m, s), g in generators.items()]
    bar = tqdm(total=(warmup + repeats) * len(configs), desc="bench", unit="run", disable=not progress)
    started = time.time()
    for p in range(warmup + repeats):
        for c in concurrency:
            group = [config for config in configs if config.concurrency == c]
            random.Random(f"{seed}-{p}-{c}").shuffle(group)
            requests = {}  # fresh requests per configuration; every configuration gets the same domains
            for config in group:
                requests[config.name], domains = requests_for(c)
            slices = [slice(i, i + 1) for i in range(len(domains))] if c == 1 else [slice(None)]
            parts = {config.name: [] for config in group}
            for part in slices:
                for config in group:
                    bar.set_postfix_str(config.name)
                    parts[config.name].append(run_closed_loop(config.generator, requests[config.name][part], c))
            for config in group:
                run = joined(parts[config.name])
                for seq, d in zip(run.seqs, domains):
                    seq.bench_domain = d
                if p >= warmup:
                    config.runs.append(run)
                bar.update()
    bar.close()

    # call costs at every concurrency, for the ideal speed-up: one measurement per method (its schedulers, and the
    # C++ host's, make the same graph calls), every method's calls interleaved
    mean_prompt = statistics.mean(len(i) for i in ids)
    context = int(mean_prompt + max_new_tokens // 2)
    tokens = [t for i in ids for t in i]
    text = (tokens * (context // len(tokens) + 1))[:context]  # the prompts' own tokens, run together (and cycled)
    costs = {}
    for c in tqdm(concurrency, desc="call costs", unit="c", disable=not progress):
        python_configs = {}
        for config in configs:
            if config.concurrency == c and not config.method.startswith("cpp-"):
                python_configs.setdefault(config.method, config)
        measured = call_costs({m: config.generator for m, config in python_configs.items()}, c, text, cost_repeats)
        for config in configs:
            if config.concurrency == c:
                costs[config.name] = measured[config.method.removeprefix("cpp-")]

    rows = []
    plain_rate, plain_decode, plain_step, plain_tokens = {}, {}, {}, {}
    for config in configs:
        row = summarize(config)
        row["bundle"] = str(config.bundle.path)
        row["call_costs_ms"] = costs[config.name]
        c = costs[config.name]
        tau = row["mean_accepted_length"]
        row["ideal_speedup_alone"] = tau * c["t1_ms"] / (c["t_draft_ms"] + c["t_verify_ms"]) if c else None
        clocks = [r.clock for r in config.runs if r.clock.rounds]
        row["clocked"] = bool(clocks)  # False only when every request ended at its prefill
        if clocks:
            # one pass's split (the pass with the median round): medians taken field by field can come from
            # different passes and then need not add up (negative host time when passes differ, as under auto)
            clock = sorted(clocks, key=lambda k: k.round_s / k.rounds)[(len(clocks) - 1) // 2]
            row["round_ms"], row["draft_ms"], row["verify_ms"] = (1000 * getattr(clock, f) / clock.rounds
                                                                  for f in ("round_s", "draft_s", "verify_s"))
        else:
            row["round_ms"] = row["draft_ms"] = row["verify_ms"] = 0.0
        row["host_ms"] = row["round_ms"] - row["draft_ms"] - row["verify_ms"]
        row["round_seconds_runs"] = [r.clock.round_s for r in config.runs]
        # tokens the rounds emitted (every request's first token comes from its prefill) over the rounds' time
        decode_rates = [(sum(len(s.generated) for s in r.seqs) - len(r.seqs)) / r.clock.round_s
                        if r.clock.rounds else None for r in config.runs]
        if config.method in ("plain", "cpp-plain"):
            row["ideal_speedup_alone"] = 1.0  # τ = 1, no draft, T_verify = T(1)
            plain_rate[(config.method, config.concurrency)] = row["tokens_per_second_runs"]
            plain_decode[(config.method, config.concurrency)] = decode_rates
            plain_step[(config.method, config.concurrency)] = row["verify_ms"]
        if config.method == "plain":
            plain_tokens[config.concurrency] = [s.generated for s in config.runs[0].seqs]
        rows.append((config, row, decode_rates))
    configurations = []
    for config, row, decode_rates in rows:
        baseline = "cpp-plain" if config.method.startswith("cpp-") else "plain"
        # paired: each pass's rate over the baseline's in the same pass (the configurations of a pass run side by
        # side), then the median; drift between passes (8% here at 4 requests) cancels, as the ratio of the two
        # medians would not
        ratios = [a / b for a, b in zip(row["tokens_per_second_runs"], plain_rate[(baseline, config.concurrency)])]
        row["speedup_runs"] = ratios
        row["speedup"] = statistics.median(ratios)
        decode = [a / b for a, b in zip(decode_rates, plain_decode[(baseline, config.concurrency)]) if a and b]
        row["decode_speedup"] = statistics.median(decode) if decode else None
        if row.pop("clocked"):  # the calls as they cost inside the runs: the gap to it is host work only
            step = plain_step[(baseline, config.concurrency)]
            row["ideal_speedup"] = row["mean_accepted_length"] * step / (row["draft_ms"] + row["verify_ms"])
        else:
            row["ideal_speedup"] = row["ideal_speedup_alone"]
        row["of_ideal"] = (row["decode_speedup"] / row["ideal_speedup"]
                           if row["ideal_speedup"] and row["decode_speedup"] else None)
        row["matches_plain"] = (None if temperature != 0 else
                                [s.generated for s in config.runs[0].seqs] == plain_tokens[config.concurrency])
        configurations.append(row)

    report = {
        "bundle": str(main.path),
        "extra_bundles": [str(p) for p in extra_bundles],
        "target_source": main.target.source,
        "settings": {"max_new_tokens": max_new_tokens, "temperature": temperature, "concurrency": concurrency,
                     "methods": chosen, "schedulers": list(schedulers), "threshold": threshold,
                     "num_draft_tokens": num_draft_tokens, "repeats": repeats, "warmup": warmup,
                     "cost_repeats": cost_repeats, "threads": threads, "seed": seed, "ignore_eos": True,
                     "cpp_host": None if cpp_host is None else str(cpp_host), "backend": backend, "device": device,
                     "block_schedule": schedule and schedule.describe()},
        "prompts": {"count": len(prompts), "domains": dict(collections.Counter(p.domain for p in prompts)),
                    "mean_prompt_tokens": mean_prompt},
        "configurations": configurations,
        "machine": machine,
        "started_unix": int(started),
        "wall_s": time.time() - started,
        "definitions": definitions(),
    }
    if peers:
        report["peers"] = run_peers(main, {m: spec_bundles[m] for m in chosen if m in spec_bundles}, prompts, ids,
                                    max_new_tokens, temperature, num_draft_tokens, threads, repeats,
                                    peer_options or PeerOptions(), log)
        # one entry per method and scheduler (a method timed under two schedulers has two rates)
        ours = {" ".join(filter(None, (r["method"], r["scheduler"]))): r["tokens_per_second"]
                for r in configurations if r["concurrency"] == 1}
        report["peers"]["dspark"] = {
            "status": "ok" if ours else "skipped",
            "reason": None if ours else "peers run one request at a time; add 1 to --concurrency to compare",
            "plain_tokens_per_second": ours.get("plain"),
            "speculative": {m: v for m, v in ours.items() if m != "plain" and not m.startswith("cpp-")}}
        for name, peer in report["peers"].items():
            tokens = peer.pop("generated_token_ids", None)
            if tokens is not None and 1 in plain_tokens:
                peer["matches_dspark_plain"] = same_greedy_tokens(plain_tokens[1], tokens, main.tokenizer.eos_token_ids)
        for name, peer in report["peers"].items():
            if peer.get("status") != "ok":
                log(f"peers: {name} {peer['status']}: {peer['reason']}")
    return report


def tokenizer_fallback(bundle: Bundle) -> int:
    """A prompt that tokenizes to nothing starts from the BOS (or EOS) token."""
    tok = bundle.tokenizer
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_ids[0]


def definitions() -> dict:
    return {
        "tokens_per_second": "generated tokens of all requests / wall time of the run; median over repeats",
        "speedup": "median over repeats of tokens_per_second / plain tokens_per_second in the same pass at the same "
                   "concurrency (cpp-* methods: over cpp-plain)",
        "ideal_speedup": "mean_accepted_length * T(1) / (draft_ms + verify_ms), T(1) the plain run's verify_ms: the "
                         "calls as they cost in the runs, no host work (C++ host: ideal_speedup_alone)",
        "ideal_speedup_alone": "the same from call_costs_ms: each call alone at full width, once per method, every "
                               "method's calls interleaved",
        "decode_speedup": "the same as speedup over the rounds alone: tokens the rounds emitted (all but each "
                          "request's first) / the rounds' time, prefill excluded",
        "of_ideal": "decode_speedup / ideal_speedup: host work only (speedup also counts each request's prefill, "
                    "which speculation does not shorten)",
        "round_ms": "a round's time measured in the runs, prefill excluded",
        "draft_ms/verify_ms": "of a round, the proposer's calls and the target's verify call, measured in the runs "
                              "(call_costs_ms: the same calls alone)",
        "host_ms": "round_ms - draft_ms - verify_ms: sampling, acceptance, bookkeeping, Python",
        "ttft_ms": "submit to first token (prefill and any wait for a free row); median over requests",
        "itl_p50_ms/itl_p99_ms": "percentiles of the gaps between successive tokens of a request; tokens of one "
                                 "round share its timestamp, so speculative ITL is bursty (many zero gaps)",
        "tpot_ms": "mean over requests of (last token time - first token time) / (tokens - 1)",
        "mean_accepted_length": "emitted tokens per round, bonus included (plain: 1)",
        "acceptance_by_position": "P(position k accepted | position k verified), pooled over rounds",
        "verify_tokens_per_accepted": "target tokens verified per emitted token",
        "concurrency": "requests in flight (closed loop) through one engine with max_batch = concurrency",
    }


# ------------------------------------------------------------------------------------------------ output
def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def table(report: dict) -> str:
    w = max([10] + [len(r["method"]) for r in report["configurations"]])  # method@folder names can be long
    head = (f"{'method':<{w}} {'sched':<9} {'c':>3} {'tok/s':>9} {'speedup':>8} {'decode':>7} {'ideal':>7} {'of id':>6} "
            f"{'tau':>6} "
            f"{'round ms = draft + verify + host':>33} {'ttft ms':>9} {'itl p50':>8}  acceptance by position")
    lines = [head, "-" * len(head)]
    for r in report["configurations"]:
        acc = " ".join(f"{a:.2f}" for a in r["acceptance_by_position"]) or "-"
        split = f"{r['round_ms']:.2f} = {r['draft_ms']:.2f} + {r['verify_ms']:.2f} + {r['host_ms']:.2f}"
        lines.append(f"{r['method']:<{w}} {r['scheduler'] or '-':<9} {r['concurrency']:>3} "
                     f"{r['tokens_per_second']:>9.1f} {r['speedup']:>7.2f}x {_fmt(r['decode_speedup']):>6}x "
                     f"{_fmt(r['ideal_speedup']):>6}x "
                     f"{_fmt(r['of_ideal']):>6} {r['mean_accepted_length']:>6.2f} {split:>33} {r['ttft_ms']:>9.1f} "
                     f"{r['itl_p50_ms']:>8.2f}  {acc}")
    if report.get("peers"):
        lines += ["", "peers (one request at a time, greedy, same prompts):"]
        rows = [PEER_COLUMNS] + peer_rows(report["peers"])
        widths = [max(len(row[i]) for row in rows) + 2 for i in range(len(PEER_COLUMNS) - 1)]
        lines += ["  " + "".join(cell.ljust(w) for cell, w in zip(row, widths)) + row[-1] for row in rows]
    return "\n".join(lines)


PEER_COLUMNS = ["engine", "version", "plain tok/s", "speculative tok/s", "same tokens as dspark plain", "note"]


def peer_rows(peers: dict) -> list[list[str]]:
    """One row of PEER_COLUMNS per peer, dspark's last."""
    rows = []
    for name, p in sorted(peers.items(), key=lambda item: item[0] == "dspark"):
        if p.get("status") != "ok":
            rows.append([name, "-", "-", "-", "-", f"{p.get('status')}: {p.get('reason')}"])
        elif name == "dspark":
            spec = ", ".join(f"{m} {v:.1f}" for m, v in p["speculative"].items()) or "-"
            rows.append(["dspark", "-", _fmt(p["plain_tokens_per_second"], ".1f"), spec, "-", "c = 1 rows above"])
        else:
            same = p.get("matches_dspark_plain")
            rows.append([name, str(p.get("version", "-")), _fmt(p.get("plain_tokens_per_second"), ".1f"),
                         _fmt(p.get("speculative_tokens_per_second"), ".1f"),
                         "-" if same is None else ("yes" if same else "no"), str(p.get("speculative") or "")])
    return rows


def mismatches(report: dict) -> list[str]:
    """One line per greedy configuration whose tokens differ from plain decoding's at its concurrency: the lossless
    contract broken for this bundle, which every speed figure of that row then overstates."""
    return [f"{r['method']} ({r['scheduler'] or '-'}, c={r['concurrency']}) wrote other tokens than plain decoding: "
            "its output is not lossless here and its speed-up compares different text"
            for r in report["configurations"] if r.get("matches_plain") is False]


def markdown(report: dict, plots: list[str]) -> str:
    s = report["settings"]
    out = ["# dspark bench", "",
           f"Bundle `{report['bundle']}`" + (f" (+ {', '.join(report['extra_bundles'])})" if report["extra_bundles"] else "")
           + f"; {report['prompts']['count']} prompts {report['prompts']['domains']}, {s['max_new_tokens']} new tokens "
           f"each, temperature {s['temperature']}, {s['repeats']} repeats after {s['warmup']} warm-up passes.", "",
           "| method | scheduler | c | tok/s | speed-up | decode | ideal | of ideal | τ | round ms | draft ms | "
           "verify ms | host ms | TTFT ms | ITL p50 ms | ITL p99 ms | acceptance by position |", "|" + "---|" * 17]
    for r in report["configurations"]:
        acc = ", ".join(f"{a:.2f}" for a in r["acceptance_by_position"]) or "-"
        out.append(f"| {r['method']} | {r['scheduler'] or '-'} | {r['concurrency']} | {r['tokens_per_second']:.1f} | "
                   f"{r['speedup']:.2f}x | {_fmt(r['decode_speedup'])}x | {_fmt(r['ideal_speedup'])}x | "
                   f"{_fmt(r['of_ideal'])} | "
                   f"{r['mean_accepted_length']:.2f} | {r['round_ms']:.2f} | {r['draft_ms']:.2f} | "
                   f"{r['verify_ms']:.2f} | {r['host_ms']:.2f} | {r['ttft_ms']:.1f} | {r['itl_p50_ms']:.2f} | "
                   f"{r['itl_p99_ms']:.2f} | {acc} |")
    out += [f"\n**Not lossless:** {line}" for line in mismatches(report)]
    out += ["", "Call costs (ms, median), each call alone (every method's in turn), and the ideal speed-up they give:",
            "",
            "| method | scheduler | c | T(1) | T_verify | T_draft | ideal alone |", "|" + "---|" * 7]
    for r in report["configurations"]:
        c = r["call_costs_ms"]
        if c is None:  # the device step: drafting, verification and acceptance are one captured call
            out.append(f"| {r['method']} | {r['scheduler'] or '-'} | {r['concurrency']} | - | - | - | - |")
            continue
        out.append(f"| {r['method']} | {r['scheduler'] or '-'} | {r['concurrency']} | {c['t1_ms']:.3f} | "
                   f"{c['t_verify_ms']:.3f} | {c['t_draft_ms']:.3f} | {r['ideal_speedup_alone']:.2f}x |")
    if report.get("peers"):
        out += ["", "## Peers", "", "One request at a time, greedy, the same prompts and number of new tokens:", "",
                f"| {' | '.join(PEER_COLUMNS)} |", "|---" * len(PEER_COLUMNS) + "|"]
        out += [f"| {' | '.join(row)} |" for row in peer_rows(report["peers"])]
    out += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in report["definitions"].items()]
    out += ["", "## Machine", "", "```json", json.dumps(report["machine"], indent=2), "```"]
    if plots:
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"


def plot(report: dict, output: Path) -> list[str]:
    """PNG plots next to the report; an empty list (and no error) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = report["configurations"]
    label = lambda r: r["method"] + (f"/{r['scheduler']}" if r["scheduler"] else "")  # noqa: E731
    files = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["acceptance_by_position"]:
            acc = r["acceptance_by_position"]
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=f"{label(r)} c={r['concurrency']}")
    ax.set(xlabel="draft position", ylabel="P(accepted | verified)", ylim=(0, 1.05), title="Acceptance by position")
    if ax.lines:
        ax.legend(fontsize=8)
    files.append(_save(fig, output / "acceptance_by_position.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(label(r) for r in rows):
        mine = sorted((r for r in rows if label(r) == name), key=lambda r: r["concurrency"])
        cs = [r["concurrency"] for r in mine]
        left.plot(cs, [r["tokens_per_second"] for r in mine], marker="o", label=name)
        right.plot(cs, [r["speedup"] for r in mine], marker="o", label=f"{name} measured")
        if name != "plain":
            ideal = [float("nan") if r["ideal_speedup"] is None else r["ideal_speedup"] for r in mine]
            right.plot(cs, ideal, marker="x", linestyle="--", label=f"{name} ideal")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.legend(fontsize=8)
    left.set(ylabel="tokens/s", title="Throughput")
    right.set(ylabel="speed-up over plain", title="Speed-up")
    right.axhline(1.0, color="grey", linewidth=0.8)
    files.append(_save(fig, output / "throughput_by_concurrency.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    spec = [r for r in rows if r["method"] != "plain"] or rows
    width = 0.8 / len(spec)
    for i, r in enumerate(spec):
        hist = {int(k): v for k, v in r["accepted_length_histogram"].items()}
        total = sum(hist.values()) or 1
        xs = sorted(hist)
        ax.bar([x + (i - (len(spec) - 1) / 2) * width for x in xs], [hist[x] / total for x in xs], width=width,
               label=f"{label(r)} c={r['concurrency']}")
    ax.set(xlabel="tokens emitted per round (accepted + bonus)", ylabel="fraction of rounds",
           title="Accepted-length histogram")
    ax.legend(fontsize=8)
    files.append(_save(fig, output / "accepted_length_histogram.png"))
    return files


def _save(fig, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def write_report(report: dict, output: str | Path) -> dict:
    """report.json, report.md and the PNG plots in ``output``; returns {'json', 'markdown', 'plots'} paths."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    plots = plot(report, output)
    report["plots"] = [Path(p).name for p in plots]
    (output / "report.json").write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (output / "report.md").write_text(markdown(report, plots))
    return {"json": str(output / "report.json"), "markdown": str(output / "report.md"), "plots": plots}


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"not JSON serialisable: {type(value)}")


def check_finite(report: dict) -> list[str]:
    """Names of report numbers that are missing, NaN or infinite (empty when all are fine)."""
    bad = []
    for i, r in enumerate(report["configurations"]):
        for key in REPORT_FIELDS:
            if key not in r:
                bad.append(f"configurations[{i}].{key} missing")
        for key in ("tokens_per_second", "ttft_ms", "itl_p50_ms", "itl_p99_ms", "mean_accepted_length",
                    "verify_tokens_per_accepted", "speedup", "ideal_speedup"):
            v = r.get(key)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                bad.append(f"configurations[{i}].{key} = {v!r}")
    return bad
