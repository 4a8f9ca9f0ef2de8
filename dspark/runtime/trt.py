"""TensorRT engines behind the ``GraphRunner`` interface, with optional CUDA-graph replay per shape bucket.

A call picks the tightest optimization profile that holds its shapes. Device buffers are allocated once at the
largest shape any profile allows, input shapes are set per call, ``execute_async_v3`` runs on a dedicated
(non-default) stream. Eager calls use one execution context per profile. With CUDA graphs on, every dynamic
dimension is padded to its bucket and each (profile, bucket) gets its own context and graph
(``dspark.runtime.capture``): a captured graph freezes the shapes its context had, so replaying it after that
context was reshaped for another bucket would be undefined. Every context shares one user-managed scratch
allocation (they run one after another on one stream). Engines are only loaded when ``build.json`` says they
were built for this GPU and TensorRT version.

Where engines live and how to check for TensorRT is defined here, and ``dspark build`` (``export.tensorrt``)
writes to that layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dspark.bundle import Bundle, GraphSpec
from dspark.errors import DsparkError
from dspark.runtime.buckets import Ladder, pad_feeds
from dspark.runtime.capture import CudaGraphs, cuda_capture
from dspark.runtime.runners import GraphRunner, resolve_shape

ENGINES = "engines"
BUILD_INFO = "build.json"
INSTALL_TENSORRT = (
    "install TensorRT 10 or 11 on a machine with an NVIDIA GPU: pip install 'dspark[gpu]' "
    "(or pip install tensorrt-cu12 / tensorrt-cu13 to match your CUDA driver)"
)


def engine_dir_name(capability: tuple[int, int], trt_version: str) -> str:
    return f"sm{capability[0]}{capability[1]}-trt{trt_version}"


def require_tensorrt():
    """The tensorrt module and the current GPU's (name, compute capability), or a DsparkError saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise DsparkError(f"TensorRT is not installed (import tensorrt failed: {e}); {INSTALL_TENSORRT}") from None
    import torch

    if not torch.cuda.is_available():
        raise DsparkError(
            "no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False"
            + ("; this torch is a CPU-only build" if torch.version.cuda is None else "")
            + "); TensorRT engines can only be built and run on an NVIDIA GPU with a CUDA build of torch "
            "(pip install torch --index-url https://download.pytorch.org/whl/cu128)"
        )
    return trt, torch.cuda.get_device_name(), torch.cuda.get_device_capability()


def check_build_info(info: dict, capability: tuple[int, int], trt_version: str, folder: Path) -> None:
    """Refuse engines built for another GPU architecture or TensorRT version, saying which differs."""
    problems = []
    built_cc = tuple(info.get("compute_capability", ()))
    if built_cc != tuple(capability):
        problems.append(f"GPU compute capability {'.'.join(map(str, built_cc))} ({info.get('gpu')}) vs this GPU's "
                        f"{'.'.join(map(str, capability))}")
    if info.get("tensorrt") != trt_version:
        problems.append(f"TensorRT {info.get('tensorrt')} vs the installed {trt_version}")
    if problems:
        raise DsparkError(f"engines in {folder} were built for another setup: {'; '.join(problems)}; "
                          "rebuild them here with 'dspark build'")


def usable_engine_dir(bundle: Bundle) -> tuple[Path | None, str]:
    """This machine's engine folder, or None and why there is none (a mismatched build.json raises)."""
    root = bundle.path / ENGINES
    if not root.is_dir() or not any(root.iterdir()):
        return None, "no TensorRT engines in the bundle (build them with 'dspark build' on a GPU machine)"
    try:
        trt, _, capability = require_tensorrt()
    except DsparkError as e:
        return None, str(e)
    folder = root / engine_dir_name(capability, trt.__version__)
    if not (folder / BUILD_INFO).is_file():
        built = ", ".join(sorted(p.name for p in root.iterdir())) or "none"
        raise DsparkError(f"no engines for this machine ({folder.name}) in {root} (found: {built}); run 'dspark build'")
    check_build_info(json.loads((folder / BUILD_INFO).read_text()), capability, trt.__version__, folder)
    return folder, ""


