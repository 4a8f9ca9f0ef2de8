"""The ONNX Runtime lowering of a decoder step: the layers of ``dspark.graphs.decoder`` spelled in ORT's fused ops.

The same ``DecoderLM`` (weights and configuration) that torch exports as standard ONNX operators for TensorRT
is written here node by node, the way onnxruntime-genai's model builder lowers a model: per layer one fused QKV
MatMul, one ``GroupQueryAttention`` (rotary inside, grouped KV heads, the KV buffer updated in place), two
``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm), gate and up MatMuls, SiLU and a down MatMul.
Weights are stored [in, out] so MatMul needs no runtime transpose and ONNX Runtime prepacks them once.

The step contract the speculative loop needs is kept: several new tokens per row, each row with its own cache
length (``cache_lens``) and number of real new tokens (``query_lens``; what a call writes past them is never
read before being overwritten), rollback by lowering a row's length, tapped layer outputs for DSpark/DFlash
drafters, and logits only for the new-token positions the caller asks for (``logit_index``: the last real token
when prefilling, every position when verifying). Each layer's cache is one input/output pair, ``past_key.i`` -> ``present_key.i``,
which the runtime binds to the same memory so GroupQueryAttention writes the new tokens' K/V in place.

``quantize`` ("int4" or "int8") stores every projection, the LM head and the embedding block-wise quantized
(``MatMulNBits`` / ``GatherBlockQuantized``): a different model is decoded, with the same lossless contract;
int4 first rescales the projections' input channels by their calibration activations (AWQ's scaling, ``smooth``).
"w8a8" runs the projections and the LM head as ``DynamicQuantizeMatMul`` (int8 weights per output column,
activations quantized to int8 per call: ONNX Runtime's integer GEMM, on AMX/VNNI where the CPU has them, whose
cost barely grows with the number of new tokens) on a SmoothQuant-smoothed copy of the model (``smooth``); the
down projection stays int8 weight-only (see ``smooth`` for why) and the embedding 8-bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from dspark.errors import DsparkError
from dspark.export import smooth
from dspark.export.onnx import io_specs
from dspark.graphs.decoder import DecoderLM

OPSET = 21
QUANT_BITS = {"int4": 4, "int8": 8, "w8a8": 8}  # w8a8: the bits of its weight-only products and embedding
CALIBRATED = ("int4", "w8a8")  # rescaled on calibration activations first (int8 weight-only loses little without)
# under w8a8, the products that stay weight-only: their inputs' outliers defeat one activation scale per tensor
W8A8_WEIGHT_ONLY = ("down_proj",)
QUANT_BLOCK = 32
# MatMulNBits accuracy level 4: activations are quantized to int8 per block, so the products run on the CPU's
# integer dot-product units (VNNI/AMX); level 1 would compute in fp32 (T(1) 1.19x, T(8) 1.96x in one A/B here).
# Each row is quantized on its own, so a row's result does not depend on the call's other rows (checked for
# 1-16 rows at SmolLM2's shapes); it does amplify any rounding upstream (see ``_Lowering.build``).
QUANT_ACCURACY = 4
TORCH_TO_ONNX = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}


class _Graph:
    """Nodes, initializers and fresh names for one graph."""

    def __init__(self, float_type: int):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.float_type = float_type
        self.count = 0
        self.stored: set[str] = set()

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; a name asked for again (a weight used at every step of an unrolled loop) is the same."""
        if name not in self.stored:
            self.stored.add(name)
            array = np.asarray(array)  # (np.ascontiguousarray would turn a scalar into a 1-element vector)
            self.initializers.append(numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(), name))
        return name

    @property
    def np_float(self):
        return np.float16 if self.float_type == TensorProto.FLOAT16 else np.float32

    def weight(self, name: str, tensor: torch.Tensor) -> str:
        """A float weight in the graph's dtype (converted once, however often it is asked for)."""
        if name in self.stored:
            return name
        return self.const(name, tensor.detach().float().numpy().astype(self.np_float))

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "", **attrs) -> list[str]:
        names = [self.name(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name(op_type), domain=domain, **attrs))
        return names

    def op1(self, op_type: str, inputs: list[str], domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, 1, domain, **attrs)[0]


