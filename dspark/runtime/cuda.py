"""The device-side speculative step: what a device backend supplies to ``Generator``'s one loop.

``DeviceStep`` owns the device buffers (both KV caches, the drafter's pending features, per-row settings) and
runs the ``dspark/graphs`` modules directly: prefill of newly admitted rows, and the whole speculative round
(draft context, propose, verify, accept, KV commit) captured as one CUDA graph per (rows, cache window, sampling)
bucket through ``dspark.runtime.capture``. ``Generator`` keeps everything else (admission, stop conditions,
streaming, stats, trace, cancel), so the server and every command run over it unchanged.

Everything between two iterations stays on the device: acceptance runs as torch ops (``accept_on_device``,
the same rule as ``dspark.runtime.sampling.accept`` given the same uniforms), and K/V are committed by
writing the whole verify block at each row's length and advancing the length by the accepted count: entries
past a row's length are masked by the graphs, so rejected K/V need no rollback and no host decision. The host
reads one small tensor per iteration (accepted counts and emitted tokens) and writes the next round's row
settings and uniforms. Rows are padded to the batch bucket and the cache window to its bucket, so each
captured graph sees fixed shapes and fixed addresses (views of caches allocated once at the largest bucket);
rows that leave are compacted in place, rows that join are prefilled after the running ones.

The step drafts with DSpark/DFlash block drafters (or none: plain decoding); draft-LM bundles run the host loop.
It verifies the whole (capped) block: confidence schedulers need the drafts' confidences on the host before the
verify call, which the fused step does not make. Sampled runs draw their uniforms in a different order from
the host loop, so they follow the same distribution but are not token-identical to it; greedy runs are.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from dspark.bundle import Bundle
from dspark.errors import DsparkError
from dspark.runtime.buckets import Buckets
from dspark.runtime.capture import CudaGraphs, cuda_capture
from dspark.runtime.proposers import choose_draft_length
from dspark.runtime.torch_runner import load_module, module_problem, torch_device, write_block


# ------------------------------------------------------------------------------------------------ acceptance
def warp(logits: torch.Tensor, temperature, top_p, top_k) -> torch.Tensor:
    """``sampling.probabilities`` per row in float64: logits [B, ..., V]; temperature, top_p, top_k [B]."""
    shape = (-1,) + (1,) * (logits.dim() - 1)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).double().reshape(shape)
    x = logits.double() / t
    vocab = x.shape[-1]
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab)).reshape(shape)
    ordered = torch.sort(x, dim=-1, descending=True).values
    kth = ordered.gather(-1, (k - 1).expand(*x.shape[:-1], 1))
    x = torch.where(x >= kth, x, torch.full_like(x, -torch.inf))
    p = torch.softmax(x, dim=-1)
    sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
    keep_sorted = (torch.cumsum(sorted_p, -1) - sorted_p) < top_p.double().reshape(shape)
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    keep |= (top_p >= 1).reshape(shape)
    p = torch.where(keep, p, torch.zeros_like(p))
    return p / p.sum(-1, keepdim=True)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``sampling.sample`` for rows of probs [..., V] with uniforms u [...]."""
    cdf = torch.cumsum(probs, dim=-1)
    drawn = torch.searchsorted(cdf, (u.double() * cdf[..., -1]).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    return drawn.clamp(max=probs.shape[-1] - 1)


def accept_on_device(logits, drafts, q, lengths, temperature, top_p, top_k, uniforms):
    """``sampling.accept`` for a batch without leaving the device.

    logits [B, K+1, V]; drafts [B, K]; q [B, K, V] (the draft distributions, or None for an all-greedy batch);
    lengths [B] drafts to judge per row; uniforms [B, K+2], consumed in ``accept``'s order (one per judged draft,
    then one for the correction or bonus draw). Returns (accepted [B], next token [B]).
    """
    b, width = drafts.shape
    position = torch.arange(width, device=drafts.device)[None, :]
    judged = position < lengths[:, None]
    choices = logits.argmax(-1)
    greedy_n = torch.cumprod((drafts == choices[:, :width]) & judged, dim=1).sum(1)
    greedy_next = choices.gather(1, greedy_n[:, None]).squeeze(1)
    if q is None:
        return greedy_n, greedy_next
    p = warp(logits, temperature, top_p, top_k)
    hot = temperature > 0
    if width == 0:  # plain decoding: sample the next token from the first row
        return greedy_n, torch.where(hot, inverse_cdf(p[:, 0], uniforms[:, 0]), greedy_next)
    p_tok = p[:, :width].gather(-1, drafts[..., None]).squeeze(-1)
    q_tok = q.double().gather(-1, drafts[..., None]).squeeze(-1)
    passed = uniforms[:, :width].double() < torch.clamp(p_tok / q_tok.clamp(min=1e-30), max=1.0)
    n = torch.cumprod(passed & judged, dim=1).sum(1)
    rejected = n < lengths
    row = p.gather(1, n[:, None, None].expand(-1, 1, p.shape[-1])).squeeze(1)
    q_row = q.double().gather(1, n.clamp(max=width - 1)[:, None, None].expand(-1, 1, q.shape[-1])).squeeze(1)
    residual = torch.clamp(row - q_row, min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) <= 1e-12, row, residual)
    dist = torch.where(rejected[:, None], residual, row)
    u = uniforms.double().gather(1, (n + rejected.long())[:, None]).squeeze(1)
    sampled = inverse_cdf(dist, u)
    return torch.where(hot, n, greedy_n), torch.where(hot, sampled, greedy_next)


