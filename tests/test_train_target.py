"""Demo-model training: tokenizer on a tiny stdlib corpus, a tiny target, HF export, resume."""

import json

import numpy as np
import pytest
import torch

from dspark.graphs.decoder import DecoderLM
from dspark.train import corpus as C
from dspark.train.target import TrainArgs, init_model, qwen3_config, sample, train, train_forward


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    stats = C.build(out, vocab_size=300, fraction=0.5, limit=10, log=lambda _: None)
    assert stats["train"]["files"] > 0 and stats["heldout"]["files"] > 0
    return out


def tiny_config(vocab):
    return qwen3_config(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                        intermediate_size=64, max_position_embeddings=128)


ARGS = TrainArgs(seed=1, batch_size=4, seq_len=64, lr=3e-3, warmup_steps=5, schedule_steps=40, eval_windows=4)


def test_tokenizer_round_trip_and_files(data):
    tok = C.load_tokenizer(data)
    assert tok.get_vocab_size() == 300
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|mask|>") == 1
    files = json.loads((data / "files.json").read_text())
    for rel in files["train"][:3] + files["heldout"][:2]:
        text = (C.stdlib_dir() / rel).read_text()
        ids = tok.encode(text).ids
        assert ids[0] == 0  # prompts start with <|endoftext|>, as every training document does
        assert tok.decode(ids[1:], skip_special_tokens=False) == text
    cfg = json.loads((data / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["eos_token"] == "<|endoftext|>"
    ids = np.load(data / "train.npy")
    assert ids.dtype == np.uint16 and ids[0] == 0 and ids.max() < 300


def test_corpus_filter():
    assert not C.keep_file("encodings/cp1252.py", "x = 1\n")
    assert not C.keep_file("test/test_os.py", "x = 1\n")
    assert not C.keep_file("table.py", "T = [\n" + "    1, 2, 3,\n    'a', 'b',\n" * 50 + "]\n")
    assert C.keep_file("mod.py", "def f(x):\n    return x + 1\n")


def test_train_forward_matches_model():
    torch.manual_seed(0)
    model = init_model(tiny_config(300), 0)
    x = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(train_forward(model, x), model(x), atol=1e-4, rtol=1e-4)


def test_train_export_resume(data, tmp_path):
    config = tiny_config(300)
    out = tmp_path / "target"
    rec = train(data, out, config, ARGS, steps=30, eval_every=10, progress=False, log=lambda _: None)
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and rec["step"] == 30
    assert log[-1]["heldout_loss"] < log[0]["heldout_loss"] - 0.3
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "train_state.pt"):
        assert (out / name).is_file(), name

    # the HF folder loads and computes what the in-memory model computes (weights stored in fp16)
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["step"] == 30
    mem = init_model(config, 0)
    mem.load_state_dict(state["model"])
    mem.eval()
    loaded = DecoderLM.from_pretrained(out)
    x = torch.randint(0, 300, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), mem(x), atol=3e-2, rtol=1e-2)
    text = sample(loaded, out, "def ", n=8)
    assert isinstance(text, str) and text.startswith("def ")

    # resuming continues from step 30, and lands where an uninterrupted run lands
    rec = train(data, out, config, ARGS, steps=35, eval_every=10, progress=False, log=lambda _: None)
    assert rec["step"] == 35
    resumed = torch.load(out / "train_state.pt", weights_only=False)
    assert resumed["step"] == 35 and resumed["tokens"] == 35 * ARGS.batch_size * ARGS.seq_len
    straight = tmp_path / "straight"
    train(data, straight, config, ARGS, steps=35, eval_every=10, progress=False, log=lambda _: None)
    ref = torch.load(straight / "train_state.pt", weights_only=False)
    for name, tensor in ref["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, atol=1e-6, rtol=1e-5)
