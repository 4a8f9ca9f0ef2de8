"""The bundle's tokenizer (``tokenizers`` fast tokenizer) and incremental detokenisation with stop strings."""

from __future__ import annotations

import json
import time

from dspark.bundle import Bundle
from dspark.errors import DsparkError


class Tokenizer:
    def __init__(self, bundle: Bundle):
        from tokenizers import Tokenizer as FastTokenizer

        self.fast = FastTokenizer.from_file(str(bundle.file("tokenizer.json")))
        config_path = bundle.file("tokenizer_config.json")
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.chars_per_token = chars_per_token(self.fast)

    def too_long(self, text: str, max_tokens: int) -> bool:
        """True when ``text`` certainly encodes to more than ``max_tokens`` tokens, decided without encoding it
        (always False where the tokenizer gives no such bound)."""
        return self.chars_per_token is not None and len(text) > self.chars_per_token * max_tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; special tokens (BOS) follow the tokenizer's own post-processor, as transformers does.

        Through ``encode_batch``, which releases the GIL while it works (``encode`` holds it: a 300,000-word prompt
        tokenized in a worker thread stalled the server's event loop 0.3 s)."""
        return self.fast.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self.fast.decode(ids, skip_special_tokens=True)


class ChatTemplate:
    """The bundle's chat template (Jinja, sandboxed, as transformers renders it): messages -> prompt ids."""

    def __init__(self, tokenizer: Tokenizer, source: str):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise DsparkError(f"the chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: time.strftime(fmt))
        self.tokenizer = tokenizer
        self.template = env.from_string(source)

    @classmethod
    def load(cls, tokenizer: Tokenizer, source: str | None = None) -> "ChatTemplate | None":
        """``source``, else the tokenizer config's template (the default of transformers' named ones), else None."""
        if source is None:
            source = tokenizer.config.get("chat_template")
            if isinstance(source, list):  # transformers' named templates: [{"name": ..., "template": ...}]
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default") or next(iter(named.values()), None)
        return cls(tokenizer, source) if isinstance(source, str) and source else None

    def ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode(self.render(messages), add_special_tokens=False)  # the template writes the specials

    def render(self, messages: list[dict]) -> str:
        """The prompt text, ending with the assistant's turn opened."""
        config = self.tokenizer.config
        try:
            text = self.template.render(messages=messages, add_generation_prompt=True,
                                        bos_token=_token_text(config.get("bos_token")),
                                        eos_token=_token_text(config.get("eos_token")))
        except DsparkError:
            raise
        except Exception as e:
            raise DsparkError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
        return text


def _token_text(value) -> str:
    if isinstance(value, dict):  # an AddedToken written out by transformers
        return value.get("content", "")
    return value if isinstance(value, str) else ""


class TextStream:
    """Turns generated ids, pushed as they come, into text deltas, and finds the first stop string.

    Incremental: each push decodes only a short window (the tokens since the last complete piece of text, with
    the piece before them as context, so decoders that join tokens with spaces or strip a leading one decode the
    join correctly), and looks for stop strings only where a new one can start. Text ending in U+FFFD is held
    back: a byte-level token can end in the middle of a UTF-8 character.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decoded to the last complete piece
        self.read = 0
        self.decoded = ""  # every complete piece so far
        self.text = ""  # what is safe to show: no stop string, no tail that could grow into one
        self.stopped = False

    def _decode_new(self, final: bool) -> str:
        if len(self.ids) == self.read:
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def push(self, ids: list[int], final: bool = False) -> str:
        """Add newly generated ``ids``; return the new text that is safe to show."""
        self.ids += ids
        searched = max(0, len(self.decoded) - self.longest_stop + 1)
        self.decoded += self._decode_new(final)
        text = self.decoded
        for s in self.stop:
            at = text.find(s, searched)
            if at >= 0:
                text, self.stopped, final = text[:at], True, True
        if not final:
            safe = len(text)
            while safe and text[safe - 1] == "\ufffd":
                safe -= 1
            # hold back a tail that could still grow into a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text.endswith(s[:k], 0, safe):
                        safe -= k
                        break
            text = text[:safe]
        delta = text[len(self.text) :]
        self.text = text
        return delta


# NFC composition shrinks UTF-8 text by less than this factor (Hangul L+V+T jamo: 9 bytes -> 3; Greek with
# three combining marks: 8 -> 3); kept at 4 for margin
NFC_SHRINK = 4


def chars_per_token(fast) -> int | None:
    """Most characters of text one token can cover, where that is knowable from the tokenizer's description.

    Byte-level BPE (GPT-2, Llama 3, Qwen) drops no byte of the text: every byte of the (NFC-normalized) UTF-8
    text lands in some token, and no token is longer than the longest vocabulary entry (one character per
    byte) or added token. A character is at least one byte, so a text of more than ``bound * n`` characters
    has more than ``n`` tokens. Tokenizers that may drop text (whitespace splitting, stripping normalizers)
    give None: only encoding tells.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    spec = json.loads(fast.to_str())

    def keeps_every_byte(pre) -> bool:
        kind = (pre or {}).get("type")
        if kind == "Sequence":
            return all(keeps_every_byte(p) for p in pre["pretokenizers"])
        return kind in ("ByteLevel", "Digits") or (kind == "Split" and pre.get("behavior") != "Removed")

    def uses_byte_level(pre) -> bool:
        kind = (pre or {}).get("type")
        return kind == "ByteLevel" or (kind == "Sequence" and any(uses_byte_level(p) for p in pre["pretokenizers"]))

    normalizer = spec.get("normalizer")
    normalizers = normalizer.get("normalizers", []) if normalizer and normalizer.get("type") == "Sequence" else [normalizer]
    shrink = 1
    for n in normalizers:
        if n is None:
            continue
        if n.get("type") != "NFC":
            return None
        shrink = NFC_SHRINK
    pre = spec.get("pre_tokenizer")
    vocab = fast.get_vocab(with_added_tokens=True)
    if (spec.get("model", {}).get("type") != "BPE" or not uses_byte_level(pre) or not keeps_every_byte(pre)
            or spec.get("truncation") or not set(ByteLevel.alphabet()) <= vocab.keys()):
        return None
    return shrink * max(len(token) for token in vocab)


def check_prompt(ids: list[int], max_context: int) -> None:
    if not ids:
        raise DsparkError("the prompt is empty; give at least one token of text")
    if len(ids) + 1 > max_context:
        raise DsparkError(
            f"the prompt has {len(ids)} tokens but the bundle's max context is {max_context}; "
            "shorten the prompt or re-export with a larger --max-context"
        )