class _Blocks:
    """The fused building blocks every ORT-flavour graph is spelled in (this decoder's, a block drafter's in
    ``ort_drafter``): products, RMSNorms, per-head norms, rotary tables. ``g`` is the graph being built."""

    def __init__(self, dtype: torch.dtype, quantize: str | None, eps: float, head_dim: int):
        if dtype not in TORCH_TO_ONNX:
            raise DsparkError(f"the ONNX Runtime graph flavour supports fp32 and fp16 weights, not {dtype}")
        self.float_type = TORCH_TO_ONNX[dtype]
        self.quantize = quantize
        self.eps = eps
        self.head_dim = head_dim
        self.g = _Graph(self.float_type)

    # ------------------------------------------------------------------------------------ building blocks
    def linear(self, x: str, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> str:
        """x @ weight.T (+ bias); ``weight`` is torch's [out, in]."""
        g = self.g
        out_features, in_features = weight.shape
        if self.quantize == "w8a8" and not name.endswith(W8A8_WEIGHT_ONLY):
            data, scales = quantize_columns(weight)
            inputs = [x, g.const(name + ".qweight", data), g.const(name + ".scales", scales)]
            if bias is not None:
                inputs += ["", g.weight(name + ".bias", bias)]
            return g.op1("DynamicQuantizeMatMul", inputs, domain="com.microsoft")
        if self.quantize and in_features % QUANT_BLOCK == 0:
            if name + ".qweight" not in g.stored:
                packed, scales, zero_points = quantize_blocks(weight, QUANT_BITS[self.quantize])
                g.const(name + ".qweight", packed)
                g.const(name + ".scales", scales.astype(g.np_float))
                if zero_points is not None:
                    g.const(name + ".zero_points", zero_points)
            inputs = [x, name + ".qweight", name + ".scales"]
            if name + ".zero_points" in g.stored:
                inputs.append(name + ".zero_points")
            if bias is not None:  # input 5, after the optional zero points and g_idx
                inputs += [""] * (5 - len(inputs)) + [g.weight(name + ".bias", bias)]
            return g.op1("MatMulNBits", inputs, domain="com.microsoft", K=in_features, N=out_features,
                         bits=QUANT_BITS[self.quantize], block_size=QUANT_BLOCK, accuracy_level=QUANT_ACCURACY)
        y = g.op1("MatMul", [x, g.weight(name + ".weight_t", weight.T)])
        return g.op1("Add", [y, g.weight(name + ".bias", bias)]) if bias is not None else y

    def rms(self, x: str, weight: torch.Tensor, name: str) -> str:
        return self.g.op1("SimplifiedLayerNormalization", [x, self.g.weight(name, weight)], axis=-1,
                          epsilon=self.eps, stash_type=1)

    def skip_rms(self, x: str, skip: str, weight: torch.Tensor, name: str) -> tuple[str, str]:
        """(RMSNorm(x + skip), x + skip): the residual add fused into the next norm. Its optional mean and
        inverse-deviation outputs stay unnamed, so the kernel does not write them (0.14 ms of a SmolLM2 step)."""
        g = self.g
        out, total = g.name("skip_rms"), g.name("residual")
        g.op("SkipSimplifiedLayerNormalization", [x, skip, g.weight(name, weight)], [out, "", "", total],
             domain="com.microsoft", epsilon=self.eps)
        return out, total

    def head_norm(self, x: str, weight: torch.Tensor, heads: int, name: str) -> str:
        """Qwen3's per-head RMSNorm on q or k ([B, S, heads*D]) before rotary."""
        g, d = self.g, self.head_dim
        shaped = g.op1("Reshape", [x, g.const(name + ".shape", np.array([0, 0, heads, d], dtype=np.int64))])
        normed = self.rms(shaped, weight, name + ".weight")
        return g.op1("Reshape", [normed, g.const(name + ".back", np.array([0, 0, heads * d], dtype=np.int64))])

    def dim_i32(self, x: str, axis: int) -> str:
        """The size of ``x``'s axis ``axis`` at run time, as the int32 scalar GroupQueryAttention's inputs take."""
        g = self.g
        size = g.op1("Gather", [g.op1("Shape", [x]), g.const(f"axis{axis}", np.array(axis, np.int64))], axis=0)
        return g.op1("Cast", [size], to=TensorProto.INT32)

    def layer_tail(self, attended: str, residual: str, layer, prefix: str, next_norm: torch.Tensor,
                   next_norm_name: str) -> tuple[str, str]:
        """A decoder layer after its attention: o_proj, the residual add fused into the post-attention norm, the
        SwiGLU MLP, and its residual add fused into the next norm (the next layer's input norm or the final one).
        Returns (normed, residual) for what follows."""
        g, attn, mlp = self.g, layer.self_attn, layer.mlp
        o = self.linear(attended, attn.o_proj.weight, attn.o_proj.bias, prefix + "o_proj")
        normed, residual = self.skip_rms(o, residual, layer.post_attention_layernorm.weight,
                                         prefix + "post_attention_layernorm")
        # gate and up as two products, not one fused product and a Split: the Split's copy costs more than the
        # second call saves (ORT profile of SmolLM2's int4 step)
        gate = self.linear(normed, mlp.gate_proj.weight, mlp.gate_proj.bias, prefix + "gate_proj")
        up = self.linear(normed, mlp.up_proj.weight, mlp.up_proj.bias, prefix + "up_proj")
        act = g.op1("Mul", [g.op1("Mul", [gate, g.op1("Sigmoid", [gate])]), up])
        down = self.linear(act, mlp.down_proj.weight, mlp.down_proj.bias, prefix + "down_proj")
        return self.skip_rms(down, residual, next_norm, next_norm_name)

    def rotary_tables(self, inv_freq: torch.Tensor, positions: int) -> tuple[str, str]:
        """cos/sin [positions, head_dim/2] from a model's own inv_freq (default, linear or Llama 3 scaling)."""
        freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
        return self.g.weight("cos_cache", freqs.cos()), self.g.weight("sin_cache", freqs.sin())


class _Lowering(_Blocks):
    def __init__(self, model: DecoderLM, quantize: str | None, max_context: int, exact_rows: bool):
        self.m = model
        self.exact_rows = exact_rows
        self.c = model.config
        if self.c.head_dim % 16:
            raise DsparkError(f"the ONNX Runtime graph flavour needs a head size that is a multiple of 16 "
                              f"(GroupQueryAttention); this model's is {self.c.head_dim}: export with --runtime tensorrt")
        super().__init__(model.lm_head.weight.dtype, quantize, self.c.rms_norm_eps, self.c.head_dim)
        self.max_context = max_context

    # ------------------------------------------------------------------------------------ the graph
    def build(self) -> onnx.ModelProto:
        g, c, m = self.g, self.c, self.m
        body = m.model
        ids = "input_ids"
        # rows' cache state, in the int32 GroupQueryAttention reads: the query rows it attends, and the tokens in
        # the cache after the step minus one
        one = g.const("one_i32", np.array(1, np.int32))
        if self.exact_rows:
            # GroupQueryAttention computes a row with a single query token on another kernel path than a row with
            # several (ONNX Runtime 1.32, CPU), and the two round differently: a token's logits then depend on the
            # call that computes it (SmolLM2 fp32: up to 5e-5 between a 1-token step and the same position in a
            # verify call; int4 with int8 activations, which turn such rounding into whole quantization steps: 0.44,
            # enough to change greedy tokens). So every row attends its whole padded chunk plus one row of zeros,
            # all written to the cache past its real tokens (slots the next call overwrites), and the extra row's
            # output is dropped: a token's numbers are then the same in every call, and verifying K drafts decodes
            # exactly what K + 1 plain steps decode (the runtime reserves that row: dspark.bundle.SLOTS_PAST_CALL).
            # (Attending the padding too leaves no output row unwritten:
            # garbage there would reach the real rows through w8a8's per-call activation scale.)
            width = self.dim_i32(ids, 1)
            seqlens_k = g.op1("Add", ["cache_lens", width])
            query_rows = g.op1("Sub", [g.op1("Add", [seqlens_k, one]), "cache_lens"])
            pad_row = g.const("pad_one_row", np.array([0, 0, 0, 0, 1, 0], np.int64))
            drop_row = [g.const(n, np.array([v], np.int64))
                        for n, v in (("rows_from", 0), ("rows_to", -1), ("rows_axis", 1))]
        else:
            # floored at 0 for a row that has nothing cached and nothing new (a draft row joining with no token
            # to draft), which GroupQueryAttention would refuse as -1; such a row writes nothing
            query_rows = "query_lens"
            seqlens_k = g.op1("Max", [g.op1("Sub", [g.op1("Add", ["cache_lens", "query_lens"]), one]),
                                      g.const("zero_i32", np.array(0, np.int32))])
        # total_sequence_length: the buffer capacity (an upper bound once query_seqlens is fed)
        capacity = self.dim_i32("past_key.0", 2)
        cos, sin = self.rotary_tables(m.model.rotary_emb.inv_freq, self.max_context)

        h = self.embedding(ids)
        taps = {-1: h} if -1 in m.tap_layers else {}
        residual, normed = h, self.rms(h, body.layers[0].input_layernorm.weight, "layers.0.input_layernorm")
        q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        for i, layer in enumerate(body.layers):
            attn, prefix = layer.self_attn, f"layers.{i}."
            qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            qkv_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]) if c.qkv_bias else None
            qkv = self.linear(normed, qkv_w, qkv_b, prefix + "qkv_proj")
            if c.qk_norm:
                q, k, v = g.op("Split", [qkv, g.const(prefix + "qkv_split", np.array([q_size, kv_size, kv_size], np.int64))],
                               3, axis=-1)
                q = self.head_norm(q, attn.q_norm.weight, c.num_heads, prefix + "q_norm")
                k = self.head_norm(k, attn.k_norm.weight, c.num_kv_heads, prefix + "k_norm")
                qkv_inputs = [q, k, v]
            else:
                qkv_inputs = [qkv, "", ""]  # packed QKV
            if self.exact_rows:
                qkv_inputs = [g.op1("Pad", [x, pad_row]) if x else x for x in qkv_inputs]
            attended = g.op("GroupQueryAttention",
                            qkv_inputs + [f"past_key.{i}", f"past_value.{i}", seqlens_k, capacity, cos, sin]
                            + [""] * 7 + [query_rows],
                            [g.name("attn"), f"present_key.{i}", f"present_value.{i}"], domain="com.microsoft",
                            num_heads=c.num_heads, kv_num_heads=c.num_kv_heads, do_rotary=1, rotary_interleaved=0)[0]
            if self.exact_rows:
                attended = g.op1("Slice", [attended] + drop_row)
            last = i == c.num_layers - 1
            norm_w = body.norm.weight if last else body.layers[i + 1].input_layernorm.weight
            normed, residual = self.layer_tail(attended, residual, layer, prefix, norm_w,
                                               "norm" if last else f"layers.{i + 1}.input_layernorm")
            if i in m.tap_layers:
                taps[i] = residual
        self.logits(normed)
        outputs = ["logits"]
        if m.tap_layers:
            parts = [taps[i] for i in m.tap_layers]
            g.op("Concat" if len(parts) > 1 else "Identity", parts, ["hidden"], **({"axis": -1} if len(parts) > 1 else {}))
            outputs.append("hidden")
        return self.model(outputs)

    def embedding(self, ids: str) -> str:
        g, weight = self.g, self.m.model.embed_tokens.weight
        if self.quantize and weight.shape[1] % QUANT_BLOCK == 0:
            data, scales, zero_points = quantize_gather_blocks(weight)
            return g.op1("GatherBlockQuantized", [g.const("embed_tokens.qweight", data), ids,
                                                 g.const("embed_tokens.scales", scales.astype(g.np_float)),
                                                 g.const("embed_tokens.zero_points", zero_points)],
                         domain="com.microsoft", bits=8, block_size=QUANT_BLOCK,
                         gather_axis=0, quantize_axis=1)
        return g.op1("Gather", [g.weight("embed_tokens.weight", weight), ids], axis=0)

    def logits(self, normed: str) -> None:
        """The LM head on the rows ``logit_index`` names only, in fp32."""
        g, c = self.g, self.c
        picked = g.op1("GatherND", [normed, g.op1("Unsqueeze", ["logit_index", g.const("last_axis", np.array([-1], np.int64))])],
                       batch_dims=1)
        weight = self.m.lm_head.weight
        if self.quantize or not c.tie_word_embeddings:
            out = self.linear(picked, weight, None, "lm_head")
        else:
            # tied weights: one [V, d] tensor on disk serves the embedding's Gather and, transposed, this MatMul.
            # ONNX Runtime folds the Transpose of a constant once at load (the head then costs its memory twice, as
            # in onnxruntime-genai's graphs), and a MatMul on [d, V] runs 2 ms faster than Gemm with transB here.
            out = g.op1("MatMul", [picked, g.op1("Transpose", ["embed_tokens.weight"], perm=[1, 0])])
        g.op("Cast" if g.float_type != TensorProto.FLOAT else "Identity", [out], ["logits"],
             **({"to": TensorProto.FLOAT} if g.float_type != TensorProto.FLOAT else {}))

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        g, c = self.g, self.c
        kv = ["batch", c.num_kv_heads, "cache", c.head_dim]
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "new_tokens"]),
            helper.make_tensor_value_info("cache_lens", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("query_lens", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("logit_index", TensorProto.INT64, ["batch", "logit_rows"]),
        ]
        outs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "logit_rows", c.vocab_size])]
        if "hidden" in outputs:
            width = len(self.m.tap_layers) * c.hidden_size
            outs.append(helper.make_tensor_value_info("hidden", g.float_type, ["batch", "new_tokens", width]))
        for i in range(c.num_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", g.float_type, kv))
                outs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", g.float_type, kv))
        graph = helper.make_graph(g.nodes, "dspark_decoder_step", inputs, outs, g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        return model


def quantize_blocks(weight: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits operands for torch's [out, in] weight (ONNX Runtime's own block quantizer): packed
    [out, in/32, 32*bits/8], scales, and uint8 zero points, or None where the blocks are symmetric.

    4 bits are symmetric (no zero points, as onnxruntime-genai's builder writes them): the CPU kernel skips the
    zero-point work (SmolLM2's int4 MatMulNBits 8.39 -> 8.03 ms a step) and, after the activation-aware
    rescaling, perplexity is no worse (textwrap.py 16.62 -> 16.52, difflib.py 19.57 -> 19.72, torch/__init__.py
    15.14 -> 13.83). 8 bits keep min/max zero points. Zero points stay integers: the CPU kernel also takes float
    zero points for 4 bits, which would store a Q4_1 GGUF's blocks exactly, but then runs a slow path (SmolLM2's
    int4 step about 9x slower here) and refuses them for 8 bits.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = weight.shape
    blocks = k // QUANT_BLOCK
    per_byte = 8 // bits
    w = np.ascontiguousarray(weight.detach().float().numpy().T)  # [K, N], the layout the quantizer reads
    packed = np.zeros((n, blocks, QUANT_BLOCK // per_byte), dtype=np.uint8)
    zero_points = np.zeros((n, (blocks + per_byte - 1) // per_byte), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    symmetric = bits == 4
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, w, scales, zero_points, QUANT_BLOCK, n, k,
                                                                    symmetric)
    return packed, scales.reshape(-1), None if symmetric else zero_points.reshape(-1)


def quantize_columns(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """DynamicQuantizeMatMul operands for torch's [out, in] weight: int8 [in, out] and one scale per output column
    (symmetric: max |w| of the column maps to 127, so no zero points)."""
    w = weight.detach().float().numpy().T
    scales = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
    data = np.clip(np.rint(w / scales), -127, 127).astype(np.int8)
    return data, scales.astype(np.float32)


def quantize_gather_blocks(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GatherBlockQuantized operands for an embedding [V, d], 8 bits (its kernel takes integer zero points only;
    a lookup reads one row per token, so the wider type costs memory, not time)."""
    packed, scales, zero_points = quantize_blocks(weight, 8)
    v, d = weight.shape
    return packed.reshape(v, d), scales.reshape(v, -1), zero_points.reshape(v, -1)


def lower_decoder(model: DecoderLM, path: str | Path, max_context: int, quantize: str | None = None,
                  calibration: list[int] | None = None, exact_rows: bool = True):
    """Write the ORT-flavour step graph of ``model`` to ``path`` (+ ``path.data``); return its I/O specs.
    ``calibration``: token ids whose activations set the rescaling before quantizing (required for the kinds in
    ``CALIBRATED``; ``smooth`` has why and what it buys). ``exact_rows``: a token's numbers do not depend on the
    call that computes it (see ``build``; it costs 2-4% of a one-token step), which the target's graph needs and a
    draft LM's, whose tokens are only proposals, does not."""
    path = Path(path)
    if quantize in CALIBRATED:
        model = (smooth.smoothed if quantize == "w8a8" else smooth.activation_scaled)(model, calibration)
    onnx_model = _Lowering(model, quantize, max_context, exact_rows).build()
    onnx.save_model(onnx_model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    # no onnx.checker here: SimplifiedLayerNormalization is an ONNX Runtime op in the default domain, unknown to
    # the checker; ONNX Runtime validates the graph when a session loads it
    return io_specs(onnx_model.graph.input), io_specs(onnx_model.graph.output)
