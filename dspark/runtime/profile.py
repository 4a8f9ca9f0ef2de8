"""``dspark profile``: how many target verify steps per second this machine runs, by rows and new tokens.

The table feeds the ``sps`` scheduler. Method: for every (rows, width) pair on the bundle's ladder, warm up,
then time repeated verify calls on a cache filled to ``context`` entries, round-robin over all pairs so drift
hits every pair alike, and keep the median. Stored in the bundle as ``profiles/<backend>-<device>.json``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time

import numpy as np
from tqdm import tqdm

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.runtime.decoder import decoder_cache, run_decoder
from dspark.runtime.backends import make_runner


def device_name(device: str = "cpu") -> str:
    """A file-name-safe name of the machine a backend runs on: the CPU model and core count, or the GPU model."""
    if device.startswith("cuda"):
        import torch

        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(torch.device(device)).lower()).strip("-")
    model = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
            model = found.group(1) if found else model
    except OSError:
        pass
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    return f"cpu-{slug}-{os.cpu_count()}c"


def profile_key(backend: str, device: str = "cpu") -> str:
    return f"profiles/{backend}-{device_name(device)}.json"


def load_table(bundle: Bundle, backend: str, device: str = "cpu") -> dict | None:
    return bundle.read_json(profile_key(backend, device))


def ladder(limit: int) -> list[int]:
    values, v = [], 1
    while v < limit:
        values.append(v)
        v *= 2
    return values + [limit]


def profile_bundle(bundle_dir, backend: str = "ort", threads: int = 0, context: int = 256, repeats: int = 20,
                   warmup: int = 3, progress: bool = True, device: str = "cpu") -> dict:
    if repeats < 1 or warmup < 0 or context < 0:
        raise DsparkError(f"need --repeats >= 1, --warmup >= 0 and --context >= 0 (got {repeats}, {warmup}, "
                          f"{context})")
    bundle = Bundle.open(bundle_dir)
    runner = make_runner(bundle, "target", backend, threads, device)
    limits = bundle.limits
    rows = ladder(limits.max_batch)
    widths = list(range(1, limits.max_verify_tokens + 1))
    context = min(context, limits.max_context - widths[-1])
    caches = {}
    for r in rows:
        cache = decoder_cache(bundle.target.config, r, bundle, device=runner.cache_device)
        cache.reserve(context + widths[-1])
        cache.lens[:] = context
        caches[r] = cache
    pairs = [(r, w) for r in rows for w in widths]
    vocab = bundle.target.config.vocab_size
    rng = np.random.default_rng(0)
    calls = {p: (lambda r=p[0], w=p[1]: run_decoder(runner, caches[r], [list(rng.integers(0, vocab, w)) for _ in range(r)]))
             for p in pairs}
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {p: [] for p in pairs}
    for _ in tqdm(range(repeats), desc="profile", disable=not progress, unit="pass"):
        for p in pairs:
            start = time.perf_counter()
            calls[p]()
            times[p].append(time.perf_counter() - start)
    table = {
        "backend": backend,
        "device": device_name(device),
        "threads": threads,
        "context": context,
        "repeats": repeats,
        "method": "median seconds per verify call, round-robin over (rows, width) after warm-up",
        "rows": rows,
        "widths": widths,
        "steps_per_second": [[1 / statistics.median(times[(r, w)]) for w in widths] for r in rows],
        "measured_unix": int(time.time()),
    }
    bundle.add_file(profile_key(backend, device), json.dumps(table, indent=2) + "\n")
    return table
