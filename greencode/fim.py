"""Fill-in-the-middle prompts built from the model's own FIM tokens (issue 12).

Code models are trained to complete a hole between a prefix and a suffix when both are given
around three sentinel tokens. Spellings and layouts, as each family's own code writes them:

=================  =========================================================  =====================
family             sentinels (prefix, suffix, middle)                         trained layouts
=================  =========================================================  =====================
starcoder          ``<fim_prefix>`` ``<fim_suffix>`` ``<fim_middle>``          PSM and SPM
                   (StarCoder, StarCoder2; bigcode Megatron ``fim_spm_rate``)
santacoder         ``<fim-prefix>`` ``<fim-suffix>`` ``<fim-middle>``          PSM and SPM
qwen               ``<|fim_prefix|>`` ``<|fim_suffix|>`` ``<|fim_middle|>``    PSM
                   (Qwen2.5-Coder; CodeGemma spells them the same)
codellama          ``▁<PRE>`` ``▁<SUF>`` ``▁<MID>`` (+ ``▁<EOT>`` ends a fill)  PSM and SPM
deepseek           ``<｜fim▁begin｜>`` ``<｜fim▁hole｜>`` ``<｜fim▁end｜>``        PSM
=================  =========================================================  =====================

PSM is ``[P] prefix [S] suffix [M]``; SPM is the variant bigcode and Code Llama trained on,
``[P] [S] suffix [M] prefix``. A tokenizer's BOS, when it adds one, comes first. Code Llama
encodes the prefix with SentencePiece's leading space and the suffix without it (Meta's
``encode_infilling``), which is what its text form ``<PRE> {pre} <SUF>{suf} <MID>`` means.

SPM matters for the prefix cache: while the user types, the text after the cursor does not
change, so ``[P] [S] suffix [M] prefix`` keeps all but the new characters cached, where PSM
recomputes the whole suffix on every keystroke.

Clients that format FIM themselves (llm-vscode's ``fillInTheMiddle`` setting, Continue's
templates) send the markers as text; :func:`parse_fim_prompt` recognises any family's layout
so the server can rebuild the prompt with the running model's own tokens, or refuse it
clearly when the model has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Order = Literal["psm", "spm"]


class FimUnsupportedError(ValueError):
    """The model cannot do this fill-in-the-middle request; the message says why and what to send."""


@dataclass(frozen=True)
class _Family:
    name: str
    vocab: tuple[str, str, str]  # the sentinels as tokenizer vocabulary entries: prefix, suffix, middle
    spm: bool  # trained with the suffix-first layout too
    written: tuple[str, str, str] | None = None  # as clients write them in a prompt, when not as in the vocab
    spaced: bool = False  # Code Llama's text form puts one space between a sentinel and the prefix/suffix
    end: str | None = None  # token that ends a fill, when it is not the tokenizer's EOS

    @property
    def text(self) -> tuple[str, str, str]:
        return self.written or self.vocab


FAMILIES = (
    _Family("starcoder", ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), spm=True),
    _Family("santacoder", ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"), spm=True),
    _Family("qwen", ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), spm=False),
    _Family("codellama", ("▁<PRE>", "▁<SUF>", "▁<MID>"), spm=True, written=("<PRE>", "<SUF>", "<MID>"), spaced=True,
            end="▁<EOT>"),
    _Family("deepseek", ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"), spm=False),
)

NO_FIM = ("fill-in-the-middle needs a model whose tokenizer has FIM tokens (StarCoder <fim_prefix>, Qwen2.5-Coder "
           "<|fim_prefix|>, Code Llama <PRE>, DeepSeek-Coder <｜fim▁begin｜>) and this model's tokenizer has none: "
           "send the prompt without a suffix, or serve a code model with FIM tokens")

# SentencePiece-style tokenizers prepend a space marker to any text they encode; Meta's
# encode_infilling removes it by encoding this character in front and dropping its tokens.
_SENTINEL = "☺"


@dataclass(frozen=True)
class FimFormat:
    """The FIM tokens of one tokenizer."""

    family: str
    prefix_id: int
    suffix_id: int
    middle_id: int
    spm: bool  # the family was trained with the suffix-first layout too
    end_id: int | None = None  # ends a fill besides the tokenizer's EOS (Code Llama's <EOT>)
    text: tuple[str, str, str] = ("", "", "")  # the sentinels as clients write them (prefix, suffix, middle)


@dataclass(frozen=True)
class FimParts:
    """A FIM request recognised in a pre-formatted prompt."""

    prefix: str
    suffix: str
    preamble: str = ""  # text before the first sentinel (repo/file context of Continue's templates)
    family: str = ""  # whose sentinels the client used
    order: Order = "psm"


def detect_fim(tokenizer: Any) -> FimFormat | None:
    """The tokenizer's FIM tokens, or None when it has no complete set."""
    if tokenizer is None:
        return None
    for fam in FAMILIES:
        ids = _token_ids(tokenizer, fam.vocab)
        if ids is not None:
            end = _token_ids(tokenizer, (fam.end,)) if fam.end else None
            return FimFormat(fam.name, *ids, fam.spm, end[0] if end else None, fam.text)
    return None


