"""Incremental detokenization on the real SmolLM2 tokenizer: the joined stream is the whole-sequence text.

Texts are tokenized naturally and one token per UTF-8 byte (every multi-byte character split
across tokens); the reference is ``tokenizer.decode`` of all ids, cut before the first stop.
"""

import random

import pytest

from greencode.detokenize import Detokenizer
from serve_helpers import byte_tokens

TEXTS = [
    "# 日本語のコメント\nx = 1",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flag 🇯🇵 coder 👩‍💻",
    "combining: e\u0301 n\u0303 Å; zalgo: z\u0351\u0352a\u0353",
    "RTL: العربية עברית mixed with code()",
    "Ελληνικά, кириллица, हिन्दी, 한국어, ไทย",
    "math 𝔸𝔹ℂ ∀x∈ℝ: x² ≥ 0 and BOM \ufeff NUL \x00 tab\t",
    "a\ufffdb: a real replacement character",
]


def stream(tokenizer, ids, **kwargs) -> tuple[list[str], Detokenizer]:
    detok = Detokenizer(tokenizer, **kwargs)
    pieces = []
    for i in ids:
        pieces.append(detok.push(i))
        if detok.stopped:
            break
    pieces.append(detok.finish())
    return pieces, detok


def reference(tokenizer, ids, stop=()) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(hits)] if hits else text


@pytest.mark.parametrize("split", ["natural", "bytes"])
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_joined_stream_is_the_decoded_text_and_never_a_partial_character(tokenizer, text, split):
    ids = tokenizer(text)["input_ids"] if split == "natural" else byte_tokens(tokenizer, text)
    pieces, detok = stream(tokenizer, ids)
    assert "".join(pieces) == detok.text == tokenizer.decode(ids) == text
    assert text.count("\ufffd") == "".join(pieces).count("\ufffd")  # no U+FFFD for a character split across tokens
    if split == "bytes" and any(ord(c) > 127 for c in text):
        assert "" in pieces[:-1]  # something was held back for a later token


def test_random_byte_splits_of_mixed_text(tokenizer):
    """Random slices of the texts, random mixes of natural and byte tokens (bounded, seeded)."""
    rng = random.Random(0)
    corpus = " ".join(TEXTS)
    for _ in range(60):
        start = rng.randrange(len(corpus))
        text = corpus[start : start + rng.randrange(1, 40)]
        ids = []
        for word in text.split(" "):
            ids += byte_tokens(tokenizer, word + " ") if rng.random() < 0.5 else tokenizer(word + " ")["input_ids"]
        pieces, _ = stream(tokenizer, ids)
        assert "".join(pieces) == tokenizer.decode(ids) == text + " "


def test_invalid_bytes_come_out_as_the_whole_decode_does(tokenizer):
    """A stray continuation byte mid-text stays U+FFFD; an unfinished character at the very end too."""
    ids = byte_tokens(tokenizer, "ab") + byte_tokens(tokenizer, "日")[1:2] + byte_tokens(tokenizer, "cd")
    ids += byte_tokens(tokenizer, "語")[:2]
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == "ab\ufffdcd\ufffd"


@pytest.mark.parametrize("text, stop", [
    ("x = 1\ndef f():\n    return 2\n", ["\ndef"]),       # spans tokens
    ("# 日本語です", ["本語"]),                             # inside characters split across byte tokens
    ("alpha beta gamma", ["zeta", "beta", "alpha beta"]),  # the earliest match wins, whatever the list order
    ("no stop here at all", ["here!"]),                   # a held prefix that never completes is released
    ("stop at the start", ["stop"]),
])
def test_stop_sequences_end_the_text_before_them_and_never_leak(tokenizer, text, stop):
    for ids in (tokenizer(text)["input_ids"], byte_tokens(tokenizer, text)):
        pieces, detok = stream(tokenizer, ids, stop=stop)
        expected = reference(tokenizer, ids, stop)
        assert "".join(pieces) == detok.text == expected
        assert detok.stopped == (expected != text)
        for s in stop:  # no released prefix of the text ever showed a stop sequence
            joined = ""
            for piece in pieces:
                joined += piece
                assert s not in joined


def test_nothing_after_a_stop(tokenizer):
    detok = Detokenizer(tokenizer, stop=["b"])
    [a, b] = tokenizer("a b")["input_ids"]
    assert detok.push(a) + detok.push(b) == "a "
    assert detok.stopped and detok.finish() == ""
    with pytest.raises(RuntimeError, match="stop sequence"):
        detok.push(a)


def test_prompt_context_and_special_tokens(tokenizer):
    prompt = tokenizer("def f(x):\n    return")["input_ids"]
    generated = tokenizer(" x + 1")["input_ids"] + [tokenizer.eos_token_id]
    pieces, detok = stream(tokenizer, generated, context_ids=prompt)
    assert "".join(pieces) == " x + 1" == tokenizer.decode(generated, skip_special_tokens=True)
    assert Detokenizer(tokenizer, skip_special_tokens=False).push(tokenizer.eos_token_id) == tokenizer.eos_token


class CountingTokenizer:
    """The real tokenizer, recording how many ids each decode call gets."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_each_token_decodes_a_short_window_not_the_sequence(tokenizer):
    counting = CountingTokenizer(tokenizer)
    ids = byte_tokens(tokenizer, "日本語 " * 60)
    pieces, _ = stream(counting, ids, context_ids=tokenizer("x = ")["input_ids"])
    assert "".join(pieces) == tokenizer.decode(ids)
    assert len(ids) > 500 and max(counting.lengths) <= 8
