"""Tiny random checkpoints built offline with transformers, bundles exported from them once per session, and
helpers the server tests share (a CLI server, server-sent events, the sixteen-request greedy check)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dspark.export.bundle import ExportOptions, export_bundle  # noqa: E402


def word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over 'w0 .. wN' (id 0 is the end-of-text token): real files, exact round trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<eos>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 0}))


SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


def hf_model(family: str, vocab_size: int, seed: int, **overrides):
    torch.manual_seed(seed)
    common = dict(SIZES, vocab_size=vocab_size, max_position_embeddings=512, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    common.update(overrides)
    if family == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    elif family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_parameters=rope, **common))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # random norms and biases, so a norm or bias mix-up shows in the logits
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            # sharper logits than the 0.02 init: greedy margins well above fp32 round-off
            if "lm_head" in name or "embed" in name:
                p.mul_(20)
    return model.eval()


def save_hf(model, folder: Path, vocab_size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    word_tokenizer(folder, vocab_size)
    return folder


def noisy_copy(model, scale: float, seed: int):
    """A draft that agrees with the target often but not always."""
    import copy

    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.std() * torch.randn_like(p))
    return draft


def reduced_draft_lm(target, folder: Path, draft_vocab: list[int], noise: float, seed: int) -> Path:
    """A draft LM over a reduced vocabulary: a noisy copy of ``target`` whose embedding and LM head keep the rows of
    ``draft_vocab`` (its ids 0..N-1) and add one row (id N) for every other token, saved in the layout
    ``dspark train-draft --draft-vocab`` writes (``draft_vocab_size`` in config.json, the ``draft_vocab`` tensor)."""
    import copy

    from safetensors.torch import load_file, save_file

    draft = noisy_copy(target, noise, seed)
    ids = torch.tensor(draft_vocab)
    others = torch.ones(target.config.vocab_size, dtype=torch.bool)
    others[ids] = False
    config = copy.deepcopy(draft.config)
    config.vocab_size = len(draft_vocab) + 1
    reduced = type(draft)(config)
    state = {k: v for k, v in draft.state_dict().items() if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    rows = lambda w: torch.cat([w[ids], w[others].mean(0, keepdim=True)])  # noqa: E731
    state["model.embed_tokens.weight"] = rows(draft.model.embed_tokens.weight.detach())
    state["lm_head.weight"] = rows(draft.lm_head.weight.detach())
    reduced.load_state_dict(state)
    save_hf(reduced.eval(), folder, target.config.vocab_size)  # the target's tokenizer
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "draft_vocab": ids}, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "draft_vocab_size": len(draft_vocab)}))
    return folder


VOCAB = 96
# DeepSpec drafter variants: (markov_rank, markov_head_type, confidence head)
VARIANTS = {"vanilla": (8, "vanilla", True), "gated": (8, "gated", True), "rnn": (8, "rnn", True), "dflash": (0, None, False),
            "reduced": (8, "vanilla", True)}


def reduced_vocab(vocab: int) -> list[int]:
    """The draft vocabulary of the ``reduced`` variant: the odd ids, largest first (not sorted, not a prefix)."""
    return list(range(vocab - 1, 0, -2))


def deepspec_drafter(target, target_dir: Path, folder: Path, variant: str, block_size: int) -> Path:
    """A DeepSpec-layout drafter with random trainable weights and the target's embedding and LM head; the
    ``reduced`` variant predicts over half the vocabulary only (``reduced_vocab``)."""
    from dspark.graphs.decoder import DecoderConfig
    from dspark.graphs.drafter import Drafter, DrafterConfig, deepspec_config, save_deepspec

    rank, kind, confidence = VARIANTS[variant]
    target_cfg = json.loads((target_dir / "config.json").read_text())
    vocab = target_cfg["vocab_size"]
    subset = torch.tensor(reduced_vocab(vocab)) if variant == "reduced" else None
    cfg = deepspec_config(target_cfg, block_size, 2, [0, 1], vocab - 1, rank, kind, confidence,
                          draft_vocab_size=0 if subset is None else len(subset))
    config = DrafterConfig.from_hf(cfg, DecoderConfig.from_hf(target_cfg))
    drafter = Drafter.random(config, target.model.embed_tokens.weight, target.lm_head.weight, seed=5,
                             draft_vocab=subset)
    return save_deepspec(folder, cfg, drafter)


# every speculative-decoding test runs on each: ONNX Runtime over the exported graphs, and the torch modules
# they were exported from (``dspark.runtime.torch_runner``) on the CPU
BACKENDS = ("ort", "torch")


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request):
    if request.param != "torch":
        yield request.param
        return
    # these models are tiny: one intra-op thread, since more only contend for the two shared cores
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield request.param
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def qwen3_pair(models_dir):
    """(target model, target dir, draft dir): a Qwen3 target and a noisy copy as its draft LM."""
    target = hf_model("qwen3", VOCAB, seed=1)
    draft = noisy_copy(target, 0.3, seed=2)
    return target, save_hf(target, models_dir / "qwen3-target", VOCAB), save_hf(draft, models_dir / "qwen3-draft", VOCAB)


@pytest.fixture(scope="session")
def qwen3_bundle(qwen3_pair, tmp_path_factory) -> Path:
    _, target_dir, draft_dir = qwen3_pair
    out = tmp_path_factory.mktemp("bundles") / "qwen3"
    export_bundle(target_dir, out, draft_dir, ExportOptions(max_batch=8, max_context=256, prefill_chunk=32,
                                                          num_draft_tokens=6), progress=False)
    return out


@pytest.fixture(scope="session")
def reduced_lm_bundle(qwen3_pair, models_dir, tmp_path_factory) -> Path:
    """The qwen3 target with a draft LM over half its vocabulary (``reduced_vocab``)."""
    target, target_dir, _ = qwen3_pair
    draft_dir = reduced_draft_lm(target, models_dir / "qwen3-reduced-draft", reduced_vocab(VOCAB), 0.3, seed=2)
    out = tmp_path_factory.mktemp("bundles") / "qwen3-reduced-lm"
    export_bundle(target_dir, out, draft_dir, ExportOptions(max_batch=8, max_context=256, prefill_chunk=32,
                                                          num_draft_tokens=4), progress=False)
    return out


@pytest.fixture(scope="session")
def qwen3_trt_bundle(qwen3_pair, tmp_path_factory) -> Path:
    """The draft-LM bundle of ``qwen3_bundle`` in the standard-operator flavour TensorRT takes."""
    _, target_dir, draft_dir = qwen3_pair
    out = tmp_path_factory.mktemp("bundles") / "qwen3-trt"
    export_bundle(target_dir, out, draft_dir, ExportOptions(max_batch=8, max_context=256, prefill_chunk=32,
                                                          num_draft_tokens=6, runtime="tensorrt"), progress=False)
    return out


@pytest.fixture(scope="session")
def dspark_bundle(qwen3_pair, tmp_path_factory) -> Path:
    """A DSpark (vanilla Markov head, confidence head, block 5) bundle over the qwen3 target."""
    target, target_dir, _ = qwen3_pair
    root = tmp_path_factory.mktemp("dspark")
    draft_dir = deepspec_drafter(target, target_dir, root / "draft", "vanilla", block_size=5)
    export_bundle(target_dir, root / "bundle", draft_dir, ExportOptions(max_batch=8, max_context=256, prefill_chunk=32),
                  progress=False)
    return root / "bundle"


@contextlib.contextmanager
def cli_server(bundle: Path, *options: str):
    """``dspark serve BUNDLE OPTIONS`` as a subprocess on a free loopback port, up and healthy: yields (process, url).

    Killed at exit if the test has not stopped it."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dspark.cli", "serve", str(bundle), "--port", str(port), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def sse_events(lines):
    """Parse 'data: ...' lines strictly; returns (json chunks, saw [DONE] last)."""
    chunks, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        assert not done, "data after [DONE]"
        payload = line[len("data: "):]
        if payload == "[DONE]":
            done = True
        else:
            chunks.append(json.loads(payload))
    return chunks, done


