"""The ``torch`` backend: the ``dspark/graphs`` modules run directly, on the CPU or a CUDA device, behind the
same ``GraphRunner`` interface and input/output names as the bundle's ONNX graphs.

Weights come from the checkpoint folders the manifest records (``models.<role>.source``): the modules the
graphs were exported from, so the torch and ONNX Runtime backends compute the same functions. For a decoder
graph of the ``ort`` flavour, this runner keeps that flavour's in-place contract on the runtime's KV cache
(``in_place_step``): each row's new tokens' K/V are written into the cache at ``cache_lens``, and logits are
returned only for the rows ``logit_index`` asks for. On a GPU, with ``cuda_graphs``, such calls as wide as a verify
call at most (the host loop's draft steps and verify calls) replay a CUDA graph captured per call shape and cache
buffer; prefill chunks run eagerly.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.runtime.capture import CudaGraphs, cuda_capture
from dspark.runtime.runners import DEVICES, GraphRunner

# captured call shapes a runner keeps; past it the oldest goes (caches made for one prefill each bring new buffers)
MAX_GRAPHS = 64

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def module_problem(bundle: Bundle, role: str) -> str | None:
    """Why ``role``'s PyTorch module cannot be rebuilt here, or None when it can."""
    source = Path(bundle.models[role].source)
    if not (source / "config.json").is_file():
        return f"the {role}'s checkpoint folder {source} (recorded in the manifest at export) is not here"
    if bundle.quantize:
        return (f"the bundle's graphs are {bundle.quantize}-quantized and the checkpoint is not, so the "
                "two would decode differently")
    return None


def torch_device(device: str):
    """``device`` as a ``torch.device``, refused with the fix where this torch cannot compute there: the one check
    of the torch backend, the device step and drafter training."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DsparkError(f"--device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type not in DEVICES:
        raise DsparkError(f"--device {device!r}: dspark runs torch on cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DsparkError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu "
                          "or install a CUDA build of torch")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise DsparkError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


@functools.lru_cache(maxsize=8)
def _load(kind: str, source: str, target_source: str, tap_layers: tuple, dtype: torch.dtype, device: str):
    """One module per (checkpoint, dtype, device), shared by every runner of a process (they only read it)."""
    from dspark.graphs.checkpoint import read_config
    from dspark.graphs.decoder import DecoderConfig, DecoderLM
    from dspark.graphs.drafter import Drafter

    if kind == "drafter":
        target_config = DecoderConfig.from_hf(read_config(target_source))
        module = Drafter.from_pretrained(source, target_config, dtype=dtype, target_dir=target_source)
    else:
        module = DecoderLM.from_pretrained(source, tap_layers=tap_layers, dtype=dtype)
    return module.to(device).eval()


def load_module(bundle: Bundle, role: str, dtype: torch.dtype | None = None, device: str = "cpu"):
    """``role``'s module (DecoderLM or Drafter) rebuilt from its checkpoint folder; a DsparkError says why not."""
    problem = module_problem(bundle, role)
    if problem:
        raise DsparkError(f"the torch backend runs the PyTorch modules, but {problem}; use --backend ort")
    model = bundle.models[role]
    kind = "drafter" if role == "draft" and bundle.draft.block else "decoder"
    dtype = dtype or DTYPES[bundle.dtype]
    taps = bundle.target.tap_layers if role == "target" else ()
    return _load(kind, model.source, bundle.target.source, taps, dtype, str(torch.device(device)))


def graph_role(bundle: Bundle, graph: str) -> str:
    return next(role for role, model in bundle.models.items() if graph in model.graphs)


def in_place_step(model, input_ids, cache_lens, query_lens, logit_index, past_k, past_v):
    """The ``ort`` flavour's call contract spelled with the module's own step, on torch tensors.

    past_k, past_v [L, B, Hkv, S, D]: each layer's whole KV buffer; the ``query_lens[b]`` new tokens' K/V are
    written into it in place at ``cache_lens[b]``. Returns logits [B, logit_rows, V] at ``logit_index`` and the
    tapped features (None without taps).
    """
    lens = cache_lens.long()
    positions = lens[:, None] + torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    logits, new_k, new_v, hidden = model.step(input_ids, positions, lens, past_k, past_v)
    # the whole padded chunk is written (no host sync, so it can be captured): slots past a row's query_lens lie
    # past its length, masked until a later call overwrites them, as the exact-rows ONNX graph does
    write_block(past_k, new_k, lens)
    write_block(past_v, new_v, lens)
    picked = torch.gather(logits, 1, logit_index.long()[:, :, None].expand(-1, -1, logits.shape[-1]))
    return picked, hidden


def write_block(cache: torch.Tensor, block: torch.Tensor, lens: torch.Tensor) -> None:
    """Write block [L, B, H, n, D] into cache [L, B, H, S, D] at positions lens[b] .. lens[b] + n - 1 (in place)."""
    n = block.shape[3]
    index = (lens[:, None] + torch.arange(n, device=lens.device)[None, :])[None, :, None, :, None]
    cache.scatter_(3, index.expand_as(block), block)


