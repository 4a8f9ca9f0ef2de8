"""Peer: onnxruntime-genai's own greedy generate loop, on a model its builder made from the same checkpoint.

Build the peer model from the Hugging Face folder the bundle's target was exported from (``models.target.source``;
for a GGUF source, the fp32 folder ``dspark fetch`` wrote beside it):

    pip install onnxruntime-genai onnx_ir onnxscript
    python -m onnxruntime_genai.models.builder -i HF_FOLDER -o OUT -p fp32|int4 -e cpu

Times, one request at a time, greedy, the same prompt ids ``dspark bench`` feeds: ``append_tokens(prompt)`` then
``generate_next_token`` until exactly N new tokens (``min_length`` holds end-of-sequence back, as ``dspark bench``
ignores it). tokens/s = all new tokens / total time from the prompt's append to the last token (prefill
included, as ``dspark bench`` counts), median over repeats after one warm-up pass. The session runs on
``threads`` intra-op threads (0: ONNX Runtime's default).

    python bench/peers/ort_genai.py BUNDLE GENAI_MODEL [--max-new-tokens 64] [--prompts FILE] [--repeats 3]
    python bench/peers/ort_genai.py BUNDLE GENAI_MODEL --interleaved [...]

``--interleaved`` times dspark's decoding of BUNDLE (plain, or any of ``--method plain|lookup|draft|draft+lookup``)
and onnxruntime-genai in one process, prompt by prompt, the order rotated every prompt: on a machine whose speed
drifts from minute to minute (a shared VM's two cores swung 20% between back-to-back runs here), only a comparison
whose halves run moments apart means anything.
dspark's sessions then keep threads of their own (onnxruntime-genai made the process's ONNX Runtime environment).

``dspark bench --peers --genai-model GENAI_MODEL`` calls ``run_peer_isolated`` and puts the numbers beside its own:
the peer runs in a process of its own, because onnxruntime-genai creates ONNX Runtime's process-wide environment
its own way, and after that no session that shares a global thread pool (dspark's, the C++ host's) can be made
in the process.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def load_model(model_dir: Path, threads: int):
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(config)


def generate(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy: exactly ``max_new_tokens`` new tokens and, for each, the seconds from the start until it was there
    (prompt append included)."""
    import onnxruntime_genai as og

    total = len(prompt_ids) + max_new_tokens
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    start = time.perf_counter()
    generator = og.Generator(model, params)
    generator.append_tokens([prompt_ids])
    new, times = [], []
    while not generator.is_done():
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
        times.append(time.perf_counter() - start)
    return new, times


def run_peer(model_dir, prompt_ids: list[list[int]], max_new_tokens: int, threads: int = 0, repeats: int = 3,
             warmup: int = 1, log=print) -> dict:
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        return skipped(f"onnxruntime-genai is not installed ({e}); pip install onnxruntime-genai")
    model_dir = Path(model_dir)
    if not (model_dir / "genai_config.json").is_file():
        return skipped(f"{model_dir} has no genai_config.json: build it with python -m "
                       "onnxruntime_genai.models.builder -i HF_FOLDER -o OUT -p fp32|int4 -e cpu")
    model = load_model(model_dir, threads)
    rates, outputs = [], []
    for p in range(warmup + repeats):
        tokens = seconds = 0.0
        outputs = []
        for ids in prompt_ids:
            new, times = generate(model, ids, max_new_tokens)
            tokens, seconds = tokens + len(new), seconds + times[-1]
            outputs.append(new)
        if p >= warmup:
            rates.append(tokens / seconds)
    config = json.loads((model_dir / "genai_config.json").read_text())
    return {
        "status": "ok",
        "engine": "onnxruntime-genai",
        "version": og.__version__,
        "model": str(model_dir),
        "decoder": config["model"]["decoder"]["filename"],
        "threads": threads,
        "concurrency": 1,
        "requests": len(prompt_ids),
        "max_new_tokens": max_new_tokens,
        "plain_tokens_per_second": statistics.median(rates),
        "plain_tokens_per_second_runs": rates,
        "generated_token_ids": outputs,
    }


DSPARK_METHODS = ("plain", "lookup", "draft", "draft+lookup")


def dspark_run(bundle_dir, method: str, threads: int, scheduler: str, lookup: int):
    """A function (prompt ids, n) -> (new tokens, each one's seconds from the start) decoding with ``method``: plain,
    lookup (prompt lookup alone), draft (the bundle's drafter) or draft+lookup."""
    from dspark.runtime.generate import Generator, Request

    if method not in DSPARK_METHODS:
        raise SystemExit(f"--method {method!r}: choose from {', '.join(DSPARK_METHODS)}")
    draft = method.startswith("draft")
    generator = Generator(bundle_dir, threads=threads, use_draft=draft, lookup=lookup if "lookup" in method else 0,
                          scheduler=scheduler if method != "plain" else "fixed")
    if draft and generator.bundle.draft is None:
        raise SystemExit(f"--method {method}: {bundle_dir} has no draft")

    def run(ids, n):
        start, times, seen = time.perf_counter(), [], 0
        seq = generator.submit(Request(ids, max_new_tokens=n, ignore_eos=True))
        while generator.has_work():
            generator.step()
            now = time.perf_counter() - start
            times += [now] * (len(seq.generated) - seen)  # a round's tokens share its time
            seen = len(seq.generated)
        return seq.generated, times

    return run


