"""Held-out prompts for the demo family's model cards: the starts of top-level definitions in the held-out files.

    python examples/heldout_prompts.py runs/data > runs/heldout_prompts.jsonl

The held-out files are the standard-library modules the corpus split kept out of training (a hash of the path).
Each prompt is the text of a held-out file up to and including a line that begins a top-level `def` or `class`,
keeping the last 40 lines; at most --per-file prompts per file, in file order, so the set is deterministic.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="folder written by 'dspark train-tokenizer'")
    parser.add_argument("--per-file", type=int, default=2)
    parser.add_argument("--limit", type=int, default=24)
    args = parser.parse_args()
    documents = (args.data / "heldout.txt").read_text().split("<|endoftext|>")
    prompts = []
    for doc in documents:
        lines = doc.splitlines(keepends=True)
        starts = [i for i, line in enumerate(lines) if line.startswith(("def ", "class "))][1 : 1 + args.per_file]
        for i in starts:
            prompts.append("".join(lines[max(0, i - 39) : i + 1]))
    for text in prompts[: args.limit]:
        print(json.dumps({"prompt": text, "domain": "code-heldout"}))


if __name__ == "__main__":
    main()
