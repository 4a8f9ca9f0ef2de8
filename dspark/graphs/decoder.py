"""The decoder step graph for Qwen3, Qwen2 and Llama checkpoints.

One forward serves prefill, plain decoding and verification. Every row of the batch has its own cache length;
new tokens are right-padded when rows feed different counts (padding sits after every real token, so causal
attention keeps it out of real rows). The graph reads the cache window and returns only the K/V of the new
tokens: the caller owns the cache and writes the accepted rows into it.

Attention is computed "split": scores against the cache and against the new tokens are concatenated before one
softmax, so the cache window is never copied inside the graph, and grouped-query heads are folded into the
query rows so the cache is never repeated per query head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dspark.errors import DsparkError
from dspark.graphs.checkpoint import WeightReader, load_module_weights, read_config

# architecture string in config.json -> family
ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}


@dataclass(frozen=True)
class DecoderConfig:
    family: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: dict = field(default_factory=dict)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    # a draft LM over a reduced vocabulary: its ids 0..N-1 stand for the target ids of its ``draft_vocab`` tensor and
    # id N (vocab_size = N + 1) for every other target token, in its inputs and its law alike
    draft_vocab_size: int = 0

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "DecoderConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in ARCHITECTURES:
            raise DsparkError(
                f"{where}: architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
            )
        family = ARCHITECTURES[arch]
        heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        draft_vocab = int(cfg.get("draft_vocab_size", 0) or 0)
        if draft_vocab and cfg["vocab_size"] != draft_vocab + 1:
            raise DsparkError(f"{where}: a draft LM with draft_vocab_size {draft_vocab} has vocab_size {draft_vocab + 1} "
                              f"(its draft vocabulary and one id for every other token), not {cfg['vocab_size']}")
        return cls(
            family=family,
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=rope_parameters(cfg, where),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama and Qwen3 put attention_bias on all four projections.
            qkv_bias=True if family == "qwen2" else attention_bias,
            o_bias=False if family == "qwen2" else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            draft_vocab_size=draft_vocab,
        )


def rope_parameters(cfg: dict, where: str) -> dict:
    """RoPE settings from transformers 5 ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    if not params:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = rope_type
    if rope_type not in ("default", "linear", "llama3"):
        raise DsparkError(f"{where}: rope_type {rope_type!r} is not supported; supported: default, linear, llama3")
    return params


