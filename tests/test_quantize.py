"""Quantized bundles (--quantize int4|int8 weight-only, w8a8 int8 weights and activations): a different model is
decoded, the contract is unchanged."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import VOCAB, assert_speculative_equals_plain, assert_token_numbers_ignore_the_call, hf_model, save_hf
from dspark.bundle import Bundle
from dspark.cli import main
from dspark.export.bundle import ExportOptions, export_bundle
from dspark.export.ort_graph import quantize_blocks, quantize_columns
from dspark.export.smooth import activation_scaled, smoothed
from dspark.graphs.decoder import DecoderLM
from dspark.runtime.generate import Generator, Request

PROMPTS = [[5, 6, 7, 8, 9], [3] * 30, list(range(1, 40))]


@pytest.fixture(scope="module", params=["int4", "int8", "w8a8"])
def quantized(request, qwen3_pair, tmp_path_factory):
    _, target_dir, draft_dir = qwen3_pair
    out = tmp_path_factory.mktemp(request.param) / "bundle"
    export_bundle(target_dir, out, draft_dir, ExportOptions(max_context=128, prefill_chunk=16, num_draft_tokens=4,
                                                          quantize=request.param), progress=False)
    return request.param, out


def test_speculative_equals_plain_of_the_same_bundle(quantized):
    _, bundle = quantized
    spec, plain = Generator(bundle), Generator(bundle, use_draft=False)
    assert_speculative_equals_plain(spec, plain, PROMPTS, 32)
    # a ragged batch decodes as each request alone
    together = spec.generate([Request(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(PROMPTS, (9, 21, 14))])
    for p, n, seq in zip(PROMPTS, (9, 21, 14), together):
        assert seq.generated == plain.generate([Request(p, max_new_tokens=n, ignore_eos=True)])[0].generated


def test_a_tokens_numbers_do_not_depend_on_the_call(quantized):
    kind, bundle = quantized
    if kind == "w8a8":
        pytest.skip("w8a8 quantizes each call's activations with one scale for all its rows: a token's numbers "
                    "depend on the others in its call by construction (README, 'What is lossless here')")
    assert_token_numbers_ignore_the_call(bundle)


def test_speculating_on_w8a8_warns_that_it_is_not_exact(quantized):
    kind, bundle = quantized
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Generator(bundle)
        Generator(bundle, use_draft=False)
    assert [str(w.message)[:40] for w in caught] == (["this bundle's target is w8a8, which quan"] if kind == "w8a8" else [])


def test_quality_is_recorded(quantized):
    kind, bundle = quantized
    b = Bundle.open(bundle)
    quality = json.loads((bundle / "quality.json").read_text())
    assert b.manifest["quality"] == quality and b.quantize == kind
    ppl = quality["perplexity"]
    assert set(ppl) == {"fp32", kind} and quality["tokens"] > 100
    assert all(np.isfinite(v) and v > 1 for v in ppl.values())
    # random tiny models are far from their data, but quantization must not wreck them: int8 is near fp32
    assert abs(ppl[kind] / ppl["fp32"] - 1) < {"int8": 0.02, "w8a8": 0.1, "int4": 0.5}[kind]
    graph = (bundle / "target.onnx").read_bytes()
    assert b"MatMulNBits" in graph and b"GatherBlockQuantized" in graph
    assert (b"DynamicQuantizeMatMul" in graph) == (kind == "w8a8")


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
@pytest.mark.parametrize("rescale", [smoothed, activation_scaled])
def test_rescaling_keeps_the_function(family, rescale, tmp_path):
    """The factors of SmoothQuant (w8a8) and AWQ's scaling (int4) are folded into norms and projections: the
    rescaled model computes the same logits (q/k norms, biases, grouped KV heads), while the weights the quantizer
    sees did change (down_proj only under the int4 scaling)."""
    folder = save_hf(hf_model(family, VOCAB, seed=5), tmp_path / family, VOCAB)
    model = DecoderLM.from_pretrained(folder).eval()
    ids = torch.randint(1, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    scaled = rescale(model, ids[0].tolist())
    with torch.no_grad():
        expected, got = model(ids), scaled(ids)
    assert torch.allclose(got, expected, atol=1e-4 * expected.abs().max().item())
    layer, before = scaled.model.layers[1], model.model.layers[1]
    for name in ("input_layernorm", "post_attention_layernorm"):
        assert not torch.allclose(getattr(layer, name).weight, getattr(before, name).weight)
    assert not torch.allclose(layer.self_attn.o_proj.weight, before.self_attn.o_proj.weight)
    down_changed = not torch.equal(layer.mlp.down_proj.weight, before.mlp.down_proj.weight)
    assert down_changed == (rescale is activation_scaled)


def test_column_quantizer_round_trip():
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.standard_normal((24, 64)).astype(np.float32))
    data, scales = quantize_columns(weight)
    assert data.dtype == np.int8 and data.shape == (64, 24) and scales.shape == (24,)
    restored = data.astype(np.float32) * scales
    assert (np.abs(restored - weight.numpy().T) <= scales * 0.51).all()
    assert np.abs(data).max() == 127


@pytest.mark.parametrize("bits", [4, 8])
def test_block_quantizer_round_trip(bits):
    """Dequantizing the packed blocks (low nibble first; 4 bits symmetric around MatMulNBits' default zero point 8,
    8 bits with uint8 zero points) gives back the weight to within one quantization step of its block."""
    rng = np.random.default_rng(bits)
    weight = torch.from_numpy(rng.standard_normal((24, 64)).astype(np.float32))
    packed, scales, zero_points = quantize_blocks(weight, bits)
    if bits == 4:
        assert zero_points is None
        codes = np.stack([packed & 15, packed >> 4], -1).reshape(24, 2, 32)
        zp = np.full((24, 2), 8)
    else:
        codes, zp = packed.reshape(24, 2, 32), zero_points.reshape(24, 2)
    restored = (codes.astype(np.float32) - zp[..., None]) * scales.reshape(24, 2, 1)
    error = np.abs(restored.reshape(24, 64) - weight.numpy()).reshape(24, 2, 32).max(-1)
    # a symmetric block's scale carries the sign that maps its largest magnitude to code 0, so a value near the
    # opposite extreme is clipped to code 15: one step at most; min/max blocks round to half a step
    step = np.abs(scales).reshape(24, 2) * (1.0 if bits == 4 else 0.51)
    assert (error <= step + 1e-6).all()
    assert error.max() > 0  # it did quantize


def test_quantize_needs_the_onnx_runtime_flavour(qwen3_pair, tmp_path):
    _, target_dir, _ = qwen3_pair
    result = CliRunner().invoke(main, ["export", str(target_dir), "-o", str(tmp_path / "b"), "--quantize", "int4",
                                       "--runtime", "tensorrt"])
    assert result.exit_code == 2 and "needs --runtime ort" in result.output
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.partial*"))


def test_w8a8_refusals(qwen3_pair, dspark_bundle, tmp_path):
    """w8a8 takes fp32 activations, and a draft LM (not a block drafter): one line, exit 2, nothing written."""
    _, target_dir, _ = qwen3_pair
    result = CliRunner().invoke(main, ["export", str(target_dir), "-o", str(tmp_path / "b"), "--quantize", "w8a8",
                                       "--dtype", "fp16"])
    assert result.exit_code == 2 and "--dtype fp32" in result.output
    drafter = Bundle.open(dspark_bundle).manifest["models"]["draft"]["source"]
    result = CliRunner().invoke(main, ["export", str(target_dir), "-o", str(tmp_path / "b"), "--draft", drafter,
                                       "--draft-quantize", "w8a8"])
    assert result.exit_code == 2 and "applies to a draft LM" in result.output
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.partial*"))


def test_odd_widths_stay_float(tmp_path):
    """Projections whose input width is not a multiple of the block stay fp32 instead of failing."""
    model = hf_model("llama", VOCAB, seed=3, hidden_size=80, intermediate_size=80, num_attention_heads=5,
                     num_key_value_heads=1)
    save_hf(model, tmp_path / "hf", VOCAB)
    export_bundle(tmp_path / "hf", tmp_path / "b", options=ExportOptions(max_context=64, prefill_chunk=8, quantize="int4"),
                  progress=False)
    seq = Generator(tmp_path / "b", use_draft=False).generate([Request([4, 5, 6], max_new_tokens=8, ignore_eos=True)])[0]
    assert len(seq.generated) == 8
