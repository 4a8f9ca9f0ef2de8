"""Activation-aware rescaling before quantization: the same function, with weights that quantize better.

Every factor here is an identity in exact arithmetic: input channel j of a group of projections is divided by
s_j where it is produced and the projections' weight column j is multiplied by it. The division is folded into
the operation that produces the input, so the graph gains no node:

- q/k/v and gate/up: into the RMSNorm weight in front of them (``input_layernorm``, ``post_attention_layernorm``);
- o_proj: into v_proj's output rows (attention output channel (h, d) is a mix of value channel (h // g, d), so
  the heads sharing a KV head share one factor);
- down_proj: into up_proj's output rows (its input is silu(gate) * up).

Two choices of s, measured on a forward pass of the fp32 model over a calibration text (the start of two Python
standard-library modules, present on every machine and distinct from the perplexity text of ``quality``):

- ``smoothed`` (SmoothQuant, Xiao et al. 2023), for ``--quantize w8a8``, whose ``DynamicQuantizeMatMul`` takes
  one activation scale per tensor: a few input channels much larger than the rest leave the others few levels,
  so s_j = max|X_j|^a / max|W_j|^(1-a) flattens the activation and lets the weight take the difference.
  ``down_proj`` is left out: its input has outliers no per-tensor scale holds even after smoothing, so the
  lowering keeps it int8 weight-only (``MatMulNBits``, activations quantized per block of 32). SmolLM2-135M
  perplexity (fp32 13.72): every product per-tensor int8 without smoothing 17.2, smoothed 14.8, smoothed with
  down_proj weight-only 14.07.
- ``activation_scaled`` (the scaling of AWQ, Lin et al. 2024, with one exponent instead of a per-layer search),
  for ``--quantize int4``: weight-only rounding error matters most on the input channels that carry the most
  activation, so s_j = mean|X_j|^a (normalised so its largest and smallest factors multiply to 1) enlarges those
  columns before the 4-bit grid is fitted. SmolLM2-135M int4 perplexity on ``quality``'s text: 18.94 unscaled,
  16.62 at a = 0.5 (16.73 at 0.25, 17.74 at 0.65, 18.26 at 0.8; 17.25 without down_proj); on ``difflib.py``,
  which chose nothing, 22.44 -> 19.57 (fp32 16.10).
"""

from __future__ import annotations

import argparse
import collections
import copy
from pathlib import Path

import torch

from dspark.graphs.decoder import DecoderLM

SMOOTH_ALPHA = 0.8  # w8a8, SmolLM2-135M perplexity with down_proj left out (fp32 13.72): 14.18 at 0.5, 14.07 at 0.8
AWQ_ALPHA = 0.5  # int4 (see above)
CALIBRATION_TOKENS = 1024  # per calibration file
CHUNK = 512
GROUPS = ("qkv", "o", "mlp", "down")  # the inputs of q_proj (= k, v), o_proj, gate_proj (= up), down_proj


def calibration_ids(encode) -> list[int]:
    """Token ids of the calibration text, ``encode(text) -> list[int]``."""
    ids: list[int] = []
    for module in (argparse, collections):
        ids += encode(Path(module.__file__).read_text())[:CALIBRATION_TOKENS]
    return ids


def input_statistics(model: DecoderLM, ids: list[int]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per group and layer, (max |x_j|, mean |x_j|) over the calibration tokens of the projections' inputs."""
    if next(model.parameters()).dtype != torch.float32:  # statistics in fp32; an fp32 model is read as it is
        model = copy.deepcopy(model).float()
    sums = {k: [None] * model.config.num_layers for k in GROUPS}

    def hook(kind: str, layer: int):
        def record(_module, inputs, _output):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).float()
            seen = sums[kind][layer]
            top, total, count = (x.amax(0), x.sum(0), len(x))
            sums[kind][layer] = (top, total, count) if seen is None else \
                (torch.maximum(seen[0], top), seen[1] + total, seen[2] + count)
        return record

    handles = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        for kind, proj in zip(GROUPS, (attn.q_proj, attn.o_proj, mlp.gate_proj, mlp.down_proj)):
            handles.append(proj.register_forward_hook(hook(kind, i)))
    try:
        with torch.no_grad():
            for start in range(0, len(ids), CHUNK):
                model(torch.tensor([ids[start : start + CHUNK]]))
    finally:
        for h in handles:
            h.remove()
    return {k: [(top, total / count) for top, total, count in layers] for k, layers in sums.items()}