def stream_post(client, path, body):
    """POST ``body`` with ``stream: true`` through an httpx client: (json chunks, saw [DONE] last)."""
    with client.stream("POST", path, json=dict(body, stream=True)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(list(r.iter_lines()))


def check_sixteen_concurrent_greedy(client, bundle: Path) -> None:
    """16 concurrent greedy completions (odd ones streamed) through ``client`` equal the Generator's own."""
    from concurrent.futures import ThreadPoolExecutor

    from dspark.runtime.generate import Generator, Request

    prompts = [f"w{i + 1} w{i + 20}" for i in range(16)]
    lengths = [6 + (i % 5) * 3 for i in range(16)]
    plain = Generator(bundle, threads=1, use_draft=False)
    refs = plain.generate([Request(plain.tokenizer.encode(p), n, ignore_eos=True) for p, n in zip(prompts, lengths)])

    def one(i):
        body = {"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0, "ignore_eos": True}
        if i % 2:
            chunks, done = stream_post(client, "/v1/completions", body)
            assert done and chunks[-1]["choices"][0]["finish_reason"] == "length"
            return "".join(c["choices"][0]["text"] for c in chunks)
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, range(16)))
    assert texts == [s.text for s in refs]


def assert_speculative_equals_plain(spec, plain, prompts, max_new_tokens: int) -> list[list[int]]:
    """Each prompt alone: the speculative tokens equal the plain ones, and over all prompts drafts were both
    accepted and rejected (so rollback was exercised). Returns the tokens per prompt."""
    from dspark.runtime.generate import Request

    outputs, accepted, verified = [], 0, 0
    for prompt in prompts:
        request = Request(prompt, max_new_tokens=max_new_tokens, ignore_eos=True)
        got = spec.generate([request])[0]
        assert got.generated == plain.generate([request])[0].generated, f"prompt {prompt[:5]}"
        assert len(got.generated) == max_new_tokens
        outputs.append(got.generated)
        accepted, verified = accepted + sum(got.accepted), verified + sum(got.verified)
    assert 0 < accepted < verified
    return outputs


