"""``dspark bench`` end to end on a tiny draft-lm bundle: every report field present, finite and consistent."""

from __future__ import annotations

import json
import math
import statistics
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dspark.bench import check_finite, mismatches, settle
from dspark.prompts import builtin_prompts, load_prompts
from dspark.cli import main

from conftest import VOCAB

PNG = b"\x89PNG\r\n\x1a\n"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_builtin_prompt_sets_ship_with_the_package():
    prompts = builtin_prompts("all")
    assert {p.domain for p in prompts} == {"code", "prose"}
    assert prompts[0].domain != prompts[1].domain  # interleaved: the first few cover every domain
    assert all(p.text.strip() for p in prompts)
    assert {p.domain for p in load_prompts("code")} == {"code"}
    assert len(load_prompts("prose", limit=3)) == 3


def test_bench_report_is_complete_and_consistent(qwen3_bundle, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "w5 w6 w7", "domain": "a"}\n{"prompt": "w9 w10", "domain": "b"}\nw3 w4\n')
    out = tmp_path / "report"
    code, text = run("bench", qwen3_bundle, "--prompts", prompts, "--max-new-tokens", 8, "--concurrency", "1,2",
                     "--repeats", 2, "--warmup", 1, "--cost-repeats", 3, "--threads", 1, "--peers", "--output", out,
                     "--no-progress")
    assert code == 0, text
    assert "tok/s" in text and "draft-lm" in text  # the terminal table

    report = json.loads((out / "report.json").read_text())
    assert check_finite(report) == []
    assert {"cpu", "cores", "onnxruntime", "python"} <= set(report["machine"])
    rows = report["configurations"]
    assert {(r["method"], r["concurrency"]) for r in rows} == {(m, c) for m in ("plain", "draft-lm") for c in (1, 2)}
    plain = {r["concurrency"]: r for r in rows if r["method"] == "plain"}
    k = 6  # the qwen3 bundle's draft tokens per round
    for r in rows:
        assert r["requests"] == max(3, r["concurrency"])
        assert r["generated_tokens"] == 8 * r["requests"]  # end-of-sequence ignored: every request runs to length
        assert len(r["wall_s_runs"]) == 2
        assert r["tokens_per_second"] == pytest.approx(statistics.median(r["generated_tokens"] / w for w in r["wall_s_runs"]))
        paired = [a / b for a, b in zip(r["tokens_per_second_runs"], plain[r["concurrency"]]["tokens_per_second_runs"])]
        assert r["speedup_runs"] == pytest.approx(paired) and r["speedup"] == pytest.approx(statistics.median(paired))
        c = r["call_costs_ms"]
        tau, step = r["mean_accepted_length"], plain[r["concurrency"]]["verify_ms"]
        assert r["ideal_speedup_alone"] == pytest.approx(tau * c["t1_ms"] / (c["t_draft_ms"] + c["t_verify_ms"]))
        assert r["ideal_speedup"] == pytest.approx(tau * step / (r["draft_ms"] + r["verify_ms"]))  # in-run costs
        assert all(0 <= a <= 1 for a in r["acceptance_by_position"])
        assert r["ttft_ms"] > 0 and 0 <= r["itl_p50_ms"] <= r["itl_p99_ms"]
        hist = {int(n): v for n, v in r["accepted_length_histogram"].items()}
        assert sum(hist.values()) == r["rounds"]
        # every token but each request's first (from the prefill) comes out of a round
        assert sum(n * v for n, v in hist.items()) == 2 * (r["generated_tokens"] - r["requests"])  # both passes
        assert r["mean_accepted_length"] == pytest.approx(sum(n * v for n, v in hist.items()) / r["rounds"])
        assert r["matches_plain"] is True  # greedy speculative decoding is lossless
        if r["method"] == "plain":
            assert r["speedup"] == 1.0 and r["ideal_speedup"] == 1.0 and r["mean_accepted_length"] == 1.0
            assert r["acceptance_by_position"] == [] and r["verify_tokens_per_accepted"] == 1.0
        else:
            assert r["scheduler"] == "fixed" and r["num_draft_tokens"] == k
            assert 1 <= r["mean_accepted_length"] <= k + 1
            assert 1 <= len(r["acceptance_by_position"]) <= k
            assert r["verify_tokens_per_accepted"] >= 1
            assert c["t_draft_ms"] > 0 and c["t_verify_ms"] > 0
        # where a round's time goes, measured in the runs: the draft's calls, the target's call and the rest
        assert r["round_ms"] == pytest.approx(r["draft_ms"] + r["verify_ms"] + r["host_ms"])
        assert r["verify_ms"] > 0 and r["host_ms"] > 0 and (r["draft_ms"] > 0) == (r["method"] != "plain")
        assert 0 < r["round_ms"] < 1000 * sum(r["wall_s_runs"]) * r["concurrency"] / r["rounds"]
        # the speed-up over the rounds alone (prefill excluded), and its share of the ideal: host work only
        decode = [(r["generated_tokens"] - r["requests"]) / w for w in r["round_seconds_runs"]]
        plain_decode = [(r["generated_tokens"] - r["requests"]) / w for w in plain[r["concurrency"]]["round_seconds_runs"]]
        assert r["decode_speedup"] == pytest.approx(statistics.median(a / b for a, b in zip(decode, plain_decode)))
        assert r["of_ideal"] == pytest.approx(r["decode_speedup"] / r["ideal_speedup"])

    hf, ours = report["peers"]["transformers"], report["peers"]["dspark"]
    assert hf["status"] == "ok", hf
    for rate in (hf["plain_tokens_per_second"], hf["speculative_tokens_per_second"], ours["plain_tokens_per_second"],
                 ours["speculative"]["draft-lm fixed"]):
        assert math.isfinite(rate) and rate > 0
    assert hf["num_assistant_tokens"] == k
    assert hf["matches_dspark_plain"] is True  # same checkpoints, same greedy tokens
    assert hf["speculative_matches_plain"] is True
    assert "generated_token_ids" not in hf

    assert (out / "report.md").read_text().startswith("# dspark bench")
    assert len(report["plots"]) == 3
    for name in report["plots"]:
        assert (out / name).read_bytes()[:8] == PNG


