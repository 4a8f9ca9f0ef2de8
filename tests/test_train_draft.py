"""Drafter training (train-draft): the training forward equals the inference graphs, each kind trains, exports,
runs losslessly and resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import VOCAB, hf_model, save_hf
from dspark.bundle import Bundle
from dspark.cli import main
from dspark.errors import DsparkError
from dspark.export.bundle import ExportOptions, export_bundle, load_draft
from dspark.graphs.checkpoint import WeightReader
from dspark.graphs.decoder import DecoderLM
from dspark.graphs.drafter import Drafter, DrafterConfig
from dspark.runtime.generate import Generator, Request
from dspark.train.features import feature_cache
from dspark.train.draft import (
    BlockTask,
    DraftArgs,
    DraftLMTask,
    block_logits,
    default_target_layers,
    drafter_forward,
    grow,
    grow_draft_lm,
    grown_config,
    method_config,
    read_answer_masks,
    read_mask_token_id,
    target_digest,
    target_pass,
    train_draft,
    window_starts,
    windows_at,
)

torch.set_num_threads(1)
BLOCK = 4
TAPS = [0, 1]
ARGS = DraftArgs(seed=3, batch_size=4, seq_len=48, lr=3e-3, warmup_steps=3, schedule_steps=40, eval_windows=4,
                 anchors_per_seq=8)
QUIET = dict(progress=False, log=lambda _: None, eval_every=10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen3 target (sharp logits) and token arrays sampled from it, so there is something to learn."""
    root = tmp_path_factory.mktemp("draft")
    model = hf_model("qwen3", VOCAB, seed=1)
    target_dir = save_hf(model, root / "target", VOCAB)
    target = DecoderLM.from_pretrained(target_dir)
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(2, VOCAB, (24, 4), generator=gen)]
    with torch.no_grad():
        for _ in range(60):  # sampled continuations at T=1
            logits = target(torch.cat(rows, 1))[:, -1]
            rows.append(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
    seqs = torch.cat(rows, 1).numpy().astype(np.uint16)
    data = root / "data"
    data.mkdir()
    np.save(data / "train.npy", seqs[:20].reshape(-1))
    np.save(data / "heldout.npy", seqs[20:].reshape(-1))
    return target_dir, data, target


def config_for(target_dir, method, **kw):
    opts = dict(block_size=BLOCK, num_layers=2, target_layers=TAPS, mask_token_id=VOCAB - 1, markov_rank=8)
    opts.update(kw)
    return method_config(target_dir, method, **opts)


def test_mask_token_and_default_layers(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": 0, "content": "<|endoftext|>"}, {"id": 1, "content": "<|mask|>"}]}))
    assert read_mask_token_id(tmp_path) == 1
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 0, "content": "<eos>"}]}))
    assert read_mask_token_id(tmp_path) is None
    assert default_target_layers(36) == [1, 9, 17, 25, 33]
    assert default_target_layers(8) == [1, 3, 5]
    assert default_target_layers(3) == [0, 1]


def test_mask_token_required(setup):
    target_dir, _, _ = setup
    with pytest.raises(Exception, match="mask-token-id"):
        method_config(target_dir, "dspark", block_size=BLOCK)  # the word tokenizer has no <|mask|>