class TorchRunner(GraphRunner):
    """A bundle graph computed by its PyTorch module; numpy feeds and outputs, like the other runners."""

    def __init__(self, bundle: Bundle, graph: str, device: str = "cpu", threads: int = 0, cuda_graphs: bool = False):
        self.device = torch_device(device)
        if threads:  # process-wide in torch; small models run fastest on few threads
            torch.set_num_threads(threads)
        self.spec = bundle.graph(graph)
        self.graph = graph
        self.module = load_module(bundle, graph_role(bundle, graph), device=self.device)
        self.input_names = [i.name for i in self.spec.inputs]
        self.output_names = [o.name for o in self.spec.outputs]
        self.in_place = self.spec.in_place
        if self.in_place and self.device.type != "cpu":
            self.cache_device = str(self.device)
        on_gpu = cuda_graphs and self.in_place and self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if on_gpu else None
        self.graphs = CudaGraphs(cuda_capture(self.device, self.stream) if on_gpu else None,
                                 synchronize=self.stream.synchronize if on_gpu else lambda: None, name=self.spec.file)
        self.graph_width = bundle.limits.max_verify_tokens  # wider calls (prefill chunks) run eagerly
        self.static: dict = {}  # captured call shape -> the inputs it reads and the outputs it writes
        # the in-place graph's present_* outputs are the cache buffers themselves, not results
        self.result_specs = [o for o in self.spec.outputs if not o.name.startswith("present_")]

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # broadcast views; torch wants memory it may write
            array = array.copy()
        return torch.from_numpy(array).to(self.device)

    @torch.no_grad()
    def run(self, feeds: dict[str, np.ndarray], cache=None) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds and not (self.in_place and n.startswith("past_"))]
        if missing:
            raise ValueError(f"no feed for input {', '.join(missing)}")
        t = {name: self._tensor(array) for name, array in feeds.items()}
        if self.in_place:
            out = self._run_in_place(t, cache)
        elif self.graph == "draft_context":
            out = self.module.context_kv(t["features"], t["positions"])
        elif self.graph == "draft_propose":
            out = self.module.propose(t["anchor"], t["start"], t["cache_lens"], t["past_k"], t["past_v"],
                                      t["temperature"], t["noise"])
        else:
            out = self.module.step(t["input_ids"], t["position_ids"], t["cache_lens"], t["past_k"], t["past_v"])
        results = [x for x in out if x is not None]
        return {spec.name: value.cpu().numpy().astype(spec.dtype, copy=False)
                for spec, value in zip(self.result_specs, results)}

    def _run_in_place(self, t: dict, cache) -> tuple:
        if cache is None:
            raise ValueError(f"graph {self.graph} updates its KV cache in place; pass the cache")
        if cache.device is not None and self.graphs.enabled and t["input_ids"].shape[1] <= self.graph_width:
            return self._replay(t, cache)
        if cache.device is not None:  # tensors already where this runner computes (its cache_device)
            past_k, past_v = cache.k, cache.v
        elif self.device.type == "cpu":  # the cache's numpy buffers, shared
            past_k, past_v = torch.from_numpy(cache.k), torch.from_numpy(cache.v)
        else:  # a host cache on a device runner (made without its cache_device): computed on a copy written back
            past_k, past_v = self._tensor(cache.k), self._tensor(cache.v)
        logits, hidden = in_place_step(self.module, t["input_ids"], t["cache_lens"], t["query_lens"],
                                       t["logit_index"], past_k, past_v)
        if cache.device is None and self.device.type != "cpu":
            cache.k[...] = past_k.cpu().numpy()
            cache.v[...] = past_v.cpu().numpy()
        return logits, hidden

    def _replay(self, t: dict, cache) -> tuple:
        """The call through a CUDA graph captured for its shape and cache buffer (the buffer moves when the cache
        grows or rows join, so its address and strides are part of the key)."""
        names = ("input_ids", "cache_lens", "query_lens", "logit_index")
        key = tuple(t[n].shape for n in names) + (cache.k.data_ptr(), cache.k.shape, cache.k.stride())
        if key not in self.static:
            if len(self.static) >= MAX_GRAPHS:
                oldest = next(iter(self.static))
                del self.static[oldest]
                self.graphs.forget(oldest)
            self.static[key] = ({n: t[n].clone() for n in names}, {})
        inputs, outputs = self.static[key]
        past_k, past_v = cache.k, cache.v
        default = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(default)  # the feeds and any cache edits were made on the default stream
        with torch.cuda.stream(self.stream):
            for n in names:
                inputs[n].copy_(t[n])

            def work():
                outputs["logits"], outputs["hidden"] = in_place_step(
                    self.module, inputs["input_ids"], inputs["cache_lens"], inputs["query_lens"],
                    inputs["logit_index"], past_k, past_v)

            self.graphs.run(key, work)
        default.wait_stream(self.stream)  # the results are read back, and the cache edited, on the default stream
        return outputs["logits"], outputs["hidden"]
