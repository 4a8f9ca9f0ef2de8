"""TensorRT engines behind the ``GraphRunner`` interface, with optional CUDA-graph replay per shape bucket.

One execution context per optimization profile (a call picks the tightest profile that holds its shapes),
device buffers allocated once at the largest shape any profile allows and bound with ``set_tensor_address``
once, input shapes set per call, ``execute_async_v3`` on a dedicated (non-default) stream. With CUDA graphs on,
every dynamic dimension is padded to its bucket (``dspark.runtime.buckets``), so each (profile, bucket) is
captured once and replayed; a capture that fails falls back to eager with a warning. Engines are only loaded
when ``build.json`` says they were built for this GPU and TensorRT version.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.export.tensorrt import BUILD_INFO, ENGINES, engine_dir_name, require_tensorrt
from dspark.runtime.buckets import Ladder, pad_feeds
from dspark.runtime.runners import GraphRunner, resolve_shape


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


def dim_sizes(spec: dict, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Named dimension -> size, read from the feeds of a manifest graph."""
    sizes = {}
    for i in spec["inputs"]:
        for dim, size in zip(i["shape"], feeds[i["name"]].shape):
            if isinstance(dim, str) and sizes.setdefault(dim, size) != size:
                raise ValueError(f"dimension {dim} is {sizes[dim]} in one input and {size} in {i['name']}")
    return sizes


def polygraphy_trt_runner(engine: Path, spec: dict, feeds: list[dict[str, np.ndarray]]):
    """polygraphy's TrtRunner on the profile that holds every feed (for ``dspark check``)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    sizes = [dim_sizes(spec, f) for f in feeds]
    bounds = {d: min(s[d] for s in sizes) for d in sizes[0]}
    profiles = list(spec["profiles"].values())
    low = select_profile(profiles, bounds)
    high = select_profile(profiles, {d: max(s[d] for s in sizes) for d in sizes[0]})
    if low != high:
        raise DsparkError(f"check feeds for {spec['file']} span two optimization profiles")
    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="tensorrt", optimization_profile=low)


class TrtRunner(GraphRunner):
    def __init__(self, bundle: Bundle, graph: str, cuda_graphs: bool = False, device: int = 0):
        import torch

        trt, _, _ = require_tensorrt()
        folder, why = usable_engine_dir(bundle)
        if folder is None:
            raise DsparkError(why)
        self.torch = torch
        self.spec = bundle.graph(graph)
        self.input_names = [i["name"] for i in self.spec["inputs"]]
        self.output_names = [o["name"] for o in self.spec["outputs"]]
        info = json.loads((folder / BUILD_INFO).read_text())["engines"][graph]
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):  # engines must load under the device they run on (tensorrt-notes §3)
            self.engine = self.runtime.deserialize_cuda_engine((folder / info["file"]).read_bytes())
            if self.engine is None:
                raise DsparkError(f"TensorRT could not deserialize {folder / info['file']}; see the log above")
            self.stream = torch.cuda.Stream(self.device)
            # profile index i is the i-th phase in the manifest, the order build_engines added them
            self.ranges = list(self.spec["profiles"].values())
            self.contexts = []
            for index in range(len(self.ranges)):
                context = self.engine.create_execution_context()
                context.set_optimization_profile_async(index, self.stream.cuda_stream)
                self.contexts.append(context)
            self.stream.synchronize()
            self._allocate(trt)
        self.cuda_graphs = cuda_graphs
        self.ladders = {d: Ladder.powers_of_two(d, *self.spec["dims"][d]) for d in self.spec["dims"]}
        self.graphs: dict[tuple, object] = {}
        self.pool = None

    def _allocate(self, trt) -> None:
        """One device buffer per I/O tensor at the largest shape of any profile; addresses bound once per context."""
        torch = self.torch
        types = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                 trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
        largest = {d: max(r[d][2] for r in self.ranges) for d in self.ranges[0]}
        self.buffers = {}
        for spec in self.spec["inputs"] + self.spec["outputs"]:
            name = spec["name"]
            numel = max(1, int(np.prod(resolve_shape(spec["shape"], largest))))
            self.buffers[name] = torch.empty(numel, dtype=types[self.engine.get_tensor_dtype(name)], device=self.device)
            for context in self.contexts:
                context.set_tensor_address(name, self.buffers[name].data_ptr())

    def _enqueue(self, context, key) -> None:
        torch = self.torch
        if not self.cuda_graphs:
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise DsparkError(f"TensorRT refused to run {self.spec['file']}; see the log above")
            return
        if key not in self.graphs:
            self.graphs[key] = None
            # warm-up outside capture: TensorRT allocates and initialises on the first run of a shape
            if not context.execute_async_v3(self.stream.cuda_stream):
                raise DsparkError(f"TensorRT refused to run {self.spec['file']}; see the log above")
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                    ok = context.execute_async_v3(self.stream.cuda_stream)
                if ok:  # a refused enqueue leaves an empty graph that would replay stale outputs
                    self.graphs[key] = graph
                else:
                    warnings.warn(f"{self.spec['file']}: enqueue refused during CUDA-graph capture; running {key} eagerly")
            except RuntimeError as e:
                warnings.warn(f"{self.spec['file']}: CUDA-graph capture failed for {key} ({e}); running it eagerly")
            if self.graphs[key] is None:
                return  # the warm-up already produced this call's outputs
        self.graphs[key].replay()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        real = dim_sizes(self.spec, feeds)
        sizes = {d: self.ladders[d].select(s) for d, s in real.items()} if self.cuda_graphs else real
        if self.cuda_graphs:
            feeds = pad_feeds(feeds, self.spec["inputs"], sizes)
        index = select_profile(self.ranges, sizes)
        context = self.contexts[index]
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for spec in self.spec["inputs"]:
                array = np.ascontiguousarray(feeds[spec["name"]])
                view = self.buffers[spec["name"]][: array.size].view(array.shape)
                view.copy_(torch.from_numpy(array))
                if not context.set_input_shape(spec["name"], array.shape):
                    raise DsparkError(f"TensorRT rejected shape {array.shape} for {spec['name']}")
            self._enqueue(context, (index, tuple(sorted(sizes.items()))))
            outputs = {}
            for spec in self.spec["outputs"]:
                shape = tuple(context.get_tensor_shape(spec["name"]))
                out = self.buffers[spec["name"]][: int(np.prod(shape))].view(shape)
                # padded dims go back to their real sizes
                cut = tuple(slice(0, real[d]) if isinstance(d, str) else slice(None) for d in spec["shape"])
                outputs[spec["name"]] = out[cut].cpu().numpy()
        return outputs

    def device_memory_bytes(self) -> int:
        """Engine scratch (TensorRT 10/11: ``device_memory_size_v2``) plus the I/O buffers."""
        io = sum(b.numel() * b.element_size() for b in self.buffers.values())
        return int(self.engine.device_memory_size_v2) + io
