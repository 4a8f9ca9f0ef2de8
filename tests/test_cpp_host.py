"""The C++ host (cpp/) against the Python runtime on the suite's tiny bundles.

The host is built once per session (cpp/fetch_ort_headers.sh for ONNX Runtime's headers, then CMake). It must
give the Python runtime's greedy tokens and traces for every drafter kind and architecture, the same sampled
tokens for the same seeds (it reproduces numpy's default_rng stream), samples that follow the target's law,
tokenizer output equal to Hugging Face `tokenizers`, and clear errors, never crashes, on bad input.

DSPARK_CPP_SANITIZE=1 builds and runs it with AddressSanitizer and UndefinedBehaviorSanitizer instead (the
ctypes tests then need the sanitizer runtimes preloaded into Python, see the README's C++ section).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from conftest import (VOCAB, cheap_verify, dear_drafts_from_two_rows, deepspec_drafter, hf_model, made_up_profile,
                      noisy_copy, reduced_draft_lm, save_hf, steep_from_two_rows)
from dspark.bundle import Bundle
from dspark.cpp_host import COptions, CRequest, load_library
from dspark.export.bundle import ExportOptions, export_bundle
from dspark.runtime.calibration import calibrate_bundle
from dspark.runtime.generate import Generator, Request
from dspark.runtime.profile import profile_bundle
from dspark.runtime.sampling import SamplingParams
from dspark.runtime.schedulers import SpsScheduler, profile_key

ROOT = Path(__file__).resolve().parents[1]
SANITIZE = os.environ.get("DSPARK_CPP_SANITIZE") == "1"
BUILD = ROOT / "build" / ("cpp-sanitize" if SANITIZE else "cpp")
PROMPTS = [[5, 6, 7, 8, 9], [3] * 40, list(range(1, 70))]
LENGTHS = [9, 31, 22]
TIMING = ("tokens_per_second", "time_to_first_token_ms", "elapsed_s")


def _tool(name: str) -> str | None:
    """A tool from this Python's environment (the cmake/ninja wheels of the test extra), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


