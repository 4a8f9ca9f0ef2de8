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
    """JSON lines with a ``prompt`` (and optional ``domain``) field, or plain text, one prompt per line."""
    path = Path(path)
    if not path.is_file():
        raise DsparkError(f"prompts file not found: {path}")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                prompts.append(Prompt(str(obj["prompt"]), str(obj.get("domain", "custom"))))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DsparkError(f"{path}:{n}: a JSON line needs a string 'prompt' field") from None
        else:
            prompts.append(Prompt(line))
    if not prompts:
        raise DsparkError(f"{path} has no prompts")
    return prompts


def load_prompts(spec: str | Path | None, limit: int | None = None) -> list[Prompt]:
    """``code``, ``prose``, ``all`` (built-in sets) or a file path; the first ``limit`` prompts."""
    spec = "all" if spec is None else str(spec)
    prompts = builtin_prompts(spec) if spec in DOMAINS + ("all",) else read_prompt_file(spec)
    if limit is not None:
        if limit < 1:
            raise DsparkError(f"--num-prompts must be at least 1, got {limit}")
        prompts = prompts[:limit]
    return prompts