def test_target_pass_matches_step(setup):
    target_dir, _, _ = setup
    tapped = DecoderLM.from_pretrained(target_dir, tap_layers=TAPS)
    x = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        hidden, feats = target_pass(tapped, x, tuple(TAPS))
        pk, pv = tapped.empty_cache(2)
        logits, _, _, ref = tapped.step(x, torch.arange(19).expand(2, 19), torch.zeros(2, dtype=torch.long), pk, pv)
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tapped.lm_head(hidden), logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,head,reduced", [("dspark", "vanilla", 0), ("dspark", "gated", 0), ("dspark", "rnn", 0),
                                                 ("dflash", "vanilla", 0), ("dspark", "vanilla", VOCAB // 3),
                                                 ("dflash", "vanilla", VOCAB // 3)])
def test_training_forward_equals_inference(setup, method, head, reduced):
    """All anchors of a sequence in one masked forward == context_kv + propose for each anchor alone (also with a
    reduced draft vocabulary, whose laws the training loop keeps over the subset and inference over all ids)."""
    target_dir, _, target = setup
    vocab = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(3))[:reduced] if reduced else None
    config = config_for(target_dir, method, markov_head=head, draft_vocab=reduced or None)
    task = BlockTask(method, config, target, ARGS, vocab)
    drafter = task.model.eval()
    with torch.no_grad():
        if method == "dspark":  # a non-zero Markov bias, so teacher forcing is exercised
            drafter.markov_head.markov_w2.weight.normal_()
        x = torch.randint(0, VOCAB, (2, 30))
        _, feats = target_pass(target, x, tuple(TAPS))
        anchors = torch.tensor([[1, 6, 20], [3, 4, 25]])  # overlapping blocks too
        h = drafter_forward(drafter, feats, x, anchors)
        for b in range(2):
            for j in range(3):
                s = int(anchors[b, j])
                k, v = drafter.context_kv(feats[b:b + 1, :s], torch.arange(s)[None])
                anchor, at = x[b:b + 1, s], torch.tensor([s])
                torch.testing.assert_close(h[b:b + 1, j], drafter.block_hidden(anchor, at, at, k, v), atol=1e-5, rtol=1e-5)
                tokens, q, conf = drafter.propose(anchor, at, at, k, v, torch.zeros(1), torch.zeros(1, BLOCK))
                # teacher-forced with the drafted tokens: the training logits are the inference logits
                logits, z = block_logits(drafter, h[b:b + 1, j], anchor, tokens[:, :-1])
                torch.testing.assert_close(torch.softmax(logits, -1), q, atol=1e-5, rtol=1e-5)
                if z is not None:
                    torch.testing.assert_close(z, conf, atol=1e-5, rtol=1e-5)
                greedy, _ = block_logits(drafter, h[b:b + 1, j], anchor)
                assert torch.equal(drafter.to_target(greedy.argmax(-1)), tokens)
                if reduced:
                    assert set(tokens.flatten().tolist()) <= set(vocab.tolist())
                    # the law is over the subset; placed in the target vocabulary it has all its mass there
                    full = drafter.target_law(q)
                    assert q.shape[-1] == reduced and full.shape[-1] == VOCAB
                    assert float(full[..., drafter.to_target(torch.arange(reduced))].sum()) == pytest.approx(BLOCK, abs=1e-4)


@pytest.mark.parametrize("method", ["dspark", "dflash", "draft-lm", "dspark-reduced", "draft-lm-reduced"])
def test_train_and_checkpoint(setup, tmp_path, method):
    """Each kind trains (held-out loss falls) and its checkpoint loads the way export loads it, holding the
    trained weights."""
    target_dir, data, target = setup
    out = train_kind(setup, tmp_path, method)
    reduced = method.endswith("-reduced")
    method = method.removesuffix("-reduced")
    counts = np.bincount(np.load(data / "train.npy"), minlength=VOCAB)
    most_frequent = sorted(counts, reverse=True)[: VOCAB // 2]
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 10, 20, 30]
    assert log[-1]["heldout_loss"] < 0.8 * log[0]["heldout_loss"], log
    assert log[-1]["tau"] >= 1.0
    found, config = load_draft(out, target_dir, target.config)
    assert found == method
    state = torch.load(out / "train_state.pt", weights_only=False)["model"]
    if method == "draft-lm":
        loaded = DecoderLM.from_pretrained(out)
        for name in ("tokenizer.json", "generation_config.json"):
            assert (out / name).read_bytes() == (target_dir / name).read_bytes()
        if reduced:  # its own ids: the most frequent training tokens, most frequent first, then one for the rest
            ids = WeightReader(out).get("draft_vocab")
            assert config.draft_vocab_size == VOCAB // 2 and config.vocab_size == VOCAB // 2 + 1
            assert counts[ids].tolist() == most_frequent and torch.equal(state.pop("draft_vocab"), ids)
    else:
        loaded = Drafter.from_pretrained(out, target.config)
        assert config.block_size == BLOCK and config.target_layer_ids == tuple(TAPS)
        assert config.markov_rank == (8 if method == "dspark" else 0)
        assert config.enable_confidence_head == (method == "dspark")
        if reduced:  # the most frequent training tokens, most frequent first; the head is their target rows
            assert config.draft_vocab_size == VOCAB // 2
            assert counts[loaded.draft_vocab].tolist() == most_frequent
            assert torch.equal(loaded.lm_head.weight, target.lm_head.weight[loaded.draft_vocab])
        else:
            assert torch.equal(loaded.lm_head.weight, target.lm_head.weight)  # the frozen copies
    dtype = torch.float16 if method == "draft-lm" else torch.float32  # block drafters: the target's dtype
    for name, tensor in state.items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(dtype).float()), name


