"""KV caches owned by the runtime: one preallocated buffer per model, one row per sequence.

Layout [layer, row, kv_head, position, head_dim] (the manifest's ``kv_layout``). The whole buffer is the cache
window a graph reads, bound without a copy; its position capacity doubles when a row needs more room (capped
at the bundle's max context), so the window stays within 2x the longest row and growth copies are amortised.
Rejected tokens are rolled back by lowering a row's length: stale entries past it are masked by the graph.
"""

from __future__ import annotations

import numpy as np

from dspark.errors import DsparkError


class KVCache:
    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, dtype, max_len: int, capacity: int = 64):
        self.max_len = max_len
        self.shape = (layers, rows, kv_heads, min(capacity, max_len), head_dim)
        self.k = np.zeros(self.shape, dtype=dtype)
        self.v = np.zeros(self.shape, dtype=dtype)
        self.lens = np.zeros(rows, dtype=np.int64)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, length: int, padded: int = 0) -> None:
        """Make room for ``length`` positions in every row, and buffer capacity for ``padded`` (an in-place graph
        writes each row's whole padded chunk, so a row near the context limit may need slots past it)."""
        if length > self.max_len:
            raise DsparkError(f"sequence needs {length} positions but the bundle's max context is {self.max_len}")
        needed = max(length, padded)
        if needed <= self.capacity:
            return
        capacity = max(needed, min(self.max_len, 2 * self.capacity))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = np.zeros(old.shape[:3] + (capacity, old.shape[4]), dtype=old.dtype)
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)

    def keep_rows(self, rows: list[int]) -> None:
        """Drop every row not listed (finished sequences); one copy of the remaining rows."""
        if rows == list(range(len(self.lens))):
            return
        self.k, self.v, self.lens = self.k[:, rows].copy(), self.v[:, rows].copy(), self.lens[rows].copy()

    def add_rows(self, other: "KVCache") -> None:
        """Append ``other``'s rows (freshly prefilled sequences) after this cache's rows."""
        capacity = max(self.capacity, other.capacity)
        parts_k, parts_v = [], []
        for cache in (self, other):
            pad = [(0, 0)] * 3 + [(0, capacity - cache.capacity), (0, 0)]
            parts_k.append(np.pad(cache.k, pad))
            parts_v.append(np.pad(cache.v, pad))
        self.k, self.v = np.concatenate(parts_k, axis=1), np.concatenate(parts_v, axis=1)
        self.lens = np.concatenate([self.lens, other.lens])

    def empty_like(self, rows: int) -> "KVCache":
        layers, _, heads, _, dim = self.k.shape
        return KVCache(layers, rows, heads, dim, self.k.dtype, self.max_len)

    def advance(self, counts) -> None:
        """Count the first ``counts[r]`` positions past each row's length, already written by an in-place graph."""
        self.lens += np.asarray(counts, dtype=np.int64)

    def append(self, new_k: np.ndarray, new_v: np.ndarray, counts) -> None:
        """Write the first ``counts[r]`` new positions of each row at that row's length and advance it."""
        self.reserve(int(max(self.lens + np.asarray(counts))))
        for row, count in enumerate(counts):
            if count:
                start = self.lens[row]
                self.k[:, row, :, start : start + count] = new_k[:, row, :, :count]
                self.v[:, row, :, start : start + count] = new_v[:, row, :, :count]
                self.lens[row] += count
