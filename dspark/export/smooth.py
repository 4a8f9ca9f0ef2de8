"""SmoothQuant for ``--quantize w8a8``: move activation outliers into the weights before int8 quantization.

``w8a8`` runs the projections as ONNX Runtime's ``DynamicQuantizeMatMul``: int8 weights (one scale per output
column) times activations quantized to int8 at run time with one scale per tensor, on the CPU's integer matrix
units (AMX/VNNI), so a call on 8 or 16 new tokens costs little more than one on a single token. One scale per
tensor is what makes it fast and what hurts: a few input channels much larger than the rest leave the others
with few levels. SmoothQuant (Xiao et al., 2023) divides input channel j by s_j = max|X_j|^a / max|W_j|^(1-a)
and multiplies the weights' column j by it, an identity in exact arithmetic, so the activation is flatter and
the weight takes the difference. The division is folded into the operation that produces the input, so the
graph gains no node:

- q/k/v and gate/up: into the RMSNorm weight in front of them (``input_layernorm``, ``post_attention_layernorm``);
- o_proj: into v_proj's output rows (attention output channel (h, d) is a mix of value channel (h // g, d), so
  the heads sharing a KV head share one factor).

``down_proj`` is not smoothed: its input silu(gate) * up has outliers no per-tensor scale holds even after
smoothing, so the lowering keeps it int8 weight-only (``MatMulNBits``, whose activations are quantized per block
of 32). SmolLM2-135M perplexity (fp32 13.72): every product per-tensor int8 without smoothing 17.2, smoothed
14.8, smoothed with down_proj weight-only 14.07.

The maxima come from a forward pass of the fp32 model over a calibration text: the start of two Python
standard-library modules, present on every machine and distinct from the perplexity text of ``quality``.
"""

from __future__ import annotations

import argparse
import collections
import copy
from pathlib import Path

import torch

from dspark.graphs.decoder import DecoderLM

ALPHA = 0.8  # SmolLM2-135M perplexity with down_proj left out (fp32 13.72): 14.18 at 0.5, 14.07 at 0.8
CALIBRATION_TOKENS = 1024  # per calibration file
CHUNK = 512


def calibration_ids(encode) -> list[int]:
    """Token ids of the calibration text, ``encode(text) -> list[int]``."""
    ids: list[int] = []
    for module in (argparse, collections):
        ids += encode(Path(module.__file__).read_text())[:CALIBRATION_TOKENS]
    return ids


def input_maxima(model: DecoderLM, ids: list[int]) -> dict[str, list[torch.Tensor]]:
    """Per layer, max |x_j| over the calibration tokens of the inputs of q_proj, o_proj and gate_proj."""
    found: dict[str, list[torch.Tensor | None]] = {k: [None] * model.config.num_layers for k in ("qkv", "o", "mlp")}

    def hook(kind: str, layer: int):
        def record(_module, inputs, _output):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float()
            seen = found[kind][layer]
            found[kind][layer] = x if seen is None else torch.maximum(seen, x)
        return record

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles += [layer.self_attn.q_proj.register_forward_hook(hook("qkv", i)),
                    layer.self_attn.o_proj.register_forward_hook(hook("o", i)),
                    layer.mlp.gate_proj.register_forward_hook(hook("mlp", i))]
    try:
        with torch.no_grad():
            for start in range(0, len(ids), CHUNK):
                model(torch.tensor([ids[start : start + CHUNK]]))
    finally:
        for h in handles:
            h.remove()
    return found


def smoothing_factors(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) over every weight that reads input channel j."""
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    return (x_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)


def smoothed(model: DecoderLM, ids: list[int], alpha: float = ALPHA) -> DecoderLM:
    """A copy of ``model`` computing the same function (up to fp32 rounding) whose projections' inputs are
    flattened by SmoothQuant factors measured on ``ids``."""
    reference = copy.deepcopy(model).float().eval()
    maxima = input_maxima(reference, ids)
    out = copy.deepcopy(model)
    c = out.config
    group = c.num_heads // c.num_kv_heads
    with torch.no_grad():
        for i, layer in enumerate(out.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            s = smoothing_factors(maxima["qkv"][i], [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], alpha)
            layer.input_layernorm.weight.div_(s.to(layer.input_layernorm.weight.dtype))
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight.mul_(s.to(proj.weight.dtype))
            s = smoothing_factors(maxima["mlp"][i], [mlp.gate_proj.weight, mlp.up_proj.weight], alpha)
            layer.post_attention_layernorm.weight.div_(s.to(layer.post_attention_layernorm.weight.dtype))
            for proj in (mlp.gate_proj, mlp.up_proj):
                proj.weight.mul_(s.to(proj.weight.dtype))
            # o_proj's input channel (h, d) is value channel (h // group, d): one factor per KV channel
            s = smoothing_factors(maxima["o"][i], [attn.o_proj.weight], alpha)
            s = s.view(c.num_kv_heads, group, c.head_dim).amax(1)
            attn.v_proj.weight.div_(s.reshape(-1, 1).to(attn.v_proj.weight.dtype))
            if attn.v_proj.bias is not None:
                attn.v_proj.bias.div_(s.reshape(-1).to(attn.v_proj.bias.dtype))
            attn.o_proj.weight.mul_(s[:, None, :].expand(-1, group, -1).reshape(-1).to(attn.o_proj.weight.dtype))
    return out
