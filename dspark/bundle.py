"""The bundle: a folder of ONNX graphs, tokenizer files and ``manifest.json`` that every runtime reads.

The manifest is the contract with other runtimes (a C++ host reads nothing else): graph I/O with dtypes and
named dynamic dimensions and their ranges, TensorRT profile shapes per phase, the KV layout the runtime owns,
the draft method and its settings, stop tokens, and the sha256 of every file. Opening a bundle checks that
the files on disk are the ones the manifest names. This module needs neither torch nor onnx.

The manifest is read here and nowhere else: ``Bundle.open`` checks every field the runtimes use and turns it into
frozen dataclasses (``Limits``, ``GraphSpec``, ``TargetEntry``, ``DraftEntry``, ``TokenizerInfo``); a field missing
or of the wrong type refuses the bundle with one line naming it. The draft length (tokens drafted per round: a
draft LM's K, a DSpark/DFlash drafter's block) is stored once, as ``models.draft.draft_length``; a block drafter's
exported config leaves out its ``block_size``, which is that same number. Schema 1 stored it twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from dspark.errors import DsparkError

SCHEMA_VERSION = 2  # 2: the draft length stored once, as models.draft.draft_length
MANIFEST = "manifest.json"
# cache slots an in-place target graph writes past each call's chunk: its attention sees one zero row beyond the
# chunk, so a token's numbers do not depend on the call that computes it (dspark.export.ort_graph: exact rows)
SLOTS_PAST_CALL = 1


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


def file_identity(path: Path) -> tuple:
    """What tells one version of a file from another cheaply (path, modification time, size): the key of objects
    a process builds once per file (ONNX Runtime sessions, lookup store indexes)."""
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


class ManifestProblem(Exception):
    """What is missing or mistyped in a manifest, as one line naming the field."""


JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "an integer", bool: "true or false"}
_REQUIRED = object()


def _checked(value, kind: type, where: str):
    # bool is an int to Python, never to the manifest
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ManifestProblem(f"'{where}' must be {JSON_KINDS[kind]}, not {json.dumps(value)[:40]}")
    return value


class _Fields:
    """One JSON object of the manifest, read field by field; anything wrong names its dotted path."""

    def __init__(self, value, where: str):
        self.value, self.where = _checked(value, dict, where or "manifest"), where

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type, default=_REQUIRED):
        """The field, of ``kind``; ``default`` when it is missing or null, and then it may be."""
        value = self.value.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ManifestProblem(f"'{self.path(key)}' is missing")
            return default
        return _checked(value, kind, self.path(key))

    def count(self, key: str) -> int:
        value = self.get(key, int)
        if value < 1:
            raise ManifestProblem(f"'{self.path(key)}' must be at least 1, got {value}")
        return value

    def ints(self, key: str, default=_REQUIRED) -> tuple[int, ...]:
        items = self.get(key, list, default)
        return tuple(_checked(v, int, f"{self.path(key)}[{i}]") for i, v in enumerate(items))

    def strs(self, key: str) -> tuple[str, ...]:
        return tuple(_checked(v, str, f"{self.path(key)}[{i}]") for i, v in enumerate(self.get(key, list)))

    def fields(self, key: str) -> "_Fields":
        return _Fields(self.get(key, dict), self.path(key))

    def optional(self, key: str) -> "_Fields | None":
        """The object at ``key``, or None when it is missing or null."""
        return None if self.value.get(key) is None else self.fields(key)

    def members(self, key: str, default=_REQUIRED) -> dict[str, "_Fields"]:
        return {name: _Fields(value, f"{self.path(key)}.{name}") for name, value in self.get(key, dict, default).items()}


@dataclass(frozen=True)
class Limits:
    """The largest calls the graphs were exported for."""

    max_batch: int
    max_context: int
    prefill_chunk: int
    max_verify_tokens: int  # target tokens one verify call takes: the anchor and at most max_verify_tokens - 1 drafts

    @classmethod
    def read(cls, f: _Fields) -> "Limits":
        return cls(*(f.count(name) for name in ("max_batch", "max_context", "prefill_chunk", "max_verify_tokens")))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64
    shape: tuple  # ints for static sizes, names for dynamic ones

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def read(cls, value, where: str) -> "TensorSpec":
        f = _Fields(value, where)
        shape = f.get("shape", list)
        for i, d in enumerate(shape):
            if not isinstance(d, (int, str)) or isinstance(d, bool):
                raise ManifestProblem(f"'{f.path('shape')}[{i}]' must be a size or a dimension name, not {json.dumps(d)[:40]}")
        return cls(f.get("name", str), f.get("dtype", str), tuple(shape))


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph: its file, I/O, named dimensions' ranges and TensorRT profiles."""

    name: str
    file: str
    flavour: str  # "ort": ONNX Runtime's fused operators (a decoder graph's KV cache written in place); "standard": plain ONNX for TensorRT
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, tuple[int, int]]  # dimension name -> (min, max)
    profiles: dict[str, dict[str, tuple[int, int, int]]]  # phase -> dimension name -> (min, opt, max)

    @property
    def fused(self) -> bool:
        """ONNX Runtime's fused operators, which TensorRT does not parse."""
        return self.flavour == "ort"

    @property
    def in_place(self) -> bool:
        """A fused decoder graph: it writes each layer's KV cache (past_key.i / past_value.i) in place."""
        return self.fused and any(spec.name.startswith("past_key.") for spec in self.inputs)

    @classmethod
    def read(cls, name: str, f: _Fields) -> "GraphSpec":
        specs = {key: tuple(TensorSpec.read(v, f"{f.path(key)}[{i}]") for i, v in enumerate(f.get(key, list)))
                 for key in ("inputs", "outputs")}
        dims = {dim: _numbers(value, 2, f"{f.path('dims')}.{dim}") for dim, value in f.get("dims", dict, {}).items()}
        profiles = {phase: {dim: _numbers(value, 3, p.path(dim)) for dim, value in p.value.items()}
                    for phase, p in f.members("profiles", {}).items()}
        return cls(name, f.get("file", str), f.get("flavour", str, "standard"), specs["inputs"], specs["outputs"],
                   dims, profiles)


