"""DeepSpec DSpark / DFlash drafters (``"architectures": ["Qwen3DSparkModel"]``): loading and the two inference
graphs (their ONNX export is ``dspark.export.drafter``).

The drafter reads target features (raw outputs of the tapped target layers, concatenated) and keeps one KV cache
of *context* entries only: ``context_kv`` turns new committed feature rows into per-layer K/V that the runtime
appends to its own draft cache at each row's length, and ``propose`` runs the bidirectional block
[anchor, mask x (B-1)] over that cache, then the sequential Markov stage (vanilla, gated or rnn) that samples the
B draft tokens one after the other. Block K/V are discarded; the draft cache never needs a rollback.

Sampling is inverse-CDF on the fp32 distribution ``q_k = softmax(L_k / T)`` that the graph also returns, with the
uniform noise passed in as an input, so the drafted token is drawn from exactly the q the verifier divides by.
Parameter names are DeepSpec's (no ``model.`` prefix); see the inference spec §2.3.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dspark.errors import DsparkError
from dspark.graphs.checkpoint import WeightReader, load_module_weights, read_config, read_draft_vocab, save_checkpoint
from dspark.graphs.decoder import (
    DecoderConfig,
    DecoderLayer,
    RMSNorm,
    Rotary,
    inverse_frequencies,
    rope_parameters,
    rotate,
)

ARCHITECTURE = "Qwen3DSparkModel"
FROZEN = ("embed_tokens.weight", "lm_head.weight")  # frozen copies of the target's tensors
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


@dataclass(frozen=True)
class DrafterConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    block_size: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    markov_rank: int = 0
    markov_head_type: str | None = None
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    rope: dict = field(default_factory=dict)
    attention_bias: bool = False
    num_target_layers: int = 0
    draft_vocab_size: int = 0  # > 0: the drafter predicts over that many target tokens only (its ``draft_vocab``)

    @property
    def head_size(self) -> int:
        """Rows of the LM head and the Markov head's output: the draft vocabulary, or the target's."""
        return self.draft_vocab_size or self.vocab_size

    @property
    def method(self) -> str:
        return "dspark" if self.markov_rank > 0 or self.enable_confidence_head else "dflash"

    @property
    def feature_size(self) -> int:
        """Width of one target feature row: len(target_layer_ids) * hidden_size."""
        return len(self.target_layer_ids) * self.hidden_size

    @property
    def confidence_uses_markov(self) -> bool:
        return self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank > 0

    def layer_config(self) -> DecoderConfig:
        """The Qwen3 decoder-layer settings the draft layers are built from (QK-norm, no biases unless asked)."""
        return DecoderConfig(
            family="qwen3",
            architecture=ARCHITECTURE,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope=self.rope,
            qkv_bias=self.attention_bias,
            o_bias=self.attention_bias,
            qk_norm=True,
        )

    @classmethod
    def from_hf(cls, cfg: dict, target: DecoderConfig, where: str = "config.json") -> "DrafterConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch != ARCHITECTURE:
            raise DsparkError(f"{where}: architecture {arch!r} is not a DeepSpec drafter (expected {ARCHITECTURE!r})")

        def need(key):
            if key not in cfg:
                raise DsparkError(f"{where}: field '{key}' is missing; a {ARCHITECTURE} config.json must have it")
            return cfg[key]

        heads = int(need("num_attention_heads"))
        markov_rank = int(cfg.get("markov_rank", 0) or 0)
        markov_type = cfg.get("markov_head_type") if markov_rank > 0 else None
        if markov_rank > 0 and markov_type is None:
            markov_type = "vanilla"  # DeepSpec's default head
        confidence = bool(cfg.get("enable_confidence_head", False))
        layer_ids = need("target_layer_ids")
        if not isinstance(layer_ids, (list, tuple)) or not layer_ids or not all(isinstance(i, int) for i in layer_ids):
            raise DsparkError(f"{where}: target_layer_ids must be a non-empty list of integers, got {layer_ids!r}")
        config = cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            block_size=int(need("block_size")),
            target_layer_ids=tuple(layer_ids),
            mask_token_id=int(need("mask_token_id")),
            markov_rank=markov_rank,
            markov_head_type=markov_type,
            enable_confidence_head=confidence,
            confidence_head_with_markov=bool(cfg.get("confidence_head_with_markov", False)) if confidence else False,
            rope=rope_parameters(cfg, where),
            attention_bias=bool(cfg.get("attention_bias", False)),
            num_target_layers=int(cfg.get("num_target_layers", target.num_layers) or target.num_layers),
            draft_vocab_size=int(cfg.get("draft_vocab_size", 0) or 0),
        )
        config.validate(target, where)
        return config

    def validate(self, target: DecoderConfig, where: str = "config.json") -> None:
        def mismatch(name, mine, theirs):
            raise DsparkError(
                f"{where}: {name} is {mine} but the target's is {theirs}; the drafter was trained for another target"
            )

        if self.hidden_size != target.hidden_size:
            mismatch("hidden_size", self.hidden_size, target.hidden_size)
        if self.vocab_size != target.vocab_size:
            mismatch("vocab_size", self.vocab_size, target.vocab_size)
        if self.num_heads % self.num_kv_heads:
            raise DsparkError(
                f"{where}: num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise DsparkError(f"{where}: head_dim {self.head_dim} must be even for RoPE")
        if self.block_size < 1:
            raise DsparkError(f"{where}: block_size is {self.block_size}; it must be >= 1")
        if self.num_layers < 1:
            raise DsparkError(f"{where}: num_hidden_layers is {self.num_layers}; a drafter needs >= 1 layer")
        ids = list(self.target_layer_ids)
        if any(b <= a for a, b in zip(ids, ids[1:])):
            raise DsparkError(f"{where}: target_layer_ids {ids} must be strictly increasing")
        last = target.num_layers - 1
        for i in ids:
            if i != -1 and not 0 <= i <= last - 1:
                raise DsparkError(
                    f"{where}: target_layer_ids entry {i} is outside -1 or 0..{last - 1} for a target with "
                    f"{target.num_layers} layers (the last target layer {last} is not a valid feature layer)"
                )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise DsparkError(f"{where}: mask_token_id {self.mask_token_id} is outside the vocabulary 0..{self.vocab_size - 1}")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            raise DsparkError(f"{where}: draft_vocab_size {self.draft_vocab_size} is outside 1..{self.vocab_size} "
                              "(0 or absent: the whole vocabulary)")
        if self.markov_rank < 0:
            raise DsparkError(f"{where}: markov_rank is {self.markov_rank}; it must be >= 0")
        if self.markov_rank > 0 and self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise DsparkError(
                f"{where}: markov_head_type {self.markov_head_type!r} is not supported; supported: {', '.join(MARKOV_HEAD_TYPES)}"
            )


def deepspec_config(
    target_cfg: dict,
    block_size: int,
    num_layers: int,
    target_layer_ids: list[int],
    mask_token_id: int,
    markov_rank: int,
    markov_head_type: str | None,
    confidence: bool,
    confidence_with_markov: bool = True,
    num_anchors: int = 512,
    draft_vocab_size: int = 0,
) -> dict:
    """A draft ``config.json`` the way DeepSpec's ``build_draft_config`` writes it (spec §2.2)."""
    cfg = copy.deepcopy(target_cfg)
    cfg["architectures"] = [ARCHITECTURE]
    cfg["num_target_layers"] = target_cfg["num_hidden_layers"]
    cfg["num_hidden_layers"] = num_layers
    cfg["block_size"] = block_size
    cfg["mask_token_id"] = mask_token_id
    cfg["target_layer_ids"] = list(target_layer_ids)
    cfg["num_anchors"] = num_anchors
    cfg["enable_confidence_head"] = bool(confidence)
    cfg.pop("confidence_head_with_markov", None)
    if confidence:
        cfg["confidence_head_with_markov"] = bool(confidence_with_markov)
    cfg["markov_rank"] = markov_rank
    cfg.pop("markov_head_type", None)
    if markov_rank > 0:
        cfg["markov_head_type"] = markov_head_type or "vanilla"
    cfg.pop("draft_vocab_size", None)
    if draft_vocab_size:
        cfg["draft_vocab_size"] = draft_vocab_size
    cfg["tie_word_embeddings"] = False
    cfg["layer_types"] = ["full_attention"] * num_layers
    return cfg


