"""IDE typing sessions: latency and time to first token with and without the prefix cache.

    .venv/bin/python benchmarks/ide_session.py [--model embedded] [--mode random|type-along] [--files 3]
        [--requests 24] [--context-tokens 256] [--max-new-tokens 30] [--along-unit word|char] [--policy FILE]
        [--threshold 0.9] [--threads 1] [--dtype auto]
    .venv/bin/python benchmarks/ide_session.py --url http://127.0.0.1:8000 [--api-key KEY]   (a running server)

What the replayed IDE sends (the choice, and where it comes from):

- Prompt: llm-ls's builder without FIM (what llm-vscode sends a model without FIM tokens, such
  as the embedded SmolLM2): the cursor's line cut at the cursor, then whole lines above it,
  nearest first, while the sum of their token counts fits ``contextWindow``
  (``--context-tokens``, default 256, capped by the model's positions). The window therefore
  slides by whole lines: while it is full, each time the current line outgrows the budget the
  top line drops out, every position shifts, and that request cannot reuse anything.
- Completion: single-line, as Continue's autocomplete gives mid-line and Sourcegraph Cody's
  single-line mode asks for (stop at the first newline, at most 30 tokens), greedy.
- Session: on each of ``--files`` held-out stdlib files (the corpus's test split), the cursor
  starts after ``--start-tokens`` tokens of the file, ``--requests`` requests per file. The
  default start, 216 tokens, makes the prompts grow towards the 256-token cap without reaching
  it (the prompt is the file from its top); a start beyond ``--context-tokens`` (e.g. 1024)
  replays a full, sliding window instead. Every request runs to its end.
- ``--mode random`` (default): the user types the file's own text, 1-5 characters (seeded) per
  request.
- ``--mode type-along``: the user types along the suggestion for 1-3 requests (seeded), then
  diverges by typing 1-5 characters of the file's own text, and so on. Typing along adds the
  suggestion's next word to the document (``--along-unit word``: where a typist pauses and the
  IDE's debounce fires) or its next 1-5 characters (``char``). The two kinds of request are
  reported apart. A typed-along prompt is answered from the stored completion (type-along reuse)
  only when its tokens are the previous prompt's followed by tokens of that completion: typed
  text that ends inside a token re-tokenizes differently and gets ordinary prefix reuse.

Gates: ``full``, ``policy(T=...)`` (gated: exits, so no type-along reuse; left out of the
type-along mode, whose typing follows the full model's suggestion) and ``lossless(T=...)``
(self-speculative, drafted by the policy gate; the full model's output). Each request runs twice
back to back, cold (no prefix cache) and warm (with it), alternating which goes first, so the
load of a shared machine hits both alike. In process, both go through
``LosslessGenerator.stream`` (the warm one on a generator holding the session's ``PrefixCache``,
one per gate, kept across files): latency runs until its ``Finished`` event (prompt pass,
decoding, storing into the cache), time to first token until its first token event. With
``--url`` the same requests go to a running server's ``/v1/completions`` as SSE streams, the
cold one with ``cache_prompt: false`` (the server's one cache serves every gate). Both runs of a
request must give the same completion (greedy; the prefix cache and type-along reuse are exact):
the count is printed. Decoding dominates a warm request, so the ratio depends on completion length: it is
also printed for shorter caps, read off the same run's token times (a run capped at k tokens
does exactly the work of this one's first k). Without ``--policy`` the policy gate runs a
RANDOM-INIT ExitPolicy (its cost, not its quality: at T=0.9 it seldom exits, and lossless drafts
seldom); with ``--url`` the server's own policy (its gates are left out when it has none). The
report names the CPU and the load average before and after (a shared machine skews latencies).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a script from anywhere

from benchmarks.gate_speed import cpu_model  # noqa: E402
from greencode.config import DataConfig, GateConfig, GenerationConfig, ModelConfig  # noqa: E402
from greencode.data import load_corpus  # noqa: E402
from greencode.gates import FullGate, Gate, PolicyGate  # noqa: E402
from greencode.generate import Finished  # noqa: E402
from greencode.modeling import load_model, load_tokenizer  # noqa: E402
from greencode.policy import ExitPolicy  # noqa: E402
from greencode.prefix_cache import PrefixCache, PrefixCacheStats  # noqa: E402
from greencode.speculative import LosslessGenerator  # noqa: E402
from greencode.tokens import encode  # noqa: E402

log = logging.getLogger("greencode.bench.ide_session")

WORD = re.compile(r"\s*(\w+|[^\w\s]+)")  # a typist's unit: leading spaces, then a word or a run of punctuation


def llm_ls_prompt(text: str, cursor: int, tokenizer: Any, budget: int) -> str:
    """llm-ls's prompt without FIM: lines above the cursor, nearest first, while their token counts fit."""
    start = text.rfind("\n", 0, cursor) + 1
    lines = [text[start:cursor]]
    while start > 0:
        above = text.rfind("\n", 0, start - 1) + 1
        lines.append(text[above:start])
        start = above
    kept, remaining = [], budget
    for line in lines:
        n = len(encode(tokenizer, line))
        if n > remaining:
            break
        kept.append(line)
        remaining -= n
    return "".join(reversed(kept))


