"""The bundle's tokenizer (``tokenizers`` fast tokenizer) and incremental detokenisation with stop strings."""

from __future__ import annotations

import json

from dspark.bundle import Bundle
from dspark.errors import DsparkError


class Tokenizer:
    def __init__(self, bundle: Bundle):
        from tokenizers import Tokenizer as FastTokenizer

        self.fast = FastTokenizer.from_file(str(bundle.file("tokenizer.json")))
        config_path = bundle.file("tokenizer_config.json")
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}

    def encode(self, text: str) -> list[int]:
        # special tokens (BOS) follow the tokenizer's own post-processor, as transformers does
        return self.fast.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.fast.decode(ids, skip_special_tokens=True)


class TextStream:
    """Turns a growing list of generated ids into text deltas, and finds the first stop string.

    Text ending in U+FFFD is held back: a byte-level token can end in the middle of a UTF-8 character.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def update(self, ids: list[int], final: bool = False) -> str:
        """Decode ``ids`` (all generated so far) and return the new text that is safe to show."""
        text = self.tokenizer.decode(ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.stopped, final = text[:at], True, True
        if not final:
            safe = len(text)
            while safe and text[safe - 1] == "\ufffd":
                safe -= 1
            # hold back a tail that could still grow into a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
            text = text[:safe]
        self.text = text
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta


def check_prompt(ids: list[int], max_context: int) -> None:
    if not ids:
        raise DsparkError("the prompt is empty; give at least one token of text")
    if len(ids) + 1 > max_context:
        raise DsparkError(
            f"the prompt has {len(ids)} tokens but the bundle's max context is {max_context}; "
            "shorten the prompt or re-export with a larger --max-context"
        )
