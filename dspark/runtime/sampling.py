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

from dataclasses import dataclass

import numpy as np

from dspark.errors import DsparkError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise DsparkError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DsparkError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise DsparkError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The warped distribution (float64) over the last axis: temperature, then top-k, then top-p."""
    x = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = np.partition(x, -params.top_k, axis=-1)[..., -params.top_k, None]
        x = np.where(x >= kth, x, -np.inf)
    x = x - x.max(axis=-1, keepdims=True)
    p = np.exp(x)
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
    return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(probs) - 1))


def accept(
    target_logits: np.ndarray,
    draft_tokens: list[int],
    draft_probs: np.ndarray | None,
    params: SamplingParams,
    rng: np.random.Generator,
) -> tuple[int, int]:
    """Judge ``draft_tokens`` against the target rows ``target_logits`` [len(draft)+1, V].

    Returns (number of accepted drafts, the next token: correction or bonus).
    """
    if params.greedy:
        choices = target_logits.argmax(axis=-1)
        accepted = 0
        while accepted < len(draft_tokens) and draft_tokens[accepted] == choices[accepted]:
            accepted += 1
        return accepted, int(choices[accepted])
    p = probabilities(target_logits, params)
    for k, token in enumerate(draft_tokens):
        q = draft_probs[k]
        ratio = p[k, token] / max(q[token], 1e-30)
        if rng.random() < min(1.0, ratio):
            continue
        residual = np.maximum(p[k] - q, 0.0)
        if residual.sum() <= 1e-12:
            residual = p[k]
        return k, sample(residual, rng.random())
    return len(draft_tokens), sample(p[len(draft_tokens)], rng.random())
