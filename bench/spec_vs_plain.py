"""Time plain against speculative decoding of the same bundle, in one process, on the same prompts.

Runs are interleaved (plain, speculative, plain, ...) after a warm-up so machine drift hits both alike; each
configuration reports the median tokens/s over repeats and the mean accepted length, then the ratio. It also
times one draft round and one target verify call, the two costs a speculative round is made of.

    python bench/spec_vs_plain.py BUNDLE [--max-new-tokens 64] [--repeats 5] [--prompt-ids 1,2,3 | --prompt TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from dspark.runtime.decoder import decoder_cache, run_decoder
from dspark.runtime.generate import Generator, Request


def machine() -> dict:
    import onnxruntime

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}


def median_ms(fn, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def call_costs(spec: Generator, context: int) -> dict:
    """Median ms of one target verify call (K+1 tokens), one target decode call (1 token) and one draft round."""
    bundle = spec.bundle
    k = spec.num_draft_tokens
    cache = decoder_cache(bundle.target["config"], 1, bundle)
    cache.reserve(context + k + 1)
    cache.lens[:] = context
    costs = {
        "target_1_token_ms": median_ms(lambda: run_decoder(spec.target, cache, [[1]])),
        f"target_{k + 1}_tokens_ms": median_ms(lambda: run_decoder(spec.target, cache, [[1] * (k + 1)])),
    }
    # one draft round for a row whose anchor is at ``context``: rewind the draft to re-read the anchor each time
    gen = Generator(bundle, use_draft=True, num_draft_tokens=k)
    seq = gen.submit(Request([1] * context, max_new_tokens=2, ignore_eos=True))
    gen._admit()
    proposer = gen.proposer
    proposer.propose([seq], [k])
    anchor = len(seq.tokens) - 1

    def draft_round():
        if not hasattr(proposer, "pending"):
            proposer.cache.lens[:] = anchor
        proposer.propose([seq], [k])

    costs["draft_round_ms"] = median_ms(draft_round)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--prompt", help="prompt text (tokenized with the bundle's tokenizer)")
    parser.add_argument("--prompt-ids", help="comma-separated prompt token ids")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--num-draft-tokens", type=int)
    args = parser.parse_args()

    spec = Generator(args.bundle, threads=args.threads, num_draft_tokens=args.num_draft_tokens)
    plain = Generator(args.bundle, threads=args.threads, use_draft=False)
    if args.prompt_ids:
        ids = [int(x) for x in args.prompt_ids.split(",")]
    else:
        ids = spec.tokenizer.encode(args.prompt or "def ")
    request = Request(ids, max_new_tokens=args.max_new_tokens, ignore_eos=True)
    for gen in (plain, spec):  # warm-up
        gen.generate([request])
    rates = {"plain": [], "speculative": []}
    taus = []
    outputs = {}
    for _ in range(args.repeats):
        for name, gen in (("plain", plain), ("speculative", spec)):
            seq = gen.generate([request])[0]
            rates[name].append(seq.stats()["tokens_per_second"])
            outputs[name] = seq.generated
            if name == "speculative":
                taus.append(seq.stats()["mean_accepted_length"])
    report = {
        "bundle": args.bundle,
        "method": spec.bundle.draft["method"] if spec.bundle.draft else None,
        "num_draft_tokens": spec.num_draft_tokens,
        "prompt_tokens": len(ids),
        "new_tokens": args.max_new_tokens,
        "plain_tokens_per_second": statistics.median(rates["plain"]),
        "speculative_tokens_per_second": statistics.median(rates["speculative"]),
        "mean_accepted_length": float(np.mean(taus)),
        "identical_greedy_output": outputs["plain"] == outputs["speculative"],
        "costs": call_costs(spec, len(ids) + args.max_new_tokens // 2),
        "machine": machine(),
    }
    report["speedup"] = report["speculative_tokens_per_second"] / report["plain_tokens_per_second"]
    c = report["costs"]
    k = spec.num_draft_tokens
    report["ideal_speedup"] = report["mean_accepted_length"] * c["target_1_token_ms"] / (
        c["draft_round_ms"] + c[f"target_{k + 1}_tokens_ms"])
    print(json.dumps(report, indent=2))
    print(f"plain {report['plain_tokens_per_second']:.1f} tok/s, speculative {report['speculative_tokens_per_second']:.1f} "
          f"tok/s, ratio {report['speedup']:.2f}x (ideal from call costs {report['ideal_speedup']:.2f}x), "
          f"tau {report['mean_accepted_length']:.2f}")


if __name__ == "__main__":
    main()
