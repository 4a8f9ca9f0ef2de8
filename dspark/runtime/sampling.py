"""Token distributions, sampling and the acceptance rule.

Acceptance here is the only place tokens are accepted. With temperature 0 a draft token is accepted while it
equals the target's argmax. Otherwise it is standard speculative (rejection) sampling: accept d_k with
probability min(1, p_k(d_k) / q_k(d_k)); on the first rejection sample from norm(max(p_k - q_k, 0)); when
all drafts pass, sample the bonus token from the last row. ``p`` is the target distribution after
temperature, top-k and top-p; ``q`` is exactly the distribution the draft token was drawn from, so the
output follows ``p`` whatever the draft proposes.

All sampling is inverse-CDF on one uniform per draw, so a run is reproducible from a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dspark.errors import DsparkError


# Below this temperature sampling is greedy (vLLM's cut-off too): dividing logits by a smaller number only
# sharpens an already one-hot law, and near the bottom of float64 it overflows into inf - inf = NaN.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Temperature, top-p and top-k, checked here once for every caller (CLI, Python API, server).

    A ``DsparkError`` names the offending field in ``param``, so the server can answer a 400 that names it.
    A temperature under ``GREEDY_TEMPERATURE`` is stored as 0: greedy, bit for bit.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        temperature, top_p, top_k = self.temperature, self.top_p, self.top_k
        if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise DsparkError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}",
                              param="temperature")
        if not _is_real(top_p) or not 0 < top_p <= 1:  # NaN fails the comparison too
            raise DsparkError(f"top-p must be a number in (0, 1], got {top_p!r}", param="top_p")
        if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
            raise DsparkError(f"top-k must be an integer >= 0 (0 disables it), got {top_k!r}", param="top_k")
        object.__setattr__(self, "temperature", 0.0 if temperature < GREEDY_TEMPERATURE else float(temperature))
        object.__setattr__(self, "top_p", float(top_p))
        object.__setattr__(self, "top_k", int(top_k))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The warped distribution (float64) over the last axis: temperature, then top-k, then top-p.

    Always a distribution (finite, sums to 1), whatever the logits: NaN logits count as -inf, +inf logits
    share all the mass, a row of -inf is uniform. The maximum is subtracted before dividing by the
    temperature, so a small temperature cannot overflow into inf - inf.
    """
    x = np.asarray(logits, dtype=np.float64)
    temperature = max(params.temperature, GREEDY_TEMPERATURE)
    top = x.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore", invalid="ignore"):  # a huge gap over a tiny temperature is -inf, as it should be
        if np.isfinite(top).all():
            # the common case in one pass: a finite maximum means no NaN (it would be the maximum) and no +inf
            x = (x - top) / temperature
        else:
            x = np.where(np.isnan(x), -np.inf, x)
            top = x.max(axis=-1, keepdims=True)
            # rows whose maximum is +inf keep only their +inf entries; rows of -inf are flat
            x = np.where(np.isposinf(top), np.where(np.isposinf(x), 0.0, -np.inf),
                         np.where(np.isneginf(top), 0.0, (x - top) / temperature))
    if params.top_k and params.top_k < x.shape[-1]:
        kth = np.partition(x, -params.top_k, axis=-1)[..., -params.top_k, None]
        x = np.where(x >= kth, x, -np.inf)
    p = np.exp(x - x.max(axis=-1, keepdims=True))  # the largest entry is exp(0) = 1: the sum is >= 1
    p /= p.sum(axis=-1, keepdims=True)
    if params.top_p < 1:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
        keep_sorted = np.cumsum(sorted_p, axis=-1) - sorted_p < params.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def sample(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from a 1-D distribution with uniform ``u`` in [0, 1)."""
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    # u * total can round up to total: fall back to the last token that has mass, never to one without
    return index if index < len(probs) and probs[index] > 0 else int(np.flatnonzero(probs)[-1])


def accept(
    target_logits: np.ndarray,
    draft_tokens: list[int],
    draft_probs: np.ndarray | None,
    params: SamplingParams,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """Judge ``draft_tokens`` against the target rows ``target_logits`` [len(draft)+1, V]. ``draft_probs``
    [len(draft), V] is the law each draft token was drawn from; None when each was proposed with certainty (a
    point mass: prompt lookup), which needs no vocabulary-sized array per draft.

    Returns (number of accepted drafts, the next token: correction or bonus).
    """
    if params.greedy:
        choices = target_logits.argmax(axis=-1)
        accepted = 0
        while accepted < len(draft_tokens) and draft_tokens[accepted] == choices[accepted]:
            accepted += 1
        return accepted, int(choices[accepted])
    # row by row, as far as the drafts survive: a round reads about τ of its K + 1 vocabulary-sized rows
    for k, token in enumerate(draft_tokens):
        p = probabilities(target_logits[k], params)
        if draft_probs is None:  # point mass on the token: accepted with probability p(token), else p without it
            if rng.random() < p[token]:
                continue
            residual = p.copy()
            residual[token] = 0.0
        else:
            # a draft law with NaN or negative entries (a broken drafter) must not turn into "accept everything"
            q_token = float(draft_probs[k][token])
            q_token = q_token if math.isfinite(q_token) and q_token > 0 else 0.0
            if rng.random() < min(1.0, p[token] / max(q_token, 1e-30)):
                continue
            q = np.asarray(draft_probs[k], dtype=np.float64)
            residual = np.maximum(p - np.where(np.isfinite(q) & (q > 0), q, 0.0), 0.0)
        if residual.sum() <= 1e-12:
            residual = p
        return k, sample(residual, rng.random())
    return len(draft_tokens), sample(probabilities(target_logits[len(draft_tokens)], params), rng.random())
