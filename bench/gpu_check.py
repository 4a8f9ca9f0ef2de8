"""One script for a GPU machine: build engines, check parity, capture CUDA graphs, assert greedy equivalence,
and time plain vs speculative decoding with and without graphs. Steps that need what this machine lacks
(TensorRT, a CUDA GPU) are skipped with the reason, so it also runs, partially, on a CPU-only machine.

    python bench/gpu_check.py BUNDLE [--max-new-tokens 64] [--repeats 3] [--json out.json]

Exit code 1 when any step that ran failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback

import torch

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.runtime.generate import Generator, Request

PROMPTS = ([5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [3, 4])


def requests(max_new_tokens: int) -> list[Request]:
    return [Request(list(p), max_new_tokens=max_new_tokens, ignore_eos=True) for p in PROMPTS]


def timed(make, max_new_tokens: int, repeats: int) -> tuple[float, list[list[int]], float | None]:
    """Median tokens/s of ``make().generate`` over repeats (after one warm-up), its tokens and mean accepted length."""
    generator = make()
    generator.generate(requests(max_new_tokens))  # warm-up: sessions, kernels, graph capture
    rates, seqs = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        seqs = generator.generate(requests(max_new_tokens))
        rates.append(sum(len(s.generated) for s in seqs) / (time.perf_counter() - start))
    taus = [s.stats()["mean_accepted_length"] for s in seqs if s.stats()["mean_accepted_length"]]
    return statistics.median(rates), [s.generated for s in seqs], (sum(taus) / len(taus) if taus else None)


def trt_generator(bundle: Bundle, use_draft: bool, cuda_graphs: bool) -> Generator:
    """A Generator whose graph runners are TensorRT runners (make_runner does not offer TensorRT yet)."""
    from dspark.runtime.trt import TrtRunner

    generator = Generator(bundle, use_draft=use_draft)
    generator.target = TrtRunner(bundle, "target", cuda_graphs=cuda_graphs)
    proposer = generator.proposer
    for attribute, graph in (("runner", "draft"), ("context", "draft_context"), ("drafter", "draft_propose")):
        if proposer is not None and hasattr(proposer, attribute):
            setattr(proposer, attribute, TrtRunner(bundle, graph, cuda_graphs=cuda_graphs))
    return generator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="bundle folder (from 'dspark export')")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt in equivalence and timing runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (median reported)")
    parser.add_argument("--workspace", type=float, default=8.0, help="TensorRT builder workspace, GB")
    parser.add_argument("--json", dest="json_path", help="also write the results as JSON here")
    args = parser.parse_args()

    bundle = Bundle.open(args.bundle)
    cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        trt_ok = cuda
        trt_reason = "" if cuda else "TensorRT is installed but no CUDA GPU is visible"
    except ImportError:
        trt_ok, trt_reason = False, "TensorRT is not installed (pip install 'dspark[gpu]')"
    gpu_reason = "" if cuda else "no CUDA GPU (torch.cuda.is_available() is False)"
    block = bundle.draft is not None and bundle.draft["method"] in ("dspark", "dflash")
    results, failed = [], False

    def step(name: str, fn, skip: str = ""):
        nonlocal failed
        if skip:
            print(f"[skip] {name}: {skip}", flush=True)
            results.append({"step": name, "status": "skip", "reason": skip})
            return None
        print(f"[run ] {name}", flush=True)
        started = time.perf_counter()
        try:
            value = fn()
            status = "pass"
        except (AssertionError, DsparkError, RuntimeError) as e:
            traceback.print_exc()
            value, status, failed = str(e), "FAIL", True
        results.append({"step": name, "status": status, "seconds": round(time.perf_counter() - started, 2), "result": value})
        print(f"[{status}] {name}: {value}", flush=True)
        return value

    def build():
        from dspark.export.tensorrt import build_engines

        return str(build_engines(bundle.path, workspace_gb=args.workspace))

    def check():
        from dspark.check import check_bundle

        report = check_bundle(bundle.path, engines=trt_ok, max_new_tokens=min(args.max_new_tokens, 32))
        print(report.table())
        assert report.ok, "dspark check failed"
        return f"{len(report.rows)} rows"

    step("tensorrt build", build, trt_reason)
    step("dspark check (torch / onnxruntime / tensorrt parity, greedy equivalence, lint)", check)

    def cuda_equivalence():
        from dspark.runtime.cuda import CudaGenerator

        want = [s.generated for s in Generator(bundle).generate(requests(args.max_new_tokens))]
        for graphs in (False, True):
            got = CudaGenerator(bundle, cuda_graphs=graphs).generate(requests(args.max_new_tokens))
            assert [s.generated for s in got] == want, f"CUDA backend (graphs={graphs}) differs from ONNX Runtime greedy"
        generator = CudaGenerator(bundle, cuda_graphs=True)
        generator.generate(requests(args.max_new_tokens))
        captured = sum(g is not None for g in generator.graphs.values())
        assert captured == len(generator.graphs), "some CUDA-graph captures fell back to eager"
        return {"graphs_captured": captured, "budget": generator.budget}

    step("CUDA backend greedy == ONNX Runtime greedy, graphs captured", cuda_equivalence,
         gpu_reason or ("" if block else "the CUDA backend drafts with DSpark/DFlash drafters only"))

    timings = {}

    def time_config(label, make):
        def run():
            rate, tokens, tau = timed(make, args.max_new_tokens, args.repeats)
            timings[label] = {"tokens_per_s": round(rate, 1), "mean_accepted_length": tau, "tokens": tokens}
            return f"{rate:.1f} tok/s" + (f", tau {tau:.2f}" if tau else "")
        return run

    from dspark.runtime.cuda import CudaGenerator

    configs = [("ort plain", lambda: Generator(bundle, use_draft=False), ""),
               ("ort speculative", lambda: Generator(bundle), "" if bundle.draft else "no draft in the bundle")]
    for graphs in (False, True):
        tag = "graphs" if graphs else "eager"
        configs += [(f"torch-cuda plain {tag}", lambda g=graphs: CudaGenerator(bundle, use_draft=False, cuda_graphs=g), gpu_reason),
                    (f"torch-cuda speculative {tag}", lambda g=graphs: CudaGenerator(bundle, cuda_graphs=g),
                     gpu_reason or ("" if block else "needs a DSpark/DFlash bundle")),
                    (f"tensorrt plain {tag}", lambda g=graphs: trt_generator(bundle, False, g), trt_reason),
                    (f"tensorrt speculative {tag}", lambda g=graphs: trt_generator(bundle, True, g),
                     trt_reason or ("" if bundle.draft else "no draft in the bundle"))]
    for label, make, skip in configs:
        step(f"time {label}", time_config(label, make), skip)

    def speculative_tokens_equal_plain():
        for backend in ("ort", "torch-cuda", "tensorrt"):
            for tag in ("", " eager", " graphs"):
                plain, spec = timings.get(f"{backend} plain{tag}"), timings.get(f"{backend} speculative{tag}")
                if plain and spec:
                    assert plain["tokens"] == spec["tokens"], f"{backend}{tag}: speculative differs from plain greedy"
        return "every timed speculative run emitted the plain run's tokens"

    step("greedy speculative == plain in every timed backend", speculative_tokens_equal_plain)
    print("\n" + "configuration".ljust(36) + "tok/s".rjust(10) + "   tau")
    for label, t in timings.items():
        print(label.ljust(36) + f"{t['tokens_per_s']:10.1f}" + (f"   {t['mean_accepted_length']:.2f}" if t["mean_accepted_length"] else ""))
    if args.json_path:
        for t in timings.values():
            t.pop("tokens")
        with open(args.json_path, "w") as f:
            json.dump({"steps": results, "timings": timings}, f, indent=2, default=str)
    print("FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
