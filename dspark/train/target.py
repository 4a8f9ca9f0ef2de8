"""Training a Qwen3-architecture target LM from scratch on the token arrays that ``corpus.build`` writes.

The model is the project's own ``DecoderLM`` (Hugging Face parameter names), so the folder written here is an
ordinary HF checkpoint (config.json, fp16 model.safetensors, tokenizer files, generation_config.json) that
every other command loads. Training is deterministic from the seed: the batch of step ``s`` is drawn from
``numpy.random.default_rng([seed, s])``, so a run resumed from ``train_state.pt`` sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from dspark.errors import DsparkError
from dspark.graphs.checkpoint import save_checkpoint
from dspark.graphs.decoder import DecoderConfig, DecoderLM
from dspark.train.corpus import EOS_ID, TOKENIZER_FILES

STATE_FILE = "train_state.pt"
LOG_FILE = "training_log.jsonl"


def qwen3_config(vocab_size: int = 8192, hidden_size: int = 512, num_layers: int = 8, num_heads: int = 8,
                 num_kv_heads: int = 4, head_dim: int = 64, intermediate_size: int = 1536,
                 max_position_embeddings: int = 2048, rope_theta: float = 10000.0) -> dict:
    """A Hugging Face ``Qwen3ForCausalLM`` config.json dict."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rms_norm_eps": 1e-6,
        "rope_theta": float(rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(rope_theta)},
        "rope_scaling": None,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": num_layers,
        "layer_types": ["full_attention"] * num_layers,
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
        "torch_dtype": "float16",
        "dtype": "float16",
    }


@dataclass
class TrainArgs:
    """Everything that decides the trajectory (stored in train_state.pt; a resume keeps the stored values)."""

    seed: int = 0
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    schedule_steps: int = 4000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_windows: int = 32


def lr_at(step: int, a: TrainArgs) -> float:
    """Linear warmup to ``lr``, cosine down to ``min_lr_ratio * lr`` at ``schedule_steps``, flat after."""
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    span = max(1, a.schedule_steps - a.warmup_steps)
    t = min(1.0, (step - a.warmup_steps) / span)
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def init_model(config: dict, seed: int) -> DecoderLM:
    """A fresh model, weights drawn as transformers initialises Qwen3 (normal, std initializer_range)."""
    torch.manual_seed(seed)
    model = DecoderLM(DecoderConfig.from_hf(config))
    std = config.get("initializer_range", 0.02)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    return model


def make_optimizer(model: torch.nn.Module, a: TrainArgs) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), eps=1e-8)


def window_starts(count: int, step: int, a: TrainArgs) -> np.ndarray:
    """Where the windows of one step start in a token array of ``count`` tokens: a pure function of (seed, step)."""
    return np.random.default_rng([a.seed, step]).integers(0, count - a.seq_len - 1, size=a.batch_size)


def windows_at(tokens: np.ndarray, starts, length: int) -> torch.Tensor:
    """The token windows [len(starts), length] (int64) beginning at ``starts``."""
    return torch.from_numpy(np.stack([tokens[s:s + length] for s in starts]).astype(np.int64))


