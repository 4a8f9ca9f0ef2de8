"""The CLI end to end: export and generate, and one clear line with a non-zero exit for each bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import VOCAB, hf_model, save_hf
from dspark.cli import main
from dspark.runtime.generate import Generator, Request


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_generate_json_matches_library(qwen3_bundle):
    code, out = run("generate", qwen3_bundle, "--prompt", "w5 w6 w7", "--max-new-tokens", 12, "--ignore-eos", "--json")
    assert code == 0, out
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result) == {"text", "token_ids", "finish_reason", "stats"}
    gen = Generator(qwen3_bundle, use_draft=False)
    plain = gen.generate([Request([5, 6, 7], max_new_tokens=12, ignore_eos=True)])[0]
    assert result["token_ids"] == plain.generated
    assert result["text"] == plain.text
    stats = result["stats"]
    for key in ("rounds", "mean_accepted_length", "acceptance_by_position", "tokens_per_second", "time_to_first_token_ms"):
        assert key in stats


def test_generate_streams_text_and_writes_trace(qwen3_bundle, tmp_path):
    trace = tmp_path / "trace.jsonl"
    code, out = run("generate", qwen3_bundle, "--prompt", "w9 w10", "--max-new-tokens", 20, "--ignore-eos",
                    "--trace", trace)
    assert code == 0, out
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert rows and set(rows[0]) == {"round", "position", "draft_tokens", "confidence", "verify_length", "accepted", "emitted"}
    assert sum(len(r["emitted"]) for r in rows) == 19  # the first token comes from prefill
    assert "mean accepted length" in out


def test_no_draft_and_sampling_options(qwen3_bundle):
    code, out = run("generate", qwen3_bundle, "--prompt", "w1", "--max-new-tokens", 5, "--no-draft", "--temperature", 0.7,
                    "--top-p", 0.9, "--top-k", 10, "--seed", 3, "--json")
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1])["stats"]["rounds"] == 4


def test_missing_folders(tmp_path, qwen3_bundle):
    code, out = run("export", tmp_path / "nope", "--output", tmp_path / "b")
    assert code == 2 and "checkpoint folder not found" in out
    code, out = run("generate", tmp_path / "nope", "--prompt", "w1")
    assert code == 2 and "bundle folder not found" in out


def test_unsupported_architecture_is_named(qwen3_pair, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(qwen3_pair[1], folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    code, out = run("export", folder, "--output", tmp_path / "b")
    assert code == 2
    assert "GPT2LMHeadModel" in out and "Qwen3ForCausalLM" in out and "LlamaForCausalLM" in out
    assert "Traceback" not in out


def test_mismatched_vocabularies_and_tokenizers(qwen3_pair, tmp_path):
    _, target_dir, draft_dir = qwen3_pair
    other = save_hf(hf_model("qwen3", VOCAB + 8, seed=3), tmp_path / "bigger", VOCAB + 8)
    code, out = run("export", target_dir, "--draft", other, "--output", tmp_path / "b1")
    assert code == 2 and "vocab_size" in out
    renamed = tmp_path / "renamed"
    shutil.copytree(draft_dir, renamed)
    tok = json.loads((renamed / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {("x" + k if k.startswith("w1") else k): v for k, v in tok["model"]["vocab"].items()}
    (renamed / "tokenizer.json").write_text(json.dumps(tok))
    code, out = run("export", target_dir, "--draft", renamed, "--output", tmp_path / "b2")
    assert code == 2 and "tokenizers differ" in out
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


def test_prompt_longer_than_context(qwen3_bundle):
    code, out = run("generate", qwen3_bundle, "--prompt", " ".join(["w3"] * 300))
    assert code == 2 and "300 tokens" in out and "max context is 256" in out


def test_corrupted_bundle_is_refused(qwen3_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(qwen3_bundle, copy)
    data = copy / "target.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    code, out = run("generate", copy, "--prompt", "w1")
    assert code == 2 and "target.onnx.data has changed" in out
    (copy / "tokenizer.json").unlink()
    code, out = run("generate", copy, "--prompt", "w1")
    assert code == 2 and "tokenizer.json is missing" in out


def test_existing_output_needs_force(qwen3_pair, tmp_path):
    _, target_dir, _ = qwen3_pair
    out_dir = tmp_path / "exists"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    code, out = run("export", target_dir, "--output", out_dir)
    assert code == 2 and "--force" in out
    assert (out_dir / "keep.txt").exists()
    code, out = run("export", target_dir, "--output", out_dir, "--force", "--max-context", 64, "--no-progress")
    assert code == 0, out
    assert "step/s" not in out  # the bar's rate; the summary still prints
    assert (out_dir / "manifest.json").exists() and not (out_dir / "keep.txt").exists()
    assert not list(tmp_path.glob(".exists.partial-*"))


def test_failed_export_leaves_nothing(qwen3_pair, tmp_path):
    _, target_dir, _ = qwen3_pair
    broken = tmp_path / "broken"
    shutil.copytree(target_dir, broken)
    (broken / "tokenizer.json").unlink()
    code, out = run("export", broken, "--output", tmp_path / "b")
    assert code == 2 and "tokenizer.json" in out
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.partial-*"))


@pytest.mark.parametrize("command", ["export", "generate"])
def test_help_explains_every_option(command):
    code, out = run(command, "--help")
    assert code == 0
    assert out.count("--") >= 6


def test_export_dspark_drafter_from_the_cli(qwen3_pair, tmp_path):
    from conftest import deepspec_drafter

    target, target_dir, _ = qwen3_pair
    draft_dir = deepspec_drafter(target, target_dir, tmp_path / "dspark", "vanilla", block_size=3)
    code, out = run("export", target_dir, "--draft", draft_dir, "--output", tmp_path / "b", "--max-context", 64)
    assert code == 0, out
    assert "dspark" in out and "draft_length=3" in out
    # a draft length that cannot apply to a block drafter is refused, not ignored
    code, out = run("export", target_dir, "--draft", draft_dir, "--output", tmp_path / "c", "--num-draft-tokens", 2)
    assert_one_line_error(code, out, "--num-draft-tokens applies to a draft LM", "block of 3")
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------- careless input (issue 16)
def assert_one_line_error(code, out, *words):
    assert code == 2, out
    assert "Traceback" not in out and out.startswith("error: ") and out.count("\n") == 1, out
    for w in words:
        assert w in out, out


@pytest.mark.parametrize("value,option", [("nan", "--temperature"), ("inf", "--temperature"), ("-1", "--temperature"),
                                          ("nan", "--top-p"), ("0", "--top-p"), ("-2", "--top-k")])
def test_bad_sampling_options_are_one_line(qwen3_bundle, value, option):
    code, out = run("generate", qwen3_bundle, "--prompt", "w1", "--max-new-tokens", 3, option, value)
    assert_one_line_error(code, out, option.lstrip("-"))


@pytest.mark.parametrize("command,option,value", [
    ("generate", "--num-draft-tokens", "0"), ("generate", "--num-draft-tokens", "-1"), ("generate", "--max-batch", "0"),
    ("generate", "--threads", "-1"), ("profile", "--repeats", "0"), ("profile", "--warmup", "-1"),
    ("profile", "--context", "-5"), ("bench", "--threads", "-2")])
def test_counts_out_of_range_are_refused(qwen3_bundle, command, option, value):
    """A count that cannot work is refused before anything runs (0 draft tokens or rows used to mean the default,
    0 timed calls crashed profile, a negative thread count reached ONNX Runtime)."""
    extra = ["--prompt", "w1", "--max-new-tokens", 3] if command == "generate" else ["--no-progress"]
    profiles = lambda: sorted((qwen3_bundle / "profiles").glob("*"))  # noqa: E731
    before = profiles()
    code, out = run(command, qwen3_bundle, *extra, option, value)
    assert code == 2 and option in out and "Traceback" not in out, out
    assert profiles() == before  # nothing written


def test_a_negative_seed_is_a_usage_error(qwen3_bundle):
    code, out = run("generate", qwen3_bundle, "--prompt", "w1", "--seed", -1)
    assert code == 2 and "--seed" in out and "Traceback" not in out


@pytest.mark.parametrize("manifest,words", [
    ("[]", ["schema version None"]),
    ('{"schema_version": 2, "dtype": "fp32", "files": {}, "graphs": {}, "models": {}, "tokenizer": {}}',
     ["'limits' is missing"]),
    ('{"schema_version": 2, "dtype": "fp32", "files": {}, "graphs": {}, "models": {"target": {"config": {}}}, '
     '"tokenizer": {}, "limits": {"max_batch": "8"}}', ["'limits.max_batch' must be an integer"]),
    ("[" * 100000, ["not valid JSON"]),
    (b"\xff\xfe{}", ["not valid JSON"]),
])
def test_broken_manifests_are_one_line(qwen3_bundle, tmp_path, manifest, words):
    copy = tmp_path / "bundle"
    shutil.copytree(qwen3_bundle, copy)
    path = copy / "manifest.json"
    path.write_bytes(manifest if isinstance(manifest, bytes) else manifest.encode())
    code, out = run("generate", copy, "--prompt", "w1", "--max-new-tokens", 2)
    assert_one_line_error(code, out, *words)


def test_a_bundle_path_that_is_a_file(tmp_path):
    file = tmp_path / "bundle.onnx"
    file.write_text("x")
    code, out = run("generate", file, "--prompt", "w1")
    assert_one_line_error(code, out, "is a file, not a bundle folder")


@pytest.mark.parametrize("content,words", [
    (b"w1 w2\n\xff\xfe w3\n", ["not UTF-8", "byte 6"]),
    (b'{"prompt": ' + b"[" * 100000 + b"\n", ["prompts.txt:1", "nested too deeply"]),
    (b"[" * 100000 + b"\n", ["prompts.txt:1", "nested too deeply"]),
    (b'{"prompt": null}\n', ["prompts.txt:1", "string 'prompt'"]),
    (b'w1\n["c"]\n', ["prompts.txt:2", "string 'prompt'"]),
    (b'{"prompt": "w1", "domain": 3}\n', ["prompts.txt:1", "'domain'"]),
    (b'{"prompt": 1' + b"0" * 5000 + b"}\n", ["prompts.txt:1", "not valid JSON"]),
])
def test_bad_prompts_files_are_one_line(qwen3_bundle, tmp_path, content, words):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    code, out = run("generate", qwen3_bundle, "--prompts-file", prompts, "--max-new-tokens", 2)
    assert_one_line_error(code, out, *words)


def test_prompts_file_lines_that_look_like_json_but_are_text(tmp_path):
    from dspark.prompts import read_prompt_file

    prompts = tmp_path / "p.txt"
    prompts.write_text('[INST] w1 [/INST]\n{"prompt": "w2", "domain": "code"}\nw3\n')
    assert [(p.text, p.domain) for p in read_prompt_file(prompts)] == [
        ("[INST] w1 [/INST]", "custom"), ("w2", "code"), ("w3", "custom")]


def test_export_over_a_file_is_refused_before_any_work(qwen3_pair, tmp_path):
    _, target_dir, _ = qwen3_pair
    file = tmp_path / "out"
    file.write_text("keep me")
    code, out = run("export", target_dir, "--output", file, "--force")
    assert_one_line_error(code, out, "is a file, not a folder")
    assert file.read_text() == "keep me" and not list(tmp_path.glob(".out.partial-*"))


def test_export_under_an_unwritable_parent(qwen3_pair, tmp_path):
    import os

    _, target_dir, _ = qwen3_pair
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):  # root ignores modes: a sysfs folder refuses new entries even to root
            parent = Path("/sys/dspark-read-only")
            if not Path("/sys").is_dir():
                pytest.skip("no folder this user cannot write")
        code, out = run("export", target_dir, "--output", parent / "sub" / "bundle")
        assert_one_line_error(code, out, "choose an --output you can write")
        assert not (parent / "sub").exists()
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_exported_files_are_readable_by_everyone(qwen3_bundle):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for path in [qwen3_bundle, *qwen3_bundle.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))


def test_demo_on_the_shipped_family_exports_once_and_times_both_in_turn(tmp_path, monkeypatch):
    """`dspark demo --model shipped`: the 29 M pair exported into the cache (reused the second time), plain and
    speculative output identical, median speeds of runs taken in turn."""
    monkeypatch.setenv("DSPARK_CACHE", str(tmp_path))
    outputs = []
    for _ in range(2):
        result = CliRunner().invoke(main, ["demo", "--model", "shipped", "--max-new-tokens", "12"])
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    assert "exporting the shipped pair" in outputs[0] and "(cached)" in outputs[1]
    for out in outputs:
        assert "identical output: True" in out and out.count("(median of 3 runs in turn)") == 2
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("demo-dspark-")]) == 1