def inverse_frequencies(rope: dict, head_dim: int) -> torch.Tensor:
    """inv_freq exactly as transformers computes it (fp32, integer exponents), with linear or Llama 3 scaling."""
    base = float(rope["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope["rope_type"] == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    elif rope["rope_type"] == "llama3":
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32, as the reference implementations do, whatever the graph dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Rotary(nn.Module):
    def __init__(self, rope: dict, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(rope, head_dim), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, [..., head_dim], for integer positions of any shape."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attend(q: torch.Tensor, past_k, past_v, new_k, new_v, past_mask, new_mask) -> torch.Tensor:
    """Softmax attention over [cache window ; new tokens] without concatenating K/V.

    q: [B, H, n, D]; past_k/v: [B, Hkv, S, D]; new_k/v: [B, Hkv, n', D]; past_mask [B, 1, 1, S] and new_mask
    [B or 1, 1, n, n'] are True where a query may look. Returns [B, H, n, D].
    """
    b, h, n, d = q.shape
    kv_heads = past_k.shape[1]
    group = h // kv_heads
    # query head i reads KV head i // group: fold each group's heads into the row dimension
    qg = q.reshape(b, kv_heads, group * n, d)
    scale = 1.0 / math.sqrt(d)
    s_past = torch.matmul(qg, past_k.transpose(-1, -2)) * scale
    s_new = torch.matmul(qg, new_k.transpose(-1, -2)) * scale
    new_mask = new_mask.repeat(1, 1, group, 1)
    scores = torch.cat([s_past, s_new], dim=-1).float()
    mask = torch.cat([past_mask.expand(-1, -1, group * n, -1).expand(b, -1, -1, -1), new_mask.expand(b, -1, -1, -1)], dim=-1)
    scores = torch.where(mask, scores, torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    s = past_k.shape[2]
    out = torch.matmul(probs[..., :s], past_v) + torch.matmul(probs[..., s:], new_v)
    return out.reshape(b, h, n, d)


class Attention(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def project(self, x: torch.Tensor, cos, sin):
        """q [B,H,n,D], k and v [B,Hkv,n,D] for hidden states x [B,n,d], RoPE applied to q and k."""
        b, n, _ = x.shape
        c = self.c
        q = self.q_proj(x).view(b, n, c.num_heads, c.head_dim)
        k = self.k_proj(x).view(b, n, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).view(b, n, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = rotate(q.transpose(1, 2), cos, sin)
        k = rotate(k.transpose(1, 2), cos, sin)
        return q, k, v.transpose(1, 2)

    def forward(self, x, cos, sin, past_k, past_v, past_mask, new_mask):
        q, k, v = self.project(x, cos, sin)
        out = attend(q, past_k, past_v, k, v, past_mask, new_mask)
        b, _, n, _ = q.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1)), k, v


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, c.mlp_bias)

    def forward(self, h, cos, sin, past_k, past_v, past_mask, new_mask):
        a, k, v = self.self_attn(self.input_layernorm(h), cos, sin, past_k, past_v, past_mask, new_mask)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, k, v


class Body(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary_emb = Rotary(c.rope, c.head_dim)


class DecoderLM(nn.Module):
    """A causal LM whose parameter names are the Hugging Face ones (``model.layers.0.self_attn.q_proj.weight``...).

    ``tap_layers`` lists decoder layers whose raw outputs (residual stream after the layer, before any norm;
    -1 for the embedding output) the step also returns, concatenated in that order: the features DSpark and
    DFlash drafters read.
    """

    def __init__(self, c: DecoderConfig, tap_layers: list[int] | tuple[int, ...] = ()):
        super().__init__()
        self.config = c
        self.tap_layers = tuple(tap_layers)
        for layer in self.tap_layers:
            if not -1 <= layer < c.num_layers:
                raise DsparkError(f"target_layer_ids: layer {layer} is outside the target's 0..{c.num_layers - 1}")
        self.model = Body(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_pretrained(cls, folder: str | Path, tap_layers=(), dtype: torch.dtype = torch.float32) -> "DecoderLM":
        config = DecoderConfig.from_hf(read_config(folder), where=f"{folder}/config.json")
        with torch.device("meta"):
            model = cls(config, tap_layers)
        model = model.to_empty(device="cpu").to(dtype)
        model.model.rotary_emb.inv_freq = inverse_frequencies(config.rope, config.head_dim)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        reader = WeightReader(folder)
        load_module_weights(model, reader)
        return model.eval()

    def step(self, input_ids, position_ids, cache_lens, past_k, past_v):
        """One forward over ``n`` new tokens per row.

        input_ids, position_ids: [B, n] int64; cache_lens: [B] int64 (valid cache entries per row);
        past_k, past_v: [L, B, Hkv, S, D] cache window (entries at and past cache_lens[b] are ignored).
        Returns logits [B, n, V] fp32, new_k and new_v [L, B, Hkv, n, D], and the tapped features
        [B, n, len(tap_layers) * d] (None without taps).
        """
        n = input_ids.shape[1]
        s = past_k.shape[3]
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(position_ids, h.dtype)
        past_mask = (torch.arange(s, device=h.device)[None, :] < cache_lens[:, None])[:, None, None, :]
        idx = torch.arange(n, device=h.device)
        new_mask = (idx[None, :] <= idx[:, None])[None, None]
        taps = {-1: h} if -1 in self.tap_layers else {}
        new_k, new_v = [], []
        for i, layer in enumerate(self.model.layers):
            h, k, v = layer(h, cos, sin, past_k[i], past_v[i], past_mask, new_mask)
            new_k.append(k)
            new_v.append(v)
            if i in self.tap_layers:
                taps[i] = h
        logits = self.lm_head(self.model.norm(h)).float()
        hidden = torch.cat([taps[i] for i in self.tap_layers], dim=-1) if self.tap_layers else None
        return logits, torch.stack(new_k), torch.stack(new_v), hidden

    def empty_cache(self, batch: int, length: int = 0, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        shape = (c.num_layers, batch, c.num_kv_heads, length, c.head_dim)
        dtype = dtype or self.lm_head.weight.dtype
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward without a cache (training and references): logits [B, n, V]."""
        b, n = input_ids.shape
        positions = torch.arange(n, device=input_ids.device).expand(b, n)
        past_k, past_v = self.empty_cache(b)
        past_k, past_v = past_k.to(input_ids.device), past_v.to(input_ids.device)
        lens = torch.zeros(b, dtype=torch.long, device=input_ids.device)
        return self.step(input_ids, positions, lens, past_k, past_v)[0]