def session_start(text: str, tokenizer: Any, start_tokens: int, requests: int) -> int | None:
    """Where a file's session starts (after ``start_tokens`` tokens), or None when the file is too short for it
    (at most 5 characters a request)."""
    ids = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    if len(ids["input_ids"]) <= start_tokens:
        return None
    start = ids["offset_mapping"][start_tokens][0]
    return start if start + 5 * requests < len(text) else None


def typed_along(suggestion: str, unit: str, rng: random.Random) -> str:
    """What the user types of the suggestion before the next request: its next word, or its next 1-5 characters."""
    if unit == "char":
        return suggestion[: rng.randint(1, 5)]
    match = WORD.match(suggestion)
    return match.group(0) if match else ""


@dataclass
class Run:
    token_times_s: list[float]  # since the request started, when each new token was known
    end_s: float  # since the request started, when it was over (after storing into the cache)
    completion: list[int] | str  # token ids in process, text over HTTP
    text: str
    tokens: int
    reused: int
    prompt_tokens: int
    served: int  # completion tokens answered from a stored completion (type-along reuse)
    along: bool = False  # the prompt typed along the previous suggestion

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0]

    def latency_s(self, cap: int | None = None) -> float:
        """End to end; with ``cap``, what a request capped at ``cap`` new tokens took (its first ``cap`` tokens,
        plus the same closing work)."""
        if cap is None or cap >= len(self.token_times_s):
            return self.end_s
        return self.token_times_s[cap - 1] + (self.end_s - self.token_times_s[-1])


class InProcess:
    """The model in this process, through LosslessGenerator.stream: one generator without a cache, one with the
    session cache of each gate."""

    def __init__(self, lm: Any, gates: dict[str, tuple[Gate, bool]], cache_mb: float) -> None:
        self.gates = gates  # name -> (gate, lossless)
        self.cold = LosslessGenerator(lm)
        self.stores = {name: PrefixCache(int(cache_mb * 2**20), lm.fingerprint) for name in gates}
        self.warm = {name: LosslessGenerator(lm, self.cold.meter, store) for name, store in self.stores.items()}

    def complete(self, prompt: str, gate: str, cached: bool, cfg: GenerationConfig) -> Run:
        gen = self.warm[gate] if cached else self.cold
        chosen, lossless = self.gates[gate]
        times, t0 = [], time.perf_counter()
        for item in gen.stream([prompt], chosen, cfg.model_copy(update={"lossless": lossless})):
            if isinstance(item, Finished):
                end = time.perf_counter() - t0
                [result] = item.results
            else:
                times.extend([time.perf_counter() - t0] * len(item))
        return Run(times, end, result.token_ids, result.text, len(result.token_ids), result.cached_prompt_tokens,
                   result.prompt_tokens, result.cached_completion_tokens)

    def cache_stats(self, gate: str) -> PrefixCacheStats | None:
        return self.stores[gate].stats()


