"""DeepSpec DSpark/DFlash drafters: checkpoint loading by name, an independent one-shot reference written from the
inference spec (§2.3, §4, §5, §6.1), the exported ONNX graphs under onnxruntime, and the sampler's distribution."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import hf_model, save_hf
from dspark.errors import DsparkError
from dspark.graphs.decoder import DecoderConfig
from dspark.export.drafter import export_drafter
from dspark.graphs.drafter import (
    Drafter,
    DrafterConfig,
    deepspec_config,
    save_deepspec,
)

V, D, R, BLOCK, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INNER = 96, 64, 8, 4, 2, 4, 2, 16, 128
LAYER_IDS = [0, 1]  # of the 3-layer target; layer 2 (the last) is forbidden
MASK = 95
# name -> (markov_rank, markov_head_type, confidence, confidence_with_markov)
VARIANTS = {
    "vanilla": (R, "vanilla", True, True),
    "gated": (R, "gated", True, False),
    "rnn": (R, "rnn", True, True),
    "dflash": (0, None, False, False),
}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def target(tmp_path_factory):
    model = hf_model("qwen3", V, seed=11)
    folder = save_hf(model, tmp_path_factory.mktemp("drafter") / "target", V)
    cfg = json.loads((folder / "config.json").read_text())
    return model, cfg, DecoderConfig.from_hf(cfg)


def spec_config(target_cfg: dict, variant: str) -> dict:
    """The draft config.json written by hand from spec §2.2 (not through deepspec_config)."""
    rank, kind, conf, conf_markov = VARIANTS[variant]
    cfg = dict(target_cfg)
    cfg.update(architectures=["Qwen3DSparkModel"], num_hidden_layers=LAYERS, num_target_layers=3, block_size=BLOCK,
               mask_token_id=MASK, target_layer_ids=LAYER_IDS, num_anchors=8, enable_confidence_head=conf,
               markov_rank=rank, tie_word_embeddings=False, layer_types=["full_attention"] * LAYERS)
    if conf:
        cfg["confidence_head_with_markov"] = conf_markov
    if rank:
        cfg["markov_head_type"] = kind
    return cfg


def spec_tensors(model, variant: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the documented names and shapes (spec §2.3); embedding and LM head copied."""
    rank, kind, conf, conf_markov = VARIANTS[variant]
    shapes = {"fc.weight": (D, len(LAYER_IDS) * D), "hidden_norm.weight": (D,), "norm.weight": (D,)}
    for l in range(LAYERS):
        p = f"layers.{l}."
        shapes.update({
            p + "input_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, D),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, D),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, D),
            p + "self_attn.o_proj.weight": (D, HEADS * HEAD_DIM),
            p + "self_attn.q_norm.weight": (HEAD_DIM,),
            p + "self_attn.k_norm.weight": (HEAD_DIM,),
            p + "post_attention_layernorm.weight": (D,),
            p + "mlp.gate_proj.weight": (INNER, D),
            p + "mlp.up_proj.weight": (INNER, D),
            p + "mlp.down_proj.weight": (D, INNER),
        })
    if rank:
        shapes["markov_head.markov_w1.weight"] = (V, rank)
        shapes["markov_head.markov_w2.weight"] = (V, rank)
        if kind == "gated":
            shapes["markov_head.gate_proj.weight"] = (rank, D + rank)
            shapes["markov_head.gate_proj.bias"] = (rank,)
        if kind == "rnn":
            shapes["markov_head.joint_proj.weight"] = (3 * rank, 2 * rank + D)
            shapes["markov_head.joint_proj.bias"] = (3 * rank,)
    if conf:
        shapes["confidence_head.proj.weight"] = (1, D + (rank if conf_markov else 0))
        shapes["confidence_head.proj.bias"] = (1,)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        x = torch.randn(shape, generator=gen)
        if "norm" in name:
            x = 1 + 0.1 * x
        elif name.endswith("bias"):
            x = 0.1 * x
        elif name != "markov_head.markov_w1.weight":
            x = x / math.sqrt(shape[-1])
        tensors[name] = x
    tensors["embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
    tensors["lm_head.weight"] = model.lm_head.weight.detach().clone()
    return tensors


def write_checkpoint(folder: Path, cfg: dict, tensors: dict, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    if shards == 1:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
        return folder
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: tensors[k].contiguous() for k in part}, str(folder / file))
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def drafters(target, tmp_path_factory):
    """variant -> (folder, config dict, tensors by name, loaded Drafter)."""
    model, target_cfg, target_config = target
    root = tmp_path_factory.mktemp("drafters")
    out = {}
    for i, variant in enumerate(VARIANTS):
        cfg, tensors = spec_config(target_cfg, variant), spec_tensors(model, variant, seed=100 + i)
        folder = write_checkpoint(root / variant, cfg, tensors, shards=2 if variant == "vanilla" else 1)
        out[variant] = (folder, cfg, tensors, Drafter.from_pretrained(folder, target_config))
    return out