def test_bench_block_schedule_turns_drafting_off_where_asked(qwen3_bundle, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w5 w6 w7\nw9 w10\n")
    code, text = run("bench", qwen3_bundle, "--prompts", prompts, "--max-new-tokens", 12,
                     "--concurrency", "1,2", "--block-schedule", "1:3,2:0", "--repeats", 1, "--warmup", 0,
                     "--cost-repeats", 2, "--threads", 1, "--output", tmp_path / "r", "--no-progress")
    assert code == 0, text
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["settings"]["block_schedule"] == "1:3,2:0"
    rows = {(r["method"], r["concurrency"]): r for r in report["configurations"]}
    assert rows[("draft-lm", 2)]["mean_accepted_length"] == 1.0  # two rows in flight: no drafts
    assert 1 < rows[("draft-lm", 1)]["mean_accepted_length"] <= 4 and rows[("draft-lm", 1)]["num_draft_tokens"] == 6


def test_bench_refuses_concurrency_above_max_batch(qwen3_bundle, tmp_path):
    code, text = run("bench", qwen3_bundle, "--concurrency", "1,16", "--output", tmp_path / "r", "--no-progress")
    assert code == 2 and "max_batch 8" in text


def test_bench_refuses_unknown_method(qwen3_bundle, tmp_path):
    code, text = run("bench", qwen3_bundle, "--methods", "plain,dspark", "--output", tmp_path / "r", "--no-progress")
    assert code == 2 and "unknown method dspark" in text and "draft-lm" in text


def test_bench_block_drafter_with_extra_bundle_and_schedulers(dspark_bundle, qwen3_bundle, tmp_path):
    out = tmp_path / "report"
    code, text = run("bench", dspark_bundle, "--extra-bundle", qwen3_bundle, "--methods", "plain,dspark",
                     "--scheduler", "fixed,threshold,auto", "--prompts", "prose", "--num-prompts", 2, "--max-new-tokens", 6,
                     "--concurrency", 2, "--repeats", 1, "--warmup", 0, "--cost-repeats", 2, "--threads", 1, "--peers",
                     "--output", out, "--no-progress")
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert check_finite(report) == []
    rows = {(r["method"], r["scheduler"]): r for r in report["configurations"]}
    assert set(rows) == {("plain", None), ("dspark", "fixed"), ("dspark", "threshold"), ("dspark", "auto")}
    # auto is what `dspark generate` does by default: fixed on a bundle not profiled for this machine
    assert rows[("dspark", "auto")]["acceptance_by_position"] == rows[("dspark", "fixed")]["acceptance_by_position"]
    for r in rows.values():
        assert r["speedup"] == pytest.approx(r["tokens_per_second"] / rows[("plain", None)]["tokens_per_second"])  # 1 pass
        assert r["matches_plain"] is True
    assert rows[("dspark", "fixed")]["call_costs_ms"]["t_draft_ms"] > 0
    # one measurement per method: its schedulers make the same calls
    assert rows[("dspark", "fixed")]["call_costs_ms"] == rows[("dspark", "threshold")]["call_costs_ms"]
    assert rows[("plain", None)]["call_costs_ms"]["t_draft_ms"] == 0.0
    hf = report["peers"]["transformers"]  # plain only: a block drafter is no assistant_model
    assert hf["status"] == "ok" and "not a draft LM" in hf["speculative"]
    assert "speculative_tokens_per_second" not in hf
    assert "peers (one request at a time" in text and "not a draft LM" in text


def test_bench_times_two_drafts_of_one_kind_side_by_side(dspark_bundle, tmp_path):
    """A second bundle with the same kind of draft is its own method, named after its folder, timed in the same
    passes; the same folder name twice is refused."""
    twin = tmp_path / "twin"
    shutil.copytree(dspark_bundle, twin)
    out = tmp_path / "report"
    code, text = run("bench", dspark_bundle, "--extra-bundle", twin, "--prompts", "prose", "--num-prompts", 2,
                     "--max-new-tokens", 6, "--concurrency", 1, "--repeats", 1, "--warmup", 0, "--cost-repeats", 2,
                     "--threads", 1, "--output", out, "--no-progress")
    assert code == 0, text
    rows = {r["method"]: r for r in json.loads((out / "report.json").read_text())["configurations"]}
    assert set(rows) == {"plain", "dspark", "dspark@twin"}
    assert rows["dspark@twin"]["bundle"] == str(twin) and rows["dspark@twin"]["matches_plain"] is True
    assert rows["dspark@twin"]["mean_accepted_length"] == rows["dspark"]["mean_accepted_length"]  # the same drafter
    code, text = run("bench", dspark_bundle, "--extra-bundle", twin, "--extra-bundle", twin, "--output", out,
                     "--no-progress")
    assert code == 2 and "two bundles named twin" in text


def test_bench_peers_onnxruntime_genai(qwen3_pair, qwen3_bundle, tmp_path):
    """onnxruntime-genai's own loop on a model its builder made from the bundle's checkpoint, beside ours."""
    pytest.importorskip("onnxruntime_genai")
    _, target_dir, _ = qwen3_pair
    genai = tmp_path / "genai"
    built = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", target_dir, "-o", genai,
                            "-p", "fp32", "-e", "cpu"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    out = tmp_path / "report"
    code, text = run("bench", qwen3_bundle, "--methods", "plain", "--prompts", "prose", "--num-prompts", 2,
                     "--max-new-tokens", 8, "--concurrency", 1, "--repeats", 1, "--warmup", 0, "--cost-repeats", 2,
                     "--threads", 1, "--peers", "--genai-model", genai, "--llama-cpp", tmp_path, "--output", out,
                     "--no-progress")
    assert code == 0, text
    peers = json.loads((out / "report.json").read_text())["peers"]
    assert peers["llama.cpp"]["status"] == "skipped" and "--llama-gguf" in peers["llama.cpp"]["reason"]
    theirs = peers["onnxruntime-genai"]
    assert theirs["status"] == "ok", theirs
    assert theirs["plain_tokens_per_second"] > 0 and theirs["requests"] == 2
    assert theirs["matches_dspark_plain"] is True  # their fp32 graph of the same weights: the same greedy tokens
    assert "onnxruntime-genai" in (out / "report.md").read_text()


def test_transformers_assists_with_a_draft_lm_over_a_reduced_vocabulary(reduced_lm_bundle):
    """The draft LM speaks ids of its own; wrapped, transformers' assisted generation drafts with it over the
    target's ids (its logits at the target ids of its vocabulary, -inf elsewhere) and writes plain's tokens."""
    import torch
    import transformers

    from dspark.bench import peer_module
    from dspark.bundle import Bundle

    hf = peer_module("hf_assisted")
    draft = Bundle.open(reduced_lm_bundle, verify=False).draft
    model = transformers.AutoModelForCausalLM.from_pretrained(draft.source).eval()
    ids = torch.tensor([[5, 17, 3, 40]])
    own = model(input_ids=torch.tensor([[draft.draft_vocab.index(i) if i in draft.draft_vocab else len(draft.draft_vocab)
                                         for i in ids[0].tolist()]])).logits
    wrapped = hf.target_ids_draft(model, draft.draft_vocab, VOCAB)(input_ids=ids).logits
    assert wrapped.shape == (1, 4, VOCAB) and model.config.vocab_size == VOCAB
    assert torch.equal(wrapped[..., list(draft.draft_vocab)], own[..., :len(draft.draft_vocab)])
    outside = sorted(set(range(VOCAB)) - set(draft.draft_vocab))
    assert torch.isneginf(wrapped[..., outside]).all()

    report = hf.run_peer(reduced_lm_bundle, [[5, 17, 3], [40, 2]], 8, repeats=1, warmup=0, log=lambda *_: None)
    assert report["status"] == "ok" and report["speculative"] == "assisted generation", report
    assert report["speculative_matches_plain"] is True and report["speculative_tokens_per_second"] > 0


def test_bench_peer_options_need_peers(qwen3_bundle, tmp_path):
    code, text = run("bench", qwen3_bundle, "--genai-model", tmp_path, "--output", tmp_path / "r", "--no-progress")
    assert code == 2 and "add --peers" in text


def test_peer_tokens_compared_up_to_our_first_stop_token():
    from dspark.bench import same_greedy_tokens

    assert same_greedy_tokens([[5, 6, 0, 7]], [[5, 6, 9, 9]], {0})  # a peer holding the stop token back parts there
    assert not same_greedy_tokens([[5, 6, 0, 7]], [[5, 8, 9, 9]], {0})
    assert same_greedy_tokens([[5, 6], [7]], [[5, 6], [7]], {0}) and not same_greedy_tokens([[5, 6]], [[5, 7]], {0})


@pytest.mark.skipif(not os.environ.get("DSPARK_LLAMA_CPP"),
                    reason="set DSPARK_LLAMA_CPP to a folder of llama.cpp binaries built from source "
                           "(bench/peers/llama_cpp.py) to run llama.cpp as a peer")
def test_llama_cpp_peer_on_smollm2():
    from dspark.bench import peer_module
    from dspark.cache import cache_root

    gguf = cache_root() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} is not cached: run 'dspark fetch smollm2' first")
    peer = peer_module("llama_cpp").run_peer(os.environ["DSPARK_LLAMA_CPP"], gguf, ["The capital of France is"], 8,
                                             threads=2, repeats=1, warmup=0, draft=gguf, draft_length=2)
    assert peer["status"] == "ok", peer
    assert peer["plain_tokens_per_second"] > 0 and peer["speculative_tokens_per_second"] > 0
    assert peer["prompt_tokens"] == [5] and 0 <= peer["acceptance"] <= 1