class OverHttp:
    """A running GreenCode server: OpenAI completions as SSE, ``cache_prompt: false`` for the cold run."""

    def __init__(self, url: str, api_key: str | None, tokenizer: Any) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=600)
        self.tokenizer = tokenizer
        self.health = self.client.get("/health").json()
        self.gates: dict[str, tuple[str, bool]] = {"full": ("full", False)}  # name -> (request gate, lossless)

    def complete(self, prompt: str, gate: str, cached: bool, cfg: GenerationConfig) -> Run:
        name, lossless = self.gates[gate]
        body = {"model": "greencode", "prompt": prompt, "max_tokens": cfg.max_new_tokens, "temperature": 0,
                "stop": cfg.stop, "stream": True, "gate": name, "lossless": lossless, "cache_prompt": cached}
        times, text, details, t0 = [], "", {}, time.perf_counter()
        with self.client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise SystemExit(f"{response.status_code} from the server: {response.read().decode()[:500]}")
            for chunk in _sse(response.iter_lines()):
                times.append(time.perf_counter() - t0)
                text += chunk["choices"][0]["text"]
                details = chunk.get("greencode", details)
        end = time.perf_counter() - t0
        tokens, reused = len(details.get("layers_per_token", times)), details.get("cached_prompt_tokens", 0)
        return Run(times, end, text, text, tokens, reused, len(encode(self.tokenizer, prompt)),
                   details.get("cached_completion_tokens", 0))

    def cache_stats(self, gate: str) -> PrefixCacheStats | None:
        """The server's one cache (all gates), from /metrics."""
        values: dict[str, float] = {}
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith("greencode_prefix_cache_") and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                key = name.split("{")[0].removeprefix("greencode_prefix_cache_").removesuffix("_total")
                values[key] = values.get(key, 0.0) + float(value)
        if not values:
            return None
        return PrefixCacheStats(*(int(values.get(k, 0)) for k in ("lookups", "hits", "prompt_tokens", "reused_tokens",
                                                                  "entries", "bytes", "budget_bytes", "evictions",
                                                                  "rejected")))


def _sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