class Host:
    def __init__(self, build: Path):
        self.cli = build / "dspark-run"
        self.example = build / "dspark-stream-example"
        self.lib = load_library(build / "libdspark.so")

    def run(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        if SANITIZE:  # the command line runs with leak detection; Python itself cannot
            env["ASAN_OPTIONS"] = "detect_leaks=1"
        proc = subprocess.run([str(self.cli), *map(str, args)], capture_output=True, text=True, timeout=300, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"dspark-run {' '.join(map(str, args))} exited {proc.returncode}: {proc.stderr}")
        return proc

    def error(self) -> str:
        return self.lib.dspark_last_error().decode()


@pytest.fixture(scope="session")
def host() -> Host:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler (c++ or g++) on PATH: the C++ host cannot be built here")
    cmake = _tool("cmake")
    if cmake is None:
        pytest.fail("cmake not found: pip install -e '.[test]' installs it")
    ort = ROOT / "build" / "ort"
    steps = [["bash", str(ROOT / "cpp" / "fetch_ort_headers.sh"), str(ort), sys.executable]]
    configure = [cmake, "-S", str(ROOT / "cpp"), "-B", str(BUILD), f"-DDSPARK_ORT_ROOT={ort}",
                 f"-DDSPARK_SANITIZE={'ON' if SANITIZE else 'OFF'}", f"-DCMAKE_CXX_COMPILER={cxx}"]
    ninja = _tool("ninja")
    if ninja and not (BUILD / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    steps += [configure, [cmake, "--build", str(BUILD), "-j", "2"]]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"building the C++ host failed at {' '.join(step)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return Host(BUILD)


# ------------------------------------------------------------------------------------------------- bundles
@pytest.fixture(scope="module")
def qwen2_bundle(tmp_path_factory) -> Path:
    """Qwen2 (q/k/v biases) target with a noisy-copy draft LM."""
    root = tmp_path_factory.mktemp("qwen2")
    target = hf_model("qwen2", VOCAB, seed=3)
    target_dir = save_hf(target, root / "t", VOCAB)
    draft_dir = save_hf(noisy_copy(target, 0.3, seed=4), root / "d", VOCAB)
    export_bundle(target_dir, root / "b", draft_dir, ExportOptions(max_context=256, prefill_chunk=32, num_draft_tokens=4),
                  progress=False)
    return root / "b"


@pytest.fixture(scope="module")
def llama_dflash_bundle(tmp_path_factory) -> Path:
    """Llama 3 (RoPE scaling) target with a DFlash drafter (no Markov or confidence head)."""
    root = tmp_path_factory.mktemp("llama")
    target = hf_model("llama", VOCAB, seed=5)
    target_dir = save_hf(target, root / "t", VOCAB)
    draft_dir = deepspec_drafter(target, target_dir, root / "d", "dflash", block_size=4)
    export_bundle(target_dir, root / "b", draft_dir, ExportOptions(max_context=256, prefill_chunk=32), progress=False)
    return root / "b"


def quantized_bundle(qwen3_pair, tmp_path_factory, kind: str) -> Path:
    _, target_dir, draft_dir = qwen3_pair
    out = tmp_path_factory.mktemp(kind) / "b"
    export_bundle(target_dir, out, draft_dir, ExportOptions(max_context=256, prefill_chunk=32, num_draft_tokens=4,
                                                          quantize=kind), progress=False)
    return out


@pytest.fixture(scope="module")
def int4_bundle(qwen3_pair, tmp_path_factory) -> Path:
    """The qwen3 draft-LM pair with int4 weights (MatMulNBits), ONNX Runtime flavour."""
    return quantized_bundle(qwen3_pair, tmp_path_factory, "int4")


@pytest.fixture(scope="module")
def w8a8_bundle(qwen3_pair, tmp_path_factory) -> Path:
    """The same pair with int8 weights and activations (DynamicQuantizeMatMul after SmoothQuant)."""
    return quantized_bundle(qwen3_pair, tmp_path_factory, "w8a8")


@pytest.fixture(scope="module")
def fp16_bundle(qwen3_pair, tmp_path_factory) -> Path:
    """The qwen3 draft-LM pair in fp16 (half-precision KV caches and features)."""
    _, target_dir, draft_dir = qwen3_pair
    out = tmp_path_factory.mktemp("fp16") / "b"
    export_bundle(target_dir, out, draft_dir, ExportOptions(max_context=128, dtype="fp16", num_draft_tokens=4),
                  progress=False)
    return out


# graph flavours: "ort" (fused, KV updated in place; the default export) and "standard" (TensorRT's, K/V copied)
BUNDLES = {"qwen3-draft-lm": "qwen3_bundle", "qwen3-draft-lm-standard": "qwen3_trt_bundle",
           "qwen3-draft-lm-int4": "int4_bundle", "qwen3-draft-lm-w8a8": "w8a8_bundle", "qwen3-draft-lm-fp16": "fp16_bundle", "qwen3-dspark": "dspark_bundle", "qwen2-draft-lm": "qwen2_bundle",
           "qwen3-reduced-draft-lm": "reduced_lm_bundle",
           "llama-dflash": "llama_dflash_bundle"}


@pytest.fixture(params=list(BUNDLES))
def bundle(request) -> Path:
    return request.getfixturevalue(BUNDLES[request.param])


# ------------------------------------------------------------------------------------------------- helpers
def python_run(bundle: Path, params=SamplingParams(), seed=0, lengths=LENGTHS, **options):
    gen = Generator(bundle, **options)
    reqs = [Request(p, n, params, seed + i, ignore_eos=True) for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
    return gen.generate(reqs, trace=True)


def cpp_run(host: Host, bundle: Path, tmp_path: Path, *args) -> tuple[list[dict], list[dict]]:
    trace = tmp_path / "trace.jsonl"
    prompts = [a for p in PROMPTS for a in ("--prompt-ids", ",".join(map(str, p)))]
    proc = host.run(bundle, *prompts, "--max-new-tokens", max(LENGTHS), "--ignore-eos", "--json", "--trace", trace, *args)
    return [json.loads(line) for line in proc.stdout.splitlines()], [json.loads(l) for l in trace.read_text().splitlines()]


def same_trace_rows(got: dict, want: dict) -> None:
    """Equal trace rows; confidences (a sigmoid of the graph's fp32 logits, or a draft LM's probability of its
    likeliest token, summed in another order) to within rounding."""
    assert {k: v for k, v in got.items() if k != "confidence"} == {k: v for k, v in want.items() if k != "confidence"}
    if want["confidence"] is None:
        assert got["confidence"] is None
    else:
        np.testing.assert_allclose(got["confidence"], want["confidence"], rtol=1e-12)


def c_generate(host: Host, engine, prompts, lengths, params=SamplingParams(), seed=0, trace=True, callback=None):
    arrays = [(ctypes.c_int64 * len(p))(*p) for p in prompts]
    reqs = (CRequest * len(prompts))(*[
        CRequest(a, len(p), n, params.temperature, params.top_p, params.top_k, seed + i, 1, None, 0)
        for i, (a, p, n) in enumerate(zip(arrays, prompts, lengths))
    ])
    results = host.lib.dspark_generate(engine, ctypes.cast(reqs, ctypes.c_void_p), len(prompts), int(trace), callback, None)
    if not results:
        return None
    try:
        out = []
        for i in range(host.lib.dspark_results_count(results)):
            count = ctypes.c_size_t()
            tokens = host.lib.dspark_results_tokens(results, i, ctypes.byref(count))
            out.append({"tokens": tokens[: count.value], "json": json.loads(host.lib.dspark_results_json(results, i)),
                        "trace": [json.loads(l) for l in host.lib.dspark_results_trace(results, i).decode().splitlines()]})
        return out
    finally:
        host.lib.dspark_results_free(results)


def c_api_equals_python(host: Host, bundle: Path, options: COptions | None, lengths=LENGTHS, **python_options):
    """PROMPTS x ``lengths`` through the C API with ``options`` (None: its defaults) give the Python runtime's tokens
    and trace rows with ``python_options``; returns both results."""
    engine = host.lib.dspark_open(str(bundle).encode(), None if options is None else ctypes.byref(options))
    assert engine, host.error()
    try:
        got = c_generate(host, engine, PROMPTS, lengths)
    finally:
        host.lib.dspark_close(engine)
    want = python_run(bundle, lengths=lengths, **python_options)
    for g, w in zip(got, want):
        assert g["tokens"] == w.generated
        assert len(g["trace"]) == len(w.trace)
        for a, b in zip(g["trace"], w.trace):
            same_trace_rows(a, b)
    return got, want


# ------------------------------------------------------------------------------------------------- equivalence
def test_greedy_tokens_and_traces_equal_python(host, bundle):
    """A ragged batch through the C API: the Python runtime's tokens, text, stats and trace rows exactly."""
    got, want = c_api_equals_python(host, bundle, None)
    for g, w in zip(got, want):
        assert g["json"]["text"] == w.text and g["json"]["finish_reason"] == w.finish_reason
        stats = {k: v for k, v in w.stats().items() if k not in TIMING}
        assert {k: v for k, v in g["json"]["stats"].items() if k not in TIMING} == stats
    # drafts were both accepted and rejected: the comparison covers rollback (the DFlash drafter is random)
    accepted = sum(sum(w.accepted) for w in want)
    assert accepted < sum(sum(w.verified) for w in want)


@pytest.mark.parametrize("name", ["qwen3_bundle", "qwen3_trt_bundle"])
def test_cli_plain_equals_speculative_and_python(host, name, request, tmp_path):
    """dspark-run --json/--trace lines as `dspark generate` writes them; plain decoding gives the same tokens."""
    bundle = request.getfixturevalue(name)
    spec, spec_trace = cpp_run(host, bundle, tmp_path, "--num-draft-tokens", 3)
    plain, plain_trace = cpp_run(host, bundle, tmp_path, "--no-draft")
    gen = Generator(bundle, num_draft_tokens=3)
    want = gen.generate([Request(p, max(LENGTHS), ignore_eos=True) for p in PROMPTS], trace=True)
    assert [s["token_ids"] for s in spec] == [p["token_ids"] for p in plain] == [w.generated for w in want]
    assert list(spec[0]) == ["text", "token_ids", "finish_reason", "stats"]
    assert list(spec[0]["stats"]) == list(want[0].stats())
    rows = [dict(r, prompt=i) for i, w in enumerate(want) for r in w.trace]
    assert len(spec_trace) == len(rows)
    for got_row, want_row in zip(spec_trace, rows):
        same_trace_rows(got_row, want_row)
    assert all(r["draft_tokens"] == [] and r["accepted"] == 0 for r in plain_trace)
    assert 0 < sum(r["accepted"] for r in spec_trace) < sum(r["verify_length"] for r in spec_trace)


@pytest.mark.parametrize("name", ["qwen3_bundle", "dspark_bundle"])
@pytest.mark.parametrize("lookup", [0, 2])
@pytest.mark.parametrize("scheduler", ["sps", "threshold"])
def test_schedulers_verify_what_the_python_runtime_verifies(host, name, lookup, scheduler, request, tmp_path):
    """On a bundle profiled for this machine (the DSpark one calibrated too), the host's default scheduler (auto)
    is sps: round by round the verify lengths, and the tokens, of the Python runtime's sps, with prompt lookup in
    front of the draft too (its confidences are its measured acceptance rates); the threshold scheduler's too, on
    the calibrated confidences; --scheduler fixed verifies every draft."""
    bundle = tmp_path / "bundle"
    shutil.copytree(request.getfixturevalue(name), bundle)
    table = profile_bundle(bundle, "ort", repeats=3, warmup=1, context=32, progress=False)
    # without the drafter's cost: on these tiny graphs a draft round costs about a target step, so sps would price
    # every draft out after the first round (test_rounds_sps_expects_nothing_of_are_not_drafted compares the pricing)
    unpriced = {k: v for k, v in table.items() if k not in ("draft_length", "draft_seconds")}
    Bundle.open(bundle).add_file(profile_key("ort"), json.dumps(unpriced))
    if name == "dspark_bundle":
        calibrate_bundle(bundle, ["w5 w6 w7 w8", "w3 w3 w3 w3 w3", "w9 w1"], max_new_tokens=24, progress=False)
    gen = Generator(bundle, scheduler=scheduler, threshold=0.6, lookup=lookup)
    want = gen.generate([Request(p, max(LENGTHS), ignore_eos=True) for p in PROMPTS], trace=True)
    assert any(v < d for w in want for v, d in zip(w.verified, w.drafted))  # the scheduler cut some rounds short
    chosen = () if scheduler == "sps" else ("--scheduler", "threshold", "--threshold", 0.6)  # sps: the default
    got, trace = cpp_run(host, bundle, tmp_path, "--lookup", lookup, *chosen)
    assert [g["token_ids"] for g in got] == [w.generated for w in want]
    rows = [dict(r, prompt=i) for i, w in enumerate(want) for r in w.trace]
    assert len(trace) == len(rows)
    for got_row, want_row in zip(trace, rows):
        same_trace_rows(got_row, want_row)
    fixed, fixed_trace = cpp_run(host, bundle, tmp_path, "--scheduler", "fixed", "--lookup", lookup)
    assert [g["token_ids"] for g in fixed] == [w.generated for w in want]
    assert all(r["verify_length"] == len(r["draft_tokens"]) for r in fixed_trace)


@pytest.mark.parametrize("profile", [steep_from_two_rows, dear_drafts_from_two_rows])
@pytest.mark.parametrize("name", ["qwen3_bundle", "dspark_bundle"])
def test_rounds_sps_expects_nothing_of_are_not_drafted(host, name, profile, request, tmp_path):
    """Where the bundle's profile says no draft can pay (two requests or more: not even a sure one, or, with the
    drafter's cost, none like the drafts seen so far), the host does not draft, as the Python runtime does not: the
    same trace rows, drafting only once one request is left (and, with the drafter's cost, in the first round)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(request.getfixturevalue(name), bundle)
    profile(bundle)
    _, want = c_api_equals_python(host, bundle, COptions(1, 0, 0, 0, 1, None, None, 0, b"sps", None, 0.5),
                                  scheduler="sps")
    first = profile is dear_drafts_from_two_rows
    assert [d > 0 for d in want[0].drafted] == [first] + [False] * (len(want[0].drafted) - 1)  # never ran alone
    assert max(want[1].drafted[1:]) > 0


@pytest.mark.parametrize("name, dear", [("qwen3_bundle", 0.025), ("dspark_bundle", 0.02)])
def test_priced_out_drafts_are_probed_now_and_then_as_python(host, name, dear, request, tmp_path):
    """Draft rounds priced out at every row count: after the first round, probes draft anyway now and then (sps's
    memory learns only from rounds that draft), the more seldom the more a round is priced to lose (a round of 20 ms
    beside a 10 ms step, a draft LM's whole round of 25 ms, of which its probes draft a share: more than PROBE_EVERY
    refused rounds between probes; of 10 s: none), the host's rounds the Python runtime's, trace row for trace row;
    the draft LM's round priced by the positions it drafts (the profile's draft_length and draft_cost_per_position
    read alike)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(request.getfixturevalue(name), bundle)
    drafted = {}
    for seconds in (dear, 10.0):
        made_up_profile(bundle, cheap_verify, draft_seconds=lambda rows: seconds,
                        draft_length=Bundle.open(bundle).draft.draft_length,
                        draft_cost_per_position=name == "qwen3_bundle")
        _, want = c_api_equals_python(host, bundle, COptions(1, 0, 0, 0, 1, None, None, 0, b"sps", None, 0.5),
                                      lengths=[9, 31, 80], scheduler="sps")
        longest = max(want, key=lambda w: len(w.drafted))
        drafted[seconds] = [i for i, d in enumerate(longest.drafted) if d]
    probes = drafted[dear]
    assert len(probes) >= 2 and probes[0] == 0 and min(np.diff(probes)) > SpsScheduler.PROBE_EVERY + 1
    assert drafted[10.0] == [0]


@pytest.mark.parametrize("name", ["qwen3_bundle", "dspark_bundle"])
def test_a_drafters_backlog_is_repaid_or_not_drafted_as_python(host, name, request, tmp_path):
    """Requests one at a time: each new one's prompt is a backlog its drafter reads before its first draft. Read for
    free, every request drafts from its first round (the first one's rounds paid); at 10 s a token no later request
    repays it in the rounds it has left, nor does a probe come due (its share of the time would be the backlog's
    cost), so they decode plainly: the host's rounds the Python runtime's, trace row for trace row."""
    bundle = tmp_path / "bundle"
    shutil.copytree(request.getfixturevalue(name), bundle)
    first_rounds = {}
    for read in (0.0, 10.0):
        made_up_profile(bundle, cheap_verify, draft_seconds=lambda rows: 1e-4, draft_read_seconds=[read] * 3,
                        draft_length=Bundle.open(bundle).draft.draft_length,
                        draft_cost_per_position=name == "qwen3_bundle")
        _, want = c_api_equals_python(host, bundle, COptions(1, 0, 1, 0, 1, None, None, 0, b"sps", None, 0.5),
                                      scheduler="sps", max_batch=1)
        first_rounds[read] = [w.drafted[0] > 0 for w in want]
        if read:
            assert not any(any(w.drafted) for w in want[1:])
    assert first_rounds == {0.0: [True] * 3, 10.0: [True, False, False]}


@pytest.mark.parametrize("name, seconds", [("qwen3_bundle", 0.011), ("dspark_bundle", 0.005)])
def test_drafts_priced_near_plain_are_decided_as_python(host, name, seconds, request, tmp_path):
    """A draft round priced near what drafting gains on these drafters: rounds draft, stop, are probed and draft
    again as the remembered rounds say, the host's decisions the Python runtime's trace row for trace row."""
    bundle = tmp_path / "bundle"
    shutil.copytree(request.getfixturevalue(name), bundle)
    made_up_profile(bundle, cheap_verify, draft_seconds=lambda rows: seconds,
                    draft_length=Bundle.open(bundle).draft.draft_length, draft_cost_per_position=name == "qwen3_bundle")
    _, want = c_api_equals_python(host, bundle, COptions(1, 0, 0, 0, 1, None, None, 0, b"sps", None, 0.5),
                                  scheduler="sps")
    decisions = "".join("d" if d else "." for w in want for d in w.drafted)
    assert "d." in decisions and ".dd" in decisions  # drafting stopped, and a probe drafted on after it


@pytest.mark.parametrize("name", ["qwen3_bundle", "dspark_bundle"])
def test_block_schedule_caps_drafts_as_python(host, name, request):
    """A block schedule table caps a round's draft length by its running requests as the Python runtime's does
    (the three prompts run three, then two, then one at a time as they finish): the same trace rows."""
    _, want = c_api_equals_python(host, request.getfixturevalue(name),
                                  COptions(1, 0, 0, 0, 1, None, None, 0, None, b"1:2,2:0,3:3"),
                                  block_schedule={1: 2, 2: 0, 3: 3})
    drafted = {len(r["draft_tokens"]) for w in want for r in w.trace}
    assert 0 in drafted and max(drafted) == 3  # two rows decoded plainly, three drafted


def test_auto_block_schedule_explores_then_measures_plain_rounds(host, dspark_bundle, tmp_path):
    """--block-schedule auto: the plain tokens; it drafts its first 9 rounds (the first warms the graphs and is
    forgotten, then 8 explore), then decodes plainly to measure plain rounds, as the Python runtime's does; after
    that it follows the measured rates."""
    trace = tmp_path / "trace.jsonl"
    args = ("--prompt-ids", "5,6,7,8,9", "--max-new-tokens", 120, "--ignore-eos", "--json")
    auto = json.loads(host.run(dspark_bundle, *args, "--block-schedule", "auto", "--trace", trace).stdout)
    plain = json.loads(host.run(dspark_bundle, *args, "--no-draft").stdout)
    assert auto["token_ids"] == plain["token_ids"]
    drafts = [len(json.loads(line)["draft_tokens"]) for line in trace.read_text().splitlines()]
    assert all(drafts[:9]) and drafts[9] == 0


@pytest.mark.parametrize("spec", ["auto", "1:5,4:2,8:0"])
def test_block_schedule_decides_as_python_on_the_same_rounds(host, spec):
    """The host's block schedule and the Python runtime's, fed the same round outcomes (batch sizes 1-20, drafting
    1.3x faster than plain for 1,500 rounds, then 0.6x), allow the same draft length at every round: the same
    window, error margin, probes and back-off."""
    from dspark.runtime.schedulers import make_block_schedule

    rng, schedule, commands, caps = np.random.default_rng(0), make_block_schedule(spec), [], []
    for i in range(3000):
        rows = int(rng.choice([1, 1, 1, 2, 3, 5, 9, 20]))
        cap = schedule.cap(rows, 7)
        commands.append(f"cap {rows} 7")
        caps.append(cap)
        tokens = rows * (1 + int((rng.random(7) < [0.6, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1]).sum())) if cap else rows
        seconds = (0.02 if cap and i < 1500 else 0.045 if cap else 0.0114) * rows ** 0.5 * rng.uniform(0.9, 1.1)
        schedule.observe(rows, cap > 0, tokens, seconds)
        commands.append(f"observe {rows} {int(cap > 0)} {tokens} {seconds!r}")
    replay = subprocess.run([str(host.cli.parent / "dspark-block-schedule-replay"), spec], input="\n".join(commands),
                            capture_output=True, text=True, timeout=60)
    assert replay.returncode == 0, replay.stderr
    assert [int(c) for c in replay.stdout.split()] == caps
    if spec == "auto":  # both regimes were seen, and probes happened in each
        assert 0.5 < np.mean([c > 0 for c in caps[300:1500]]) < 1 and np.mean([c > 0 for c in caps[1800:]]) < 0.2


def lookup_equals_python(host, bundle: Path, prompts, use_draft: bool, temperature: float):
    """Prompt lookup (2+ tokens) through the C API and the Python runtime: the same tokens and trace rows (lookup
    drafts' confidences too: their measured acceptance rates), from two engines open at once (which share a lookup
    store's index); returns the Python generator and its sequences."""
    params = SamplingParams(temperature)
    options = COptions(int(use_draft), 0, 0, 0, 1, None, None, 2)
    engines = [host.lib.dspark_open(str(bundle).encode(), ctypes.byref(options)) for _ in range(2)]
    try:
        assert all(engines), host.error()
        got, again = (c_generate(host, engine, prompts, [30] * len(prompts), params, seed=3) for engine in engines)
    finally:
        for engine in engines:
            if engine:
                host.lib.dspark_close(engine)
    assert [(g["tokens"], g["trace"]) for g in again] == [(g["tokens"], g["trace"]) for g in got]
    gen = Generator(bundle, use_draft=use_draft, lookup=2)
    want = gen.generate([Request(p, 30, params, 3 + i, ignore_eos=True) for i, p in enumerate(prompts)], trace=True)
    assert [g["tokens"] for g in got] == [w.generated for w in want]
    for g, w in zip(got, want):
        assert len(g["trace"]) == len(w.trace)
        for a, b in zip(g["trace"], w.trace):
            same_trace_rows(a, b)
    return gen, want


@pytest.mark.parametrize("name,use_draft", [("qwen3_bundle", False), ("qwen3_bundle", True), ("dspark_bundle", True)])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_prompt_lookup_equals_python(host, name, use_draft, temperature, request):
    """dspark_options.lookup: rows whose last tokens occurred before draft what followed them, alone or in front
    of the bundle's draft; the Python runtime's tokens and rounds (greedy and sampled, same seeds)."""
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [3] * 40, [11, 12], list(range(1, 70)) + list(range(1, 20))]
    gen, want = lookup_equals_python(host, request.getfixturevalue(name), prompts, use_draft, temperature)
    looked = [r for w in want for r in w.trace if r["draft_tokens"] and gen.proposer.lookup(
        (w.request.prompt_ids + w.generated)[: r["position"] + 1], gen.draft_length)]
    assert looked and any(r["accepted"] for r in looked)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_lookup_store_equals_python(host, qwen3_bundle, temperature, tmp_path):
    """A bundle with a lookup store (`dspark lookup-data`) and no draft: rows with no match in their own tokens
    draft what most often followed their last tokens in the store, with the store's own acceptance rates as
    confidences; the Python runtime's tokens and rounds (greedy and sampled, same seeds)."""
    from dspark.runtime.store import add_store

    bundle = tmp_path / "b"
    shutil.copytree(qwen3_bundle, bundle)
    earlier = Generator(bundle, use_draft=False).generate(
        [Request(p, 40, ignore_eos=True) for p in ([7, 8, 9], [20, 21], [2, 4, 6, 8])])
    noise = np.random.default_rng(0).integers(0, VOCAB, 500)
    np.save(tmp_path / "store.npy", np.concatenate([s.request.prompt_ids + s.generated for s in earlier] + [noise]))
    add_store(bundle, tmp_path / "store.npy")
    gen, want = lookup_equals_python(host, bundle, [[7, 8, 9], [20, 21, 22], [5, 6], [2, 4, 6, 8, 10]], False,
                                     temperature)
    from_store = [r for w in want for r in w.trace if r["draft_tokens"] and not gen.proposer.lookup(
        (w.request.prompt_ids + w.generated)[: r["position"] + 1], gen.draft_length)]
    assert from_store and any(r["accepted"] for r in from_store)


@pytest.mark.parametrize("name", ["qwen3_bundle", "qwen3_trt_bundle", "dspark_bundle"])
def test_sampled_tokens_equal_python_for_the_same_seed(host, name, request):
    """The host draws numpy's default_rng(seed) stream: the same sampled tokens as the Python runtime."""
    bundle = request.getfixturevalue(name)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20)
    engine = host.lib.dspark_open(str(bundle).encode(), None)
    try:
        got = c_generate(host, engine, PROMPTS, LENGTHS, params, seed=7)
    finally:
        host.lib.dspark_close(engine)
    want = python_run(bundle, params, seed=7)
    assert [g["tokens"] for g in got] == [w.generated for w in want]
    for g, w in zip(got, want):
        assert [{k: v for k, v in r.items() if k != "confidence"} for r in g["trace"]] == \
               [{k: v for k, v in r.items() if k != "confidence"} for r in w.trace]


