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

Rules that keep it private (issue 25): a cached prompt answers much faster than a cold one and
replies report how many prompt tokens were reused, so a shared cache would tell one client what
another one sent. Every entry belongs to a :class:`Partition` (the tenant its API key names,
plus the request's optional ``cache_salt``) and a lookup only ever matches entries of its own
partition: the partition's digest seeds the hash chain every index key is built from, and a
candidate's partition is compared again before use. Each tenant has its own byte budget and
entry cap, and evicts only its own least recently used entries, so one tenant's long prompts
cannot push the others' out.

Type-along reuse (issue 22): the cache also keeps greedy completions of
requests whose output is the full model's (the ``full`` gate, or lossless decoding). When the user
types the first tokens of a suggestion, the next prompt is the previous one followed by those
tokens, and a cold request would answer with the rest of the suggestion: greedy decoding of the
full model is a function of the token sequence. :meth:`PrefixCache.continuation` finds it (same
partition, same ``settings``) and the generator serves it without decoding, then decodes on from
the cached K/V if the request needs more. Stored completions are entries like the K/V ones: they
count against the same budgets and entry caps and are evicted least recently used first.

The index is a hash chain over token blocks (as vLLM's prefix caching): an entry is indexed
under the chained digest of its first token and of every whole ``block_tokens`` block, so a
lookup costs one digest per block of the prompt plus an exact comparison with the few entries
at its deepest matching block, however many entries are stored. The match is exact to the
token (the comparison runs past the block boundary); it can only fall short, by less than a
block, when another entry of the same bucket would have matched longer.

:class:`greencode.generate.GatedGenerator` drives it through a :class:`ScopedPrefixCache` (one
partition's view): its prompt pass calls :meth:`~ScopedPrefixCache.reuse` and runs only the
positions that were not loaded, then stores the prompts; the end of a stream stores each row's
prompt and full-depth completion (:meth:`~ScopedPrefixCache.remember`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

BLOCK_TOKENS = 16  # tokens per hash-chain block of the index
CANDIDATES = 8  # entries compared exactly at the deepest matching block (the most recently stored)


@dataclass(frozen=True)
class Partition:
    """Whose entries a lookup may match: a tenant (named by its API key) and an optional client ``cache_salt``."""

    tenant: str = "anonymous"
    salt: str | None = None

    @property
    def digest(self) -> bytes:
        """Seed of every index key of the partition (distinct for every (tenant, salt), including no salt)."""
        return hashlib.blake2b(json.dumps([self.tenant, self.salt]).encode(), digest_size=16).digest()


SHARED = Partition()  # the partition of callers that name none (one user, benchmarks)


@dataclass(frozen=True)
class PrefixCacheStats:
    lookups: int  # prompts looked up
    hits: int  # prompts that reused at least one token
    prompt_tokens: int  # tokens of the prompts looked up
    reused_tokens: int  # of those, tokens whose K/V came from the cache
    entries: int
    bytes_held: int
    budget_bytes: int
    evictions: int  # entries dropped to stay within a budget or entry cap
    rejected: int  # sequences not stored because they alone exceed their tenant's budget
    continuations: int = 0  # of the entries, stored greedy completions (type-along reuse)
    served_tokens: int = 0  # completion tokens answered from stored completions

    @property
    def hit_rate(self) -> float:
        """Share of prompt tokens served from the cache (vLLM's prefix-cache hit rate is also per token)."""
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True)
class _Entry:
    tokens: np.ndarray  # [n] int64, read-only
    kv: torch.Tensor  # [layers, 2, kv_heads, n, head_dim]: keys and values of every layer
    partition: Partition
    keys: tuple[bytes, ...]  # index keys: the chained digest at each of its block boundaries

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True)
class _Stored:
    """A stored greedy completion: ``tokens`` is what ``prompt`` decodes to under ``settings``."""

    prompt: np.ndarray  # [n] int64, read-only
    tokens: np.ndarray  # [m] int64, read-only
    partition: Partition
    key: bytes  # digest of (partition, settings, prompt): its index key

    @property
    def nbytes(self) -> int:
        return self.prompt.nbytes + self.tokens.nbytes


@dataclass
class _Tenant:
    lru: OrderedDict[int, None] = field(default_factory=OrderedDict)  # its entries, oldest use first
    bytes: int = 0


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def _boundaries(n: int, block: int) -> list[int]:
    """Lengths an n-token sequence is indexed at: its first token, then every whole block."""
    if n == 0:
        return []
    return [1, *range(block, n + 1, block)] if block > 1 else list(range(1, n + 1))


class PrefixCache:
    """Token sequences with their full-depth K/V per :class:`Partition`, LRU by bytes per tenant, thread-safe.

    ``budget_bytes`` and ``max_entries`` bound the whole cache; ``tenant_budget_bytes`` and
    ``tenant_max_entries`` (default: the whole) bound each tenant, and a tenant over its own bound
    evicts only its own entries. Sized so the tenants' bounds add up to at most the whole (the
    server divides by its number of keys), no tenant ever evicts another's entries.

    Bound to one model (``model_fingerprint``): K/V of other weights would silently give wrong
    tokens, so :meth:`check_model` refuses a model it was not made for.
    """

    def __init__(self, budget_bytes: int, model_fingerprint: str, *, max_entries: int = 4096,
                 tenant_budget_bytes: int | None = None, tenant_max_entries: int | None = None,
                 block_tokens: int = BLOCK_TOKENS) -> None:
        if budget_bytes < 0:
            raise ValueError(f"prefix cache budget_bytes must be >= 0, got {budget_bytes}")
        if max_entries < 1 or block_tokens < 1:
            raise ValueError(f"max_entries and block_tokens must be >= 1, got {max_entries} and {block_tokens}")
        self.budget_bytes = int(budget_bytes)
        self.max_entries = int(max_entries)
        self.tenant_budget_bytes = min(self.budget_bytes, int(tenant_budget_bytes if tenant_budget_bytes is not None
                                                              else budget_bytes))
        self.tenant_max_entries = min(self.max_entries, int(tenant_max_entries or max_entries))
        self.block_tokens = int(block_tokens)
        self.model_fingerprint = model_fingerprint
        self._entries: dict[int, _Entry] = {}
        self._stored: dict[int, _Stored] = {}  # greedy completions, in the same id space, LRU and budgets
        self._stored_index: dict[bytes, int] = {}  # _Stored.key -> id
        self._longest_stored = 0  # tokens of the longest completion ever stored (bounds a lookup)
        self._lru: OrderedDict[int, None] = OrderedDict()  # every entry, oldest use first
        self._tenants: dict[str, _Tenant] = {}
        self._index: dict[bytes, dict[int, None]] = {}  # chained digest -> entries indexed under it
        self._ends: dict[bytes, dict[int, None]] = {}  # digest at an entry's deepest boundary -> entries
        self._next_key = 0
        self._bytes = 0
        self._lock = threading.Lock()
        self._lookups = self._hits = self._prompt_tokens = self._reused_tokens = 0
        self._evictions = self._rejected = self._served = 0

    def scoped(self, partition: Partition) -> ScopedPrefixCache:
        """This cache as one partition sees it (what a generator is given)."""
        return ScopedPrefixCache(self, partition)

    # ------------------------------------------------------------------ keys

    def _chain(self, tokens: np.ndarray, partition: Partition) -> tuple[list[int], list[bytes]]:
        """(boundaries, chained digests at them), seeded by the partition."""
        bounds = _boundaries(len(tokens), self.block_tokens)
        digest, start, keys = partition.digest, 0, []
        for end in bounds:
            digest = hashlib.blake2b(digest + tokens[start:end].tobytes(), digest_size=16).digest()
            keys.append(digest)
            start = end
        return bounds, keys

    def _best(self, query: np.ndarray, partition: Partition, keys: list[bytes]) -> tuple[int | None, int]:
        """(entry id, common length) of the best match among the entries at the deepest indexed boundary."""
        found = None
        for key in keys:  # an entry is indexed at all its boundaries: the first miss ends the chain
            if key not in self._index:
                break
            found = key
        if found is None:
            return None, 0
        best_id, best_len = None, 0
        for i, entry_id in enumerate(reversed(self._index[found])):
            if i == CANDIDATES:
                break
            entry = self._entries[entry_id]
            if entry.partition != partition:  # a digest collision: never another partition's entry
                continue
            n = _common_prefix(entry.tokens, query)
            if n > best_len:
                best_id, best_len = entry_id, n
        return best_id, best_len

    # ------------------------------------------------------------------ lookup

    def longest_prefix(self, tokens: Sequence[int], partition: Partition = SHARED) -> tuple[int, torch.Tensor | None]:
        """(length, K/V) of a stored sequence of ``partition`` sharing the longest leading run with ``tokens``.

        The K/V tensor ``[layers, 2, kv_heads, n, head_dim]`` is shared and must only be read
        (its first ``length`` positions are the match). The entry becomes the most recently used.
        """
        query = np.asarray(tokens, dtype=np.int64)
        _, keys = self._chain(query, partition)
        with self._lock:
            best, length = self._best(query, partition, keys)
            if best is None:
                return 0, None
            self._touch(best)
            return length, self._entries[best].kv

    def covers(self, tokens: Sequence[int], partition: Partition = SHARED) -> bool:
        """Whether a stored sequence of ``partition`` starts with all of ``tokens`` (storing them adds nothing)."""
        return self.longest_prefix(tokens, partition)[0] == len(tokens)

    def record(self, prompt_tokens: int, reused_tokens: int) -> None:
        """Count one looked-up prompt and how many of its tokens were actually reused."""
        with self._lock:
            self._lookups += 1
            self._hits += reused_tokens > 0
            self._prompt_tokens += prompt_tokens
            self._reused_tokens += reused_tokens

    # ------------------------------------------------------------------ insert / evict

    def insert(self, tokens: Sequence[int], kv: torch.Tensor, partition: Partition = SHARED) -> bool:
        """Store ``tokens`` with their K/V ``[layers, 2, kv_heads, n, head_dim]`` in ``partition``; True if stored.

        Takes ownership of ``kv``: pass a tensor nothing else will write to (:meth:`remember`
        builds one). A sequence already covered by a stored one is not stored again; stored
        sequences of the partition that are prefixes of the new one are dropped (it answers every
        lookup they would); the tenant's, then the cache's, least recently used entries are
        evicted until the new one fits both budgets and entry caps.
        """
        if not len(tokens) or kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[3] != len(tokens):
            raise ValueError(f"kv must be [layers, 2, kv_heads, {len(tokens)}, head_dim], got {list(kv.shape)}")
        array = np.asarray(tokens, dtype=np.int64).copy()
        array.setflags(write=False)
        bounds, keys = self._chain(array, partition)
        entry = _Entry(array, kv, partition, tuple(keys))
        with self._lock:
            if entry.nbytes > self.tenant_budget_bytes:
                self._rejected += 1
                return False
            covering, n = self._best(array, partition, keys)
            if covering is not None and n == len(array):  # keep the stored one, fresher
                self._touch(covering)
                return False
            for key in keys:  # stored prefixes of the new sequence end at one of its boundaries
                for old_id in list(self._ends.get(key, ())):
                    old = self._entries[old_id]
                    if old.partition == partition and len(old.tokens) <= len(array) \
                            and _common_prefix(old.tokens, array) == len(old.tokens):
                        self._drop(old_id)
            entry_id = self._admit(partition, entry.nbytes)
            self._entries[entry_id] = entry
            for key in keys:
                self._index.setdefault(key, {})[entry_id] = None
            self._ends.setdefault(keys[-1], {})[entry_id] = None
            return True

    def _admit(self, partition: Partition, nbytes: int) -> int:
        """A new entry id of ``partition`` holding ``nbytes``, after evicting (the tenant's, then anyone's)
        least recently used entries of either kind until it fits the budgets and entry caps."""
        tenant = self._tenants.setdefault(partition.tenant, _Tenant())
        while tenant.lru and (tenant.bytes + nbytes > self.tenant_budget_bytes
                              or len(tenant.lru) >= self.tenant_max_entries):
            self._drop(next(iter(tenant.lru)))
            self._evictions += 1
        while self._lru and (self._bytes + nbytes > self.budget_bytes or len(self._lru) >= self.max_entries):
            self._drop(next(iter(self._lru)))
            self._evictions += 1
        tenant = self._tenants.setdefault(partition.tenant, tenant)  # dropping its last entry removed it
        entry_id, self._next_key = self._next_key, self._next_key + 1
        self._lru[entry_id] = None
        tenant.lru[entry_id] = None
        tenant.bytes += nbytes
        self._bytes += nbytes
        return entry_id

    # ------------------------------------------------------------------ stored completions (type-along)

    @staticmethod
    def _stored_seed(partition: Partition, settings: str) -> Any:
        return hashlib.blake2b(partition.digest + hashlib.blake2b(settings.encode(), digest_size=16).digest(),
                               digest_size=16)

    def _find_stored(self, query: np.ndarray, partition: Partition, settings: str) -> tuple[int | None, int]:
        """(id, typed) of the stored completion of ``partition``/``settings`` whose prompt followed by its first
        ``typed`` >= 1 tokens is ``query`` and which has the most tokens left after them; (None, 0) if none."""
        n = len(query)
        deepest = min(n - 1, self._longest_stored)
        if deepest < 1:
            return None, 0
        hasher = self._stored_seed(partition, settings)
        hasher.update(query[: n - deepest].tobytes())
        best, best_typed, best_left = None, 0, 0
        for cut in range(n - deepest, n):  # the stored prompt is query[:cut]
            entry_id = self._stored_index.get(hasher.copy().digest())
            hasher.update(query[cut : cut + 1].tobytes())
            if entry_id is None:
                continue
            entry, typed = self._stored[entry_id], n - cut
            if (entry.partition == partition and len(entry.tokens) - typed > best_left
                    and np.array_equal(entry.prompt, query[:cut])
                    and np.array_equal(entry.tokens[:typed], query[cut:])):
                best, best_typed, best_left = entry_id, typed, len(entry.tokens) - typed
        return best, best_typed

    def continuation(self, tokens: Sequence[int], settings: str, partition: Partition = SHARED) -> list[int] | None:
        """The rest of a stored greedy completion that ``tokens`` typed along (the tokens after the typed ones),
        or None.

        ``tokens`` must be a stored prompt of ``partition`` (stored with the same ``settings``)
        followed by at least one and fewer than all tokens of its completion. The entry becomes the
        most recently used.
        """
        query = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            entry_id, typed = self._find_stored(query, partition, settings)
            if entry_id is None:
                return None
            self._touch(entry_id)
            return self._stored[entry_id].tokens[typed:].tolist()

    def record_served(self, tokens: int) -> None:
        """Count completion tokens answered from a stored completion."""
        with self._lock:
            self._served += tokens

    def store_completion(self, prompt: Sequence[int], completion: Sequence[int], settings: str,
                         partition: Partition = SHARED) -> bool:
        """Store the greedy ``completion`` of ``prompt`` (decoded under ``settings``) in ``partition``; True if stored.

        Only completions that are the full model's greedy output belong here (the caller decides:
        see :meth:`greencode.generate.GatedGenerator.continuation_settings`). Nothing is stored when
        a stored completion already answers the same and more (the request typed along it); a
        stored completion of the same prompt is replaced. Evicts like :meth:`insert`.
        """
        if not len(prompt) or not len(completion):
            return False
        prompt_array = np.asarray(prompt, dtype=np.int64).copy()
        tokens_array = np.asarray(completion, dtype=np.int64).copy()
        prompt_array.setflags(write=False)
        tokens_array.setflags(write=False)
        hasher = self._stored_seed(partition, settings)
        hasher.update(prompt_array.tobytes())
        entry = _Stored(prompt_array, tokens_array, partition, hasher.digest())
        with self._lock:
            if entry.nbytes > self.tenant_budget_bytes:
                self._rejected += 1
                return False
            earlier, typed = self._find_stored(prompt_array, partition, settings)
            if earlier is not None:
                rest = self._stored[earlier].tokens[typed:]
                if len(rest) >= len(tokens_array) and np.array_equal(rest[: len(tokens_array)], tokens_array):
                    self._touch(earlier)
                    return False
            same = self._stored_index.get(entry.key)
            if same is not None:
                self._drop(same)
            entry_id = self._admit(partition, entry.nbytes)
            self._stored[entry_id] = entry
            self._stored_index[entry.key] = entry_id
            self._longest_stored = max(self._longest_stored, len(tokens_array))
            return True

    def _touch(self, entry_id: int) -> None:
        self._lru.move_to_end(entry_id)
        entry = self._entries.get(entry_id) or self._stored[entry_id]
        self._tenants[entry.partition.tenant].lru.move_to_end(entry_id)

    def _drop(self, entry_id: int) -> None:
        entry: _Entry | _Stored = self._entries.pop(entry_id, None) or self._stored.pop(entry_id)
        del self._lru[entry_id]
        tenant = self._tenants[entry.partition.tenant]
        del tenant.lru[entry_id]
        tenant.bytes -= entry.nbytes
        if not tenant.lru:
            del self._tenants[entry.partition.tenant]
        self._bytes -= entry.nbytes
        if isinstance(entry, _Stored):
            del self._stored_index[entry.key]
            return
        for key in entry.keys:
            bucket = self._index[key]
            del bucket[entry_id]
            if not bucket:
                del self._index[key]
        ends = self._ends[entry.keys[-1]]
        del ends[entry_id]
        if not ends:
            del self._ends[entry.keys[-1]]

    def clear(self) -> None:
        with self._lock:
            for entry_id in list(self._lru):
                self._drop(entry_id)

    def stats(self) -> PrefixCacheStats:
        """Aggregates over every partition (what /metrics shows: nothing per tenant)."""
        with self._lock:
            return PrefixCacheStats(self._lookups, self._hits, self._prompt_tokens, self._reused_tokens,
                                    len(self._lru), self._bytes, self.budget_bytes, self._evictions,
                                    self._rejected, len(self._stored), self._served)

    def tenant_bytes(self, tenant: str) -> int:
        with self._lock:
            return self._tenants[tenant].bytes if tenant in self._tenants else 0

    # ------------------------------------------------------------------ what a request reads and writes

    def check_model(self, model_fingerprint: str, model_config: Any) -> None:
        """Refuse a model this cache cannot serve exactly: other weights, or sliding-window layers."""
        from transformers import DynamicCache

        if model_fingerprint != self.model_fingerprint:
            raise ValueError(f"this prefix cache holds K/V of model {self.model_fingerprint}, not of the running model "
                             f"{model_fingerprint}: make a new PrefixCache for it")
        _layers(DynamicCache(config=model_config))

    def reuse(self, cache: Any, encoded: Sequence[Sequence[int]],
              partition: Partition = SHARED) -> tuple[int, list[int]]:
        """Load the longest stored prefix (of ``partition``) of every row into the empty request ``cache``.

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
        matches = [self.longest_prefix(p, partition) for p in encoded]
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

    def remember(self, cache: Any, attention_mask: torch.Tensor, rows: Sequence[Sequence[int] | None],
                 partition: Partition = SHARED) -> int:
        """Store each row's full-depth tokens with their K/V from a left-padded batch ``cache`` in ``partition``.

        ``rows[r]`` are the tokens of row ``r`` whose K/V are full-depth, starting at the row's
        first unpadded column (the prompt, possibly followed by :func:`full_depth_tokens` of its
        completion); ``None`` skips the row. Returns how many rows were stored.
        """
        layers = _layers(cache)
        width = layers[0].keys.shape[2]
        starts = attention_mask.long().argmax(dim=1).tolist()  # first 1 of each (left-padded) row
        stored = 0
        for r, tokens in enumerate(rows):
            if not tokens or self.covers(tokens, partition):
                continue
            start, n = starts[r], len(tokens)
            if start + n > width:
                raise ValueError(f"row {r}: {n} tokens from column {start} exceed the cache's {width} positions")
            kv = torch.stack([torch.stack((layer.keys[r, :, start:start + n], layer.values[r, :, start:start + n]))
                              for layer in layers])  # a fresh tensor: never a view of the request's cache
            stored += self.insert(tokens, kv, partition)
        return stored


@dataclass(frozen=True)
class ScopedPrefixCache:
    """One partition's view of a :class:`PrefixCache`: what a generator reads and writes for its requests."""

    store: PrefixCache
    partition: Partition

    def check_model(self, model_fingerprint: str, model_config: Any) -> None:
        self.store.check_model(model_fingerprint, model_config)

    def longest_prefix(self, tokens: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        return self.store.longest_prefix(tokens, self.partition)

    def covers(self, tokens: Sequence[int]) -> bool:
        return self.store.covers(tokens, self.partition)

    def insert(self, tokens: Sequence[int], kv: torch.Tensor) -> bool:
        return self.store.insert(tokens, kv, self.partition)

    def reuse(self, cache: Any, encoded: Sequence[Sequence[int]]) -> tuple[int, list[int]]:
        return self.store.reuse(cache, encoded, self.partition)

    def remember(self, cache: Any, attention_mask: torch.Tensor, rows: Sequence[Sequence[int] | None]) -> int:
        return self.store.remember(cache, attention_mask, rows, self.partition)

    def continuation(self, tokens: Sequence[int], settings: str) -> list[int] | None:
        return self.store.continuation(tokens, settings, self.partition)

    def record_served(self, tokens: int) -> None:
        self.store.record_served(tokens)

    def store_completion(self, prompt: Sequence[int], completion: Sequence[int], settings: str) -> bool:
        return self.store.store_completion(prompt, completion, settings, self.partition)

    def stats(self) -> PrefixCacheStats:
        return self.store.stats()


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
