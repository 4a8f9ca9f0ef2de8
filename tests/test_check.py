"""`dspark check`: passes on faithful bundles, fails (exit 1) when a weight in the ONNX data is corrupted."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import deepspec_drafter
from dspark.bundle import Bundle, write_manifest
from dspark.check import check_bundle
from dspark.cli import main
from dspark.export.bundle import ExportOptions, export_bundle

_EXPORTED = {}


def export_dspark_bundle(qwen3_pair, tmp_path_factory, runtime: str = "ort"):
    """A DSpark (vanilla Markov head, confidence head) bundle over the session's Qwen3 target, exported once per
    graph flavour."""
    if runtime not in _EXPORTED:
        target, target_dir, _ = qwen3_pair
        root = tmp_path_factory.mktemp(f"dspark-check-{runtime}")
        draft_dir = deepspec_drafter(target, target_dir, root / "drafter", "vanilla", 4)
        export_bundle(target_dir, root / "bundle", draft_dir,
                      ExportOptions(max_context=256, prefill_chunk=32, runtime=runtime), progress=False)
        _EXPORTED[runtime] = root / "bundle"
    return _EXPORTED[runtime]


@pytest.fixture(scope="module")
def dspark_bundle(qwen3_pair, tmp_path_factory):
    return export_dspark_bundle(qwen3_pair, tmp_path_factory)


def run_check(bundle):
    result = CliRunner().invoke(main, ["check", str(bundle), "--max-new-tokens", "16"])
    return result.exit_code, result.output


def test_check_runs_where_dspark_shares_the_thread_pool(qwen3_bundle):
    """A process whose dspark sessions share one ONNX Runtime thread pool (every CLI command over ONNX Runtime, a
    server) can still check a bundle: its comparison session is dspark's, which ONNX Runtime accepts there."""
    script = ("import sys; from dspark.runtime.runners import share_thread_pool; assert share_thread_pool(0); "
              "from dspark.check import check_bundle; sys.exit(0 if check_bundle(sys.argv[1], max_new_tokens=8).ok "
              "else 1)")
    result = subprocess.run([sys.executable, "-c", script, str(qwen3_bundle)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_passes_on_draft_lm_bundle(qwen3_bundle):
    code, out = run_check(qwen3_bundle)
    assert code == 0, out
    table = out[out.index("check "):]
    for graph in ("target", "draft"):
        assert f"torch vs onnxruntime  {graph}" in table
    assert "greedy spec == plain" in table and "identical" in table
    assert "tensorrt lint" in table and "no TensorRT engines" in table
    assert table.strip().splitlines()[-1].startswith("PASS: 0 failed")


def test_check_passes_on_dspark_bundle(dspark_bundle):
    report = check_bundle(dspark_bundle, max_new_tokens=16)
    assert report.ok, report.table()
    compared = {r.graph for r in report.rows if r.check == "torch vs onnxruntime" and r.status == "pass"}
    assert compared == {"target", "draft_context", "draft_propose"}


def corrupt_copy(bundle_dir, tmp_path):
    """A copy of the bundle with one target weight matrix scaled in target.onnx.data, manifest hashes rewritten."""
    copy = tmp_path / "corrupt"
    shutil.copytree(bundle_dir, copy)
    model = onnx.load(str(copy / "target.onnx"), load_external_data=False)
    tensor = max((t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                  and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2), key=lambda t: t.name)
    info = {e.key: e.value for e in tensor.external_data}
    offset, length = int(info["offset"]), int(info["length"])
    with open(copy / info["location"], "r+b") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(length), dtype=np.float32).copy()
        values *= 1.5
        f.seek(offset)
        f.write(values.tobytes())
    manifest = Bundle.open(copy, verify=False).manifest
    write_manifest(copy, {k: v for k, v in manifest.items() if k not in ("files", "schema_version")})
    Bundle.open(copy)  # the bundle still opens: only the check can tell
    return copy, tensor.name


def test_check_fails_when_a_weight_is_corrupted(qwen3_bundle, tmp_path):
    copy, name = corrupt_copy(qwen3_bundle, tmp_path)
    code, out = run_check(copy)
    assert code == 1, out
    failed = [line for line in out.splitlines() if "FAIL" in line]
    assert any(line.startswith("torch vs onnxruntime  target") for line in failed), out
    assert out.strip().splitlines()[-1].startswith("FAIL")
