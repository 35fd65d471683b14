"""Request limits, checked before any model work (the checks of TGI's ``validation.rs``, per protocol).

Every check returns ``None`` or a :class:`Violation` naming the offending field; the app turns a
violation into a 4xx in the calling client's shape (``status=None``: the protocol's "invalid
request" status, 422 for TGI, 400 otherwise; 413 for an oversized body). Order of use:

1. ``check_content_length`` on the headers, then the byte count while the body is read (413);
2. ``json_depth`` on the body text before it is parsed (the parser recurses once per level, so the
   bound comes first), ``parse_int`` / ``parse_float`` while it is parsed (numbers longer than
   ``MAX_NUMBER_CHARS`` are refused, not converted), then ``check_json`` on the parsed JSON: a lone
   surrogate (``"\\ud800"`` is valid JSON, and the JSON decoder also lets UTF-8-encoded surrogates
   through) anywhere, key or value, would fail later in the tokenizer or in the response encoder;
3. ``check_request`` on what the request asks for, before tokenizing (prompt characters bound
   the tokenizer's work; the token count is then checked against the context limit).

The limits themselves are deployment config: ``ServeConfig.limits`` (greencode/config.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from greencode.config import RequestLimits


@dataclass(frozen=True)
class Violation:
    """A refused request: what is wrong, the field to name, and the HTTP status (None: the protocol's 4xx)."""

    message: str
    param: str | None
    status: int | None = None


def check_content_length(value: str | None, limits: RequestLimits) -> Violation | None:
    """The ``Content-Length`` header against ``max_body_bytes`` (a chunked body is counted as it arrives)."""
    if value is None:
        return None
    try:
        size = int(value)
    except ValueError:
        return Violation(f"Content-Length is not a number: {value[:40]!r}", None, 400)
    return body_too_large(size, limits)


def body_too_large(size: int, limits: RequestLimits) -> Violation | None:
    if size <= limits.max_body_bytes:
        return None
    return Violation(f"request body is {size} bytes or more; this server accepts at most {limits.max_body_bytes}",
                     None, 413)


MAX_NUMBER_CHARS = 64  # characters of one JSON number: no request field needs more than a float's 17 digits

_BRACKET_STEP = np.zeros(256, np.int8)  # byte -> nesting change
_BRACKET_STEP[list(b"[{")] = 1
_BRACKET_STEP[list(b"]}")] = -1
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(text: str) -> int:
    """The deepest array/object nesting of JSON text, counted without recursing or parsing (linear, C-speed).

    Escaped backslashes and quotes are dropped, so every remaining quote opens or closes a string; the
    brackets outside strings are then counted. For text that is not valid JSON this bounds the nesting of
    the valid prefix a parser reads before it fails, which is all it recurses over.
    """
    unescaped = text.replace("\\\\", "").replace('\\"', "")
    outside = "".join(unescaped.split('"')[::2]).encode("utf-8", "surrogatepass").translate(None, _NOT_BRACKETS)
    if not outside:
        return 0
    return int(np.cumsum(_BRACKET_STEP[np.frombuffer(outside, np.uint8)], dtype=np.int64).max())


class NumberTooLong(ValueError):
    """A JSON number longer than MAX_NUMBER_CHARS (raised from the parser's number hooks)."""

    def __init__(self, text: str) -> None:
        super().__init__(f"a number of {len(text)} characters ({text[:20]}...): numbers are at most "
                         f"{MAX_NUMBER_CHARS} characters")


def _bounded(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A ``json.loads`` number hook: a number longer than any field needs is refused, not converted."""
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_CHARS:
            raise NumberTooLong(text)
        return convert(text)

    return parse


parse_int = _bounded(int)  # json.loads(parse_int=...)
parse_float = _bounded(float)  # json.loads(parse_float=...)


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_json(value: Any) -> Violation | None:
    """The first string (value or object key) in a parsed JSON body that is not valid Unicode. The body's
    nesting was bounded before it was parsed (:func:`json_depth`), so this recursion is too."""
    return _check_json(value, "")


def _check_json(value: Any, path: str) -> Violation | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            where = path or "body"
            return Violation(f"{where}: string holds a lone surrogate {_escaped(value[err.start])} at index "
                             f"{err.start}: send valid UTF-8 text", path or None)
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            key_path = f"{path}.{_escaped(key)}" if path else _escaped(key)
            if (bad := _check_json(key, f"{key_path} (key)")) is not None:
                return bad
            if (bad := _check_json(item, key_path)) is not None:
                return bad
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (bad := _check_json(item, f"{path}.{i}" if path else str(i))) is not None:
                return bad
    return None


def check_request(limits: RequestLimits, *, prompts: Sequence[str], prompt_field: str, suffix: str | None = None,
                  stop: Sequence[str] = (), stop_field: str = "stop", max_new_tokens: int | None = None,
                  max_new_tokens_field: str = "max_new_tokens", sequences: int = 1,
                  sequences_field: str = "n", cache_salt: str | None = None,
                  cache_salt_field: str = "cache_salt") -> Violation | None:
    """What one request asks for, in the field names of its protocol (``parameters.stop``, ``max_tokens``...)."""
    if sequences > limits.max_sequences:
        return Violation(f"{sequences_field}: this request asks for {sequences} sequences (prompts x n); "
                         f"the server allows {limits.max_sequences} per request", sequences_field)
    for prompt in prompts:
        chars = len(prompt) + len(suffix or "")
        if chars > limits.max_prompt_chars:
            return Violation(f"{prompt_field}: the prompt is {chars} characters; the server accepts at most "
                             f"{limits.max_prompt_chars}", prompt_field)
    if len(stop) > limits.max_stop_sequences:
        return Violation(f"{stop_field}: {len(stop)} stop sequences; the server accepts at most "
                         f"{limits.max_stop_sequences}", stop_field)
    for i, s in enumerate(stop):
        if len(s) > limits.max_stop_chars:
            return Violation(f"{stop_field}.{i}: a stop sequence of {len(s)} characters; the server accepts at most "
                             f"{limits.max_stop_chars}", stop_field)
    if cache_salt is not None and len(cache_salt) > limits.max_cache_salt_chars:
        return Violation(f"{cache_salt_field}: {len(cache_salt)} characters; the server accepts at most "
                         f"{limits.max_cache_salt_chars}", cache_salt_field)
    if max_new_tokens is not None and sequences * max_new_tokens > limits.max_request_tokens:
        return Violation(f"{max_new_tokens_field}: {sequences} sequences x {max_new_tokens} new tokens = "
                         f"{sequences * max_new_tokens} tokens; the server allows {limits.max_request_tokens} per "
                         "request", max_new_tokens_field)
    if max_new_tokens is not None and max_new_tokens > limits.max_new_tokens:
        return Violation(f"{max_new_tokens_field}: {max_new_tokens} new tokens asked; the server allows at most "
                         f"{limits.max_new_tokens}", max_new_tokens_field)
    return None
