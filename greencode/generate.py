"""Gated generation: every new token runs layers until its gate exits (METHOD §5).

The prompt (prefill) runs all layers and yields the first token with the full
model. Each later token runs layer by layer; at each of the gate's decision layers
the gate sees the token's hidden state and may stop it; the exited state goes
through the final norm + LM head. With ``kv_mode='propagate'`` the layers a token
skipped still receive its keys/values, projected from the exited hidden state by
each layer's own input norm and K/V projections (+ rotary), so later tokens that
go deeper attend to a complete cache. ``kv_mode='none'`` re-runs the whole
sequence each step (what the published numbers used).

In a batch every row exits on its own, and only the rows still running enter a layer
(row compaction, issue 21): a row that left keeps its exit state and each later layer
only writes its propagated K/V beside the running rows' own (:class:`_RowsCache`), so a
layer costs what its running rows cost. Rows also fail on their own: a row whose logits are not
finite (a fault of the model, e.g. NaN weights it reached) ends with ``finish_reason
'error'`` while the rest of its batch goes on (greencode/sampling.py picks the tokens and
cannot itself produce NaN). A row's text is released by greencode/detokenize.py: the
streamed pieces join to exactly the whole-sequence text, for any Unicode and stop sequence.

With a :class:`~greencode.prefix_cache.PrefixCache` the prompt pass reuses the keys/values
of the longest prefix an earlier request stored and runs only the rest; the end of a stream
stores each prompt with the full-depth part of its completion (issue 12: an IDE's next
keystroke sends nearly the same prompt). A greedy request whose output is the full model's also
stores its completion; a later prompt that typed the first tokens of it is answered with the rest
without decoding (type-along reuse, issue 22: :meth:`GatedGenerator.continuation_settings`).

The contract other decoders build on (see :meth:`GatedGenerator.stream`):
:meth:`~GatedGenerator.prefill` is the prompt pass, :meth:`~GatedGenerator.step` one
forward of new tokens with per-row exits, and ``stream`` yields the tokens of every
step and, last, :class:`Finished` with the results.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Self

import torch

from greencode.config import GenerationConfig
from greencode.detokenize import Detokenizer
from greencode.energy import EnergyMeter
from greencode.fim import detect_fim
from greencode.gates import FullGate, Gate
from greencode.modeling import DecoderAdapter, EarlyExitModel
from greencode.prefix_cache import PrefixCache, ScopedPrefixCache, full_depth_tokens
from greencode.sampling import effective_temperature, pick_tokens
from greencode.tokens import encode

BROKEN_LOGITS = "the model produced non-finite logits (NaN or inf) for this sequence"


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    layers_per_token: list[int]
    finish_reason: str  # length | eos_token | stop_sequence | error
    prompt_tokens: int
    num_layers: int
    time_s: float = 0.0
    gate_time_s: float = 0.0
    energy_j: float | None = None
    exit_states: torch.Tensor | None = None  # [T, n_exits, H] when asked for (shard extraction)
    error: str | None = None  # why the sequence failed (finish_reason 'error'); its text is what came before
    cached_prompt_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    cached_completion_tokens: int = 0  # leading completion tokens served from a stored completion (type-along)

    @property
    def mean_layers(self) -> float:
        return sum(self.layers_per_token) / len(self.layers_per_token) if self.layers_per_token else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("exit_states")
        d["mean_layers"] = self.mean_layers
        d["generated_tokens"] = len(self.token_ids)
        return d


@dataclass
class TokenEvent:
    """One generated token of one row, for streaming; or, with ``error`` set, the end of a row that failed."""

    row: int
    token_id: int | None  # None on a failure event (no token was chosen)
    text: str  # text this token makes final ('' while a character or a possible stop sequence is unfinished)
    layers: int
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class _Row:
    prompt_len: int
    detok: Detokenizer | None  # None without a tokenizer (token ids only)
    ids: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    exit_states: list[torch.Tensor] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.detok.text if self.detok is not None else ""


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, V] at the last position
    exit_layers: torch.Tensor  # [B] 1-based layer each row left at
    gate_time_s: float
    exit_states: torch.Tensor | None = None  # [B, n_exits, H] at the last position, if collected


@dataclass
class Prefill:
    """The prompt pass of a batch: what decoding continues from."""

    input_ids: torch.Tensor  # [B, W] prompts, left-padded to the longest
    attention_mask: torch.Tensor  # [B, W] 0 on padding
    cache: Any  # transformers DynamicCache holding every layer's K/V of the prompts; None without a cache
    output: StepOutput  # the last position through all layers (FullGate): the first token's logits
    cached_tokens: list[int] | None = None  # per row: prompt tokens whose K/V came from a prefix cache


@dataclass
class Finished:
    """The last item of :meth:`GatedGenerator.stream`: one result per prompt, in prompt order."""

    results: list[GenerationResult]


class _RowsCache:
    """One layer's view of a shared DynamicCache for the rows still running (row compaction).

    The layer runs on ``rows`` only; when its attention hands over their new keys/values, the
    rows that left (``others``) get theirs from :meth:`_Split.project_left`, the whole batch's
    entry goes into the shared cache in its usual layout, and the attention reads back its own
    rows' keys/values: the same cache, the same numbers, as if every row had run the layer.
    """

    def __init__(self, cache: Any, rows: torch.Tensor, others: torch.Tensor, bsz: int) -> None:
        self.cache, self.rows, self.others, self.bsz = cache, rows, others, bsz
        self.left: tuple[torch.Tensor, torch.Tensor] | None = None  # the leavers' K/V at the layer about to run

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        left_k, left_v = self.left
        whole_k = keys.new_empty((self.bsz, *keys.shape[1:])).index_copy_(0, self.rows, keys)
        whole_v = values.new_empty((self.bsz, *values.shape[1:])).index_copy_(0, self.rows, values)
        whole_k.index_copy_(0, self.others, left_k)
        whole_v.index_copy_(0, self.others, left_v)
        k, v = self.cache.update(whole_k, whole_v, layer_idx, cache_kwargs)
        return k.index_select(0, self.rows), v.index_select(0, self.rows)


class _Split:
    """A step's batch once some rows have left: the running rows' layer arguments, the leavers' states."""

    def __init__(self, rows: torch.Tensor, h: torch.Tensor, adapter: DecoderAdapter, kwargs: dict[str, Any],
                 cache: Any) -> None:
        bsz = h.shape[0]
        keep = torch.ones(bsz, dtype=torch.bool, device=h.device)
        keep[rows] = False
        others = keep.nonzero().squeeze(1)
        self.rows = rows
        self.view = _RowsCache(cache, rows, others, bsz) if cache is not None else None
        self.running_kwargs = adapter.kwargs_for_rows(kwargs, rows, self.view)
        self.left_kwargs = adapter.kwargs_for_rows(kwargs, others, None)
        self.left_states = h.index_select(0, others)

    def project_left(self, adapter: DecoderAdapter, index: int) -> None:
        """The leavers' K/V at layer ``index``, projected from their exit states, ready for the running rows'
        attention to write with its own."""
        if self.view is not None:
            self.view.left = adapter.kv_projection(index, self.left_states, self.left_kwargs)


