"""The character bound that refuses an over-long prompt without tokenizing it must never refuse one that fits.

Property-based (hypothesis) over a byte-level BPE tokenizer trained here (NFC normalizer, an added special
token), with text built from the characters that stress the bound: multi-byte UTF-8, combining marks that NFC
composes, Hangul jamo (the largest NFC shrink), the special token itself, whitespace runs.
"""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from dspark.runtime.tokenizer import chars_per_token  # noqa: E402

SPECIAL = "<|endoftext|>"
PIECES = ["a", "e", "hello", " ", "   ", "\n", "\u0301", "\u0302", "\u0345", "\u1100", "\u1161", "\u11a8", "\u03b1",
          "\u0313", "\u0342", "\u4e2d", "\U0001f600", SPECIAL, "def f(x): return x", "\u00e9"]


@pytest.fixture(scope="module")
def byte_level():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[SPECIAL])
    tok.train_from_iterator(["hello world, this is a test of the tokenizer " * 20, "def f(x): return x + 1\n" * 20,
                             "\u4e2d\u6587 \u1100\u1161\u11a8 \u00e9t\u00e9 " * 20], trainer)
    return tok


def test_only_tokenizers_that_keep_every_byte_give_a_bound(byte_level):
    assert chars_per_token(byte_level) == 4 * max(len(t) for t in byte_level.get_vocab(with_added_tokens=True))
    words = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # drops whitespace: no bound
    assert chars_per_token(words) is None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(st.sampled_from(PIECES), max_size=400))
def test_the_bound_never_refuses_a_prompt_that_fits(byte_level, pieces):
    text = "".join(pieces)
    bound = chars_per_token(byte_level)
    tokens = len(byte_level.encode(text).ids)
    # the bound's promise: more than bound * n characters means more than n tokens, for every n
    assert len(text) <= bound * tokens
