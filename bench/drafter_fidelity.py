"""Drafter fidelity: does the runtime draft what training's forward drafts, and what tau does the drafter reach on
the target's own text?

A block drafter's training log estimates tau teacher-forced on held-out windows of its training data; the loop's
tau comes from the bundle at run time. When the two disagree, this script says which of three things it is:

1. the runtime's drafts: every round of a greedy run (``--scheduler fixed``, whole blocks verified) is compared
   with the trainer's own forward (``train.draft.drafter_forward`` + ``block_logits``, the target's features from
   ``train.target.target_pass``) at the same anchor on the same tokens; anything under 100% at fp32 is a bug in
   the runtime's feature path (an int4 target's features differ by design);
2. where rounds start: tau teacher-forced at every answer position against tau teacher-forced walked the way the
   loop walks (each round starts after the last one's accepted drafts and its bonus token);
3. the text: the same estimate on the target's own greedy answers, here, against the training log's figure on
   the training data's held-out windows (text another copy of the model may have written).

    python bench/drafter_fidelity.py BUNDLE [--prompts FILE] [--num-prompts 6] [--max-new-tokens 256] [--bf16]

The target checkpoint and the drafter folder are the ones the bundle's manifest names (``--target-dir``,
``--drafter-dir`` override them). Prints one JSON report. Not a timing: it may run beside other work.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import numpy as np
import torch

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.graphs.drafter import Drafter
from dspark.prompts import load_prompts
from dspark.runtime.generate import Generator, Request
from dspark.train.draft import block_logits, drafter_forward, load_target
from dspark.train.target import target_pass

OFFSET_BUCKET = 64  # answer tokens per bucket of the by-offset estimate


def teacher_forced(target, drafter, tokens: list[int], first: int, bf16: bool) -> np.ndarray:
    """Accepted drafts at every anchor from ``first`` on (the drafter's greedy block against ``tokens``, which are
    the target's greedy text, so they are its argmax), and the drafts themselves [anchors, block]."""
    block = drafter.config.block_size
    x = torch.tensor([tokens])
    anchors = torch.arange(first, len(tokens) - block)[None]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        _, features = target_pass(target, x, tuple(drafter.config.target_layer_ids))
        h = drafter_forward(drafter, features, x, anchors)
        greedy, _ = block_logits(drafter, h, x.gather(1, anchors))
        drafts = drafter.to_target(greedy.argmax(-1))[0].numpy()
    truth = np.lib.stride_tricks.sliding_window_view(np.asarray(tokens[first + 1:]), block)[: len(drafts)]
    accepted = np.cumprod(drafts == truth, axis=1).sum(axis=1)
    return accepted, drafts


def measure(bundle_dir, prompts, max_new_tokens: int, target_dir=None, drafter_dir=None, bf16=False,
            threads: int = 0) -> dict:
    bundle = Bundle.open(bundle_dir)
    if bundle.draft is None or not bundle.draft.block:
        raise DsparkError(f"{bundle_dir} has no block drafter (DSpark/DFlash) to check")
    gen = Generator(bundle, threads=threads, scheduler="fixed")
    ids = [gen.tokenizer.encode(p.text) for p in prompts]
    seqs = gen.generate([Request(i, max_new_tokens=max_new_tokens, ignore_eos=True) for i in ids], trace=True)
    target_dir = target_dir or bundle.target.source
    target = load_target(target_dir)
    drafter = Drafter.from_pretrained(drafter_dir or bundle.draft.source, target.config, torch.float32,
                                      target_dir).eval()
    block = drafter.config.block_size
    same = rounds = 0
    loop, walked, everywhere, by_offset = [], [], [], {}
    for seq in seqs:
        tokens, first = seq.request.prompt_ids + seq.generated, len(seq.request.prompt_ids) - 1
        accepted, drafts = teacher_forced(target, drafter, tokens, first, bf16)
        everywhere += list(accepted)
        for i, a in enumerate(accepted):
            by_offset.setdefault(i // OFFSET_BUCKET * OFFSET_BUCKET, []).append(a + 1)
        anchor = first
        while anchor - first < len(accepted):  # the loop's walk: the next round starts after the bonus token
            walked.append(accepted[anchor - first])
            anchor += accepted[anchor - first] + 1
        for r in seq.trace:
            i = r["position"] - first
            if i < len(accepted) and len(r["draft_tokens"]) == block:
                rounds += 1
                same += r["draft_tokens"] == drafts[i].tolist()
                loop.append(r["accepted"])

    def summary(accepted) -> dict:
        a = np.asarray(accepted)
        return {"tau": round(float(a.mean() + 1), 3),
                "accept_at_k": [round(float((a > k).mean()), 3) for k in range(block)]}

    return {"bundle": str(bundle_dir), "target": str(target_dir), "drafter": str(drafter_dir or bundle.draft.source),
            "features": "bf16 autocast (as training)" if bf16 else "fp32",
            "requests": len(seqs), "max_new_tokens": max_new_tokens,
            "rounds_compared": rounds, "runtime_drafts_equal_training_forward": round(same / max(rounds, 1), 4),
            "loop": summary(loop), "teacher_forced_walked_like_the_loop": summary(walked),
            "teacher_forced_every_answer_position": summary(everywhere),
            "teacher_forced_tau_by_answer_offset": {k: round(float(np.mean(v)), 3) for k, v in sorted(by_offset.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="a bundle with a DSpark or DFlash drafter")
    parser.add_argument("--prompts", default="all", help="code, prose, all (built-in sets) or a prompts file")
    parser.add_argument("--num-prompts", type=int, default=6, help="only the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="greedy answer length per prompt")
    parser.add_argument("--target-dir", help="the target checkpoint (default: the manifest's target source)")
    parser.add_argument("--drafter-dir", help="the drafter folder (default: the manifest's draft source)")
    parser.add_argument("--bf16", action="store_true", help="features under bf16 autocast, as training computes them")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all cores)")
    args = parser.parse_args()
    report = measure(args.bundle, load_prompts(args.prompts, args.num_prompts), args.max_new_tokens,
                     args.target_dir, args.drafter_dir, args.bf16, args.threads)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