def select_profile(profiles: list[dict[str, list[int]]], sizes: dict[str, int]) -> int:
    """Index of the tightest profile ({dim: [min, opt, max]}) whose ranges hold every size in ``sizes``."""
    fitting = [
        (sum(r[dim][2] - r[dim][0] for dim in sizes), i)
        for i, r in enumerate(profiles)
        if all(r[dim][0] <= size <= r[dim][2] for dim, size in sizes.items())
    ]
    if not fitting:
        raise DsparkError(f"shapes {sizes} fit none of the engine's optimization profiles {profiles}")
    return min(fitting)[1]


def dim_sizes(spec: GraphSpec, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Named dimension -> size, read from the feeds of a manifest graph."""
    sizes = {}
    for i in spec.inputs:
        for dim, size in zip(i.shape, feeds[i.name].shape):
            if isinstance(dim, str) and sizes.setdefault(dim, size) != size:
                raise ValueError(f"dimension {dim} is {sizes[dim]} in one input and {size} in {i.name}")
    return sizes


def feeds_profile(spec: GraphSpec, feeds: list[dict[str, np.ndarray]]) -> int:
    """The tightest profile of a manifest graph that holds every feed's shapes (one polygraphy run uses one)."""
    sizes = [dim_sizes(spec, f) for f in feeds]
    profiles = list(spec.profiles.values())
    fitting = [i for i, r in enumerate(profiles) if all(r[d][0] <= s[d] <= r[d][2] for s in sizes for d in s)]
    if not fitting:
        raise DsparkError(f"no optimization profile of {spec.file} holds every check feed ({sizes}); re-export the bundle")
    return min(fitting, key=lambda i: sum(profiles[i][d][2] - profiles[i][d][0] for d in sizes[0]))


def polygraphy_trt_runner(engine: Path, spec: GraphSpec, feeds: list[dict[str, np.ndarray]]):
    """polygraphy's TrtRunner on the profile that holds every feed (for ``dspark check``)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="tensorrt",
                     optimization_profile=feeds_profile(spec, feeds))


def bucket_ladders(spec: GraphSpec) -> dict[str, Ladder]:
    """Per dynamic dimension: powers of two, plus every profile's maximum for it, so padding never carries a
    call past the profile it fits (a 5-token verify call stays on the decode profile instead of padding to 8)."""
    ladders = {}
    for dim, (low, high) in spec.dims.items():
        base = Ladder.powers_of_two(dim, low, high)
        stops = {r[dim][2] for r in spec.profiles.values() if dim in r}
        ladders[dim] = Ladder(dim, tuple(sorted(set(base.sizes) | stops)))
    return ladders


class Contexts:
    """Execution contexts by (profile, bucket), made on first use by ``make(profile)``.

    Eager calls share one context per profile (bucket None); a CUDA graph gets a context of its own, since
    the graph keeps the shapes the context had when it was captured.
    """

    def __init__(self, make):
        self.make = make
        self.by_key: dict[tuple, object] = {}

    def get(self, profile: int, bucket=None):
        key = (profile, bucket)
        if key not in self.by_key:
            self.by_key[key] = self.make(profile)
        return self.by_key[key]


class TrtRunner(GraphRunner):
    def __init__(self, bundle: Bundle, graph: str, cuda_graphs: bool = False, device: int = 0):
        import torch

        trt, _, _ = require_tensorrt()
        folder, why = usable_engine_dir(bundle)
        if folder is None:
            raise DsparkError(why)
        self.torch = torch
        self.trt = trt
        self.spec = bundle.graph(graph)
        if self.spec.in_place:
            raise DsparkError(f"graph {graph} uses ONNX Runtime's fused operators; export the bundle with --runtime "
                              "tensorrt for the trt backend")
        self.input_names = [i.name for i in self.spec.inputs]
        self.output_names = [o.name for o in self.spec.outputs]
        info = json.loads((folder / BUILD_INFO).read_text())["engines"][graph]
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        # profile index i is the i-th phase in the manifest, the order build_engines added them
        self.ranges = list(self.spec.profiles.values())
        with torch.cuda.device(self.device):  # engines must load under the device they run on (tensorrt-notes §3)
            self.engine = self.runtime.deserialize_cuda_engine((folder / info["file"]).read_bytes())
            if self.engine is None:
                raise DsparkError(f"TensorRT could not deserialize {folder / info['file']}; see the log above")
            self.stream = torch.cuda.Stream(self.device)
            # one scratch allocation for every context: the size covers all profiles, and contexts never overlap
            self.scratch = torch.empty(max(1, int(self.engine.device_memory_size_v2)), dtype=torch.uint8,
                                       device=self.device)
            self._allocate()
        self.contexts = Contexts(self._new_context)
        self.ladders = bucket_ladders(self.spec)
        capture = cuda_capture(self.device, self.stream) if cuda_graphs else None
        self.graphs = CudaGraphs(capture, synchronize=self.stream.synchronize, name=self.spec.file)

    def _allocate(self) -> None:
        """One device buffer per I/O tensor at the largest shape of any profile (bound to each new context)."""
        torch, trt = self.torch, self.trt
        types = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
        largest = {d: max(r[d][2] for r in self.ranges) for d in self.ranges[0]}
        self.buffers = {}
        for spec in self.spec.inputs + self.spec.outputs:
            name = spec.name
            numel = max(1, int(np.prod(resolve_shape(spec.shape, largest))))
            self.buffers[name] = torch.empty(numel, dtype=types[self.engine.get_tensor_dtype(name)], device=self.device)

    def _new_context(self, profile: int):
        context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise DsparkError(f"TensorRT could not create an execution context for {self.spec.file}; see the log above")
        if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1 takes the size with the address
            context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        else:
            context.device_memory = self.scratch.data_ptr()
        if not context.set_optimization_profile_async(profile, self.stream.cuda_stream):
            raise DsparkError(f"TensorRT refused optimization profile {profile} of {self.spec.file}")
        self.stream.synchronize()
        for name, buffer in self.buffers.items():
            if not context.set_tensor_address(name, buffer.data_ptr()):
                raise DsparkError(f"TensorRT refused the address of {name} in {self.spec.file}")
        return context

    def run(self, feeds: dict[str, np.ndarray], cache=None) -> dict[str, np.ndarray]:
        torch = self.torch
        real = dim_sizes(self.spec, feeds)
        sizes = {d: self.ladders[d].select(s) for d, s in real.items()} if self.graphs.enabled else real
        if self.graphs.enabled:
            feeds = pad_feeds(feeds, self.spec.inputs, sizes)
        index = select_profile(self.ranges, sizes)
        bucket = tuple(sorted(sizes.items())) if self.graphs.enabled else None
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            context = self.contexts.get(index, bucket)
            for spec in self.spec.inputs:
                array = np.ascontiguousarray(feeds[spec.name])
                view = self.buffers[spec.name][: array.size].view(array.shape)
                view.copy_(torch.from_numpy(array))
                if not context.set_input_shape(spec.name, array.shape):
                    raise DsparkError(f"TensorRT rejected shape {array.shape} for {spec.name}")
            self.graphs.run((index, bucket), lambda: self._execute(context))
            outputs = {}
            for spec in self.spec.outputs:
                shape = tuple(context.get_tensor_shape(spec.name))
                out = self.buffers[spec.name][: int(np.prod(shape))].view(shape)
                # padded dims go back to their real sizes
                cut = tuple(slice(0, real[d]) if isinstance(d, str) else slice(None) for d in spec.shape)
                outputs[spec.name] = out[cut].cpu().numpy()
        return outputs

    def _execute(self, context) -> None:
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise DsparkError(f"TensorRT refused to run {self.spec.file}; see the log above")

    def device_memory_bytes(self) -> int:
        """The shared engine scratch (counted once, however many contexts use it) plus the I/O buffers."""
        io = sum(b.numel() * b.element_size() for b in self.buffers.values())
        return self.scratch.numel() + io
