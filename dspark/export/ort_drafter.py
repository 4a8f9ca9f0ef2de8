"""The ONNX Runtime lowering of a DSpark / DFlash drafter's two graphs, in the decoder's fused building blocks.

The same ``Drafter`` that torch exports as standard ONNX operators for TensorRT (``dspark.export.drafter``) is
written here node by node with ``ort_graph``'s blocks: RMSNorms as ``SimplifiedLayerNormalization`` and
``SkipSimplifiedLayerNormalization`` (residual adds fused), rotary as ``RotaryEmbedding``, products as MatMul on
weights stored [in, out] (or ``MatMulNBits`` when quantized). The block's attention is bidirectional over the
cached context, which ``GroupQueryAttention`` (causal) cannot express, so it is one opset-23 ``Attention`` node
(grouped KV heads, a boolean mask for each row's cache length). The Markov stage stays unrolled over the block,
one step per drafted token, as in torch.

Inputs, outputs and their meaning are the torch export's (``export_drafter``'s docstring), so the runtime and
the C++ host feed either flavour alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from dspark.export.onnx import io_specs
from dspark.export.ort_graph import _Blocks, _Graph
from dspark.graphs.drafter import Drafter

# opset 23 for Attention; com.microsoft for the fused norms, rotary and MatMulNBits
OPSET = 23


class _DrafterLowering(_Blocks):
    def __init__(self, drafter: Drafter, quantize: str | None, positions: int):
        c = drafter.config
        # a drafter's products are weight-only quantized at any kind (its activations need no per-call scale)
        super().__init__(drafter.fc.weight.dtype, "int8" if quantize == "w8a8" else quantize, c.rms_norm_eps,
                         c.head_dim)
        self.d, self.c, self.positions = drafter, c, positions

    # ------------------------------------------------------------------------------------ helpers
    def const_i64(self, name: str, values) -> str:
        return self.g.const(name, np.array(values, np.int64))

    def rotary(self, x: str, positions: str, heads: int) -> str:
        """Rotate [B, S, heads*D] at positions [B, S] (the half-split layout of ``graphs.decoder.rotate``)."""
        return self.g.op1("RotaryEmbedding", [x, positions, self.cos, self.sin], domain="com.microsoft",
                          interleaved=0, num_heads=heads)

    def to_float(self, x: str) -> str:
        return x if self.float_type == TensorProto.FLOAT else self.g.op1("Cast", [x], to=TensorProto.FLOAT)

    def stack_layers(self, parts: list[str], output: str) -> None:
        """[B, Hkv, S, D] per layer -> [L, B, Hkv, S, D] named ``output``."""
        g = self.g
        expanded = [g.op1("Unsqueeze", [p, self.const_i64("first_axis", [0])]) for p in parts]
        g.op("Concat" if len(expanded) > 1 else "Identity", expanded, [output],
             **({"axis": 0} if len(expanded) > 1 else {}))

    def new_graph(self) -> None:
        self.g = _Graph(self.float_type)
        self.cos, self.sin = self.rotary_tables(self.d.rotary_emb.inv_freq, self.positions)

    # ------------------------------------------------------------------------------------ draft_context
    def context(self) -> onnx.ModelProto:
        """features [B, C, m*d], positions [B, C] -> ctx_k, ctx_v [L_d, B, Hkv, C, D]."""
        self.new_graph()
        g, c, d = self.g, self.c, self.d
        ctx = self.rms(self.linear("features", d.fc.weight, None, "fc"), d.hidden_norm.weight, "hidden_norm")
        heads_first = self.const_i64("kv_heads_shape", [0, 0, c.num_kv_heads, c.head_dim])
        keys, values = [], []
        for i, layer in enumerate(d.layers):
            attn, p = layer.self_attn, f"layers.{i}.self_attn."
            k = self.linear(ctx, attn.k_proj.weight, attn.k_proj.bias, p + "k_proj")
            k = self.rotary(self.head_norm(k, attn.k_norm.weight, c.num_kv_heads, p + "k_norm"), "positions",
                            c.num_kv_heads)
            v = self.linear(ctx, attn.v_proj.weight, attn.v_proj.bias, p + "v_proj")
            keys.append(g.op1("Transpose", [g.op1("Reshape", [k, heads_first])], perm=[0, 2, 1, 3]))
            values.append(g.op1("Transpose", [g.op1("Reshape", [v, heads_first])], perm=[0, 2, 1, 3]))
        self.stack_layers(keys, "ctx_k")
        self.stack_layers(values, "ctx_v")
        kv = [c.num_layers, "batch", c.num_kv_heads, "context", c.head_dim]
        return self.model("dspark_draft_context", [
            helper.make_tensor_value_info("features", self.float_type, ["batch", "context", c.feature_size]),
            helper.make_tensor_value_info("positions", TensorProto.INT64, ["batch", "context"]),
        ], [helper.make_tensor_value_info("ctx_k", self.float_type, kv),
            helper.make_tensor_value_info("ctx_v", self.float_type, kv)])

    # ------------------------------------------------------------------------------------ draft_propose
    def propose(self) -> onnx.ModelProto:
        """anchor, start, cache_lens [B], past_k/v [L_d, B, Hkv, S, D], temperature [B], noise [B, block] ->
        draft_tokens [B, block], draft_probs [B, block, N], confidence_logits [B, block]."""
        self.new_graph()
        g, c, d = self.g, self.c, self.d
        n = c.block_size
        batch = g.op1("Shape", ["anchor"])
        second = self.const_i64("second_axis", [1])
        # the block [anchor, mask x (n-1)] at positions start .. start + n - 1
        masks = g.op1("Expand", [self.const_i64("mask_ids", [[c.mask_token_id] * (n - 1)]),
                                 g.op1("Concat", [batch, self.const_i64("masks", [n - 1])], axis=0)])
        ids = g.op1("Concat", [g.op1("Unsqueeze", ["anchor", second]), masks], axis=1)
        positions = g.op1("Add", [g.op1("Unsqueeze", ["start", second]), self.const_i64("block_offsets", [list(range(n))])])
        # which keys a row may read: its cached context below cache_lens, then the whole block (no mask inside it)
        cache = g.op1("Gather", [g.op1("Shape", ["past_k"]), self.const_i64("cache_axis", 3)], axis=0)
        slots = g.op1("Range", [self.const_i64("zero", 0), cache, self.const_i64("step", 1)])
        cached = g.op1("Less", [g.op1("Unsqueeze", [slots, self.const_i64("first_axis", [0])]),
                                g.op1("Unsqueeze", ["cache_lens", second])])
        block = g.op1("Expand", [g.const("block_visible", np.ones((1, n), bool)),
                                 g.op1("Concat", [batch, self.const_i64("block_width", [n])], axis=0)])
        visible = g.op1("Unsqueeze", [g.op1("Concat", [cached, block], axis=1), self.const_i64("mask_axes", [1, 2])])
        # one mask row per query row: Attention does not broadcast the mask over them
        visible = g.op1("Expand", [visible, self.const_i64("mask_rows", [1, 1, n, 1])])

        h = g.op1("Gather", [g.weight("embed_tokens.weight", d.embed_tokens.weight), ids], axis=0)
        normed = self.rms(h, d.layers[0].input_layernorm.weight, "layers.0.input_layernorm")
        residual = h
        for i, layer in enumerate(d.layers):
            attn, p = layer.self_attn, f"layers.{i}."
            q = self.linear(normed, attn.q_proj.weight, attn.q_proj.bias, p + "q_proj")
            k = self.linear(normed, attn.k_proj.weight, attn.k_proj.bias, p + "k_proj")
            v = self.linear(normed, attn.v_proj.weight, attn.v_proj.bias, p + "v_proj")
            q = self.rotary(self.head_norm(q, attn.q_norm.weight, c.num_heads, p + "q_norm"), positions, c.num_heads)
            k = self.rotary(self.head_norm(k, attn.k_norm.weight, c.num_kv_heads, p + "k_norm"), positions,
                            c.num_kv_heads)
            layer_index = self.const_i64(p + "index", i)
            past = [g.op1("Gather", [name, layer_index], axis=0) for name in ("past_k", "past_v")]
            # the kernel insists on writing past + block K/V out when given a past; nothing reads them
            attended = g.op("Attention", [q, k, v, visible] + past, 3, q_num_heads=c.num_heads,
                            kv_num_heads=c.num_kv_heads)[0]
            final = i == c.num_layers - 1
            norm_w = d.norm.weight if final else d.layers[i + 1].input_layernorm.weight
            normed, residual = self.layer_tail(attended, residual, layer, p, norm_w,
                                               "norm" if final else f"layers.{i + 1}.input_layernorm")
        base = self.to_float(self.head(normed))  # [B, n, N]
        temperature = g.op1("Unsqueeze", ["temperature", second])  # [B, 1]
        self.any_hot = g.op1("Greater", [g.op1("ReduceMax", ["temperature"], keepdims=0),
                                         g.const("zero_f", np.array(0, np.float32))])  # does any row sample?
        if c.markov_rank == 0:
            last = self.const_i64("last_axis", [-1])
            index, probs = self.sample(base, g.op1("Unsqueeze", [temperature, last]), g.op1("Unsqueeze", ["noise", last]))
            conf = (g.op1("Squeeze", [self.to_float(self.confidence(normed)), last]) if c.enable_confidence_head
                    else self.zeros(batch, n))
        else:
            index, probs, conf = self.markov(normed, base, temperature, batch)
        tokens = index if not c.draft_vocab_size else g.op1("Gather", [self.const_i64("draft_vocab", d.draft_vocab.numpy()), index], axis=0)
        g.op("Identity", [tokens], ["draft_tokens"])
        g.op("Identity", [probs], ["draft_probs"])
        g.op("Identity", [conf], ["confidence_logits"])
        kv = [c.num_layers, "batch", c.num_kv_heads, "cache", c.head_dim]
        return self.model("dspark_draft_propose", [
            helper.make_tensor_value_info("anchor", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("start", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("cache_lens", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("past_k", self.float_type, kv),
            helper.make_tensor_value_info("past_v", self.float_type, kv),
            helper.make_tensor_value_info("temperature", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["batch", n]),
        ], [helper.make_tensor_value_info("draft_tokens", TensorProto.INT64, ["batch", n]),
            helper.make_tensor_value_info("draft_probs", TensorProto.FLOAT, ["batch", n, c.head_size]),
            helper.make_tensor_value_info("confidence_logits", TensorProto.FLOAT, ["batch", n])])

    def head(self, normed: str) -> str:
        """The LM head over the drafter's vocabulary. The whole target vocabulary's head is the embedding's
        transpose (one tensor on disk, shared with the target's graph, folded by ONNX Runtime at load)."""
        d, g = self.d, self.g
        tied = (not self.c.draft_vocab_size and not self.quantize
                and torch.equal(d.lm_head.weight, d.embed_tokens.weight))
        if tied:
            return g.op1("MatMul", [normed, g.op1("Transpose", ["embed_tokens.weight"], perm=[1, 0])])
        return self.linear(normed, d.lm_head.weight, None, "lm_head")

    def confidence(self, features: str) -> str:
        proj = self.d.confidence_head.proj
        return self.linear(features, proj.weight, proj.bias, "confidence_head.proj")

    def zeros(self, batch: str, n: int) -> str:
        g = self.g
        return g.op1("ConstantOfShape", [g.op1("Concat", [batch, self.const_i64("zeros_width", [n])], axis=0)],
                     value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))

    def sample(self, logits: str, temperature: str, noise: str) -> tuple[str, str]:
        """``graphs.drafter.sample_rows``: tokens and q = softmax(logits / T) over the last axis; temperature and
        noise are broadcast to logits' shape but for that axis (of size 1). When no row samples, an ``If`` skips
        the inverse-CDF draw (cumulative sums over the vocabulary, a quarter of a greedy round's kernel time)."""
        return tuple(self.branch(self.any_hot, lambda: self.draw(logits, temperature, noise),
                                 lambda: self.pick(logits), [TensorProto.INT64, TensorProto.FLOAT]))

    def pick(self, logits: str) -> tuple[str, str]:
        """Greedy rows: the argmax over the last axis (dropped) and q = softmax(logits)."""
        g = self.g
        return g.op1("ArgMax", [logits], axis=-1, keepdims=0), g.op1("Softmax", [logits], axis=-1)

    def draw(self, logits: str, temperature: str, noise: str) -> tuple[str, str]:
        """Rows with a temperature draw by inverse CDF at ``noise``; rows at temperature 0 take the argmax."""
        g = self.g
        hot = g.op1("Greater", [temperature, g.const("zero_f", np.array(0, np.float32))])
        divisor = g.op1("Where", [hot, temperature, g.const("one_f", np.array(1, np.float32))])
        probs = g.op1("Softmax", [g.op1("Div", [logits, divisor])], axis=-1)
        cdf = g.op1("CumSum", [probs, g.const("cumsum_axis", np.array(-1, np.int64))])
        total = g.op1("Slice", [cdf, self.const_i64("last_from", [-1]),
                                self.const_i64("last_to", [np.iinfo(np.int64).max]), self.const_i64("last_axis", [-1])])
        below = g.op1("Less", [cdf, g.op1("Mul", [noise, total])])
        drawn = g.op1("ReduceSum", [g.op1("Cast", [below], to=TensorProto.INT64), self.const_i64("last_axis", [-1])],
                      keepdims=0)
        drawn = g.op1("Min", [drawn, self.const_i64("top_index", self.c.head_size - 1)])
        index = g.op1("Where", [g.op1("Squeeze", [hot, self.const_i64("last_axis", [-1])]), drawn,
                                g.op1("ArgMax", [logits], axis=-1, keepdims=0)])
        return index, probs

    def branch(self, condition: str, then, otherwise, types: list[int]) -> list[str]:
        """An ``If`` node whose branches are what ``then()`` and ``otherwise()`` build (both return names of
        outputs of ``types``); the branches read the enclosing graph's values and initializers."""
        g, outer, bodies = self.g, self.g.nodes, []
        for build in (then, otherwise):
            g.nodes = []
            names = build()
            bodies.append(helper.make_graph(g.nodes, g.name("branch"), [], [
                helper.make_tensor_value_info(name, kind, None) for name, kind in zip(names, types)]))
            g.nodes = outer
        return g.op("If", [condition], len(types), then_branch=bodies[0], else_branch=bodies[1])

    def markov(self, normed: str, base: str, temperature: str, batch: str) -> tuple[str, str, str]:
        """The sequential stage: each drafted token's W1 row biases the next position's logits. The unrolled
        steps keep a position axis of size 1 ([B, 1, .]) so they need no reshapes, the whole loop sits in one
        ``If`` (greedy or sampled) instead of one per position, and the confidence head runs once over the block
        after it: the SmolLM2 drafter runs 121 nodes a greedy call instead of 176, 3-4% faster (fp32 3.20 -> 3.11 ms,
        int8 1.90 -> 1.83 ms; ``bench/draft_graphs_ab.py``)."""
        g, c, d = self.g, self.c, self.d
        n, w1 = c.block_size, g.weight("markov_head.markov_w1.weight", d.markov_head.markov_w1.weight)
        second = self.const_i64("second_axis", [1])
        anchor = g.op1("Unsqueeze", ["anchor", second])  # [B, 1]
        if c.draft_vocab_size:
            anchor = g.op1("Gather", [self.const_i64("vocab_index", d.vocab_index.numpy()), anchor], axis=0)
        bases = g.op("Split", [base], n, axis=1, num_outputs=n)  # n x [B, 1, N]
        # a gated or rnn head also reads each position's hidden state
        hidden = g.op("Split", [normed], n, axis=1, num_outputs=n) if d.markov_head.kind != "vanilla" else None

        def steps(choose):
            return self.markov_steps(w1, anchor, bases, hidden, batch, choose)

        def greedy():
            return steps(lambda logits, k: self.pick(logits))

        def sampled():
            temperatures = g.op1("Unsqueeze", [temperature, self.const_i64("last_axis", [-1])])  # [B, 1, 1]
            noises = g.op("Split", [g.op1("Unsqueeze", ["noise", self.const_i64("last_axis", [-1])])], n, axis=1,
                          num_outputs=n)
            return steps(lambda logits, k: self.draw(logits, temperatures, noises[k]))

        index, probs = self.branch(self.any_hot, sampled, greedy, [TensorProto.INT64, TensorProto.FLOAT])
        if not c.enable_confidence_head:
            return index, probs, self.zeros(batch, n)
        # the W1 row each position's bias read: the anchor's, then each drafted index's but the last
        drafted = g.op1("Slice", [index, self.const_i64("first", [0]), self.const_i64("all_but_last", [n - 1]), second])
        confidence_in = normed
        if c.confidence_uses_markov:
            rows = g.op1("Gather", [w1, g.op1("Concat", [anchor, drafted], axis=1)], axis=0)  # [B, n, r]
            confidence_in = g.op1("Concat", [normed, rows], axis=-1)
        return index, probs, g.op1("Squeeze", [self.to_float(self.confidence(confidence_in)),
                                               self.const_i64("last_axis", [-1])])

    def markov_steps(self, w1: str, anchor: str, bases: list[str], hidden: list[str] | None, batch: str, choose):
        """The unrolled Markov head over W1 ``w1``: ``choose(logits [B, 1, N], k)`` -> (index [B, 1], q [B, 1, N])
        at each position (``hidden``: each position's [B, 1, d] state, for a gated or rnn head). Returns the drafted
        indices [B, n] and their laws [B, n, N]."""
        g, c, head = self.g, self.c, self.d.markov_head
        prev, state, tokens, probs = anchor, None, [], []
        if head.kind == "rnn":
            state = g.op1("Expand", [g.weight("rnn_state0", torch.zeros(1, 1, c.markov_rank)),
                                     g.op1("Concat", [batch, self.const_i64("one_rank", [1, c.markov_rank])], axis=0)])
        for k, base in enumerate(bases):
            e = g.op1("Gather", [w1, prev], axis=0)  # [B, 1, r]
            if head.kind == "vanilla":
                bias_in = e
            elif head.kind == "gated":
                gate = g.op1("Sigmoid", [self.linear(g.op1("Concat", [hidden[k], e], axis=-1), head.gate_proj.weight,
                                                     head.gate_proj.bias, "markov_head.gate_proj")])
                bias_in = g.op1("Mul", [gate, e])
            else:
                joint = self.linear(g.op1("Concat", [state, e, hidden[k]], axis=-1), head.joint_proj.weight,
                                    head.joint_proj.bias, "markov_head.joint_proj")
                gamma, cand, out = g.op("Split", [joint], 3, axis=-1, num_outputs=3)
                keep = g.op1("Sigmoid", [gamma])
                # keep * state + (1 - keep) * tanh(cand), as state + (1 - keep) * (tanh(cand) - state)
                state = g.op1("Add", [state, g.op1("Mul", [g.op1("Sub", [g.const("one_h", np.array(1, g.np_float)), keep]),
                                                          g.op1("Sub", [g.op1("Tanh", [cand]), state])])])
                bias_in = g.op1("Tanh", [out])
            bias = self.to_float(self.linear(bias_in, head.markov_w2.weight, None, "markov_head.markov_w2"))
            prev, q = choose(g.op1("Add", [base, bias]), k)  # a drafted index is its own W1 row
            tokens.append(prev)
            probs.append(q)
        return g.op1("Concat", tokens, axis=1), g.op1("Concat", probs, axis=1)

    def model(self, name: str, inputs: list, outputs: list) -> onnx.ModelProto:
        graph = helper.make_graph(self.g.nodes, name, inputs, outputs, self.g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        return model


def lower_drafter(drafter: Drafter, folder: str | Path, files: dict[str, str], positions: int,
                  quantize: str | None = None) -> dict:
    """Write the ORT-flavour draft_context and draft_propose graphs into ``folder`` (``files``: graph -> file name);
    ``positions`` bounds the rotary tables (the bundle's context plus a block). Returns {file: (inputs, outputs)}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lowering = _DrafterLowering(drafter, quantize, positions)
    results = {}
    for graph, build in (("context", lowering.context), ("propose", lowering.propose)):
        model, path = build(), folder / files[graph]
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        results[path.name] = io_specs(model.graph.input), io_specs(model.graph.output)
    return results