def batch_at(tokens: np.ndarray, step: int, a: TrainArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets [B, seq_len] for one step: the windows at ``window_starts``."""
    w = windows_at(tokens, window_starts(len(tokens), step, a), a.seq_len + 1)
    return w[:, :-1], w[:, 1:]


def eval_starts(count: int, a: TrainArgs) -> np.ndarray:
    """Where the fixed held-out windows start in a token array of ``count`` tokens (the same every evaluation)."""
    n = min(a.eval_windows, max(1, (count - 1) // a.seq_len))
    rng = np.random.default_rng([a.seed, 2**31])
    hi = count - a.seq_len - 1
    if hi <= 0:
        raise DsparkError(f"held-out set has {count} tokens, fewer than seq_len {a.seq_len} + 1")
    return np.sort(rng.integers(0, hi, size=n))


def eval_windows(tokens: np.ndarray, a: TrainArgs) -> torch.Tensor:
    """The fixed held-out windows [N, seq_len + 1] at ``eval_starts``."""
    return windows_at(tokens, eval_starts(len(tokens), a), a.seq_len + 1)


def autocast(device: torch.device | str):
    """bfloat16 mixed precision on ``device``'s kind (cpu or cuda): every trainer's forward passes run under it."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def target_pass(target: DecoderLM, ids: torch.Tensor, taps: tuple[int, ...] = ()):
    """Post-norm hidden states [b, n, d] and the raw outputs of layers ``taps`` concatenated [b, n, m*d] (None
    without taps) for a full causal forward, computed the fast way for training: fused causal attention
    (``scaled_dot_product_attention``) instead of the cache-aware split attention of the step graph. The same
    function as ``DecoderLM.step`` with ``tap_layers`` (tested). Logits are ``target.lm_head(hidden)``."""
    b, n = ids.shape
    body = target.model
    h = body.embed_tokens(ids)
    cos, sin = body.rotary_emb(torch.arange(n, device=ids.device)[None], h.dtype)
    feats = {-1: h} if -1 in taps else {}
    for i, layer in enumerate(body.layers):
        att = layer.self_attn
        q, k, v = att.project(layer.input_layernorm(h), cos, sin)
        q, k = q.to(v.dtype), k.to(v.dtype)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=att.c.num_kv_heads != att.c.num_heads)
        h = h + att.o_proj(o.transpose(1, 2).reshape(b, n, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        if i in taps:
            feats[i] = h
    features = torch.cat([feats[i] for i in taps], dim=-1) if taps else None
    return body.norm(h), features


def train_forward(model: DecoderLM, input_ids: torch.Tensor) -> torch.Tensor:
    """The same function as ``model(input_ids)`` (logits [B, n, V]) on the same parameters, through ``target_pass``:
    about 1.6x faster on CPU; the tests check it against ``model``."""
    hidden, _ = target_pass(model, input_ids)
    return model.lm_head(hidden)


def loss_of(model: DecoderLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with autocast(x.device):
        logits = train_forward(model, x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def heldout_loss(model: DecoderLM, windows: torch.Tensor, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        total += loss_of(model, w[:, :-1], w[:, 1:]).item() * w[:, 1:].numel()
        count += w[:, 1:].numel()
    model.train(was_training)
    return total / count


def hf_tensors(model: DecoderLM, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The state dict under HF names; ``lm_head.weight`` left out when tied, as transformers saves it."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu", dtype).clone() for k, v in sd.items()}


def export_hf(model: DecoderLM, config: dict, out: str | Path, tokenizer_dir: str | Path | None = None,
              extra: dict[str, torch.Tensor] | None = None) -> None:
    """config.json + fp16 model.safetensors (with the ``extra`` tensors as they are) + generation_config.json
    (+ tokenizer files) in ``out``."""
    out = Path(out)
    save_checkpoint(out, config, {**hf_tensors(model), **(extra or {})})
    gen = {"bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` through a temporary file, so a run killed mid-save leaves the previous state intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def default_log(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)  # keeps an active progress bar intact below the message


def read_train_state(output: Path, args: TrainArgs, identity: dict, what: str,
                     log: Callable[[str], None]) -> tuple[dict | None, TrainArgs]:
    """The state saved in ``output`` (None for a new run) and the arguments to train with.

    A resume keeps the stored arguments (they decide the trajectory) and refuses a state whose ``identity`` fields
    (e.g. the model config) differ from this call's; ``what`` names those fields in the error."""
    state_path = output / STATE_FILE
    if not state_path.is_file():
        return None, args
    # on the CPU whatever device wrote it: a run may resume on another device (the model's load copies it over)
    state = torch.load(state_path, weights_only=False, map_location="cpu")
    if any(state[k] != v for k, v in identity.items()):
        raise DsparkError(f"{state_path} was trained with a different {what}; use a new --output")
    stored = type(args)(**state["args"])
    if stored != args:
        changed = {k: (v, getattr(args, k)) for k, v in dataclasses.asdict(stored).items() if getattr(args, k) != v}
        log(f"resuming with the stored training settings; ignoring changed options {changed}")
    return state, stored


def read_tokens(data: Path, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The train and held-out token arrays of ``data`` (memory-mapped), checked against the model's vocabulary."""
    train_tokens = np.load(data / "train.npy", mmap_mode="r")
    held_tokens = np.load(data / "heldout.npy", mmap_mode="r")
    if int(train_tokens.max()) >= vocab_size:
        raise DsparkError(f"token ids in {data}/train.npy reach {int(train_tokens.max())}, beyond vocab_size "
                          f"{vocab_size}")
    return train_tokens, held_tokens


class TrainingTask(Protocol):
    """What ``run_training`` trains: a model, its loss on the batch of a step and its held-out metrics."""

    model: torch.nn.Module

    def loss(self, step: int, train_tokens: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss to minimise at ``step`` and its named parts (logged as ``train_<name>`` window means)."""

    def evaluate(self, windows: torch.Tensor) -> dict:
        """Held-out metrics for the log record, ``heldout_loss`` among them."""

    def trainable_state(self) -> dict:
        """The weights train_state.pt keeps (what ``load_trainable_state`` restores)."""

    def load_trainable_state(self, state: dict) -> None: ...


def run_training(task: TrainingTask, args: TrainArgs, train_tokens: np.ndarray, held_tokens: np.ndarray,
                 output: Path, state: dict | None, *, state_fields: dict, export: Callable[[Path], None],
                 summary: str, minutes: float | None, steps: int | None, save_minutes: float, eval_every: int,
                 progress: bool, log: Callable[[str], None]) -> dict:
    """The training loop both trainers share: AdamW on ``lr_at``'s schedule, resumed from ``state`` (as returned
    by ``read_train_state``), until ``steps`` total steps or ``minutes`` of wall time in this call (without either,
    ``args.schedule_steps``) or SIGTERM/SIGINT.

    Evaluates every ``eval_every`` steps (a line of training_log.jsonl) and checkpoints every ``save_minutes`` and
    at the end: train_state.pt (with ``state_fields``, e.g. the config a resume must match) and ``export(output)``,
    the inference checkpoint. Returns the last log record."""
    from tqdm import tqdm

    state_path, log_path = output / STATE_FILE, output / LOG_FILE
    model = task.model
    optimizer = make_optimizer(model, args)
    step, tokens_seen, elapsed_before = 0, 0, 0.0
    if state is not None:
        task.load_trainable_state(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        step, tokens_seen, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        # drop log records written after the checkpoint (a run killed between a log line and a save)
        records = [r for r in read_log(log_path) if r["step"] <= step]
        log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        log(f"resumed from {state_path} at step {step} ({tokens_seen} tokens)")
    log(summary)
    windows = eval_windows(held_tokens, args)
    target_steps = steps if steps is not None else (None if minutes is not None else args.schedule_steps)
    tokens_per_step = args.batch_size * args.seq_len
    trainable = [p for p in model.parameters() if p.requires_grad]

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    t_start = time.monotonic()
    last_save = t_start
    window_loss, window_steps, window_t, window_tokens = 0.0, 0, time.monotonic(), 0
    window_parts: dict[str, float] = {}
    record: dict = {}

    def checkpoint():
        nonlocal last_save
        elapsed = elapsed_before + time.monotonic() - t_start
        atomic_save({"model": task.trainable_state(), "optimizer": optimizer.state_dict(), "step": step,
                     "tokens": tokens_seen, "elapsed": elapsed, "args": dataclasses.asdict(args),
                     "torch_rng": torch.get_rng_state(), **state_fields}, state_path)
        export(output)
        last_save = time.monotonic()

    def evaluate():
        nonlocal window_loss, window_steps, window_t, window_tokens, window_parts, record
        now = time.monotonic()
        speed = round(window_tokens / max(now - window_t, 1e-9), 1)  # training throughput, evaluation excluded
        metrics = task.evaluate(windows)
        record = {"step": step, "tokens": tokens_seen,
                  "train_loss": round(window_loss / window_steps, 4) if window_steps else None,
                  **{f"train_{k}": round(v / window_steps, 4) for k, v in window_parts.items()},
                  **metrics, "lr": lr_at(max(step - 1, 0), args), "tokens_per_s": speed,
                  "elapsed": round(elapsed_before + time.monotonic() - t_start, 1)}
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        tau = f" tau {record['tau']:.3f}" if "tau" in record else ""
        log(f"step {step}: train {record['train_loss']} held-out {record['heldout_loss']:.4f}{tau} ({speed} tok/s)")
        window_loss, window_steps, window_t, window_tokens, window_parts = 0.0, 0, time.monotonic(), 0, {}

    model.train()
    bar = tqdm(total=target_steps, initial=step, disable=not progress, dynamic_ncols=True, file=sys.stderr,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    try:
        if step == 0:
            evaluate()  # the untrained model: the first log line
        while True:
            if target_steps is not None and step >= target_steps:
                break
            if minutes is not None and time.monotonic() - t_start >= minutes * 60:
                break
            if stop["signal"] is not None:
                log(f"signal {stop['signal']}: saving and stopping")
                break
            t0 = time.monotonic()
            lr = lr_at(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, parts = task.loss(step, train_tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
            optimizer.step()
            step += 1
            tokens_seen += tokens_per_step
            window_loss += loss.item()
            window_steps += 1
            window_tokens += tokens_per_step
            for k, v in parts.items():
                window_parts[k] = window_parts.get(k, 0.0) + v
            shown = {"loss": f"{loss.item():.3f}", **({"tau": record["tau"]} if "tau" in record else {})}
            bar.update(1)
            bar.set_postfix(**shown, tok_s=f"{tokens_per_step / (time.monotonic() - t0):.0f}", lr=f"{lr:.2e}",
                            refresh=False)
            if step % eval_every == 0:
                evaluate()
            if time.monotonic() - last_save >= save_minutes * 60:
                if record.get("step") != step:
                    evaluate()
                checkpoint()
        if record.get("step") != step:
            evaluate()
        checkpoint()
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return record


class TargetTask:
    """The target LM, trained from scratch on next-token cross-entropy."""

    def __init__(self, config: dict, args: TrainArgs):
        self.args = args
        self.model = init_model(config, args.seed)

    def loss(self, step: int, train_tokens: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch_at(train_tokens, step, self.args)
        return loss_of(self.model, x, y), {}

    def evaluate(self, windows: torch.Tensor) -> dict:
        return {"heldout_loss": round(heldout_loss(self.model, windows, self.args.batch_size), 4)}

    def trainable_state(self) -> dict:
        return self.model.state_dict()

    def load_trainable_state(self, state: dict) -> None:
        self.model.load_state_dict(state)


def train(data: str | Path, output: str | Path, config: dict, args: TrainArgs, *, minutes: float | None = None,
          steps: int | None = None, threads: int | None = None, save_minutes: float = 5.0, eval_every: int = 100,
          progress: bool = True, log=None) -> dict:
    """Train (or resume) until ``steps`` total steps or ``minutes`` of wall time in this call, whichever first.

    Without either, trains to ``args.schedule_steps``. Returns the last log record.
    """
    log = log or default_log
    if threads:
        torch.set_num_threads(threads)
    data, output = Path(data), Path(output)
    output.mkdir(parents=True, exist_ok=True)
    state, args = read_train_state(output, args, {"config": config}, "model config", log)
    task = TargetTask(config, args)
    train_tokens, held_tokens = read_tokens(data, config["vocab_size"])
    n_params = sum(p.numel() for p in task.model.parameters())
    summary = (f"model: {n_params / 1e6:.2f} M parameters; {len(train_tokens)} train tokens, {len(held_tokens)} "
               f"held-out; threads {torch.get_num_threads()}; batch {args.batch_size}x{args.seq_len}")
    return run_training(task, args, train_tokens, held_tokens, output, state, state_fields={"config": config},
                        export=lambda out: export_hf(task.model, config, out, data), summary=summary,
                        minutes=minutes, steps=steps, save_minutes=save_minutes, eval_every=eval_every,
                        progress=progress, log=log)


def _tokenizer(tokenizer):
    if isinstance(tokenizer, (str, Path)):
        from dspark.train.corpus import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


@torch.no_grad()
def sample(model: DecoderLM, tokenizer, prompt: str, n: int = 64, stop_at_eos: bool = True, heal: bool = True) -> str:
    """Greedy continuation of ``prompt`` by up to ``n`` tokens (prompt included in the returned text).

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or a folder holding ``tokenizer.json``. The prompt is preceded
    by ``<|endoftext|>``, as every training document is. With ``heal`` the prompt's last token is taken back and
    the first generated token is constrained to start with its text, so a prompt such as ``"def "`` (whose
    trailing space would otherwise be a lone token the model rarely saw) continues as ``"def foo"`` would.
    """
    tok = _tokenizer(tokenizer)
    was_training = model.training
    model.eval()
    ids = [EOS_ID] + tok.encode(prompt, add_special_tokens=False).ids
    allowed = None
    if heal and len(ids) > 1:
        tail = tok.decode([ids[-1]], skip_special_tokens=False)
        vocab = model.config.vocab_size
        pieces = [tok.decode([i], skip_special_tokens=False) for i in range(min(vocab, tok.get_vocab_size()))]
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[[i for i, p in enumerate(pieces) if p.startswith(tail) and i > 1]] = True
        ids = ids[:-1]
    past_k, past_v = model.empty_cache(1)
    x = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    out: list[int] = []
    for _ in range(n):
        logits, new_k, new_v, _ = model.step(x, pos, torch.tensor([past_k.shape[3]]), past_k, past_v)
        past_k, past_v = torch.cat([past_k, new_k], dim=3), torch.cat([past_v, new_v], dim=3)
        last = logits[0, -1]
        if allowed is not None:
            last = last.masked_fill(~allowed, float("-inf"))
            allowed = None
        nxt = int(last.argmax())
        if nxt == EOS_ID and stop_at_eos:
            break
        out.append(nxt)
        x = torch.tensor([[nxt]])
        pos = torch.tensor([[past_k.shape[3]]])
    model.train(was_training)
    return tok.decode(ids[1:] + out, skip_special_tokens=False)
