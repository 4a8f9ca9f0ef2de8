"""Calls of a decoder step graph over ragged rows, and the caches they read."""

from __future__ import annotations

import numpy as np

from dspark.bundle import Bundle
from dspark.runtime.kv import KVCache
from dspark.runtime.runners import GraphRunner


def decoder_cache(config: dict, rows: int, bundle: Bundle) -> KVCache:
    dtype = np.float16 if bundle.manifest["dtype"] == "fp16" else np.float32
    return KVCache(
        config["num_layers"], rows, config["num_kv_heads"], config["head_dim"], dtype, bundle.limits["max_context"]
    )


def run_decoder(runner: GraphRunner, cache: KVCache, parts: list[list[int]]) -> dict[str, np.ndarray]:
    """One decoder-graph call on ragged rows (right-padded); nothing is committed."""
    width = max(1, max(len(p) for p in parts))
    ids = np.zeros((len(parts), width), dtype=np.int64)
    for r, part in enumerate(parts):
        ids[r, : len(part)] = part
    positions = cache.lens[:, None] + np.arange(width, dtype=np.int64)[None, :]
    return runner.run(
        {"input_ids": ids, "position_ids": positions, "cache_lens": cache.lens.copy(), "past_k": cache.k, "past_v": cache.v}
    )


def feed(runner: GraphRunner, cache: KVCache, pieces: list[list[int]], chunk: int, features=None) -> list:
    """Run ``pieces[r]`` through a decoder graph in chunks, committing all of it; return each row's last logits.

    Rows with nothing to feed ride along on one dummy token that is never committed (their result is None).
    With a ``features`` list, each row's tapped target features are appended to ``features[r]``.
    """
    last = [None] * len(pieces)
    offset = 0
    while offset == 0 or any(len(p) > offset for p in pieces):
        parts = [p[offset : offset + chunk] for p in pieces]
        out = run_decoder(runner, cache, parts)
        cache.append(out["new_k"], out["new_v"], [len(p) for p in parts])
        for r, part in enumerate(parts):
            if part:
                last[r] = out["logits"][r, len(part) - 1].copy()
                if features is not None:
                    features[r].append(out["hidden"][r, : len(part)].copy())
        offset += chunk
    return last
