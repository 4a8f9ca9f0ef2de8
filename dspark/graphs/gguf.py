"""GGUF checkpoints (llama.cpp's one-file format) turned into Hugging Face checkpoint folders.

transformers' GGUF loader rebuilds the config and the fast tokenizer from the file's metadata and dequantizes
every tensor to fp32. That takes seconds to minutes, so its result is written once as an ordinary checkpoint
folder (config.json, fp32 model.safetensors, tokenizer files, generation_config.json) in a cache keyed by the
file's sha256; everything downstream reads that folder like any other, and a second export of the same file
only hashes it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from dspark.cache import cache_root, sha256_file
from dspark.errors import DsparkError
from dspark.graphs.checkpoint import save_checkpoint

# general.architecture -> the transformers class whose graph dspark builds (see dspark.graphs.decoder)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
INSTALL_HINT = 'pip install "dspark[gguf]"'
MAGIC = b"GGUF"
# a model stops on any of these: llama.cpp's end-of-sequence, end-of-turn and end-of-message tokens
STOP_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# fields of transformers' in-memory config that describe how it was loaded, not the model
LOAD_ONLY_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")


def is_gguf_file(path: Path) -> bool:
    """A regular file named ``*.gguf`` or starting with the GGUF magic bytes."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with path.open("rb") as f:
        return f.read(4) == MAGIC


def resolve_checkpoints(*paths: str | Path | None) -> tuple[list[Path | None], list[dict | None]]:
    """Checkpoint folders for ``paths``: folders as given, GGUF files converted (once, cached); None stays None.

    Every GGUF file is validated before any is converted, so a bad draft costs no conversion of the target.
    Returns (folders, sources); sources[i] describes the GGUF file behind folders[i] (None for a folder). A
    missing path is passed through for the folder reader to report.
    """
    paths = [None if p is None else Path(p) for p in paths]
    infos = []
    for path in paths:
        if path is None or path.is_dir() or not path.exists():
            infos.append(None)
        elif is_gguf_file(path):
            infos.append(inspect_gguf(path))
        else:
            raise DsparkError(f"{path} is neither a checkpoint folder nor a .gguf file; pass a Hugging Face checkpoint "
                              "folder (config.json + safetensors) or a GGUF file")
    resolved = [(path, None) if info is None else gguf_checkpoint(path, info) for path, info in zip(paths, infos)]
    return [folder for folder, _ in resolved], [source for _, source in resolved]


def _require_loader():
    """The gguf package and transformers' GGUF loader (transformers needs accelerate for it)."""
    try:
        import accelerate  # noqa: F401
        import gguf
        import transformers  # noqa: F401
    except ImportError as e:
        raise DsparkError(f"reading GGUF files needs the 'gguf' extra ({e.name} is missing): {INSTALL_HINT}") from None
    return gguf


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def inspect_gguf(path: Path) -> dict:
    """Validate a GGUF file before any conversion: architecture, completeness, tensor types.

    Returns {"architecture", "head_dim" (None when the file does not state it), "tensor_types": {GGML type
    name: count}, "stop_token_ids"}.
    """
    gguf = _require_loader()
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise DsparkError(f"{path} is not a GGUF file (it does not start with 'GGUF'); pass a .gguf model file "
                              "or a Hugging Face checkpoint folder")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise DsparkError(f"{path} is truncated or corrupt (GGUF reader: {_first_line(e)}); download it again") from None
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise DsparkError(f"{path} is truncated: its tensors need {end} bytes, the file has {size}; download it again")
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise DsparkError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                          f"{', '.join(ARCHITECTURES)} (convert another model to one of these)")
    types = Counter(t.tensor_type for t in reader.tensors)
    unreadable = [t.name for t in types if not _can_dequantize(gguf, t)]
    if unreadable:
        raise DsparkError(f"{path}: tensor type {', '.join(sorted(unreadable))} cannot be dequantized by transformers' "
                          "GGUF loader; re-quantize the model to a supported type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, "
                          "Q4_K, Q6_K, ...)")
    stops = [int(v) for v in (_field(reader, key) for key in STOP_KEYS) if v is not None]
    head_dim = _field(reader, f"{arch}.attention.key_length")
    return {
        "architecture": arch,
        "head_dim": None if head_dim is None else int(head_dim),
        "tensor_types": {t.name: n for t, n in sorted(types.items(), key=lambda item: item[0].name)},
        "stop_token_ids": list(dict.fromkeys(stops)),
    }


