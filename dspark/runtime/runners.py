"""Graph runners: one small interface over ONNX Runtime, TensorRT (``trt.py``) and torch (``torch_runner.py``);
``backends.make_runner`` picks one.

A runner takes numpy feeds by input name and returns numpy outputs by name. The ONNX Runtime runner binds
inputs zero-copy and writes outputs into buffers it allocates once and grows on demand; returned arrays are
views of those buffers and stay valid until the runner's next call.
"""

from __future__ import annotations

import numpy as np

from dspark.bundle import Bundle
from dspark.errors import DsparkError


class GraphRunner:
    """What the speculative loop needs from a graph backend."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError


def resolve_shape(spec_shape: list, symbols: dict[str, int]) -> tuple[int, ...]:
    return tuple(symbols[d] if isinstance(d, str) else d for d in spec_shape)


class OrtRunner(GraphRunner):
    def __init__(self, bundle: Bundle, graph: str, threads: int = 0, providers: list[str] | None = None,
                 spin: bool = True):
        import onnxruntime as ort

        self.spec = bundle.graph(graph)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not spin:
            # A speculative step alternates between sessions; idle draft threads that spin take the cores from the
            # target's call. Measured on the demo pair, 1 request: speculative 62 tok/s with every session
            # spinning, 89 with only the target spinning (plain decoding 99-105 either way). A process-wide
            # thread pool measured better still (102) but forces every ONNX Runtime session in the process,
            # including a user's own, onto it.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        path = str(bundle.file(self.spec["file"]))
        try:
            self.session = ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types for unreadable graphs
            raise DsparkError(f"ONNX Runtime cannot load {path}: {e}") from None
        self.input_names = [i["name"] for i in self.spec["inputs"]]
        self.output_names = [o["name"] for o in self.spec["outputs"]]
        self.binding = self.session.io_binding()
        self.arenas: dict[str, np.ndarray] = {}
        # in-place KV pairs (the ORT graph flavour): past_key.i is bound to the same memory as present_key.i
        self.kv_pairs = [(f"past_{kind}.{i}", f"present_{kind}.{i}", kind)
                         for i in range(sum(1 for n in self.input_names if n.startswith("past_key.")))
                         for kind in ("key", "value")]
        in_place = {out for _, out, _ in self.kv_pairs}
        self.result_specs = [o for o in self.spec["outputs"] if o["name"] not in in_place]
        self.bound_cache: tuple | None = None

    def _symbols(self, feeds: dict[str, np.ndarray], cache) -> dict[str, int]:
        symbols = {}
        for spec in self.spec["inputs"]:
            array = feeds.get(spec["name"])
            if array is None:
                if not spec["name"].startswith("past_"):
                    raise ValueError(f"no feed for input {spec['name']}")
                array = cache.k[0]  # every in-place cache input has one layer's shape
            for dim, size in zip(spec["shape"], array.shape):
                if isinstance(dim, str):
                    if symbols.setdefault(dim, size) != size:
                        raise ValueError(f"dimension {dim} is {symbols[dim]} in one input and {size} in {spec['name']}")
        return symbols

    def _output_buffer(self, spec: dict, shape: tuple[int, ...]) -> np.ndarray:
        size = int(np.prod(shape))
        arena = self.arenas.get(spec["name"])
        if arena is None or arena.size < size:
            arena = np.empty(max(size, 2 * (arena.size if arena is not None else 0)), dtype=spec["dtype"])
            self.arenas[spec["name"]] = arena
        return arena[:size].reshape(shape)

    def _bind_cache(self, cache) -> None:
        """Bind each layer's K/V buffer as both past and present; only when the buffers moved or were reshaped."""
        key = (cache.k.ctypes.data, cache.v.ctypes.data, cache.k.shape)
        if key == self.bound_cache:
            return
        for past, present, kind in self.kv_pairs:
            layer = (cache.k if kind == "key" else cache.v)[int(past.rsplit(".", 1)[1])]
            self.binding.bind_input(past, "cpu", 0, layer.dtype, layer.shape, layer.ctypes.data)
            self.binding.bind_output(present, "cpu", 0, layer.dtype, layer.shape, layer.ctypes.data)
        self.bound_cache = key

    def run(self, feeds: dict[str, np.ndarray], cache=None) -> dict[str, np.ndarray]:
        """One call. ``cache`` (a KVCache) is required by graphs that update their KV buffers in place."""
        symbols = self._symbols(feeds, cache)
        binding = self.binding
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        if self.kv_pairs:
            self._bind_cache(cache)
        outputs = {}
        for spec in self.result_specs:
            out = self._output_buffer(spec, resolve_shape(spec["shape"], symbols))
            binding.bind_output(spec["name"], "cpu", 0, out.dtype, out.shape, out.ctypes.data)
            outputs[spec["name"]] = out
        self.session.run_with_iobinding(binding)
        return outputs
