"""Backends behind one interface: the torch runner keeps each graph flavour's contract, the CLI picks a backend,
and a backend that cannot run here says what is missing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from dspark.bundle import Bundle, write_manifest
from dspark.cli import main
from dspark.errors import DsparkError
from dspark.runtime.backends import make_runner
from dspark.runtime.decoder import decoder_cache, feed, run_decoder
from dspark.runtime.generate import Generator


@pytest.mark.parametrize("flavour", ["ort", "standard"])
def test_torch_runner_keeps_the_flavours_cache_contract(qwen3_bundle, qwen3_trt_bundle, flavour):
    """Prefill, a ragged verify call, a partial commit, a finished row replaced by a new one, another call: logits
    and the K/V the cache ends up holding match ONNX Runtime's, with the torch runner's cache in numpy buffers and
    in torch tensors (``cache_device``, how a GPU runner keeps it; here a torch tensor on the CPU, the same code)."""
    import torch

    from dspark.runtime.decoder import commit

    bundle = Bundle.open(qwen3_bundle if flavour == "ort" else qwen3_trt_bundle)
    assert bundle.graph("target").flavour == flavour
    results = {}
    for backend, device in (("ort", None), ("torch", None), ("torch", "cpu")):
        runner = make_runner(bundle, "target", backend)
        cache = decoder_cache(bundle.target.config, 2, bundle, device=device)
        assert isinstance(cache.k, torch.Tensor if device else np.ndarray)
        last = feed(runner, cache, [[5, 6, 7, 8], list(range(1, 40))], chunk=16)
        out = run_decoder(runner, cache, [[9, 10, 11], [12]])
        verify = (out["logits"][0, :3].copy(), out["logits"][1, :1].copy())
        assert set(out) == {o.name for o in bundle.graph("target").outputs if not o.name.startswith("present_")}
        commit(cache, out, [2, 1])  # row 0 keeps 2 of its 3 tokens: the third is rolled back
        cache.keep_rows([1])  # row 0 finished; row 1 moves into its slot
        cache.add_rows(cache.empty_like(1))
        joined = feed(runner, cache, [[], [20, 21, 22]], chunk=16)[1]
        out = run_decoder(runner, cache, [[13, 14], [23]])
        lens = cache.lens.copy()
        k = cache.k.cpu().numpy() if device else cache.k
        filled = [k[:, r, :, : lens[r]].copy() for r in range(2)]
        results[(backend, device)] = (np.stack(last), *verify, joined, out["logits"][:, :1].copy(), *filled)
    want = results[("ort", None)]
    for key in (("torch", None), ("torch", "cpu")):
        for a, b in zip(want, results[key]):
            np.testing.assert_allclose(b, a, atol=2e-4, rtol=1e-4)


def test_generate_cli_takes_a_backend(qwen3_bundle):
    runner = CliRunner()
    outputs = {}
    for backend in ("ort", "torch"):
        result = runner.invoke(main, ["generate", str(qwen3_bundle), "--prompt", "w5 w6 w7", "--max-new-tokens", "12",
                                      "--ignore-eos", "--json", "--backend", backend, "--device", "cpu"])
        assert result.exit_code == 0, result.output
        outputs[backend] = json.loads(result.output.strip().splitlines()[-1])["token_ids"]
    assert outputs["torch"] == outputs["ort"] and len(outputs["ort"]) == 12
    for command in ("generate", "serve", "bench", "profile", "calibrate", "demo"):
        help_text = runner.invoke(main, [command, "--help"]).output
        assert "--backend [ort|torch|trt]" in help_text and "--device" in help_text, command


@pytest.mark.parametrize("args, message", [
    (["--backend", "trt", "--device", "cuda"], "TensorRT is not installed|no CUDA GPU|no TensorRT engines"),
    (["--backend", "trt"], "pass --device cuda"),
    (["--backend", "ort", "--device", "cuda"], "ort backend runs on the CPU"),
    (["--backend", "torch", "--device", "tpu"], "device 'tpu' is not supported"),
    pytest.param(["--backend", "torch", "--device", "cuda"], "sees no CUDA device; use --device cpu",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")),
])
def test_unavailable_backend_is_one_clear_line(qwen3_bundle, args, message):
    result = CliRunner().invoke(main, ["generate", str(qwen3_bundle), "--prompt", "w5", "--max-new-tokens", "2", *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert __import__("re").search(message, lines[0]), lines[0]


def test_torch_backend_without_the_checkpoint_says_which_folder(qwen3_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(qwen3_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["models"]["draft"]["source"] = str(tmp_path / "moved-away")
    write_manifest(copy, manifest)
    with pytest.raises(DsparkError, match=f"draft's checkpoint folder {tmp_path / 'moved-away'}.*use --backend ort"):
        Generator(copy, backend="torch")
    Generator(copy, backend="torch", use_draft=False)  # the target's folder is still there


def test_serve_on_the_torch_backend(qwen3_bundle):
    """`dspark serve --backend torch`: 16 concurrent greedy requests (half streamed) equal the Generator's output."""
    import httpx

    from conftest import check_sixteen_concurrent_greedy, cli_server

    with cli_server(qwen3_bundle, "--backend", "torch", "--threads", "1") as (_process, url):
        with httpx.Client(base_url=url, timeout=120) as client:
            check_sixteen_concurrent_greedy(client, qwen3_bundle)


@pytest.mark.parametrize("installed, hinted", [("1.31.0", True), ("1.32.0", False)])
def test_an_older_onnxruntime_is_told_which_version_the_graphs_need(tmp_path, monkeypatch, installed, hinted):
    """A GroupQueryAttention node this ONNX Runtime refuses: on a version below the ort flavour's floor the error
    names the floor and the pip command (1.30 and 1.31 refuse every exported ort-flavour graph this way)."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    from dspark.runtime.runners import ort_session

    # 18 inputs: one past what any GroupQueryAttention schema takes, so this ONNX Runtime refuses it as well
    inputs = ["q", "", "", "past", "past", "lens", "total"] + [""] * 11
    node = helper.make_node("GroupQueryAttention", inputs, ["out", "pk", "pv"], domain="com.microsoft",
                            num_heads=2, kv_num_heads=1)
    graph = helper.make_graph(
        [node], "gqa",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 1, 64]),
         helper.make_tensor_value_info("past", TensorProto.FLOAT, [1, 1, 8, 16]),
         helper.make_tensor_value_info("lens", TensorProto.INT32, [1]),
         helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    path = tmp_path / "gqa.onnx"
    onnx.save(model, path)
    monkeypatch.setattr(onnxruntime, "__version__", installed)
    with pytest.raises(DsparkError, match="GroupQueryAttention") as error:
        ort_session(path, 1, ["CPUExecutionProvider"], spin=False)
    assert ("onnxruntime 1.32 or newer" in str(error.value)) == hinted
    assert ("pip install -U 'onnxruntime>=1.32'" in str(error.value)) == hinted