def test_bench_lookup_methods(qwen3_bundle, tmp_path):
    code, text = run("bench", qwen3_bundle, "--prompts", "code", "--num-prompts", 2, "--max-new-tokens", 16,
                     "--concurrency", 1, "--lookup", 2, "--methods", "plain,lookup,draft-lm+lookup", "--repeats", 1,
                     "--warmup", 0, "--cost-repeats", 2, "--threads", 1, "--peers", "--output", tmp_path / "r",
                     "--no-progress")
    assert code == 0, text
    rows = {r["method"]: r for r in json.loads((tmp_path / "r" / "report.json").read_text())["configurations"]}
    assert set(rows) == {"plain", "lookup", "draft-lm+lookup"}
    assert all(r["matches_plain"] for r in rows.values())
    assert rows["lookup"]["call_costs_ms"]["t_draft_ms"] == 0.0  # a lookup draft runs no graph
    peers = json.loads((tmp_path / "r" / "report.json").read_text())["peers"]
    assert set(peers["dspark"]["speculative"]) == {"lookup fixed", "draft-lm+lookup fixed"}
    code, text = run("bench", qwen3_bundle, "--methods", "plain,lookup", "--output", tmp_path / "r2", "--no-progress")
    assert code == 2 and "--lookup N" in text


def test_rows_that_are_not_lossless_are_named():
    """A greedy row whose tokens differ from plain's is called out (the report and the command's stderr), a sampled
    row (matches_plain None) or a matching one is not."""
    rows = [{"method": "plain", "scheduler": None, "concurrency": 1, "matches_plain": True},
            {"method": "dspark", "scheduler": "sps", "concurrency": 1, "matches_plain": False},
            {"method": "lookup", "scheduler": "fixed", "concurrency": 4, "matches_plain": None}]
    lines = mismatches({"configurations": rows})
    assert len(lines) == 1 and lines[0].startswith("dspark (sps, c=1) wrote other tokens than plain decoding")
    assert mismatches({"configurations": rows[:1] + rows[2:]}) == []


