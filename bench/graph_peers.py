"""Our target graph against onnxruntime-genai's graph for the same checkpoint, side by side in one process.

For each pair (ours, theirs) at one precision it measures:
- T(n): one graph call appending n tokens (n = 1, 2, 4, 8, 16) to a --context-token cache, median of --repeats.
  Calls run back to back in blocks per (graph, n), as decoding runs them (a call right after the other graph's
  would first reload its weights into the CPU caches); the blocks alternate between the graphs over --sweeps
  sweeps, in reversed order every other sweep. Besides each graph's median, the ratio ours / theirs is taken per
  sweep from adjacent blocks (seconds apart) and its median and quartiles reported: this machine's speed drifts
  by +-20% from minute to minute, which the paired ratio cancels and separate medians do not.
  Ours runs through dspark's own runner and cache (in-place KV, nothing committed, so the context stays put);
  theirs is their model.onnx in an ONNX Runtime session with the same options, past K/V bound once.
- plain decode tokens/s: ``dspark``'s Generator (no draft) and onnxruntime-genai's own generate loop on the same
  chat prompt, --new-tokens greedy tokens; decode rate = (tokens - 1) / (time of the last - time of the first).
- host time per plain step: decode time per token minus the graph's own T(1) timed back to back in the same
  process (what each loop adds around its graph). Each decode run is a fresh process.
- with --ops, an ONNX Runtime profile of one T(1) call of each graph: ms per op type per step.

    python bench/graph_peers.py --pair fp32 BUNDLE GENAI_DIR --pair int4 BUNDLE GENAI_DIR [--output report.json]

Build the peer graphs with onnxruntime-genai's builder from the same Hugging Face folder:
    python -m onnxruntime_genai.models.builder -i FOLDER -o OUT -p fp32|int4 -e cpu
Run it on a quiet machine: two cores make any figure taken beside another job false.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dspark.bundle import SLOTS_PAST_CALL, Bundle
from dspark.runtime.decoder import decoder_cache, run_decoder
from dspark.runtime.generate import Generator, Request

WIDTHS = (1, 2, 4, 8, 16)
PROMPT = "<|im_start|>user\nWrite a Python function that checks whether a string is a palindrome.<|im_end|>\n<|im_start|>assistant\n"


def session(path: Path, threads: int, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Ours:
    def __init__(self, bundle_dir: Path, threads: int, context: int):
        self.generator = Generator(bundle_dir, use_draft=False, threads=threads)
        bundle = self.generator.bundle
        self.cache = decoder_cache(bundle.target.config, 1, bundle)
        self.cache.reserve(context + max(WIDTHS), context + max(WIDTHS) + SLOTS_PAST_CALL)
        self.cache.lens[:] = context
        self.vocab = bundle.target.config.vocab_size
        self.file = bundle.file(bundle.graph("target").file)

    def call(self, n: int) -> None:
        run_decoder(self.generator.target, self.cache, [[7] * n])  # nothing committed: the context stays


class Theirs:
    """onnxruntime-genai's decoder graph called directly, the way its runtime calls it on CPU
    (``past_present_share_buffer``): each layer's past and present bound to one buffer, updated in place."""

    def __init__(self, folder: Path, threads: int, context: int, profile: bool = False):
        genai = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.file = folder / genai["filename"]
        self.session = session(self.file, threads, profile)
        self.layers, self.heads, self.dim = genai["num_hidden_layers"], genai["num_key_value_heads"], genai["head_size"]
        self.context = context
        self.names = genai["inputs"]
        self.binding = self.session.io_binding()
        rng = np.random.default_rng(0)
        capacity = context + max(WIDTHS)
        self.past = [rng.standard_normal((1, self.heads, capacity, self.dim)).astype(np.float32)
                     for _ in range(2 * self.layers)]
        outputs = genai["outputs"]
        for layer in range(self.layers):
            for i, kind in ((2 * layer, "key"), (2 * layer + 1, "value")):
                buffer = self.past[i]
                self.binding.bind_input(self.names[f"past_{kind}_names"] % layer, "cpu", 0, np.float32, buffer.shape,
                                        buffer.ctypes.data)
                self.binding.bind_output(outputs[f"present_{kind}_names"] % layer, "cpu", 0, np.float32, buffer.shape,
                                         buffer.ctypes.data)
        self.has_positions = "position_ids" in {i.name for i in self.session.get_inputs()}

    def call(self, n: int) -> None:
        total = self.context + n
        self.binding.bind_cpu_input("input_ids", np.full((1, n), 7, dtype=np.int64))
        self.binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        if self.has_positions:
            self.binding.bind_cpu_input("position_ids", np.arange(self.context, total, dtype=np.int64)[None])
        self.binding.bind_output("logits", "cpu")  # ONNX Runtime allocates it (its shape changes with n)
        self.session.run_with_iobinding(self.binding)


