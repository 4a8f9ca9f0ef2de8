"""torch -> ONNX for one graph, with the checks that catch silent specialisation.

The dynamo exporter silently turns a dynamic dimension static when the example size is 1 (or when two
dimensions share an example size), so every graph is exported with distinct example sizes >= 2 and its
input and output dimensions are checked by name afterwards. Weights go to one external data file beside
the graph, so graphs above 2 GB work and a later pass can share identical tensors between graphs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from dspark.bundle import TensorSpec
from dspark.errors import DsparkError

OPSET = 20
# torch.export needs an upper bound for a named dimension; the real ranges live in the manifest
DIM_CEILING = 1 << 20


ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


def io_specs(values) -> list[TensorSpec]:
    """Name, dtype and shape (named dimensions as names) of graph inputs or outputs."""
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
        specs.append(TensorSpec(v.name, ONNX_TO_NUMPY[t.elem_type], shape))
    return specs


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines and cosmetic warnings (see cpu-measurements §1.4 item 7)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(level)


def export_graph(
    module: torch.nn.Module,
    example: dict[str, torch.Tensor],
    dynamic: dict[str, dict[int, str]],
    output_names: list[str],
    path: str | Path,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Export ``module(**example)`` to ``path`` (+ ``path.data``) and return its checked input/output specs.

    ``dynamic`` maps input name -> {axis: dimension name}. Dimensions with the same name are the same symbol.
    """
    path = Path(path)
    dims = {name: torch.export.Dim(name, min=0, max=DIM_CEILING) for axes in dynamic.values() for name in axes.values()}
    shapes = {name: {axis: dims[dim] for axis, dim in dynamic.get(name, {}).items()} or None for name in example}
    for name, axes in dynamic.items():
        for axis in axes:
            if example[name].shape[axis] < 2:
                raise ValueError(f"example size of {name} axis {axis} must be >= 2 to stay dynamic")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, _quiet(), torch.no_grad():
        raw = Path(tmp) / "raw.onnx"
        program = torch.onnx.export(
            module.eval(),
            (),
            kwargs=example,
            dynamic_shapes=shapes,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(example),
            output_names=output_names,
        )
        program.save(str(raw))
        model = onnx.load(str(raw))
    inputs, outputs = io_specs(model.graph.input), io_specs(model.graph.output)
    for spec in inputs:
        for axis, dim in dynamic.get(spec.name, {}).items():
            if spec.shape[axis] != dim:
                raise DsparkError(f"export specialised {spec.name} axis {axis} to {spec.shape[axis]} (wanted '{dim}')")
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    onnx.checker.check_model(str(path))
    return inputs, outputs