def _token_ids(tokenizer: Any, tokens: tuple[str, ...]) -> list[int] | None:
    """The ids of ``tokens`` if the vocabulary has every one (an unknown token maps to UNK, which maps back to
    another string); a lookup per token, not the whole vocabulary as a dict (~0.1 s for 50k entries)."""
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if any(i is None for i in ids) or tokenizer.convert_ids_to_tokens(ids) != list(tokens):
        return None
    return ids


def fim_format(tokenizer: Any) -> FimFormat:
    """Like :func:`detect_fim`, but a model without FIM tokens is a :class:`FimUnsupportedError`."""
    fmt = detect_fim(tokenizer)
    if fmt is None:
        raise FimUnsupportedError(NO_FIM)
    return fmt


def fim_prompt_ids(tokenizer: Any, prefix: str, suffix: str, order: Order = "psm", preamble: str = "",
                   fmt: FimFormat | None = None) -> list[int]:
    """Token ids of the FIM prompt for the text before (``prefix``) and after (``suffix``) the cursor.

    The prefix and suffix are encoded as plain text (sentinel spellings inside the user's code
    stay text); the ``preamble`` (context placed before the first sentinel, e.g. Qwen's
    ``<|file_sep|>`` repo format) may carry special tokens. Pass ``fmt`` (detected once, e.g. per
    server replica) to skip detecting it again.
    """
    fmt = fmt or fim_format(tokenizer)
    if order not in ("psm", "spm"):
        raise ValueError(f"FIM order must be 'psm' or 'spm', got {order!r}")
    if order == "spm" and not fmt.spm:
        raise FimUnsupportedError(f"the {fmt.family} FIM format was trained prefix-suffix-middle only: use order 'psm'")
    head = _leading_special_ids(tokenizer)
    if preamble:
        head += tokenizer.encode(preamble, add_special_tokens=False)
    pre = _encode_text(tokenizer, prefix)
    suf = _encode_text(tokenizer, suffix, leading_space=False)
    if order == "spm":
        return [*head, fmt.prefix_id, fmt.suffix_id, *suf, fmt.middle_id, *pre]
    return [*head, fmt.prefix_id, *pre, fmt.suffix_id, *suf, fmt.middle_id]


def parse_fim_prompt(text: str) -> FimParts | None:
    """Prefix and suffix of a prompt a client already formatted for FIM, or None if it is not one.

    Recognises every family's sentinels (as text) in the layouts clients send: PSM
    ``[pre]P prefix S suffix M`` (llm-vscode, Continue) and SPM ``[pre]P S suffix M prefix``.
    The prompt must hold one complete layout; the first prefix sentinel starts it.
    """
    for fam in FAMILIES:
        p, s, m = fam.text
        start = text.find(p)
        if start < 0:
            continue
        preamble, rest = text[:start], text[start + len(p):]
        trimmed = rest[1:] if fam.spaced and rest.startswith(" " + s) else rest
        if trimmed.startswith(s):  # SPM: the suffix comes first
            suffix, sep, prefix = trimmed[len(s):].partition(m)
            if not sep:
                return None
            if fam.spaced:
                suffix, prefix = _cut(suffix, end=True), _cut(prefix, end=False)
            return FimParts(prefix, suffix, preamble, fam.name, "spm")
        if not rest.endswith(m):
            return None
        prefix, sep, suffix = rest[: -len(m)].partition(s)
        if not sep:
            return None
        if fam.spaced:
            prefix, suffix = _cut(_cut(prefix, end=False), end=True), _cut(suffix, end=True)
        return FimParts(prefix, suffix, preamble, fam.name, "psm")
    return None


# --------------------------------------------------------------------------- helpers


def _cut(text: str, end: bool) -> str:
    """Remove the one space Code Llama's text form puts between a sentinel and the text."""
    if end:
        return text[:-1] if text.endswith(" ") else text
    return text[1:] if text.startswith(" ") else text


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens (BOS) the tokenizer puts before any text it encodes."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


def _adds_leading_space(tokenizer: Any) -> bool:
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
    return bool(tokens) and tokens[0].startswith("▁")


def _encode_text(tokenizer: Any, text: str, leading_space: bool = True) -> list[int]:
    """``text`` as plain-text tokens; ``leading_space=False`` drops SentencePiece's implicit leading space."""
    if not text:
        return []
    if leading_space or not _adds_leading_space(tokenizer):
        return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    marker = tokenizer.encode(_SENTINEL, add_special_tokens=False, split_special_tokens=True)
    joined = tokenizer.encode(_SENTINEL + text, add_special_tokens=False, split_special_tokens=True)
    if joined[: len(marker)] != marker:
        raise FimUnsupportedError("cannot encode the suffix without a leading space with this tokenizer")
    return joined[len(marker):]