def made_up_profile(bundle: Path, steps_per_second, backend: str = "ort", draft_seconds=None, **fields) -> None:
    """Profile ``bundle`` for this machine with a made-up table, ``steps_per_second(rows, width)`` at 1, 2 and the
    most rows, and ``draft_seconds(rows)`` where given (``fields``: more of the profile's, such as
    ``draft_cost_per_position``): whether sps verifies, and whether a round drafts, must not hang on how busy the
    machine is while a test runs."""
    from dspark.bundle import Bundle
    from dspark.runtime.schedulers import profile_key

    limits = Bundle.open(bundle).limits
    rows, widths = [1, 2, limits.max_batch], list(range(1, limits.max_verify_tokens + 1))
    table = {"rows": rows, "widths": widths, "steps_per_second": [[steps_per_second(r, w) for w in widths] for r in rows]}
    if draft_seconds:
        table["draft_seconds"] = [draft_seconds(r) for r in rows]
    Bundle.open(bundle).add_file(profile_key(backend), json.dumps(table | fields))


def cheap_verify(rows: int, width: int) -> float:
    """Steps/s of a made-up machine whose verify calls cost 2% more a token."""
    return 100 / (1 + 0.02 * (width - 1))


def steep_from_two_rows(bundle: Path) -> None:
    """One request verifies drafts cheaply; two or more never gain by verifying any (a 2-token verify costs two
    steps)."""
    made_up_profile(bundle, lambda rows, width: cheap_verify(rows, width) if rows == 1 else 100 / width)


def dear_drafts_from_two_rows(bundle: Path) -> None:
    """Verify calls are cheap at any number of rows, but a draft round over two rows or more costs 10 s: once sps
    has seen what drafts are worth, it drafts for one request only."""
    made_up_profile(bundle, cheap_verify, draft_seconds=lambda rows: 1e-6 if rows == 1 else 10.0,
                    draft_read_seconds=[0.0] * 3)


def assert_token_numbers_ignore_the_call(bundle_dir: Path) -> None:
    """A token's logits and K/V are the same bits whichever target call computes it: alone or first of a wider
    call, after a prompt fed in other chunks (one ending in a single token), beside another row in a batch.
    Lossless speculation rests on this: a verify call must score each position exactly as a plain step would."""
    import numpy as np

    from dspark.bundle import Bundle
    from dspark.runtime.decoder import decoder_cache, feed, run_decoder
    from dspark.runtime.runners import OrtRunner

    bundle = Bundle.open(bundle_dir)
    runner = OrtRunner(bundle, "target")
    rng = np.random.default_rng(3)
    prompt, other, tail = (list(map(int, rng.integers(1, VOCAB, n))) for n in (21, 13, 6))

    def prefilled(chunk: int, rows: list[list[int]]):
        cache = decoder_cache(bundle.target.config, len(rows), bundle)
        last = feed(runner, cache, rows, chunk)
        return cache, last

    reference, (last,) = prefilled(16, [prompt])
    for chunk, rows in ((4, [prompt]), (16, [prompt, other]), (5, [prompt, other])):
        cache, again = prefilled(chunk, rows)
        assert np.array_equal(again[0], last), f"prompt's last logits, chunks of {chunk}, {len(rows)} rows"
        assert np.array_equal(cache.k[:, 0, :, : len(prompt)], reference.k[:, 0, :, : len(prompt)])
        assert np.array_equal(cache.v[:, 0, :, : len(prompt)], reference.v[:, 0, :, : len(prompt)])
    n = len(prompt)
    alone = run_decoder(runner, reference, [tail[:1]])
    single = (alone["logits"][0, 0].copy(), reference.k[:, 0, :, n].copy(), reference.v[:, 0, :, n].copy())
    for width, rows in ((2, [prompt]), (6, [prompt]), (1, [prompt, other]), (4, [prompt, other])):
        cache, _ = prefilled(16, rows)
        parts = [tail[:width]] + [tail[::-1][:3]] * (len(rows) - 1)
        out = run_decoder(runner, cache, parts)
        got = (out["logits"][0, 0], cache.k[:, 0, :, n], cache.v[:, 0, :, n])
        for name, a, b in zip(("logits", "keys", "values"), got, single):
            assert np.array_equal(a, b), f"{name} of a 1-token step differ in a call of width {width}, {len(rows)} rows"
