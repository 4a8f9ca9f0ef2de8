"""TensorRT readiness of exported graphs, checked on any machine without TensorRT.

The ONNX-TensorRT parser documents which operators and input types it imports; a graph that stays inside that
table, uses only the default ONNX domain without control flow, and whose dynamic dimensions are all the named
ones the manifest gives ranges for, parses and builds with the manifest's profiles. Data-dependent or unnamed
dimensions would defeat the profiles (and CUDA-graph capture), so they are errors. int64 is imported natively
by TensorRT 10+, but it doubles index traffic and TensorRT's own attention and KV-cache ops take int32, so
int64 uses are reported as warnings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from dspark.bundle import Bundle

# The ONNX-TensorRT parser's operator support matrix (onnx/onnx-tensorrt docs/operators.md, 10.0-GA revision:
# "opsets 9 to 20"), restricted to the operators LLM step graphs use; an operator outside this table is reported
# so that it gets checked against the document before it is relied on. Values: the element types the data input
# may have (F = FLOAT/FLOAT16/BFLOAT16) and the inputs that must be build-time constants.
MAX_OPSET = 20
F = ("FLOAT", "FLOAT16", "BFLOAT16")
I = ("INT32", "INT64")
B = ("BOOL",)
SUPPORTED: dict[str, dict] = {
    **{op: {"types": F + I} for op in ("Add", "Sub", "Mul", "Div", "Max", "Min", "Neg", "Abs", "Sum", "Mean")},
    **{op: {"types": F + I} for op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")},
    **{op: {"types": F} for op in ("Cos", "Sin", "Exp", "Log", "Sqrt", "Reciprocal", "Pow", "Erf", "Tanh", "Sigmoid",
                                    "Relu", "Softmax", "LogSoftmax", "MatMul", "Gemm", "Floor", "Ceil", "Round")},
    **{op: {"types": B} for op in ("And", "Or", "Xor", "Not")},
    **{op: {"types": F + I, "constant": (1,)} for op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
                                                          "ReduceProd", "ReduceSumSquare", "ReduceL2")},
    **{op: {"types": F + I + B + ("UINT8",)} for op in ("Cast", "Identity", "Shape", "Size", "Reshape", "Transpose",
                                                          "Concat", "Expand", "Tile", "Flatten", "Split")},
    "Where": {"types": B},  # the condition input; the branches follow the Expand/Concat types
    "Constant": {"types": ()},
    "ConstantOfShape": {"types": I},
    "Range": {"types": F + I},
    "Gather": {"types": F + I + B},
    "GatherElements": {"types": F + I + B},
    "GatherND": {"types": F + I + B},
    "ScatterND": {"types": F + I + B},
    "ScatterElements": {"types": F + I + B},
    "Slice": {"types": F + I + B, "constant": (3,)},
    "Squeeze": {"types": F + I + B, "constant": (1,)},
    "Unsqueeze": {"types": F + I + B, "constant": (1,)},
    "Trilu": {"types": F + I + B},
    "ArgMax": {"types": F},
    "ArgMin": {"types": F},
    "TopK": {"types": F, "constant": (1,)},
    "CumSum": {"types": F + I, "constant": (1,)},
    "Clip": {"types": F + I},
    "LayerNormalization": {"types": F},
}
CONTROL_FLOW = {"If", "Loop", "Scan"}
INT64 = onnx.TensorProto.INT64


@dataclass(frozen=True)
class Finding:
    where: str  # node name, or the graph input/output
    op: str
    message: str


@dataclass
class LintReport:
    graph: str
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        lines = [f"{self.graph}: {'ok' if self.ok else 'FAIL'} ({len(self.errors)} errors, {len(self.warnings)} warnings)"]
        lines += [f"  error   {f.where} [{f.op}]: {f.message}" for f in self.errors]
        lines += [f"  warning {f.where} [{f.op}]: {f.message}" for f in self.warnings]
        return "\n".join(lines)


def _dims_problems(value, allowed: set[str] | None) -> list[str]:
    """Why a graph input/output shape would defeat the profiles: unnamed, data-dependent or out-of-manifest dims."""
    problems = []
    for axis, d in enumerate(value.type.tensor_type.shape.dim):
        if d.HasField("dim_value"):
            continue
        if not d.HasField("dim_param") or d.dim_param.startswith("unk__"):
            problems.append(f"axis {axis} has no name (data-dependent or lost in export)")
        elif allowed is not None and d.dim_param not in allowed:
            problems.append(f"axis {axis} is '{d.dim_param}', which has no range in the manifest")
    return problems


def lint_model(model: onnx.ModelProto, name: str, dims: set[str] | None = None) -> LintReport:
    """Lint one ONNX model; ``dims`` are the dimension names the manifest gives ranges for (None: don't check)."""
    report = LintReport(name)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > MAX_OPSET:
            report.errors.append(Finding("model", "opset", f"opset {opset.version} is above the parser's {MAX_OPSET}"))
    declared = model.graph  # I/O shapes as TensorRT will see them, before inference refines them
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError as e:  # TensorRT's parser would trip over the same inconsistency
        report.errors.append(Finding("model", "shape", f"strict ONNX shape inference fails: {e}"))
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    constants = {t.name for t in graph.initializer}
    constants.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    for kind, values in (("input", declared.input), ("output", declared.output)):
        for value in values:
            for problem in _dims_problems(value, dims):
                report.errors.append(Finding(f"{kind} {value.name}", "shape", problem))
            if value.type.tensor_type.elem_type == INT64:
                report.warnings.append(Finding(f"{kind} {value.name}", "int64", "int64 graph I/O (bind int64 buffers)"))
    int64_ops = Counter()
    for node in graph.node:
        where = node.name or node.output[0]
        if node.domain not in ("", "ai.onnx"):
            report.errors.append(Finding(where, node.op_type, f"custom domain '{node.domain}' needs a TensorRT plugin"))
            continue
        if node.op_type in CONTROL_FLOW:
            report.errors.append(Finding(where, node.op_type, "control flow defeats CUDA-graph capture"))
            continue
        rule = SUPPORTED.get(node.op_type)
        if rule is None:
            report.errors.append(Finding(where, node.op_type, "operator is not in the TensorRT support table"))
            continue
        data = types.get(node.input[0]) if node.input and node.input[0] else None
        if rule["types"] and data is not None:
            type_name = onnx.TensorProto.DataType.Name(data)
            if type_name not in rule["types"]:
                report.errors.append(Finding(where, node.op_type, f"input type {type_name} is not supported"))
            elif data == INT64:
                int64_ops[node.op_type] += 1
        for index in rule.get("constant", ()):
            if index < len(node.input) and node.input[index] and node.input[index] not in constants:
                report.errors.append(Finding(where, node.op_type, f"input {index} must be a build-time constant"))
        for attr in node.attribute:
            if node.op_type.startswith("Scatter") and attr.name == "reduction" and attr.s not in (b"", b"none"):
                report.errors.append(Finding(where, node.op_type, "reductions other than 'none' need a plugin"))
            if node.op_type == "TopK" and attr.name == "sorted" and attr.i == 0:
                report.errors.append(Finding(where, node.op_type, "TopK must be sorted"))
    if int64_ops:
        listed = ", ".join(f"{op}x{n}" for op, n in sorted(int64_ops.items()))
        report.warnings.append(Finding("graph", "int64", f"int64 data in {sum(int64_ops.values())} nodes ({listed})"))
    return report


def lint_graph(bundle: Bundle, name: str) -> LintReport:
    """Lint a bundle graph against the parser table and the manifest's dimension ranges and profiles."""
    from dspark.errors import DsparkError
    from dspark.export.tensorrt import profile_shapes

    entry = bundle.graph(name)
    model = onnx.load(str(bundle.file(entry.file)), load_external_data=False)
    report = lint_model(model, name, set(entry.dims))
    declared = {v.name for v in model.graph.input}
    for spec in entry.inputs:
        if spec.name not in declared:
            report.errors.append(Finding(f"input {spec.name}", "manifest", "the manifest names an input the graph lacks"))
    try:
        profile_shapes(entry)
    except DsparkError as e:
        report.errors.append(Finding("profiles", "manifest", str(e)))
    return report


def lint_bundle(bundle: Bundle | str | Path) -> list[LintReport]:
    bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    return [lint_graph(bundle, name) for name in bundle.graphs]
