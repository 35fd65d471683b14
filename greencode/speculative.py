"""Lossless mode: self-speculative decoding whose drafts are chosen by the gate (issue 11).

The output is the full model's (greedy: token for token; sampling: in distribution), but most
tokens are drafted by the first layers of the same model and then verified by the rest in one
pass over several tokens, as in LayerSkip, with the draft depth chosen per token by the gate.

A *round* starts from the last emitted token x0 and a cache that holds the full model's K/V for
every earlier position.

- Draft: x0 runs layer by layer; at the gate's decision layers the gate may exit it; the exited
  hidden state goes through the single LM head and gives the draft token, which is fed next,
  and so on while the gate keeps exiting, up to the row's current draft length
  (:func:`draft_length`: the most expected tokens per unit of work, from the row's running
  acceptance rate and draft depth; 0 while its drafts keep failing, until it tries again).
  A token the gate does not exit ends the round: for x0 that is just a full-depth token (its
  cache is exact, so its prediction is the full model's); a later token stops after the gate's
  last decision layer, since its deeper layers are recomputed by the verification anyway.
- Which K/V are exact: with per-token draft depths k_i, token i's state (and K/V) at layer j is
  the full model's only if every earlier token of the round also ran layer j, i.e. for
  j <= m_i = min(k_0..k_i). Skipped layers get K/V lazily, projected from the exited state
  (what ``kv_mode='propagate'`` does in :mod:`greencode.generate`), only when a deeper draft
  token of the same round is about to attend to them.
- Verify: layer by layer from min(m), the tokens with m_i < j (a suffix, m being
  non-increasing) are recomputed at layer j, each entering at layer m_i + 1 from the exact state
  it had at layer m_i in the draft; the cache of layer j is first cut back to the exact prefix.
  A round that ends at the draft length has one draft token the draft loop never ran: it enters
  at the embedding, and its prediction is the bonus token. With a fixed gate this is exactly
  LayerSkip (reuse layers 1..k, recompute k+1..L).
- Accept: greedy keeps the longest prefix of drafts the full model agrees with and then takes
  the full model's token (a correction, or the bonus after the last draft); sampling uses
  speculative sampling (accept with min(1, p/q), else resample from norm(max(0, p - q))), with
  p and q under the same temperature / top-p rule as :func:`greencode.sampling.pick_tokens`. The cache
  is cut back to the accepted tokens.
- Failure: as in the plain generator, a row whose full-model logits are not finite (at its first
  token, a full-depth token or a verified position) ends with ``finish_reason 'error'`` after the
  tokens before that position; a draft from broken logits is just a draft the verification judges.

The shortlist (``speculative.shortlist``): a greedy draft only needs an argmax, so drafts without
gate logits are decoded over a shortlist of the vocabulary (the first token ids, which byte-level
BPE gives to its most frequent merges, plus every token of the prompt); a draft outside the
shortlist is simply rejected. Verification always uses the full LM head, so the output is unchanged.

A batch shares one prompt pass (:meth:`GatedGenerator.prefill`, so a prefix cache or the
evaluator's replay serves lossless requests too); its rows are then decoded one after another
(IDE requests are batch 1), each with its own cache slice and draft length. Every position a row's
cache keeps is the full model's, so with a prefix cache a finished row stores its prompt and its
whole completion. As in the plain generator, time and energy cover the whole batch and energy is
split evenly over its rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from greencode.config import GenerationConfig, SpeculativeConfig
from greencode.detokenize import Detokenizer
from greencode.gates import Gate
from greencode.generate import Finished, GatedGenerator, GenerationResult, Prefill, TokenEvent, _Row
from greencode.sampling import effective_temperature, pick_tokens


def draft_length(acceptance: float, depth: float, num_layers: int, head_cost: float, cfg: SpeculativeConfig,
                 draft_head_cost: float | None = None) -> int:
    """The cap n in [min_draft, max_draft] on a round's drafts with the most expected tokens per unit of work.

    With per-draft acceptance a, a round of n drafts emits 1 + a + ... + a^n tokens on average (the
    accepted drafts and the full model's token after them) for n draft passes of ``depth`` layers +
    a head call (``draft_head_cost``, in layers: less over a shortlist; default ``head_cost``) and one
    verification of about ``num_layers`` + the LM head (``head_cost``); n = 0 is one full-depth token.
    Ties go to the shorter round.
    """
    draft = depth + (head_cost if draft_head_cost is None else draft_head_cost)
    full = num_layers + head_cost
    rates, expected = [1.0 / full], 1.0
    for n in range(1, cfg.max_draft + 1):
        expected += acceptance**n
        rates.append(expected / (n * draft + full))
    return max(range(cfg.min_draft, cfg.max_draft + 1), key=lambda n: (rates[n], -n))


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution :func:`~greencode.sampling.pick_tokens` draws from ([..., V] logits), normalised.

    The same rule step for step (speculative sampling is exact only if p and q are what is sampled):
    the row maximum subtracted, greedy (one-hot) below the greedy temperature, the top token always
    kept by top-p, and a row with non-finite logits treated as all zeros.
    """
    logits = logits.float()
    top = logits.amax(dim=-1, keepdim=True)
    broken = ~torch.isfinite(top)
    if bool(broken.any()):
        logits = torch.where(broken, torch.zeros_like(logits), logits)
        top = torch.where(broken, torch.zeros_like(top), top)
    temperature = effective_temperature(temperature)
    if temperature == 0.0:
        return torch.zeros_like(logits).scatter(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    probs = torch.softmax((logits - top) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        keep[..., 0] = True
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return probs / probs.sum(dim=-1, keepdim=True)


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: int, rng: torch.Generator | None) -> int | None:
    """Speculative sampling of one draft ``token`` drawn from q, against the target p ([V] distributions).

    Returns None when the draft is accepted (probability min(1, p/q)), else a token drawn from
    norm(max(0, p - q)); either way the emitted token is distributed as p.
    """
    u = float(torch.rand((), generator=rng, device=p.device))
    if u * float(q[token]) < float(p[token]):
        return None
    residual = (p - q).clamp_(min=0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: the rejection came from rounding, draw from p
        residual = p
    return int(torch.multinomial(residual, 1, generator=rng))


@dataclass
class Round:
    """What one draft-and-verify round emits."""

    tokens: list[int]
    layers: list[int]  # layers charged to each token
    gate_time_s: float
    failed_layers: int | None = None  # set when the full model's logits broke after ``tokens``: the work left over


@dataclass
class SpeculativeResult(GenerationResult):
    """A GenerationResult whose ``layers_per_token`` count every layer computed (draft + verification).

    Token i is charged the layers run at the position that predicted it, in the draft and in the
    verification; the work of drafts that were rejected (or cut off by a stop) is charged to the
    round's last emitted token. So ``mean_layers`` is the layers computed per emitted token: never
    below ``num_layers`` (self-speculation saves sequential layer passes, not arithmetic), above it
    when drafts are rejected. K/V projections of skipped layers are not counted.
    ``speculative`` holds the round statistics (see :class:`SpeculativeStats`).
    """

    speculative: dict[str, Any] = field(default_factory=dict)


@dataclass
class SpeculativeStats:
    """Counters of one row's rounds; ``as_dict`` is the ``speculative`` field of its result."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    depth_sum: int = 0  # exit layers of the drafts
    passes: int = 0  # sequential layer calls (a verification call over many tokens counts once)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "mean_draft_depth": self.depth_sum / self.drafted if self.drafted else None,
            "layer_passes": self.passes,
            "draft_time_s": self.draft_time_s,
            "verify_time_s": self.verify_time_s,
        }


@dataclass
class _Fed:
    """One token of a round, as the verification needs it."""

    token: int
    exact: int  # m: its state is the full model's up to this layer (0 = not run yet: enters at the embedding)
    state: torch.Tensor  # [1, 1, H] its state at layer `exact`
    ran: int = 0  # layers it ran in the draft
    exit_state: torch.Tensor | None = None  # [1, 1, H] where it left the draft (source of lazily projected K/V)
    draft_probs: torch.Tensor | None = None  # q of the next token (sampling only)


@dataclass
class Shortlist:
    """What greedy drafts are decoded over: the first ``size`` token ids plus the other tokens of the
    prompt and of the completion so far (code repeats its identifiers)."""

    size: int  # ids [0, size) ...
    extra: torch.Tensor  # ... and these ([K] ids >= size)
    extra_weight: torch.Tensor  # [K, H] their LM-head rows

    @property
    def count(self) -> int:
        return self.size + self.extra.numel()

    def add(self, tokens: list[int], weight: torch.Tensor) -> None:
        """Take in the emitted ``tokens`` it lacks (``weight``: the LM head's weight)."""
        known = set(self.extra.tolist())
        new = sorted({t for t in tokens if t >= self.size and t not in known})
        if new:
            ids = torch.tensor(new, dtype=torch.long, device=self.extra.device)
            self.extra = torch.cat([self.extra, ids])
            self.extra_weight = torch.cat([self.extra_weight, weight[ids]])


@dataclass
class RowState:
    """The decoding state of one row: its cache and how much of it is exact."""

    cache: Any  # DynamicCache
    length: int  # positions whose K/V are the full model's, at every layer
    filled: list[int]  # entries per layer (>= length while a round drafts)
    acceptance: float  # running acceptance rate of its drafts
    depth: float | None = None  # running mean depth of its drafts (None before the first)
    shortlist: Shortlist | None = None  # greedy drafts without gate logits are decoded over it


class LosslessGenerator(GatedGenerator):
    """A :class:`GatedGenerator` that also decodes losslessly: ``generation.lossless`` picks the mode.

    Streams whose config has ``lossless`` are self-speculative (drafted by ``gate``, verified by the
    full model); the others are the plain gated generation this class inherits. So one generator
    (and its prefix cache, meter, prompt replay) serves both kinds of request.
    """

    def _full_model_output(self, gate: Gate, cfg: GenerationConfig) -> str | None:
        """Greedy lossless output is the full model's: stored and typed along like the ``full`` gate's, under its
        own key (a lossless request is answered only from lossless completions)."""
        return "lossless-greedy" if cfg.lossless else super()._full_model_output(gate, cfg)

    @cached_property
    def head_cost(self) -> float:
        """The LM head's cost in decoder layers, by weight count: one token's pass reads every weight once."""
        layer_weights = sum(p.numel() for p in self.lm.adapter.layers[0].parameters())
        return self.lm.adapter.lm_head.weight.numel() / layer_weights

    def budget(self, seq: RowState, gate: Gate, remaining: int, spec: SpeculativeConfig) -> int:
        """Drafts the row's next round may make: its adaptive draft length, leaving room for the last token."""
        first_exit = min(gate.decision_layers(self.lm.exit_points, self.lm.num_layers), default=None)
        if first_exit is None or remaining < 2:
            return 0
        depth = seq.depth if seq.depth is not None else first_exit
        draft_head = self.head_cost
        if seq.shortlist is not None and not gate.makes_logits:
            draft_head *= seq.shortlist.count / self.lm.adapter.lm_head.weight.shape[0]
        n = draft_length(seq.acceptance, depth, self.lm.num_layers, self.head_cost, spec, draft_head)
        return min(n, remaining - 1)

    # ------------------------------------------------------------------ one row

    def row_state(self, pre: Prefill, row: int, prompt: list[int], cfg: GenerationConfig) -> RowState:
        """Row ``row`` of a prompt pass as a one-row decoding state (its cache without the left padding)."""
        from transformers import DynamicCache

        cache, n = pre.cache, len(prompt)
        bsz, width = pre.input_ids.shape
        if bsz > 1 or width != n:
            cache = DynamicCache(config=self.lm.model.config)
            for i, layer in enumerate(pre.cache.layers):
                cache.update(layer.keys[row : row + 1, :, width - n :], layer.values[row : row + 1, :, width - n :], i)
        spec = cfg.speculative
        greedy = effective_temperature(cfg.temperature) == 0
        shortlist = self.shortlist(prompt, spec.shortlist) if greedy and spec.shortlist else None
        return RowState(cache, n, [n] * self.lm.num_layers, spec.initial_acceptance, shortlist=shortlist)

    def shortlist(self, prompt: list[int], size: int) -> Shortlist | None:
        """The shortlist of a prompt; None when it would cover the whole vocabulary anyway."""
        weight = self.lm.adapter.lm_head.weight
        if size >= weight.shape[0]:
            return None
        extra = torch.tensor(sorted({t for t in prompt if t >= size}), dtype=torch.long, device=weight.device)
        return Shortlist(size, extra, weight[extra])

    def _shortlist_pick(self, shortlist: Shortlist, hidden: torch.Tensor, layer: int) -> int:
        """Greedy draft token of ``hidden`` ([1, 1, H] that left after ``layer``) over the shortlist."""
        head = self.lm.adapter.lm_head
        x = self.lm.exit_normed(hidden, layer)[0, -1]
        top = x @ head.weight[: shortlist.size].T
        if getattr(head, "bias", None) is not None:
            top = top + head.bias[: shortlist.size]
        best, best_id = top.max(dim=-1)
        if shortlist.extra.numel():
            rest = shortlist.extra_weight @ x
            if getattr(head, "bias", None) is not None:
                rest = rest + head.bias[shortlist.extra]
            other, other_at = rest.max(dim=-1)
            if float(other) > float(best):
                return int(shortlist.extra[other_at])
        return int(best_id)

    def _fill(self, seq: RowState, layer: int, fed: list[_Fed], upto: int) -> None:
        """Give layer ``layer`` K/V for the round's tokens before index ``upto`` that skipped it."""
        lo = seq.filled[layer] - seq.length
        h = torch.cat([f.exit_state for f in fed[lo:upto]], dim=1)
        pos = torch.arange(seq.filled[layer], seq.length + upto, device=h.device)[None]
        k, v = self.lm.adapter.kv_projection(layer, h, self.lm.adapter.layer_kwargs(h, pos, None, None))
        seq.cache.update(k, v, layer)
        seq.filled[layer] = seq.length + upto

    def _draft_token(self, seq: RowState, fed: list[_Fed], token: int, gate: Gate, decisions: frozenset[int],
                     last_decision: int, prefix_exact: int) -> tuple[_Fed, torch.Tensor | None, float]:
        """Feed ``token`` as the round's next token: (its record, the gate's logits [1, V] if it made any,
        gate seconds). The record's ``exit_state`` is None only for a later token the gate did not exit
        (it stops at ``last_decision``); a first token the gate did not exit ran every layer."""
        lm, adapter = self.lm, self.lm.adapter
        t = len(fed)
        pos = seq.length + t
        position_ids = torch.tensor([[pos]], device=lm.device)
        h = adapter.embed(torch.tensor([[token]], device=lm.device), position_ids)
        kwargs = adapter.layer_kwargs(h, position_ids, None, seq.cache)
        filled = seq.filled
        exact_state = h
        gate_time = 0.0
        for i in range(lm.num_layers):
            if filled[i] < pos:
                self._fill(seq, i, fed, t)
            h = adapter.run_layer(i, h, kwargs)
            filled[i] += 1
            layer = i + 1
            if layer == prefix_exact:
                exact_state = h
            if layer in decisions:
                t0 = time.perf_counter()
                leave, logits = gate.exit_mask(h[:, -1], layer, lm)
                gate_time += time.perf_counter() - t0
                if bool(leave[0]):
                    exact = min(layer, prefix_exact)
                    return _Fed(token, exact, h if exact == layer else exact_state, layer, h), logits, gate_time
                if t > 0 and layer == last_decision:
                    return _Fed(token, prefix_exact, exact_state, layer), None, gate_time
        exact = min(lm.num_layers, prefix_exact)
        return _Fed(token, exact, h if exact == lm.num_layers else exact_state, lm.num_layers, h), None, gate_time

    def _verify(self, seq: RowState, fed: list[_Fed]) -> torch.Tensor:
        """Full-model logits [T, V] at the round's T tokens, recomputing only their inexact layers."""
        from transformers.masking_utils import create_causal_mask

        lm, adapter, cache = self.lm, self.lm.adapter, seq.cache
        base, n = seq.length, len(fed)
        exact = [f.exact for f in fed]  # non-increasing
        h: torch.Tensor | None = None
        kwargs: dict[str, Any] = {}
        start = n  # the suffix fed[start:] is being recomputed
        for i in range(exact[-1], lm.num_layers):  # 0-based layer i: tokens with exact <= i need it
            enter = start
            while enter > 0 and exact[enter - 1] <= i:
                enter -= 1
            layer_cache = cache.layers[i]
            extra = layer_cache.get_seq_length() - (base + enter)
            if extra:
                layer_cache.crop(-extra)
            if enter < start:
                new = torch.cat([f.state for f in fed[enter:start]], dim=1)
                h = new if h is None else torch.cat([new, h], dim=1)
                start = enter
                pos = torch.arange(base + start, base + n, device=h.device)[None]
                mask = create_causal_mask(config=lm.model.config, inputs_embeds=h, attention_mask=None,
                                          past_key_values=cache, position_ids=pos, layer_idx=i)
                kwargs = adapter.layer_kwargs(h, pos, mask, cache)
            h = adapter.run_layer(i, h, kwargs)
        seq.filled = [base + n] * lm.num_layers
        return lm.decode(h[0]).float()

    def truncate(self, seq: RowState, length: int) -> None:
        """Cut every layer's cache back to ``length`` exact positions."""
        for layer_cache in seq.cache.layers:
            extra = layer_cache.get_seq_length() - length
            if extra:
                layer_cache.crop(-extra)
        seq.length = length
        seq.filled = [length] * self.lm.num_layers

    def _next_draft(self, seq: RowState, record: _Fed, gate_logits: torch.Tensor | None, cfg: GenerationConfig,
                    rng: torch.Generator | None) -> int:
        """The token drafted from ``record``'s exit state: from the gate's logits when it made them, else from
        the shortlist (greedy) or the full head; a sampled draft keeps its distribution q for the accept test."""
        greedy = effective_temperature(cfg.temperature) == 0
        if gate_logits is None and greedy and seq.shortlist is not None:
            return self._shortlist_pick(seq.shortlist, record.exit_state, record.ran)
        logits = gate_logits if gate_logits is not None else self.lm.decode_exit(record.exit_state[:, -1], record.ran)
        logits = logits.float()
        if greedy:  # broken draft logits give some token: the verification rejects it if it is wrong
            return int(pick_tokens(logits, 0.0).tokens[0])
        record.draft_probs = sampling_probs(logits[0], cfg.temperature, cfg.top_p)
        return int(torch.multinomial(record.draft_probs, 1, generator=rng))

    @torch.no_grad()
    def round(self, seq: RowState, token: int, gate: Gate, budget: int, cfg: GenerationConfig,
              rng: torch.Generator | None, stats: SpeculativeStats) -> Round:
        """One draft-and-verify round from the emitted ``token``.

        ``budget`` caps the drafts (the round emits at most budget + 1 tokens); 0 runs one full-depth token.
        Where the full model's logits are not finite the round stops there (``failed_layers`` set) and the
        cache keeps only what was exact before it.
        """
        lm = self.lm
        num_layers = lm.num_layers
        decisions = frozenset(gate.decision_layers(lm.exit_points, num_layers)) if budget else frozenset()
        last_decision = max(decisions, default=num_layers)
        sample = effective_temperature(cfg.temperature) > 0
        fed: list[_Fed] = []
        gate_time = 0.0
        t0 = time.perf_counter()
        while True:
            prefix_exact = fed[-1].exact if fed else num_layers
            record, gate_logits, spent = self._draft_token(seq, fed, token, gate, decisions, last_decision,
                                                           prefix_exact)
            gate_time += spent
            fed.append(record)
            stats.passes += record.ran
            if record.exit_state is None or record.ran == num_layers:  # the gate kept it: the round ends here
                break
            stats.depth_sum += record.ran
            token = self._next_draft(seq, record, gate_logits, cfg, rng)
            if len(fed) == budget:  # the last draft enters the verification at the embedding
                pos = torch.tensor([[seq.length + len(fed)]], device=lm.device)
                fed.append(_Fed(token, 0, lm.adapter.embed(torch.tensor([[token]], device=lm.device), pos)))
                break
        stats.rounds += 1
        t1 = time.perf_counter()
        stats.draft_time_s += t1 - t0
        spec = cfg.speculative
        if len(fed) == 1:  # x0 ran all layers on an exact cache: the full model's token, nothing to verify
            seq.acceptance += spec.recovery * (spec.initial_acceptance - seq.acceptance)
            picked = pick_tokens(lm.decode(fed[0].exit_state[:, -1]), cfg.temperature, cfg.top_p, rng)
            if picked.any_failed:
                self.truncate(seq, seq.length)
                return Round([], [], gate_time, num_layers)
            self.truncate(seq, seq.length + 1)
            return Round([int(picked.tokens[0])], [num_layers], gate_time)

        verified = self._verify(seq, fed)
        stats.passes += num_layers - fed[-1].exact
        broken = (~torch.isfinite(verified.amax(dim=-1))).tolist()  # pick_tokens' test of a row
        drafts = len(fed) - 1
        out: list[int] = []
        p = sampling_probs(verified, cfg.temperature, cfg.top_p) if sample else None
        predicted = verified.argmax(dim=-1).tolist()
        failed = False
        for t in range(drafts + 1):  # verified[t] predicts the token after fed[t]
            if broken[t]:
                failed = True
                break
            if t == drafts:  # every draft accepted: the bonus token
                out.append(int(torch.multinomial(p[t], 1, generator=rng)) if sample else predicted[t])
            elif sample:
                resampled = accept_or_resample(p[t], fed[t].draft_probs, fed[t + 1].token, rng)
                out.append(fed[t + 1].token if resampled is None else resampled)
                if resampled is None:
                    continue
            else:
                out.append(predicted[t])
                if fed[t + 1].token == predicted[t]:
                    continue
            break
        accepted = len(out) if failed else len(out) - 1
        self.truncate(seq, seq.length + len(out))  # x0 and the accepted drafts: the positions that predicted `out`
        if seq.shortlist is not None:
            seq.shortlist.add(out, lm.adapter.lm_head.weight)
        stats.drafted += drafts
        stats.accepted += accepted
        stats.verify_time_s += time.perf_counter() - t1
        decay = spec.acceptance_decay
        seq.acceptance = decay * seq.acceptance + (1 - decay) * accepted / drafts
        depth = sum(f.ran for f in fed[:drafts]) / drafts
        seq.depth = depth if seq.depth is None else decay * seq.depth + (1 - decay) * depth

        # token i is predicted at fed[i]; the work of the positions after the last emitted one is charged to it
        # (or, when the logits broke, to the failure)
        work = [f.ran + num_layers - f.exact for f in fed]
        rest = sum(work[len(out) :])
        if failed:
            return Round(out, work[: len(out)], gate_time, rest)
        layers = work[: len(out)]
        layers[-1] += rest
        return Round(out, layers, gate_time)

    # ------------------------------------------------------------------ generation loop

    @torch.no_grad()
    def stream(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        gate: Gate,
        cfg: GenerationConfig | None = None,
        collect_exit_states: bool = False,
    ) -> Iterator[list[TokenEvent] | Finished]:
        """:meth:`GatedGenerator.stream`, lossless when ``cfg.lossless``: one prompt pass for the batch, then
        the rounds of each row in turn (each yield is one round's tokens of one row); the final
        :class:`Finished` holds one :class:`SpeculativeResult` per prompt."""
        cfg = cfg or GenerationConfig()
        if not cfg.lossless:
            yield from super().stream(prompts, gate, cfg, collect_exit_states)
            return
        if cfg.kv_mode != "propagate":
            raise ValueError("lossless decoding verifies drafts against the KV cache: generation.kv_mode must be "
                             "'propagate'")
        if collect_exit_states:
            raise ValueError("lossless decoding does not record exit states (extract shards with the plain generator)")
        encoded = self.encode(prompts)
        if not encoded or any(len(p) == 0 for p in encoded):
            raise ValueError("every prompt needs at least one token")
        num_layers = self.lm.num_layers
        rng = torch.Generator(device=self.lm.device).manual_seed(cfg.seed) if cfg.seed is not None else None
        tok = self.lm.tokenizer
        rows = [_Row(len(p), Detokenizer(tok, cfg.stop) if tok is not None else None) for p in encoded]
        stats = [SpeculativeStats(passes=num_layers) for _ in encoded]  # the first token's pass
        gate_time = 0.0
        settings = self.continuation_settings(gate, cfg)
        with self.meter.measure() as measured:
            served, events = self.serve_stored(encoded, rows, settings, cfg)
            if events:
                yield events
            # a row's served tokens join its prompt pass: its rounds go on after them
            extended = [p + row.ids for p, row in zip(encoded, rows)]
            cached = [len(p) if n else 0 for p, n in zip(encoded, served)]  # nothing of a served prompt ran
            running = [r for r, row in enumerate(rows) if row.finish_reason is None]
            if running:
                pre = self.prefill(extended, False)
                cached = [min(c, len(p)) for c, p in zip(pre.cached_tokens or [0] * len(rows), encoded)]
                first = pick_tokens(pre.output.logits, cfg.temperature, cfg.top_p, rng)
                first_failed = first.failed.tolist()
            for r in set(range(len(rows))) - set(running):
                stats[r].passes = 0  # answered from a stored completion: no layer ran for it
            for r in running:
                prompt, row = encoded[r], rows[r]
                if first_failed[r]:
                    yield [self._fail(row, r, num_layers)]
                    continue
                seq = self.row_state(pre, r, extended[r], cfg)
                yield [self._record(row, r, int(first.tokens[r]), num_layers, cfg)]
                while row.finish_reason is None:
                    budget = self.budget(seq, gate, cfg.max_new_tokens - len(row.ids), cfg.speculative)
                    done = self.round(seq, row.ids[-1], gate, budget, cfg, rng, stats[r])
                    gate_time += done.gate_time_s
                    events = []
                    for token, cost in zip(done.tokens, done.layers):
                        if row.finish_reason is not None:  # cut off by a stop: its work goes to the last token kept
                            row.layers[-1] += cost
                            continue
                        events.append(self._record(row, r, token, cost, cfg))
                    if done.failed_layers is not None:
                        if row.finish_reason is None:
                            events.append(self._fail(row, r, done.failed_layers))
                        else:
                            row.layers[-1] += done.failed_layers
                    yield events
                if self.prefix_cache is not None:  # the row's cache ends at its last fed (exact) token
                    n = min(seq.length, len(prompt) + len(row.ids))
                    self.prefix_cache.remember(seq.cache, torch.ones((1, n), dtype=torch.long, device=self.lm.device),
                                               [(prompt + row.ids)[:n]])
            self.store_completions(encoded, rows, settings)

        share = measured.energy_j / len(rows) if measured.energy_j is not None else None
        yield Finished([
            SpeculativeResult(
                text=row.text,
                token_ids=row.ids,
                layers_per_token=row.layers,
                finish_reason=row.finish_reason or "length",
                prompt_tokens=row.prompt_len,
                num_layers=num_layers,
                time_s=measured.time_s,
                gate_time_s=gate_time,
                energy_j=share,
                speculative=s.as_dict() | {"layers_computed": sum(row.layers)},
                error=row.error,
                cached_prompt_tokens=reused,
                cached_completion_tokens=n,
            )
            for row, s, reused, n in zip(rows, stats, cached, served)
        ])