@dataclass
class Cell:
    """The runs of one gate: each request cold and warm, in request order."""

    cold: list[Run] = field(default_factory=list)
    warm: list[Run] = field(default_factory=list)

    def kind(self, along: bool) -> Cell:
        """The requests that typed along (or not)."""
        pairs = [(c, w) for c, w in zip(self.cold, self.warm) if w.along == along]
        return Cell([c for c, _ in pairs], [w for _, w in pairs])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def ratio(cell: Cell, q: float, cap: int | None = None) -> float:
    """Cache on over cache off, at quantile ``q`` of the latency (of requests capped at ``cap`` tokens)."""
    return pct([r.latency_s(cap) for r in cell.warm], q) / pct([r.latency_s(cap) for r in cell.cold], q)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded",
                   help="model.name (default: the embedded SmolLM2-135M); with --url, only its tokenizer is loaded "
                        "(the server's model must use the same)")
    p.add_argument("--url", help="a running GreenCode server instead of the model in this process")
    p.add_argument("--api-key", help="--url: the server's API key")
    p.add_argument("--mode", choices=["random", "type-along"], default="random",
                   help="random: the user types the file's text; type-along: the suggestion's first words, then "
                        "diverges")
    p.add_argument("--along-unit", choices=["word", "char"], default="word",
                   help="type-along: what the user types of the suggestion per request (a word, or 1-5 characters)")
    p.add_argument("--gates", default="full,policy,lossless",
                   help="comma-separated gates to run, of full, policy, lossless (type-along leaves policy out)")
    p.add_argument("--policy", help="ExitPolicy file; default: a RANDOM-INIT policy, clearly labelled")
    p.add_argument("--threshold", type=float, default=GateConfig().threshold, help="policy threshold T")
    p.add_argument("--files", type=int, default=3, help="held-out files, one typing session each")
    p.add_argument("--requests", type=int, default=24, help="requests per file (20+ for the issue's acceptance)")
    p.add_argument("--context-tokens", type=int, default=256, help="llm-ls contextWindow (capped by the model)")
    p.add_argument("--start-tokens", type=int, default=216,
                   help="the cursor starts after this many tokens of the file "
                        "(beyond --context-tokens: a full, sliding window)")
    p.add_argument("--max-new-tokens", type=int, default=30, help="single-line completions stop earlier, at a newline")
    p.add_argument("--cache-mb", type=float, default=256.0, help="in process: prefix cache budget per gate")
    p.add_argument("--threads", type=int, default=1,
                   help="in process: torch CPU threads (on a shared machine, 2 threads on 2 busy cores stall each "
                        "other: one is faster)")
    p.add_argument("--dtype", default="auto", help="in process: model.dtype (auto, float32, bfloat16)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, stop=["\n"])
    along_mode = args.mode == "type-along"
    backend: InProcess | OverHttp
    if args.url:
        tok = load_tokenizer(ModelConfig(name=args.model))
        backend = OverHttp(args.url, args.api_key, tok)
        positions = backend.health["context_limit"]
        if backend.health.get("policy_loaded"):
            backend.gates.update({"policy": ("policy", False), "lossless(policy)": ("policy", True)})
        policy_label = f"the server's ({'loaded' if backend.health.get('policy_loaded') else 'none: gate left out'}),"
        policy_label += " its default T"
        gate_names = list(backend.gates)
        where = f"server {args.url} ({backend.health['model']}, prefix cache "
        where += f"{backend.health.get('prefix_cache_mb')} MiB, shared by the gates)"
    else:
        lm = load_model(ModelConfig(name=args.model, dtype=args.dtype))
        tok = lm.tokenizer
        positions = getattr(lm.model.config, "max_position_embeddings", args.context_tokens)
        if args.policy:
            policy = ExitPolicy.load_for(args.policy, lm)
            policy_label = f"policy file {args.policy}"
        else:
            policy = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint=lm.fingerprint)
            policy_label = "RANDOM-INIT policy (untrained: the gate's cost, not its quality)"
        policy_gate = PolicyGate(policy, args.threshold)
        gates: dict[str, tuple[Gate, bool]] = {"full": (FullGate(), False),
                                               f"policy(T={args.threshold})": (policy_gate, False),
                                               f"lossless(T={args.threshold})": (policy_gate, True)}
        backend = InProcess(lm, gates, args.cache_mb)
        gate_names = list(gates)
        where = f"in process ({lm.model.dtype}), {args.threads} torch threads, prefix cache {args.cache_mb:.0f} MiB " \
                "per gate"
        backend.complete("def f(x):\n    return", "full", False, cfg)  # warm-up
    wanted = set(args.gates.split(","))
    if along_mode:  # the user types along the full model's suggestion: gated gates would answer other text
        wanted.discard("policy")
    gate_names = [name for name in gate_names if name.split("(")[0] in wanted]
    if not gate_names:
        raise SystemExit(f"--gates {args.gates}: none of full, policy, lossless{' (type-along)' if along_mode else ''} "
                         "is available")
    budget = min(args.context_tokens, positions - args.max_new_tokens)
    cells = {name: Cell() for name in gate_names}

    rng = random.Random(args.seed)
    sessions = []
    for f in load_corpus(DataConfig(corpus="stdlib")).split("test"):
        start = session_start(f.text, tok, args.start_tokens, args.requests)
        if start is not None:
            sessions.append((f, start))
        if len(sessions) == args.files:
            break
    if len(sessions) < args.files:
        raise SystemExit(f"only {len(sessions)} held-out files are long enough for {args.requests} requests "
                         f"from token {args.start_tokens}")

    load_before, t_start = load_average(), time.perf_counter()
    for f, start in sessions:
        log.info("session on %s: %d requests (%s)", f.path, args.requests, args.mode)
        doc, pos, along, along_left = f.text[:start], start, False, 0
        for i in range(args.requests):
            prompt = llm_ls_prompt(doc, len(doc), tok, budget)
            for name in gate_names:
                for warm in ((False, True) if i % 2 == 0 else (True, False)):
                    run = backend.complete(prompt, name, warm, cfg)
                    run.along = along
                    (cells[name].warm if warm else cells[name].cold).append(run)
            if i == args.requests - 1:
                break
            suggestion = cells[gate_names[0]].warm[-1].text
            chunk = typed_along(suggestion, args.along_unit, rng) if along_left else ""
            if chunk:  # the user types what was suggested
                doc, along, along_left = doc + chunk, True, along_left - 1
            else:  # the user's own text (the file's); in type-along mode, then along the next 1-3 suggestions
                n = rng.randint(1, 5)
                doc, pos, along = doc + f.text[pos : pos + n], pos + n, False
                along_left = rng.randint(1, 3) if along_mode else 0
    wall = time.perf_counter() - t_start
    where += (f"; CPU {cpu_model()}, {os.cpu_count()} cores; load average (1/5/15 min) {load_before} before, "
              f"{load_average()} after")
    report(args, cells, backend, sessions, budget, wall, where, policy_label)


