"""Store tensors that several graphs hold only once.

A DeepSpec drafter checkpoint carries bit-identical copies of the target's embedding and LM head. After export,
every external-data tensor of a draft graph whose bytes equal one of the target graph's is pointed at the
target's data file, and the draft's own data file is rewritten without it. ONNX Runtime and TensorRT's parser
resolve external data by (location, offset, length), so nothing else changes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo


def _external(model: onnx.ModelProto):
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor, ExternalDataInfo(tensor)


def _read(folder: Path, info: ExternalDataInfo) -> bytes:
    with open(folder / info.location, "rb") as f:
        f.seek(info.offset or 0)
        return f.read(info.length)


def _set_location(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def share_identical_tensors(folder: Path, source: str, graphs: list[str]) -> dict:
    """Point identical tensors of ``graphs`` at ``source``'s data file; returns {graph: shared bytes}."""
    source_model = onnx.load(str(folder / source), load_external_data=False)
    index = {}
    for _, info in _external(source_model):
        data = _read(folder, info)
        index.setdefault((len(data), hashlib.sha256(data).hexdigest()), info)
    report = {}
    for graph in graphs:
        path = folder / graph
        model = onnx.load(str(path), load_external_data=False)
        data_file = graph + ".data"
        own = bytearray()
        shared = 0
        for tensor, info in _external(model):
            data = _read(folder, info)
            match = index.get((len(data), hashlib.sha256(data).hexdigest()))
            if match is not None and len(data) >= 1024:
                _set_location(tensor, match.location, match.offset or 0, match.length or len(data))
                shared += len(data)
            else:
                _set_location(tensor, data_file, len(own), len(data))
                own += data
        (folder / data_file).write_bytes(bytes(own))
        onnx.save_model(model, str(path))
        report[graph] = shared
    return report
