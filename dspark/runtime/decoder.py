"""Calls of a decoder step graph over ragged rows, and the caches they read.

Two graph flavours (the manifest's ``flavour`` of the graph) meet here and nowhere else in the loop:
- ``ort``: the graph writes every real new token's K/V into the cache buffers in place (GroupQueryAttention);
  committing a row's accepted tokens is raising its length, and rejected ones are simply not counted.
- ``standard`` (TensorRT's): the graph reads the cache window and returns ``new_k``/``new_v``; committing copies
  the accepted positions into the cache.
"""

from __future__ import annotations

import numpy as np

from dspark.bundle import SLOTS_PAST_CALL, Bundle, ModelConfig
from dspark.runtime.kv import KVCache
from dspark.runtime.runners import GraphRunner


def cache_dtype(bundle: Bundle) -> type:
    return np.float16 if bundle.dtype == "fp16" else np.float32


def decoder_cache(config: ModelConfig, rows: int, bundle: Bundle, device: str | None = None) -> KVCache:
    """An empty cache for ``config``'s decoder; ``device``: where its buffers live (a runner's ``cache_device``)."""
    return KVCache(config.num_layers, rows, config.num_kv_heads, config.head_dim, cache_dtype(bundle),
                   bundle.limits.max_context, device=device)


def run_decoder(runner: GraphRunner, cache: KVCache, parts: list[list[int]], last_only: bool = False) -> dict:
    """One decoder-graph call on ragged rows (right-padded); nothing is committed.

    ``out["logits"][r, j]`` is row r's j-th new token's logits, or with ``last_only`` ([B, 1, V]) its last one's.
    """
    rows = len(parts)
    counts = np.fromiter((len(p) for p in parts), dtype=np.int64, count=rows)
    width = max(1, int(counts.max(initial=0)))
    ids = np.zeros((rows, width), dtype=np.int64)
    for r, part in enumerate(parts):
        ids[r, : len(part)] = part
    if runner.spec.in_place:
        # every row's padded chunk is written at its length, so each needs room for the whole width and the
        # target graph's slots past it
        cache.reserve(int((cache.lens + counts).max(initial=0)),
                      int(cache.lens.max(initial=0)) + width + SLOTS_PAST_CALL)
        index = np.maximum(counts - 1, 0)[:, None] if last_only else np.broadcast_to(np.arange(width), (rows, width))
        feeds = {"input_ids": ids, "cache_lens": cache.lens.astype(np.int32), "query_lens": counts.astype(np.int32),
                 "logit_index": index}
        return runner.run(feeds, cache=cache)
    positions = cache.lens[:, None] + np.arange(width, dtype=np.int64)[None, :]
    out = runner.run(
        {"input_ids": ids, "position_ids": positions, "cache_lens": cache.lens.copy(), "past_k": cache.k, "past_v": cache.v}
    )
    if last_only:
        out = dict(out, logits=out["logits"][np.arange(rows), np.maximum(counts - 1, 0)][:, None])
    return out


def commit(cache: KVCache, out: dict, counts) -> None:
    """Keep the first ``counts[r]`` new tokens of each row of the call that returned ``out``."""
    if "new_k" in out:
        cache.append(out["new_k"], out["new_v"], counts)
    else:
        cache.advance(counts)


def feed(runner: GraphRunner, cache: KVCache, pieces: list[list[int]], chunk: int, features=None) -> list:
    """Run ``pieces[r]`` through a decoder graph in chunks, committing all of it; return each row's last logits.

    Rows with nothing left to feed ride along without new tokens (their result is None). With a ``features``
    list, each row's tapped target features are appended to ``features[r]``.
    """
    last = [None] * len(pieces)
    offset = 0
    while offset == 0 or any(len(p) > offset for p in pieces):
        parts = [p[offset : offset + chunk] for p in pieces]
        out = run_decoder(runner, cache, parts, last_only=True)
        commit(cache, out, [len(p) for p in parts])
        for r, part in enumerate(parts):
            if part:
                last[r] = out["logits"][r, 0].copy()
                if features is not None:
                    features[r].append(out["hidden"][r, : len(part)].copy())
        offset += chunk
    return last