def run_interleaved(bundle_dir, model_dir, prompt_ids: list[list[int]], max_new_tokens: int, threads: int = 0,
                    repeats: int = 3, warmup: int = 1, methods=("plain",), scheduler: str = "fixed",
                    lookup: int = 2) -> dict:
    """dspark (each of ``methods``) and onnxruntime-genai taking turns request by request in this process, the order
    rotated every request: tokens/s of each (all new tokens / all seconds, prefill included), each dspark method's
    ratio to onnxruntime-genai, per-step medians, and whether every method wrote the same greedy tokens."""
    model = load_model(Path(model_dir), threads)
    runs = {f"dspark {m}": dspark_run(bundle_dir, m, threads, scheduler, lookup) for m in methods}
    runs["onnxruntime-genai"] = lambda ids, n: generate(model, ids, n)
    names = list(runs)
    totals = {name: [0, 0.0, [], []] for name in runs}  # tokens, seconds, first-token ms, gap ms
    outputs = {name: [] for name in runs}
    for p in range(warmup + repeats):
        for i, ids in enumerate(prompt_ids):
            turn = (i + p) % len(names)
            for name in names[turn:] + names[:turn]:
                tokens, times = runs[name](ids, max_new_tokens)
                if p == 0:
                    outputs[name].append(tokens)
                if p >= warmup:
                    t = totals[name]
                    t[0] += len(tokens)
                    t[1] += times[-1]
                    t[2].append(1000 * times[0])
                    t[3] += [1000 * (b - a) for a, b in zip(times, times[1:])]
    report = {name: {"tokens_per_second": t[0] / t[1], "first_token_ms_mean": statistics.mean(t[2]),
                     "gap_ms_median": statistics.median(t[3])} for name, t in totals.items()}
    genai = report["onnxruntime-genai"]["tokens_per_second"]
    for name in names[:-1]:
        report[name]["over_genai"] = report[name]["tokens_per_second"] / genai
        theirs = outputs["onnxruntime-genai"]
        report[name]["outputs_equal_to_genai"] = sum(a == b for a, b in zip(outputs[name], theirs))
    plain = outputs.get("dspark plain")
    lossless = None if plain is None else all(outputs[n] == plain for n in runs if n.startswith("dspark"))
    return {"bundle": str(bundle_dir), "model": str(model_dir), "requests": len(prompt_ids),
            "max_new_tokens": max_new_tokens, "threads": threads, "repeats": repeats, "scheduler": scheduler,
            "lookup": lookup, "dspark_methods_equal_plain": lossless, **report}


def run_peer_isolated(model_dir, prompt_ids: list[list[int]], max_new_tokens: int, threads: int = 0,
                      repeats: int = 3, warmup: int = 1, log=print) -> dict:
    """``run_peer`` in a fresh Python process (see the module docstring for why)."""
    with tempfile.TemporaryDirectory() as tmp:
        request = Path(tmp) / "request.json"
        request.write_text(json.dumps({"model_dir": str(model_dir), "prompt_ids": prompt_ids,
                                       "max_new_tokens": max_new_tokens, "threads": threads, "repeats": repeats,
                                       "warmup": warmup}))
        done = subprocess.run([sys.executable, __file__, "--request", str(request)], capture_output=True, text=True)
    if done.returncode != 0:
        return {"status": "failed", "reason": f"the onnxruntime-genai process exited with {done.returncode}: "
                                              f"{done.stderr[-800:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--request":  # run_peer_isolated's child
        print(json.dumps(run_peer(**json.loads(Path(sys.argv[2]).read_text()), log=lambda _: None)))
        return

    import argparse

    from dspark.bench import peer_prompt_ids, peer_script_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="the dspark bundle whose tokenizer encodes the prompts")
    parser.add_argument("model", help="the onnxruntime-genai model folder")
    peer_script_arguments(parser)
    parser.add_argument("--interleaved", action="store_true",
                        help="time dspark's decoding of BUNDLE taking turns with onnxruntime-genai in one process")
    parser.add_argument("--method", action="append", choices=DSPARK_METHODS,
                        help="--interleaved: a dspark method to time (repeatable; default plain)")
    parser.add_argument("--scheduler", default="fixed", help="--interleaved: the speculative methods' scheduler")
    parser.add_argument("--lookup", type=int, default=2, help="--interleaved: prompt lookup's minimum match")
    args = parser.parse_args()
    ids = peer_prompt_ids(args.bundle, args.prompts, args.num_prompts)
    if args.interleaved:
        print(json.dumps(run_interleaved(args.bundle, args.model, ids, args.max_new_tokens, args.threads,
                                         args.repeats, methods=args.method or ["plain"], scheduler=args.scheduler,
                                         lookup=args.lookup), indent=2))
        return
    report = run_peer(args.model, ids, args.max_new_tokens, args.threads, args.repeats)
    report.pop("generated_token_ids", None)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
