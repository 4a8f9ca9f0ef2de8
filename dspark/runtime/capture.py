"""CUDA-graph capture and replay per shape bucket: the one helper every device runner uses.

A captured graph replays fixed shapes at fixed addresses, so callers pad each call to a bucket and keep their
buffers allocated once; this class owns the graphs, keyed by bucket. The first call of a bucket warms the work
up eagerly (kernels, allocators and TensorRT's per-shape setup must initialise outside capture), then captures
it and replays the capture; later calls replay. A bucket whose capture fails runs eagerly from then on, with
one warning: never a replay of a graph that does not exist.
"""

from __future__ import annotations

import warnings
from typing import Callable, Hashable

from dspark.errors import DsparkError


def cuda_capture(device, stream) -> Callable[[Callable[[], None]], object]:
    """``capture(work)`` -> a torch CUDA graph of ``work`` on ``stream`` (all graphs share one memory pool)."""
    import torch

    pool = torch.cuda.graph_pool_handle()

    def capture(work):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=pool, stream=stream):
            work()
        return graph

    return capture


class CudaGraphs:
    """Graphs by bucket key over ``capture`` (``cuda_capture`` on a GPU; anything returning an object with
    ``replay()``), or plain eager calls when ``capture`` is None.

    ``state`` lists tensors the work updates in place (lengths, anchors): the warm-up run's changes to them are
    undone before capture and again when a capture fails, so the call that captured a bucket still runs once.
    """

    def __init__(self, capture: Callable[[Callable[[], None]], object] | None, state: list | None = None,
                 synchronize: Callable[[], None] = lambda: None, name: str = ""):
        self.capture = capture
        self.state = state or []
        self.synchronize = synchronize
        self.name = name
        self.graphs: dict[Hashable, object | None] = {}

    @property
    def enabled(self) -> bool:
        return self.capture is not None

    def run(self, key: Hashable, work: Callable[[], None]) -> None:
        """Run ``work`` for bucket ``key``: replayed when captured, eager when capture is off or failed."""
        if self.capture is None:
            work()
            return
        if key not in self.graphs:
            self.graphs[key] = self._capture(key, work)
        graph = self.graphs[key]
        if graph is None:
            work()
        else:
            graph.replay()

    def _capture(self, key: Hashable, work: Callable[[], None]):
        saved = [t.clone() for t in self.state]
        work()  # warm-up outside capture
        self.synchronize()
        self._restore(saved)
        try:
            return self.capture(work)
        except (RuntimeError, DsparkError) as e:  # torch reports capture errors as RuntimeError
            warnings.warn(f"{self.name}: CUDA-graph capture failed for bucket {key} ({e}); that bucket runs eagerly",
                          stacklevel=3)
            self._restore(saved)
            return None

    def _restore(self, saved: list) -> None:
        for tensor, value in zip(self.state, saved):
            tensor.copy_(value)

    def forget(self, key: Hashable) -> None:
        """Drop bucket ``key``'s graph, if any (its memory goes back to the shared pool)."""
        self.graphs.pop(key, None)

    def captured(self) -> int:
        return sum(g is not None for g in self.graphs.values())