def step_costs(ours: Ours, theirs: Theirs, repeats: int, sweeps: int) -> tuple[dict, dict]:
    """Median T(n) per graph, and per n the paired ratio ours / theirs: for every sweep, the median of our block over
    the median of their adjacent block (seconds apart, so the machine's drift from minute to minute cancels), then the
    median and quartiles of those ratios over the sweeps."""
    times = {(who, n): [] for who in ("ours", "theirs") for n in WIDTHS}
    ratios = {n: [] for n in WIDTHS}
    blocks = [(who, runner, n) for n in WIDTHS for who, runner in (("ours", ours), ("theirs", theirs))]
    for sweep in range(sweeps):
        block_median = {}
        for who, runner, n in blocks[:: 1 if sweep % 2 == 0 else -1]:
            for _ in range(3):  # warm-up: this graph's weights back in the caches
                runner.call(n)
            block = []
            for _ in range(max(1, repeats // sweeps)):
                t = time.perf_counter()
                runner.call(n)
                block.append(time.perf_counter() - t)
            times[(who, n)] += block
            block_median[(who, n)] = statistics.median(block)
        for n in WIDTHS:
            ratios[n].append(block_median[("ours", n)] / block_median[("theirs", n)])
    medians = {who: {n: 1000 * statistics.median(times[(who, n)]) for n in WIDTHS} for who in ("ours", "theirs")}
    paired = {n: {"median": statistics.median(r), "quartiles": statistics.quantiles(r, n=4)[::2]}
              for n, r in ratios.items()}
    return medians, paired


def our_decode(ours: Ours, prompt_ids: list[int], tokens: int) -> float:
    """(tokens - 1) / (time for tokens - time for 1): the prompt's prefill and first token cancel out."""
    def timed(n: int) -> float:
        t = time.perf_counter()
        ours.generator.generate([Request(prompt_ids, max_new_tokens=n, ignore_eos=True)])
        return time.perf_counter() - t

    return (tokens - 1) / (timed(tokens) - timed(1))


def decode_in_subprocess(who: str, path: Path, bundle_dir: Path, args) -> dict:
    command = [sys.executable, __file__, "--decode-one", who, str(path), str(bundle_dir), "--new-tokens",
               str(args.new_tokens), "--threads", str(args.threads), "--context", str(args.context)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def decode_one(who: str, path: Path, bundle_dir: Path, tokens: int, threads: int, context: int) -> dict:
    """One system's plain decode rate in this (fresh) process, after a warm-up run, and the host time per step:
    ms per decoded token minus the median of back-to-back T(1) calls at the run's mean context."""
    from dspark.runtime.tokenizer import Tokenizer

    prompt_ids = Tokenizer(Bundle.open(bundle_dir, verify=False)).encode(PROMPT)
    context = len(prompt_ids) + tokens // 2
    if who == "theirs":
        import onnxruntime_genai as og

        model = og.Model(str(path))
        their_decode(model, prompt_ids, 8)
        rate = their_decode(model, prompt_ids, tokens)
        del model
        system = Theirs(path, threads, context)
    else:
        system = Ours(path, threads, context)
        our_decode(system, prompt_ids, 8)
        rate = our_decode(system, prompt_ids, tokens)
    times = []
    for _ in range(30):
        started = time.perf_counter()
        system.call(1)
        times.append(time.perf_counter() - started)
    t1 = 1000 * statistics.median(times[5:])
    return {"tok_s": rate, "t1_back_to_back_ms": t1, "host_ms": 1000 / rate - t1}


def their_perplexity(theirs: Theirs, ids: list[int]) -> float:
    """Their graph on the held-out text our export scores itself on (one call, empty past)."""
    from dspark.export.quality import nll

    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for layer in range(theirs.layers):
        for names in ("past_key_names", "past_value_names"):
            feeds[theirs.names[names] % layer] = np.zeros((1, theirs.heads, 0, theirs.dim), np.float32)
    logits = theirs.session.run(["logits"], feeds)[0][0]
    return float(np.exp(nll(logits[:-1], np.array(ids[1:])) / (len(ids) - 1)))


def their_decode(model, prompt_ids: list[int], tokens: int) -> float:
    """onnxruntime-genai's own greedy loop on ``model`` (an ``og.Model``): tokens per second after the first."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + tokens, do_sample=False, min_length=len(prompt_ids) + tokens)
    generator = og.Generator(model, params)
    generator.append_tokens([prompt_ids])
    stamps = []
    while not generator.is_done():
        generator.generate_next_token()
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def profile_ops(make_session, feed_call, calls: int = 20) -> dict:
    sess = make_session()
    for _ in range(calls):
        feed_call(sess)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"].get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + event["dur"] / 1000 / calls
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", nargs=3, action="append", metavar=("LABEL", "BUNDLE", "GENAI_DIR"),
                        help="a precision label, our bundle and onnxruntime-genai's model folder for the same checkpoint")
    parser.add_argument("--context", type=int, default=128, help="cache length for the T(n) calls")
    parser.add_argument("--repeats", type=int, default=60, help="timed calls per width and graph (median kept)")
    parser.add_argument("--sweeps", type=int, default=12,
                        help="blocks the T(n) calls are split into, alternating between the graphs (a paired ratio "
                             "per sweep)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens per decode run")
    parser.add_argument("--decode-runs", type=int, default=3, help="decode runs per system (median kept)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="ONNX Runtime intra-op threads")
    parser.add_argument("--ops", action="store_true", help="add an ONNX Runtime op-type profile of each graph's T(1)")
    parser.add_argument("--output", type=Path, help="write the report as JSON here")
    parser.add_argument("--decode-one", nargs=3, metavar=("WHO", "PATH", "BUNDLE"), help=argparse.SUPPRESS)
    if "--decode-one" in sys.argv:  # a child process timing one decode run (see decode_in_subprocess)
        args, _ = parser.parse_known_args()
        who, path, bundle = args.decode_one
        print(json.dumps(decode_one(who, Path(path), Path(bundle), args.new_tokens, args.threads, args.context)))
        return
    args = parser.parse_args()
    if not args.pair:
        parser.error("give at least one --pair LABEL BUNDLE GENAI_DIR")

    import onnxruntime_genai as og

    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "threads": args.threads, "onnxruntime": ort.__version__, "onnxruntime_genai": og.__version__},
              "context": args.context, "pairs": {}}
    for label, bundle_dir, genai_dir in args.pair:
        bundle_dir, genai_dir = Path(bundle_dir), Path(genai_dir)
        ours, theirs = Ours(bundle_dir, args.threads, args.context), Theirs(genai_dir, args.threads, args.context)
        costs, paired = step_costs(ours, theirs, args.repeats, args.sweeps)
        # each decode run in a process of its own, so no other session's threads or caches are around
        decode = {"ours": [], "theirs": []}
        for run in range(args.decode_runs):
            for who in (("ours", "theirs") if run % 2 else ("theirs", "ours")):
                decode[who].append(decode_in_subprocess(who, bundle_dir if who == "ours" else genai_dir, bundle_dir, args))
        rates = {who: statistics.median(r["tok_s"] for r in runs) for who, runs in decode.items()}
        back_to_back = {who: statistics.median(r["t1_back_to_back_ms"] for r in runs) for who, runs in decode.items()}
        host = {who: statistics.median(r["host_ms"] for r in runs) for who, runs in decode.items()}
        from dspark.export.quality import heldout_text

        quality = ours.generator.bundle.read_json("quality.json")
        heldout = ours.generator.tokenizer.encode(heldout_text()[0])[: quality["tokens"] if quality else 1024]
        entry = {
            "perplexity": {"ours": quality["perplexity"] if quality else None,
                           "theirs": their_perplexity(theirs, heldout)},
            "t_ms": costs,
            "t_ratio": {who: {n: costs[who][n] / costs[who][1] for n in WIDTHS} for who in costs},
            "t_ours_over_theirs_paired": paired,
            "decode_tok_s": rates,
            "t1_back_to_back_ms": back_to_back,
            "host_ms_per_plain_step": host,
        }
        if args.ops:
            entry["ops_ms_per_call"] = {
                "ours": profile_ops(lambda: _profiled_ours(bundle_dir, args.threads), lambda s: _call_ours(s, bundle_dir, args.context)),
                "theirs": profile_ops(lambda: session(theirs.file, args.threads, profile=True),
                                      lambda s: _call_theirs(s, theirs)),
            }
        report["pairs"][label] = entry
        del ours, theirs
        print_pair(label, entry)
    if args.output:
        args.output.write_text(json.dumps(report, indent=2))


def _profiled_ours(bundle_dir: Path, threads: int) -> ort.InferenceSession:
    bundle = Bundle.open(bundle_dir, verify=False)
    return session(bundle.file(bundle.graph("target").file), threads, profile=True)


def _call_ours(sess: ort.InferenceSession, bundle_dir: Path, context: int) -> None:
    """One T(1) call of our graph in either flavour, with plain session.run feeds."""
    c = Bundle.open(bundle_dir, verify=False).target.config
    kv = (1, c.num_kv_heads, context + 1 + SLOTS_PAST_CALL, c.head_dim)  # the new token, and the slots past it
    feeds = {"input_ids": np.full((1, 1), 7, np.int64)}
    names = {i.name for i in sess.get_inputs()}
    if "query_lens" in names:  # ort flavour: in-place buffers per layer
        feeds.update(cache_lens=np.array([context], np.int32), query_lens=np.array([1], np.int32),
                     logit_index=np.zeros((1, 1), np.int64))
        feeds.update({n: np.zeros(kv, np.float32) for n in names if n.startswith("past_")})
    else:  # standard flavour: the cache window for every layer
        window = (c["num_layers"], 1, c["num_kv_heads"], context, c["head_dim"])
        feeds.update(position_ids=np.array([[context]]), cache_lens=np.array([context]),
                     past_k=np.zeros(window, np.float32), past_v=np.zeros(window, np.float32))
    sess.run(None, feeds)


def _call_theirs(sess: ort.InferenceSession, theirs: Theirs) -> None:
    feeds = {"input_ids": np.full((1, 1), 7, np.int64), "attention_mask": np.ones((1, theirs.context + 1), np.int64)}
    for layer in range(theirs.layers):
        for i, names in ((2 * layer, "past_key_names"), (2 * layer + 1, "past_value_names")):
            feeds[theirs.names[names] % layer] = np.ascontiguousarray(theirs.past[i][:, :, : theirs.context])
    sess.run(["logits"], feeds)


def print_pair(label: str, entry: dict) -> None:
    print(f"\n{label}: T(n) ms at the given context (ratio to T(1))")
    print("  n     " + "".join(f"{n:>16d}" for n in WIDTHS))
    for who in ("ours", "theirs"):
        cells = "".join(f"{entry['t_ms'][who][n]:9.2f} ({entry['t_ratio'][who][n]:4.2f})" for n in WIDTHS)
        print(f"  {who:6s}{cells}")
    paired = entry["t_ours_over_theirs_paired"]
    print("  ours/theirs, paired by sweep: median [quartiles] " + ", ".join(
        f"n={n}: {paired[n]['median']:.3f} [{paired[n]['quartiles'][0]:.3f}, {paired[n]['quartiles'][1]:.3f}]"
        for n in WIDTHS))
    print(f"  held-out perplexity: ours {entry['perplexity']['ours']} (fp32 is the unquantized model), "
          f"theirs {entry['perplexity']['theirs']:.4f}")
    rates = entry["decode_tok_s"]
    print(f"  plain decode tok/s: ours {rates['ours']:.1f}, theirs {rates['theirs']:.1f} "
          f"({rates['ours'] / rates['theirs']:.2f}x)")
    for who in ("ours", "theirs"):
        print(f"  {who}: T(1) back to back {entry['t1_back_to_back_ms'][who]:.2f} ms, decode "
              f"{1000 / rates[who]:.2f} ms/token, host per plain step {entry['host_ms_per_plain_step'][who]:.2f} ms")
    for who, ops in entry.get("ops_ms_per_call", {}).items():
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(ops.items())[:8])
        print(f"  ops {who}: {sum(ops.values()):.2f} ms/call: {top}")


if __name__ == "__main__":
    main()
