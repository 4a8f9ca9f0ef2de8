"""Time two bundles' drafter graphs against each other: draft_propose and draft_context of bundle A and bundle B,
alone (no target beside them), called in turn so machine drift hits both alike; medians and the ratio B / A.

    python bench/draft_graphs_ab.py BUNDLE_A BUNDLE_B [--calls 600] [--context 150] [--batch 1]

The feeds are what a greedy round at one request sends (random context K/V of the drafter's shape, a block
anchored at ``--context``); the thread pools do not spin, so neither graph's pool takes the other's cores.
Both bundles must hold a DSpark/DFlash drafter of the same shape (for example the same checkpoint exported in
two graph flavours or two versions of dspark).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort

from dspark.bundle import Bundle


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def feeds(bundle: Bundle, batch: int, context: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    shape = {spec.name: spec.shape for name in ("draft_propose", "draft_context") for spec in bundle.graph(name).inputs}
    layers, _, heads, _, dim = shape["past_k"]
    block, width = shape["noise"][1], shape["features"][2]
    kv = (rng.standard_normal((layers, batch, heads, context + 64, dim)) * 0.5).astype(np.float32)
    return {
        "draft_propose": {"anchor": np.full(batch, 123, np.int64), "start": np.full(batch, context, np.int64),
                          "cache_lens": np.full(batch, context, np.int64), "past_k": kv, "past_v": kv.copy(),
                          "temperature": np.zeros(batch, np.float32), "noise": np.zeros((batch, block), np.float32)},
        "draft_context": {"features": rng.standard_normal((batch, block + 1, width)).astype(np.float32),
                          "positions": np.tile(context + np.arange(block + 1), (batch, 1)).astype(np.int64)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle_a")
    parser.add_argument("bundle_b")
    parser.add_argument("--calls", type=int, default=600, help="timed calls per graph and bundle (the first 100 are warm-up)")
    parser.add_argument("--context", type=int, default=150, help="cached context positions per row")
    parser.add_argument("--batch", type=int, default=1, help="rows per call")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()
    bundles = [Bundle.open(b) for b in (args.bundle_a, args.bundle_b)]
    if any(b.draft is None or not b.draft.block for b in bundles):
        raise SystemExit("both bundles need a DSpark/DFlash drafter")
    for graph, feed in feeds(bundles[0], args.batch, args.context).items():
        sessions = [session(str(b.file(b.graph(graph).file)), args.threads) for b in bundles]
        times = [[], []]
        for i in range(args.calls):
            for k in ((0, 1) if i % 2 else (1, 0)):
                start = time.perf_counter()
                sessions[k].run(None, feed)
                times[k].append(time.perf_counter() - start)
        a, b = (float(np.median(t[100:])) * 1e3 for t in times)
        outs = [s.run(None, feed) for s in sessions]
        same = np.array_equal(outs[0][0], outs[1][0])
        print(f"{graph}: A {a:.3f} ms, B {b:.3f} ms, B/A {b / a:.3f}; first output identical: {same}")


if __name__ == "__main__":
    main()
