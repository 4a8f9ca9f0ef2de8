"""Command-line entry points for building the demo corpus/tokenizer, training the demo target and its drafters."""

from __future__ import annotations

import json
from pathlib import Path

import click

from dspark.train.corpus import HELD_OUT_FRACTION


@click.command("train-tokenizer")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Folder for the corpus text, train.npy/heldout.npy token arrays and the tokenizer files.")
@click.option("--stdlib", "root", type=click.Path(exists=True, file_okay=False), default=None,
              help="Source folder to collect .py files from (default: this Python's standard library).")
@click.option("--vocab-size", default=8192, show_default=True, help="BPE vocabulary size, special tokens included.")
@click.option("--held-out-fraction", default=HELD_OUT_FRACTION, show_default=True,
              help="Fraction of files (chosen by a hash of their path) kept out of training.")
@click.option("--max-files", type=int, default=None, help="Use at most this many files (quick tests).")
def train_tokenizer_command(output, root, vocab_size, held_out_fraction, max_files):
    """Collect the Python standard-library corpus, train a byte-level BPE tokenizer and tokenize the corpus."""
    from dspark.train.corpus import build

    stats = build(output, root=root, vocab_size=vocab_size, fraction=held_out_fraction, limit=max_files,
                  log=click.echo)
    click.echo(json.dumps(stats))


def _options(*options):
    """Apply click options so that --help lists them in the order given."""
    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command
    return apply


def _run_options(counted: str, seeded: str, sequence: str):
    """--minutes to --seq-len, shared by train-target and train-draft; the help names what each trainer counts as a
    step (``counted``), what the seed draws (``seeded``) and what a sequence is (``sequence``)."""
    return _options(
        click.option("--minutes", type=click.FloatRange(min=0), default=None,
                     help="Stop (and save) after this much wall time in this call."),
        click.option("--steps", type=click.IntRange(min=0), default=None,
                     help=f"Stop (and save) at this total {counted} count. Without --steps and --minutes: "
                          "train to --schedule-steps."),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: torch's choice)."),
        click.option("--seed", default=0, show_default=True, help=f"Seed for initialisation, {seeded}."),
        click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Sequences per optimizer step."),
        click.option("--seq-len", default=512, show_default=True, type=click.IntRange(min=2), help=sequence),
    )


def _evaluation_options(evaluated: str, eval_windows: int, saved: str):
    """--eval-every, --eval-windows and --save-minutes, shared by train-target and train-draft; the help names what
    an evaluation reports (``evaluated``) and what a save writes (``saved``)."""
    return _options(
        click.option("--eval-every", default=100, show_default=True, type=click.IntRange(min=1),
                     help=f"Held-out evaluation interval in steps{evaluated}."),
        click.option("--eval-windows", default=eval_windows, show_default=True, type=click.IntRange(min=1),
                     help="Number of fixed held-out windows evaluated."),
        click.option("--save-minutes", default=5.0, show_default=True, type=click.FloatRange(min=0),
                     help=f"{saved} interval in minutes (also saved at the end and on SIGTERM/SIGINT)."),
    )


@click.command("make-data")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Data folder: responses.jsonl (appended as answers finish; a rerun resumes), then train.npy, "
                   "heldout.npy, their answer masks, heldout_prompts.jsonl and stats.json for 'dspark train-draft' and 'dspark bench'.")
@click.option("--max-new-tokens", default=256, show_default=True, type=click.IntRange(min=1),
              help="Longest answer, in tokens.")
@click.option("--held-out", "held_out", default=48, show_default=True, type=click.IntRange(min=0),
              help="Held-out prompts answered first (kept out of train.npy; their prompts go to heldout_prompts.jsonl).")
@click.option("--limit", type=click.IntRange(min=0), default=None,
              help="Answer at most this many training prompts (default: all).")
@click.option("--minutes", type=click.FloatRange(min=0), default=None,
              help="Stop submitting new prompts after this much wall time in this call (running ones finish); 0 "
                   "answers nothing new and rewrites the arrays from the answers so far.")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Requests decoded together (default: the bundle's max_batch).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0),
              help="ONNX Runtime intra-op threads (0: all cores).")