# ------------------------------------------------------------------------------------------------ the step
class DeviceStep:
    """Device buffers and the speculative round for ``Generator`` (``device_step=True``), one row per running
    sequence in the generator's order."""

    def __init__(self, bundle: Bundle, use_draft: bool = True, draft_length: int | None = None,
                 cuda_graphs: bool = True, device: str = "cuda", memory_fraction: float = 0.9):
        self.device = torch_device(device)
        self.bundle = bundle
        draft = bundle.draft if use_draft else None
        if draft is not None and not draft.block:
            raise DsparkError(f"the device step drafts with DSpark/DFlash block drafters; this bundle's draft is "
                              f"{draft.method} (use --backend ort, or --no-draft)")
        for role in ["target"] + (["draft"] if draft else []):
            problem = module_problem(bundle, role)
            if problem:
                raise DsparkError(f"the device step runs the PyTorch modules, but {problem}")
        self.step_fn = load_module(bundle, "target", device=self.device)
        self.drafter = load_module(bundle, "draft", device=self.device) if draft else None
        self.draft_length = choose_draft_length(bundle, draft_length) if draft else 0
        self.buckets = Buckets.from_bundle(bundle)
        self._allocate(memory_fraction)
        self.rows = 0  # live rows
        self.cache_lens = np.zeros(0, dtype=np.int64)  # the device's lens[:rows], mirrored (see round)
        # device="cpu" runs the same step eagerly: how it is proven on machines without a GPU
        on_gpu = cuda_graphs and self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.graphs = CudaGraphs(cuda_capture(self.device, self.stream) if on_gpu else None,
                                 state=[self.lens, self.dlens, self.anchor, self.pending, self.features],
                                 synchronize=self.stream.synchronize if on_gpu else lambda: None, name="device step")

    def _on_stream(self):
        """One side stream for copies, warm-up, capture and replay (torch captures from a non-default stream)."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    # -------------------------------------------------------------------------------------- buffers
    def _allocate(self, memory_fraction: float) -> None:
        """Caches and step buffers at the largest bucket, once; refuse up front when they cannot fit."""
        cfg, limits = self.bundle.target.config, self.bundle.limits
        dtype = self.step_fn.lm_head.weight.dtype
        rows, window, width = self.buckets.batch.sizes[-1], self.buckets.cache.sizes[-1], self.draft_length + 1
        shapes = [(cfg.num_layers, rows, cfg.num_kv_heads, window, cfg.head_dim)] * 2
        if self.drafter is not None:
            c = self.drafter.config
            shapes += [(c.num_layers, rows, c.num_kv_heads, window, c.head_dim)] * 2
        element = torch.tensor([], dtype=dtype).element_size()
        cache_bytes = sum(int(np.prod(s)) for s in shapes) * element
        # activations of one step at the largest bucket, float64 acceptance included, with 2x headroom for graphs
        vocab = cfg.vocab_size
        step_bytes = 2 * rows * width * (vocab * (4 + 8 * 3) + limits.max_context * cfg.num_heads * 4)
        free, total = torch.cuda.mem_get_info(self.device) if self.device.type == "cuda" else (np.inf, np.inf)
        need = cache_bytes + step_bytes
        if need > memory_fraction * free:
            raise DsparkError(
                f"the CUDA backend needs about {need / 2**30:.2f} GiB (KV caches {cache_bytes / 2**30:.2f} GiB for "
                f"{rows} rows x {window} positions, CUDA-graph/step memory {step_bytes / 2**30:.2f} GiB) but only "
                f"{free / 2**30:.2f} of {total / 2**30:.2f} GiB are free; re-export with a smaller --max-batch or --max-context"
            )
        self.budget = {"cache_bytes": cache_bytes, "step_bytes_estimate": step_bytes, "free_bytes": free}
        zeros = lambda shape, dt=dtype: torch.zeros(shape, dtype=dt, device=self.device)  # noqa: E731
        self.tk, self.tv = zeros(shapes[0]), zeros(shapes[1])
        self.dk, self.dv = (zeros(shapes[2]), zeros(shapes[3])) if self.drafter is not None else (None, None)
        long = lambda *shape: torch.zeros(shape, dtype=torch.long, device=self.device)  # noqa: E731
        self.lens, self.dlens, self.anchor, self.lengths, self.active = (long(rows) for _ in range(5))
        self.pending = long(rows)
        feature = self.drafter.config.feature_size if self.drafter is not None else 1
        self.features = zeros((rows, width, feature))
        self.temperature = zeros(rows, torch.float32)
        self.top_p = torch.ones(rows, dtype=torch.float64, device=self.device)
        self.top_k = long(rows)
        self.noise = zeros((rows, max(self.draft_length, 1)), torch.float32)
        self.uniforms = zeros((rows, width + 1), torch.float64)  # the rng's doubles, unrounded
        self.out = long(rows, 2 * width)  # accepted count, emitted tokens (draft_length + 1), the drafts

    # -------------------------------------------------------------------------------------- the step
    def _step(self, rows: int, window: int, sampling: bool) -> None:
        """One speculative iteration on the first ``rows`` rows and ``window`` cache positions; device only."""
        draft_length, width = self.draft_length, self.draft_length + 1
        sl = slice(0, rows)
        tk, tv = self.tk[:, sl, :, :window], self.tv[:, sl, :, :window]
        lens, anchor, active = self.lens[sl], self.anchor[sl], self.active[sl]
        steps = torch.arange(width, device=self.device)[None, :]
        if self.drafter is not None:
            dk, dv, dlens = self.dk[:, sl, :, :window], self.dv[:, sl, :, :window], self.dlens[sl]
            ck, cv = self.drafter.context_kv(self.features[sl], dlens[:, None] + steps)
            write_block(dk, ck, dlens)
            write_block(dv, cv, dlens)
            dlens += self.pending[sl]
            drafts, q, _ = self.drafter.propose(anchor, lens, dlens, dk, dv, self.temperature[sl], self.noise[sl])
            drafts = drafts[:, :draft_length]
            q = self.drafter.target_law(q[:, :draft_length]) if sampling else q
        else:
            drafts = torch.zeros((rows, 0), dtype=torch.long, device=self.device)
            q = torch.zeros((rows, 0, 1), device=self.device)
        ids = torch.cat([anchor[:, None], drafts], 1)
        logits, new_k, new_v, hidden = self.step_fn.step(ids, lens[:, None] + steps, lens, tk, tv)
        n, token = accept_on_device(logits, drafts, q if sampling else None, self.lengths[sl], self.temperature[sl],
                                    self.top_p[sl], self.top_k[sl], self.uniforms[sl])
        write_block(tk, new_k, lens)
        write_block(tv, new_v, lens)
        count = (n + 1) * active
        lens += count
        if self.drafter is not None:
            self.features[sl].copy_(hidden.to(self.features.dtype))
            self.pending[sl].copy_(count)
        anchor.copy_(torch.where(active > 0, token, anchor))
        emitted = torch.where(steps[:, :draft_length] < n[:, None], drafts, torch.zeros_like(drafts))
        emitted = torch.cat([emitted, torch.zeros_like(n)[:, None]], 1).scatter(1, n[:, None], token[:, None])
        self.out[sl].copy_(torch.cat([n[:, None], emitted, drafts], 1))

    def _run_step(self, rows: int, window: int, sampling: bool) -> None:
        key = (rows, window, sampling)
        self.graphs.run(key, lambda: self._step(*key))

    # -------------------------------------------------------------------------------------- rows
    @torch.no_grad()
    def add(self, prompts: list[list[int]]) -> list[np.ndarray]:
        """Prefill new rows after the running ones, in chunks (eager); returns each new row's last logits."""
        start, stop = self.rows, self.rows + len(prompts)
        if stop > self.buckets.batch.sizes[-1]:
            raise DsparkError(f"{stop} rows exceed the bundle's max_batch {self.buckets.batch.sizes[-1]}")
        rows = slice(start, stop)
        chunk = self.bundle.limits.prefill_chunk
        last = [None] * len(prompts)
        with self._on_stream():
            for t in (self.lens, self.dlens, self.pending):
                t[rows] = 0
            for offset in range(0, max(len(p) for p in prompts), chunk):
                parts = [p[offset: offset + chunk] for p in prompts]
                width = max(len(p) for p in parts)
                ids = torch.zeros((len(parts), width), dtype=torch.long)
                for r, p in enumerate(parts):
                    ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
                counts = torch.tensor([len(p) for p in parts], device=self.device)
                lens = self.lens[rows]
                window = self.buckets.cache.select(int(lens.max()) + width)
                steps = torch.arange(width, device=self.device)[None, :]
                tk, tv = self.tk[:, rows, :, :window], self.tv[:, rows, :, :window]
                logits, new_k, new_v, hidden = self.step_fn.step(ids.to(self.device), lens[:, None] + steps, lens, tk, tv)
                write_block(tk, new_k, lens)
                write_block(tv, new_v, lens)
                if self.drafter is not None:
                    dk, dv, dlens = self.dk[:, rows, :, :window], self.dv[:, rows, :, :window], self.dlens[rows]
                    ck, cv = self.drafter.context_kv(hidden, dlens[:, None] + steps)
                    write_block(dk, ck, dlens)
                    write_block(dv, cv, dlens)
                    dlens += counts
                lens += counts
                host = logits.float().cpu().numpy()
                for r, p in enumerate(parts):
                    if p:
                        last[r] = host[r, len(p) - 1]
        self.rows = stop
        self.cache_lens = np.concatenate([self.cache_lens, [len(p) for p in prompts]]).astype(np.int64)
        return last

    @torch.no_grad()
    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order) as rows 0..len(rows)-1, in place: captured graphs keep their addresses."""
        if rows == list(range(self.rows)):
            return
        n = len(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        # only the positions a kept row has written: the rest is masked garbage, and a whole cache at the largest
        # bucket (256 rows x 1024 positions of a 30-layer model: 12 GB) would otherwise move every time a row ends
        used = int(self.cache_lens[rows].max()) if n else 0
        with self._on_stream():
            for t in (self.tk, self.tv, self.dk, self.dv):
                if t is not None:
                    t[:, :n, :, :used] = t[:, index, :, :used]
            for t in (self.lens, self.dlens, self.pending, self.anchor, self.features):
                t[:n] = t[index]
            for t in (self.lens, self.dlens, self.pending):
                t[n:] = 0  # padded rows of later buckets start empty
        self.rows = n
        self.cache_lens = self.cache_lens[rows]

    # -------------------------------------------------------------------------------------- the round
    @torch.no_grad()
    def round(self, seqs, lengths: list[int]) -> np.ndarray:
        """One speculative round over the running ``seqs`` (done ones ride along inactive), verifying up to
        ``lengths[r]`` drafts per row. Returns [rows, 2 * draft_length + 2]: accepted count, the draft_length + 1
        emitted tokens, the drafts."""
        width = self.draft_length + 1
        rows = self.buckets.batch.select(len(seqs))
        host = np.zeros((4, rows), dtype=np.int64)  # anchor, active, verify lengths, top_k
        temps, top_p = np.zeros(rows, np.float32), np.ones(rows, np.float64)
        noise = np.zeros((rows, max(self.draft_length, 1)), np.float32)
        uniforms = np.zeros((rows, width + 1), np.float64)
        for r, s in enumerate(seqs):
            if s.done:
                continue
            params = s.request.sampling
            host[:, r] = (s.tokens[-1], 1, lengths[r], params.top_k)
            temps[r], top_p[r] = params.temperature, params.top_p
            if not params.greedy:
                noise[r, : self.draft_length] = s.rng.random(self.draft_length)
                uniforms[r] = s.rng.random(width + 1)
        sampling = bool((temps > 0).any())
        # a row that stopped at EOS inside a block has committed the whole accepted block on the device, past
        # its host tokens: the window comes from the device lengths, so its next block write still fits
        window = self.buckets.cache.select(int(self.cache_lens.max()) + width)
        with self._on_stream():
            for name, value in (("anchor", host[0]), ("active", host[1]), ("lengths", host[2]), ("top_k", host[3]),
                                ("temperature", temps), ("top_p", top_p), ("noise", noise), ("uniforms", uniforms)):
                getattr(self, name)[:rows].copy_(torch.from_numpy(value))
            self._run_step(rows, window, sampling)
            out = self.out[: len(seqs)].cpu().numpy()  # the one device-to-host read per round
        self.cache_lens += (out[:, 0] + 1) * host[1, : len(seqs)]
        return out
