"""Peer: llama.cpp's CPU binaries on a GGUF of the same model, plain and (with a draft GGUF) speculative.

Build llama.cpp from source as its README explains (CMake, ``-DGGML_NATIVE=ON``; on Sapphire Rapids with GCC 12
its AMX kernels need ``_tile_loadconfig`` replaced by an inline ``ldtilecfg``, see the README's Benchmark section)
and point at the folder holding ``llama-completion`` and ``llama-speculative-simple``.

For each prompt, one process per run (model loading is not timed), greedy, exactly N new tokens:

- plain: ``llama-completion -p PROMPT -n N --temp 0 --ignore-eos -no-cnv -fa off``; the time is its own
  ``prompt eval time + eval time`` (prefill included, as ``dspark bench`` counts), the tokens its eval runs + 1;
- speculative: ``llama-speculative-simple -md DRAFT --spec-type draft-simple --spec-draft-n-max K -p PROMPT -n N
  --temp 0 -fa off``; the time is its ``encoded`` + ``decoded`` seconds, the tokens its ``n_predict`` (it may
  write a few past N), and it reports its acceptance.

tokens/s = all new tokens / all those seconds, median over repeats after one warm-up pass. Flash attention is
off: on this CPU it makes multi-token calls much costlier at longer contexts. The prompt is text: llama.cpp
tokenizes it itself (special tokens parsed), so the token counts it reports are given beside ours.

    python bench/peers/llama_cpp.py BIN_DIR MODEL.gguf [--draft DRAFT.gguf] [--prompts FILE] [--max-new-tokens 64]

``dspark bench --peers --llama-cpp BIN_DIR`` calls ``run_peer`` and puts the numbers beside its own.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
from pathlib import Path

PLAIN, SPECULATIVE = "llama-completion", "llama-speculative-simple"


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def _number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    if found is None:
        raise RuntimeError(f"llama.cpp printed no {pattern!r}; its log ends: {text[-800:]}")
    return float(found.group(1))


def _run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} exited with {done.returncode}: {done.stderr[-800:]}")
    return done.stderr


def plain_run(bin_dir: Path, gguf: Path, prompt: str, max_new_tokens: int, threads: int, context: int) -> dict:
    log = _run([str(bin_dir / PLAIN), "-m", str(gguf), "-p", prompt, "-n", str(max_new_tokens), "--temp", "0",
                "--ignore-eos", "-no-cnv", "--no-display-prompt", "--simple-io", "-fa", "off", "-c", str(context)]
               + (["-t", str(threads)] if threads else []))
    prompt_ms = _number(r"prompt eval time =\s*([\d.]+) ms", log)
    eval_ms = _number(r"\beval time =\s*([\d.]+) ms /\s*\d+ runs", log.split("prompt eval time")[1])
    runs = _number(r"\beval time =\s*[\d.]+ ms /\s*(\d+) runs", log.split("prompt eval time")[1])
    return {"tokens": int(runs) + 1, "seconds": (prompt_ms + eval_ms) / 1000,
            "prompt_tokens": int(_number(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens", log))}


def speculative_run(bin_dir: Path, gguf: Path, draft: Path, prompt: str, max_new_tokens: int, draft_length: int,
                    threads: int, context: int) -> dict:
    log = _run([str(bin_dir / SPECULATIVE), "-m", str(gguf), "-md", str(draft), "--spec-type", "draft-simple",
                "--spec-draft-n-max", str(draft_length), "-p", prompt, "-n", str(max_new_tokens), "--temp", "0",
                "-fa", "off", "-c", str(context)] + (["-t", str(threads)] if threads else []))
    return {"tokens": int(_number(r"n_predict\s*=\s*(\d+)", log)),
            "seconds": _number(r"encoded\s+\d+ tokens in\s+([\d.]+) seconds", log)
            + _number(r"decoded\s+\d+ tokens in\s+([\d.]+) seconds", log),
            "drafted": int(_number(r"n_drafted\s*=\s*(\d+)", log)),
            "accepted": int(_number(r"n_accept\s*=\s*(\d+)", log))}


def run_peer(bin_dir, gguf, prompts: list[str], max_new_tokens: int, threads: int = 0, repeats: int = 3,
             warmup: int = 1, draft=None, draft_length: int = 4, context: int = 2048, log=print) -> dict:
    bin_dir = Path(bin_dir)
    if gguf is None:
        return skipped("no GGUF to run: pass --llama-gguf (the bundle's target was not exported from a GGUF file)")
    wanted = [PLAIN] + ([SPECULATIVE] if draft else [])
    missing = [name for name in wanted if not (bin_dir / name).is_file()]
    if missing:
        return skipped(f"{', '.join(missing)} not found in {bin_dir}: build llama.cpp (see bench/peers/llama_cpp.py)")
    modes = {"plain": lambda p: plain_run(bin_dir, Path(gguf), p, max_new_tokens, threads, context)}
    if draft:
        modes["speculative"] = lambda p: speculative_run(bin_dir, Path(gguf), Path(draft), p, max_new_tokens,
                                                         draft_length, threads, context)
    rates = {mode: [] for mode in modes}
    last = {}
    for r in range(warmup + repeats):
        for mode, run in modes.items():  # interleaved, as dspark bench does
            last[mode] = [run(p) for p in prompts]
            if r >= warmup:
                rates[mode].append(sum(x["tokens"] for x in last[mode]) / sum(x["seconds"] for x in last[mode]))
    report = {
        "status": "ok",
        "engine": "llama.cpp",
        "version": _version(bin_dir),
        "gguf": str(gguf),
        "threads": threads,
        "flash_attention": False,
        "concurrency": 1,
        "requests": len(prompts),
        "max_new_tokens": max_new_tokens,
        "prompt_tokens": [x["prompt_tokens"] for x in last["plain"]],
        "plain_tokens_per_second": statistics.median(rates["plain"]),
        "plain_tokens_per_second_runs": rates["plain"],
    }
    if not draft:
        return {**report, "speculative": "no speculative run: pass a draft GGUF (--llama-draft-gguf)"}
    runs = last["speculative"]
    drafted = sum(x["drafted"] for x in runs)
    return {**report, "speculative": f"draft-simple with {Path(draft).name}, K={draft_length}",
            "speculative_tokens_per_second": statistics.median(rates["speculative"]),
            "speculative_tokens_per_second_runs": rates["speculative"],
            "acceptance": sum(x["accepted"] for x in runs) / drafted if drafted else None}


def _version(bin_dir: Path) -> str:
    done = subprocess.run([str(bin_dir / PLAIN), "--version"], capture_output=True, text=True)
    found = re.search(r"version: (.+)", done.stdout + done.stderr)
    return found.group(1).strip() if found else "unknown"


def main() -> None:
    import argparse

    from dspark.bench import peer_script_arguments
    from dspark.prompts import load_prompts

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bin_dir", help="folder with llama-completion (and llama-speculative-simple)")
    parser.add_argument("gguf")
    parser.add_argument("--draft", help="draft GGUF for the speculative run")
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    peer_script_arguments(parser)
    args = parser.parse_args()
    prompts = [p.text for p in load_prompts(args.prompts, args.num_prompts)]
    report = run_peer(args.bin_dir, args.gguf, prompts, args.max_new_tokens, args.threads, args.repeats,
                      draft=args.draft, draft_length=args.num_draft_tokens)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
