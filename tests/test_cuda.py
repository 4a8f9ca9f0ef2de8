"""The device-side speculative step: proven on CPU tensors here, and on a GPU (CUDA graphs, TensorRT) where present."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

from dspark.errors import DsparkError
from dspark.runtime.buckets import Buckets, Ladder
from dspark.runtime.capture import CudaGraphs
from dspark.runtime.cuda import accept_on_device, warp, write_block
from dspark.runtime.generate import Generator, Request
from dspark.runtime.sampling import SamplingParams, accept, probabilities
from test_check import export_dspark_bundle

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


needs_tensorrt = pytest.mark.skipif(not has_tensorrt(), reason="needs TensorRT and a CUDA GPU")


@pytest.fixture(scope="module")
def dspark_bundle(qwen3_pair, tmp_path_factory):
    return export_dspark_bundle(qwen3_pair, tmp_path_factory)


class Uniforms:
    """An rng stand-in that hands ``accept`` a fixed sequence of uniforms."""

    def __init__(self, values):
        self.values = iter(values)

    def random(self):
        return float(next(self.values))


def test_device_acceptance_equals_accept_given_the_same_uniforms():
    rng = np.random.default_rng(0)
    vocab, k = 12, 4
    params = [SamplingParams(0.0), SamplingParams(0.8, top_p=0.9), SamplingParams(1.3, top_k=5), SamplingParams(1.0)]
    t = torch.tensor
    for _ in range(150):
        logits = rng.normal(size=(4, k + 1, vocab)) * 2
        q = rng.dirichlet(np.full(vocab, 0.5), size=(4, k))
        drafts = np.array([[rng.choice(vocab, p=q[b, j]) for j in range(k)] for b in range(4)])
        drafts[0, :2] = logits[0, :2].argmax(-1)  # a greedy row that accepts some drafts
        drafts[3] = logits[3, :k].argmax(-1)
        lengths = rng.integers(0, k + 1, size=4)
        u = rng.random((4, k + 2))
        n, token = accept_on_device(t(logits), t(drafts), t(q), t(lengths), t([p.temperature for p in params]),
                                    t([p.top_p for p in params], dtype=torch.float64), t([p.top_k for p in params]), t(u))
        for b, p in enumerate(params):
            length = lengths[b]
            want = accept(logits[b, : length + 1], list(drafts[b, :length]), q[b, :length], p, Uniforms(u[b]))
            assert (int(n[b]), int(token[b])) == want
    for p in params[1:]:
        x = rng.normal(size=(1, 3, vocab))
        got = warp(t(x), t([p.temperature]), t([p.top_p], dtype=torch.float64), t([p.top_k]))[0].numpy()
        np.testing.assert_allclose(got, probabilities(x[0], p), atol=1e-12)


def test_write_block_places_new_entries_at_each_row_length():
    cache = torch.zeros(1, 2, 1, 6, 1)
    write_block(cache, torch.tensor([[[[1.0], [2.0]]], [[[3.0], [4.0]]]]).reshape(1, 2, 1, 2, 1), torch.tensor([1, 3]))
    assert cache.flatten().tolist() == [0, 1, 2, 0, 0, 0, 0, 0, 0, 3, 4, 0]


def greedy_requests():
    return [Request([5, 6, 7], max_new_tokens=10, ignore_eos=True), Request([11, 12, 13, 14, 15], max_new_tokens=7, ignore_eos=True)]


def device_generator(bundle, **options) -> Generator:
    """The one loop with the device step, on torch-CPU tensors (no CUDA graphs there)."""
    return Generator(bundle, backend="torch", device="cpu", device_step=True, **options)


def test_device_step_on_cpu_equals_ort_greedy(dspark_bundle):
    want = Generator(dspark_bundle).generate(greedy_requests(), trace=True)
    got = device_generator(dspark_bundle).generate(greedy_requests(), trace=True)
    assert [s.generated for s in got] == [s.generated for s in want]
    # the same drafts round by round: the device-side context cache and proposals match the ORT proposer's
    drafts = lambda seqs: [[r["draft_tokens"] for r in s.trace] for s in seqs]  # noqa: E731
    assert drafts(got) == drafts(want)


class Recording:
    """What a CUDA graph is to the helper, on the CPU: an object whose ``replay()`` runs the captured work again."""

    def __init__(self, work):
        self.replay = work


def test_capture_fallback_and_replay_run_through_the_same_step(dspark_bundle):
    """Recurring buckets replay their capture; a bucket whose capture failed runs eagerly on every later call
    (it used to store None and call None.replay() the second time)."""
    want = [s.generated for s in Generator(dspark_bundle).generate(greedy_requests())]
    generator = device_generator(dspark_bundle)
    step = generator.device_step
    state = step.graphs.state
    captures = []

    def record(work):
        captures.append(work)
        return Recording(work)

    step.graphs = CudaGraphs(record, state=state, name="test")
    assert [s.generated for s in generator.generate(greedy_requests())] == want
    assert step.graphs.captured() == len(captures) < sum(len(s) for s in want)  # buckets recur

    def fail(_work):
        raise RuntimeError("operation not permitted when stream is capturing")

    step.graphs = CudaGraphs(fail, state=state, name="test")
    with pytest.warns(UserWarning, match="capture failed") as warned:
        got = generator.generate(greedy_requests())
        again = generator.generate(greedy_requests())  # the same buckets: eager, no second warning
    assert [s.generated for s in got] == [s.generated for s in again] == want
    assert len(warned) == len(step.graphs.graphs) and step.graphs.captured() == 0


def test_rows_stopping_at_eos_inside_a_block_keep_the_window_large_enough(dspark_bundle):
    """A row that stops at EOS inside an accepted block has committed the whole block on the device; the next
    step writes past its host length, so the cache window must be sized from the device lengths."""
    generator = device_generator(dspark_bundle)
    step, limits = generator.device_step, generator.bundle.limits
    # every window size is a bucket: the window is exactly what the lengths ask for, so any overrun shows
    step.buckets = Buckets(step.buckets.batch, step.buckets.verify,
                           Ladder("cache window", tuple(range(1, limits.max_context + limits.max_verify_tokens + 1))))
    # hot sampling makes target and draft laws nearly uniform, so most drafts pass; half the vocabulary ends a row
    generator.eos_ids = set(range(0, 48))
    hot = SamplingParams(100.0)
    stopping = [Request(list(range(1, 41)), max_new_tokens=30, sampling=hot, seed=seed) for seed in range(6)]
    greedy = [Request([5, 6, 7], max_new_tokens=24, ignore_eos=True)]
    seqs = generator.generate(stopping + greedy, trace=True)
    inside = [s for s in seqs[:-1] if s.finish_reason == "stop" and s.trace and s.trace[-1]["accepted"] >= len(s.trace[-1]["emitted"])]
    assert inside, "no row stopped at EOS with accepted drafts after it; the test lost its point"
    ort = Generator(dspark_bundle)
    ort.eos_ids = generator.eos_ids
    assert seqs[-1].generated == ort.generate(greedy)[0].generated


def test_continuous_batching_and_cancel_through_the_device_step(dspark_bundle):
    """Rows join after prefill and leave compacted in place while others run: the same tokens as each alone."""
    requests = [Request(list(range(1, 4 + 3 * i)), max_new_tokens=6 + 4 * i, ignore_eos=True) for i in range(5)]
    alone = device_generator(dspark_bundle)
    want = [alone.generate([r])[0].generated for r in requests]
    gen = device_generator(dspark_bundle, max_batch=3)
    seqs = [gen.submit(r) for r in requests[:2]]
    gen.step()
    seqs += [gen.submit(r) for r in requests[2:]]
    doomed = gen.submit(Request([9, 9, 9], max_new_tokens=200, ignore_eos=True))
    peak = 0
    while gen.has_work():
        gen.step()
        peak = max(peak, len(gen.running))
        if doomed in gen.running and len(doomed.generated) > 3:
            gen.cancel(doomed)
    assert peak == 3 and doomed.finish_reason == "cancelled"
    assert [s.generated for s in seqs] == want
    assert gen.device_step.rows == 0 and not gen.device_step.cache_lens.size


def test_draft_lm_bundles_and_confidence_schedulers_are_refused_with_the_reason(qwen3_bundle, dspark_bundle):
    with pytest.raises(DsparkError, match="block drafters"):
        device_generator(qwen3_bundle)
    with pytest.raises(DsparkError, match="--scheduler fixed"):
        device_generator(dspark_bundle, scheduler="sps")
    plain = device_generator(qwen3_bundle, use_draft=False).generate(greedy_requests())
    assert [s.generated for s in plain] == [s.generated for s in Generator(qwen3_bundle, use_draft=False).generate(greedy_requests())]


@needs_cuda
def test_cuda_greedy_equals_ort_greedy(dspark_bundle):
    want = [s.generated for s in Generator(dspark_bundle).generate(greedy_requests())]
    for graphs in (False, True):
        got = Generator(dspark_bundle, backend="torch", device="cuda", cuda_graphs=graphs).generate(greedy_requests())
        assert [s.generated for s in got] == want


@needs_cuda
def test_graph_replay_equals_eager(dspark_bundle):
    requests = greedy_requests() + [Request([9, 8], max_new_tokens=12, ignore_eos=True, seed=4,
                                            sampling=SamplingParams(0.9, top_k=20))]
    eager = Generator(dspark_bundle, backend="torch", device="cuda", cuda_graphs=False).generate(requests)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a capture that falls back to eager would warn
        generator = Generator(dspark_bundle, backend="torch", device="cuda", cuda_graphs=True)
        replayed = generator.generate(requests)
    assert [s.generated for s in replayed] == [s.generated for s in eager]
    graphs = generator.device_step.graphs
    assert graphs.graphs and graphs.captured() == len(graphs.graphs)


@pytest.mark.parametrize("name, options, device_step", [
    ("draft LM", {}, False), ("draft LM", {"use_draft": False}, True), ("dspark", {}, True),
    ("dspark", {"scheduler": "threshold"}, False), ("dspark", {"lookup": 2}, False)])
def test_the_torch_backend_on_a_gpu_takes_the_device_step_where_it_can(qwen3_bundle, dspark_bundle, name, options,
                                                                        device_step):
    """Plain decoding and whole DSpark blocks run as the device step; a draft LM, a confidence scheduler or lookup
    take the host loop over torch runners instead of being refused. Without a GPU every path is refused the same
    way before anything loads (``backends.torch_device``)."""
    bundle = qwen3_bundle if name == "draft LM" else dspark_bundle
    if torch.cuda.is_available():
        generator = Generator(bundle, backend="torch", device="cuda", **options)
        assert (generator.device_step is not None) == device_step
    else:
        with pytest.raises(DsparkError, match="sees no CUDA device; use --device cpu"):
            Generator(bundle, backend="torch", device="cuda", **options)


@needs_cuda
def test_cuda_host_loop_keeps_its_caches_on_the_device(qwen3_bundle):
    """A draft LM runs the host loop on a GPU: the target's and the draft's caches stay there as torch tensors (no
    copy across each call), with CUDA graphs its draft steps and verify calls replay captures, and the tokens are
    ONNX Runtime's either way."""
    want = [s.generated for s in Generator(qwen3_bundle).generate(greedy_requests())]
    for graphs in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a capture that falls back to eager would warn
            generator = Generator(qwen3_bundle, backend="torch", device="cuda", device_step=False, cuda_graphs=graphs)
            got = [s.generated for s in generator.generate(greedy_requests())]
        assert got == want
        for cache in (generator.cache, generator.proposer.cache):
            assert isinstance(cache.k, torch.Tensor) and cache.k.is_cuda
        for runner in (generator.target, generator.proposer.runner):
            assert runner.graphs.captured() == (len(runner.graphs.graphs) if graphs else 0)
            assert runner.graphs.captured() > 0 or not graphs