def test_cli_stops_queues_and_reads_prompt_files_like_python(host, qwen3_bundle, tmp_path):
    """End-of-sequence and stop strings end requests as in Python; with --max-batch 2 the third prompt waits for
    a free row (continuous batching), and a prompts file of plain and JSON lines gives the same prompts."""
    texts = [" ".join(f"w{i}" for i in p) for p in PROMPTS]
    free = Generator(qwen3_bundle).generate([Request(PROMPTS[2], 40, ignore_eos=True)])[0].text.split()
    stop = " ".join(free[8:10])
    (tmp_path / "prompts.jsonl").write_text(f"{texts[0]}\n\n" + json.dumps({"prompt": texts[1]}) + f"\n{texts[2]}\n")
    proc = host.run(qwen3_bundle, "--prompts-file", tmp_path / "prompts.jsonl", "--max-new-tokens", 40,
                    "--max-batch", 2, "--stop", stop, "--json", "--trace", tmp_path / "t.jsonl")
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    gen = Generator(qwen3_bundle, max_batch=2)
    want = gen.generate([Request(p, 40, stop=(stop,)) for p in PROMPTS], trace=True)
    assert [g["token_ids"] for g in got] == [w.generated for w in want]
    assert [(g["text"], g["finish_reason"]) for g in got] == [(w.text, w.finish_reason) for w in want]
    rows = [json.loads(l) for l in (tmp_path / "t.jsonl").read_text().splitlines()]
    expected = [dict(r, prompt=i) for i, w in enumerate(want) for r in w.trace]
    assert len(rows) == len(expected)
    for got_row, want_row in zip(rows, expected):
        same_trace_rows(got_row, want_row)
    # both kinds of stop happen: an end-of-sequence token (id 0) and the stop string
    assert {w.finish_reason for w in want} == {"stop"}
    assert {w.generated[-1] == 0 for w in want} == {True, False}


