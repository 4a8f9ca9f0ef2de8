"""Which runner computes a bundle graph: ``make_runner(bundle, graph, backend, threads, device)``.

- ``ort``: ONNX Runtime on the CPU (either graph flavour);
- ``torch``: the PyTorch modules rebuilt from the checkpoints the manifest records, on the CPU or a CUDA device;
- ``trt``: TensorRT engines from ``dspark build`` (standard-flavour bundles, a CUDA device).

A backend that cannot run here is refused with what is missing.
"""

from __future__ import annotations

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.runtime.runners import DEVICES, GraphRunner, OrtRunner

BACKENDS = ("ort", "torch", "trt")


def check_backend(backend: str, device: str) -> None:
    """Refuse a backend/device pair no runner offers, naming the choices (for torch, also a device it cannot use)."""
    if backend not in BACKENDS:
        raise DsparkError(f"backend {backend!r} is not available; choose one of {', '.join(BACKENDS)}")
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise DsparkError(f"device {device!r} is not supported; choose cpu or cuda (or cuda:N)")
    if backend == "ort" and kind != "cpu":
        raise DsparkError("the ort backend runs on the CPU; use --backend torch or --backend trt on a CUDA device")
    if backend == "trt" and kind != "cuda":
        raise DsparkError("the trt backend runs TensorRT engines on a CUDA device; pass --device cuda")
    if backend == "torch":
        from dspark.runtime.torch_runner import torch_device  # imports torch, which the ort backend never needs

        torch_device(device)


def make_runner(bundle: Bundle, graph: str, backend: str = "ort", threads: int = 0, device: str = "cpu",
                cuda_graphs: bool = False) -> GraphRunner:
    """A runner for ``graph``; with ``cuda_graphs`` the trt backend replays one captured graph per shape bucket and
    a torch runner on a GPU one per call shape of its in-place decoder calls (ONNX Runtime runs on the CPU)."""
    check_backend(backend, device)
    if backend == "ort":
        return OrtRunner(bundle, graph, threads=threads, spin=graph == "target")
    if backend == "torch":
        from dspark.runtime.torch_runner import TorchRunner

        return TorchRunner(bundle, graph, device, threads, cuda_graphs=cuda_graphs)
    from dspark.runtime.trt import TrtRunner  # engines from 'dspark build' for this GPU and TensorRT version

    index = device.split(":")[1] if ":" in device else 0
    return TrtRunner(bundle, graph, cuda_graphs=cuda_graphs, device=int(index))
