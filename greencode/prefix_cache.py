"""Prefix cache: full-depth keys/values of earlier requests, reused by later ones (issue 12).

An IDE sends a request on nearly every keystroke and consecutive prompts share almost all
their tokens. Prompt positions always run every layer (gates only act on generated tokens),
so their keys/values are exactly the full model's: a request whose tokens start like a
stored sequence can take those K/V and run only the rest of its prompt.

Rules that keep reuse exact:

- Only K/V computed at full depth are stored. A generated token's K/V are full-depth only if
  the step that fed it back ran every layer *and* every token before it was full-depth: an
  exited token's skipped layers hold K/V propagated from its exited state, and every later
  token attended to them (:func:`full_depth_tokens`).
- Entries are immutable. An entry is one tensor copied out of the request's cache, never a
  view of it; a request that reuses an entry copies what it needs into its own fresh cache.
  Nothing a request does to its cache (``DynamicCache.update`` concatenates into new tensors,
  ``crop`` slices, other cache code may write in place) can reach a stored entry.
- Positions come from the attention mask's cumsum, so a row's real tokens sit at positions
  ``0..n-1`` whatever its left padding: stored keys (rotary already applied for Llama-style
  models, learned positions added before the layers for OPT) are valid in any batch layout as
  long as the prefix starts the row, which :meth:`PrefixCache.reuse` guarantees.

The cache is bounded by bytes: least recently used whole entries are evicted before an
insert would exceed the budget, so it never holds more than its budget.

:class:`greencode.generate.GatedGenerator` drives it: its prompt pass calls :meth:`~PrefixCache.reuse`
and runs only the positions that were not loaded, then stores the prompts; the end of a stream
stores each row's prompt and full-depth completion (:meth:`~PrefixCache.remember`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class PrefixCacheStats:
    lookups: int  # prompts looked up
    hits: int  # prompts that reused at least one token
    prompt_tokens: int  # tokens of the prompts looked up
    reused_tokens: int  # of those, tokens whose K/V came from the cache
    entries: int
    bytes_held: int
    budget_bytes: int
    evictions: int  # entries dropped to stay within the budget
    rejected: int  # sequences not stored because they alone exceed the budget

    @property
    def hit_rate(self) -> float:
        """Share of prompt tokens served from the cache (vLLM's prefix-cache hit rate is also per token)."""
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True)
class _Entry:
    tokens: np.ndarray  # [n] int64, read-only
    kv: torch.Tensor  # [layers, 2, kv_heads, n, head_dim]: keys and values of every layer

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PrefixCache:
    """Token sequences with their full-depth K/V, LRU by bytes, safe to share between threads.

    Bound to one model (``model_fingerprint``): K/V of other weights would silently give wrong
    tokens, so :meth:`check_model` refuses a model it was not made for. Lookup is a scan over
    the entries (a few hundred at realistic budgets: microseconds next to a layer).
    """

    def __init__(self, budget_bytes: int, model_fingerprint: str) -> None:
        if budget_bytes < 0:
            raise ValueError(f"prefix cache budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self.model_fingerprint = model_fingerprint
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest use first
        self._next_key = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._lookups = self._hits = self._prompt_tokens = self._reused_tokens = 0
        self._evictions = self._rejected = 0

    # ------------------------------------------------------------------ lookup

    def longest_prefix(self, tokens: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """(length, K/V) of the stored sequence sharing the longest leading run with ``tokens``.

        The K/V tensor ``[layers, 2, kv_heads, n, head_dim]`` is shared and must only be read
        (its first ``length`` positions are the match). The entry becomes the most recently used.
        """
        query = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            best_key, best_len = None, 0
            for key, entry in reversed(self._entries.items()):  # most recent first wins ties
                n = _common_prefix(entry.tokens, query)
                if n > best_len:
                    best_key, best_len = key, n
            if best_key is None:
                return 0, None
            self._entries.move_to_end(best_key)
            return best_len, self._entries[best_key].kv

    def covers(self, tokens: Sequence[int]) -> bool:
        """Whether a stored sequence starts with all of ``tokens`` (storing them would add nothing)."""
        return self.longest_prefix(tokens)[0] == len(tokens)

    def record(self, prompt_tokens: int, reused_tokens: int) -> None:
        """Count one looked-up prompt and how many of its tokens were actually reused."""
        with self._lock:
            self._lookups += 1
            self._hits += reused_tokens > 0
            self._prompt_tokens += prompt_tokens
            self._reused_tokens += reused_tokens

    # ------------------------------------------------------------------ insert / evict

    def insert(self, tokens: Sequence[int], kv: torch.Tensor) -> bool:
        """Store ``tokens`` with their K/V ``[layers, 2, kv_heads, n, head_dim]``; True if stored.

        Takes ownership of ``kv``: pass a tensor nothing else will write to (:func:`remember`
        builds one). A sequence already covered by a stored one is not stored again; stored
        sequences that are prefixes of the new one are dropped (it answers every lookup they
        would); least recently used entries are evicted until the new one fits the budget.
        """
        if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] != len(tokens):
            raise ValueError(f"kv must be [layers, 2, kv_heads, {len(tokens)}, head_dim], got {list(kv.shape)}")
        entry = _Entry(np.asarray(tokens, dtype=np.int64).copy(), kv)
        entry.tokens.setflags(write=False)
        with self._lock:
            if entry.nbytes > self.budget_bytes:
                self._rejected += 1
                return False
            for key, old in list(self._entries.items()):
                n = _common_prefix(old.tokens, entry.tokens)
                if n == len(entry.tokens):  # covered by a stored sequence: keep that one, fresher
                    self._entries.move_to_end(key)
                    return False
                if n == len(old.tokens):  # a prefix of the new sequence: redundant from now on
                    self._drop(key)
            while self._bytes + entry.nbytes > self.budget_bytes:
                self._drop(next(iter(self._entries)))
                self._evictions += 1
            self._entries[self._next_key] = entry
            self._next_key += 1
            self._bytes += entry.nbytes
            return True

    def _drop(self, key: int) -> None:
        self._bytes -= self._entries.pop(key).nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> PrefixCacheStats:
        with self._lock:
            return PrefixCacheStats(self._lookups, self._hits, self._prompt_tokens, self._reused_tokens,
                                    len(self._entries), self._bytes, self.budget_bytes, self._evictions,
                                    self._rejected)

    # ------------------------------------------------------------------ what a request reads and writes

    def check_model(self, model_fingerprint: str, model_config: Any) -> None:
        """Refuse a model this cache cannot serve exactly: other weights, or sliding-window layers."""
        from transformers import DynamicCache

        if model_fingerprint != self.model_fingerprint:
            raise ValueError(f"this prefix cache holds K/V of model {self.model_fingerprint}, not of the running model "
                             f"{model_fingerprint}: make a new PrefixCache for it")
        _layers(DynamicCache(config=model_config))

    def reuse(self, cache: Any, encoded: Sequence[Sequence[int]]) -> tuple[int, list[int]]:
        """Load the longest stored prefix of every row into the empty request ``cache``.

        The rows are laid out as the generator's prompt pass lays them out: left-padded to the
        longest. Returns ``(past, reused)``: the cache now holds the first ``past`` columns, so the
        pass runs only the last ``width - past`` positions; ``reused[r]`` is how many of row
        ``r``'s tokens came from here. Every row's last token is left to the pass (its logits start
        decoding). All rows run ``S`` new positions (the longest remainder), right-aligned: a row
        whose remainder is shorter recomputes a few more of its own tokens instead of leaving a
        hole, so the batch stays plainly left-padded. Every looked-up prompt is counted in
        :meth:`stats`.
        """
        if not encoded or any(len(p) == 0 for p in encoded):
            raise ValueError("every prompt needs at least one token")
        lengths = [len(p) for p in encoded]
        matches = [self.longest_prefix(p) for p in encoded]
        matched = [min(n, length - 1) for (n, _), length in zip(matches, lengths)]
        new = max(length - m for length, m in zip(lengths, matched))  # S positions the pass runs
        past = max(lengths) - new  # cached columns
        reused = [max(0, length - new) for length in lengths]  # <= matched by the choice of S
        for length, u in zip(lengths, reused):
            self.record(length, u)
        if past > 0:
            # [layers, 2, B, kv_heads, past, head_dim], zeros under the padding (masked, and finite)
            first = next(kv for (_, kv), u in zip(matches, reused) if u > 0)
            layers, _, heads, _, head_dim = first.shape
            kv = first.new_zeros((layers, 2, len(encoded), heads, past, head_dim))
            for r, ((_, entry), u) in enumerate(zip(matches, reused)):
                if u > 0:
                    kv[:, :, r, :, past - u:] = entry[:, :, :, :u]
            for i in range(layers):
                cache.update(kv[i, 0], kv[i, 1], i)
        return past, reused

    def remember(self, cache: Any, attention_mask: torch.Tensor, rows: Sequence[Sequence[int] | None]) -> int:
        """Store each row's full-depth tokens with their K/V from a left-padded batch ``cache``.

        ``rows[r]`` are the tokens of row ``r`` whose K/V are full-depth, starting at the row's
        first unpadded column (the prompt, possibly followed by :func:`full_depth_tokens` of its
        completion); ``None`` skips the row. Returns how many rows were stored.
        """
        layers = _layers(cache)
        width = layers[0].keys.shape[2]
        starts = attention_mask.long().argmax(dim=1).tolist()  # first 1 of each (left-padded) row
        stored = 0
        for r, tokens in enumerate(rows):
            if not tokens or self.covers(tokens):
                continue
            start, n = starts[r], len(tokens)
            if start + n > width:
                raise ValueError(f"row {r}: {n} tokens from column {start} exceed the cache's {width} positions")
            kv = torch.stack([torch.stack((layer.keys[r, :, start:start + n], layer.values[r, :, start:start + n]))
                              for layer in layers])  # a fresh tensor: never a view of the request's cache
            stored += self.insert(tokens, kv)
        return stored


def full_depth_tokens(prompt: Sequence[int], completion: Sequence[int], layers_per_token: Sequence[int],
                      num_layers: int) -> list[int]:
    """The leading tokens of ``prompt + completion`` whose cached K/V are the full model's.

    Prompt positions always are. Completion token ``i`` is fed back in the step that produces
    token ``i + 1``, so its K/V ran every layer iff ``layers_per_token[i + 1] == num_layers``;
    the first token that exited ends the run (its skipped layers hold propagated K/V, and every
    later token attended to them). The last token is never fed back and has no K/V.
    """
    k = 0
    while k + 1 < len(completion) and layers_per_token[k + 1] == num_layers:
        k += 1
    return [*prompt, *completion[:k]]


def _layers(cache: Any) -> list[Any]:
    layers = list(cache.layers)
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        raise ValueError("the prefix cache needs every layer to keep all positions; "
                         "this model's cache has sliding-window layers")
    return layers
