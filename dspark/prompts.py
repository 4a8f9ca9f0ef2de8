"""Prompt sets: the built-in ones that ship with dspark, and prompt files (plain lines or JSON lines)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dspark.errors import DsparkError

DOMAINS = ("code", "prose")


@dataclass
class Prompt:
    text: str
    domain: str = "custom"


def builtin_prompts(domain: str = "all") -> list[Prompt]:
    """The prompt sets that ship with dspark (``dspark/data/prompts/<domain>.jsonl``), domains interleaved."""
    names = DOMAINS if domain == "all" else (domain,)
    if any(n not in DOMAINS for n in names):
        raise DsparkError(f"unknown built-in prompt set {domain!r}: use one of {', '.join(DOMAINS)}, all, or a file")
    sets = []
    for name in names:
        text = (resources.files("dspark") / "data" / "prompts" / f"{name}.jsonl").read_text()
        sets.append([Prompt(json.loads(line)["prompt"], name) for line in text.splitlines() if line.strip()])
    # interleave so the first few prompts cover every domain
    return [p for group in zip(*sets) for p in group] + [p for s in sets for p in s[min(map(len, sets)):]]


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """JSON lines with a ``prompt`` (and optional ``domain``) field, or plain text, one prompt per line.

    A line that starts with ``{``, or with ``[`` and parses as JSON, is JSON and must be an object with a string
    ``prompt``; any other line is a prompt as written (so ``[INST] hi`` stays text).
    """
    path = Path(path)
    if path.is_dir():
        raise DsparkError(f"{path} is a folder, not a prompts file")
    if not path.is_file():
        raise DsparkError(f"prompts file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DsparkError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
    prompts = [_prompt(line, f"{path}:{n}") for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not prompts:
        raise DsparkError(f"{path} has no prompts")
    return prompts


def _prompt(line: str, where: str) -> Prompt:
    head = line.lstrip()[:1]
    if head not in ("{", "["):
        return Prompt(line)
    try:
        obj = json.loads(line)
    except RecursionError:
        raise DsparkError(f"{where}: JSON nested too deeply; a JSON line needs a string 'prompt' field") from None
    except ValueError as e:  # bad JSON, or an integer too long to convert
        if head == "[":
            return Prompt(line)
        raise DsparkError(f"{where}: not valid JSON ({e}); a JSON line needs a string 'prompt' field") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise DsparkError(f"{where}: a JSON line must be an object with a string 'prompt' field, like "
                          '{"prompt": "text"}')
    domain = obj.get("domain", "custom")
    if not isinstance(domain, str):
        raise DsparkError(f"{where}: 'domain' must be a string")
    return Prompt(obj["prompt"], domain)


def load_prompts(spec: str | Path | None, limit: int | None = None) -> list[Prompt]:
    """``code``, ``prose``, ``all`` (built-in sets) or a file path; the first ``limit`` prompts."""
    spec = "all" if spec is None else str(spec)
    prompts = builtin_prompts(spec) if spec in DOMAINS + ("all",) else read_prompt_file(spec)
    if limit is not None:
        if limit < 1:
            raise DsparkError(f"--num-prompts must be at least 1, got {limit}")
        prompts = prompts[:limit]
    return prompts