def group_weights(layer, kind: str) -> list[torch.Tensor]:
    attn, mlp = layer.self_attn, layer.mlp
    return {"qkv": [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], "o": [attn.o_proj.weight],
            "mlp": [mlp.gate_proj.weight, mlp.up_proj.weight], "down": [mlp.down_proj.weight]}[kind]


def folded(model: DecoderLM, factors: dict[str, list[torch.Tensor]]) -> DecoderLM:
    """A copy of ``model`` with input channel j of each group's projections divided by factors[group][layer][j]
    where it is produced and the projections' column j multiplied by it (groups absent from ``factors`` stay)."""
    out = copy.deepcopy(model)
    c = out.config
    group = c.num_heads // c.num_kv_heads
    mul = lambda t, s: t.mul_(s.to(t.dtype))  # noqa: E731
    div = lambda t, s: t.div_(s.to(t.dtype))  # noqa: E731
    with torch.no_grad():
        for i, layer in enumerate(out.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if "qkv" in factors:
                s = factors["qkv"][i]
                div(layer.input_layernorm.weight, s)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    mul(proj.weight, s)
            if "mlp" in factors:
                s = factors["mlp"][i]
                div(layer.post_attention_layernorm.weight, s)
                for proj in (mlp.gate_proj, mlp.up_proj):
                    mul(proj.weight, s)
            if "down" in factors:  # after gate/up's own factors, which scale up_proj's columns, not its rows
                s = factors["down"][i]
                div(mlp.up_proj.weight, s[:, None])
                if mlp.up_proj.bias is not None:
                    div(mlp.up_proj.bias, s)
                mul(mlp.down_proj.weight, s)
            if "o" in factors:  # o_proj's input channel (h, d) is value channel (h // group, d): one factor per KV channel
                s = factors["o"][i].view(c.num_kv_heads, group, c.head_dim).amax(1)
                div(attn.v_proj.weight, s.reshape(-1, 1))
                if attn.v_proj.bias is not None:
                    div(attn.v_proj.bias, s.reshape(-1))
                mul(attn.o_proj.weight, s[:, None, :].expand(-1, group, -1).reshape(-1))
    return out


def smoothed(model: DecoderLM, ids: list[int], alpha: float = SMOOTH_ALPHA) -> DecoderLM:
    """SmoothQuant for w8a8: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) over every weight that reads channel j;
    down_proj unchanged."""
    stats = input_statistics(model, ids)
    factors = {}
    for kind in ("qkv", "mlp", "o"):
        factors[kind] = []
        for layer, (top, _) in zip(model.model.layers, stats[kind]):
            w_max = torch.stack([w.detach().abs().amax(0).float() for w in group_weights(layer, kind)]).amax(0)
            factors[kind].append((top.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5))
    return folded(model, factors)


def activation_scaled(model: DecoderLM, ids: list[int], alpha: float = AWQ_ALPHA) -> DecoderLM:
    """AWQ's scaling for weight-only int4: s_j = mean|X_j|^alpha, normalised so that max(s) * min(s) = 1."""
    stats = input_statistics(model, ids)
    factors = {}
    for kind in GROUPS:
        factors[kind] = []
        for _, mean in stats[kind]:
            s = mean.clamp(min=1e-6) ** alpha
            factors[kind].append(s / (s.max() * s.min()).sqrt())
    return folded(model, factors)
