"""``dspark check``: is the bundle faithful to its checkpoints, and is speculative decoding lossless on it?

Three checks, one table:
- accuracy of every graph: the PyTorch modules (rebuilt from the checkpoint folders the manifest records) against
  ONNX Runtime, and against TensorRT where engines for this machine exist, through polygraphy's Comparator on
  feeds with consistent positions and cache lengths, with tolerances per output dtype;
- greedy equivalence: speculative and plain greedy decoding must emit the same tokens; a divergence is reported
  with the target's logit margin (top-1 minus top-2) at that position, which tells a near-tie from a bug;
- the TensorRT readiness lint of every graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dspark.bundle import SLOTS_PAST_CALL, Bundle, GraphSpec
from dspark.export.lint import lint_graph
from dspark.runtime.runners import ort_session
from dspark.runtime.torch_runner import in_place_step, load_module, module_problem

# (atol, rtol) per output dtype: fp32 is round-off only; fp16 carries ~1e-3 relative error per op
TOLERANCES = {"float32": (1e-4, 1e-5), "float16": (2e-2, 1e-2), "bfloat16": (1e-1, 2e-2), "int64": (0, 0), "int32": (0, 0)}
PROMPTS = ([5, 6, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [3])


@dataclass
class Row:
    check: str
    graph: str
    status: str  # pass, FAIL, skip
    detail: str


@dataclass
class CheckReport:
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status != "FAIL" for r in self.rows)

    def add(self, check: str, graph: str, status: str, detail: str) -> None:
        self.rows.append(Row(check, graph, status, detail))

    def table(self) -> str:
        heads = ("check", "graph", "result", "detail")
        cells = [heads] + [(r.check, r.graph, r.status, r.detail) for r in self.rows]
        widths = [max(len(c[i]) for c in cells[:]) for i in range(3)]
        lines = ["  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in cells]
        lines.insert(1, "-" * min(120, max(len(line) for line in lines)))
        lines.append(f"{'PASS' if self.ok else 'FAIL'}: {sum(r.status == 'FAIL' for r in self.rows)} failed, "
                     f"{sum(r.status == 'skip' for r in self.rows)} skipped, {sum(r.status == 'pass' for r in self.rows)} passed")
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------- torch reference
def torch_graphs(bundle: Bundle) -> tuple[dict, dict[str, str]]:
    """{graph name: callable(**feeds) -> tuple of tensors} for every graph, and {graph: why there is none}."""
    fns, skipped = {}, {}
    for role, model in bundle.models.items():
        problem = module_problem(bundle, role)
        module = None if problem else load_module(bundle, role)
        for graph in model.graphs:
            if module is None:
                skipped[graph] = f"{problem}; no PyTorch reference"
            elif graph == "draft_context":
                fns[graph] = module.context_kv
            elif graph == "draft_propose":
                fns[graph] = module.propose
            elif bundle.graph(graph).in_place:
                fns[graph] = present_outputs(module)
            else:
                fns[graph] = lambda m=module, **f: tuple(t for t in m.step(**f) if t is not None)
    return fns, skipped


def present_outputs(model):
    """The ORT flavour's contract (``in_place_step``) as a graph that is not bound in place returns it: K/V
    buffers as present_key.i/present_value.i, with zeros past each row's new length (what ONNX Runtime leaves)."""

    def step(input_ids, cache_lens, query_lens, logit_index, **caches):
        layers = model.config.num_layers
        present = {kind: torch.stack([caches[f"past_{kind}.{i}"] for i in range(layers)]) for kind in ("key", "value")}
        for r, start in enumerate(cache_lens.tolist()):
            for buffer in present.values():
                buffer[:, r, :, start:] = 0
        logits, hidden = in_place_step(model, input_ids, cache_lens, query_lens, logit_index, present["key"],
                                       present["value"])
        out = {"logits": logits, "hidden": hidden}
        for i in range(layers):
            out[f"present_key.{i}"], out[f"present_value.{i}"] = present["key"][i], present["value"][i]
        return out

    return step


def torch_runner(name: str, fn, spec: GraphSpec):
    """A polygraphy runner around a torch callable (polygraphy's PytRunner needs CUDA; cpu-measurements §3)."""
    import time

    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name)

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for i in spec.inputs:
                meta.add(i.name, np.dtype(i.dtype), [d if isinstance(d, int) else -1 for d in i.shape])
            return meta

        def infer_impl(self, feed_dict):
            started = time.perf_counter()
            with torch.no_grad():
                out = fn(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed_dict.items()})
            self.inference_time = time.perf_counter() - started  # polygraphy 0.53: set it, return only the dict
            if isinstance(out, dict):
                return {o.name: out[o.name].numpy() for o in spec.outputs}
            return {o.name: t.numpy() for o, t in zip(spec.outputs, out)}

    return TorchRunner()


