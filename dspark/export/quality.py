"""What weight quantization costs: held-out perplexity of a bundle's target graph against its fp32 model.

The text is a file of the running Python's standard library (present on every machine, never part of a
dspark training set): code with English docstrings. The fp32 figure comes from the model definition itself
(``DecoderLM`` in fp32, full causal forward); the quantized one from the exported graph run by ONNX Runtime
exactly as decoding runs it (chunked, KV cache in place), so the comparison includes everything the
quantized bundle changes.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from dspark.bundle import Bundle
from dspark.graphs.decoder import DecoderLM

TOKENS = 1024


def heldout_text() -> tuple[str, str]:
    path = Path(textwrap.__file__)
    return path.read_text(), f"Python {sys.version.split()[0]} standard library {path.name}"


def nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum of -log p(target) over rows of fp32 logits."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(x).sum(axis=-1))
    return float((log_z - x[np.arange(len(targets)), targets]).sum())


def graph_perplexity(bundle: Bundle, ids: list[int]) -> float:
    from dspark.runtime.decoder import commit, decoder_cache, run_decoder
    from dspark.runtime.backends import make_runner

    runner = make_runner(bundle, "target")
    cache = decoder_cache(bundle.target.config, 1, bundle)
    total, step = 0.0, bundle.limits.prefill_chunk
    for start in range(0, len(ids) - 1, step):
        chunk = ids[start : start + step]
        out = run_decoder(runner, cache, [chunk])
        commit(cache, out, [len(chunk)])
        targets = np.array(ids[start + 1 : start + len(chunk) + 1])
        total += nll(out["logits"][0, : len(targets)], targets)
    return float(np.exp(total / (len(ids) - 1)))


def model_perplexity(model: DecoderLM, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model.float()(torch.tensor([ids]))[0, :-1].numpy()
    return float(np.exp(nll(logits, np.array(ids[1:])) / (len(ids) - 1)))


def measure(bundle: Bundle, model: DecoderLM, encode) -> dict:
    """{"text", "tokens", "perplexity": {"fp32": ..., "<quantized>": ...}} for the bundle's target."""
    text, source = heldout_text()
    ids = encode(text)[: min(TOKENS, bundle.limits.max_context)]
    label = bundle.quantize or bundle.dtype
    return {
        "text": source,
        "tokens": len(ids),
        "perplexity": {"fp32": round(model_perplexity(model, ids), 4), label: round(graph_perplexity(bundle, ids), 4)},
    }
