"""Bucket ladders for CUDA-graph capture: a graph is captured per (batch, verify length, cache window) bucket.

A captured graph replays fixed shapes, so every call is padded up to the smallest bucket that holds it. Buckets
are powers of two clipped to the manifest's range for the dimension, with the range's maximum always a bucket,
so a few graphs cover every legal size and padding never more than doubles the work. Padding is safe for our
graphs: extra batch rows and trailing new tokens sit after every real token (causal masking keeps them out of
real rows), and cache-window padding lies past ``cache_lens`` where the graphs mask it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dspark.bundle import Bundle, TensorSpec
from dspark.errors import DsparkError


@dataclass(frozen=True)
class Ladder:
    """The buckets of one dimension: sorted sizes, the last being the dimension's maximum."""

    name: str
    sizes: tuple[int, ...]

    @classmethod
    def powers_of_two(cls, name: str, low: int, high: int) -> "Ladder":
        if high < max(low, 1):
            raise DsparkError(f"dimension {name}: range [{low}, {high}] has no size >= 1 to bucket")
        sizes, size = [], 1
        while size < high:
            if size >= low:
                sizes.append(size)
            size *= 2
        return cls(name, tuple(sizes) + (high,))

    def select(self, value: int) -> int:
        """The smallest bucket >= value."""
        for size in self.sizes:
            if value <= size:
                return size
        raise DsparkError(f"{self.name} {value} exceeds the largest bucket {self.sizes[-1]} (the bundle's limit)")


@dataclass(frozen=True)
class Buckets:
    """The three ladders of the speculative step: rows, verified tokens per row, and cache window."""

    batch: Ladder
    verify: Ladder
    cache: Ladder

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "Buckets":
        limits = bundle.limits
        dims = bundle.graph("target").dims
        # the window must also hold the verify block written past the longest row
        return cls(
            Ladder.powers_of_two("batch", dims["batch"][0], limits.max_batch),
            Ladder.powers_of_two("verify length", 1, limits.max_verify_tokens),
            Ladder.powers_of_two("cache window", 1, limits.max_context + limits.max_verify_tokens),
        )

    def select(self, batch: int, verify: int, cache: int) -> tuple[int, int, int]:
        return self.batch.select(batch), self.verify.select(verify), self.cache.select(cache)

    def all(self) -> list[tuple[int, int, int]]:
        return [(b, v, c) for b in self.batch.sizes for v in self.verify.sizes for c in self.cache.sizes]


def pad_to(array: np.ndarray, axis: int, size: int, value=0) -> np.ndarray:
    """``array`` padded with ``value`` at the end of ``axis`` up to ``size`` (unchanged when already that size)."""
    extra = size - array.shape[axis]
    if extra < 0:
        raise ValueError(f"axis {axis} has {array.shape[axis]} entries, more than the bucket {size}")
    if extra == 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, extra)
    return np.pad(array, widths, constant_values=value)


def pad_feeds(feeds: dict[str, np.ndarray], specs: tuple[TensorSpec, ...], sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """Pad every named dimension of ``feeds`` (manifest input specs) to ``sizes[dim]``.

    Padded positions continue each row's positions and padded rows get zeros (cache length 0), which keeps
    real rows' results unchanged; callers slice outputs back to the real sizes.
    """
    padded = {}
    for spec in specs:
        array = feeds[spec.name]
        # trailing axes first, so padded batch rows are all zeros rather than continued positions
        for axis, dim in reversed(list(enumerate(spec.shape))):
            if isinstance(dim, str) and dim in sizes:
                if spec.name in ("position_ids", "positions") and axis == 1 and array.shape[1]:
                    tail = array[:, -1:] + np.arange(1, sizes[dim] - array.shape[1] + 1, dtype=array.dtype)
                    array = np.concatenate([array, tail], axis=1)
                else:
                    array = pad_to(array, axis, sizes[dim])
        padded[spec.name] = array
    return padded
