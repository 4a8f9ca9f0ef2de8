"""The demo corpus: Python standard-library sources of the running interpreter, and its byte-level BPE tokenizer.

Files are split into train and held-out by a hash of their path relative to the stdlib folder, so the split is
the same on every machine with the same Python version and never cuts a file in two. Documents are separated by
the ``<|endoftext|>`` token (id 0, also bos and pad); ``<|mask|>`` (id 1) is reserved for DSpark drafters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EOS = "<|endoftext|>"
MASK = "<|mask|>"
SPECIAL_TOKENS = [EOS, MASK]  # ids 0 and 1, in that order
EOS_ID = 0
MASK_ID = 1

# Which stdlib files are corpus. A file is skipped when:
#  * any folder on its relative path is one of SKIP_DIRS: installed packages (site-packages), codec tables
#    (encodings/), test suites and their data (test/, tests/, idle_test/, lib2to3's test data under tests/),
#    generated documentation strings (pydoc_data/), build-config folders;
#  * its name matches SKIP_FILES: generated build-configuration dictionaries (_sysconfigdata_*);
#  * it is mostly literals: more than LITERAL_FRACTION of its non-blank, non-comment lines consist only of
#    number/string literals and punctuation (generated tables such as stringprep-like data or keyword lists),
#    or a single line is longer than MAX_LINE characters (embedded blobs);
#  * it is not valid UTF-8 or is empty.
# idlelib itself is ordinary application code and stays; only its idle_test/ folder goes.
SKIP_DIRS = {"site-packages", "dist-packages", "encodings", "test", "tests", "idle_test", "pydoc_data",
             "__pycache__", "lib-dynload", "turtledemo"}
SKIP_FILES = re.compile(r"^_sysconfigdata_.*\.py$")
LITERAL_FRACTION = 0.5
MAX_LINE = 2000
# string literals (one line) and numbers; what is left of a literal-only line is punctuation and spaces
_LITERALS = re.compile(r"""[rRbBuUfF]{0,2}(?:'[^'\n]*'|"[^"\n]*")|[-+]?\b(?:0[xXoObB][0-9a-fA-F_]+|\d[\d_.eEjJ+-]*)""")
_PUNCTUATION_ONLY = re.compile(r"^[\s,:()\[\]{}\\]*$")
HELD_OUT_FRACTION = 0.03


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def held_out(relpath: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Deterministic by-file split: the first 8 bytes of sha256(relative path) as a fraction of 2**64."""
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def literal_fraction(text: str) -> float:
    """Fraction of code lines made only of literals (lines of bare brackets and commas are not counted)."""
    literal = code = 0
    for ln in text.splitlines():
        if not ln.strip() or ln.lstrip().startswith("#") or _PUNCTUATION_ONLY.match(ln):
            continue
        code += 1
        literal += bool(_PUNCTUATION_ONLY.match(_LITERALS.sub("", ln)))
    return literal / code if code else 1.0


def keep_file(relpath: str, text: str) -> bool:
    parts = Path(relpath).parts
    if any(p in SKIP_DIRS or p.startswith("config-") for p in parts[:-1]):
        return False
    if SKIP_FILES.match(parts[-1]):
        return False
    if not text.strip():
        return False
    if max(len(ln) for ln in text.splitlines()) > MAX_LINE:
        return False
    return literal_fraction(text) <= LITERAL_FRACTION


@dataclass
class Corpus:
    root: Path
    train: list[str]  # relative paths, sorted
    held_out: list[str]

    def read(self, relpath: str) -> str:
        return (self.root / relpath).read_text(encoding="utf-8")


def collect(root: str | Path | None = None, fraction: float = HELD_OUT_FRACTION, limit: int | None = None) -> Corpus:
    """All kept ``.py`` files under ``root`` (default: this interpreter's stdlib), split by file."""
    root = Path(root) if root is not None else stdlib_dir()
    paths = []
    for folder, dirs, files in os.walk(root):
        # prune skipped folders before walking into them: site-packages alone can be huge
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        paths += [Path(folder) / f for f in files if f.endswith(".py")]
    train, held = [], []
    for path in sorted(paths):
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not keep_file(rel, text):
            continue
        (held if held_out(rel, fraction) else train).append(rel)
        if limit is not None and len(train) + len(held) >= limit:
            break
    return Corpus(root, train, held)


def write_text(corpus: Corpus, out: str | Path) -> dict:
    """``train.txt`` and ``heldout.txt``: the documents joined with ``<|endoftext|>``, plus ``files.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for name, files in (("train", corpus.train), ("heldout", corpus.held_out)):
        text = EOS.join(corpus.read(f) for f in files)
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        stats[name] = {"files": len(files), "bytes": len(text.encode())}
    (out / "files.json").write_text(
        json.dumps({"root": str(corpus.root), "train": corpus.train, "heldout": corpus.held_out}, indent=1) + "\n"
    )
    return stats


def train_tokenizer(texts, vocab_size: int = 8192, min_frequency: int = 2):
    """A byte-level BPE (GPT-2 style pre-tokenization, no prefix space) that round-trips any text exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOS) == EOS_ID and tok.token_to_id(MASK) == MASK_ID
    return tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_tokenizer(tok, out: str | Path, model_max_length: int = 2048) -> None:
    from tokenizers import processors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # encode() starts a prompt with <|endoftext|>, as every training document starts (encode_documents)
    tok.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, EOS_ID)])
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS, "mask_token": MASK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def load_tokenizer(folder: str | Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


def encode_documents(tok, texts: list[str]) -> np.ndarray:
    """Flat uint16 ids: ``<|endoftext|>`` before every document (so each starts like a fresh sequence)."""
    if tok.get_vocab_size() > 65536:
        raise ValueError("uint16 token arrays need a vocabulary of at most 65536")
    parts = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        parts.append(np.array([EOS_ID] + enc.ids, dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def build(out: str | Path, root: str | Path | None = None, vocab_size: int = 8192,
          fraction: float = HELD_OUT_FRACTION, limit: int | None = None, log=print) -> dict:
    """Corpus text, tokenizer and ``train.npy`` / ``heldout.npy`` in ``out``; returns statistics."""
    out = Path(out)
    corpus = collect(root, fraction, limit)
    stats = write_text(corpus, out)
    log(f"corpus: {stats['train']['files']} train files ({stats['train']['bytes'] / 1e6:.2f} MB), "
        f"{stats['heldout']['files']} held-out files ({stats['heldout']['bytes'] / 1e6:.2f} MB)")
    train_texts = [corpus.read(f) for f in corpus.train]
    held_texts = [corpus.read(f) for f in corpus.held_out]
    tok = train_tokenizer(train_texts, vocab_size)
    save_tokenizer(tok, out)
    for name, texts in (("train", train_texts), ("heldout", held_texts)):
        ids = encode_documents(tok, texts)
        np.save(out / f"{name}.npy", ids)
        stats[name]["tokens"] = int(ids.size)
    stats["vocab_size"] = tok.get_vocab_size()
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"tokens: {stats['train']['tokens']} train, {stats['heldout']['tokens']} held-out, "
        f"vocab {stats['vocab_size']}")
    return stats
