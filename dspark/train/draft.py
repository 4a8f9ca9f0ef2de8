"""Training drafters against a frozen target: DSpark and DFlash block drafters, and a small draft LM.

``dspark`` / ``dflash`` train the DeepSpec-layout ``Drafter`` (spec §2-§6, paper §3.3). Every step draws
sequences from ``train.npy`` (``target.batch_at``: a pure function of (seed, step)), runs the frozen target once to
get the tapped layer outputs (the context features) and its logits, and samples anchor positions per sequence.
The block of anchor s is [x_s, mask x (B-1)] at positions s..s+B-1 and predicts x_{s+1..s+B}; all the blocks of
a sequence are trained in one forward with the training attention mask of spec §4.3: a block query sees the
context keys of positions < s (the features of those positions, projected by ``fc`` -> ``hidden_norm``, through
each layer's k/v projections, exactly as ``Drafter.context_kv`` does at inference) and the keys of its own block,
nothing else. The Markov bias is teacher-forced (previous token = anchor, then the ground truth). Loss, each term a
mean over block slots weighted by w_k = exp(-k/4) (0-based k), as DeepSpec's ``loss.py`` normalises it:

    dspark: 0.1 * CE(L_k, x_{s+k}) + 0.9 * ||softmax(L_k) - softmax(T_k)||_1 + 1.0 * BCE(z_k, c*_k)
    dflash: CE only (no Markov, no confidence head)

with T_k the target's logits at the same position and c*_k = 1 - 1/2 ||softmax(L_k) - softmax(T_k)||_1 (no grad).
``block_logits`` is the same loop as ``Drafter.propose``; the tests check the training forward against
``context_kv`` + ``propose`` for single anchors, so training and inference cannot drift apart.

``draft-lm`` distils a small Qwen3 ``DecoderLM`` (same vocabulary) with KL(target || draft) on train windows (with
make-data's answer masks: the mean over the positions whose next token the target wrote) and saves it in HF layout
with the target's tokenizer and generation config.

Held-out acceptance: the mean accepted length tau under greedy verification, estimated teacher-forced on fixed
held-out windows: tau = 1 + sum_k prod_{i<=k} [draft_i == target argmax_i], where the target argmax is taken on the
data prefix and the draft tokens are the drafter's own greedy chain (its Markov head fed its own previous argmax,
as at inference). For block drafters also ``tau_t1``, DeepSpec's probabilistic estimate at T=1:
1 + sum_k prod_{i<=k} c*_i. For the draft LM, K = 4 draft tokens from every position (with make-data's answer masks:
every position whose next token the target wrote).

Both run where the target is loaded (``--device``: the CPU or a CUDA GPU) in bfloat16 autocast; every batch is
drawn on the host and moved there, so a run's batches are the same on either device. Resumable from
``OUTPUT/train_state.pt`` (saved atomically every ``save_minutes``, on SIGTERM/SIGINT and at the
end, together with the inference checkpoint), and ``training_log.jsonl``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dspark.errors import DsparkError
from dspark.graphs.checkpoint import WeightReader, read_config, read_draft_vocab
from dspark.graphs.decoder import DecoderConfig, DecoderLM
from dspark.graphs.drafter import MARKOV_HEAD_TYPES, Drafter, DrafterConfig, deepspec_config, save_deepspec
from dspark.runtime.proposers import draft_index
from dspark.runtime.torch_runner import torch_device
from dspark.train.features import FeatureCache, feature_cache
from dspark.train.target import (
    TrainArgs,
    autocast,
    default_log,
    eval_starts,
    export_hf,
    init_model,
    model_device,
    qwen3_config,
    read_tokens,
    read_train_state,
    run_training,
    target_pass,
    train_forward,
    window_starts,
    windows_at,
)

METHODS = ("draft-lm", "dspark", "dflash")
FROZEN = ("embed_tokens.weight", "lm_head.weight")  # the target's copies inside a block drafter
MASK_TOKEN = "<|mask|>"
DRAFT_LM_TOKENS = 4  # K for the draft-LM acceptance estimate


@dataclass
class DraftArgs(TrainArgs):
    """Everything that decides the trajectory (stored in train_state.pt; a resume keeps the stored values)."""

    lr: float = 6e-4
    warmup_steps: int = 50
    schedule_steps: int = 2000
    eval_windows: int = 16
    anchors_per_seq: int = 32
    ce_weight: float = 0.1
    tv_weight: float = 0.9
    confidence_weight: float = 1.0
    loss_decay: float = 4.0
    frozen_copies: bool = True  # save the target's embedding / LM head in the drafter (DeepSpec does)


# -------------------------------------------------------------------------------------------------- setup
def read_mask_token_id(target_dir: str | Path) -> int | None:
    """The id of ``<|mask|>`` among tokenizer.json's added tokens, or None."""
    path = Path(target_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    for tok in json.loads(path.read_text()).get("added_tokens", []):
        if tok.get("content") == MASK_TOKEN:
            return int(tok["id"])
    return None


def default_target_layers(num_layers: int) -> list[int]:
    """DeepSpec's spread (1, 9, .., 33 of 36 layers): m layers from 1 to L-3; the last layer is never a feature."""
    if num_layers < 5:
        return list(range(max(num_layers - 1, 0))) or [-1]
    m = 5 if num_layers >= 16 else 3
    return sorted({1 + round(i * (num_layers - 4) / (m - 1)) for i in range(m)})


def load_target(target_dir: str | Path, device: str = "cpu") -> DecoderLM:
    target = DecoderLM.from_pretrained(target_dir, dtype=torch.float32)
    target.requires_grad_(False)
    return target.to(device).eval()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def stored_dtype(target_dir: Path) -> torch.dtype:
    """The dtype the target checkpoint stores its embedding in (fp16 for the demo target)."""
    reader = WeightReader(target_dir)
    return reader.get("model.embed_tokens.weight").dtype


def target_digest(target_dir: Path) -> str:
    return "+".join(file_digest(p) for p in sorted(target_dir.glob("*.safetensors")))


def frequent_tokens(tokens: np.ndarray, count: int) -> torch.Tensor:
    """The ``count`` most frequent ids of ``tokens``, most frequent first (ties: lower id first)."""
    counts = np.bincount(np.asarray(tokens), minlength=count)
    order = np.lexsort((np.arange(len(counts)), -counts))[:count]
    return torch.from_numpy(order.astype(np.int64))


def sample_anchors(seed: int, step: int, batch: int, seq_len: int, block: int, count: int,
                   answers: np.ndarray | None = None) -> torch.Tensor:
    """Sorted distinct anchor positions [batch, count] in 1..seq_len-block, a pure function of (seed, step).

    Every anchor has a non-empty context (positions < s) and a full block of targets inside the window. With
    ``answers`` ([batch, >= seq_len] bool, True where the window's token is one the target wrote) anchors are drawn
    among those whose first target x_{s+1} is an answer token (where drafting happens at inference); a window with
    fewer of them than ``count`` fills up with other positions."""
    hi = seq_len - block
    if hi < 1:
        raise DsparkError(f"--seq-len {seq_len} is too short for block size {block}")
    count = min(count, hi)
    rng = np.random.default_rng([seed, step, 1])
    rows = []
    for r in range(batch):
        if answers is None:
            rows.append(rng.choice(hi, size=count, replace=False) + 1)
            continue
        preferred = np.asarray(answers[r][2:hi + 2], dtype=bool)  # anchor s = i + 1 predicts first x_{i + 2}
        order = rng.permutation(hi)
        picked = np.concatenate([order[preferred[order]], order[~preferred[order]]])[:count]
        rows.append(picked + 1)
    return torch.from_numpy(np.sort(np.stack(rows), axis=1).astype(np.int64))


def on_device(tensors: tuple, device: torch.device) -> tuple:
    """A feature-cache window tuple (``FeatureCache.windows``) moved to ``device`` (None entries stay None)."""
    return tuple(None if t is None else t.to(device, non_blocking=True) for t in tensors)


def read_answer_masks(data: Path, train_tokens: np.ndarray, held_tokens: np.ndarray):
    """(train, held-out) masks of the tokens the target wrote (``dspark make-data`` writes them), or (None, None)
    for data without them (every position may then anchor a block)."""
    paths = [data / "train_answers.npy", data / "heldout_answers.npy"]
    if not all(p.is_file() for p in paths):
        return None, None
    masks = [np.load(p, mmap_mode="r") for p in paths]
    for mask, tokens, path in zip(masks, (train_tokens, held_tokens), paths):
        if len(mask) != len(tokens):
            raise DsparkError(f"{path} has {len(mask)} entries for {len(tokens)} tokens; rerun 'dspark make-data'")
    return masks[0], masks[1]


# -------------------------------------------------------------------------------------------------- block drafters
def drafter_forward(drafter: Drafter, features: torch.Tensor, tokens: torch.Tensor, anchors: torch.Tensor):
    """Block hidden states h [b, A, B, d] for every anchor at once.

    features [b, n, m*d]: target features of positions 0..n-1; tokens [b, >n]: the window; anchors [b, A]. The
    block of anchor s sits at positions s..s+B-1; its queries see context positions < s and their own block."""
    c = drafter.config
    b, n, _ = features.shape
    a, blk = anchors.shape[1], c.block_size
    dev = features.device
    ctx = drafter.hidden_norm(drafter.fc(features))
    ctx_cos, ctx_sin = drafter.rotary_emb(torch.arange(n, device=dev)[None], ctx.dtype)
    ids = torch.full((b, a, blk), c.mask_token_id, dtype=torch.long, device=dev)
    ids[:, :, 0] = tokens.gather(1, anchors)
    positions = (anchors[:, :, None] + torch.arange(blk, device=dev)).reshape(b, a * blk)
    h = drafter.embed_tokens(ids.reshape(b, a * blk))
    cos, sin = drafter.rotary_emb(positions, h.dtype)
    # the training mask (spec §4.3): context key t visible to block j iff t < s_j; block keys only within a block
    q_anchor = anchors.repeat_interleave(blk, dim=1)  # [b, A*B]
    ctx_visible = torch.arange(n, device=dev)[None, None, :] < q_anchor[:, :, None]
    block_id = torch.arange(a * blk, device=dev) // blk
    own_block = (block_id[:, None] == block_id[None, :]).expand(b, -1, -1)
    mask = torch.cat([ctx_visible, own_block], dim=-1)[:, None]  # [b, 1, A*B, n + A*B]
    for layer in drafter.layers:
        att = layer.self_attn
        k_ctx, v_ctx = layer.context_kv(ctx, ctx_cos, ctx_sin)
        q, k, v = att.project(layer.input_layernorm(h), cos, sin)
        dt = v.dtype
        keys = torch.cat([k_ctx.to(dt), k.to(dt)], dim=2)
        values = torch.cat([v_ctx.to(dt), v], dim=2)
        o = F.scaled_dot_product_attention(q.to(dt), keys, values, attn_mask=mask,
                                           enable_gqa=att.c.num_kv_heads != att.c.num_heads)
        h = h + att.o_proj(o.transpose(1, 2).reshape(b, a * blk, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return drafter.norm(h).reshape(b, a, blk, -1)


def block_logits(drafter: Drafter, h: torch.Tensor, anchor_tokens: torch.Tensor, teacher: torch.Tensor | None = None):
    """Markov-corrected logits L [..., B, V] fp32 and confidence logits [..., B] fp32 (None without a head).

    h [..., B, d]; anchor_tokens [...]. The previous token of slot k is the anchor for k = 0, then ``teacher``
    [..., B-1] (teacher forcing, training) or the argmax of L_{k-1} (greedy drafting). Same loop as
    ``Drafter.propose``."""
    c = drafter.config
    base = drafter.lm_head(h).float()
    if c.markov_rank == 0:
        conf = drafter.confidence_head.proj(h).squeeze(-1).float() if c.enable_confidence_head else None
        return base, conf
    head = drafter.markov_head
    prev = drafter.markov_input(anchor_tokens)
    state = h.new_zeros(*h.shape[:-2], c.markov_rank) if head.kind == "rnn" else None
    logits, confs = [], []
    for k in range(c.block_size):
        e = head.markov_w1(prev).to(h.dtype)
        hk = h[..., k, :]
        bias, state = head.step(e, hk, state)
        lk = base[..., k, :] + bias.float()
        logits.append(lk)
        if c.enable_confidence_head:
            feats = torch.cat([hk, e], dim=-1) if c.confidence_uses_markov else hk
            confs.append(drafter.confidence_head.proj(feats).squeeze(-1).float())
        if k + 1 < c.block_size:
            prev = drafter.markov_input(teacher[..., k]) if teacher is not None else lk.argmax(-1)
    return torch.stack(logits, -2), (torch.stack(confs, -1) if confs else None)


def block_targets(tokens: torch.Tensor, anchors: torch.Tensor, block: int):
    """Ground-truth tokens x_{s+1..s+B} [b, A, B] and the positions s..s+B-1 whose target logits match them."""
    positions = anchors[:, :, None] + torch.arange(block, device=anchors.device)
    b = tokens.shape[0]
    truth = tokens.gather(1, (positions + 1).reshape(b, -1)).reshape(positions.shape)
    return truth, positions


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [b, n, d] at positions [b, A, B] -> [b, A, B, d]."""
    b, a, blk = positions.shape
    idx = positions.reshape(b, -1, 1).expand(-1, -1, x.shape[-1])
    return x.gather(1, idx).reshape(b, a, blk, -1)


@dataclass
class TargetLaw:
    """The target's law at block slots, as much of it as the loss needs: its logits over the draft vocabulary
    ``sub`` [..., N] and its log-normaliser over the whole vocabulary ``lse`` [...] (so the mass outside the draft
    vocabulary is known without a [..., V] tensor), and its greedy token where it was computed in full."""

    sub: torch.Tensor
    lse: torch.Tensor
    argmax: torch.Tensor | None = None

    def inside(self) -> torch.Tensor:
        return torch.exp(self.sub - self.lse[..., None])


def law_distance(logits: torch.Tensor, law: TargetLaw) -> torch.Tensor:
    """||q - p||_1 between the draft law q = softmax(logits) (over the draft vocabulary, zero outside it) and the
    target's p, over the whole target vocabulary: 1 - 1/2 of it is the acceptance probability at T = 1."""
    inside = law.inside()
    return (torch.softmax(logits, -1) - inside).abs().sum(-1) + (1 - inside.sum(-1)).clamp(min=0)


def block_loss(drafter: Drafter, logits, conf, truth, target: TargetLaw, args: DraftArgs, method: str):
    """(loss, parts): weighted means over slots, w_k = exp(-k / loss_decay), DeepSpec's normalisation. With a
    reduced vocabulary, a true token outside it adds no cross-entropy (nothing can predict it) but still counts in
    the law distance."""
    blk = logits.shape[-2]
    w = torch.exp(-torch.arange(blk, dtype=torch.float32, device=logits.device) / args.loss_decay)
    w = w.expand(truth.shape)
    wsum = w.sum()
    labels = drafter.markov_input(truth)
    labels = labels.masked_fill(labels == drafter.config.head_size, -100)  # -100: cross_entropy's ignore_index
    ce = (F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
          .reshape(truth.shape) * w).sum() / wsum
    parts = {"ce": ce.item()}
    if method == "dflash":
        return ce, parts
    l1 = law_distance(logits, target)
    tv = (l1 * w).sum() / wsum
    loss = args.ce_weight * ce + args.tv_weight * tv
    parts["tv"] = tv.item()
    if conf is not None:
        accept = (1 - 0.5 * l1.detach()).clamp(0, 1)
        bce = (F.binary_cross_entropy_with_logits(conf, accept, reduction="none") * w).sum() / wsum
        loss = loss + args.confidence_weight * bce
        parts["conf"] = bce.item()
    return loss, parts


class BlockTask:
    """A DSpark or DFlash drafter trained on the frozen target's features."""

    def __init__(self, method: str, config: dict, target: DecoderLM, args: DraftArgs,
                 draft_vocab: torch.Tensor | None = None, cache: FeatureCache | None = None,
                 answers: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
                 init: tuple[Path, Path] | None = None):
        self.method, self.config, self.target, self.args = method, config, target, args
        self.cache = cache  # the target's features of the train windows, computed once (None: every step)
        self.answers = answers  # (train, held-out) masks of target-written tokens: anchors go there
        self.dconfig = DrafterConfig.from_hf(config, target.config)
        self.taps = self.dconfig.target_layer_ids
        self.device = model_device(target)  # the drafter trains where the target runs
        self.model = self._init(args.seed, draft_vocab, init).to(self.device)

    def _init(self, seed: int, vocab: torch.Tensor | None, init: tuple[Path, Path] | None) -> Drafter:
        if init is not None:  # (drafter folder, its target folder): its weights and its draft vocabulary
            model = Drafter.from_pretrained(init[0], self.target.config, torch.float32, init[1])
            if model.config != self.dconfig:
                model = grow(model, self.dconfig)
            for name in FROZEN:
                model.get_parameter(name).requires_grad_(False)
            return model.train()
        model = Drafter.random(self.dconfig, self.target.model.embed_tokens.weight, self.target.lm_head.weight,
                               seed=seed, norm_noise=0.0, draft_vocab=vocab)
        if self.dconfig.markov_rank > 0:
            with torch.no_grad():  # start with no Markov bias (L = U); W1 gets gradients once W2 moves
                model.markov_head.markov_w2.weight.zero_()
        return model.train()

    def trainable_state(self) -> dict:
        return {k: v for k, v in self.model.state_dict().items() if k not in FROZEN}

    def load_trainable_state(self, state: dict) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != set(FROZEN):
            raise DsparkError(f"train_state.pt does not match the drafter (missing {missing}, unexpected {unexpected})")
        if self.dconfig.draft_vocab_size:  # the vocabulary the run started with, whatever the data holds now
            self.model.set_draft_vocab(self.model.draft_vocab.clone())
            with torch.no_grad():
                self.model.lm_head.weight.copy_(self.target.lm_head.weight[self.model.draft_vocab])

    def _forward(self, window: torch.Tensor, anchors: torch.Tensor, cached=None):
        """Block hidden states, true tokens and the target's law at the block slots. ``cached`` (hidden, features,
        log-normalisers) of the window's first n positions replaces the target's forward; then only the draft
        vocabulary's logits are computed (the drafter's frozen head is those rows of the target's)."""
        n = window.shape[1] - 1
        blk = self.dconfig.block_size
        with autocast(self.device):
            with torch.no_grad():
                hidden, features, lse = cached or (*target_pass(self.target, window[:, :n], self.taps), None)
                truth, positions = block_targets(window, anchors, blk)
                at = gather_positions(hidden, positions)
                if lse is not None:
                    law = TargetLaw(self.model.lm_head(at).float(), lse.gather(1, positions.flatten(1)).view_as(truth))
                else:
                    full = self.target.lm_head(at).float()
                    sub = full[..., self.model.draft_vocab] if self.dconfig.draft_vocab_size else full
                    law = TargetLaw(sub, torch.logsumexp(full, -1), full.argmax(-1))
            h = drafter_forward(self.model, features, window, anchors)
        return h, truth, law

    def loss(self, step: int, train_tokens: np.ndarray):
        a = self.args
        starts = window_starts(len(train_tokens), step, a)  # the windows batch_at draws, seq_len + 1 tokens each
        window = windows_at(train_tokens, starts, a.seq_len + 1).to(self.device)
        answers = self.answers[0]
        anchors = sample_anchors(a.seed, step, a.batch_size, a.seq_len, self.dconfig.block_size, a.anchors_per_seq,
                                 None if answers is None else windows_at(answers, starts, a.seq_len + 1).numpy())
        anchors = anchors.to(self.device)
        cached = on_device(self.cache.windows(starts, a.seq_len), self.device) if self.cache else None
        h, truth, law = self._forward(window, anchors, cached)
        with autocast(self.device):
            logits, conf = block_logits(self.model, h, window.gather(1, anchors), truth[..., :-1])
        return block_loss(self.model, logits, conf, truth, law, a, self.method)

    @torch.no_grad()
    def evaluate(self, windows: torch.Tensor) -> dict:
        a, blk = self.args, self.dconfig.block_size
        was = self.model.training
        self.model.eval()
        n = windows.shape[1] - 1
        held = self.answers[1]  # the windows are eval_windows(held-out tokens): their starts are eval_starts'
        answers = None if held is None else windows_at(held, eval_starts(len(held), a), n + 1).numpy()
        anchors_all = sample_anchors(a.seed, 2**31, len(windows), n, blk, a.anchors_per_seq, answers)
        losses, taus, taus_t1, accept_k = [], [], [], []
        for i in range(0, len(windows), a.batch_size):
            window = windows[i:i + a.batch_size].to(self.device)
            anchors = anchors_all[i:i + a.batch_size].to(self.device)
            h, truth, law = self._forward(window, anchors)
            with autocast(self.device):
                anchor_tokens = window.gather(1, anchors)
                logits, conf = block_logits(self.model, h, anchor_tokens, truth[..., :-1])
                greedy, _ = block_logits(self.model, h, anchor_tokens)
            losses.append(block_loss(self.model, logits, conf, truth, law, a, self.method)[0].item()
                          * len(window))
            hit = (self.model.to_target(greedy.argmax(-1)) == law.argmax).float().cumprod(-1)
            taus.append((1 + hit.sum(-1)).reshape(-1))
            accept_k.append(hit.reshape(-1, blk))
            c = 1 - 0.5 * law_distance(greedy, law)
            taus_t1.append((1 + c.clamp(0, 1).cumprod(-1).sum(-1)).reshape(-1))
        self.model.train(was)
        return {"heldout_loss": round(sum(losses) / len(windows), 4),
                "tau": round(torch.cat(taus).mean().item(), 4),
                "tau_t1": round(torch.cat(taus_t1).mean().item(), 4),
                "accept_at_k": [round(v, 3) for v in torch.cat(accept_k).mean(0).tolist()]}

    def save(self, output: Path, target_dir: Path) -> None:
        # with the frozen copies: in the target's storage dtype, so they stay bit-identical to the target's tensors;
        # without them only trained weights are stored, and float16 halves the file (training ran in bfloat16)
        dtype = stored_dtype(target_dir) if self.args.frozen_copies else torch.float16
        save_deepspec(output, self.config, copy.deepcopy(self.model).to("cpu", dtype),
                      frozen_copies=self.args.frozen_copies)


def grown_config(config: dict, num_layers: int | None = None, target_layers: list[int] | None = None) -> dict:
    """A trained drafter's ``config`` with more layers and, for a block drafter, more target taps (None: as it is)."""
    have = config["num_hidden_layers"]
    layers = num_layers or have
    if layers < have:
        raise DsparkError(f"--num-layers {layers}: the drafter of --init-from has {have}; "
                          "growing adds layers, it does not remove them")
    grown = {**config, "num_hidden_layers": layers}
    if "layer_types" in config:  # new layers attend as the last one does
        grown["layer_types"] = config["layer_types"] + config["layer_types"][-1:] * (layers - have)
    if "max_window_layers" in config:
        grown["max_window_layers"] = layers
    if "target_layer_ids" not in config:  # a draft LM
        if target_layers:
            raise DsparkError("--target-layers: a draft LM reads no target layers; only --num-layers grows it")
        return grown
    taps = sorted(set(target_layers or config["target_layer_ids"]))
    dropped = [t for t in config["target_layer_ids"] if t not in taps]
    if dropped:
        raise DsparkError(f"--target-layers drops the taps {dropped} the drafter of --init-from reads; list all of "
                          f"{','.join(map(str, config['target_layer_ids']))} and the ones to add")
    return {**grown, "target_layer_ids": taps}


def append_noop_layers(state: dict, prefix: str, have: int, want: int) -> None:
    """Append layers ``have`` .. ``want - 1`` under ``prefix`` (``layers.``) to ``state``: each a copy of the last
    layer whose output projections (attention and MLP) are zero, so it adds nothing to the residual stream until
    training moves them (their inputs are not zero, so they get gradients from the first step)."""
    last = f"{prefix}{have - 1}."
    for k in range(have, want):
        for name in [n for n in list(state) if n.startswith(last)]:
            new = f"{prefix}{k}." + name[len(last):]
            zero = ".o_proj." in name or ".down_proj." in name
            state[new] = torch.zeros_like(state[name]) if zero else state[name].clone()


def grow(source: Drafter, config: DrafterConfig) -> Drafter:
    """``source`` grown to ``config`` (``grown_config``) computing exactly what it computed: a new tap's columns of
    ``fc`` are zero, and new layers are appended on top as no-ops (``append_noop_layers``)."""
    old, state = source.config, source.state_dict()
    d = old.feature_size // len(old.target_layer_ids)  # one tap's columns: the target's width
    fc = state["fc.weight"].new_zeros(old.hidden_size, d * len(config.target_layer_ids))
    for j, tap in enumerate(old.target_layer_ids):
        i = config.target_layer_ids.index(tap)
        fc[:, i * d:(i + 1) * d] = state["fc.weight"][:, j * d:(j + 1) * d]
    state["fc.weight"] = fc
    append_noop_layers(state, "layers.", old.num_layers, config.num_layers)
    model = Drafter(config).to(state["fc.weight"].dtype)
    model.load_state_dict(state)
    if config.draft_vocab_size:
        model.set_draft_vocab(source.draft_vocab)
    return model


# -------------------------------------------------------------------------------------------------- draft LM
def kl_divergence(t: torch.Tensor, d: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(target || draft) from the log-laws ``t``, ``d`` [b, n, V]: the mean over positions, or with ``weights``
    [b, n] their weighted mean."""
    per_position = (t.exp() * (t - d)).sum(-1)
    if weights is None:  # every position alike, through the same sums: all-ones weights give the same loss exactly
        weights = torch.ones_like(per_position)
    return (per_position * weights).sum() / weights.sum().clamp(min=1.0)


def kl_loss(target: DecoderLM, draft: DecoderLM, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """KL(target || draft) per token (mean over positions, or weighted by ``weights``), fp32."""
    with autocast(x.device):
        with torch.no_grad():
            t_logits = train_forward(target, x)
        d_logits = train_forward(draft, x)
    return kl_divergence(F.log_softmax(t_logits.float(), -1), F.log_softmax(d_logits.float(), -1), weights)


def reduced_log_law(law: TargetLaw) -> torch.Tensor:
    """The target's log-law over a reduced draft LM's N + 1 ids [..., N + 1]: each draft-vocabulary token, then
    every other token together."""
    inside = law.sub - law.lse[..., None]
    outside = torch.log1p(-inside.exp().sum(-1).clamp(max=1 - 1e-6))
    return torch.cat([inside, outside[..., None]], -1)


def grow_draft_lm(source: DecoderLM, config: dict) -> DecoderLM:
    """``source`` with ``config``'s layer count (``grown_config``), computing exactly what it computed: the new
    layers are appended on top of the others as no-ops (``append_noop_layers``)."""
    have, want = source.config.num_layers, config["num_hidden_layers"]
    if want == have:
        return source
    state = source.state_dict()
    append_noop_layers(state, "model.layers.", have, want)
    model = DecoderLM(DecoderConfig.from_hf(config))
    model.load_state_dict(state)
    return model


class DraftLMTask:
    """A small Qwen3 DecoderLM distilled from the target with KL(target || draft). With ``draft_vocab`` (a draft
    vocabulary of N target ids) it reads and predicts its own N + 1 ids (``DecoderConfig.draft_vocab_size``) and
    the KL is taken over them (``reduced_log_law``); ``cache`` (the target's final hidden states and
    log-normalisers, ``dspark.train.features`` without taps) then replaces the target's forward."""

    def __init__(self, method: str, config: dict, target: DecoderLM, args: DraftArgs,
                 draft_vocab: torch.Tensor | None = None, cache: FeatureCache | None = None,
                 answers: tuple[np.ndarray | None, np.ndarray | None] = (None, None), init: Path | None = None):
        self.method, self.config, self.target, self.args = method, config, target, args
        self.cache = cache
        # tokens the target wrote (train, held-out): the loss counts the positions that predict them, where the
        # draft LM drafts at inference (the prompts are only read), and acceptance is estimated there
        self.train_answers, self.heldout_answers = answers
        self.device = model_device(target)  # the draft LM trains where the target runs
        if init is not None:  # a trained draft LM's weights and draft vocabulary (float16 on disk, trained in fp32)
            model = grow_draft_lm(DecoderLM.from_pretrained(init, dtype=torch.float32), config)
            self.model = model.to(self.device).train()
            size = self.model.config.draft_vocab_size
            self.set_draft_vocab(read_draft_vocab(WeightReader(init), size, target.config.vocab_size) if size else None)
            return
        self.model = init_model(config, args.seed).to(self.device).train()
        self.set_draft_vocab(draft_vocab)
        if draft_vocab is not None:
            self._embed_from_target()

    @torch.no_grad()
    def _embed_from_target(self) -> None:
        """Start a reduced draft LM's (tied) embedding as the target's embedding rows of its ids (id N: the mean
        of the other tokens' rows) projected onto their leading principal directions and scaled to the
        initialiser's spread: tokens the target embeds alike start alike, which a small training set cannot teach."""
        table = self.target.model.embed_tokens.weight.float()
        others = torch.ones(len(table), dtype=torch.bool, device=table.device)
        others[self.draft_vocab] = False
        rows = torch.cat([table[self.draft_vocab], table[others].mean(0, keepdim=True)])
        width = self.model.config.hidden_size
        if width > rows.shape[1]:
            return
        _, _, directions = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)
        projected = rows @ directions[:width].T
        std = self.config.get("initializer_range", 0.02)
        self.model.model.embed_tokens.weight.copy_(projected * (std / projected.std()))

    def set_draft_vocab(self, ids: torch.Tensor | None) -> None:
        self.draft_vocab = None if ids is None else ids.to(self.device)
        if ids is not None:
            index = draft_index(ids.cpu().numpy(), self.target.config.vocab_size)
            self.index = torch.from_numpy(index).to(self.device)
            self.head = self.target.lm_head.weight[self.draft_vocab]  # the target's logits over the draft vocabulary

    def trainable_state(self) -> dict:
        state = self.model.state_dict()
        return state if self.draft_vocab is None else {**state, "draft_vocab": self.draft_vocab}

    def load_trainable_state(self, state: dict) -> None:
        state = dict(state)
        ids = state.pop("draft_vocab", None)
        self.model.load_state_dict(state)
        if ids is not None:  # the vocabulary the run started with, whatever the data holds now
            self.set_draft_vocab(ids)

    def target_log_law(self, x: torch.Tensor, cached=None) -> torch.Tensor:
        """The target's log-law at every position of ``x`` over a reduced draft LM's ids."""
        with torch.no_grad(), autocast(self.device):
            if cached is not None:
                hidden, _, lse = cached
                law = TargetLaw((hidden @ self.head.T).float(), lse)
            else:
                full = train_forward(self.target, x).float()
                law = TargetLaw(full[..., self.draft_vocab], torch.logsumexp(full, -1))
        return reduced_log_law(law).float()

    def reduced_loss(self, x: torch.Tensor, cached=None, weights: torch.Tensor | None = None) -> torch.Tensor:
        t = self.target_log_law(x, cached)
        with autocast(self.device):
            d_logits = train_forward(self.model, self.index[x])
        return kl_divergence(t, F.log_softmax(d_logits.float(), -1), weights)

    def loss(self, step: int, train_tokens: np.ndarray):
        a = self.args
        starts = window_starts(len(train_tokens), step, a)
        x = windows_at(train_tokens, starts, a.seq_len).to(self.device)
        # position j predicts token j + 1: it counts when the target wrote that token
        weights = (None if self.train_answers is None else
                   windows_at(self.train_answers, np.asarray(starts) + 1, a.seq_len).float().to(self.device))
        if self.draft_vocab is None:
            loss = kl_loss(self.target, self.model, x, weights)
        else:
            cached = on_device(self.cache.windows(starts, a.seq_len), self.device) if self.cache else None
            loss = self.reduced_loss(x, cached, weights)
        return loss, {"kl": loss.item()}

    def drafts(self, x: torch.Tensor) -> torch.Tensor:
        """The draft's greedy next token (a target id) at every position of ``x``; never the reduced LM's 'other'."""
        if self.draft_vocab is None:
            return train_forward(self.model, x).argmax(-1)
        return self.draft_vocab[train_forward(self.model, self.index[x])[..., :-1].argmax(-1)]

    @torch.no_grad()
    def evaluate(self, windows: torch.Tensor) -> dict:
        a = self.args
        was = self.model.training
        self.model.eval()
        losses, taus, accept_k = [], [], []
        held = self.heldout_answers  # the windows are eval_windows(held-out tokens): their starts are eval_starts'
        answers = (None if held is None else
                   windows_at(held, eval_starts(len(held), a), windows.shape[1]).bool().to(self.device))
        for i in range(0, len(windows), a.batch_size):
            x = windows[i:i + a.batch_size, :-1].to(self.device)
            loss = kl_loss(self.target, self.model, x) if self.draft_vocab is None else self.reduced_loss(x)
            losses.append(loss.item() * len(x))
            with autocast(self.device):
                hit = (self.drafts(x) == train_forward(self.target, x).argmax(-1)).float()
            runs = hit.unfold(1, DRAFT_LM_TOKENS, 1).cumprod(-1)  # teacher-forced K-token drafts from every position
            if answers is not None:  # drafts whose first token is one the target wrote (not a prompt token)
                runs = runs[answers[i:i + a.batch_size, 1:runs.shape[1] + 1]]
            taus.append((1 + runs.sum(-1)).reshape(-1))
            accept_k.append(runs.reshape(-1, DRAFT_LM_TOKENS))
        self.model.train(was)
        return {"heldout_loss": round(sum(losses) / len(windows), 4), "tau": round(torch.cat(taus).mean().item(), 4),
                "accept_at_k": [round(v, 3) for v in torch.cat(accept_k).mean(0).tolist()]}

    def save(self, output: Path, target_dir: Path) -> None:
        extra = {} if self.draft_vocab is None else {"draft_vocab": self.draft_vocab.cpu()}
        export_hf(self.model, self.config, output, target_dir, extra)  # also copies the target's tokenizer files
        if (target_dir / "generation_config.json").is_file():
            shutil.copyfile(target_dir / "generation_config.json", output / "generation_config.json")


# -------------------------------------------------------------------------------------------------- configs
def block_config(target_cfg: dict, method: str, block_size: int = 7, num_layers: int = 2,
                 target_layers: list[int] | None = None, mask_token_id: int | None = None, markov_rank: int = 256,
                 markov_head: str = "vanilla", num_anchors: int = 32, draft_vocab: int = 0) -> dict:
    """The drafter's config.json (DeepSpec layout) for ``dspark`` (Markov head + confidence) or ``dflash``."""
    if mask_token_id is None:
        raise DsparkError("the target's tokenizer.json has no <|mask|> token; pass --mask-token-id")
    if markov_head not in MARKOV_HEAD_TYPES:
        raise DsparkError(f"--markov-head {markov_head!r}: choose one of {', '.join(MARKOV_HEAD_TYPES)}")
    layers = target_layers or default_target_layers(target_cfg["num_hidden_layers"])
    dspark = method == "dspark"
    return deepspec_config(target_cfg, block_size, num_layers, layers, mask_token_id,
                           markov_rank if dspark else 0, markov_head if dspark else None, confidence=dspark,
                           num_anchors=num_anchors, draft_vocab_size=draft_vocab)


def draft_lm_config(target_cfg: dict, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4,
                    num_kv_heads: int = 2, head_dim: int = 64, intermediate_size: int = 768, draft_vocab: int = 0) -> dict:
    """A Qwen3 config.json for a draft LM sharing the target's vocabulary (or ``draft_vocab`` > 0 of its tokens and
    one id for the others), RoPE base and special ids."""
    target = DecoderConfig.from_hf(target_cfg)
    if draft_vocab >= target.vocab_size:
        raise DsparkError(f"--draft-vocab {draft_vocab}: the target has {target.vocab_size} tokens; a draft "
                          "vocabulary is a subset of them")
    cfg = qwen3_config(vocab_size=draft_vocab + 1 if draft_vocab else target.vocab_size, hidden_size=hidden_size,
                       num_layers=num_layers,
                       num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       intermediate_size=intermediate_size,
                       max_position_embeddings=target.max_position_embeddings,
                       rope_theta=float(target.rope.get("rope_theta", 10000.0)))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in target_cfg:
            cfg[key] = target_cfg[key]
    if draft_vocab:
        cfg["draft_vocab_size"] = draft_vocab
    return cfg


# -------------------------------------------------------------------------------------------------- training
def train_draft(target_dir: str | Path, data: str | Path, output: str | Path, method: str, config: dict,
                args: DraftArgs, *, minutes: float | None = None, steps: int | None = None,
                threads: int | None = None, save_minutes: float = 5.0, eval_every: int = 100,
                progress: bool = True, log=None, cache_features: bool = False,
                init_from: str | Path | None = None, device: str = "cpu") -> dict:
    """Train (or resume) a drafter until ``steps`` total steps or ``minutes`` of wall time in this call.

    ``config`` is the drafter's config.json (``block_config`` or ``draft_lm_config``). Without ``steps`` and
    ``minutes``, trains to ``args.schedule_steps``. Writes the inference checkpoint into ``output`` at every save.
    With ``cache_features`` a block drafter reads the target's features of the train windows from a cache built once
    (``dspark.train.features``) instead of running the target every step. ``init_from`` (a drafter of the same
    config, e.g. one trained on less data) gives a fresh run its starting weights and draft vocabulary; a resumed run
    ignores it. ``device`` (cpu, cuda, cuda:N) is where the target runs and the drafter trains. Returns the last log
    record."""
    if method not in METHODS:
        raise DsparkError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if cache_features and method == "draft-lm" and not config.get("draft_vocab_size"):
        raise DsparkError("--feature-cache trains a draft LM over a reduced vocabulary only (its target law comes "
                          "from cached hidden states and normalisers); add --draft-vocab N or drop --feature-cache")
    dev = torch_device(device)
    log = log or default_log
    if threads:
        torch.set_num_threads(threads)
    target_dir, data, output = Path(target_dir), Path(data), Path(output)
    output.mkdir(parents=True, exist_ok=True)
    digest = target_digest(target_dir)
    identity = {"method": method, "config": config}
    state, args = read_train_state(output, args, identity, "method or drafter config", log)
    if state is not None and state["target_digest"] != digest:
        log(f"warning: the target weights in {target_dir} changed since this drafter started; "
            "continuing against the current target")
    target = load_target(target_dir, dev)
    train_tokens, held_tokens = read_tokens(data, target.config.vocab_size)
    init = Path(init_from) if init_from is not None and state is None else None
    if init:
        log(f"starting from the weights of {init_from}")
    if method == "draft-lm":
        size = DecoderConfig.from_hf(config).draft_vocab_size
        cache = feature_cache(target, (), train_tokens, data, digest, progress, log) if cache_features else None
        task = DraftLMTask(method, config, target, args,
                           frequent_tokens(train_tokens, size) if size and not init else None, cache,
                           read_answer_masks(data, train_tokens, held_tokens), init)
    else:
        dconfig = DrafterConfig.from_hf(config, target.config)
        size = dconfig.draft_vocab_size
        cache = (feature_cache(target, dconfig.target_layer_ids, train_tokens, data, digest, progress, log)
                 if cache_features else None)
        task = BlockTask(method, config, target, args,
                         frequent_tokens(train_tokens, size) if size and not init else None, cache,
                         read_answer_masks(data, train_tokens, held_tokens), (init, target_dir) if init else None)
    n_train = sum(p.numel() for p in task.model.parameters() if p.requires_grad)
    summary = (f"{method}: {n_train / 1e6:.2f} M trainable parameters; target {target_dir} "
               f"({sum(p.numel() for p in target.parameters()) / 1e6:.1f} M, frozen); "
               f"{device_name(target)}; batch {args.batch_size}x{args.seq_len}"
               + (f", {args.anchors_per_seq} anchors/seq x block {task.dconfig.block_size}"
                  if method != "draft-lm" else ""))
    return run_training(task, args, train_tokens, held_tokens, output, state,
                        state_fields={**identity, "target_digest": digest, "target_dir": str(target_dir)},
                        export=lambda out: task.save(out, target_dir), summary=summary, minutes=minutes,
                        steps=steps, save_minutes=save_minutes, eval_every=eval_every, progress=progress, log=log)


def device_name(model: torch.nn.Module) -> str:
    dev = model_device(model)
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"cpu, {torch.get_num_threads()} threads"


def method_config(target_dir: str | Path, method: str, **options) -> dict:
    """The drafter config.json for ``method`` from command-line style options (None = default)."""
    target_cfg = read_config(target_dir)
    given = {k: v for k, v in options.items() if v is not None}
    if method == "draft-lm":
        keys = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                "draft_vocab")
        return draft_lm_config(target_cfg, **{k: given[k] for k in keys if k in given})
    if method not in METHODS:
        raise DsparkError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if "mask_token_id" not in given:
        given["mask_token_id"] = read_mask_token_id(target_dir)
    keys = ("block_size", "num_layers", "target_layers", "mask_token_id", "markov_rank", "markov_head", "num_anchors",
            "draft_vocab")
    return block_config(target_cfg, method, **{k: given[k] for k in keys if k in given})