class GatedGenerator:
    """Runs gated generation on an :class:`EarlyExitModel`, optionally over a shared prefix cache.

    ``prefix_cache`` (checked against the model here) may be shared by generators on several
    threads: entries are immutable and every request copies what it reuses into its own cache.
    """

    def __init__(self, lm: EarlyExitModel, meter: EnergyMeter | None = None,
                 prefix_cache: PrefixCache | ScopedPrefixCache | None = None) -> None:
        self.lm = lm
        self.meter = meter or EnergyMeter(lm.device)
        cfg = lm.model.generation_config
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if lm.tokenizer is not None and lm.tokenizer.eos_token_id is not None:
            eos_ids.add(lm.tokenizer.eos_token_id)
        fim = detect_fim(lm.tokenizer)
        if fim is not None and fim.end_id is not None:  # Code Llama ends a fill with <EOT>, not EOS
            eos_ids.add(fim.end_id)
        self.eos_ids = eos_ids
        if prefix_cache is not None:
            prefix_cache.check_model(lm.fingerprint, lm.model.config)
        self.prefix_cache = prefix_cache

    def scoped(self, prefix_cache: PrefixCache | ScopedPrefixCache | None) -> Self:
        """This generator (same model, meter, everything) over another prefix cache: one tenant's partition."""
        other = copy.copy(self)
        other.prefix_cache = prefix_cache
        return other

    # ------------------------------------------------------------------ type-along reuse

    def continuation_settings(self, gate: Gate, cfg: GenerationConfig, collect_exit_states: bool = False) -> str | None:
        """The settings key under which a request's greedy completion is stored and looked up; None: neither.

        Only a completion a cold request would repeat token for token qualifies: greedy, through the
        KV cache, and the full model's own output. The ``full`` gate's is; a gated (exiting) one is
        not, since exited tokens' propagated K/V change what later tokens see (lossless decoding,
        :class:`~greencode.speculative.LosslessGenerator`, qualifies under its own key). Sampling never
        does. Exit-state collection needs every token decoded, so it opts out.
        """
        if (self.prefix_cache is None or cfg.kv_mode != "propagate" or collect_exit_states
                or effective_temperature(cfg.temperature) > 0):
            return None
        return self._full_model_output(gate, cfg)

    def _full_model_output(self, gate: Gate, cfg: GenerationConfig) -> str | None:
        """The key of a greedy request whose output this generator makes the full model's, or None."""
        if cfg.lossless or gate.decision_layers(self.lm.exit_points, self.lm.num_layers):
            return None
        return "full-greedy"

    def serve_stored(self, encoded: list[list[int]], rows: list[_Row], settings: str | None,
                     cfg: GenerationConfig) -> tuple[list[int], list[TokenEvent]]:
        """Answer each row from a stored completion its prompt typed along, as far as it goes.

        Returns ``(served, events)``: ``served[r]`` tokens of row ``r`` came from the cache (recorded
        in the row as a token its own decoding produced, with 0 layers: none ran for it), and their
        events. A row's stop sequences, EOS and ``max_new_tokens`` apply as to decoded tokens, so a
        row may finish here; the others decode on from ``prompt + served tokens``.
        """
        served = [0] * len(rows)
        events: list[TokenEvent] = []
        if settings is None:
            return served, events
        for r, (prompt, row) in enumerate(zip(encoded, rows)):
            found = self.prefix_cache.continuation(prompt, settings)
            if found is None:
                continue
            for token in found:
                events.append(self._record(row, r, token, 0, cfg))
                served[r] += 1
                if row.finish_reason is not None:
                    break
            self.prefix_cache.record_served(served[r])
        return served, events

    def store_completions(self, encoded: list[list[int]], rows: list[_Row], settings: str | None) -> None:
        """Store every row's finished greedy completion for later type-along requests (not a failed one's)."""
        if settings is None:
            return
        for prompt, row in zip(encoded, rows):
            if row.ids and row.finish_reason not in (None, "error"):
                self.prefix_cache.store_completion(prompt, row.ids, settings)

    # ------------------------------------------------------------------ one forward step

    @torch.no_grad()
    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any,
        gate: Gate,
        active: torch.Tensor | None = None,
        collect_exit_states: bool = False,
    ) -> StepOutput:
        """Run ``input_ids`` ([B, S]) through the layers, exiting rows as ``gate`` decides.

        ``attention_mask`` covers cache + new tokens. ``active`` marks rows that still
        need a token (others exit at once and only feed the cache). ``collect_exit_states``
        keeps the last position's hidden state at every exit point (meaningful for rows
        that have not exited there yet, i.e. all rows under the full gate).

        Row compaction (issue 21): only the rows still running enter a layer's attention and
        MLP; the rows that left get just their K/V there, projected from their exit state
        (:class:`_RowsCache` joins both into the shared cache), so a layer costs what its
        running rows cost.
        """
        lm, adapter = self.lm, self.lm.adapter
        num_layers = lm.num_layers
        bsz, seq = input_ids.shape
        pos = lm.positions(attention_mask)[:, -seq:]
        h = adapter.embed(input_ids, pos)
        padded = bool((attention_mask == 0).any())
        mask = lm.causal_mask(h, attention_mask if padded else None, cache, pos)
        kwargs = adapter.layer_kwargs(h, pos, mask, cache)

        exit_layers = torch.full((bsz,), num_layers, dtype=torch.long, device=h.device)
        logits: torch.Tensor | None = None
        have_logits = torch.zeros(bsz, dtype=torch.bool, device=h.device)
        decisions = set(gate.decision_layers(lm.exit_points, num_layers))
        collect = set(lm.exit_points) if collect_exit_states else set()
        states: list[torch.Tensor] = []
        gate_time = 0.0
        # h keeps every row's state (a row that left: its exit state); `running` holds the rows still
        # going, in the order of `rows` (None: all rows, then running is h itself)
        rows = None if active is None or bool(active.all()) else active.nonzero().squeeze(1)
        running = h if rows is None else h[rows]
        split = None if rows is None else _Split(rows, h, adapter, kwargs, cache)

        for i in range(num_layers):
            if running.shape[0] == 0:
                if cache is not None:  # propagate K/V of the skipped layers from the exited states
                    for j in range(i, num_layers):
                        k, v = adapter.kv_projection(j, h, kwargs)
                        cache.update(k, v, j)
                break
            if split is None:
                running = adapter.run_layer(i, running, kwargs)
            else:
                split.project_left(adapter, i)
                running = adapter.run_layer(i, running, split.running_kwargs)
            layer = i + 1
            if layer in collect:
                states.append((running if split is None else h.index_copy(0, split.rows, running))[:, -1])
            if layer in decisions:
                t0 = time.perf_counter()
                leave, gate_logits = gate.exit_mask(running[:, -1], layer, lm)
                stay_count = int((~leave).sum())  # the one host sync of a decision: the next layer's batch size
                if stay_count < running.shape[0]:
                    order = torch.argsort(leave.to(torch.uint8), stable=True)  # staying rows first, in row order
                    stay, gone = order[:stay_count], order[stay_count:]
                    ids = torch.arange(bsz, device=h.device) if split is None else split.rows
                    left = ids[gone]
                    exit_layers[left] = layer
                    h = h.index_copy(0, left, running[gone])
                    if gate_logits is not None:
                        if logits is None:
                            logits = gate_logits.new_empty(bsz, gate_logits.shape[-1])
                        logits[left] = gate_logits[gone]
                        have_logits[left] = True
                    running = running[stay]
                    split = _Split(ids[stay], h, adapter, kwargs, cache) if stay_count else None
                gate_time += time.perf_counter() - t0
        else:  # the rows that ran every layer
            h = running if split is None else h.index_copy(0, split.rows, running)

        need = ~have_logits
        if bool(need.any()):  # one LM-head call for every row without logits, whatever layer it left at
            picked = need.nonzero().squeeze(1)
            needing = exit_layers[picked]
            normed = h.new_empty((picked.numel(), h.shape[-1]))
            for layer in needing.unique().tolist():  # the final norm + each exit's translator, per exit layer
                at = (needing == layer).nonzero().squeeze(1)
                normed[at] = lm.exit_normed(h[picked[at], -1], layer)
            fresh = adapter.lm_head(normed)
            if logits is None:
                logits = fresh.new_empty(bsz, fresh.shape[-1])
            logits[picked] = fresh
        exit_states = torch.stack(states, dim=1) if len(states) == len(collect) and collect else None
        return StepOutput(logits.float(), exit_layers, gate_time, exit_states)

    # ------------------------------------------------------------------ generation loop

    def encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        """Token ids of every prompt (text goes through :func:`greencode.tokens.encode`: no BOS/EOS added)."""
        if prompts and isinstance(prompts[0], str):
            return [encode(self.lm.tokenizer, p) for p in prompts]
        return [list(p) for p in prompts]

    def _record(self, row: _Row, index: int, token: int, layers: int, cfg: GenerationConfig) -> TokenEvent:
        row.ids.append(token)
        row.layers.append(layers)
        text = row.detok.push(token) if row.detok is not None else ""
        if row.detok is not None and row.detok.stopped:
            row.finish_reason = "stop_sequence"
        elif token in self.eos_ids:
            row.finish_reason = "eos_token"
        elif len(row.ids) >= cfg.max_new_tokens:
            row.finish_reason = "length"
        if row.finish_reason is not None and row.detok is not None:
            text += row.detok.finish()
            if row.detok.stopped:  # text held back (an unfinished character) held the stop: the text ends there
                row.finish_reason = "stop_sequence"
        return TokenEvent(index, token, text, layers, row.finish_reason)

    @staticmethod
    def _fail(row: _Row, index: int, layers: int) -> TokenEvent:
        """End a row whose logits broke; what it held back (an unfinished stop-sequence prefix) is released."""
        row.finish_reason, row.error = "error", f"{BROKEN_LOGITS} at generated token {len(row.ids) + 1}"
        text = row.detok.finish() if row.detok is not None else ""
        return TokenEvent(index, None, text, layers, row.finish_reason, row.error)

    @torch.no_grad()
    def prefill(self, encoded: list[list[int]], collect_exit_states: bool, use_cache: bool = True) -> Prefill:
        """The prompt pass: left-pad ``encoded`` and run it through every layer (METHOD §5: no gate).

        Called once per :meth:`stream`; override it to reuse prompt work (the evaluator replays the
        last batch's pass) as long as the returned :class:`Prefill` equals what this method
        computes. With a prefix cache, the longest stored prefix of each row is loaded and only
        the remaining positions run; the prompts are stored right after the pass, so a request
        its client cancels still warms the cache for the next keystroke. ``use_cache=False``
        (``kv_mode='none'``) returns no cache and leaves the prefix cache alone: every later step
        re-runs the whole sequence.
        """
        from transformers import DynamicCache

        lm = self.lm
        device = lm.device
        bsz, width = len(encoded), max(len(p) for p in encoded)
        pad = lm.tokenizer.pad_token_id if lm.tokenizer is not None and lm.tokenizer.pad_token_id is not None else 0
        ids = torch.full((bsz, width), pad, dtype=torch.long, device=device)
        attn = torch.zeros((bsz, width), dtype=torch.long, device=device)
        for r, p in enumerate(encoded):  # left padding
            ids[r, width - len(p) :] = torch.tensor(p, device=device)
            attn[r, width - len(p) :] = 1
        cache = DynamicCache(config=lm.model.config) if use_cache else None
        store = self.prefix_cache if use_cache else None
        past, reused = store.reuse(cache, encoded) if store is not None else (0, [0] * bsz)
        out = self.step(ids[:, past:], attn, cache, FullGate(), collect_exit_states=collect_exit_states)
        if store is not None:
            store.remember(cache, attn, encoded)
        return Prefill(ids, attn, cache, out, reused)

    @torch.no_grad()
    def stream(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        gate: Gate,
        cfg: GenerationConfig | None = None,
        collect_exit_states: bool = False,
    ) -> Iterator[list[TokenEvent] | Finished]:
        """Generate for a batch of prompts, step by step.

        Yields, per decoding step, the list of :class:`TokenEvent` of the rows still running (a
        row's last event has its ``finish_reason`` set; a row whose logits broke gets a last event
        with ``error`` and no token, and its result says ``finish_reason='error'``), then, as the
        LAST item, one :class:`Finished` holding a :class:`GenerationResult` per prompt. The first token of every
        row comes from :meth:`prefill` (all layers); each later token from :meth:`step` under
        ``gate``. Time and energy cover the whole batch; energy is split evenly over its rows.
        Closing the iterator early stops generation (no ``Finished`` then).

        ``collect_exit_states`` records, for every generated token, the hidden state at each
        exit point of the position that predicted it (what the exit environment observes).
        With a prefix cache, the end stores each prompt with its completion's full-depth tokens
        (:func:`~greencode.prefix_cache.full_depth_tokens`: never K/V propagated from an exit).
        """
        cfg = cfg or GenerationConfig()
        lm = self.lm
        device = lm.device
        encoded = self.encode(prompts)
        if not encoded or any(len(p) == 0 for p in encoded):
            raise ValueError("every prompt needs at least one token")
        bsz = len(encoded)
        tok = lm.tokenizer
        rows = [_Row(len(p), Detokenizer(tok, cfg.stop) if tok is not None else None) for p in encoded]
        rng = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
        use_cache = cfg.kv_mode == "propagate"
        gate_time = 0.0
        settings = self.continuation_settings(gate, cfg, collect_exit_states)

        with self.meter.measure() as measured:
            served, events = self.serve_stored(encoded, rows, settings, cfg)
            if events:
                yield events
            # a row's served tokens join its prompt pass: decoding goes on after them
            extended = [p + row.ids for p, row in zip(encoded, rows)]
            cached = [len(p) if n else 0 for p, n in zip(encoded, served)]  # nothing of a served prompt ran
            if any(row.finish_reason is None for row in rows):
                pre = self.prefill(extended, collect_exit_states, use_cache=use_cache)
                cached = [min(c, len(p)) for c, p in zip(pre.cached_tokens or [0] * bsz, encoded)]
                attn, seq, cache, out = pre.attention_mask, pre.input_ids, pre.cache, pre.output
                while True:
                    picked = pick_tokens(out.logits, cfg.temperature, cfg.top_p, rng)
                    next_ids, failed = picked.tokens, picked.failed.tolist()
                    gate_time += out.gate_time_s
                    events = []
                    for r, row in enumerate(rows):
                        if row.finish_reason is None:
                            if failed[r]:
                                events.append(self._fail(row, r, int(out.exit_layers[r])))
                                continue
                            if out.exit_states is not None:
                                row.exit_states.append(out.exit_states[r])
                            events.append(self._record(row, r, int(next_ids[r]), int(out.exit_layers[r]), cfg))
                    yield events
                    active = torch.tensor([row.finish_reason is None for row in rows], device=device)
                    if not bool(active.any()):
                        break
                    attn = torch.cat([attn, torch.ones((bsz, 1), dtype=attn.dtype, device=device)], dim=1)
                    seq = torch.cat([seq, next_ids[:, None]], dim=1)
                    step_ids = next_ids[:, None] if use_cache else seq
                    out = self.step(step_ids, attn, cache, gate, active, collect_exit_states)
                if cache is not None and self.prefix_cache is not None:
                    self.prefix_cache.remember(cache, attn, [
                        full_depth_tokens(x, row.ids[n:], row.layers[n:], lm.num_layers)
                        for x, row, n in zip(extended, rows, served)])
            self.store_completions(encoded, rows, settings)

        share = measured.energy_j / bsz if measured.energy_j is not None else None
        yield Finished([
            GenerationResult(
                text=row.text,
                token_ids=row.ids,
                layers_per_token=row.layers,
                finish_reason=row.finish_reason or "length",
                prompt_tokens=row.prompt_len,
                num_layers=lm.num_layers,
                time_s=measured.time_s,
                gate_time_s=gate_time,
                energy_j=share,
                exit_states=torch.stack(row.exit_states) if row.exit_states else None,
                error=row.error,
                cached_prompt_tokens=reused,
                cached_completion_tokens=n,
            )
            for row, reused, n in zip(rows, cached, served)
        ])

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        gate: Gate,
        cfg: GenerationConfig | None = None,
        collect_exit_states: bool = False,
    ) -> list[GenerationResult]:
        """Generate for a batch of prompts and return one result per prompt (see :meth:`stream`)."""
        *_, finished = self.stream(prompts, gate, cfg, collect_exit_states)
        return finished.results
