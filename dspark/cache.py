"""The one folder where dspark keeps what it can rebuild: demo bundles, converted GGUF checkpoints, fetched models."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """``$DSPARK_CACHE``, else ``$XDG_CACHE_HOME/dspark``, else ``~/.cache/dspark``."""
    if os.environ.get("DSPARK_CACHE"):
        return Path(os.environ["DSPARK_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dspark"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB pieces (model files are hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
