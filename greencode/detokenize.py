"""Incremental detokenization: streamed text that is exactly the text of the whole sequence.

A token can end in the middle of a UTF-8 character (byte-level BPE splits ``日`` into three
tokens), and a later token can turn text already decoded into a stop sequence. Decoding the
whole sequence again at every token and sending "what is new" sends U+FFFD for the partial
character, and then has nothing consistent to send when the text before it changes.

:class:`Detokenizer` releases text only once no later token can change it:

- each step decodes a short window of ids (from ``prefix`` to the end) and keeps the part after
  the already-released window text (the method of TGI's and vLLM's incremental decoders, which
  also keeps SentencePiece's leading-space handling right); a window whose text ends in U+FFFD
  may be an unfinished character, so it is held back until a later token completes it;
- released text is searched for stop sequences; the longest tail that could still be the start
  of one is held back. On a match the text ends just before it and ``stopped`` is set.

``finish()`` releases whatever is held back (an unfinished character at the very end decodes as
U+FFFD, like the whole-sequence decode). The concatenation of everything ``push`` and ``finish``
return is ``text``; for a byte-level BPE tokenizer (the SmolLM2/GPT-2 family) it equals
``tokenizer.decode(ids, skip_special_tokens=True)`` cut before the first stop sequence, for any
Unicode. Costs O(window) per token, not O(sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class Detokenizer:
    """Text of one generated sequence, released token by token (see the module docstring).

    ``context_ids``: the last few prompt ids, decoded with the first generated tokens so the
    first one gets its leading space right (they are never part of ``text``).
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), context_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True, context_tokens: int = 5) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(context_ids)[-context_tokens:] if context_tokens else []
        self._prefix = 0  # window start: ids before it are settled
        self._read = len(self._ids)  # ids up to here are released (or held only for stop matching)
        self._held = ""  # released by the decoder, kept back because it may start a stop sequence
        self.text = ""  # everything returned so far
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the text it makes final ('' while held back)."""
        if self.stopped:
            raise RuntimeError("the sequence already ended at a stop sequence")
        self._ids.append(int(token_id))
        before = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if len(window) <= len(before) or window.endswith(REPLACEMENT):
            return ""  # nothing new yet, or a character still unfinished
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(window[len(before) :], final=False)

    def finish(self) -> str:
        """End of generation: release everything still held back."""
        if self.stopped:
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return self._release(window[len(before) :], final=True)

    def _release(self, fresh: str, final: bool) -> str:
        pending = self._held + fresh
        hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self._held, self.stopped = pending[: min(hits)], "", True
        else:
            keep = 0 if final else self._stop_prefix_length(pending)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += out
        return out

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that some stop sequence starts with."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