def test_streamed_text_and_example(host, qwen3_bundle):
    deltas = []
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p)
    callback = callback_type(lambda i, delta, _user: deltas.append((i, delta.decode())))
    engine = host.lib.dspark_open(str(qwen3_bundle).encode(), None)
    try:
        got = c_generate(host, engine, PROMPTS, LENGTHS, trace=False, callback=ctypes.cast(callback, ctypes.c_void_p))
    finally:
        host.lib.dspark_close(engine)
    for i, result in enumerate(got):
        assert "".join(d for j, d in deltas if j == i) == result["json"]["text"] != ""
    proc = subprocess.run([str(host.example), str(qwen3_bundle), "w5 w6 w7", "12"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    want = Generator(qwen3_bundle).generate([Request([5, 6, 7], 12)])[0]
    assert proc.stdout.startswith("w5 w6 w7" + want.text) and f"[{len(want.generated)} tokens" in proc.stdout


def test_bench_times_the_cpp_host_beside_the_python_runtime(host, qwen3_bundle, tmp_path):
    """`dspark bench --cpp-host`: cpp-plain and cpp-draft-lm rows in the same closed loop, the same tokens and
    acceptance as the Python runtime's rows (under the same block schedule: 3 drafts at one request, none at two),
    speed-up over the host's own plain decoding, rounds split by the host's own clock."""
    from click.testing import CliRunner

    from dspark.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6 w7\nw9 w10\n")
    out = tmp_path / "report"
    result = CliRunner().invoke(main, [str(a) for a in (
        "bench", qwen3_bundle, "--prompts", prompts, "--max-new-tokens", 6, "--concurrency", "1,2", "--repeats", 1,
        "--warmup", 0, "--cost-repeats", 1, "--threads", 1, "--cpp-host", BUILD / "libdspark.so", "--output", out,
        "--block-schedule", "1:3,2:0", "--no-progress")])
    assert result.exit_code == 0, result.output
    rows = {(r["method"], r["concurrency"]): r for r in json.loads((out / "report.json").read_text())["configurations"]}
    assert set(rows) == {(m, c) for m in ("plain", "draft-lm", "cpp-plain", "cpp-draft-lm") for c in (1, 2)}
    for c in (1, 2):
        for m in ("plain", "draft-lm"):
            cpp, py = rows[(f"cpp-{m}", c)], rows[(m, c)]
            assert cpp["matches_plain"] is True and cpp["generated_tokens"] == py["generated_tokens"]
            assert cpp["mean_accepted_length"] == py["mean_accepted_length"]
            assert cpp["acceptance_by_position"] == py["acceptance_by_position"]
            assert cpp["call_costs_ms"] == py["call_costs_ms"]  # the same graph calls, measured once
        assert rows[("cpp-draft-lm", c)]["speedup"] == pytest.approx(
            rows[("cpp-draft-lm", c)]["tokens_per_second"] / rows[("cpp-plain", c)]["tokens_per_second"])
        for m in ("cpp-plain", "cpp-draft-lm"):  # the host's own clock splits its rounds
            r = rows[(m, c)]
            assert r["round_ms"] == pytest.approx(r["draft_ms"] + r["verify_ms"] + r["host_ms"])
            assert r["verify_ms"] > 0 and r["host_ms"] > 0 and (r["draft_ms"] > 0) == (m != "cpp-plain")
            assert r["round_ms"] < 1000 * max(r["wall_s_runs"])
    assert rows[("cpp-draft-lm", 2)]["mean_accepted_length"] == 1 < rows[("cpp-draft-lm", 1)]["mean_accepted_length"]


# ------------------------------------------------------------------------------------------------- sampling law
@pytest.fixture(scope="module", params=["draft-lm", "reduced-lm", "dspark"])
def v4_bundle(request, tmp_path_factory):
    """test_sampling.py's 4-token setting: a target with a flat law and a draft that often disagrees."""
    import torch

    root = tmp_path_factory.mktemp("v4")
    target = hf_model("qwen3", 4, seed=11)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.1)
    target_dir = save_hf(target, root / "t", 4)
    if request.param == "draft-lm":
        draft_dir = save_hf(noisy_copy(target, 1.0, seed=12), root / "d", 4)
    elif request.param == "reduced-lm":
        draft_dir = reduced_draft_lm(target, root / "d", [3, 1], 1.0, seed=12)
    else:
        draft_dir = deepspec_drafter(target, target_dir, root / "dspark", "vanilla", block_size=2)
    export_bundle(target_dir, root / "b", draft_dir, ExportOptions(max_batch=256, max_context=32, prefill_chunk=8,
                                                                   num_draft_tokens=2), progress=False)
    return target, root / "b"


def test_sampled_output_follows_target_law(host, v4_bundle):
    """Chi-square on the joint law of 4 sampled tokens, with power against a 1% bias (as test_sampling.py)."""
    from test_sampling import PROMPT, SAMPLES, V, chi2, chi2_threshold, exact_law

    target, bundle = v4_bundle
    params = SamplingParams(0.7, top_p=0.8, top_k=4)
    engine = host.lib.dspark_open(str(bundle).encode(), None)
    try:
        got = c_generate(host, engine, [PROMPT] * SAMPLES, [4] * SAMPLES, params, seed=0, trace=False)
    finally:
        host.lib.dspark_close(engine)
    counts = np.zeros(V**4)
    for g in got:
        counts[np.ravel_multi_index(g["tokens"], (V,) * 4)] += 1
    stats = [g["json"]["stats"]["spec_decode"] for g in got]
    assert 0.2 < sum(s["num_accepted_tokens"] for s in stats) / sum(s["num_draft_tokens"] for s in stats) < 0.9
    law = exact_law(target, params)
    support = law > 0
    assert counts[~support].sum() == 0
    df = int(support.sum()) - 1
    assert chi2(counts[support], law[support]) < chi2_threshold(df)
    biased = law.copy()
    top = np.argsort(-law)[:2]
    biased[top[0]] -= 0.01
    biased[top[1]] += 0.01
    assert chi2(counts[support], biased[support]) > chi2_threshold(df)


# ------------------------------------------------------------------------------------------------- tokenizer
TRICKY = ("Héllo  wörld\r\n\n  x = 1234567 + \u0661\u0662\u0663 'S 'll I'M  \t\ttabs 한국어 e\u0301 \u1100\u1161\u11a8 "
          "日本語 🎉 emoji\u200d  \n\n\n end  \u00a0\u2003x <|endoftext|>tail")


def bpe_variants(tmp_path: Path) -> list[Path]:
    """The shipped target's byte-level BPE (GPT-2 regex, BOS template) and the same vocabulary with the
    pre-tokenizers of Qwen2/3 (NFC + Qwen regex) and Llama 3 (Llama 3 regex, ignore_merges)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

    source = ROOT / "examples" / "target" / "tokenizer.json"
    qwen = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
            r"|\s+(?!\S)|\s+")
    paths = [source]
    for name, pattern, nfc in (("qwen", qwen, True), ("llama3", qwen.replace(r"\p{N}|", r"\p{N}{1,3}|"), False)):
        tok = Tokenizer.from_file(str(source))
        if nfc:
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        path = tmp_path / f"{name}.json"
        tok.save(str(path))
        if name == "llama3":
            data = json.loads(path.read_text())
            data["model"]["ignore_merges"] = True
            path.write_text(json.dumps(data))
        paths.append(path)
    return paths


def test_tokenizer_equals_hf_on_the_standard_library(host, tmp_path):
    """ids and decoded text equal Hugging Face tokenizers on every top-level module of Python's standard library."""
    from tokenizers import Tokenizer

    lib = host.lib
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("*.py"))]
    assert len(corpus) > 100
    corpus.append(TRICKY)
    for path in bpe_variants(tmp_path):
        hf = Tokenizer.from_file(str(path))
        tok = lib.dspark_tokenizer_open(str(path).encode())
        assert tok, host.error()
        try:
            for text in corpus:
                data = text.encode()
                want = hf.encode(text).ids
                buf = (ctypes.c_int64 * (len(data) + 8))()
                n = lib.dspark_tokenizer_encode(tok, data, buf, len(buf))
                assert list(buf[:n]) == want, f"{path.name}: {text[:60]!r}"
                ids = (ctypes.c_int64 * len(want))(*want)
                out = lib.dspark_tokenizer_decode(tok, ids, len(want))
                decoded = ctypes.string_at(out).decode()
                lib.dspark_free_string(out)
                # the round trip gives back the text, normalised when the tokenizer normalises
                plain = text.replace("<|endoftext|>", "")
                assert decoded == hf.decode(want, skip_special_tokens=True) == (
                    hf.normalizer.normalize_str(plain) if hf.normalizer else plain)
        finally:
            lib.dspark_tokenizer_close(tok)


