"""One script for a GPU machine: build engines (or reuse them), check parity, capture CUDA graphs, assert greedy
equivalence, and time plain vs speculative decoding on every backend, with and without graphs. Steps that need
what this machine lacks (TensorRT, a CUDA GPU) are skipped with the reason, so it also runs, partially, on a
CPU-only machine.

    python bench/gpu_check.py BUNDLE [--max-new-tokens 64] [--repeats 3] [--json gpu_check.json] [--rebuild]

Every step runs whatever happened before it (a failing step is recorded with its traceback and the next one
starts); the JSON file is rewritten after every step, so it exists even when the run is cut short. Engines
already built for this GPU and TensorRT version are reused, and builds share the timing cache kept beside them.
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


class Steps:
    """Runs named steps, each isolated from the others' failures, and keeps the JSON report current."""

    def __init__(self, json_path: str):
        self.json_path = json_path
        self.results: list[dict] = []
        self.timings: dict[str, dict] = {}
        self.failed = False

    def run(self, name: str, fn, skip: str = ""):
        if skip:
            print(f"[skip] {name}: {skip}", flush=True)
            self.results.append({"step": name, "status": "skip", "reason": skip})
            self.write()
            return None
        print(f"[run ] {name}", flush=True)
        started = time.perf_counter()
        try:
            value, status = fn(), "pass"
        except Exception as e:  # noqa: BLE001 - one broken step must not cost the rest of a paid GPU session
            traceback.print_exc()
            value, status = f"{type(e).__name__}: {e}", "FAIL"
            self.failed = True
        if torch.cuda.is_available():  # what a failed step left cached must not starve the next one
            torch.cuda.empty_cache()
        self.results.append({"step": name, "status": status, "seconds": round(time.perf_counter() - started, 2),
                             "result": value})
        print(f"[{status}] {name}: {value}", flush=True)
        self.write()
        return value

    def write(self) -> None:
        timings = {k: {m: v for m, v in t.items() if m != "tokens"} for k, t in self.timings.items()}
        with open(self.json_path, "w") as f:
            json.dump({"steps": self.results, "timings": timings, "failed": self.failed}, f, indent=2, default=str)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="bundle folder (from 'dspark export'; --runtime tensorrt for the TensorRT steps)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt in equivalence and timing runs")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (median reported)")
    parser.add_argument("--workspace", type=float, default=8.0, help="TensorRT builder workspace, GB")
    parser.add_argument("--rebuild", action="store_true", help="build engines even when usable ones exist")
    parser.add_argument("--json", dest="json_path", default="gpu_check.json",
                        help="results as JSON, rewritten after every step (default: %(default)s)")
    args = parser.parse_args()

    steps = Steps(args.json_path)
    opened = []
    steps.run("open bundle", lambda: opened.append(Bundle.open(args.bundle)) or str(args.bundle))
    if not opened:
        return 1
    bundle = opened[0]
    cuda = torch.cuda.is_available()
    gpu_reason = "" if cuda else "no CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import tensorrt  # noqa: F401

        trt_reason = "" if cuda else "TensorRT is installed but no CUDA GPU is visible"
    except ImportError:
        trt_reason = "TensorRT is not installed (pip install 'dspark[gpu]')"
    if not trt_reason and any(g.fused for g in bundle.graphs.values()):
        trt_reason = "the bundle has the ONNX Runtime graph flavour; export it with --runtime tensorrt for TensorRT"
    block = bundle.draft is not None and bundle.draft.block

    def build():
        from dspark.export.tensorrt import build_engines
        from dspark.runtime.trt import BUILD_INFO, usable_engine_dir

        folder, _ = usable_engine_dir(bundle)
        if folder is not None and not args.rebuild:
            built = json.loads((folder / BUILD_INFO).read_text())["engines"]
            missing = [g for g in bundle.graphs if g not in built or not (folder / built[g]["file"]).is_file()]
            if not missing:
                return f"reused {folder}"
            return f"built {', '.join(missing)} into " + str(build_engines(bundle.path, workspace_gb=args.workspace,
                                                                         graphs=missing))
        return f"built {build_engines(bundle.path, workspace_gb=args.workspace)}"

    def check():
        from dspark.check import check_bundle

        report = check_bundle(bundle.path, engines=not trt_reason, max_new_tokens=min(args.max_new_tokens, 32))
        print(report.table())
        assert report.ok, "dspark check failed"
        return f"{len(report.rows)} rows"

    steps.run("tensorrt build (or reuse)", build, trt_reason)
    steps.run("dspark check (torch / onnxruntime / tensorrt parity, greedy equivalence, lint)", check)

    want = []

    def ort_greedy():
        want.extend(s.generated for s in Generator(bundle).generate(requests(args.max_new_tokens)))
        return f"{sum(map(len, want))} tokens"

    steps.run("ONNX Runtime greedy (the reference)", ort_greedy)

    def torch_cuda(**options) -> Generator:
        # the Generator's choice: the device step for DSpark/DFlash bundles and plain decoding, else the host loop
        return Generator(bundle, backend="torch", device="cuda", **options)

    def torch_cuda_equivalence():
        for graphs in (False, True):
            got = [s.generated for s in torch_cuda(cuda_graphs=graphs).generate(requests(args.max_new_tokens))]
            assert got == want, f"the torch backend on CUDA (graphs={graphs}) differs from ONNX Runtime greedy"
        if not block:
            return "identical (host loop)"
        generator = torch_cuda(cuda_graphs=True)
        generator.generate(requests(args.max_new_tokens))
        graphs = generator.device_step.graphs
        assert graphs.captured() == len(graphs.graphs), "some CUDA-graph captures fell back to eager"
        return {"graphs_captured": graphs.captured(), "budget": generator.device_step.budget}

    steps.run("torch backend (cuda) greedy == ONNX Runtime greedy, graphs captured", torch_cuda_equivalence,
              gpu_reason or ("" if want else "no reference tokens"))

    def time_config(label, make):
        def run():
            rate, tokens, tau = timed(make, args.max_new_tokens, args.repeats)
            steps.timings[label] = {"tokens_per_s": round(rate, 1), "mean_accepted_length": tau, "tokens": tokens}
            return f"{rate:.1f} tok/s" + (f", tau {tau:.2f}" if tau else "")
        return run

    no_draft = "" if bundle.draft else "no draft in the bundle"
    configs = [("ort plain", lambda: Generator(bundle, use_draft=False), ""),
               ("ort speculative", lambda: Generator(bundle), no_draft)]
    for graphs in (False, True):
        tag = "graphs" if graphs else "eager"
        configs += [(f"torch-cuda plain {tag}", lambda g=graphs: torch_cuda(use_draft=False, cuda_graphs=g), gpu_reason),
                    (f"torch-cuda speculative {tag}", lambda g=graphs: torch_cuda(cuda_graphs=g), gpu_reason or no_draft),
                    (f"tensorrt plain {tag}", lambda g=graphs: Generator(bundle, backend="trt", device="cuda",
                                                                          use_draft=False, cuda_graphs=g), trt_reason),
                    (f"tensorrt speculative {tag}", lambda g=graphs: Generator(bundle, backend="trt", device="cuda",
                                                                                cuda_graphs=g), trt_reason or no_draft)]
    for label, make, skip in configs:
        steps.run(f"time {label}", time_config(label, make), skip)

    def speculative_tokens_equal_plain():
        compared = 0
        for label, spec in steps.timings.items():
            plain = steps.timings.get(label.replace("speculative", "plain"))
            if "speculative" in label and plain:
                assert plain["tokens"] == spec["tokens"], f"{label}: speculative differs from plain greedy"
                compared += 1
        return f"{compared} speculative runs emitted their plain run's tokens"

    steps.run("greedy speculative == plain in every timed backend", speculative_tokens_equal_plain)
    print("\n" + "configuration".ljust(36) + "tok/s".rjust(10) + "   tau")
    for label, t in steps.timings.items():
        print(label.ljust(36) + f"{t['tokens_per_s']:10.1f}" + (f"   {t['mean_accepted_length']:.2f}" if t["mean_accepted_length"] else ""))
    print(f"results: {args.json_path}")
    print("FAIL" if steps.failed else "OK")
    return 1 if steps.failed else 0


if __name__ == "__main__":
    sys.exit(main())
