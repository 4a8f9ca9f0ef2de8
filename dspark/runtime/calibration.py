"""``dspark calibrate``: Sequential Temperature Scaling of draft confidences (paper §3.2.1, spec §6.3), with a bias.

A confidence c_k (a DSpark drafter's confidence head; a draft LM's probability of its likeliest token) estimates
the chance that draft k survives given drafts 1..k-1 did; what a scheduler uses is the prefix survival
prod_{i<=k} c_i. STS fits per position, left to right: with positions 1..k-1 fixed, position k's temperature t_k
and bias b_k, c_k = sigmoid(z_k / t_k + b_k), minimise the expected calibration error (20 equal-width bins) of
prod_{i<=k} c_i against the observed survival 1[accepted >= k], over rounds that verified position k. The paper
fits a temperature alone, which suits a confidence head trained to predict acceptance. A draft LM's likeliest-token
probability is no such estimate: it understates greedy acceptance at every level (SmolLM2's draft LM: mean
confidence 0.51 at position 1 against 63% accepted), and a temperature, which keeps sigmoid's midpoint at 0.5,
cannot move it (ECE 0.12 before and after); the bias can (0.04). Scaling and shifting a logit keeps its order,
so the ranking (AUC) of each position is unchanged. Labels come from the loop with the fixed scheduler at the
deployment temperature, so calibrate per sampling temperature. A draft LM stops drafting a row once its raw
survival falls below a bar, so its later positions are fitted on the rounds confident enough to reach them,
which are the rounds that will reach them when deployed.
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
BIASES = np.round(np.linspace(-3.0, 3.0, 61), 1)  # 0 exactly among them
BINS = 20


def ece(pred: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """sum over bins of (bin size) * |mean prediction - mean label|, over the number of predictions."""
    if len(pred) == 0:
        return float("nan")
    which = np.minimum((pred * bins).astype(int), bins - 1)
    gap = np.bincount(which, pred, bins) - np.bincount(which, labels, bins)
    return float(np.abs(gap).sum() / len(pred))


def fit_sts(logits: np.ndarray, verified: np.ndarray, accepted: np.ndarray) -> dict:
    """logits [rounds, B] raw confidence logits (any value past a round's verified positions); verified [rounds]
    positions each round verified; accepted [rounds] drafts accepted. A position no round verified keeps t = 1,
    b = 0 (and no ECE: None)."""
    rounds, draft_length = logits.shape
    temps, biases = np.ones(draft_length), np.zeros(draft_length)
    before, after, counts = [], [], []
    survival_raw = np.ones(rounds)
    survival_fit = np.ones(rounds)
    for k in range(draft_length):
        rows = verified > k
        seen = bool(rows.any())
        labels = (accepted[rows] >= k + 1).astype(np.float64)
        raw = survival_raw * sigmoid(logits[:, k])
        before.append(ece(raw[rows], labels) if seen else None)
        if seen:
            fixed, z = survival_fit[rows], logits[rows, k]
            # a tie (ECE flat over a range) goes to the smallest bias, then the smallest temperature
            scores = [(ece(fixed * sigmoid(z / t + b), labels), abs(b), i, j)
                      for i, t in enumerate(GRID) for j, b in enumerate(BIASES)]
            _, _, i, j = min(scores)
            temps[k], biases[k] = GRID[i], BIASES[j]
        survival_raw = raw
        survival_fit = survival_fit * sigmoid(logits[:, k] / temps[k] + biases[k])
        after.append(ece(survival_fit[rows], labels) if seen else None)
        counts.append(int(rows.sum()))
    return {"sts_temperatures": temps.tolist(), "sts_biases": biases.tolist(), "ece_before": before,
            "ece_after": after, "ece_bins": BINS, "rounds": int(rounds), "rounds_by_position": counts}


def calibrate_bundle(bundle_dir, prompts: list[str], temperature: float = 0.0, max_new_tokens: int = 64,
                     threads: int = 0, seed: int = 0, progress: bool = True, backend: str = "ort",
                     device: str = "cpu") -> dict:
    # every round verifies its whole draft, so each position's acceptance is seen wherever its draft got there
    generator = Generator(bundle_dir, backend=backend, threads=threads, device=device, scheduler="fixed")
    draft = generator.bundle.draft
    if not draft or (draft.block and not draft.confidence_head):
        raise DsparkError("this bundle's draft has no confidences to calibrate (a block drafter without a confidence "
                          "head, or no draft); calibration needs a DSpark drafter or a draft LM")
    draft_length = generator.draft_length
    logits, verified, accepted = [], [], []
    requests = [Request(generator.tokenizer.encode(p), max_new_tokens, SamplingParams(temperature), seed=seed + i,
                        ignore_eos=True) for i, p in enumerate(prompts)]
    for req in tqdm(requests, desc="calibrate", disable=not progress, unit="prompt"):
        seq = generator.generate([req], trace=True)[0]
        for row in seq.trace:
            if row["verify_length"]:
                c = np.clip(np.asarray(row["confidence"], dtype=np.float64), 1e-12, 1 - 1e-12)
                z = np.zeros(draft_length)
                z[: row["verify_length"]] = np.log(c / (1 - c))[: row["verify_length"]]
                logits.append(z)
                verified.append(row["verify_length"])
                accepted.append(row["accepted"])
    if not logits:
        raise DsparkError("no round verified a draft; give more prompts or a larger --max-new-tokens")
    report = fit_sts(np.stack(logits), np.asarray(verified), np.asarray(accepted))
    report.update(temperature_T=temperature, prompts=len(prompts), draft_length=draft_length)
    generator.bundle.add_file(CALIBRATION_FILE, json.dumps(report, indent=2) + "\n")
    return report
