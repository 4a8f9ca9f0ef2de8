"""Hugging Face checkpoint folders: ``config.json`` and safetensors weights loaded by tensor name.

Both layouts transformers writes are read: one ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Nothing here imports transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dspark.errors import DsparkError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise DsparkError(f"checkpoint folder not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise DsparkError(f"{folder} has no config.json; point at a Hugging Face checkpoint folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DsparkError(f"{path} is not valid JSON: {e}") from None


def weight_files(folder: str | Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text())
        return {name: folder / file for name, file in index["weight_map"].items()}
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise DsparkError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors weights are read")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


class WeightReader:
    """Reads tensors by name from a checkpoint folder, remembering which names were never asked for."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files = weight_files(folder)
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self.files:
            raise DsparkError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        with safe_open(self.files[name], framework="pt") as f:
            tensor = f.get_tensor(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise DsparkError(
                f"{self.folder}: tensor '{name}' has shape {list(tensor.shape)}, expected {list(shape)} from config.json"
            )
        self.used.add(name)
        return tensor

    def unused(self) -> list[str]:
        return sorted(set(self.files) - self.used)


def load_module_weights(module: torch.nn.Module, reader: WeightReader, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """Copy every parameter of ``module`` from the checkpoint tensor of the same (prefixed) name."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name in skip:
                continue
            tensor = reader.get(prefix + name, tuple(param.shape))
            param.copy_(tensor.to(param.dtype))


def save_checkpoint(folder: str | Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` the way transformers lays them out."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    path = folder / SINGLE_FILE
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors writes through a private temporary file


def read_draft_vocab(reader: WeightReader, size: int, target_vocab: int) -> torch.Tensor:
    """The ``draft_vocab`` tensor of a drafter predicting over ``size`` target tokens only: distinct target ids in
    0..target_vocab-1, most frequent first (the layout block drafters and draft LMs share)."""
    ids = reader.get("draft_vocab", (size,)).long()
    if int(ids.min()) < 0 or int(ids.max()) >= target_vocab or len(set(ids.tolist())) != len(ids):
        raise DsparkError(f"{reader.folder}: draft_vocab must hold {size} distinct target ids in 0..{target_vocab - 1}")
    return ids

