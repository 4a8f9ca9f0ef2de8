"""``dspark calibrate``: Sequential Temperature Scaling of the confidence head (paper §3.2.1, spec §6.3).

The head predicts c_k, the chance that draft k survives given drafts 1..k-1 did; what a scheduler uses is the
prefix survival prod_{i<=k} c_i. STS fits one temperature t_k per position, left to right: with t_1..t_{k-1}
fixed, t_k minimises the expected calibration error (20 equal-width bins) of prod_{i<=k} sigmoid(z_i / t_i)
against the observed survival 1[accepted >= k], over rounds that verified position k. Scaling a logit keeps
its order, so the ranking (AUC) of each position is unchanged. Labels come from the full-block loop at the
deployment temperature, so calibrate per sampling temperature.
"""

from __future__ import annotations

import json

import numpy as np
from tqdm import tqdm

from dspark.errors import DsparkError
from dspark.runtime.generate import Generator, Request
from dspark.runtime.sampling import SamplingParams, sigmoid
from dspark.runtime.schedulers import CALIBRATION_FILE
GRID = np.exp(np.linspace(np.log(0.25), np.log(8.0), 97))
BINS = 20


def ece(pred: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    if len(pred) == 0:
        return float("nan")
    which = np.minimum((pred * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(pred[mask].mean() - labels[mask].mean())
    return total / len(pred)


def fit_sts(logits: np.ndarray, accepted: np.ndarray) -> dict:
    """logits [rounds, B] raw confidence logits of full-block rounds; accepted [rounds] drafts accepted."""
    rounds, draft_length = logits.shape
    temps = np.ones(draft_length)
    before, after = [], []
    survival_raw = np.ones(rounds)
    survival_fit = np.ones(rounds)
    for k in range(draft_length):
        labels = (accepted >= k + 1).astype(np.float64)
        raw = survival_raw * sigmoid(logits[:, k])
        before.append(ece(raw, labels))
        scores = [ece(survival_fit * sigmoid(logits[:, k] / t), labels) for t in GRID]
        temps[k] = GRID[int(np.argmin(scores))]
        survival_raw = raw
        survival_fit = survival_fit * sigmoid(logits[:, k] / temps[k])
        after.append(ece(survival_fit, labels))
    return {"sts_temperatures": temps.tolist(), "ece_before": before, "ece_after": after, "ece_bins": BINS,
            "rounds": int(rounds)}


def calibrate_bundle(bundle_dir, prompts: list[str], temperature: float = 0.0, max_new_tokens: int = 64,
                     threads: int = 0, seed: int = 0, progress: bool = True, backend: str = "ort",
                     device: str = "cpu") -> dict:
    generator = Generator(bundle_dir, backend=backend, threads=threads, device=device)
    draft = generator.bundle.draft
    if not draft or not draft.confidence_head:
        raise DsparkError("this bundle's drafter has no confidence head; calibration needs a DSpark drafter")
    draft_length = generator.draft_length
    logits, accepted = [], []
    requests = [Request(generator.tokenizer.encode(p), max_new_tokens, SamplingParams(temperature), seed=seed + i,
                        ignore_eos=True) for i, p in enumerate(prompts)]
    for req in tqdm(requests, desc="calibrate", disable=not progress, unit="prompt"):
        seq = generator.generate([req], trace=True)[0]
        for row in seq.trace:
            if row["verify_length"] == draft_length:
                c = np.clip(np.asarray(row["confidence"], dtype=np.float64), 1e-12, 1 - 1e-12)
                logits.append(np.log(c / (1 - c)))
                accepted.append(row["accepted"])
    if not logits:
        raise DsparkError("no full-block rounds were observed; give more prompts or a larger --max-new-tokens")
    report = fit_sts(np.stack(logits), np.asarray(accepted))
    report.update(temperature_T=temperature, prompts=len(prompts), draft_length=draft_length)
    generator.bundle.add_file(CALIBRATION_FILE, json.dumps(report, indent=2) + "\n")
    return report
