"""A real model against transformers: greedy tokens and logits of a bundle's target graph.

    python bench/real_model_parity.py BUNDLE [--prompts N] [--new-tokens 48]

Loads the checkpoint folder the manifest records (for a GGUF export, the dequantized folder dspark made from it)
with transformers in fp32 and compares, per prompt: greedy continuations token for token (the first differing
position and the target's logit margin there if they differ), and the logits of prompt + continuation in one
call, max |difference|, also against a float64 evaluation of the same weights so round-off can be told from error.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dspark.bundle import Bundle
from dspark.graphs.decoder import DecoderLM
from dspark.runtime.decoder import decoder_cache, run_decoder
from dspark.runtime.generate import Generator, Request
from dspark.runtime.backends import make_runner
from dspark.runtime.tokenizer import ChatTemplate

QUESTIONS = ["What is the capital of France?", "Write a Python function that returns the n-th Fibonacci number.",
             "Explain in two sentences why the sky is blue.", "List three uses of a hash map."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--prompts", type=int, default=len(QUESTIONS))
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    bundle = Bundle.open(args.bundle)
    source = bundle.target.source
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    exact = DecoderLM.from_pretrained(source, dtype=torch.float64)
    gen = Generator(bundle, use_draft=False)
    template = ChatTemplate.load(gen.tokenizer)
    runner = make_runner(bundle, "target")
    worst = {"vs transformers fp32": 0.0, "ours vs float64": 0.0, "transformers vs float64": 0.0}
    for question in QUESTIONS[: args.prompts]:
        messages = [{"role": "user", "content": question}]
        ids = template.ids(messages) if template else gen.tokenizer.encode(question)
        ours = gen.generate([Request(ids, max_new_tokens=args.new_tokens, ignore_eos=True)])[0].generated
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=args.new_tokens,
                                        min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
        theirs = theirs[0, len(ids):].tolist()
        full = ids + theirs
        out = run_decoder(runner, decoder_cache(bundle.target.config, 1, bundle), [full])["logits"][0, : len(full)]
        with torch.no_grad():
            ref = reference(torch.tensor([full])).logits[0].numpy()
            ref64 = exact(torch.tensor([full]))[0].numpy()
        worst["vs transformers fp32"] = max(worst["vs transformers fp32"], float(np.abs(out - ref).max()))
        worst["ours vs float64"] = max(worst["ours vs float64"], float(np.abs(out - ref64).max()))
        worst["transformers vs float64"] = max(worst["transformers vs float64"], float(np.abs(ref - ref64).max()))
        if ours == theirs:
            verdict = "identical"
        else:
            i = next(k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            top2 = np.sort(ref64[len(ids) + i - 1])[-2:]
            verdict = f"DIFFER at token {i} (ours {ours[i]}, transformers {theirs[i]}; float64 margin {top2[1] - top2[0]:.3g})"
        print(f"{question[:50]:50s} {len(ids):3d}+{args.new_tokens} tokens: {verdict}")
    print("max |logit difference|: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))


if __name__ == "__main__":
    main()
