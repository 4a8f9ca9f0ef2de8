"""Graph runners: one small interface over ONNX Runtime, TensorRT (``trt.py``) and torch (``torch_runner.py``);
``backends.make_runner`` picks one.

A runner takes numpy feeds by input name and returns numpy outputs by name. The ONNX Runtime runner binds
inputs zero-copy and writes outputs into buffers it allocates once and grows on demand; returned arrays are
views of those buffers and stay valid until the runner's next call.
"""

from __future__ import annotations

import re
import weakref
from pathlib import Path

import numpy as np

from dspark.bundle import Bundle, TensorSpec, file_identity
from dspark.errors import DsparkError


# the devices dspark computes on (ONNX Runtime on the CPU; torch and TensorRT on the CPU or a CUDA device), for
# the backend check and the torch device check alike
DEVICES = ("cpu", "cuda")

# inputs up to this many elements (ids, lengths, positions) are copied into buffers bound once per shape, which
# costs less than binding a new array every call
STAGE_LIMIT = 4096

# the oldest ONNX Runtime that loads the ``ort`` flavour: its GroupQueryAttention takes per-row query lengths
# (input 16, ``query_seqlens``), without which a batched verify call is refused; 1.30 and 1.31 reject the node
ORT_FLAVOUR_MIN = (1, 32)


class GraphRunner:
    """What the speculative loop needs from a graph backend."""

    input_names: list[str]
    output_names: list[str]
    # where the KV caches this runner's in-place graph updates should live: None for numpy buffers on the host,
    # or a torch device (``decoder_cache(..., device=)``), which a torch runner there updates without copies
    cache_device: str | None = None

    def run(self, feeds: dict[str, np.ndarray], cache=None) -> dict[str, np.ndarray]:
        """Outputs by name for numpy feeds by name; ``cache`` is the KVCache an ``ort``-flavour decoder graph
        updates in place (its layers are bound as past and present)."""
        raise NotImplementedError


def resolve_shape(spec_shape: list, symbols: dict[str, int]) -> tuple[int, ...]:
    return tuple(symbols[d] if isinstance(d, str) else d for d in spec_shape)


# One ONNX Runtime thread pool for every dspark session of the process, when it could be made before any session
# existed (ONNX Runtime creates its environment, and the pool with it, once per process).
_thread_pool = {"shared": False, "sessions": 0}


def share_thread_pool(threads: int = 0) -> bool:
    """Make the dspark sessions this process creates from now on share one intra-op thread pool; True when they
    will. Possible only before any dspark session exists (the commands call it first thing); sessions of other
    code keep their own threads unless they opt in with ``use_per_session_threads = False``.

    A speculative round alternates between the draft's and the target's sessions: with a pool each, the idle
    pool either spins and takes the cores from the busy one, or sleeps and pays a wake-up on every draft call.
    Measured on SmolLM2 (fp32 target, int4 draft, 2 cores, K = 4): draft 10.9 ms per step with a sleeping pool of
    its own against 6.4 ms alone; with one shared pool speculative decoding ran 53.7 tok/s instead of 43.0 (plain
    44.9 vs 44.7, unchanged)."""
    if _thread_pool["shared"]:
        return True
    if _thread_pool["sessions"]:
        return False
    import os

    from onnxruntime.capi import onnxruntime_pybind11_state

    onnxruntime_pybind11_state.set_global_thread_pool_sizes(threads or os.cpu_count() or 1, 1)
    _thread_pool["shared"] = True
    return True


# Sessions by graph file and options, alive while a runner holds them: Generators of one process (dspark bench's
# configurations, a server's workers) share one session per graph file, so the weights are loaded and prepacked
# once and runs that alternate between configurations read one copy from the caches. Each runner keeps its own
# IOBinding and buffers; ONNX Runtime sessions take concurrent runs.
_sessions: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def ort_session(path: Path, threads: int, providers: list[str], spin: bool):
    """The process's ONNX Runtime session for the graph at ``path`` with these options, made on first use."""
    import onnxruntime as ort

    if threads < 0:
        raise DsparkError(f"--threads {threads}: give a number of threads, or 0 for all cores")
    key = (*file_identity(path), threads, tuple(providers), spin, _thread_pool["shared"])
    session = _sessions.get(key)
    if session is not None:
        return session
    options = ort.SessionOptions()
    _thread_pool["sessions"] += 1
    if _thread_pool["shared"]:
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin and not _thread_pool["shared"]:
        # Each session has its own pool: idle draft threads that spin would take the cores from the target's
        # call (demo pair, 1 request: speculative 62 tok/s with every session spinning, 89 with only the
        # target spinning), so the draft's pool sleeps between calls (see share_thread_pool for its cost).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # ORT raises its own exception types for unreadable graphs
        installed = tuple(int(part) for part in re.findall(r"\d+", ort.__version__)[:2])
        hint = ""
        if installed < ORT_FLAVOUR_MIN and "GroupQueryAttention" in str(e):
            wanted = ".".join(map(str, ORT_FLAVOUR_MIN))
            hint = (f"\nthis graph needs onnxruntime {wanted} or newer (installed: {ort.__version__}); "
                    f"run: pip install -U 'onnxruntime>={wanted}'")
        raise DsparkError(f"ONNX Runtime cannot load {path}: {e}{hint}") from None
    _sessions[key] = session
    return session


