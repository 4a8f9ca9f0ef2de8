"""Plain against speculative decoding of one bundle on one prompt, one request at a time: a thin wrapper over
``dspark bench`` (``dspark.bench.run_bench``), which has the full set of options (prompt sets, concurrency,
schedulers, peers, plots).

    python bench/spec_vs_plain.py BUNDLE [--prompt TEXT] [--max-new-tokens 64] [--repeats 5] [--output DIR]

is ``dspark bench BUNDLE --concurrency 1`` on that single prompt: it prints the table (tokens/s, speed-up, the
ideal speed-up from measured call costs, τ, acceptance by position) and writes the report to --output.
"""

from __future__ import annotations

import argparse

from dspark.bench import run_bench, table, write_report
from dspark.prompts import Prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--prompt", default="def ", help="prompt text (tokenized with the bundle's tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--num-draft-tokens", type=int)
    parser.add_argument("--output", default="bench-report", help="folder for report.json, report.md and plots")
    args = parser.parse_args()
    report = run_bench(args.bundle, [Prompt(args.prompt)], concurrency=[1], max_new_tokens=args.max_new_tokens,
                       repeats=args.repeats, threads=args.threads, num_draft_tokens=args.num_draft_tokens)
    files = write_report(report, args.output)
    print(table(report))
    print(f"report: {files['json']}")


if __name__ == "__main__":
    main()
