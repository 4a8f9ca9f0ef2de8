"""The frozen target's features of a training set, computed once and read back by every epoch.

Training a block drafter needs, at every step, the target's tapped layer outputs (the drafter's context) and its
final hidden states (its logits, for the distillation loss). On a CPU the target's forward is most of a step, and
it is the same every epoch, so ``dspark train-draft --feature-cache`` computes it once per training set: each
document of ``train.npy`` (``train_docs.npy`` gives their starts; without it, fixed chunks) is run alone from its
start, as decoding runs it, and the rows are stored as float16 in ``features.npy`` [tokens, taps x d] and
``hidden.npy`` [tokens, d], with the log-normaliser of the target's logits at each token in ``lse.npy`` (float32:
the loss then needs the target's logits over the draft vocabulary only; a draft LM's cache has no taps and no
``features.npy``), under
``DATA/features-<target digest>-<taps>/``, with ``source.json`` naming the token data they were computed from (a
hash of ``train.npy`` and the document starts: data regenerated since, even to the same length, is recomputed).
Building resumes where it stopped (``progress.json`` counts the batches written into the ``.partial`` arrays).
Data that grew (``dspark make-data`` resumed) keeps the rows of documents the cache already holds: ``source.json``
lists each span's digest, and a rebuild copies those spans' rows from the previous arrays (kept as
``*.previous.npy`` until the new cache is complete) and runs the target on the new documents only. A draft LM's
cache (no taps) is a block drafter's without ``features.npy``, so a complete block-drafter cache of the same data
serves it as it is: training both drafters on one data folder runs the target over it once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dspark.graphs.decoder import DecoderLM
from dspark.train.target import autocast, model_device, target_pass

CHUNK = 1024  # document length assumed when the data has no document starts
BATCH_TOKENS = 8192  # padded tokens per target forward


@dataclass
class FeatureCache:
    hidden: np.ndarray  # [tokens, d] float16, after the final norm
    lse: np.ndarray  # [tokens] float32: log-sum-exp of the target's logits (the normaliser of its law)
    features: np.ndarray | None = None  # [tokens, taps x d] float16 (None without taps: a draft LM's cache)

    def windows(self, starts, length: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Hidden states [b, length, d], features [b, length, taps x d] (float32, ``target_pass``'s order; None
        without taps) and log-normalisers [b, length] of the windows at ``starts``."""
        window = lambda a: torch.from_numpy(np.stack([a[s:s + length] for s in starts]).astype(np.float32))  # noqa: E731
        return window(self.hidden), None if self.features is None else window(self.features), window(self.lse)


def document_spans(data: Path, total: int) -> list[tuple[int, int]]:
    starts_path = data / "train_docs.npy"
    starts = np.load(starts_path).tolist() if starts_path.is_file() else list(range(0, total, CHUNK))
    ends = starts[1:] + [total]
    spans = []
    for s, e in zip(starts, ends):  # a very long document is cut into chunks
        spans += [(a, min(a + CHUNK, e)) for a in range(s, e, CHUNK)]
    return spans


def span_digests(tokens: np.ndarray, spans: list[tuple[int, int]]) -> list[str]:
    """A digest of each span's tokens: a span's features depend on its tokens alone (each runs from its start)."""
    return [hashlib.sha256(np.asarray(tokens[s:e], dtype=np.int64).tobytes()).hexdigest()[:16] for s, e in spans]