# ~30 s per export; dflash/draft-lm export: test_block_drafters, test_speculative
@pytest.mark.parametrize("method", ["dspark", "dspark-reduced", "draft-lm-reduced"])
def test_trained_drafter_exports_and_is_lossless(setup, tmp_path, method):
    target_dir, _, _ = setup
    out = train_kind(setup, tmp_path, method)
    bundle = tmp_path / "bundle"
    export_bundle(target_dir, bundle, out, ExportOptions(max_batch=2, max_context=128, prefill_chunk=32), progress=False)
    assert Bundle.open(bundle).draft.method == method.removesuffix("-reduced")
    spec, plain = Generator(bundle), Generator(bundle, use_draft=False)
    for prompt in ([5, 6, 7, 8, 9], list(range(2, 40))):
        req = Request(prompt, max_new_tokens=8, ignore_eos=True)
        drafted = spec.generate([req])[0]
        assert drafted.generated == plain.generate([req])[0].generated
        assert drafted.accepted  # speculative rounds ran


def train_kind(setup, tmp_path, method):
    """Train ``method`` for 30 steps (``-reduced``: over the half of the vocabulary seen most)."""
    target_dir, data, _ = setup
    cache = method == "draft-lm-reduced"  # a reduced draft LM learns from the cached target states
    if method.startswith("draft-lm"):
        config = method_config(target_dir, "draft-lm", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                               head_dim=16, intermediate_size=64, draft_vocab=VOCAB // 2 if cache else None)
        method = "draft-lm"
    elif method == "dspark-reduced":
        method, config = "dspark", config_for(target_dir, "dspark", draft_vocab=VOCAB // 2)
    else:
        config = config_for(target_dir, method)
    out = tmp_path / "draft"
    rec = train_draft(target_dir, data, out, method, config, ARGS, steps=30, threads=1, cache_features=cache, **QUIET)
    assert rec["step"] == 30
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_train_draft_refuses_a_device_it_cannot_use(setup, tmp_path):
    target_dir, data, _ = setup
    for device, problem in (("cuda", "sees no CUDA device"), ("tpu", "use cpu, cuda or cuda:N"),
                            ("meta", "dspark runs torch on cpu, cuda or cuda:N")):
        result = CliRunner().invoke(main, ["train-draft", str(target_dir), "--method", "draft-lm", "--data",
                                           str(data), "--output", str(tmp_path / device), "--steps", "1",
                                           "--device", device])
        assert result.exit_code == 2 and problem in result.output, result.output
        assert not (tmp_path / device).exists() or not any((tmp_path / device).iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("method", ["dspark-reduced", "draft-lm", "draft-lm-reduced"])
def test_trains_on_cuda_and_resumes_on_the_cpu(setup, tmp_path, method):
    """--device cuda: each kind learns there as on the CPU (held-out loss falls), writes a checkpoint that loads,
    and its train_state.pt resumes there and on the CPU."""
    target_dir, data, _ = setup
    cache = method == "draft-lm-reduced"
    if method.startswith("draft-lm"):
        config = method_config(target_dir, "draft-lm", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                               head_dim=16, intermediate_size=64, draft_vocab=VOCAB // 2 if cache else None)
    else:
        config = config_for(target_dir, "dspark", draft_vocab=VOCAB // 2)
    kind = method.removesuffix("-reduced")
    out = tmp_path / "draft"
    rec = train_draft(target_dir, data, out, kind, config, ARGS, steps=30, cache_features=cache, device="cuda",
                      **QUIET)
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert rec["step"] == 30 and log[-1]["heldout_loss"] < 0.8 * log[0]["heldout_loss"], log
    found, _ = load_draft(out, target_dir, DecoderLM.from_pretrained(target_dir).config)
    assert found == kind
    rec = train_draft(target_dir, data, out, kind, config, ARGS, steps=31, cache_features=cache, device="cuda",
                      **QUIET)
    assert rec["step"] == 31
    rec = train_draft(target_dir, data, out, kind, config, ARGS, steps=32, cache_features=cache, **QUIET)
    assert rec["step"] == 32


def test_resume_continues(setup, tmp_path):
    target_dir, data, _ = setup
    config = config_for(target_dir, "dspark")
    out = tmp_path / "resumed"
    train_draft(target_dir, data, out, "dspark", config, ARGS, steps=6, **QUIET)
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 6
    rec = train_draft(target_dir, data, out, "dspark", config, ARGS, steps=10, **QUIET)
    assert rec["step"] == 10
    resumed = torch.load(out / "train_state.pt", weights_only=False)
    assert resumed["step"] == 10 and resumed["tokens"] == 10 * ARGS.batch_size * ARGS.seq_len
    assert "embed_tokens.weight" not in resumed["model"]  # frozen target copies are not in the state
    straight = tmp_path / "straight"
    train_draft(target_dir, data, straight, "dspark", config, ARGS, steps=10, **QUIET)
    ref = torch.load(straight / "train_state.pt", weights_only=False)
    for name, tensor in ref["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, atol=1e-6, rtol=1e-5)
    with pytest.raises(Exception, match="different method or drafter config"):
        train_draft(target_dir, data, out, "dflash", config_for(target_dir, "dflash"), ARGS, steps=12, **QUIET)


def test_feature_cache_runs_each_document_from_its_start(setup, tmp_path):
    """The cached features of a document are the target's own for that document alone; training from the cache
    learns (held-out loss falls) and resumes reading the same cache."""
    target_dir, data, target = setup
    cached = tmp_path / "data"
    cached.mkdir()
    for name in ("train.npy", "heldout.npy"):
        (cached / name).write_bytes((data / name).read_bytes())
    tokens = np.load(cached / "train.npy")
    np.save(cached / "train_docs.npy", np.arange(0, len(tokens), 64))  # 20 sequences of 64 tokens
    config = config_for(target_dir, "dspark")
    out = tmp_path / "draft"
    rec = train_draft(target_dir, cached, out, "dspark", config, ARGS, steps=30, threads=1, cache_features=True,
                      **QUIET)
    folders = list(cached.glob("features-*"))
    assert len(folders) == 1
    assert sorted(p.name for p in folders[0].iterdir()) == ["features.npy", "hidden.npy", "lse.npy", "source.json"]
    features, hidden, lse = (np.load(folders[0] / f"{name}.npy") for name in ("features", "hidden", "lse"))
    with torch.no_grad():
        want_hidden, want = target_pass(target, torch.from_numpy(tokens[64:128].astype(np.int64))[None], tuple(TAPS))
        want_lse = torch.logsumexp(target.lm_head(want_hidden[0]), -1)
    # computed in bfloat16 and stored in float16: close to the float32 forward, not equal
    np.testing.assert_allclose(features[64:128], want[0].numpy(), atol=0.1, rtol=0.03)
    np.testing.assert_allclose(hidden[64:128], want_hidden[0].numpy(), atol=0.1, rtol=0.03)
    np.testing.assert_allclose(lse[64:128], want_lse.numpy(), atol=0.1, rtol=0.01)
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert rec["step"] == 30 and log[-1]["heldout_loss"] < 0.8 * log[0]["heldout_loss"], log
    rec = train_draft(target_dir, cached, out, "dspark", config, ARGS, steps=34, threads=1, cache_features=True,
                      **QUIET)
    assert rec["step"] == 34
    # other token data of the same length (data regenerated): the cache is computed again for it
    other = np.roll(tokens, 64)
    np.save(cached / "train.npy", other)
    cache = feature_cache(target, tuple(TAPS), other, cached, target_digest(target_dir), progress=False,
                          log=lambda _: None)
    # the same documents in another order: every row is copied from the previous cache, none recomputed
    np.testing.assert_array_equal(cache.features[64:128], features[:64])
    np.testing.assert_array_equal(cache.lse[:64], lse[-64:])


def documents_of_64(data, count: int, tmp_path):
    """The first ``count`` x 64 training tokens of ``data`` as ``count`` documents of a new data folder."""
    tokens = np.load(data / "train.npy")[: count * 64]
    folder = tmp_path / "data"
    folder.mkdir()
    np.save(folder / "train.npy", tokens)
    np.save(folder / "train_docs.npy", np.arange(0, len(tokens), 64))
    return tokens, folder


def test_feature_cache_of_grown_data_computes_new_documents_only(setup, tmp_path, monkeypatch):
    """Data that grew (make-data resumed: new answers between old ones) keeps the cached rows of the documents it
    had and runs the target on the new ones alone, also when the rebuild was interrupted and resumed."""
    target_dir, data, target = setup
    tokens, folder = documents_of_64(data, 8, tmp_path)
    digest = target_digest(target_dir)
    first = feature_cache(target, (), tokens, folder, digest, progress=False, log=lambda _: None)
    old_hidden = np.array(first.hidden)
    del first
    fresh = np.load(data / "heldout.npy")[:128]  # two new 64-token documents, at positions 1 and 5
    docs = [tokens[i * 64:(i + 1) * 64] for i in range(8)]
    grown = np.concatenate(docs[:1] + [fresh[:64]] + docs[1:4] + [fresh[64:]] + docs[4:])
    np.save(folder / "train.npy", grown)
    np.save(folder / "train_docs.npy", np.arange(0, len(grown), 64))

    def interrupted(*_):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # the rebuild stops at its first target forward ...
        m.setattr("dspark.train.features.target_pass", interrupted)
        with pytest.raises(KeyboardInterrupt):
            feature_cache(target, (), grown, folder, digest, progress=False, log=lambda _: None)
    logged = []  # ... and the next call still copies the documents the old cache held
    cache = feature_cache(target, (), grown, folder, digest, progress=False, log=logged.append)
    assert any("128 of 640 tokens" in line for line in logged), logged
    np.testing.assert_array_equal(cache.hidden[:64], old_hidden[:64])
    np.testing.assert_array_equal(cache.hidden[128:320], old_hidden[64:256])
    np.testing.assert_array_equal(cache.hidden[384:], old_hidden[256:])
    with torch.no_grad():
        want, _ = target_pass(target, torch.from_numpy(fresh[64:].astype(np.int64))[None], ())
    np.testing.assert_allclose(cache.hidden[320:384], want[0].numpy(), atol=0.1, rtol=0.03)
    assert sorted(p.name for p in next(folder.glob("features-*")).iterdir()) == ["hidden.npy", "lse.npy", "source.json"]


def test_draft_lm_reads_a_block_drafters_cache_of_the_same_data(setup, tmp_path, monkeypatch):
    """A draft LM's cache (final hidden states and normalisers) is read from a finished block-drafter cache of the
    same token data without running the target; for other token data it is computed."""
    target_dir, data, target = setup
    tokens, folder = documents_of_64(data, 4, tmp_path)
    digest = target_digest(target_dir)
    block = feature_cache(target, tuple(TAPS), tokens, folder, digest, progress=False, log=lambda _: None)

    def no_target(*_):
        raise AssertionError("the target ran")

    with monkeypatch.context() as m:
        m.setattr("dspark.train.features.target_pass", no_target)
        logged = []
        lm = feature_cache(target, (), tokens, folder, digest, progress=False, log=logged.append)
    assert lm.features is None and "final hidden states of" in logged[0]
    np.testing.assert_array_equal(lm.hidden, block.hidden)
    np.testing.assert_array_equal(lm.lse, block.lse)
    assert [p.name for p in folder.glob("features-*")] == [f"features-{digest[:16]}-{'_'.join(map(str, TAPS))}"]
    other = tokens[::-1].copy()  # other token data: the block cache does not serve it
    np.save(folder / "train.npy", other)
    own = feature_cache(target, (), other, folder, digest, progress=False, log=lambda _: None)
    assert len(list(folder.glob("features-*-final"))) == 1 and own.hidden.shape == block.hidden.shape


def test_answer_masks_steer_anchors(setup, tmp_path):
    """With make-data's answer masks a block drafter trains on blocks that start in the answers and a draft LM's
    acceptance is estimated there; a mask that does not match its token array is refused."""
    target_dir, data, _ = setup
    masked = tmp_path / "data"
    masked.mkdir()
    for name in ("train", "heldout"):
        tokens = np.load(data / f"{name}.npy")
        np.save(masked / f"{name}.npy", tokens)
        np.save(masked / f"{name}_answers.npy", np.arange(len(tokens)) % 64 >= 16)  # a 16-token "prompt" each
    train_tokens, held_tokens = np.load(masked / "train.npy"), np.load(masked / "heldout.npy")
    train_mask, held_mask = read_answer_masks(masked, train_tokens, held_tokens)
    assert train_mask.sum() == 3 * len(train_tokens) // 4
    config = config_for(target_dir, "dspark")
    rec = train_draft(target_dir, masked, tmp_path / "draft", "dspark", config, ARGS, steps=10, threads=1, **QUIET)
    assert rec["step"] == 10 and rec["tau"] >= 1.0
    # a draft LM estimates its acceptance where the answers are: trained alike (every train token an answer, so
    # every position counts, as without masks) it scores otherwise without the held-out mask
    np.save(masked / "train_answers.npy", np.ones(len(train_tokens), dtype=bool))
    lm = method_config(target_dir, "draft-lm", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                       intermediate_size=64, draft_vocab=VOCAB // 2)
    scores = [train_draft(target_dir, folder, tmp_path / f"lm-{i}", "draft-lm", lm, ARGS, steps=2, threads=1, **QUIET)
              for i, folder in enumerate((masked, data))]
    assert scores[0]["heldout_loss"] == scores[1]["heldout_loss"] and scores[0]["tau"] != scores[1]["tau"]
    np.save(masked / "heldout_answers.npy", np.ones(3, dtype=bool))
    with pytest.raises(DsparkError, match="heldout_answers.npy has 3 entries"):
        read_answer_masks(masked, train_tokens, held_tokens)


@pytest.mark.parametrize("reduced", [False, True], ids=["full", "reduced"])
def test_draft_lm_loss_counts_the_positions_that_predict_answer_tokens(setup, reduced):
    """With answer masks a draft LM's loss is KL(target || draft) at the positions whose next token the target
    wrote, prompt positions only read: one answer token in the batch gives that one position's divergence."""
    target_dir, data, target = setup
    tokens = np.load(data / "train.npy")
    config = method_config(target_dir, "draft-lm", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                           head_dim=16, intermediate_size=64, draft_vocab=VOCAB // 2 if reduced else 0)
    starts = window_starts(len(tokens), 7, ARGS)
    mask = np.zeros(len(tokens), dtype=bool)
    mask[starts[1] + 6] = True  # the 6th token of window 1: predicted at its position 5
    vocab = torch.from_numpy(np.argsort(-np.bincount(tokens, minlength=VOCAB), kind="stable")[: VOCAB // 2].copy())
    task = DraftLMTask("draft-lm", config, target, ARGS, vocab if reduced else None, answers=(mask, None))
    loss, _ = task.loss(7, tokens)
    x = windows_at(tokens, starts, ARGS.seq_len)
    with torch.no_grad():
        t = task.target_log_law(x) if reduced else torch.log_softmax(target(x).float(), -1)
        d = torch.log_softmax(task.model(task.index[x] if reduced else x).float(), -1)
    want = (t[1, 5].exp() * (t[1, 5] - d[1, 5])).sum()
    torch.testing.assert_close(loss.detach(), want, atol=2e-3, rtol=2e-2)  # the loss runs in bfloat16
    everywhere = DraftLMTask("draft-lm", config, target, ARGS, vocab if reduced else None).loss(7, tokens)[0]
    assert abs(everywhere.item() - want.item()) > 1e-3


def test_init_from_continues_a_trained_drafter(setup, tmp_path):
    """A fresh run started from a trained drafter begins at its held-out loss, keeps its draft vocabulary and
    trains on; a resumed run ignores --init-from."""
    target_dir, data, _ = setup
    first = tmp_path / "first"
    config = config_for(target_dir, "dspark", draft_vocab=VOCAB // 2)
    first_log = train_draft(target_dir, data, first, "dspark", config, ARGS, steps=20, threads=1, **QUIET)
    second = tmp_path / "second"
    rec = train_draft(target_dir, data, second, "dspark", json.loads((first / "config.json").read_text()), ARGS,
                      steps=10, threads=1, init_from=first, **QUIET)
    log = [json.loads(line) for line in (second / "training_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[0]["heldout_loss"] == pytest.approx(first_log["heldout_loss"], rel=0.02)
    assert rec["step"] == 10
    assert torch.equal(Drafter.from_pretrained(second, setup[2].config, target_dir=target_dir).draft_vocab,
                       Drafter.from_pretrained(first, setup[2].config, target_dir=target_dir).draft_vocab)
    # the command: the drafter it starts from gives the config (this target's tokenizer has no <|mask|> to find)
    result = CliRunner().invoke(main, ["train-draft", str(target_dir), "--method", "dspark", "--data", str(data),
                                       "--output", str(tmp_path / "cli"), "--init-from", str(first), "--steps", "2",
                                       "--threads", "1", "--batch-size", "2", "--seq-len", "48", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["draft_vocab_size"] == VOCAB // 2


def test_init_from_continues_a_trained_draft_lm(setup, tmp_path):
    """A reduced draft LM started from a trained one (e.g. on more data) begins at its held-out loss with its draft
    vocabulary, whatever the new data's most frequent tokens; the command refuses a drafter of the other kind."""
    target_dir, data, _ = setup
    first = tmp_path / "first"
    config = method_config(target_dir, "draft-lm", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                           head_dim=16, intermediate_size=64, draft_vocab=VOCAB // 2)
    first_log = train_draft(target_dir, data, first, "draft-lm", config, ARGS, steps=20, threads=1, **QUIET)
    other = tmp_path / "other-data"  # another token set: its frequent tokens are not the first run's
    other.mkdir()
    tokens = np.load(data / "train.npy")
    np.save(other / "train.npy", np.where(tokens % 2 == 0, tokens, VOCAB - 1 - tokens).astype(tokens.dtype))
    np.save(other / "heldout.npy", np.load(data / "heldout.npy"))
    rec = train_draft(target_dir, other, tmp_path / "second", "draft-lm", json.loads((first / "config.json").read_text()),
                      ARGS, steps=5, threads=1, init_from=first, **QUIET)
    log = [json.loads(line) for line in (tmp_path / "second" / "training_log.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 0 and log[0]["heldout_loss"] == pytest.approx(first_log["heldout_loss"], rel=0.02)
    assert rec["step"] == 5
    vocab = lambda folder: WeightReader(folder).get("draft_vocab")  # noqa: E731
    assert torch.equal(vocab(tmp_path / "second"), vocab(first))
    for method, source in (("dspark", first), ("draft-lm", None)):
        if source is None:  # a block drafter given to a draft LM
            source = tmp_path / "block"
            train_draft(target_dir, data, source, "dspark", config_for(target_dir, "dspark"), ARGS, steps=1, threads=1,
                        **QUIET)
        result = CliRunner().invoke(main, ["train-draft", str(target_dir), "--method", method, "--data", str(data),
                                           "--output", str(tmp_path / f"cli-{method}"), "--init-from", str(source),
                                           "--steps", "1", "--threads", "1", "--no-progress"])
        assert result.exit_code == 2 and "cannot start from it" in result.output, result.output
        assert not (tmp_path / f"cli-{method}").exists()


def test_init_from_grows_a_drafter_without_changing_it(setup, tmp_path):
    """--num-layers / --target-layers with --init-from: new taps (before or after the old ones) and new layers start as no-ops, so the
    grown drafter drafts what it was trained to and training goes on from its held-out loss; taps are never dropped."""
    target_dir, data, target = setup
    first = tmp_path / "first"
    config = config_for(target_dir, "dspark", num_layers=1, target_layers=[1], draft_vocab=VOCAB // 2)
    first_log = train_draft(target_dir, data, first, "dspark", config, ARGS, steps=20, threads=1, **QUIET)
    source = Drafter.from_pretrained(first, target.config, target_dir=target_dir)
    bigger = grown_config(json.loads((first / "config.json").read_text()), 2, [1, 0])  # taps go in layer order
    grown = grow(source, DrafterConfig.from_hf(bigger, target.config))
    d = target.config.hidden_size
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(2, 6, 2 * d, generator=gen)  # taps 0 then 1: the old tap is the second slice
    positions = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        k_old, v_old = source.context_kv(features[..., d:], positions)
        k_new, v_new = grown.context_kv(features, positions)
        assert torch.equal(k_new[0], k_old[0]) and torch.equal(v_new[0], v_old[0])
        anchor, start, lens = torch.tensor([3, 5]), torch.tensor([6, 4]), torch.tensor([6, 4])
        h_old = source.block_hidden(anchor, start, lens, k_old, v_old)
        h_new = grown.block_hidden(anchor, start, lens, k_new, v_new)
    torch.testing.assert_close(h_new, h_old, rtol=0, atol=1e-6)
    assert torch.equal(grown.draft_vocab, source.draft_vocab)
    rec = train_draft(target_dir, data, tmp_path / "grown", "dspark", bigger, ARGS, steps=10, threads=1,
                      init_from=first, **QUIET)
    log = [json.loads(line) for line in (tmp_path / "grown" / "training_log.jsonl").read_text().splitlines()]
    assert log[0]["heldout_loss"] == pytest.approx(first_log["heldout_loss"], rel=0.02) and rec["step"] == 10
    saved = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and saved["target_layer_ids"] == [0, 1]
    result = CliRunner().invoke(main, ["train-draft", str(target_dir), "--method", "dspark", "--data", str(data),
                                       "--output", str(tmp_path / "cli"), "--init-from", str(first),
                                       "--target-layers", "0", "--steps", "1", "--no-progress"])
    assert result.exit_code == 2 and "drops the taps [1]" in result.output
    assert not (tmp_path / "cli").exists()


def test_init_from_grows_a_draft_lm_without_changing_it(setup, tmp_path):
    """--num-layers with --init-from on a draft LM: the new layers go on top as no-ops, so the grown LM gives the
    same logits and training goes on from its held-out loss; --target-layers is refused (a draft LM has no taps)."""
    target_dir, data, _ = setup
    first = tmp_path / "first"
    config = method_config(target_dir, "draft-lm", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                           head_dim=16, intermediate_size=64, draft_vocab=VOCAB // 2)
    first_log = train_draft(target_dir, data, first, "draft-lm", config, ARGS, steps=20, threads=1, **QUIET)
    bigger = grown_config(json.loads((first / "config.json").read_text()), 3)
    assert bigger["num_hidden_layers"] == 3 and len(bigger["layer_types"]) == 3
    source = DecoderLM.from_pretrained(first)
    grown = grow_draft_lm(source, bigger)
    assert grown.config.num_layers == 3
    x = torch.randint(0, VOCAB // 2 + 1, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(grown(x), source(x), rtol=0, atol=1e-5)
    rec = train_draft(target_dir, data, tmp_path / "grown", "draft-lm", bigger, ARGS, steps=10, threads=1,
                      init_from=first, **QUIET)
    log = [json.loads(line) for line in (tmp_path / "grown" / "training_log.jsonl").read_text().splitlines()]
    assert log[0]["heldout_loss"] == pytest.approx(first_log["heldout_loss"], rel=0.02) and rec["step"] == 10
    trained = DecoderLM.from_pretrained(tmp_path / "grown")
    assert trained.config.num_layers == 3
    assert trained.model.layers[2].mlp.down_proj.weight.abs().sum() > 0  # the new layers trained
    vocab = lambda folder: WeightReader(folder).get("draft_vocab")  # noqa: E731
    assert torch.equal(vocab(tmp_path / "grown"), vocab(first))
    command = ["train-draft", str(target_dir), "--method", "draft-lm", "--data", str(data), "--init-from", str(first),
               "--steps", "1", "--threads", "1", "--batch-size", "2", "--seq-len", "48", "--no-progress"]
    result = CliRunner().invoke(main, command + ["--output", str(tmp_path / "cli"), "--num-layers", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["num_hidden_layers"] == 2
    result = CliRunner().invoke(main, command + ["--output", str(tmp_path / "taps"), "--target-layers", "0"])
    assert result.exit_code == 2 and "a draft LM reads no target layers" in result.output, result.output
    assert not (tmp_path / "taps").exists()
