"""bench/gpu_check.py keeps going past a failing step and keeps its JSON current (a GPU session is paid by the minute)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("dspark_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_step_is_recorded_and_the_next_one_runs(gpu_check, tmp_path):
    path = tmp_path / "out.json"
    steps = gpu_check.Steps(str(path))

    def broken():
        raise KeyError("engines")  # not an error type the script expects

    steps.run("broken", broken)
    assert json.loads(path.read_text())["steps"][0]["status"] == "FAIL"  # written before the next step starts
    steps.run("skipped", lambda: 1, skip="no GPU")
    assert steps.run("works", lambda: 42) == 42
    report = json.loads(path.read_text())
    assert [(s["step"], s["status"]) for s in report["steps"]] == [("broken", "FAIL"), ("skipped", "skip"), ("works", "pass")]
    assert "KeyError" in report["steps"][0]["result"] and report["failed"] is True


def test_a_bundle_that_does_not_open_still_writes_the_json(gpu_check, tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    monkeypatch.setattr("sys.argv", ["gpu_check.py", str(tmp_path / "missing"), "--json", str(path)])
    assert gpu_check.main() == 1
    report = json.loads(path.read_text())
    assert report["steps"][0]["step"] == "open bundle" and report["steps"][0]["status"] == "FAIL"
