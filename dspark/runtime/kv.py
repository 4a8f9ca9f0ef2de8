"""KV caches owned by the runtime: one preallocated buffer per model, one row per sequence.

Layout [layer, row, kv_head, position, head_dim] (the manifest's ``kv_layout``). The whole buffer is the cache
window a graph reads, bound without a copy; its position capacity doubles when a row needs more room (capped
at the bundle's max context), so the window stays within 2x the longest row and growth copies are amortised.
Rejected tokens are rolled back by lowering a row's length: stale entries past it are masked by the graph.
The buffers are numpy arrays on the host, or torch tensors on a device (``device``) for a torch runner there,
which then updates them in place without copying the cache across each call; the lengths stay on the host.
"""

from __future__ import annotations

import numpy as np

from dspark.errors import DsparkError


def fill_order(alive: list[bool]) -> list[int]:
    """The rows to keep, as ``keep_rows`` takes them (new slot i holds old row order[i]): rows that stay within the
    new row count keep their slots and the survivors past it fill the slots of the finished ones, so a finished
    request costs at most one row's move, not a shift of every row after it."""
    n = sum(alive)
    movers = iter(r for r in range(n, len(alive)) if alive[r])
    return [r if alive[r] else next(movers) for r in range(n)]


class KVCache:
    """``k``/``v`` are views of the first ``rows`` rows of preallocated buffers: rows leave and join without
    copying the others (a leaving row's slot is filled by moving a row from the end, ``fill_order``; a joining row
    is written after the last one), so continuous batching does not copy the whole cache each time a request starts
    or ends. For a given layer, the rows of the view are contiguous (layer is the outer axis), which is what
    in-place graphs bind.
    """

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, dtype, max_len: int, capacity: int = 64,
                 device: str | None = None):
        self.max_len = max_len
        self.dtype, self.device = np.dtype(dtype), device
        shape = (layers, rows, kv_heads, min(capacity, max_len), head_dim)
        self._k = self._zeros(shape)
        self._v = self._zeros(shape)
        self.lens = np.zeros(rows, dtype=np.int64)

    def _zeros(self, shape: tuple):
        if self.device is None:
            return np.zeros(shape, dtype=self.dtype)
        import torch

        return torch.zeros(shape, dtype=getattr(torch, self.dtype.name), device=self.device)

    @property
    def rows(self) -> int:
        return len(self.lens)

    @property
    def k(self) -> np.ndarray:
        return self._k[:, : self.rows]

    @property
    def v(self) -> np.ndarray:
        return self._v[:, : self.rows]

    @property
    def capacity(self) -> int:
        return self._k.shape[3]

    def _reallocate(self, rows: int, positions: int) -> None:
        """New buffers of ``rows`` x ``positions``, holding the live rows' contents."""
        n, old = self.rows, self._k.shape[3]
        for name in ("_k", "_v"):
            buffer = getattr(self, name)
            new = self._zeros(tuple(buffer.shape[:1]) + (rows,) + tuple(buffer.shape[2:3]) + (positions,)
                              + tuple(buffer.shape[4:]))
            new[:, :n, :, : min(old, positions)] = buffer[:, :n, :, :positions]
            setattr(self, name, new)

    def reserve(self, length: int, padded: int = 0) -> None:
        """Make room for ``length`` positions in every row, and buffer capacity for ``padded`` (an in-place graph
        writes each row's whole padded chunk, so a row near the context limit may need slots past it)."""
        if length > self.max_len:
            raise DsparkError(f"sequence needs {length} positions but the bundle's max context is {self.max_len}")
        needed = max(length, padded)
        if needed > self.capacity:
            self._reallocate(self._k.shape[1], max(needed, min(self.max_len, 2 * self.capacity)))

    def keep_rows(self, rows: list[int]) -> None:
        """Keep the listed rows, old row ``rows[i]`` becoming row i, dropping the others. A row that changes slot
        must move into the slot of a dropped row (``fill_order`` or ascending order give that); only moved rows
        are copied, their live positions only (entries past a row's length are masked)."""
        if rows == list(range(self.rows)):
            return
        kept = set(rows)
        for slot, row in enumerate(rows):
            if row != slot:
                if slot in kept and rows.index(slot) > slot:
                    raise ValueError(f"keep_rows: row {row} would overwrite row {slot} before it moves")
                live = int(self.lens[row])
                self._k[:, slot, :, :live] = self._k[:, row, :, :live]
                self._v[:, slot, :, :live] = self._v[:, row, :, :live]
        self.lens = self.lens[rows].copy()

    def add_rows(self, other: "KVCache") -> None:
        """Append ``other``'s rows (freshly prefilled sequences) after this cache's rows."""
        n, m = self.rows, other.rows
        # rows grow to what is running, never past it: the batch is capped, so this happens a few times at most
        rows, capacity = max(n + m, self._k.shape[1]), max(self.capacity, other.capacity)
        if (rows, capacity) != (self._k.shape[1], self.capacity):
            self._reallocate(rows, capacity)
        width = other.capacity
        self._k[:, n : n + m, :, :width] = other.k
        self._v[:, n : n + m, :, :width] = other.v
        self.lens = np.concatenate([self.lens, other.lens])

    def empty_like(self, rows: int) -> "KVCache":
        layers, _, heads, _, dim = self._k.shape
        return KVCache(layers, rows, heads, dim, self.dtype, self.max_len, device=self.device)

    def advance(self, counts) -> None:
        """Count the first ``counts[r]`` positions past each row's length, already written by an in-place graph."""
        self.lens += np.asarray(counts, dtype=np.int64)

    def append(self, new_k: np.ndarray, new_v: np.ndarray, counts) -> None:
        """Write the first ``counts[r]`` new positions of each row at that row's length and advance it."""
        self.reserve(int(max(self.lens + np.asarray(counts))))
        if self.device is not None:
            import torch

            new_k, new_v = (torch.from_numpy(np.ascontiguousarray(x)).to(self.device) for x in (new_k, new_v))
        for row, count in enumerate(counts):
            if count:
                start = self.lens[row]
                self.k[:, row, :, start : start + count] = new_k[:, row, :, :count]
                self.v[:, row, :, start : start + count] = new_v[:, row, :, :count]
                self.lens[row] += count