def _can_dequantize(gguf, qtype) -> bool:
    """Whether the gguf package (which transformers' loader calls) dequantizes ``qtype``: try one zero block."""
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros(block_bytes, dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def gguf_checkpoint(path: str | Path, info: dict | None = None) -> tuple[Path, dict]:
    """The cached checkpoint folder converted from the GGUF file at ``path`` (converting it on first use),
    and the file's description for the manifest. ``info`` is inspect_gguf's result when already taken."""
    path = Path(path)
    info = info or inspect_gguf(path)
    sha = sha256_file(path)
    source = {"file": str(path.resolve()), "sha256": sha, "bytes": path.stat().st_size,
              "architecture": info["architecture"], "tensor_types": info["tensor_types"]}
    folder = cache_root() / "gguf" / sha
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{sha}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert_gguf(path, tmp, info)
            if not folder.exists():  # another process may have finished the same file meanwhile
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, source


def convert_gguf(path: Path, out: Path, info: dict | None = None) -> None:
    """Write the GGUF file at ``path`` as an fp32 Hugging Face checkpoint folder ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    info = info or inspect_gguf(path)
    path = path.resolve()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        # transformers' loader takes a Qwen3 head_dim of 128 whatever the file says; the file's key length rules
        if info["head_dim"] is not None and getattr(config, "head_dim", None) not in (None, info["head_dim"]):
            config.head_dim = info["head_dim"]
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=torch.float32)
    except ImportError as e:  # e.g. a SentencePiece vocabulary needs packages the gguf extra does not pull in
        fix = f"pip install {e.name}" if e.name else "install the package it names"
        raise DsparkError(f"transformers could not read {path} ({_first_line(e)}); {fix}") from None
    except (ValueError, RuntimeError, KeyError) as e:
        # metadata that passed inspect_gguf but that transformers' loader rejects (a missing key, a shape mismatch)
        raise DsparkError(f"transformers could not load {path}: {_first_line(e)}; check that the file is a complete "
                          "llama/qwen2/qwen3 export") from None
    config = {k: v for k, v in model.config.to_dict().items() if k not in LOAD_ONLY_CONFIG_KEYS}
    config["architectures"] = [ARCHITECTURES[info["architecture"]]]
    config["dtype"] = "float32"
    tensors = model.state_dict()
    if config.get("tie_word_embeddings"):
        # the head shares the embedding's storage; a checkpoint stores it once, as transformers does
        tensors.pop("lm_head.weight", None)
    # transformers refuses save_pretrained on a GGUF-loaded model, so the weights are written directly
    save_checkpoint(out, config, tensors)
    del model, tensors
    tokenizer.save_pretrained(out)
    _template_into_tokenizer_config(out)
    _write_generation_config(out, config, info["stop_token_ids"])


def _template_into_tokenizer_config(out: Path) -> None:
    """Keep the chat template in tokenizer_config.json, where dspark's runtime and server look for it."""
    template_file = out / "chat_template.jinja"
    config_file = out / "tokenizer_config.json"
    tok_cfg = json.loads(config_file.read_text())
    if template_file.is_file():
        tok_cfg["chat_template"] = template_file.read_text()
        template_file.unlink()
    config_file.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")


def _write_generation_config(out: Path, config: dict, stop_ids: list[int]) -> None:
    eos = stop_ids or ([config["eos_token_id"]] if config.get("eos_token_id") is not None else [])
    generation = {"eos_token_id": eos if len(eos) != 1 else eos[0]}
    for key in ("bos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            generation[key] = config[key]
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def record_gguf_sources(models: dict, sources: dict[str, dict | None]) -> None:
    """Add each GGUF source (file, sha256, tensor types) to the manifest model entry of its role."""
    for role, source in sources.items():
        if source is not None and role in models:
            models[role]["gguf"] = source
