"""Lookup store: text the target wrote before, as a source of drafts when a request has not repeated itself yet.

Prompt lookup (``proposers.LookupProposer``) first searches a request's own tokens; a bundle may also carry
``lookup_store.npy``, token ids of earlier answers of the same target (``dspark make-data`` writes them), searched
when the request's own tokens have no match (retrieval-based drafting, as REST does). A small model's greedy
answers reuse their phrasing across prompts, so a continuation seen after the same few tokens elsewhere is often
what it writes next. Drafts from the store are verified like any other, so output stays exact; the store only
decides how often they are right.

The index is one sorted array of n-gram hashes per match length, built when the store is opened (about a second
for 1.5 M tokens). A hash hit is checked against the tokens themselves, so a collision never proposes anything.
"""

from __future__ import annotations

import io
import weakref
from pathlib import Path

import numpy as np

from dspark.bundle import Bundle, file_identity
from dspark.errors import DsparkError

STORE_FILE = "lookup_store.npy"
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier: mixes token ids into 64-bit n-gram hashes (wrapping)


def _hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """Hash of every n-gram of ``tokens``: entry i covers tokens[i : i + n]."""
    h = np.zeros(len(tokens) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(n):
            h = h * _MIX + tokens[i : len(tokens) - n + 1 + i].astype(np.uint64) + np.uint64(1)
    return h


class TokenStore:
    """Continuations of n-grams (``min_match`` .. ``max_match`` tokens) in a fixed token array."""

    CANDIDATES = 64  # occurrences of a suffix that vote on its continuation

    def __init__(self, tokens: np.ndarray, min_match: int, max_match: int):
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        self.index = {}
        for n in range(min_match, max_match + 1):
            if len(self.tokens) > n:
                h = _hashes(self.tokens[:-1], n)  # n-grams with at least one token after them
                order = np.argsort(h, kind="stable")
                self.index[n] = (h[order], order)

    def continuation(self, history: list[int], cap: int) -> list[int]:
        """Up to ``cap`` tokens that most often followed the longest suffix of ``history`` found in the store,
        chosen token by token by majority over its occurrences (the latest ``CANDIDATES``); [] when none."""
        for n in sorted(self.index, reverse=True):
            if len(history) < n:
                continue
            suffix = np.asarray(history[-n:], dtype=np.int64)
            keys, order = self.index[n]
            key = _hashes(suffix, n)[0]
            lo, hi = np.searchsorted(keys, key), np.searchsorted(keys, key, side="right")
            starts = order[lo:hi][-self.CANDIDATES :]
            grams = self.tokens[starts[:, None] + np.arange(n)]
            starts = starts[(grams == suffix).all(axis=1)]  # drop hash collisions
            if not len(starts):
                continue
            after = starts + n
            width = min(cap, int((len(self.tokens) - after).min()))
            following = self.tokens[after[:, None] + np.arange(width)]
            chosen = []
            for j in range(width):  # majority at each position among the occurrences that agree so far
                values, counts = np.unique(following[:, j], return_counts=True)
                best = values[counts.argmax()]
                chosen.append(int(best))
                following = following[following[:, j] == best]
            return chosen
        return []


def read_store_source(source: Path, vocab_size: int) -> np.ndarray:
    """Token ids from ``source``: a ``dspark make-data`` folder (its train.npy) or a .npy file of token ids."""
    path = source / "train.npy" if source.is_dir() else source
    if not path.is_file():
        raise DsparkError(f"{source}: no token file; give a 'dspark make-data' folder (with train.npy) or a .npy "
                          "file of token ids")
    try:
        tokens = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DsparkError(f"{path} is not a NumPy .npy file ({e}); give make-data's train.npy or np.save(ids)") from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer) or len(tokens) < 2:
        raise DsparkError(f"{path}: need a 1-D array of at least 2 integer token ids, got shape {tokens.shape} "
                          f"of {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise DsparkError(f"{path}: token ids must lie in [0, {vocab_size}) for this bundle's target, found "
                          f"{int(tokens.min())}..{int(tokens.max())}; was it written with another tokenizer?")
    return tokens


def add_store(bundle_dir: str | Path, source: str | Path) -> dict:
    """Put the tokens of ``source`` into the bundle as its lookup store (replacing any); returns a summary."""
    bundle = Bundle.open(bundle_dir)
    vocab = bundle.target.config.vocab_size
    tokens = read_store_source(Path(source), vocab)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32  # half the file for vocabularies that fit
    bundle.add_file(STORE_FILE, _npy_bytes(tokens.astype(dtype)))
    return {"tokens": int(len(tokens)), "bytes": bundle.files[STORE_FILE].bytes, "file": str(bundle.file(STORE_FILE))}


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


# Indexed stores alive in this process, by file and match lengths: Generators of one bundle (dspark bench's
# configurations, a server's workers) share one index instead of building it each (about 0.5 s and 75 MB for
# 1.5 M tokens). A TokenStore is read-only after construction.
_open_stores: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def load_store(bundle: Bundle, min_match: int, max_match: int) -> TokenStore | None:
    """The bundle's lookup store, indexed for matches of ``min_match`` .. ``max_match`` tokens (None: it has none)."""
    if STORE_FILE not in bundle.files:
        return None
    path = bundle.file(STORE_FILE)
    key = (*file_identity(path), min_match, max_match)
    store = _open_stores.get(key)
    if store is None:
        store = _open_stores[key] = TokenStore(np.load(path, allow_pickle=False), min_match, max_match)
    return store
