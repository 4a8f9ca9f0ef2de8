"""``dspark demo``: the shipped model family, exported once (cached), plain against speculative decoding.

The family lives under ``examples/`` in the repository: a Qwen3-architecture target trained on Python
standard-library sources, a DSpark drafter and a draft LM trained against it (see each model card). The
bundle is cached under ``$XDG_CACHE_HOME/dspark`` keyed by the checkpoints' hashes, so a second run starts
at once and a changed checkpoint is re-exported.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from dspark.bundle import MANIFEST, Bundle
from dspark.errors import DsparkError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DRAFTS = {"dspark": "dspark-drafter", "draft-lm": "draft-lm"}


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dspark"


def checkpoint_digest(*folders: Path) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
            digest.update(path.name.encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def demo_bundle(draft: str = "dspark", examples: Path | None = None, log=print) -> Path:
    """Export the shipped target and ``draft`` into the cache unless an up-to-date bundle is there."""
    from dspark.export.bundle import ExportOptions, export_bundle

    if draft not in DRAFTS:
        raise DsparkError(f"unknown demo draft {draft!r}; choose one of {', '.join(DRAFTS)}")
    examples = examples or EXAMPLES
    target_dir, draft_dir = examples / "target", examples / DRAFTS[draft]
    for folder in (target_dir, draft_dir):
        if not (folder / "config.json").is_file():
            raise DsparkError(f"the shipped model {folder} is missing; run dspark demo from a full checkout of the repository")
    out = cache_root() / f"demo-{draft}-{checkpoint_digest(target_dir, draft_dir)}"
    if (out / MANIFEST).is_file():
        log(f"bundle: {out} (cached)")
        return out
    log(f"exporting the shipped pair to {out} (once; later runs reuse it)")
    export_bundle(target_dir, out, draft_dir, ExportOptions(max_batch=4, max_context=1024, prefill_chunk=128,
                                                            num_draft_tokens=4))
    return out


def run_demo(prompt: str, draft: str = "dspark", max_new_tokens: int = 96, threads: int = 0, log=print,
             backend: str = "ort", device: str = "cpu") -> dict:
    from dspark.runtime.generate import Generator, Request

    path = demo_bundle(draft, log=log)
    bundle = Bundle.open(path)
    results = {}
    for name, use_draft in (("plain", False), ("speculative", True)):
        gen = Generator(bundle, backend=backend, threads=threads, use_draft=use_draft, device=device)
        request = Request(gen.tokenizer.encode(prompt), max_new_tokens=max_new_tokens)
        gen.generate([request])  # warm-up: first calls allocate buffers
        started = time.perf_counter()
        seq = gen.generate([request], trace=True)[0]
        wall = time.perf_counter() - started
        results[name] = {"text": seq.text, "tokens": len(seq.generated), "seconds": wall,
                         "tokens_per_second": len(seq.generated) / wall, "stats": seq.stats(), "trace": seq.trace,
                         "ids": seq.generated}
    results["identical"] = results["plain"]["ids"] == results["speculative"]["ids"]
    results["speedup"] = results["speculative"]["tokens_per_second"] / results["plain"]["tokens_per_second"]
    results["bundle"] = str(path)
    return results