@click.option("--backend", type=click.Choice(["ort", "torch"]), default="ort", show_default=True,
              help="ort: the bundle's ONNX graphs on the CPU; torch: the PyTorch modules rebuilt from the checkpoint "
                   "folder the bundle was exported from (on --device cuda, plain decoding runs there whole as CUDA "
                   "graphs: the fast way to answer many prompts).")
@click.option("--device", default="cpu", show_default=True, help="Where --backend torch runs: cpu, or cuda / cuda:N.")
@click.option("--stdlib", "root", type=click.Path(exists=True, file_okay=False), default=None,
              help="Source folder the code prompts are derived from (default: this Python's standard library; any "
                   "folder of Python sources works, e.g. a site-packages folder for more prompts).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def make_data_command(bundle_dir, output, max_new_tokens, held_out, limit, minutes, max_batch, threads, backend, device,
                      root, no_progress):
    """Answer instruction prompts with BUNDLE_DIR's target (greedy, batched) and write drafter training data.

    The prompts come from this machine: Python standard-library functions and the methods of its classes (write /
    explain / use each), its modules, and general questions; held-out prompts share no source file or topic with
    training ones. With --held-out 0 a resumed run keeps the held-out set it has."""
    from dspark.runtime.runners import share_thread_pool
    from dspark.train.selfdata import generate_responses, write_tokens

    share_thread_pool(threads)
    generate_responses(bundle_dir, output, max_new_tokens=max_new_tokens, held_out=held_out, limit=limit,
                       minutes=minutes, max_batch=max_batch, threads=threads, root=root,
                       progress=not no_progress, log=click.echo, backend=backend, device=device)
    write_tokens(output, log=click.echo)
    click.echo(f"saved {Path(output)}")


@click.command("train-target")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder written by train-tokenizer (train.npy, heldout.npy, tokenizer files).")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder: HF layout plus train_state.pt and training_log.jsonl; resumed if present.")
@_run_options("optimizer step", "batches and held-out windows", "Tokens per training sequence.")
@click.option("--lr", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Peak AdamW learning rate.")
@click.option("--min-lr-ratio", default=0.1, show_default=True, help="Final learning rate as a fraction of --lr.")
@click.option("--warmup-steps", default=200, show_default=True, type=click.IntRange(min=0), help="Linear warmup steps.")
@click.option("--schedule-steps", default=4000, show_default=True, type=click.IntRange(min=1),
              help="Step at which the cosine decay reaches its floor (the LR stays there afterwards).")
@click.option("--weight-decay", default=0.1, show_default=True, help="AdamW weight decay (matrices only).")
@click.option("--grad-clip", default=1.0, show_default=True, help="Gradient norm clip.")
@_evaluation_options("", 32, "Checkpoint and HF export")
@click.option("--vocab-size", type=int, default=None, help="Model vocabulary (default: the tokenizer's size).")
@click.option("--hidden-size", default=512, show_default=True, help="Model width.")
@click.option("--layers", default=8, show_default=True, help="Decoder layers.")
@click.option("--heads", default=8, show_default=True, help="Attention heads.")
@click.option("--kv-heads", default=4, show_default=True, help="Key/value heads (grouped-query attention).")
@click.option("--head-dim", default=64, show_default=True, help="Dimension per attention head.")
@click.option("--intermediate-size", default=1536, show_default=True, help="MLP inner width.")
@click.option("--max-position-embeddings", default=2048, show_default=True, help="Context length in config.json.")
@click.option("--rope-theta", default=10000.0, show_default=True, help="RoPE base.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_target_command(data, output, minutes, steps, threads, seed, batch_size, seq_len, lr, min_lr_ratio,
                         warmup_steps, schedule_steps, weight_decay, grad_clip, eval_every, eval_windows,
                         save_minutes, vocab_size, hidden_size, layers, heads, kv_heads, head_dim,
                         intermediate_size, max_position_embeddings, rope_theta, no_progress):
    """Train the demo Qwen3 target from scratch (resuming from OUTPUT/train_state.pt when present)."""
    from dspark.train.corpus import load_tokenizer
    from dspark.train.target import TrainArgs, qwen3_config, train

    if vocab_size is None:
        vocab_size = load_tokenizer(data).get_vocab_size()
    config = qwen3_config(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=layers, num_heads=heads,
                          num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate_size,
                          max_position_embeddings=max_position_embeddings, rope_theta=rope_theta)
    args = TrainArgs(seed=seed, batch_size=batch_size, seq_len=seq_len, lr=lr, min_lr_ratio=min_lr_ratio,
                     warmup_steps=warmup_steps, schedule_steps=schedule_steps, weight_decay=weight_decay,
                     grad_clip=grad_clip, eval_windows=eval_windows)
    record = train(data, output, config, args, minutes=minutes, steps=steps, threads=threads,
                   save_minutes=save_minutes, eval_every=eval_every, progress=not no_progress)
    click.echo(json.dumps(record))
    click.echo(f"saved {Path(output)}")


def _layer_list(_ctx, _param, value):
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


@click.command("train-draft")
@click.argument("target_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--method", required=True, type=click.Choice(["draft-lm", "dspark", "dflash"]),
              help="draft-lm: a small Qwen3 LM distilled by KL; dspark: block drafter with Markov and confidence "
                   "heads (CE + TV + confidence loss); dflash: block drafter, CE only.")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder with train.npy and heldout.npy token arrays (written by train-tokenizer or make-data; "
                   "with make-data's train_answers.npy/heldout_answers.npy, block drafters anchor their blocks on "
                   "the target's answers only).")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Drafter checkpoint folder (loadable by 'dspark export TARGET --draft OUTPUT') plus "
                   "train_state.pt and training_log.jsonl; resumed if present.")