# -------------------------------------------------------------------------------------------- feeds
def graph_feeds(bundle: Bundle, name: str, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Feeds at a few (batch, tokens, cache) corners within the manifest ranges, with consistent positions.

    Cache entries past each row's length hold noise, so a masking bug shows as a mismatch.
    """
    spec = bundle.graph(name)
    dims = spec.dims
    rng = np.random.default_rng(seed)
    shapes = {i.name: i.shape for i in spec.inputs}
    dtypes = {i.name: np.dtype(i.dtype) for i in spec.inputs}
    batch_max = dims["batch"][1]
    cache_max = dims.get("cache", [0, 0])[1]
    if "new_tokens" in dims:
        width = dims["new_tokens"][1]
        corners = [(1, min(5, width), 0), (min(3, batch_max), min(bundle.limits.max_verify_tokens, width), min(16, cache_max)),
                   (min(2, batch_max), 1, min(8, cache_max))]
    elif "context" in dims:
        corners = [(1, min(5, dims["context"][1]), 0), (min(3, batch_max), min(2, dims["context"][1]), 0)]
    else:
        corners = [(1, 0, min(6, cache_max)), (min(3, batch_max), 0, min(16, cache_max))]
    # a draft LM reads its own ids (a reduced one has fewer than the target); every other graph reads target ids
    vocab = (bundle.draft.config if name == "draft" else bundle.target.config).vocab_size
    feeds = []
    in_place = spec.in_place
    for b, n, s in corners:
        lens = rng.integers(0, s + 1, size=b)
        lens[0] = s
        # an in-place graph's buffer holds the past, the new tokens and the slots a target graph writes past
        # them; the other flavour reads a window
        sizes = {"batch": b, "new_tokens": n, "context": n, "cache": s + n + SLOTS_PAST_CALL if in_place else s,
                 "logit_rows": n}
        feed = {}
        for input_name, shape in shapes.items():
            shape = tuple(sizes[d] if isinstance(d, str) else d for d in shape)
            kind = dtypes[input_name]
            if input_name in ("input_ids", "anchor"):
                value = rng.integers(0, vocab, size=shape)
            elif input_name in ("position_ids", "positions"):
                value = lens[:, None] + np.arange(shape[1])[None, :]
            elif input_name in ("cache_lens", "start"):
                value = lens.copy()
            elif input_name == "query_lens":
                value = np.full(b, n)
            elif input_name == "logit_index":
                value = rng.integers(0, n, size=shape)
            elif input_name == "temperature":
                value = np.array([0.0, 1.0, 0.7][:b] + [1.0] * max(0, b - 3))
            elif input_name == "noise":
                value = rng.random(shape)
            else:
                value = rng.standard_normal(shape)
            feed[input_name] = np.asarray(value).astype(kind)
        feeds.append(feed)
    return feeds


# -------------------------------------------------------------------------------------------- checks
def output_tolerances(spec, reference_iterations) -> dict[str, tuple[float, float]]:
    """{output: (atol, rtol)}: the dtype's tolerances, the absolute one scaled by the output's largest magnitude in
    the torch reference (at least 1): a norm-wise bound. Fused kernels sum in another order than torch; over
    SmolLM2-135M's 30 layers in fp32 that moved logits of magnitude 35 by 1.0e-3 and tapped hidden states of
    magnitude 24,000 by 3.9e-2, rounding at their scale that a fixed 1e-4 failed; a wrong weight moves them by
    far more (tests/test_check.py scales one matrix by 1.5)."""
    scale = {o.name: 1.0 for o in spec.outputs}
    for outputs in reference_iterations:
        for name, value in outputs.items():
            if np.issubdtype(np.asarray(value).dtype, np.floating) and np.size(value):
                scale[name] = max(scale[name], float(np.abs(value).max()))
    return {o.name: (TOLERANCES[o.dtype][0] * scale[o.name], TOLERANCES[o.dtype][1]) for o in spec.outputs}


def compare_graph(bundle: Bundle, name: str, fn, engine: Path | None) -> list[Row]:
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:  # polygraphy < 0.53 (TensorRT 11.1 ships 0.49)
        from polygraphy.comparator import CompareFunc

        SimpleCompareFunc = CompareFunc.simple

    spec = bundle.graph(name)
    # dspark's session, not polygraphy's SessionFromOnnx: where the process's dspark sessions share one thread pool
    # (share_thread_pool), ONNX Runtime refuses any session that asks for threads of its own
    session = ort_session(bundle.file(spec.file), 0, ["CPUExecutionProvider"], spin=False)
    runners = [torch_runner("torch", fn, spec), OnnxrtRunner(session, name="onnxruntime")]
    feeds = graph_feeds(bundle, name)
    if engine is not None:
        from dspark.runtime.trt import polygraphy_trt_runner

        runners.append(polygraphy_trt_runner(engine, spec, feeds))
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.WARNING):  # the table below says what matters; polygraphy's per-run stats don't
        results = Comparator.run(runners, data_loader=feeds)
        tolerances = output_tolerances(spec, results[0][1])
        compare = SimpleCompareFunc(atol={k: v[0] for k, v in tolerances.items()},
                                    rtol={k: v[1] for k, v in tolerances.items()})
        accuracy = Comparator.compare_accuracy(results, compare_func=compare)
    rows = []
    for result in accuracy:
        for (ref, other), iterations in result.items():
            worst = {}
            passed = True
            for iteration in iterations:
                for output, outcome in iteration.items():
                    worst[output] = max(worst.get(output, 0.0), float(outcome.max_absdiff))
                    passed &= bool(outcome)
            detail = ", ".join(f"{o} {d:.1e} (atol {tolerances[o][0]:.1e})" for o, d in worst.items())
            rows.append(Row(f"{ref} vs {other}", name, "pass" if passed else "FAIL", f"{len(iterations)} feeds; max |diff| {detail}"))
    return rows


def greedy_equivalence(bundle: Bundle, max_new_tokens: int = 24) -> Row:
    """Speculative vs plain greedy on a few prompts; the first divergence comes with its logit margin."""
    from dspark.runtime.decoder import decoder_cache, feed
    from dspark.runtime.generate import Generator, Request

    if bundle.draft is None:
        return Row("greedy spec == plain", "target", "skip", "the bundle has no draft")
    plain = Generator(bundle, use_draft=False)
    spec = Generator(bundle)
    requests = [Request(list(p), max_new_tokens=max_new_tokens, ignore_eos=True) for p in PROMPTS]
    want = plain.generate(requests)
    got = spec.generate(requests)
    for request, a, b in zip(requests, want, got):
        if a.generated == b.generated:
            continue
        i = next((k for k, (x, y) in enumerate(zip(a.generated, b.generated)) if x != y), min(len(a.generated), len(b.generated)))
        cache = decoder_cache(bundle.target.config, 1, bundle)
        logits = feed(plain.target, cache, [request.prompt_ids + a.generated[:i]], bundle.limits.prefill_chunk)[0]
        top2 = np.sort(logits.astype(np.float64))[-2:]
        return Row("greedy spec == plain", "target", "FAIL",
                   f"prompt {request.prompt_ids}: first divergence at token {i} (plain {a.generated[i] if i < len(a.generated) else None}, "
                   f"speculative {b.generated[i] if i < len(b.generated) else None}); logit margin {top2[1] - top2[0]:.3g}")
    tau = np.mean([s.stats()["mean_accepted_length"] for s in got])
    return Row("greedy spec == plain", "target", "pass",
               f"{len(requests)} prompts x {max_new_tokens} tokens identical; mean accepted length {tau:.2f}")


def check_bundle(bundle_dir: str | Path, engines: bool = True, max_new_tokens: int = 24) -> CheckReport:
    bundle = Bundle.open(bundle_dir)
    report = CheckReport()
    fns, skipped = torch_graphs(bundle)
    engine_dir, why_no_engines = None, "TensorRT not requested (--no-engines)"
    if engines:
        from dspark.runtime.trt import usable_engine_dir

        engine_dir, why_no_engines = usable_engine_dir(bundle)
    for name in bundle.graphs:
        if name in skipped:
            report.add("torch vs onnxruntime", name, "skip", skipped[name])
        else:
            engine = engine_dir / f"{name}.plan" if engine_dir else None
            report.rows.extend(compare_graph(bundle, name, fns[name], engine))
        if engine_dir is None:
            report.add("tensorrt", name, "skip", why_no_engines)
    report.rows.append(greedy_equivalence(bundle, max_new_tokens))
    for name, graph in bundle.graphs.items():
        if graph.fused:
            report.add("tensorrt lint", name, "skip", "ONNX Runtime flavour (fused contrib operators); export with "
                       "--runtime tensorrt for TensorRT")
            continue
        lint = lint_graph(bundle, name)
        detail = f"{len(lint.errors)} errors, {len(lint.warnings)} warnings"
        if lint.errors:
            detail += ": " + "; ".join(f"{f.where} [{f.op}] {f.message}" for f in lint.errors[:3])
        report.add("tensorrt lint", name, "pass" if lint.ok else "FAIL", detail)
    return report