def target_features(model, ids: torch.Tensor) -> torch.Tensor:
    """Raw outputs of the tapped target layers (hidden_states[l + 1] for l below the last), concatenated."""
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    return torch.cat([hs[l + 1] for l in LAYER_IDS], dim=-1)


# ------------------------------------------------------------------------------------------------ reference
def rms(x, w, eps=1e-6):
    x = x.float()
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, positions, theta=10000.0):
    """x [n, heads, D] at integer positions [n]: half-rotation RoPE."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = positions.float()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None, :], torch.cat([ang.sin()] * 2, -1)[:, None, :]
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x * cos + rotated * sin


def reference(W: dict, variant: str, features: torch.Tensor, anchor: int, s: int, temperature: float, noise):
    """One-shot DSpark draft from spec §4.2/§5/§6.1: all context [0, s) projected at once, then the block attends
    to [ctx K/V ; block K/V] with no mask, then the sequential Markov stage. Returns tokens, q, confidence."""
    rank, kind, conf, conf_markov = VARIANTS[variant]
    ctx = rms(features[:s] @ W["fc.weight"].T, W["hidden_norm.weight"])
    ids = torch.tensor([anchor] + [MASK] * (BLOCK - 1))
    pos_blk, pos_ctx = torch.arange(s, s + BLOCK), torch.arange(s)
    h = W["embed_tokens.weight"][ids]
    for l in range(LAYERS):
        w = {k[len(f"layers.{l}."):]: v for k, v in W.items() if k.startswith(f"layers.{l}.")}
        x = rms(h, w["input_layernorm.weight"])
        q = rope(rms((x @ w["self_attn.q_proj.weight"].T).view(BLOCK, HEADS, HEAD_DIM), w["self_attn.q_norm.weight"]), pos_blk)

        def kv(src, pos):
            n = src.shape[0]
            k = rope(rms((src @ w["self_attn.k_proj.weight"].T).view(n, KV_HEADS, HEAD_DIM), w["self_attn.k_norm.weight"]), pos)
            return k, (src @ w["self_attn.v_proj.weight"].T).view(n, KV_HEADS, HEAD_DIM)

        (kc, vc), (kb, vb) = kv(ctx, pos_ctx), kv(x, pos_blk)
        k = torch.cat([kc, kb]).repeat_interleave(HEADS // KV_HEADS, dim=1)
        v = torch.cat([vc, vb]).repeat_interleave(HEADS // KV_HEADS, dim=1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HEAD_DIM), dim=-1)
        h = h + torch.einsum("hqk,khd->qhd", att, v).reshape(BLOCK, -1) @ w["self_attn.o_proj.weight"].T
        y = rms(h, w["post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(y @ w["mlp.gate_proj.weight"].T)
        h = h + (gate * (y @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T
    hk = rms(h, W["norm.weight"])
    U = hk @ W["lm_head.weight"].T

    def draw(logits, u):
        if temperature == 0:
            return int(torch.argmax(logits)), torch.softmax(logits, -1)
        q = torch.softmax(logits / temperature, -1)
        cdf = torch.cumsum(q, -1)
        return min(int((cdf < u * cdf[-1]).sum()), V - 1), q

    tokens, probs, confs = [], [], []
    prev, state = anchor, torch.zeros(rank)
    for k in range(BLOCK):
        L = U[k]
        e = W["markov_head.markov_w1.weight"][prev] if rank else None
        if kind == "vanilla":
            L = L + W["markov_head.markov_w2.weight"] @ e
        elif kind == "gated":
            g = torch.sigmoid(W["markov_head.gate_proj.weight"] @ torch.cat([hk[k], e]) + W["markov_head.gate_proj.bias"])
            L = L + W["markov_head.markov_w2.weight"] @ (g * e)
        elif kind == "rnn":
            z = W["markov_head.joint_proj.weight"] @ torch.cat([state, e, hk[k]]) + W["markov_head.joint_proj.bias"]
            gamma, cand, out = z[:rank], z[rank:2 * rank], z[2 * rank:]
            state = torch.sigmoid(gamma) * state + (1 - torch.sigmoid(gamma)) * torch.tanh(cand)
            L = L + W["markov_head.markov_w2.weight"] @ torch.tanh(out)
        if conf:
            f = torch.cat([hk[k], e]) if conf_markov else hk[k]
            confs.append(float(W["confidence_head.proj.weight"][0] @ f + W["confidence_head.proj.bias"][0]))
        else:
            confs.append(0.0)
        tok, q = draw(L, float(noise[k]))
        tokens.append(tok)
        probs.append(q)
        prev = tok
    return torch.tensor(tokens), torch.stack(probs), torch.tensor(confs)


# ------------------------------------------------------------------------------------------------ (a) loading
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_load_by_name_round_trips(drafters, target, variant, tmp_path):
    folder, cfg, tensors, drafter = drafters[variant]
    rank, kind, conf, conf_markov = VARIANTS[variant]
    state = drafter.state_dict()
    assert set(state) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(state[name], t), name
    c = drafter.config
    assert (c.block_size, c.num_layers, c.target_layer_ids, c.mask_token_id) == (BLOCK, LAYERS, tuple(LAYER_IDS), MASK)
    assert (c.markov_rank, c.markov_head_type, c.enable_confidence_head) == (rank, kind, conf)
    assert c.method == ("dflash" if variant == "dflash" else "dspark")
    # our writer produces the same names, shapes and config fields
    model, target_cfg, target_config = target
    built = deepspec_config(target_cfg, BLOCK, LAYERS, LAYER_IDS, MASK, rank, kind, conf, conf_markov, num_anchors=8)
    assert built == cfg
    fresh = Drafter.random(c, model.model.embed_tokens.weight, model.lm_head.weight, seed=3)
    save_deepspec(tmp_path / "mine", built, fresh)
    again = Drafter.from_pretrained(tmp_path / "mine", target_config)
    for name, t in fresh.state_dict().items():
        assert tensors[name].shape == t.shape and torch.equal(again.state_dict()[name], t), name
    assert torch.equal(again.embed_tokens.weight, model.model.embed_tokens.weight)


def test_missing_or_misshapen_tensors_are_refused(drafters, target, tmp_path):
    _, cfg, tensors, _ = drafters["gated"]
    target_config = target[2]
    missing = {k: v for k, v in tensors.items() if k != "markov_head.gate_proj.bias"}
    with pytest.raises(DsparkError, match="markov_head.gate_proj.bias"):
        Drafter.from_pretrained(write_checkpoint(tmp_path / "missing", cfg, missing), target_config)
    bad = dict(tensors, **{"fc.weight": torch.zeros(D, 3 * D)})
    with pytest.raises(DsparkError, match=r"fc\.weight.*\[64, 192\]"):
        Drafter.from_pretrained(write_checkpoint(tmp_path / "shape", cfg, bad), target_config)
    # Markov tensors present but config.json says rank 0: config and weights disagree
    with pytest.raises(DsparkError, match="markov_head"):
        Drafter.from_pretrained(write_checkpoint(tmp_path / "extra", spec_config(target[1], "dflash"), tensors), target_config)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"hidden_size": 32}, ["hidden_size", "32", "64"]),
        ({"vocab_size": 100}, ["vocab_size", "100", "96"]),
        ({"target_layer_ids": [0, 2]}, ["target_layer_ids", "2"]),
        ({"target_layer_ids": [1, 0]}, ["target_layer_ids", "increasing"]),
        ({"target_layer_ids": [-2, 0]}, ["target_layer_ids", "-2"]),
        ({"mask_token_id": 96}, ["mask_token_id", "96"]),
        ({"markov_head_type": "lstm"}, ["markov_head_type", "lstm"]),
        ({"block_size": 0}, ["block_size", "0"]),
        ({"architectures": ["Qwen3ForCausalLM"]}, ["architecture", "Qwen3ForCausalLM"]),
    ],
)
def test_bad_fields_are_named(target, change, words):
    cfg = dict(spec_config(target[1], "vanilla"), **change)
    with pytest.raises(DsparkError) as err:
        DrafterConfig.from_hf(cfg, target[2], where="draft/config.json")
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_minus_one_layer_id_is_accepted(target):
    cfg = dict(spec_config(target[1], "vanilla"), target_layer_ids=[-1, 1])
    assert DrafterConfig.from_hf(cfg, target[2]).feature_size == 2 * D


# ------------------------------------------------------------------------------------------------ (b) reference
# (token sequence, temperature, starts of 3 rounds): ragged schedules, greedy and sampled rows in one batch
ROWS = [(0, 0.0, [5, 8, 12]), (1, 0.9, [7, 9, 10]), (0, 1.3, [3, 4, 11]), (1, 0.0, [6, 10, 13])]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_matches_one_shot_reference(drafters, target, variant):
    _, _, W, drafter = drafters[variant]
    model = target[0]
    gen = torch.Generator().manual_seed(5)
    seqs = torch.randint(1, V, (2, 20), generator=gen)
    feats = target_features(model, seqs)  # [2, 20, m*d]
    b, cap = len(ROWS), 16
    # the cache window holds garbage past each row's length: masking must keep it out
    past_k = torch.randn(LAYERS, b, KV_HEADS, cap, HEAD_DIM, generator=gen)
    past_v = torch.randn(LAYERS, b, KV_HEADS, cap, HEAD_DIM, generator=gen)
    lens = [0] * b
    temps = torch.tensor([t for _, t, _ in ROWS])
    worst = dict(probs=0.0, conf=0.0)
    for r in range(3):
        starts = [sched[r] for _, _, sched in ROWS]
        width = max(s - n for s, n in zip(starts, lens))
        f = torch.zeros(b, width, len(LAYER_IDS) * D)
        pos = torch.zeros(b, width, dtype=torch.long)
        for i, ((seq, _, _), s) in enumerate(zip(ROWS, starts)):
            f[i, : s - lens[i]] = feats[seq, lens[i]:s]
            pos[i, : s - lens[i]] = torch.arange(lens[i], s)
        with torch.no_grad():
            ck, cv = drafter.context_kv(f, pos)
        for i, s in enumerate(starts):
            past_k[:, i, :, lens[i]:s] = ck[:, i, :, : s - lens[i]]
            past_v[:, i, :, lens[i]:s] = cv[:, i, :, : s - lens[i]]
            lens[i] = s
        anchor = torch.tensor([int(seqs[seq, s]) for (seq, _, _), s in zip(ROWS, starts)])
        noise = torch.rand(b, BLOCK, generator=gen)
        with torch.no_grad():
            tokens, probs, conf = drafter.propose(anchor, torch.tensor(starts), torch.tensor(lens), past_k, past_v, temps, noise)
        assert tokens.shape == (b, BLOCK) and tokens.dtype == torch.int64
        assert probs.shape == (b, BLOCK, V) and probs.dtype == torch.float32 and conf.shape == (b, BLOCK)
        for i, ((seq, t, _), s) in enumerate(zip(ROWS, starts)):
            with torch.no_grad():
                rt, rp, rc = reference(W, variant, feats[seq], int(anchor[i]), s, t, noise[i])
            assert torch.equal(tokens[i], rt), (variant, r, i, tokens[i], rt)
            worst["probs"] = max(worst["probs"], float((probs[i] - rp).abs().max()))
            worst["conf"] = max(worst["conf"], float((conf[i] - rc).abs().max()))
    print(f"{variant}: max |dq| {worst['probs']:.2e}, max |dz| {worst['conf']:.2e}")
    assert worst["probs"] <= 1e-5 and worst["conf"] <= 1e-5, worst


# ------------------------------------------------------------------------------------------------ (c) ONNX
@pytest.mark.parametrize("flavour,variant", [("standard", "rnn"), ("standard", "dflash")]
                         + [("ort", v) for v in VARIANTS])
def test_onnx_graphs_match_torch(drafters, flavour, variant, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    drafter = drafters[variant][3]
    specs = export_drafter(drafter, tmp_path, flavour=flavour, positions=64)
    ins, outs = specs["draft_propose.onnx"]
    assert [s.name for s in ins] == ["anchor", "start", "cache_lens", "past_k", "past_v", "temperature", "noise"]
    assert [s.name for s in outs] == ["draft_tokens", "draft_probs", "confidence_logits"]
    assert outs[0].shape == ("batch", BLOCK) and outs[1].shape == ("batch", BLOCK, V)
    ins, outs = specs["draft_context.onnx"]
    assert [s.name for s in ins] == ["features", "positions"] and [s.name for s in outs] == ["ctx_k", "ctx_v"]
    assert outs[0].shape == (LAYERS, "batch", KV_HEADS, "context", HEAD_DIM)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = {n: ort.InferenceSession(str(tmp_path / n), opts, providers=["CPUExecutionProvider"]) for n in specs}
    gen = torch.Generator().manual_seed(9)
    b, c, cap = 7, 9, 11
    feats = torch.randn(b, c, len(LAYER_IDS) * D, generator=gen)
    pos = torch.arange(c).repeat(b, 1) + torch.arange(b)[:, None]
    with torch.no_grad():
        ck, cv = drafter.context_kv(feats, pos)
    ok, ov = sess["draft_context.onnx"].run(None, {"features": feats.numpy(), "positions": pos.numpy()})
    ctx_err = max(np.abs(ok - ck.numpy()).max(), np.abs(ov - cv.numpy()).max())

    inputs = {
        "anchor": torch.randint(0, V, (b,), generator=gen),
        "start": torch.tensor([0, 3, 11, 7, 1, 5, 9]),
        "cache_lens": torch.tensor([0, 3, 11, 7, 1, 5, 9]),  # ragged, including an empty row and a full window
        "past_k": torch.randn(LAYERS, b, KV_HEADS, cap, HEAD_DIM, generator=gen),
        "past_v": torch.randn(LAYERS, b, KV_HEADS, cap, HEAD_DIM, generator=gen),
        "temperature": torch.tensor([0.0, 1.0, 0.7, 0.0, 2.0, 1.0, 0.0]),
        "noise": torch.rand(b, BLOCK, generator=gen),
    }
    # a batch with sampled and greedy rows, then an all-greedy one (the ort flavour skips the draw for it)
    for temperature in (inputs["temperature"], torch.zeros(b)):
        inputs["temperature"] = temperature
        with torch.no_grad():
            tokens, probs, conf = drafter.propose(**inputs)
        ot, op, oc = sess["draft_propose.onnx"].run(None, {k: v.numpy() for k, v in inputs.items()})
        prop_err = max(np.abs(op - probs.numpy()).max(), np.abs(oc - conf.numpy()).max())
        print(f"{variant}: onnx ctx max err {ctx_err:.2e}, propose max err {prop_err:.2e}")
        assert ot.dtype == np.int64 and np.array_equal(ot, tokens.numpy())
        assert ctx_err <= 1e-4 and prop_err <= 1e-4


# ------------------------------------------------------------------------------------------------ (d) sampling
def test_sampled_frequencies_follow_q(drafters, target):
    drafter = drafters["vanilla"][3]
    model = target[0]
    n, s = 20000, 6
    seq = torch.randint(1, V, (1, s + 1), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ck, cv = drafter.context_kv(target_features(model, seq)[:, :s], torch.arange(s)[None])
        tokens, probs, _ = drafter.propose(
            seq[:, s].expand(n), torch.full((n,), s), torch.full((n,), s), ck.expand(-1, n, -1, -1, -1),
            cv.expand(-1, n, -1, -1, -1), torch.full((n,), 1.5), torch.rand(n, BLOCK, generator=torch.Generator().manual_seed(8)),
        )
    tvs = []
    for k in range(BLOCK):
        freq = torch.bincount(tokens[:, k], minlength=V).float() / n
        # position 1's q is the same on every row; later positions mix over the sampled prefixes
        tvs.append(0.5 * float((freq - probs[:, k].mean(0)).abs().sum()))
    print("total variation per position", [f"{t:.3f}" for t in tvs])
    assert max(tvs) < 0.05, tvs
    assert float(probs[:, 0].max()) < 0.9  # not a degenerate distribution
