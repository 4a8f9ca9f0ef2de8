"""``dspark``: a thin Click layer over the library. Each command parses options and calls one function.

Exit codes: 0 success, 1 a check or run that failed, 2 bad input (a ``DsparkError``: one line, no traceback).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dspark.errors import DsparkError


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


@main.command()
@click.argument("target_dir", type=click.Path(path_type=Path))
@click.option("--draft", "draft_dir", type=click.Path(path_type=Path), help="Draft checkpoint folder: a small LM with the target's tokenizer.")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Bundle folder to create.")
@click.option("--max-batch", default=8, show_default=True, help="Largest number of rows (sequences) one graph call takes.")
@click.option("--max-context", default=2048, show_default=True, help="Longest sequence (prompt + output) the bundle serves.")
@click.option("--prefill-chunk", default=256, show_default=True, help="Prompt tokens fed per prefill call.")
@click.option("--num-draft-tokens", default=4, show_default=True, help="Draft tokens K per round (the verify graph takes K+1).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True, help="Weight and activation type of the graphs.")
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
def export(target_dir, draft_dir, output, max_batch, max_context, prefill_chunk, num_draft_tokens, dtype, force):
    """Export TARGET_DIR (and --draft) Hugging Face checkpoints into a bundle of ONNX graphs."""
    from dspark.export.bundle import ExportOptions, export_bundle

    options = ExportOptions(max_batch, max_context, prefill_chunk, dtype, num_draft_tokens)
    manifest = export_bundle(target_dir, output, draft_dir, options, force=force)
    size = sum(f["bytes"] for f in manifest["files"].values())
    click.echo(f"bundle: {output}")
    for name, model in manifest["models"].items():
        c = model["config"]
        kind = model.get("method", "target")
        click.echo(f"  {name:7s} {kind:9s} {c['architecture']} layers={c['num_layers']} d={c['hidden_size']} vocab={c['vocab_size']}")
    click.echo(f"  graphs: {', '.join(manifest['graphs'])}; files: {len(manifest['files'])}, {size / 1e6:.1f} MB; "
               f"{manifest['export_seconds']} s")


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--max-new-tokens", default=128, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass (1 disables it).")
@click.option("--top-k", default=0, show_default=True, help="Sample among the k most likely tokens (0 disables it).")
@click.option("--seed", default=0, show_default=True, help="Seed for sampling; the same seed gives the same output.")
@click.option("--num-draft-tokens", type=int, help="Draft tokens per round (default: the bundle's).")
@click.option("--no-draft", is_flag=True, help="Plain decoding with the target alone.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence tokens.")
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable); it is not included in the output.")
@click.option("--threads", default=0, show_default=True, help="ONNX Runtime intra-op threads (0: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text, token_ids, stats) instead of streaming text.")
@click.option("--trace", type=click.Path(path_type=Path), help="Write one JSON line per speculative round to this file.")
def generate(bundle_dir, prompt, max_new_tokens, temperature, top_p, top_k, seed, num_draft_tokens, no_draft, ignore_eos,
             stop, threads, as_json, trace):
    """Generate a completion of --prompt with the bundle in BUNDLE_DIR."""
    from dspark.runtime.generate import Generator, Request
    from dspark.runtime.sampling import SamplingParams

    generator = Generator(bundle_dir, threads=threads, use_draft=not no_draft, num_draft_tokens=num_draft_tokens)
    request = Request(
        prompt_ids=generator.tokenizer.encode(prompt),
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature, top_p, top_k),
        seed=seed,
        stop=tuple(stop),
        ignore_eos=ignore_eos,
    )
    stream = None if as_json else (lambda _i, delta: click.echo(delta, nl=False))
    seq = generator.generate([request], trace=trace is not None, on_text=stream)[0]
    stats = seq.stats()
    if trace is not None:
        trace.write_text("".join(json.dumps(r) + "\n" for r in seq.trace))
    if as_json:
        click.echo(json.dumps({"text": seq.text, "token_ids": seq.generated, "finish_reason": seq.finish_reason, "stats": stats}))
    else:
        click.echo()
        tau = stats["mean_accepted_length"]
        click.echo(
            f"[{stats['generated_tokens']} tokens, {stats['tokens_per_second']:.1f} tok/s, "
            f"{stats['rounds']} rounds, mean accepted length {tau:.2f}, {seq.finish_reason}]",
            err=True,
        )


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


if __name__ == "__main__":
    main()
