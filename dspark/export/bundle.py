"""``dspark export``: Hugging Face checkpoint folders -> a bundle (ONNX graphs + tokenizer + manifest).

Everything is written into a temporary folder beside the output and moved into place only when complete,
so an interrupted export never leaves a half-written bundle under the requested name.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dspark import __version__
from dspark.bundle import SLOTS_PAST_CALL, write_manifest
from dspark.errors import DsparkError
from dspark.export.drafter import CONTEXT_GRAPH, PROPOSE_GRAPH, export_drafter
from dspark.export.onnx import export_graph
from dspark.export.ort_graph import CALIBRATED, QUANT_BITS, lower_decoder
from dspark.export.smooth import calibration_ids
from dspark.export.share import share_identical_tensors
from dspark.graphs.checkpoint import WeightReader, read_config, read_draft_vocab
from dspark.graphs.decoder import DecoderConfig, DecoderLM
from dspark.graphs.gguf import record_gguf_sources, resolve_checkpoints
from dspark.graphs.drafter import ARCHITECTURE, Drafter, DrafterConfig
from dspark.runtime.proposers import draft_index

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DRAFT_LM_TOKENS = 4  # default draft length of a draft LM
# graph flavour per runtime: ONNX Runtime's fused operators, or standard ONNX operators TensorRT's parser takes
RUNTIMES = {"ort": "ort", "tensorrt": "standard"}
KV_AXES = ["layer", "batch", "kv_head", "position", "head_dim"]


@dataclass
class ExportOptions:
    max_batch: int = 8
    max_context: int = 2048
    prefill_chunk: int = 256
    dtype: str = "fp32"
    num_draft_tokens: int | None = None  # --num-draft-tokens: a draft LM's draft length (default 4); a block drafter drafts its block; without a draft, the longest prompt-lookup draft
    runtime: str = "ort"
    quantize: str | None = None
    draft_quantize: str | None = None  # a draft LM's own weights (e.g. the target itself in int4 as its draft)

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise DsparkError(f"--dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if self.runtime not in RUNTIMES:
            raise DsparkError(f"--runtime {self.runtime!r} is not supported; choose one of {', '.join(RUNTIMES)}")
        if self.quantize is not None and self.quantize not in QUANT_BITS:
            raise DsparkError(f"--quantize {self.quantize!r} is not supported; choose one of {', '.join(QUANT_BITS)}")
        if self.draft_quantize is not None and self.draft_quantize not in QUANT_BITS:
            raise DsparkError(f"--draft-quantize {self.draft_quantize!r} is not supported; choose one of "
                              f"{', '.join(QUANT_BITS)}")
        if "w8a8" in (self.quantize, self.draft_quantize) and self.dtype != "fp32":
            raise DsparkError("w8a8 quantizes fp32 activations (ONNX Runtime's DynamicQuantizeMatMul takes fp32 only); "
                              "export it with --dtype fp32")
        if (self.quantize or self.draft_quantize) and self.runtime != "ort":
            raise DsparkError(
                f"--quantize {self.quantize or self.draft_quantize} needs --runtime ort (MatMulNBits is an ONNX Runtime operator); for "
                "TensorRT export fp32 or fp16 and choose the engine precision with 'dspark build --precision'"
            )
        for name in ("max_batch", "max_context", "prefill_chunk", "num_draft_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise DsparkError(f"{name.replace('_', '-')} must be at least 1")
        self.prefill_chunk = min(self.prefill_chunk, self.max_context)


class DecoderStep(torch.nn.Module):
    """The exported signature of ``DecoderLM.step`` (features output only when the model taps layers)."""

    def __init__(self, model: DecoderLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, cache_lens, past_k, past_v):
        logits, new_k, new_v, hidden = self.model.step(input_ids, position_ids, cache_lens, past_k, past_v)
        return (logits, new_k, new_v) if hidden is None else (logits, new_k, new_v, hidden)


def export_decoder(model: DecoderLM, path: Path, options: ExportOptions, verify_tokens: int,
                   quantize: str | None = None, calibration: list[int] | None = None, target: bool = True) -> dict:
    """Export a decoder step graph (dynamic batch, new-token and cache dimensions); return its manifest entry.
    ``calibration``: token ids for the activation statistics int4/w8a8 rescale by (``smooth``); ``target``: the
    graph whose numbers must not depend on the call (``ort_graph.lower_decoder``'s ``exact_rows``)."""
    ranges, profiles = decoder_dims(options, verify_tokens)
    if options.runtime == "ort":
        new_max = ranges["new_tokens"][1]
        # GroupQueryAttention rotates up to the buffer's capacity: a row near the context limit in a wide call
        # is padded past it, and a target graph writes past its chunk, so the tables and the cache dimension
        # cover max_context + the widest call + SLOTS_PAST_CALL
        span = options.max_context + new_max + SLOTS_PAST_CALL
        inputs, outputs = lower_decoder(model, path, span, quantize, calibration, exact_rows=target)
        ranges = dict(ranges, logit_rows=[1, new_max], cache=[1, span])
        return graph_entry(path.name, inputs, outputs, ranges, {}, "ort")
    past_k, past_v = model.empty_cache(batch=2, length=5)
    example = {
        "input_ids": torch.zeros(2, 3, dtype=torch.int64),
        "position_ids": torch.tensor([[5, 6, 7], [2, 3, 4]]),
        "cache_lens": torch.tensor([5, 2]),
        "past_k": past_k,
        "past_v": past_v,
    }
    dynamic = {
        "input_ids": {0: "batch", 1: "new_tokens"},
        "position_ids": {0: "batch", 1: "new_tokens"},
        "cache_lens": {0: "batch"},
        "past_k": {1: "batch", 3: "cache"},
        "past_v": {1: "batch", 3: "cache"},
    }
    outputs = ["logits", "new_k", "new_v"] + (["hidden"] if model.tap_layers else [])
    inputs, outputs = export_graph(DecoderStep(model), example, dynamic, outputs, path)
    return graph_entry(path.name, inputs, outputs, ranges, profiles)


def decoder_dims(options: ExportOptions, verify_tokens: int) -> tuple[dict, dict]:
    """Dimension ranges and TensorRT profiles (min, opt, max) for a decoder step graph."""
    new_max = max(options.prefill_chunk, verify_tokens)
    ranges = {"batch": [1, options.max_batch], "new_tokens": [1, new_max], "cache": [0, options.max_context]}
    batch = [1, 1, options.max_batch]
    cache = [0, min(512, options.max_context), options.max_context]
    profiles = {
        "prefill": {"batch": batch, "new_tokens": [1, options.prefill_chunk, new_max], "cache": cache},
        "decode": {"batch": batch, "new_tokens": [1, verify_tokens, verify_tokens], "cache": cache},
    }
    return ranges, profiles


def graph_entry(file: str, inputs, outputs, ranges: dict, profiles: dict, flavour: str = "standard") -> dict:
    return {
        "file": file,
        "flavour": flavour,
        "data": file + ".data",
        "inputs": [s.to_dict() for s in inputs],
        "outputs": [s.to_dict() for s in outputs],
        "dims": ranges,
        "profiles": profiles,
    }


def tokenizer_file(folder: Path) -> Path:
    """The folder's fast-tokenizer file, which dspark needs."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise DsparkError(f"{folder} has no tokenizer.json; dspark needs the fast-tokenizer file beside the weights")
    return path


def token_ids(folder: Path):
    """text -> token ids with the folder's fast tokenizer."""
    from tokenizers import Tokenizer

    encode = Tokenizer.from_file(str(tokenizer_file(folder))).encode
    return lambda text: encode(text).ids


def copy_tokenizer(target_dir: Path, out: Path, target_cfg: dict) -> dict:
    tokenizer_file(target_dir)
    files = [name for name in TOKENIZER_FILES if (target_dir / name).is_file()]
    for name in files:
        shutil.copy2(target_dir / name, out / name)
    generation = json.loads((target_dir / "generation_config.json").read_text()) if "generation_config.json" in files else {}
    tok_cfg = json.loads((target_dir / "tokenizer_config.json").read_text()) if "tokenizer_config.json" in files else {}
    eos = generation.get("eos_token_id", target_cfg.get("eos_token_id"))
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return {
        "files": files,
        "eos_token_ids": eos_ids,
        "bos_token_id": generation.get("bos_token_id", target_cfg.get("bos_token_id")),
        "pad_token_id": generation.get("pad_token_id", target_cfg.get("pad_token_id")),
        "has_chat_template": bool(tok_cfg.get("chat_template")) or "chat_template.jinja" in files,
    }


def check_same_tokenizer(target_dir: Path, draft_dir: Path) -> None:
    """A draft LM must share the target's tokenizer: the same id must mean the same text on both sides."""
    from tokenizers import Tokenizer

    if not (draft_dir / "tokenizer.json").is_file():
        return
    target_vocab = Tokenizer.from_file(str(target_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
    draft_vocab = Tokenizer.from_file(str(draft_dir / "tokenizer.json")).get_vocab(with_added_tokens=True)
    if target_vocab != draft_vocab:
        differing = len(set(target_vocab.items()) ^ set(draft_vocab.items()))
        raise DsparkError(
            f"draft and target tokenizers differ ({len(draft_vocab)} vs {len(target_vocab)} tokens, {differing} "
            "entries differ); speculative decoding needs a draft trained with the target's tokenizer"
        )


def draft_method(draft_cfg: dict) -> str:
    arch = (draft_cfg.get("architectures") or [None])[0]
    if arch == ARCHITECTURE:
        return "dspark" if draft_cfg.get("markov_rank", 0) > 0 or draft_cfg.get("enable_confidence_head") else "dflash"
    return "draft-lm"


def load_draft(draft_dir: Path, target_dir: Path, target_config: DecoderConfig):
    """Recognise and validate a draft folder before any export work: (method, config) or a DsparkError."""
    draft_cfg = read_config(draft_dir)
    method = draft_method(draft_cfg)
    where = f"{draft_dir}/config.json"
    if method != "draft-lm":
        return method, DrafterConfig.from_hf(draft_cfg, target_config, where=where)
    config = DecoderConfig.from_hf(draft_cfg, where=where)
    if not config.draft_vocab_size and config.vocab_size != target_config.vocab_size:
        raise DsparkError(
            f"draft vocab_size {config.vocab_size} differs from the target's {target_config.vocab_size}; "
            "the draft must share the target's tokenizer and vocabulary (or predict over a subset of it: "
            "draft_vocab_size and a draft_vocab tensor)"
        )
    if config.draft_vocab_size > target_config.vocab_size:
        raise DsparkError(f"{where}: draft_vocab_size {config.draft_vocab_size} is larger than the target's "
                          f"vocabulary ({target_config.vocab_size})")
    check_same_tokenizer(target_dir, draft_dir)
    return method, config


def export_drafter_graphs(draft_dir: Path, config: DrafterConfig, target_dir: Path, target_config: DecoderConfig,
                          out: Path, options: ExportOptions, dtype) -> tuple[dict, list[int]]:
    """draft_context and draft_propose graph entries for a DSpark/DFlash drafter, and the target ids of its
    reduced vocabulary (empty without one), which its draft law is over."""
    drafter = Drafter.from_pretrained(draft_dir, target_config, dtype=dtype, target_dir=target_dir)
    flavour = RUNTIMES[options.runtime]
    # rotary positions: a block starts at most at the last context position
    specs = export_drafter(drafter, out, options.draft_quantize, flavour, options.max_context + config.block_size)
    batch = [1, 1, options.max_batch]
    context_max = max(options.prefill_chunk, config.block_size + 1)
    cache = [0, min(512, options.max_context), options.max_context]
    context_ranges = {"batch": batch[::2], "context": [1, context_max]}
    context_profiles = {
        "prefill": {"batch": batch, "context": [1, options.prefill_chunk, context_max]},
        "decode": {"batch": batch, "context": [1, config.block_size + 1, context_max]},
    }
    propose_ranges = {"batch": batch[::2], "cache": cache[::2]}
    propose_profiles = {"decode": {"batch": batch, "cache": cache}}
    vocab = drafter.draft_vocab.tolist() if config.draft_vocab_size else []
    return {
        "draft_context": graph_entry(CONTEXT_GRAPH, *specs[CONTEXT_GRAPH], context_ranges, context_profiles, flavour),
        "draft_propose": graph_entry(PROPOSE_GRAPH, *specs[PROPOSE_GRAPH], propose_ranges, propose_profiles, flavour),
    }, vocab


def record_quality(folder: Path, target_dir: Path) -> dict:
    """Held-out perplexity of the quantized target against its fp32 model, into the manifest and quality.json."""
    from dspark.bundle import Bundle
    from dspark.export.quality import measure

    bundle = Bundle.open(folder, verify=False)
    quality = measure(bundle, DecoderLM.from_pretrained(target_dir), token_ids(folder))
    bundle.manifest["quality"] = quality
    bundle.add_file("quality.json", json.dumps(quality, indent=2) + "\n")
    return bundle.manifest


def check_output(output: Path, force: bool) -> None:
    """Refuse an --output that cannot become a bundle folder, before any export work."""
    if output.exists() and not output.is_dir():
        raise DsparkError(f"output {output} is a file, not a folder; --force replaces only a bundle folder, so "
                          "choose another --output or remove the file")
    if output.exists() and not force:
        raise DsparkError(f"output folder {output} exists; pass --force to replace it")
    parent = output.parent.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DsparkError(f"cannot create {output}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DsparkError(f"cannot create {output}: {parent} is not writable; choose an --output you can write")


def readable_by_all(folder: Path) -> None:
    """Give every file and folder of a new bundle the modes of any new file (0644 and 0755 under umask 022).

    ONNX writes external data with 0600 and copy2 keeps a source's restrictive modes, which would leave a
    bundle that only its exporter can serve.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def export_bundle(
    target_dir: str | Path,
    output: str | Path,
    draft_dir: str | Path | None = None,
    options: ExportOptions | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Export the target (and optional draft) into a bundle at ``output``; returns the manifest."""
    options = options or ExportOptions()
    options.check()
    target_dir, output = Path(target_dir), Path(output)
    check_output(output, force)
    # a .gguf file stands for its converted checkpoint folder from here on
    (target_dir, draft_dir), (target_gguf, draft_gguf) = resolve_checkpoints(target_dir, draft_dir)
    target_cfg = read_config(target_dir)
    target_config = DecoderConfig.from_hf(target_cfg, where=f"{target_dir}/config.json")
    method, draft_config = load_draft(Path(draft_dir), target_dir, target_config) if draft_dir else (None, None)
    block = method in ("dspark", "dflash")
    if options.draft_quantize and not method:
        raise DsparkError("--draft-quantize quantizes the draft's weights; give one with --draft")
    if options.draft_quantize == "w8a8" and block:
        raise DsparkError(f"--draft-quantize w8a8 applies to a draft LM; a {method} drafter takes int4 or int8")
    if block and options.num_draft_tokens not in (None, draft_config.block_size):
        raise DsparkError(
            f"--num-draft-tokens applies to a draft LM; this {method} drafter drafts its block of "
            f"{draft_config.block_size} tokens (verify fewer with 'dspark generate --num-draft-tokens N')")
    draft_length = draft_config.block_size if block else (options.num_draft_tokens or DRAFT_LM_TOKENS)
    # without a draft, --num-draft-tokens still sizes the verify window: prompt-lookup drafts need it
    verify_tokens = draft_length + 1 if method or options.num_draft_tokens else 1
    taps = draft_config.target_layer_ids if block else ()

    dtype = DTYPES[options.dtype]
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise DsparkError(f"cannot create the bundle beside {output}: {e.strerror}; choose an --output you can write") from None
    steps = ["target graph"] + (["draft graphs"] if method else []) + ["tokenizer and manifest"]
    bar = tqdm(steps, desc="export", disable=not progress, unit="step")
    try:
        bar.set_postfix_str("target graph")
        # the text whose activations set the rescaling of int4/w8a8 graphs, in the target's tokens (a draft LM
        # shares them); a block drafter's products are quantized without it
        rescaled = options.quantize in CALIBRATED or (method == "draft-lm" and options.draft_quantize in CALIBRATED)
        calibration = calibration_ids(token_ids(target_dir)) if rescaled else None
        model = DecoderLM.from_pretrained(target_dir, tap_layers=taps, dtype=dtype)
        graphs = {"target": export_decoder(model, tmp / "target.onnx", options, verify_tokens, options.quantize,
                                           calibration)}
        models = {"target": {"source": str(target_dir), "config": asdict(target_config), "graphs": ["target"],
                             "tap_layers": list(taps)}}
        del model
        bar.update()
        if method:
            bar.set_postfix_str("draft graphs")
            if block:
                draft_graphs, draft_vocab = export_drafter_graphs(Path(draft_dir), draft_config, target_dir,
                                                                  target_config, tmp, options, dtype)
                shared = share_identical_tensors(tmp, "target.onnx", [g["file"] for g in draft_graphs.values()])
            else:
                model = DecoderLM.from_pretrained(draft_dir, dtype=dtype)
                # the draft feeds up to two pending tokens per round, then one per drafted token; a reduced draft
                # LM's graph takes and returns its own ids (the runtime maps them), so calibration text is mapped too
                draft_vocab = (read_draft_vocab(WeightReader(draft_dir), draft_config.draft_vocab_size,
                                                target_config.vocab_size).tolist()
                               if draft_config.draft_vocab_size else [])
                draft_calibration = calibration
                if draft_vocab and calibration is not None:
                    draft_calibration = draft_index(draft_vocab, target_config.vocab_size)[calibration].tolist()
                draft_graphs = {"draft": export_decoder(model, tmp / "draft.onnx", options, 2, options.draft_quantize,
                                                        draft_calibration, target=False)}
                shared = {}
                del model
            graphs.update(draft_graphs)
            # the draft length is stored once: a block drafter's block_size is it (see dspark.bundle)
            config = {k: v for k, v in asdict(draft_config).items() if k != "block_size"}
            models["draft"] = {
                "method": method,
                "source": str(draft_dir),
                "config": config,
                "graphs": list(draft_graphs),
                "draft_length": draft_length,
                "shared_tensors": shared,
            }
            if draft_vocab:
                models["draft"]["draft_vocab"] = draft_vocab
            bar.update()
        record_gguf_sources(models, {"target": target_gguf, "draft": draft_gguf})
        bar.set_postfix_str("tokenizer and manifest")
        manifest = {
            "dspark_version": __version__,
            "created_unix": int(time.time()),
            "dtype": options.dtype,
            "runtime": options.runtime,
            "quantize": options.quantize,
            "draft_quantize": options.draft_quantize,
            "limits": {
                "max_batch": options.max_batch,
                "max_context": options.max_context,
                "prefill_chunk": options.prefill_chunk,
                "max_verify_tokens": verify_tokens,
            },
            "export_options": asdict(options),
            "kv_layout": {
                "axes": KV_AXES,
                "dtype": options.dtype,
                "owner": "runtime",
                "note": "one buffer per model, [layer, row, kv_head, position, head_dim]. Graphs of flavour 'ort' take "
                "layer i as past_key.i/past_value.i, bound to the same memory as present_key.i/present_value.i, and "
                "write the query_lens[b] new tokens' K/V in place at cache_lens[b]; graphs of flavour 'standard' read "
                "past_k/past_v windows and return new_k/new_v, which the runtime writes at cache_lens[b]. Either way "
                "the runtime commits accepted tokens by advancing cache_lens[b]",
            },
            "models": models,
            "graphs": graphs,
            "tokenizer": copy_tokenizer(target_dir, tmp, target_cfg),
        }
        manifest = write_manifest(tmp, manifest)
        if options.quantize:
            bar.set_postfix_str("perplexity")
            manifest = record_quality(tmp, target_dir)
        readable_by_all(tmp)
        bar.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if output.exists():
        shutil.rmtree(output)
    tmp.rename(output)
    return manifest
