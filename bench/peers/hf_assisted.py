"""Peer: Hugging Face transformers, plain and assisted generation, on the checkpoints a bundle was exported from.

Loads ``models.target.source`` (and, for a draft-lm bundle, ``models.draft.source``) from the bundle's manifest
with transformers and times, one request at a time (assisted generation takes batch size 1), greedy:

- plain ``model.generate(ids, do_sample=False, max_new_tokens=N)``;
- assisted, when the bundle's draft is a draft LM: ``generate(..., assistant_model=draft, num_assistant_tokens=K,
  num_assistant_tokens_schedule="constant")`` with the bundle's K (or ``--num-draft-tokens``).

Every request generates exactly N tokens (the stop id is one the model never produces), as ``dspark bench``
does with end-of-sequence ignored. Reported: tokens/s = all new tokens / total generate time, median over repeats after one warm-up pass.
A draft LM over a reduced vocabulary (ids of its own, ``draft_vocab`` in the manifest) runs as the assistant
through ``target_ids_draft`` (its ids mapped to the target's both ways), so it drafts what dspark's runtime drafts
with it. Optional: skipped with a message when transformers is not installed or the
checkpoint folders are not on this machine; assisted generation is left out (and says why) when the draft is not
a draft LM (DSpark and DFlash drafters read the target's hidden features; ``assistant_model`` has no interface for
them).

    python bench/peers/hf_assisted.py BUNDLE [--max-new-tokens 64] [--prompts code|prose|all|FILE] [--repeats 3]

``dspark bench --peers`` calls ``run_peer`` and puts the numbers beside its own.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def target_ids_draft(model, draft_vocab, target_vocab_size: int):
    """Makes a transformers draft LM over a reduced vocabulary read and score the target's ids, for
    ``assistant_model``: the ids it reads are mapped to its own (``draft_index``), and its logits are placed at the
    target ids of its vocabulary, -inf elsewhere (its id N for every other token is dropped: dspark never drafts it)."""
    import torch

    from dspark.runtime.proposers import draft_index

    subset = torch.tensor(draft_vocab, dtype=torch.long)
    to_draft = torch.from_numpy(draft_index(draft_vocab, target_vocab_size))
    base = type(model)

    def forward(self, input_ids=None, **kwargs):
        out = base.forward(self, input_ids=to_draft[input_ids], **kwargs)
        logits = out.logits.new_full((*out.logits.shape[:-1], target_vocab_size), float("-inf"))
        logits[..., subset] = out.logits[..., :len(draft_vocab)]
        out.logits = logits
        return out

    model.__class__ = type(f"TargetIds{base.__name__}", (base,), {"forward": forward})
    model.config.vocab_size = target_vocab_size  # transformers pairs assistants by vocabulary size
    return model


def run_peer(bundle_dir, prompt_ids: list[list[int]], max_new_tokens: int, num_assistant_tokens: int | None = None,
             threads: int = 0, repeats: int = 3, warmup: int = 1, log=print) -> dict:
    from dspark.bundle import Bundle

    bundle = Bundle.open(bundle_dir, verify=False)
    draft = bundle.draft
    assisted_too = draft is not None and draft.method == "draft-lm"
    try:
        import torch
        import transformers
    except ImportError as e:
        return skipped(f"transformers is not installed ({e}); pip install transformers")
    sources = {name: model.source for name, model in bundle.models.items() if name == "target" or assisted_too}
    found = lambda src: (Path(src) if src.endswith(".gguf") else Path(src) / "config.json").is_file()  # noqa: E731
    missing = [f"{name} {src}" for name, src in sources.items() if not (src and found(src))]
    if missing:
        return skipped(f"checkpoint not found: {', '.join(missing)}")

    if threads:
        torch.set_num_threads(threads)
    dtype = torch.float16 if bundle.dtype == "fp16" else torch.float32

    @contextlib.contextmanager
    def quiet():
        # loading a reduced draft LM reports its draft_vocab tensor as unexpected; assisted generation warns about
        # its own internal arguments
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            yield
        finally:
            transformers.logging.set_verbosity(verbosity)

    def load(src: str):
        source = Path(src)  # a GGUF file is read (and dequantized) by transformers' GGUF loader
        where, gguf = (source.parent, {"gguf_file": source.name}) if source.suffix == ".gguf" else (source, {})
        with quiet():
            return transformers.AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **gguf).eval()

    target = load(sources["target"])
    assistant = load(sources["draft"]) if assisted_too else None
    if assistant is not None and draft.draft_vocab:
        assistant = target_ids_draft(assistant, draft.draft_vocab, target.config.vocab_size)
    draft_length = (num_assistant_tokens or draft.draft_length) if assisted_too else None
    never = target.config.vocab_size
    pad = bundle.tokenizer.pad_token_id
    if pad is None:
        pad = bundle.tokenizer.eos_token_ids[0]

    def one(ids: list[int], assisted: bool) -> tuple[int, float, list[int]]:
        x = torch.tensor([ids], dtype=torch.long)
        # an end-of-sequence id the model never produces: generation runs to length and, unlike min_new_tokens,
        # the real end-of-sequence token is not suppressed, so greedy output is dspark's with ignore_eos
        kwargs = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                      eos_token_id=never, pad_token_id=pad)
        if assisted:
            kwargs.update(assistant_model=assistant, num_assistant_tokens=draft_length, num_assistant_tokens_schedule="constant")
        with torch.inference_mode():
            start = time.perf_counter()
            out = target.generate(x, **kwargs)
            elapsed = time.perf_counter() - start
        new = out[0, x.shape[1]:].tolist()
        return len(new), elapsed, new

    modes = ("plain", "assisted") if assisted_too else ("plain",)
    rates = {mode: [] for mode in modes}
    outputs = {}
    with quiet():
        for p in range(warmup + repeats):
            for mode in modes:  # interleaved, as dspark bench does
                tokens = seconds = 0
                outs = []
                for ids in prompt_ids:
                    n, t, new = one(ids, mode == "assisted")
                    tokens, seconds = tokens + n, seconds + t
                    outs.append(new)
                outputs[mode] = outs
                if p >= warmup:
                    rates[mode].append(tokens / seconds)
    report = {
        "status": "ok",
        "engine": "transformers",
        "version": transformers.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "target_source": sources["target"],
        "concurrency": 1,
        "requests": len(prompt_ids),
        "max_new_tokens": max_new_tokens,
        "plain_tokens_per_second": statistics.median(rates["plain"]),
        "plain_tokens_per_second_runs": rates["plain"],
        "generated_token_ids": outputs["plain"],
    }
    if not assisted_too:
        report["speculative"] = f"no assisted generation: the bundle's draft is {draft.method if draft else 'missing'}, not a draft LM"
        return report
    assisted = statistics.median(rates["assisted"])
    return {**report, "speculative": "assisted generation", "draft_source": sources["draft"],
            "num_assistant_tokens": draft_length, "num_assistant_tokens_schedule": "constant",
            "speculative_tokens_per_second": assisted, "speculative_tokens_per_second_runs": rates["assisted"],
            "speculative_matches_plain": outputs["plain"] == outputs["assisted"]}


def main() -> None:
    import argparse

    from dspark.bench import peer_prompt_ids, peer_script_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    peer_script_arguments(parser)
    parser.add_argument("--num-draft-tokens", type=int, help="K (default: the bundle's)")
    args = parser.parse_args()
    ids = peer_prompt_ids(args.bundle, args.prompts, args.num_prompts)
    report = run_peer(args.bundle, ids, args.max_new_tokens, args.num_draft_tokens, args.threads, args.repeats)
    report.pop("generated_token_ids", None)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
