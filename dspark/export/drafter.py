"""ONNX export of a DSpark / DFlash drafter's two inference graphs (``dspark.graphs.drafter.Drafter``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dspark.export.onnx import export_graph
from dspark.export.ort_drafter import lower_drafter
from dspark.graphs.drafter import Drafter


class _ContextGraph(nn.Module):
    def __init__(self, drafter: Drafter):
        super().__init__()
        self.drafter = drafter

    def forward(self, features, positions):
        return self.drafter.context_kv(features, positions)


class _ProposeGraph(nn.Module):
    def __init__(self, drafter: Drafter):
        super().__init__()
        self.drafter = drafter

    def forward(self, anchor, start, cache_lens, past_k, past_v, temperature, noise):
        return self.drafter.propose(anchor, start, cache_lens, past_k, past_v, temperature, noise)


CONTEXT_GRAPH = "draft_context.onnx"
PROPOSE_GRAPH = "draft_propose.onnx"


def export_drafter(drafter: Drafter, folder: str | Path, quantize: str | None = None, flavour: str = "standard",
                   positions: int = 0) -> dict:
    """Export ``draft_context.onnx`` and ``draft_propose.onnx`` into ``folder``; returns {file: (inputs, outputs)}.
    ``flavour`` "standard": torch's export (standard operators, for TensorRT); "ort": ``ort_drafter``'s lowering in
    ONNX Runtime's fused operators, whose rotary tables cover ``positions`` positions. ``quantize`` ("int4"/"int8",
    ort flavour only: MatMulNBits is an ONNX Runtime operator) stores the products' weights block-quantized, as
    the target's are with ``--quantize``; embeddings stay as they are (they are the target's, shared with its graph).

    draft_context: features [batch, context, m*d], positions [batch, context] int64
        -> ctx_k, ctx_v [L_d, batch, Hkv, context, D]
    draft_propose: anchor [batch] int64, start [batch] int64, cache_lens [batch] int64,
        past_k, past_v [L_d, batch, Hkv, cache, D], temperature [batch] fp32, noise [batch, block] fp32
        -> draft_tokens [batch, block] int64, draft_probs [batch, block, N] fp32 (over the drafter's vocabulary:
           N = V, or its draft_vocab_size with the ids in the manifest's models.draft.draft_vocab),
           confidence_logits [batch, block] fp32
    """
    if flavour == "ort":
        return lower_drafter(drafter, folder, {"context": CONTEXT_GRAPH, "propose": PROPOSE_GRAPH}, positions, quantize)
    if quantize is not None:
        raise ValueError("a quantized drafter needs the ort flavour (MatMulNBits is an ONNX Runtime operator)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = drafter.config
    dtype = drafter.fc.weight.dtype
    # distinct example sizes >= 2 that no static dimension shares, so the dynamic ones stay symbolic
    static = {c.block_size, c.num_layers, c.num_kv_heads, c.head_dim, c.feature_size, c.vocab_size}
    sizes = [n for n in range(2, 64) if n not in static]
    batch, context, cache = sizes[:3]
    gen = torch.Generator().manual_seed(0)
    ctx_example = {
        "features": torch.randn(batch, context, c.feature_size, generator=gen).to(dtype),
        "positions": torch.arange(context).repeat(batch, 1),
    }
    results = {}
    results[CONTEXT_GRAPH] = export_graph(
        _ContextGraph(drafter),
        ctx_example,
        {"features": {0: "batch", 1: "context"}, "positions": {0: "batch", 1: "context"}},
        ["ctx_k", "ctx_v"],
        folder / CONTEXT_GRAPH,
    )
    kv_shape = (c.num_layers, batch, c.num_kv_heads, cache, c.head_dim)
    propose_example = {
        "anchor": torch.randint(0, c.vocab_size, (batch,), generator=gen),
        "start": torch.full((batch,), cache, dtype=torch.long),
        "cache_lens": torch.full((batch,), cache, dtype=torch.long),
        "past_k": torch.randn(kv_shape, generator=gen).to(dtype),
        "past_v": torch.randn(kv_shape, generator=gen).to(dtype),
        "temperature": torch.ones(batch),
        "noise": torch.rand(batch, c.block_size, generator=gen),
    }
    results[PROPOSE_GRAPH] = export_graph(
        _ProposeGraph(drafter),
        propose_example,
        {
            "anchor": {0: "batch"},
            "start": {0: "batch"},
            "cache_lens": {0: "batch"},
            "past_k": {1: "batch", 3: "cache"},
            "past_v": {1: "batch", 3: "cache"},
            "temperature": {0: "batch"},
            "noise": {0: "batch"},
        },
        ["draft_tokens", "draft_probs", "confidence_logits"],
        folder / PROPOSE_GRAPH,
    )
    return results