def report(args: argparse.Namespace, cells: dict[str, Cell], backend: InProcess | OverHttp, sessions: list[Any],
           budget: int, wall: float, where: str, policy_label: str) -> None:
    requests = len(sessions) * args.requests
    first = next(iter(cells.values()))
    prompt_lens = [r.prompt_tokens for r in first.cold]
    new_tokens = [r.tokens for r in first.cold]
    typing = ("cursor +1-5 chars per request" if args.mode == "random" else
              f"type-along: 1-3 requests typing the suggestion's next {args.along_unit}"
              f"{'' if args.along_unit == 'word' else ' (1-5 characters)'}, then 1-5 chars of the file's own text")
    print(f"\nIDE typing sessions: model {args.model}, {len(sessions)} held-out stdlib files x {args.requests} "
          f"requests ({requests}), {typing}; {where}; {wall / 60:.1f} min")
    print(f"prompts: llm-ls lines above the cursor within {budget} tokens (mean {statistics.mean(prompt_lens):.0f}, "
          f"min {min(prompt_lens)}, max {max(prompt_lens)}); single-line completions: stop at a newline or "
          f"{args.max_new_tokens} tokens, greedy ({next(iter(cells))} gate: mean {statistics.mean(new_tokens):.1f} "
          f"new tokens, median {statistics.median(new_tokens):.0f})")
    print(f"policy gate: {policy_label}")
    print(f"{'gate':<16} {'requests':<9} {'n':>4} {'cache':<5} {'p50 s':>7} {'p95 s':>7} {'ttft p50':>9} "
          f"{'ttft p95':>9} {'reused':>7} {'misses':>6} {'served':>7}")
    kinds = [("all", None)] + ([("random", False), ("along", True)] if args.mode == "type-along" else [])
    for name, cell in cells.items():
        for kind, along in kinds:
            part = cell if along is None else cell.kind(along)
            if not part.cold:
                continue
            for label, runs in (("off", part.cold), ("on", part.warm)):
                lat, ttft = [r.latency_s() for r in runs], [r.ttft_s for r in runs]
                reused = sum(r.reused for r in runs) / sum(r.prompt_tokens for r in runs)
                served = sum(r.served for r in runs) / max(1, sum(r.tokens for r in runs))
                misses = sum(r.reused == 0 for r in runs)
                print(f"{name:<16} {kind:<9} {len(runs):>4} {label:<5} {pct(lat, .5):>7.3f} {pct(lat, .95):>7.3f} "
                      f"{pct(ttft, .5):>9.3f} {pct(ttft, .95):>9.3f} {reused:>7.1%} {misses:>6} {served:>7.1%}")
    print()
    caps = sorted({c for c in (1, 2, 4, 8, 16) if c < args.max_new_tokens} | {args.max_new_tokens})
    for name, cell in cells.items():
        for kind, along in kinds:
            part = cell if along is None else cell.kind(along)
            if not part.cold:
                continue
            ttft_on, ttft_off = [r.ttft_s for r in part.warm], [r.ttft_s for r in part.cold]
            paired = [w.latency_s() / c.latency_s() for w, c in zip(part.warm, part.cold)]
            same = sum(w.completion == c.completion for w, c in zip(part.warm, part.cold))
            hits = sum(w.served > 0 for w in part.warm)
            same_served = sum(w.completion == c.completion for w, c in zip(part.warm, part.cold) if w.served)
            by_cap = ", ".join(f"<={cap}: x{ratio(part, .5, cap):.2f}" for cap in caps)
            print(f"{name} ({kind} requests): cache on/off p50 latency x{ratio(part, .5):.2f}, p95 "
                  f"x{ratio(part, .95):.2f}, p50 time to first token x{pct(ttft_on, .5) / pct(ttft_off, .5):.2f}, "
                  f"per-request latency ratio median x{statistics.median(paired):.2f}; same completion "
                  f"{same}/{len(paired)}; answered from a stored completion {hits}/{len(paired)} (of those, same "
                  f"completion {same_served}/{hits})")
            print(f"  p50 latency ratio by completion cap (new tokens): {by_cap}")
        st = backend.cache_stats(name)
        if st is not None:
            print(f"  cache: {st.entries} entries ({st.continuations} stored completions), "
                  f"{st.bytes_held / 2**20:.1f} MiB held of {st.budget_bytes / 2**20:.0f}, {st.evictions} evictions, "
                  f"token hit rate {st.hit_rate:.1%}, {st.served_tokens} completion tokens served")


if __name__ == "__main__":
    main()