def _numbers(value, count: int, where: str) -> tuple[int, ...]:
    """A range of ``count`` ints: (min, max) or (min, opt, max)."""
    items = _checked(value, list, where)
    if len(items) != count:
        raise ManifestProblem(f"'{where}' must hold {count} integers, not {json.dumps(items)[:40]}")
    return tuple(_checked(v, int, f"{where}[{i}]") for i, v in enumerate(items))


@dataclass(frozen=True)
class ModelConfig:
    """The sizes of a model every runtime reads (the caches it allocates, the logits it expects)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    @classmethod
    def read(cls, f: _Fields) -> "ModelConfig":
        return cls(*(f.count(name) for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size",
                                                 "vocab_size")))


@dataclass(frozen=True)
class GgufSource:
    """The GGUF file a model was converted from (dequantized to fp32 before export)."""

    file: str
    sha256: str
    tensor_types: dict[str, int]  # GGML tensor type name -> how many tensors have it

    @classmethod
    def read(cls, f: _Fields | None) -> "GgufSource | None":
        return None if f is None else cls(f.get("file", str), f.get("sha256", str), f.get("tensor_types", dict))


@dataclass(frozen=True)
class TargetEntry:
    source: str  # the checkpoint folder it was exported from
    config: ModelConfig
    raw_config: dict  # the whole exported config (the checkpoint's settings as dspark read them)
    graphs: tuple[str, ...]
    tap_layers: tuple[int, ...]  # layers whose hidden states the target graph returns for a block drafter
    gguf: GgufSource | None

    @classmethod
    def read(cls, f: _Fields) -> "TargetEntry":
        config = f.fields("config")
        return cls(f.get("source", str), ModelConfig.read(config), config.value, f.strs("graphs"),
                   f.ints("tap_layers", ()), GgufSource.read(f.optional("gguf")))


DRAFT_METHODS = ("draft-lm", "dspark", "dflash")


@dataclass(frozen=True)
class DraftEntry:
    method: str  # one of DRAFT_METHODS
    source: str
    config: ModelConfig
    raw_config: dict
    graphs: tuple[str, ...]
    draft_length: int  # tokens drafted per round: a draft LM's K, a block drafter's block
    target_layer_ids: tuple[int, ...]  # block drafters: the target layers whose features they read
    confidence_head: bool  # block drafters: a confidence logit per drafted token
    gguf: GgufSource | None
    draft_vocab: tuple[int, ...] = ()  # drafters with a reduced vocabulary: the target ids their law is over

    @property
    def block(self) -> bool:
        return self.method != "draft-lm"

    @classmethod
    def read(cls, f: _Fields) -> "DraftEntry":
        method = f.get("method", str)
        if method not in DRAFT_METHODS:
            raise ManifestProblem(f"'{f.path('method')}' must be one of {', '.join(DRAFT_METHODS)}, not {method!r}")
        config = f.fields("config")
        block = method != "draft-lm"
        return cls(method, f.get("source", str), ModelConfig.read(config), config.value, f.strs("graphs"),
                   f.count("draft_length"), config.ints("target_layer_ids") if block else (),
                   config.get("enable_confidence_head", bool) if block else False, GgufSource.read(f.optional("gguf")),
                   f.ints("draft_vocab", ()))


@dataclass(frozen=True)
class TokenizerInfo:
    files: tuple[str, ...]
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None
    has_chat_template: bool

    @classmethod
    def read(cls, f: _Fields) -> "TokenizerInfo":
        return cls(f.strs("files"), f.ints("eos_token_ids"), f.get("bos_token_id", int, None),
                   f.get("pad_token_id", int, None), f.get("has_chat_template", bool, False))


@dataclass(frozen=True)
class FileRecord:
    bytes: int
    sha256: str


@dataclass
class Bundle:
    """An opened bundle: the manifest's fields, typed and checked once, as attributes.

    ``manifest`` keeps the JSON as read, for what writes it back (``add_file``) or hands it on whole.
    """

    path: Path
    manifest: dict
    dtype: str  # "fp32" or "fp16": the graphs' float tensors and the KV caches
    quantize: str | None  # the target's weight quantization (int4, int8) or None
    limits: Limits
    graphs: dict[str, GraphSpec]
    target: TargetEntry
    draft: DraftEntry | None
    tokenizer: TokenizerInfo
    files: dict[str, FileRecord]

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
        try:
            bundle = cls.read(path, manifest)
        except ManifestProblem as e:
            raise DsparkError(f"{manifest_path} is not a dspark manifest: {e}; re-export the bundle") from None
        if verify:
            bundle.verify()
        return bundle

    @classmethod
    def read(cls, path: Path, manifest: dict) -> "Bundle":
        """The typed bundle of a manifest; ManifestProblem names the first field missing or mistyped."""
        m = _Fields(manifest, "")
        # the sections first, so a manifest missing one says so before any field inside another
        dtype = m.get("dtype", str)
        sections = {key: m.fields(key) for key in ("files", "graphs", "models", "tokenizer", "limits")}
        limits = Limits.read(sections["limits"])
        target = TargetEntry.read(sections["models"].fields("target"))
        tokenizer = TokenizerInfo.read(sections["tokenizer"])
        files = {}
        for rel, record in sections["files"].value.items():
            if not (isinstance(record, dict) and isinstance(record.get("bytes"), int) and isinstance(record.get("sha256"), str)):
                raise ManifestProblem(f"files['{rel}'] needs 'bytes' and 'sha256'")
            files[rel] = FileRecord(record["bytes"], record["sha256"])
        graphs = {name: GraphSpec.read(name, g) for name, g in m.members("graphs").items()}
        draft = sections["models"].optional("draft")
        draft = None if draft is None else DraftEntry.read(draft)
        return cls(path, manifest, dtype, m.get("quantize", str, None), limits, graphs, target, draft, tokenizer, files)

    def verify(self) -> None:
        """Refuse the bundle when a file the manifest names is missing, resized or changed."""
        problems = []
        for rel, record in self.files.items():
            file = self.path / rel
            if not file.is_file():
                problems.append(f"{rel} is missing")
            elif file.stat().st_size != record.bytes:
                problems.append(f"{rel} has {file.stat().st_size} bytes, the manifest says {record.bytes}")
            elif sha256_file(file) != record.sha256:
                problems.append(f"{rel} has changed (sha256 differs from the manifest)")
        if problems:
            raise DsparkError(f"bundle {self.path} does not match its manifest: " + "; ".join(problems) + "; re-export it")

    def add_file(self, rel: str, content: str | bytes) -> Path:
        """Write a file derived on this machine (a profile, a calibration, a lookup store) and record it in the
        manifest."""
        path = self.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, content)
        self.files[rel] = FileRecord(path.stat().st_size, sha256_file(path))
        self.manifest["files"][rel] = {"bytes": self.files[rel].bytes, "sha256": self.files[rel].sha256}
        _atomic_write(self.path / MANIFEST, json.dumps(self.manifest, indent=2) + "\n")
        return path

    def read_json(self, rel: str) -> dict | None:
        """A JSON file the manifest lists (verified on open), or None when the bundle has none."""
        return json.loads((self.path / rel).read_text()) if rel in self.files else None

    def file(self, rel: str) -> Path:
        return self.path / rel

    def graph(self, name: str) -> GraphSpec:
        return self.graphs[name]

    @property
    def models(self) -> dict[str, TargetEntry | DraftEntry]:
        """The target, and the draft when the bundle has one, by role."""
        return {"target": self.target} | ({"draft": self.draft} if self.draft else {})


def _atomic_write(path: Path, content: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        tmp.write_text(content)
    tmp.replace(path)


def write_manifest(folder: Path, manifest: dict) -> dict:
    manifest = dict(manifest, schema_version=SCHEMA_VERSION, files=file_records(folder))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