class OrtRunner(GraphRunner):
    def __init__(self, bundle: Bundle, graph: str, threads: int = 0, providers: list[str] | None = None,
                 spin: bool = True):
        self.spec = bundle.graph(graph)
        self.session = ort_session(bundle.file(self.spec.file), threads, providers or ["CPUExecutionProvider"],
                                   spin)
        self.input_names = [i.name for i in self.spec.inputs]
        self.output_names = [o.name for o in self.spec.outputs]
        self.binding = self.session.io_binding()
        self.arenas: dict[str, np.ndarray] = {}
        # in-place KV pairs (the ORT graph flavour): past_key.i is bound to the same memory as present_key.i
        self.kv_pairs = [(f"past_{kind}.{i}", f"present_{kind}.{i}", kind, i)
                         for i in range(sum(1 for n in self.input_names if n.startswith("past_key.")))
                         for kind in ("key", "value")]
        in_place = {out for _, out, _, _ in self.kv_pairs}
        self.result_specs = [o for o in self.spec.outputs if o.name not in in_place]
        self.bound: dict[tuple[str, str], tuple] = {}  # (in|out, name) -> (address, shape, dtype) bound now
        self.staged: dict[str, np.ndarray] = {}
        self.held: dict[str, np.ndarray] = {}  # large inputs bound where they are, kept alive until the next call
        self.dim_sources: dict[str, tuple[str, int]] = {}
        for spec in self.spec.inputs:
            for axis, dim in enumerate(spec.shape):
                if isinstance(dim, str):
                    self.dim_sources.setdefault(dim, (spec.name, axis))

    def _symbols(self, feeds: dict[str, np.ndarray], cache) -> dict[str, int]:
        """Sizes of the named dimensions, read from the first input that carries each (ONNX Runtime checks the rest)."""
        symbols = {}
        for dim, (name, axis) in self.dim_sources.items():
            array = feeds.get(name)
            symbols[dim] = (cache.k[0] if array is None else array).shape[axis]
        return symbols

    def _output_buffer(self, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        arena = self.arenas.get(spec.name)
        if arena is None or arena.size < size:
            arena = np.empty(max(size, 2 * (arena.size if arena is not None else 0)), dtype=spec.dtype)
            self.arenas[spec.name] = arena
        return arena[:size].reshape(shape)

    def _bind(self, kind: str, name: str, array: np.ndarray) -> None:
        """Bind ``array``'s memory to an input or output unless that exact binding is already in place."""
        key = (array.ctypes.data, array.shape, array.dtype)
        if self.bound.get((kind, name)) != key:
            bind = self.binding.bind_input if kind == "in" else self.binding.bind_output
            bind(name, "cpu", 0, array.dtype, array.shape, key[0])
            self.bound[(kind, name)] = key

    def _feed(self, name: str, array: np.ndarray) -> None:
        """Small per-call inputs are copied into a buffer bound once per shape; large ones are bound where they are."""
        if array.size > STAGE_LIMIT:
            # bound by address: a contiguous copy (of a cache view with rows to spare) must outlive the call
            self.held[name] = np.ascontiguousarray(array)
            self._bind("in", name, self.held[name])
            return
        staged = self.staged.get(name)
        if staged is None or staged.shape != array.shape or staged.dtype != array.dtype:
            staged = self.staged[name] = np.empty(array.shape, array.dtype)
        np.copyto(staged, array)
        self._bind("in", name, staged)

    def _bind_cache(self, cache) -> None:
        """Each layer's K/V buffer is both its past input and its present output; rebound only when the cache's
        buffers moved or were reshaped (one check per call, not one per layer)."""
        key = (cache.k.ctypes.data, cache.v.ctypes.data, cache.k.shape, cache.k.dtype)
        if self.bound.get(("cache", "")) == key:
            return
        for past, present, kind, i in self.kv_pairs:
            layer = (cache.k if kind == "key" else cache.v)[i]
            self.binding.bind_input(past, "cpu", 0, layer.dtype, layer.shape, layer.ctypes.data)
            self.binding.bind_output(present, "cpu", 0, layer.dtype, layer.shape, layer.ctypes.data)
        self.bound[("cache", "")] = key

    def run(self, feeds: dict[str, np.ndarray], cache=None) -> dict[str, np.ndarray]:
        """One call. ``cache`` (a KVCache) is required by graphs that update their KV buffers in place."""
        symbols = self._symbols(feeds, cache)
        for name, array in feeds.items():
            self._feed(name, array)
        if self.kv_pairs:
            self._bind_cache(cache)
        outputs = {}
        for spec in self.result_specs:
            out = self._output_buffer(spec, resolve_shape(spec.shape, symbols))
            self._bind("out", spec.name, out)
            outputs[spec.name] = out
        self.session.run_with_iobinding(self.binding)
        return outputs
