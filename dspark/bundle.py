"""The bundle: a folder of ONNX graphs, tokenizer files and ``manifest.json`` that every runtime reads.

The manifest is the contract with other runtimes (a C++ host reads nothing else): graph I/O with dtypes and
named dynamic dimensions and their ranges, TensorRT profile shapes per phase, the KV layout the runtime owns,
the draft method and its settings, stop tokens, and the sha256 of every file. Opening a bundle checks that
the files on disk are the ones the manifest names. This module needs neither torch nor onnx.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from dspark.errors import DsparkError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(folder: Path) -> dict[str, dict]:
    """sha256 and size of every file under ``folder`` except the manifest, keyed by relative path."""
    records = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        records[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return records


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Bundle":
        path = Path(path)
        if path.is_file():
            raise DsparkError(f"{path} is a file, not a bundle folder; give the folder 'dspark export' wrote")
        if not path.is_dir():
            raise DsparkError(f"bundle folder not found: {path} (create one with 'dspark export')")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise DsparkError(f"{path} has no {MANIFEST}; it is not a dspark bundle (create one with 'dspark export')")
        try:
            manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
            raise DsparkError(f"{manifest_path} is not valid JSON ({type(e).__name__}: {str(e)[:120]}); re-export the bundle") from None
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if version != SCHEMA_VERSION:
            raise DsparkError(
                f"{path}: manifest schema version {version} is not the {SCHEMA_VERSION} this dspark reads; re-export it"
            )
        problem = manifest_problem(manifest)
        if problem:
            raise DsparkError(f"{manifest_path} is not a dspark manifest: {problem}; re-export the bundle")
        bundle = cls(path, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Refuse the bundle when a file the manifest names is missing, resized or changed."""
        problems = []
        for rel, record in self.manifest["files"].items():
            file = self.path / rel
            if not file.is_file():
                problems.append(f"{rel} is missing")
            elif file.stat().st_size != record["bytes"]:
                problems.append(f"{rel} has {file.stat().st_size} bytes, the manifest says {record['bytes']}")
            elif sha256_file(file) != record["sha256"]:
                problems.append(f"{rel} has changed (sha256 differs from the manifest)")
        if problems:
            raise DsparkError(f"bundle {self.path} does not match its manifest: " + "; ".join(problems) + "; re-export it")

    def add_file(self, rel: str, text: str) -> Path:
        """Write a file derived on this machine (a profile, a calibration) and record it in the manifest."""
        path = self.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, text)
        self.manifest["files"][rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        _atomic_write(self.path / MANIFEST, json.dumps(self.manifest, indent=2) + "\n")
        return path

    def read_json(self, rel: str) -> dict | None:
        """A JSON file the manifest lists (verified on open), or None when the bundle has none."""
        return json.loads((self.path / rel).read_text()) if rel in self.manifest["files"] else None

    def file(self, rel: str) -> Path:
        return self.path / rel

    def graph(self, name: str) -> dict:
        return self.manifest["graphs"][name]

    @property
    def limits(self) -> dict:
        return self.manifest["limits"]

    @property
    def target(self) -> dict:
        return self.manifest["models"]["target"]

    @property
    def draft(self) -> dict | None:
        return self.manifest["models"].get("draft")

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]


JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "an integer"}
# What every runtime reads from a manifest before it touches a graph: (dotted path, type), ints positive.
REQUIRED = [
    ("dtype", str), ("files", dict), ("graphs", dict), ("models", dict), ("tokenizer", dict), ("limits", dict),
    *((f"limits.{k}", int) for k in ("max_batch", "max_context", "prefill_chunk", "max_verify_tokens")),
    ("models.target", dict), ("models.target.config", dict),
    *((f"models.target.config.{k}", int) for k in ("num_layers", "num_kv_heads", "head_dim", "vocab_size")),
    ("tokenizer.eos_token_ids", list),
]


def manifest_problem(manifest: dict) -> str | None:
    """What is missing or mistyped in a manifest (one line), or None when runtimes can read it."""
    for dotted, kind in REQUIRED:
        value = manifest
        for key in dotted.split("."):
            if not isinstance(value, dict) or key not in value:
                return f"'{dotted}' is missing"
            value = value[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"'{dotted}' must be {JSON_KINDS[kind]}, not {json.dumps(value)[:40]}"
        if kind is int and value < 1:
            return f"'{dotted}' must be at least 1, got {value}"
    for rel, record in manifest["files"].items():
        if not (isinstance(record, dict) and isinstance(record.get("bytes"), int) and isinstance(record.get("sha256"), str)):
            return f"files['{rel}'] needs 'bytes' and 'sha256'"
    for name, graph in manifest["graphs"].items():
        if not (isinstance(graph, dict) and isinstance(graph.get("file"), str)):
            return f"graphs['{name}'] needs a 'file'"
    draft = manifest["models"].get("draft")
    if draft is not None and not (isinstance(draft, dict) and isinstance(draft.get("config"), dict)):
        return "'models.draft' needs a 'config'"
    return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_manifest(folder: Path, manifest: dict) -> dict:
    manifest = dict(manifest, schema_version=SCHEMA_VERSION, files=file_records(folder))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