@_run_options("step", "batches, anchors, held-out windows", "Tokens per training sequence (target context).")
@click.option("--lr", default=6e-4, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Peak AdamW learning rate.")
@click.option("--warmup-steps", default=50, show_default=True, type=click.IntRange(min=0), help="Linear warmup steps.")
@click.option("--schedule-steps", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Step at which the cosine decay reaches its floor (0.1 x --lr).")
@click.option("--block-size", default=7, show_default=True, help="dspark/dflash: block size B (draft tokens per round).")
@click.option("--num-layers", type=int, default=None,
              help="Draft layers (default: 2 for dspark/dflash, 4 for draft-lm; with --init-from, the grown count).")
@click.option("--markov-rank", default=256, show_default=True, help="dspark: rank r of the Markov head.")
@click.option("--markov-head", default="vanilla", show_default=True, type=click.Choice(["vanilla", "gated", "rnn"]),
              help="dspark: Markov head type.")
@click.option("--target-layers", callback=_layer_list, default=None,
              help="dspark/dflash: comma-separated target layers whose raw outputs are the drafter's context "
                   "features (default: DeepSpec's spread, e.g. 1,3,5 for an 8-layer target).")
@click.option("--mask-token-id", type=int, default=None,
              help="dspark/dflash: mask token id (default: <|mask|> from the target's tokenizer.json).")
@click.option("--draft-vocab", default=0, show_default=True,
              help="Predict over only the N most frequent tokens of the training data (a reduced draft vocabulary: a "
                   "smaller LM head and Markov head; a draft LM's embedding too, with one more id standing for every "
                   "other token); the draft law is zero elsewhere, so decoding stays exact. 0 keeps the target's "
                   "whole vocabulary.")
@click.option("--anchors-per-seq", default=32, show_default=True,
              help="dspark/dflash: anchor blocks sampled per training sequence.")
@click.option("--hidden-size", type=int, default=None, help="draft-lm: model width (default 256).")
@click.option("--heads", type=int, default=None, help="draft-lm: attention heads (default 4).")
@click.option("--kv-heads", type=int, default=None, help="draft-lm: key/value heads (default 2).")
@click.option("--head-dim", type=int, default=None, help="draft-lm: dimension per head (default 64).")
@click.option("--intermediate-size", type=int, default=None, help="draft-lm: MLP inner width (default 768).")
@_evaluation_options(" (loss and the acceptance estimate tau)", 16, "Checkpoint")
@click.option("--frozen-copies/--no-frozen-copies", default=True, show_default=True,
              help="dspark/dflash: store copies of the target's embedding and LM head in the checkpoint, as DeepSpec "
                   "does; without them the drafter loads only beside its target (smaller files).")
@click.option("--feature-cache", is_flag=True,
              help="Compute the target's features of the training data once (float16 files under DATA/features-*/, "
                   "about 7 KB per token for a 576-wide target with 5 taps; a draft LM needs only the final hidden "
                   "states, about 1.2 KB, and --draft-vocab, and reads them from a DSpark/DFlash drafter's "
                   "finished cache of the same data when there is one) and read them every step instead of running "
                   "the target: several times faster per step on a CPU; evaluation still runs the target.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Start from this drafter's weights, draft vocabulary and config (for example one trained on "
                   "less data) with a fresh optimizer and schedule; its config.json replaces the shape options "
                   "above, except that it may grow by --num-layers (layers added on top), and a DSpark/DFlash "
                   "drafter by --target-layers (more taps), without changing what it computes at the start: new "
                   "taps' fc columns and new layers' output projections start at zero. Ignored when OUTPUT resumes.")
@click.option("--device", default="cpu", show_default=True,
              help="Where the target runs and the drafter trains: cpu, or cuda / cuda:N (bfloat16 autocast on "
                   "either; a GPU runs the target every step faster than --feature-cache reads it back).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def train_draft_command(target_dir, method, data, output, minutes, steps, threads, seed, batch_size, seq_len, lr,
                        warmup_steps, schedule_steps, block_size, num_layers, markov_rank, markov_head,
                        target_layers, mask_token_id, draft_vocab, anchors_per_seq, hidden_size, heads, kv_heads, head_dim,
                        intermediate_size, eval_every, eval_windows, save_minutes, frozen_copies, feature_cache,
                        init_from, device, no_progress):
    """Train a drafter for the frozen target in TARGET_DIR (resuming from OUTPUT/train_state.pt when present)."""
    from dspark.train.draft import DraftArgs, method_config, train_draft

    if init_from is not None:
        from dspark.errors import DsparkError
        from dspark.graphs.checkpoint import read_config
        from dspark.train.draft import grown_config

        # the drafter it starts from decides the shape; it grows by --num-layers (and a block drafter's by
        # --target-layers)
        config = read_config(init_from)
        if ("target_layer_ids" in config) == (method == "draft-lm"):
            kind = "a DSpark/DFlash drafter" if "target_layer_ids" in config else "a draft LM"
            raise DsparkError(f"--init-from {init_from} is {kind}; --method {method} cannot start from it")
        config = grown_config(config, num_layers, target_layers)
    else:
        if num_layers is None:
            num_layers = 4 if method == "draft-lm" else 2
        config = method_config(target_dir, method, block_size=block_size, num_layers=num_layers,
                               target_layers=target_layers, mask_token_id=mask_token_id, markov_rank=markov_rank,
                               markov_head=markov_head, num_anchors=anchors_per_seq, draft_vocab=draft_vocab or None,
                               hidden_size=hidden_size, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                               intermediate_size=intermediate_size)
    args = DraftArgs(seed=seed, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=warmup_steps,
                     schedule_steps=schedule_steps, eval_windows=eval_windows, anchors_per_seq=anchors_per_seq,
                     frozen_copies=frozen_copies)
    record = train_draft(target_dir, data, output, method, config, args, minutes=minutes, steps=steps,
                         threads=threads, save_minutes=save_minutes, eval_every=eval_every,
                         progress=not no_progress, cache_features=feature_cache, init_from=init_from,
                         device=device)
    click.echo(json.dumps(record))
    click.echo(f"saved {Path(output)}")


if __name__ == "__main__":
    @click.group()
    def main():
        """dspark demo-model training."""

    main.add_command(train_tokenizer_command)
    main.add_command(train_target_command)
    main.add_command(train_draft_command)
    main()
