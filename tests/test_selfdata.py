"""Training data the target writes (make-data): the prompts derived from source files, the token arrays and answer
masks written from responses, and drafter anchors drawn on the answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dspark.cli import main
from dspark.train.draft import sample_anchors
from dspark.train.selfdata import (
    CODE_FORMS,
    QUESTION_FORMS,
    TOPICS,
    instruction_prompts,
    read_responses,
    write_tokens,
)

SOURCE = '''"""A module about shapes."""


def area(width, height=1):
    """Area of a rectangle.

    Longer text that is not the first sentence."""
    return width * height


def _private(x):
    """Never asked about."""
    return x


def undocumented(x):
    return x


class Box:
    """A box."""

    def volume(self, depth):
        """Volume of the box."""
        return depth

    def _hidden(self):
        """Never asked about."""

    def bare(self):
        return 0


class _Private:
    def shown(self):
        """Never asked about: the class is private."""
'''


def test_documented_public_functions_and_methods_get_every_form(tmp_path):
    (tmp_path / "shapes.py").write_text(SOURCE)
    prompts = {p.id: p for p in instruction_prompts(tmp_path)}
    code = {k: p for k, p in prompts.items() if p.domain == "code"}
    # the form a hash picks keeps the bare id (what runs that asked one form per function or method answered)
    for kind, name in (("function", "shapes.area"), ("method", "shapes.Box.volume")):
        ids = sorted(k for k in code if k.startswith(f"{kind}:"))
        assert ids[0] == f"{kind}:{name}" and {k.rsplit(":", 1)[1] for k in ids[1:]} < set(CODE_FORMS)
        assert len(ids) == len(CODE_FORMS)
    assert "module:shapes" in code
    methods = {p.text for k, p in code.items() if k.startswith("method:")}
    assert methods == {
        "Write a Python method `volume(self, depth)` that does the following: Volume of the box.",
        'Explain what this Python method does:\n\n```python\ndef volume(self, depth):\n    """Volume of the box."""\n'
        "    return depth\n```",
        "How do I use `shapes.Box.volume` in Python? Show a short example."}
    assert len(code) == 1 + 2 * len(CODE_FORMS)
    texts = [p.text for k, p in code.items() if k.startswith("function:")]
    assert sum("Write a Python function `area(width, height=1)`" in t and "Area of a rectangle." in t
               and "Longer text" not in t for t in texts) == 1
    assert sum("```python\ndef area(width, height=1):" in t for t in texts) == 1
    assert sum("How do I use `shapes.area`" in t for t in texts) == 1
    # one source file: every prompt from it on the same side of the split
    assert len({p.held_out for p in code.values()}) == 1
    chat = [p for p in prompts.values() if p.domain == "chat"]
    assert len(chat) == len(TOPICS) * len(QUESTION_FORMS)
    for topic in TOPICS[:5]:
        assert len({p.held_out for p in chat if p.id.startswith(f"topic:{topic}:")}) == 1


def test_write_tokens_arrays_masks_and_prompts(tmp_path):
    records = [
        {"id": "a", "domain": "code", "held_out": False, "prompt": "P-a", "prompt_ids": [1, 2, 3],
         "response_ids": [7, 8], "finish_reason": "stop"},
        {"id": "b", "domain": "chat", "held_out": False, "prompt": "P-b", "prompt_ids": [4],
         "response_ids": [9, 10, 11], "finish_reason": "length"},
        {"id": "c", "domain": "chat", "held_out": True, "prompt": "P-c", "prompt_ids": [5, 6],
         "response_ids": [12], "finish_reason": "stop"},
    ]
    lines = [json.dumps(r) for r in records]
    (tmp_path / "responses.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:20])  # a cut last line
    stats = write_tokens(tmp_path, log=lambda _: None)
    assert stats == {"train": {"documents": 2, "tokens": 9}, "heldout": {"documents": 1, "tokens": 3}}
    train = np.load(tmp_path / "train.npy")
    answers = np.load(tmp_path / "train_answers.npy")
    docs = np.load(tmp_path / "train_docs.npy")
    assert answers.dtype == bool and len(answers) == len(train)
    pieces = {tuple(train[s:e]): tuple(answers[s:e]) for s, e in zip(docs, list(docs[1:]) + [len(train)])}
    assert pieces == {(1, 2, 3, 7, 8): (False, False, False, True, True), (4, 9, 10, 11): (False, True, True, True)}
    assert np.load(tmp_path / "heldout.npy").tolist() == [5, 6, 12]
    assert np.load(tmp_path / "heldout_answers.npy").tolist() == [False, False, True]
    held = [json.loads(line) for line in (tmp_path / "heldout_prompts.jsonl").read_text().splitlines()]
    assert held == [{"prompt": "P-c", "domain": "chat", "id": "c"}]


def test_anchors_go_to_answers_first():
    seq_len, block, count = 40, 4, 6
    answers = np.zeros((3, seq_len + 1), dtype=bool)
    answers[0, 20:] = True  # plenty of answer positions
    answers[1, 30:33] = True  # fewer than count: the rest fill up
    plain = sample_anchors(5, 7, 3, seq_len, block, count)
    masked = sample_anchors(5, 7, 3, seq_len, block, count, answers)
    assert masked.shape == plain.shape == (3, count)
    assert (masked == sample_anchors(5, 7, 3, seq_len, block, count, answers)).all()  # a function of (seed, step)
    for row in masked.tolist():
        assert row == sorted(row) and len(set(row)) == count and 1 <= row[0] and row[-1] <= seq_len - block
    assert answers[0][masked[0] + 1].all()  # the first target of every block is an answer token
    assert set(np.flatnonzero(answers[1][np.arange(1, seq_len - block + 1) + 1]) + 1) <= set(masked[1].tolist())
    assert not answers[2].any() and len(set(masked[2].tolist())) == count  # no answers: any position


def test_make_data_answers_resumes_and_stops_on_time(tmp_path):
    """make-data on a chat model (a tiny GGUF with a template): held-out prompts first, then training ones up to
    --limit; a rerun answers only what is missing, also after a run killed mid-line; --minutes 0 answers nothing
    and rewrites the arrays; a negative count is refused with exit 2."""
    pytest.importorskip("gguf")
    from test_gguf import CASES, OPTIONS, write_gguf

    from dspark.export.bundle import ExportOptions, export_bundle

    arch, qtypes, tied, opts, _ = CASES["llama"]
    export_bundle(write_gguf(tmp_path / "tiny.gguf", arch, qtypes, tied, **opts), tmp_path / "bundle",
                  options=ExportOptions(**{**OPTIONS, "max_context": 1024}), progress=False)  # byte-level prompts
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "shapes.py").write_text(SOURCE)
    out = tmp_path / "data"

    def make_data(*options):
        return CliRunner().invoke(main, ["make-data", str(tmp_path / "bundle"), "--output", str(out), "--stdlib",
                                         str(tmp_path / "lib"), "--max-new-tokens", "3", "--no-progress", *options])

    def answered():  # in the order written; a line that is not a record is skipped
        return list(read_responses(out))

    result = make_data("--held-out", "2", "--limit", "2")
    assert result.exit_code == 0, result.output
    first = answered()
    assert len(first) == 4 and json.loads((out / "stats.json").read_text())["heldout"]["documents"] == 2
    with (out / "responses.jsonl").open("a") as f:  # a run killed while writing its next record
        f.write('{"id": "cut')
    result = make_data("--held-out", "2", "--limit", "3")
    assert result.exit_code == 0, result.output
    assert answered()[:4] == first and len(answered()) == 5  # the cut line is skipped, the new record whole
    assert json.loads((out / "stats.json").read_text())["train"]["documents"] == 3
    (out / "stats.json").unlink()
    result = make_data("--held-out", "2", "--limit", "9", "--minutes", "0")
    assert result.exit_code == 0, result.output
    assert len(answered()) == 5 and json.loads((out / "stats.json").read_text())["train"]["documents"] == 3
    short = tmp_path / "short"  # a bundle too short for some prompts: they are skipped, the others answered
    export_bundle(tmp_path / "tiny.gguf", short, options=ExportOptions(**{**OPTIONS, "max_context": 60}),
                  progress=False)
    result = CliRunner().invoke(main, ["make-data", str(short), "--output", str(tmp_path / "short-data"), "--stdlib",
                                       str(tmp_path / "lib"), "--max-new-tokens", "2", "--held-out", "3", "--limit",
                                       "40", "--no-progress"])
    assert result.exit_code == 0, result.output
    skipped = int(result.output.split("skipped ")[1].split()[0])
    assert 0 < skipped < 43 and len(read_responses(tmp_path / "short-data")) == 43 - skipped
    for option in ("--limit", "--held-out", "--minutes", "--threads"):
        result = make_data(option, "-1")
        assert result.exit_code == 2 and option in result.output, result.output
    # the torch backend (the path a GPU takes, here on the CPU) writes the same greedy answers
    torch_out = tmp_path / "torch-data"
    result = CliRunner().invoke(main, ["make-data", str(tmp_path / "bundle"), "--output", str(torch_out), "--stdlib",
                                       str(tmp_path / "lib"), "--max-new-tokens", "3", "--no-progress",
                                       "--held-out", "2", "--limit", "3", "--backend", "torch"])
    assert result.exit_code == 0, result.output
    assert read_responses(torch_out) == read_responses(out)