def test_bench_through_the_device_step(dspark_bundle, tmp_path, monkeypatch):
    """The device step (the torch backend's round on CUDA; here on torch-CPU tensors, the same code) runs a round as
    one call: bench counts it as the verify call, reports no call costs for it, and still derives the in-run ideal
    (it crashed on the H200 asking the device step's generator for a target runner it does not have)."""
    import functools

    import dspark.runtime.generate
    from dspark.runtime.generate import Generator

    monkeypatch.setattr(dspark.runtime.generate, "Generator", functools.partial(Generator, device_step=True))
    out = tmp_path / "report"
    code, text = run("bench", dspark_bundle, "--backend", "torch", "--prompts", "prose", "--num-prompts", 2,
                     "--max-new-tokens", 8, "--concurrency", "1,2", "--repeats", 1, "--warmup", 0, "--threads", 1,
                     "--output", out, "--no-progress")
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert check_finite(report) == []
    for r in report["configurations"]:
        assert r["call_costs_ms"] is None
        assert r["draft_ms"] == 0 and r["verify_ms"] > 0 and r["matches_plain"] is True
        assert r["round_ms"] == pytest.approx(r["verify_ms"] + r["host_ms"])
    spec = [r for r in report["configurations"] if r["method"] == "dspark"]
    assert spec and all(r["ideal_speedup_alone"] is None and r["of_ideal"] > 0 for r in spec)
    assert "| dspark | fixed | 1 | - | - | - | - |" in (out / "report.md").read_text()


def test_settle_waits_until_the_process_threads_are_idle():
    """A thread of this process that still burns CPU (as ONNX Runtime's idle pool spins after a call) holds the
    bench back until it stops; an idle process goes on at once."""
    import threading
    import time

    stop_at = time.perf_counter() + 0.15

    def spin():
        while time.perf_counter() < stop_at:
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    settle()
    assert not spinner.is_alive() and time.perf_counter() >= stop_at
    spinner.join()
    start = time.perf_counter()
    settle()
    assert time.perf_counter() - start < 0.4  # one quiet 5 ms step (0.5 s is the limit)