@needs_cuda
def test_memory_budget_refuses_with_numbers(dspark_bundle):
    from dspark.bundle import Bundle
    from dspark.runtime.cuda import DeviceStep

    with pytest.raises(DsparkError, match="GiB are free"):
        DeviceStep(Bundle.open(dspark_bundle), memory_fraction=1e-9)


@needs_tensorrt
def test_tensorrt_runner_matches_ort(qwen3_pair, tmp_path_factory, tmp_path):
    from dspark.bundle import Bundle
    from dspark.check import graph_feeds
    from dspark.export.tensorrt import build_engines
    from dspark.runtime.runners import OrtRunner
    from dspark.runtime.trt import TrtRunner

    copy = tmp_path / "bundle"
    shutil.copytree(export_dspark_bundle(qwen3_pair, tmp_path_factory, runtime="tensorrt"), copy)
    build_engines(copy, log=lambda _m: None)
    bundle = Bundle.open(copy)
    for name in bundle.graphs:
        ort = OrtRunner(bundle, name)
        for graphs in (False, True):
            trt = TrtRunner(bundle, name, cuda_graphs=graphs)
            # twice over: the second pass replays every bucket after others reshaped their own contexts
            for feeds in graph_feeds(bundle, name) * 2:
                want, got = ort.run(feeds), trt.run(feeds)
                for out in want:
                    np.testing.assert_allclose(got[out], want[out], atol=1e-3, rtol=1e-3)