def _batches(spans: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Documents of similar length together (little padding), at most BATCH_TOKENS padded tokens a batch."""
    ordered = sorted(spans, key=lambda se: se[1] - se[0])
    batches, current = [], []
    for span in ordered:  # ascending: the newest span is the longest of its batch
        if current and (span[1] - span[0]) * (len(current) + 1) > BATCH_TOKENS:
            batches.append(current)
            current = []
        current.append(span)
    return batches + ([current] if current else [])


def _copy_previous(arrays: dict[str, np.ndarray], spans: list[tuple[int, int]], digests: list[str],
                   previous: dict[str, Path], previous_source: Path) -> list[tuple[int, int]]:
    """Copy the rows of every span the previous cache holds into ``arrays``; returns the spans still to compute."""
    if not previous_source.is_file() or not all(p.is_file() for p in previous.values()):
        return spans
    held = {h: (s, e) for s, e, h in json.loads(previous_source.read_text()).get("spans", [])}
    old = {name: np.load(p, mmap_mode="r") for name, p in previous.items()}
    missing = []
    for (s, e), h in zip(spans, digests):
        if h in held:
            a, b = held[h]
            for name, rows in old.items():
                arrays[name][s:e] = rows[a:b]
        else:
            missing.append((s, e))
    return missing


def _complete(folder: Path, paths: dict[str, Path], source: dict) -> bool:
    """Whether ``folder`` holds a finished cache of ``paths`` built from the token data ``source`` names."""
    source_path = folder / "source.json"
    if not (source_path.is_file() and all(p.is_file() for p in paths.values())):
        return False
    return json.loads(source_path.read_text()).get("tokens") == source["tokens"]


def feature_cache(target: DecoderLM, taps: tuple[int, ...], tokens: np.ndarray, data: Path, digest: str,
                  progress: bool = True, log=print) -> FeatureCache:
    """The cache for ``target`` (``digest`` names its weights) and ``taps`` over ``data``'s train tokens, built
    now if it is missing or incomplete."""
    from tqdm import tqdm

    folder = data / f"features-{digest[:16]}-{'_'.join(map(str, taps)) or 'final'}"
    paths = {name: folder / f"{name}.npy" for name in ("features", "hidden", "lse")[0 if taps else 1:]}
    previous = {name: folder / f"{name}.previous.npy" for name in paths}
    spans = document_spans(data, len(tokens))
    source = {"tokens": hashlib.sha256(np.ascontiguousarray(tokens).tobytes()
                                       + np.asarray(spans, dtype=np.int64).tobytes()).hexdigest()[:16]}
    source_path, previous_source = folder / "source.json", folder / "source.previous.json"
    if _complete(folder, paths, source):
        return FeatureCache(**{name: np.load(p, mmap_mode="r") for name, p in paths.items()})
    if not taps:  # a block drafter's cache of the same data holds what a draft LM reads: no second target pass
        for other in sorted(data.glob(f"features-{digest[:16]}-*")):
            held = {name: other / f"{name}.npy" for name in paths}
            if other != folder and _complete(other, held, source):
                log(f"target features: the final hidden states of {other}")
                return FeatureCache(**{name: np.load(p, mmap_mode="r") for name, p in held.items()})
    if all(p.is_file() for p in paths.values()):
        log(f"{folder}: built for other token data; rebuilding (documents it holds are copied, not recomputed)")
        for name, p in paths.items():  # kept until the new cache is complete, so an interrupted rebuild still reuses
            p.replace(previous[name])
        if source_path.is_file():
            source_path.replace(previous_source)
    folder.mkdir(parents=True, exist_ok=True)
    d = target.config.hidden_size
    shapes = {"features": (len(tokens), len(taps) * d), "hidden": (len(tokens), d), "lse": (len(tokens),)}
    shapes = {name: shapes[name] for name in paths}
    dtypes = {"features": np.float16, "hidden": np.float16, "lse": np.float32}
    partial = {name: folder / f"{name}.partial.npy" for name in paths}
    marker = folder / "progress.json"
    marked = json.loads(marker.read_text()) if marker.is_file() else {}
    # a partial build resumes only for the same data
    done = marked["batches"] if marked.get("source") == source and all(p.is_file() for p in partial.values()) else 0
    arrays = {name: (np.load(partial[name], mmap_mode="r+") if done else
                     np.lib.format.open_memmap(partial[name], mode="w+", dtype=dtypes[name], shape=shapes[name]))
              for name in paths}
    digests = span_digests(tokens, spans)
    missing = _copy_previous(arrays, spans, digests, previous, previous_source)
    batches = _batches(missing)
    log(f"target features: {sum(e - s for s, e in missing)} of {len(tokens)} tokens in {len(batches)} batches "
        f"into {folder}" + (f" (resuming at batch {done})" if done else ""))
    device = model_device(target)
    with torch.no_grad(), autocast(device):
        for i in tqdm(range(done, len(batches)), initial=done, total=len(batches), desc="target features",
                      unit="batch", disable=not progress):
            batch = batches[i]
            width = max(e - s for s, e in batch)
            ids = np.zeros((len(batch), width), dtype=np.int64)  # right-padded: causal, so padding changes nothing
            for r, (s, e) in enumerate(batch):
                ids[r, : e - s] = tokens[s:e]
            hidden, features = target_pass(target, torch.from_numpy(ids).to(device), taps)
            for r, (s, e) in enumerate(batch):
                if taps:
                    arrays["features"][s:e] = features[r, : e - s].float().cpu().numpy()
                arrays["hidden"][s:e] = hidden[r, : e - s].float().cpu().numpy()
                lse = torch.logsumexp(target.lm_head(hidden[r, : e - s]).float(), -1)
                arrays["lse"][s:e] = lse.cpu().numpy()
            if i % 16 == 15 or i + 1 == len(batches):
                for a in arrays.values():
                    a.flush()
                marker.write_text(json.dumps({"batches": i + 1, "source": source}))
    for a in arrays.values():
        a.flush()
    for name in paths:
        del arrays[name]
        partial[name].rename(paths[name])
    source_path.write_text(json.dumps({**source, "spans": [[s, e, h] for (s, e), h in zip(spans, digests)]}))
    marker.unlink(missing_ok=True)
    for p in [*previous.values(), previous_source]:
        p.unlink(missing_ok=True)
    return FeatureCache(**{name: np.load(p, mmap_mode="r") for name, p in paths.items()})
