"""``dspark build``: one TensorRT engine per bundle graph, built through polygraphy's loaders.

Each manifest phase (``profiles``: prefill, decode, ...) becomes one optimization profile whose min/opt/max
cover every dynamic input, so a runtime can switch profiles per call instead of rebuilding. Engines are not
portable across GPU architectures or TensorRT versions (tensorrt-notes §1), so they live under
``engines/sm<major><minor>-trt<version>/`` beside a ``build.json`` the runtime checks before loading.

TensorRT 11 networks are always strongly typed and have no FP16/BF16 builder flags: precision comes from the
ONNX types. A precision other than the bundle's dtype is therefore only possible on TensorRT 10 (weakly
typed build with the precision flag); on 11 the user must export the bundle in that dtype.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dspark.bundle import Bundle, GraphSpec
from dspark.errors import DsparkError
from dspark.runtime.trt import BUILD_INFO, ENGINES, engine_dir_name, require_tensorrt

PRECISIONS = ("fp32", "fp16", "bf16")
TIMING_CACHE = "timing.cache"


def profile_shapes(graph: GraphSpec) -> dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """{phase: {input: (min, opt, max)}} for every input with a named (dynamic) dimension.

    Static dimensions keep their size in all three shapes; a named one takes the phase's [min, opt, max].
    """
    result = {}
    for phase, ranges in graph.profiles.items():
        for dim, (low, opt, high) in ranges.items():
            if not low <= opt <= high:
                raise DsparkError(f"{graph.file}: profile {phase} has {dim} min/opt/max {low}/{opt}/{high} out of order")
        shapes = {}
        for spec in graph.inputs:
            named = [d for d in spec.shape if isinstance(d, str)]
            if not named:
                continue
            missing = [d for d in named if d not in ranges]
            if missing:
                raise DsparkError(
                    f"{graph.file}: profile {phase} gives no range for dimension {', '.join(missing)} of input "
                    f"{spec.name}; re-export the bundle"
                )
            shapes[spec.name] = tuple(
                tuple(ranges[d][i] if isinstance(d, str) else d for d in spec.shape) for i in range(3)
            )
        result[phase] = shapes
    return result


def trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def precision_settings(trt, precision: str, bundle_dtype: str) -> dict:
    """Network and config options for a precision: strongly typed when it is the bundle's dtype."""
    if precision not in PRECISIONS:
        raise DsparkError(f"--precision {precision!r} is not supported; choose one of {', '.join(PRECISIONS)}")
    if precision == bundle_dtype:
        return {"strongly_typed": True, "flags": {}}
    if bundle_dtype != "fp32":
        raise DsparkError(f"the bundle is {bundle_dtype}; it cannot be built at {precision} (re-export with --dtype {precision})")
    if trt_major(trt) >= 11:
        raise DsparkError(
            f"TensorRT {trt.__version__} is always strongly typed and takes precision from the ONNX types; "
            f"export the bundle with --dtype {precision} (or build with --precision {bundle_dtype})"
        )
    return {"strongly_typed": False, "flags": {precision: True}}


def build_engines(
    bundle_dir: str | Path,
    precision: str | None = None,
    workspace_gb: float = 8.0,
    timing_cache: str | Path | None = None,
    graphs: list[str] | None = None,
    tf32: bool = True,
    log=print,
) -> Path:
    """Build every graph's engine (or those in ``graphs``) into ``engines/<gpu>-trt<version>/``; returns that folder.

    One timing cache serves every graph of the build (``timing_cache``, by default ``timing.cache`` in the engine
    folder), so tactics timed for one graph are reused by the next and by later builds on this machine.
    ``build.json`` keeps the entries of engines built earlier that this build does not replace. ``tf32`` lets
    fp32 layers use TF32 tensor cores (polygraphy turns them off unless asked; fp32 engines are then several
    times slower on recent GPUs, at about 1e-3 relative error).
    """
    bundle = Bundle.open(bundle_dir)
    fused = [name for name, graph in bundle.graphs.items() if graph.fused]
    if fused:
        raise DsparkError(f"{bundle_dir}: graphs {', '.join(fused)} use ONNX Runtime's fused operators, which TensorRT "
                          "does not parse; export the bundle with --runtime tensorrt for 'dspark build'")
    names = graphs or list(bundle.graphs)
    unknown = [n for n in names if n not in bundle.graphs]
    if unknown:
        raise DsparkError(f"no graph {', '.join(unknown)} in this bundle; its graphs: {', '.join(bundle.graphs)}")
    trt, gpu, capability = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException
    from polygraphy.util import save_file

    precision = precision or bundle.dtype
    settings = precision_settings(trt, precision, bundle.dtype)
    out = bundle.path / ENGINES / engine_dir_name(capability, trt.__version__)
    out.mkdir(parents=True, exist_ok=True)
    timing_cache = Path(timing_cache) if timing_cache else out / TIMING_CACHE
    previous = json.loads((out / BUILD_INFO).read_text()) if (out / BUILD_INFO).is_file() else {}
    info = {
        "tensorrt": trt.__version__,
        "cuda": __import__("torch").version.cuda,
        "gpu": gpu,
        "compute_capability": list(capability),
        "precision": precision,
        "strongly_typed": settings["strongly_typed"],
        "tf32": tf32,
        "workspace_gb": workspace_gb,
        "timing_cache": str(timing_cache),
        "timing_cache_loaded": timing_cache.is_file(),
    }
    info["engines"] = kept_engines(previous, info, names)
    started = time.perf_counter()
    for name in names:
        graph = bundle.graph(name)
        shapes = profile_shapes(graph)
        profiles = []
        for phase_shapes in shapes.values():
            profile = Profile()
            for tensor, (low, opt, high) in phase_shapes.items():
                profile.add(tensor, min=low, opt=opt, max=high)
            profiles.append(profile)
        config = CreateConfig(
            profiles=profiles,
            memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gb * (1 << 30))},
            # read per graph: the previous graph of this build has just written it
            load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
            tf32=tf32,
            **settings["flags"],
        )
        network = NetworkFromOnnxPath(str(bundle.file(graph.file)), strongly_typed=settings["strongly_typed"])
        log(f"building {name} ({len(profiles)} profile(s): {', '.join(shapes)})")
        t0 = time.perf_counter()
        try:
            plan = EngineBytesFromNetwork(network, config, save_timing_cache=str(timing_cache))()
        except PolygraphyException as e:  # parser errors and failed builds are reported as critical errors
            raise DsparkError(f"TensorRT could not build {name} from {graph.file}: {e}") from None
        file = f"{name}.plan"
        save_file(plan, str(out / file), description=f"{name} engine")  # IHostMemory exposes the buffer protocol
        info["engines"][name] = {
            "file": file,
            "onnx": graph.file,
            "profiles": {phase: {t: [list(s) for s in v] for t, v in p.items()} for phase, p in shapes.items()},
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
        # after every engine, so an interrupted build still lists what it finished
        info["build_seconds"] = round(time.perf_counter() - started, 1)
        (out / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out


def kept_engines(previous: dict, info: dict, rebuilt: list[str]) -> dict:
    """Entries of an earlier ``build.json`` that stay valid beside this build: engines it does not rebuild, when
    they were built with the same TensorRT, precision and TF32 setting (otherwise they are stale)."""
    same = all(previous.get(k) == info[k] for k in ("tensorrt", "precision", "strongly_typed", "tf32"))
    return {name: entry for name, entry in previous.get("engines", {}).items() if same and name not in rebuilt}