def test_text_prompt_uses_the_bundle_tokenizer(host, qwen3_bundle):
    proc = host.run(qwen3_bundle, "--prompt", "w5 w6  w7\tw8", "--max-new-tokens", 6, "--json")
    want = Generator(qwen3_bundle).generate([Request([5, 6, 7, 8], 6)])[0]
    assert json.loads(proc.stdout)["token_ids"] == want.generated


def test_unsupported_tokenizer_is_refused(host, tmp_path):
    data = json.loads((ROOT / "examples" / "target" / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "_", "prepend_scheme": "always", "split": True}
    (tmp_path / "t.json").write_text(json.dumps(data))
    assert not host.lib.dspark_tokenizer_open(str(tmp_path / "t.json").encode())
    assert "pre-tokenizer Metaspace is not supported" in host.error()


# ------------------------------------------------------------------------------------------------- bad input
def broken_copy(bundle: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    edit(out)
    return out


def edit_manifest(change):
    def edit(folder: Path):
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return edit


def flip_byte(folder: Path):
    path = folder / "target.onnx.data"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def set_taps(m):
    m["models"]["draft"]["config"]["target_layer_ids"] = [0, 2]


def set_vocab(m):
    m["models"]["draft"]["config"]["vocab_size"] = VOCAB + 8


BAD_BUNDLES = {
    "missing file": ("qwen3_bundle", lambda f: (f / "tokenizer_config.json").unlink(), "tokenizer_config.json is missing"),
    "resized file": ("qwen3_bundle", lambda f: (f / "draft.onnx").write_bytes(b"x"), "draft.onnx has 1 bytes"),
    "changed file": ("qwen3_bundle", flip_byte, "target.onnx.data has changed (sha256 differs"),
    "schema version": ("qwen3_bundle", edit_manifest(lambda m: m.update(schema_version=99)), "schema version 99"),
    "no manifest": ("qwen3_bundle", lambda f: (f / "manifest.json").unlink(), "has no manifest.json"),
    "manifest not json": ("qwen3_bundle", lambda f: (f / "manifest.json").write_text("{"), "is not valid JSON"),
    "other KV layout": ("qwen3_bundle", edit_manifest(lambda m: m["kv_layout"].update(axes=["batch", "layer"])),
                        "KV layout"),
    "drafter taps other layers": ("dspark_bundle", edit_manifest(set_taps), "made for another target"),
    "draft LM with another vocabulary": ("qwen3_bundle", edit_manifest(set_vocab), "made for another target"),
}


@pytest.mark.parametrize("case", list(BAD_BUNDLES))
def test_bad_bundle_is_refused_with_a_clear_message(host, case, tmp_path, request):
    name, edit, message = BAD_BUNDLES[case]
    folder = broken_copy(request.getfixturevalue(name), tmp_path, edit)
    proc = host.run(folder, "--prompt-ids", "1,2,3", "--max-new-tokens", 4, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not host.lib.dspark_open(str(folder).encode(), None)
    assert message in host.error()


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", ",".join(["3"] * 256)], "the prompt has 256 tokens but the bundle's max context is 256"),
    (["--prompt-ids", "1,2,999"], "prompt token id 999 is outside the vocabulary"),
    (["--prompt-ids", "1,x"], "--prompt-ids needs an integer"),
    (["--prompt-ids", "1", "--top-p", "0"], "top-p must be in (0, 1]"),
    (["--prompt-ids", "1", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt-ids", "1", "--num-draft-tokens", "9"], "needs 10-token verify calls"),
    (["--prompt-ids", "1", "--max-new-tokens", "0"], "max-new-tokens must be at least 1"),
    (["--prompt-ids", "1", "--provider", "abc"], "unknown execution provider 'abc'"),
    (["--prompt-ids", "1", "--backend", "trt"], "built without TensorRT"),
    (["--prompt-ids", "1", "--frobnicate"], "unknown option --frobnicate"),
    (["--prompt-ids", "1", "--scheduler", "best"], "scheduler 'best' is unknown; choose auto, fixed, threshold or sps"),
    (["--prompt-ids", "1", "--scheduler", "threshold", "--threshold", "1.5"], "threshold must be in [0, 1], got 1.5\n"),
    (["--prompt-ids", "1", "--block-schedule", "1:x"], "block schedule '1:x': use auto, off or BATCH:LENGTH pairs"),
    (["--prompt-ids", "1", "--block-schedule", "0:3"], "give BATCH:LENGTH pairs with BATCH >= 1 and LENGTH >= 0"),
    ([], "give a prompt"),
])
def test_bad_request_is_refused_with_a_clear_message(host, qwen3_bundle, args, message):
    proc = host.run(qwen3_bundle, *args, check=False)
    assert proc.returncode == 2 and proc.stdout == "" and message in proc.stderr, proc.stderr


def test_missing_bundle_and_help(host, tmp_path):
    proc = host.run(tmp_path / "nope", "--prompt-ids", "1", check=False)
    assert proc.returncode == 2 and "bundle folder not found" in proc.stderr
    text = host.run("--help").stdout
    for option in ("--prompt", "--prompt-ids", "--prompts-file", "--max-new-tokens", "--temperature", "--top-p",
                   "--top-k", "--seed", "--num-draft-tokens", "--no-draft", "--max-batch", "--ignore-eos", "--stop",
                   "--threads", "--backend", "--provider", "--engines", "--skip-sha256", "--json", "--trace",
                   "--scheduler", "--threshold", "--lookup", "--block-schedule"):
        assert option in text


def test_c_api_reports_errors_and_stays_usable(host, qwen3_bundle):
    lib = host.lib
    assert not lib.dspark_open(None, None) and "NULL" in host.error()
    engine = lib.dspark_open(str(qwen3_bundle).encode(), None)
    assert engine, host.error()
    try:
        assert c_generate(host, engine, [[3] * 300], [4]) is None
        assert "max context is 256" in host.error()
        assert c_generate(host, engine, [[]], [4]) is None and "prompt is empty" in host.error()
        assert lib.dspark_encode(engine, None, None, 0) == -1 and "NULL" in host.error()
        assert lib.dspark_results_json(None, 0) is None and "NULL" in host.error()
        # the engine still works after refusing requests
        got = c_generate(host, engine, [PROMPTS[0]], [5])
        assert got[0]["tokens"] == Generator(qwen3_bundle).generate([Request(PROMPTS[0], 5, ignore_eos=True)])[0].generated
    finally:
        lib.dspark_close(engine)