class DraftLayer(DecoderLayer):
    """The target's decoder layer plus the context path: the context gets K/V without ``input_layernorm``."""

    def context_kv(self, ctx: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """K [B,Hkv,C,D] (k_proj -> k_norm -> RoPE) and V for the projected context ctx [B,C,d]."""
        attn, c = self.self_attn, self.self_attn.c
        b, n, _ = ctx.shape
        k = attn.k_norm(attn.k_proj(ctx).view(b, n, c.num_kv_heads, c.head_dim))
        k = rotate(k.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1))
        v = attn.v_proj(ctx).view(b, n, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return k, v


class MarkovHead(nn.Module):
    """``inputs`` rows of W1 (one per previous token: a draft-vocabulary index, plus one row shared by every token
    outside a reduced vocabulary) and ``outputs`` columns of W2 (the draft vocabulary)."""

    def __init__(self, kind: str, inputs: int, outputs: int, rank: int, hidden: int):
        super().__init__()
        self.kind = kind
        self.rank = rank
        self.markov_w1 = nn.Embedding(inputs, rank)
        self.markov_w2 = nn.Linear(rank, outputs, bias=False)
        if kind == "gated":
            self.gate_proj = nn.Linear(hidden + rank, rank)
        elif kind == "rnn":
            self.joint_proj = nn.Linear(2 * rank + hidden, 3 * rank)

    def step(self, e: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None):
        """Bias [B,V] for previous-token embeddings e [B,r] and hidden h [B,d]; returns (bias, new state)."""
        if self.kind == "vanilla":
            return self.markov_w2(e), state
        if self.kind == "gated":
            gate = torch.sigmoid(self.gate_proj(torch.cat([h, e], dim=-1)))
            return self.markov_w2(gate * e), state
        gamma, cand, out = self.joint_proj(torch.cat([state, e, h], dim=-1)).chunk(3, dim=-1)
        keep = torch.sigmoid(gamma)
        state = keep * state + (1 - keep) * torch.tanh(cand)
        return self.markov_w2(torch.tanh(out)), state


class ConfidenceHead(nn.Module):
    def __init__(self, inputs: int):
        super().__init__()
        self.proj = nn.Linear(inputs, 1)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, noise: torch.Tensor):
    """Tokens and fp32 q for logits [B, ..., V], temperature [B], noise [B, ...] (uniform in [0, 1)).

    Greedy rows (T == 0) take the argmax; other rows invert the CDF of q = softmax(logits / T) at noise * total.
    q is softmax(logits) for greedy rows.
    """
    logits = logits.float()
    t = temperature.float().reshape(-1, *([1] * (logits.dim() - 1)))
    hot = t > 0
    probs = torch.softmax(logits / torch.where(hot, t, torch.ones_like(t)), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    threshold = noise.float().unsqueeze(-1) * cdf[..., -1:]
    drawn = (cdf < threshold).sum(-1).clamp(max=logits.shape[-1] - 1)
    greedy = torch.argmax(logits, dim=-1)
    return torch.where(hot.squeeze(-1), drawn, greedy), probs


class Drafter(nn.Module):
    """DeepSpec's Qwen3 DSpark/DFlash drafter with the checkpoint's tensor names.

    With a reduced draft vocabulary (``draft_vocab_size`` N > 0, as EAGLE-3 and FR-Spec do) the LM head is the
    target head's rows for the N token ids in ``draft_vocab`` (a checkpoint tensor, most frequent first), W2 of the
    Markov head has N outputs and W1 N + 1 rows (the last for any previous token outside the subset). Drafted
    indices are mapped to target ids inside the graph; the draft law is returned over the N subset tokens, and a
    sampled request's acceptance places it in the target vocabulary (``target_law``, zero outside the subset),
    so sampling stays exact while greedy rounds never write or read a full-vocabulary law."""

    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.config = c
        lc = c.layer_config()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.fc = nn.Linear(c.feature_size, c.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(lc) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.head_size, bias=False)
        if c.draft_vocab_size:
            self.register_buffer("draft_vocab", torch.arange(c.draft_vocab_size))
            self.register_buffer("vocab_index", torch.full((c.vocab_size,), c.draft_vocab_size), persistent=False)
        if c.markov_rank > 0:
            inputs = c.head_size + (1 if c.draft_vocab_size else 0)
            self.markov_head = MarkovHead(c.markov_head_type, inputs, c.head_size, c.markov_rank, c.hidden_size)
        if c.enable_confidence_head:
            self.confidence_head = ConfidenceHead(c.hidden_size + (c.markov_rank if c.confidence_uses_markov else 0))
        self.rotary_emb = Rotary(c.rope, c.head_dim)

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        """The target ids the drafter predicts over (reduced vocabulary only), and their inverse map."""
        with torch.no_grad():
            self.draft_vocab.copy_(ids)
            self.vocab_index.fill_(self.config.draft_vocab_size)
            self.vocab_index[ids] = torch.arange(len(ids), dtype=self.vocab_index.dtype, device=ids.device)

    def to_target(self, index: torch.Tensor) -> torch.Tensor:
        """Target token ids of draft-vocabulary indices."""
        return self.draft_vocab[index] if self.config.draft_vocab_size else index

    def markov_input(self, token: torch.Tensor) -> torch.Tensor:
        """The W1 row of a previous target token."""
        return self.vocab_index[token] if self.config.draft_vocab_size else token

    def target_law(self, probs: torch.Tensor) -> torch.Tensor:
        """A law over the draft vocabulary [..., N] as a law over the target vocabulary [..., V] (zero elsewhere)."""
        if not self.config.draft_vocab_size:
            return probs
        full = probs.new_zeros(*probs.shape[:-1], self.config.vocab_size)
        return full.scatter(-1, self.draft_vocab.expand(*probs.shape[:-1], -1), probs)

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, folder: str | Path, target: DecoderConfig, dtype: torch.dtype = torch.float32,
                        target_dir: str | Path | None = None) -> "Drafter":
        """Load by tensor name. A checkpoint saved without the frozen embedding / LM head copies takes them from
        the target checkpoint in ``target_dir`` (they are the target's tensors by construction, spec §2.4)."""
        folder = Path(folder)
        config = DrafterConfig.from_hf(read_config(folder), target, where=f"{folder}/config.json")
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device="cpu").to(dtype)
        model.rotary_emb.inv_freq = inverse_frequencies(config.rope, config.head_dim)
        reader = WeightReader(folder)
        if config.draft_vocab_size:
            model.set_draft_vocab(read_draft_vocab(reader, config.draft_vocab_size, config.vocab_size))
        aliased = tuple(name for name in FROZEN if name not in reader)
        if aliased:
            if target_dir is None:
                raise DsparkError(f"{folder}: tensor '{aliased[0]}' is missing from the checkpoint")
            target_reader = WeightReader(target_dir)
            with torch.no_grad():
                model.embed_tokens.weight.copy_(target_reader.get("model.embed_tokens.weight"))
                head = "lm_head.weight" if "lm_head.weight" in target_reader else "model.embed_tokens.weight"
                model.lm_head.weight.copy_(target_reader.get(head)[model.to_target(torch.arange(config.head_size))])
        load_module_weights(model, reader, skip=aliased)
        extra = [n for n in reader.unused() if not n.endswith("rotary_emb.inv_freq") and n != "draft_vocab"]
        if extra:
            raise DsparkError(
                f"{folder}: tensors {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} are not expected by "
                f"config.json (markov_rank={config.markov_rank}, markov_head_type={config.markov_head_type!r}, "
                f"enable_confidence_head={config.enable_confidence_head}); config and weights do not match"
            )
        return model.eval()

    @classmethod
    def random(
        cls,
        config: DrafterConfig,
        target_embed: torch.Tensor,
        target_lm_head: torch.Tensor,
        seed: int = 0,
        norm_noise: float = 0.1,
        draft_vocab: torch.Tensor | None = None,
    ) -> "Drafter":
        """Random trainable weights (unit-gain linear layers, norms near 1) and copies of the target's embedding
        and LM head (frozen in training, as DeepSpec does); with a reduced vocabulary, ``draft_vocab`` (target ids,
        most frequent first) picks the head's rows."""
        gen = torch.Generator().manual_seed(seed)
        model = cls(config)
        if config.draft_vocab_size:
            if draft_vocab is None or len(draft_vocab) != config.draft_vocab_size:
                raise DsparkError(f"a drafter with draft_vocab_size {config.draft_vocab_size} needs that many draft_vocab ids")
            model.set_draft_vocab(draft_vocab)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in ("embed_tokens.weight", "lm_head.weight"):
                    continue
                if "norm" in name:
                    p.copy_(1 + norm_noise * torch.randn(p.shape, generator=gen))
                elif name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                elif name == "markov_head.markov_w1.weight":
                    p.copy_(torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            model.embed_tokens.weight.copy_(target_embed)
            model.lm_head.weight.copy_(target_lm_head[model.to_target(torch.arange(config.head_size))])
        model.embed_tokens.weight.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
        return model.eval()

    # ---------------------------------------------------------------------------------------------- graphs
    def empty_cache(self, batch: int, length: int = 0, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        shape = (c.num_layers, batch, c.num_kv_heads, length, c.head_dim)
        dtype = dtype or self.fc.weight.dtype
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)

    def context_kv(self, features: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Context K/V [L_d, B, Hkv, C, D] for target features [B, C, m*d] at absolute positions [B, C]."""
        ctx = self.hidden_norm(self.fc(features))
        cos, sin = self.rotary_emb(positions, ctx.dtype)
        ks, vs = zip(*(layer.context_kv(ctx, cos, sin) for layer in self.layers))
        return torch.stack(ks), torch.stack(vs)

    def block_hidden(self, anchor, start, cache_lens, past_k, past_v) -> torch.Tensor:
        """h [B, block, d] after the final norm: the bidirectional block over the cached context."""
        c = self.config
        b, n = anchor.shape[0], c.block_size
        ids = torch.cat([anchor[:, None], torch.full((b, n - 1), c.mask_token_id, dtype=anchor.dtype, device=anchor.device)], 1)
        positions = start[:, None] + torch.arange(n, device=anchor.device)[None, :]
        h = self.embed_tokens(ids)
        cos, sin = self.rotary_emb(positions, h.dtype)
        s = past_k.shape[3]
        past_mask = (torch.arange(s, device=h.device)[None, :] < cache_lens[:, None])[:, None, None, :]
        new_mask = torch.ones(1, 1, n, n, dtype=torch.bool, device=h.device)  # no mask among block tokens
        for i, layer in enumerate(self.layers):
            h, _, _ = layer(h, cos, sin, past_k[i], past_v[i], past_mask, new_mask)  # block K/V are dropped
        return self.norm(h)

    def propose(self, anchor, start, cache_lens, past_k, past_v, temperature, noise):
        """Draft a block: tokens [B, block] int64 (target ids), q [B, block, N] fp32 over the draft vocabulary
        (``target_law`` places it in the target's), confidence logits [B, block] fp32."""
        c = self.config
        h = self.block_hidden(anchor, start, cache_lens, past_k, past_v)
        base = self.lm_head(h).float()
        if c.markov_rank == 0:
            index, probs = sample_rows(base, temperature, noise)
            if c.enable_confidence_head:
                conf = self.confidence_head.proj(h).squeeze(-1).float()
            else:
                conf = torch.zeros_like(base[..., 0])
            return self.to_target(index), probs, conf
        head = self.markov_head
        state = torch.zeros(h.shape[0], c.markov_rank, dtype=h.dtype, device=h.device) if head.kind == "rnn" else None
        tokens, probs, confs = [], [], []
        prev = self.markov_input(anchor)
        for k in range(c.block_size):
            e = head.markov_w1(prev).to(h.dtype)
            hk = h[:, k]
            bias, state = head.step(e, hk, state)
            index, q = sample_rows(base[:, k] + bias.float(), temperature, noise[:, k])
            if c.enable_confidence_head:
                feats = torch.cat([hk, e], dim=-1) if c.confidence_uses_markov else hk
                confs.append(self.confidence_head.proj(feats).squeeze(-1).float())
            tokens.append(index)
            probs.append(q)
            prev = index  # a drafted index is its own W1 row
        conf = torch.stack(confs, 1) if confs else torch.zeros_like(base[..., 0])
        return self.to_target(torch.stack(tokens, 1)), torch.stack(probs, 1), conf


# -------------------------------------------------------------------------------------------------- files
def save_deepspec(folder: str | Path, config: dict, drafter: Drafter, frozen_copies: bool = True) -> Path:
    """Write a DeepSpec-layout checkpoint (config.json + model.safetensors, DeepSpec tensor names).

    Without ``frozen_copies`` the target's embedding and LM head are left out (DeepSpec writes copies); such a
    checkpoint loads only beside its target, which supplies them.
    """
    tensors = {k: v for k, v in drafter.state_dict().items() if frozen_copies or k not in FROZEN}
    save_checkpoint(folder, config, tensors)
    return Path(folder)
