"""TensorRT readiness proven without TensorRT: profile shapes, bucket ladders, the lint, and `dspark build`'s errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from dspark.bundle import Bundle, GraphSpec, TensorSpec
from dspark.cli import main
from dspark.errors import DsparkError
from dspark.export.lint import lint_bundle, lint_model
from dspark.export.tensorrt import engine_dir_name, kept_engines, profile_shapes
from dspark.runtime.buckets import Buckets, Ladder, pad_feeds, pad_to
from dspark.runtime.trt import Contexts, bucket_ladders, check_build_info, dim_sizes, polygraphy_trt_runner, select_profile

from test_check import export_dspark_bundle


@pytest.fixture(scope="module")
def dspark_bundle(qwen3_pair, tmp_path_factory):
    return export_dspark_bundle(qwen3_pair, tmp_path_factory, runtime="tensorrt")


def test_profile_shapes_are_exact(qwen3_trt_bundle):
    graph = Bundle.open(qwen3_trt_bundle).graph("target")
    shapes = profile_shapes(graph)
    assert list(shapes) == ["prefill", "decode"]
    # qwen3_trt_bundle: max_batch 8, max_context 256, prefill_chunk 32, 6 draft tokens -> verify 7
    assert shapes["decode"]["input_ids"] == ((1, 1), (1, 7), (8, 7))
    assert shapes["prefill"]["position_ids"] == ((1, 1), (1, 32), (8, 32))
    assert shapes["decode"]["cache_lens"] == ((1,), (1,), (8,))
    # every dynamic input is covered, static dims kept: [layers, batch, kv heads, cache, head_dim]
    assert shapes["prefill"]["past_k"] == ((3, 1, 2, 0, 16), (3, 1, 2, 256, 16), (3, 8, 2, 256, 16))
    assert set(shapes["prefill"]) == {"input_ids", "position_ids", "cache_lens", "past_k", "past_v"}


def test_profile_shapes_cover_drafter_graphs(dspark_bundle):
    bundle = Bundle.open(dspark_bundle)
    propose = profile_shapes(bundle.graph("draft_propose"))
    assert list(propose) == ["decode"]
    assert propose["decode"]["noise"] == ((1, 4), (1, 4), (8, 4))
    assert propose["decode"]["temperature"] == ((1,), (1,), (8,))
    context = profile_shapes(bundle.graph("draft_context"))
    assert context["decode"]["features"] == ((1, 1, 128), (1, 5, 128), (8, 32, 128))


def test_profile_errors_name_the_problem():
    def graph(decode: dict) -> GraphSpec:
        return GraphSpec("g", "g.onnx", "standard", (TensorSpec("x", "float32", ("batch", "n")),), (), {},
                         {"decode": decode})

    with pytest.raises(DsparkError, match="no range for dimension n of input x"):
        profile_shapes(graph({"batch": (1, 1, 4)}))
    with pytest.raises(DsparkError, match="out of order"):
        profile_shapes(graph({"batch": (1, 1, 4), "n": (4, 2, 8)}))


def test_ladder_selects_smallest_bucket_and_caps_at_the_range():
    ladder = Ladder.powers_of_two("cache", 0, 300)
    assert ladder.sizes == (1, 2, 4, 8, 16, 32, 64, 128, 256, 300)
    assert [ladder.select(v) for v in (0, 1, 3, 64, 65, 257, 300)] == [1, 1, 4, 64, 128, 300, 300]
    with pytest.raises(DsparkError, match="exceeds the largest bucket 300"):
        ladder.select(301)
    assert Ladder.powers_of_two("batch", 1, 8).sizes == (1, 2, 4, 8)


def test_bundle_buckets(qwen3_trt_bundle):
    buckets = Buckets.from_bundle(Bundle.open(qwen3_trt_bundle))
    assert buckets.batch.sizes == (1, 2, 4, 8)
    assert buckets.verify.sizes == (1, 2, 4, 7)
    assert buckets.cache.sizes[-1] == 256 + 7  # room for a verify block past the longest row
    assert buckets.select(3, 5, 100) == (4, 7, 128)
    assert len(buckets.all()) == 4 * 4 * len(buckets.cache.sizes)


def test_padding_keeps_positions_consecutive_and_rows_empty():
    specs = (TensorSpec("input_ids", "int64", ("batch", "new_tokens")),
             TensorSpec("position_ids", "int64", ("batch", "new_tokens")), TensorSpec("cache_lens", "int64", ("batch",)),
             TensorSpec("past_k", "float32", (2, "batch", 1, "cache", 3)))
    feeds = {"input_ids": np.array([[7, 8, 9]]), "position_ids": np.array([[4, 5, 6]]), "cache_lens": np.array([4]),
             "past_k": np.ones((2, 1, 1, 5, 3), np.float32)}
    padded = pad_feeds(feeds, specs, {"batch": 2, "new_tokens": 4, "cache": 8})
    assert padded["input_ids"].tolist() == [[7, 8, 9, 0], [0, 0, 0, 0]]
    assert padded["position_ids"].tolist() == [[4, 5, 6, 7], [0, 0, 0, 0]]
    assert padded["cache_lens"].tolist() == [4, 0]
    assert padded["past_k"].shape == (2, 2, 1, 8, 3) and padded["past_k"][:, :1, :, :5].all()
    assert pad_to(np.zeros((2, 3)), 1, 3).shape == (2, 3)
    with pytest.raises(ValueError):
        pad_to(np.zeros((2, 3)), 1, 2)


def test_select_profile_prefers_the_tightest():
    prefill = {"batch": [1, 1, 8], "new_tokens": [1, 32, 32], "cache": [0, 256, 256]}
    decode = {"batch": [1, 1, 8], "new_tokens": [1, 7, 7], "cache": [0, 256, 256]}
    assert select_profile([prefill, decode], {"batch": 2, "new_tokens": 5, "cache": 40}) == 1
    assert select_profile([prefill, decode], {"batch": 2, "new_tokens": 20, "cache": 40}) == 0
    with pytest.raises(DsparkError, match="fit none"):
        select_profile([prefill, decode], {"batch": 9, "new_tokens": 1, "cache": 0})


def test_check_runner_takes_a_profile_holding_every_feed(qwen3_trt_bundle, tmp_path):
    """The draft LM's decode profile takes 1-2 new tokens; check feeds up to 7 must go to the prefill profile
    (they used to be refused as spanning two profiles). polygraphy loads the engine lazily, so no TensorRT here."""
    from dspark.check import graph_feeds

    bundle = Bundle.open(qwen3_trt_bundle)
    for name in ("draft", "target"):
        spec = bundle.graph(name)
        feeds = graph_feeds(bundle, name)
        runner = polygraphy_trt_runner(tmp_path / f"{name}.plan", spec, feeds)
        chosen = list(spec.profiles.values())[runner.optimization_profile]
        for sizes in map(lambda f: dim_sizes(spec, f), feeds):
            assert all(chosen[d][0] <= n <= chosen[d][2] for d, n in sizes.items()), (name, sizes, chosen)
    assert polygraphy_trt_runner(tmp_path / "d.plan", bundle.graph("draft"), graph_feeds(bundle, "draft")).optimization_profile == 0


def test_verify_widths_stay_on_the_decode_profile_when_padded(qwen3_trt_bundle):
    spec = Bundle.open(qwen3_trt_bundle).graph("target")
    ladder = bucket_ladders(spec)["new_tokens"]
    profiles = list(spec.profiles.values())
    for width in range(1, 8):  # verify calls of this bundle: 1..7 tokens
        padded = ladder.select(width)
        assert select_profile(profiles, {"batch": 1, "new_tokens": padded, "cache": 10}) == 1, (width, padded)
    assert ladder.select(20) == 32 and ladder.sizes[-1] == 32


def test_each_captured_bucket_gets_its_own_context():
    """A CUDA graph freezes its context's shapes: buckets of one profile must not share a context, while eager
    calls share one per profile and a recurring bucket gets its context back."""
    made = []
    contexts = Contexts(lambda profile: made.append(profile) or object())
    eager = contexts.get(1)
    assert contexts.get(1) is eager and contexts.get(0) is not eager
    small, large = contexts.get(1, (("batch", 1),)), contexts.get(1, (("batch", 2),))
    assert len({id(eager), id(small), id(large)}) == 3
    assert contexts.get(1, (("batch", 1),)) is small
    assert made == [1, 0, 1, 1]


def test_partial_build_keeps_the_other_engines():
    previous = {"tensorrt": "10.3.0", "precision": "fp16", "strongly_typed": True, "tf32": True,
                "engines": {"target": {"file": "target.plan"}, "draft": {"file": "draft.plan"}}}
    info = dict(previous, engines={})
    assert kept_engines(previous, info, ["draft"]) == {"target": {"file": "target.plan"}}
    assert kept_engines(previous, dict(info, precision="fp32"), ["draft"]) == {}  # other settings: stale
    assert kept_engines({}, info, ["draft"]) == {}


def test_build_info_mismatch_says_which(tmp_path):
    info = {"compute_capability": [8, 0], "gpu": "A100", "tensorrt": "10.3.0"}
    check_build_info(info, (8, 0), "10.3.0", tmp_path)
    with pytest.raises(DsparkError, match=r"compute capability 8\.0 \(A100\) vs this GPU's 9\.0"):
        check_build_info(info, (9, 0), "10.3.0", tmp_path)
    with pytest.raises(DsparkError, match="TensorRT 10.3.0 vs the installed 11.1.0"):
        check_build_info(info, (8, 0), "11.1.0", tmp_path)
    assert engine_dir_name((9, 0), "10.16.0") == "sm90-trt10.16.0"


def test_lint_passes_on_every_exported_graph(qwen3_trt_bundle, dspark_bundle):
    reports = lint_bundle(qwen3_trt_bundle) + lint_bundle(dspark_bundle)
    assert {r.graph for r in reports} == {"target", "draft", "draft_context", "draft_propose"}
    for report in reports:
        assert report.ok, report.summary()
        assert any(w.op == "int64" for w in report.warnings)  # int64 ids are reported, not fatal


def broken_model() -> onnx.ModelProto:
    """Every class of problem the lint must catch, in one small graph."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", "cols"])
    z = helper.make_tensor_value_info("z", TensorProto.INT64, [None, 2])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, ["batch", "n"])
    nodes = [
        helper.make_node("NonZero", ["x"], ["nz"]),  # data-dependent output shape, not in the table
        helper.make_node("Transpose", ["nz"], ["z"]),
        helper.make_node("TopK", ["x", "k"], ["top", "idx"], axis=1),  # K must be a constant
        helper.make_node("ReduceSum", ["top"], ["y"], keepdims=1),
        helper.make_node("Relu", ["x"], ["w"], domain="com.example"),  # custom domain
        helper.make_node("MatMul", ["idx", "idx"], ["mm"]),  # int64 MatMul is not supported
    ]
    graph = helper.make_graph(nodes, "broken", [x, k], [y, z, w, helper.make_tensor_value_info("mm", TensorProto.INT64, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.example", 1)])


def test_lint_fails_on_a_graph_built_to_break_it():
    report = lint_model(broken_model(), "broken", dims={"batch", "n"})
    assert not report.ok
    messages = "\n".join(f"{f.where} {f.op} {f.message}" for f in report.errors)
    assert "opset 21 is above" in messages
    assert "NonZero operator is not in the TensorRT support table" in messages
    assert "TopK input 1 must be a build-time constant" in messages
    assert "custom domain 'com.example'" in messages
    assert "MatMul input type INT64 is not supported" in messages
    assert "output y" in messages and "'rows', which has no range in the manifest" in messages
    assert "output z" in messages and "has no name" in messages


def test_build_without_tensorrt_says_what_is_missing(qwen3_trt_bundle):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
        import torch

        if torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are present: this test covers their absence")
    except ImportError:
        pass
    result = CliRunner().invoke(main, ["build", str(qwen3_trt_bundle)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and ("TensorRT is not installed" in result.output or "no CUDA GPU" in result.output)
    assert "pip install" in result.output
    assert not (qwen3_trt_bundle / "engines").exists()


def test_build_help_lists_every_option():
    result = CliRunner().invoke(main, ["build", "--help"])
    for option in ("--precision", "--workspace", "--timing-cache"):
        assert option in result.output


def test_build_refuses_the_onnx_runtime_flavour(qwen3_bundle):
    result = CliRunner().invoke(main, ["build", str(qwen3_bundle)])
    assert result.exit_code == 2, result.output
    assert "--runtime tensorrt" in result.output and "fused operators" in result.output
    assert not (qwen3_bundle / "engines").exists()
