"""Load test of the Serve app on 127.0.0.1: p50/p95 latency and tokens/s, `full` vs `policy`; or an overload burst.

    python benchmarks/serve_load.py --policy runs/demo/policy/exit_policy.pt
    python benchmarks/serve_load.py            # no policy: a clearly labelled RANDOM-INIT one
    python benchmarks/serve_load.py --overload 300

Starts a local Ray + Serve app on the embedded model (or --model), sends line-completion
prompts cut from real code (the Python stdlib corpus, METHOD §6 samples) at each
concurrency level for both gates, then redeploys with batching off (max_batch_size=1)
to measure the batching gain at the highest concurrency. Request loops are bounded
(--requests per level, at least the concurrency) and only reach 127.0.0.1.

``--overload N`` instead sends N requests at once to one replica with the default admission
limits (every 4th a stream; TGI, OpenAI and Ollama in turn) while polling /health every 0.5 s,
and reports how many got a 200, a 429 or a 503 (and whether each refusal carried Retry-After),
p50/p95 latency of the admitted ones, the slowest answer and how many came later than the request
timeout + 2 s, and how many /health polls took over 1 s.
"""

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

# Run as a script from anywhere: the repo root must be importable here and, through Ray, in the replica.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from greencode.config import DataConfig, ModelConfig, ServeConfig
from greencode.data import line_completion_samples, load_corpus
from greencode.modeling import load_model
from greencode.policy import ExitPolicy

log = logging.getLogger("greencode.bench.serve")


@dataclass
class Cell:
    gate: str
    max_batch_size: int
    concurrency: int
    requests: int
    p50_s: float
    p95_s: float
    tokens_per_s: float
    mean_layers: float
    mean_batch: float
    energy_j: float | None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def load_level(url: str, prompts: list[str], gate: str, concurrency: int, requests: int, max_new: int) -> Cell:
    """``requests`` completions, ``concurrency`` in flight at a time; tokens/s over the wall time."""
    queue = [prompts[i % len(prompts)] for i in range(requests)]
    latencies, answers = [], []

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            prompt = queue.pop()
            t0 = time.perf_counter()
            body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new, "gate": gate}}
            r = await client.post("/generate", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            answers.append(r.json())

    # A fresh connection per request: a pooled one can be closed by the proxy's keep-alive timer as it is reused.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    tokens = sum(a["details"]["generated_tokens"] for a in answers)
    layers = [n for a in answers for n in a["greencode"]["layers_per_token"]]
    energies = [a["greencode"]["energy_j"] for a in answers]
    return Cell(gate, 0, concurrency, requests, percentile(latencies, 0.5), percentile(latencies, 0.95), tokens / wall,
                sum(layers) / len(layers), statistics.mean(a["greencode"]["batch_size"] for a in answers),
                None if any(e is None for e in energies) else sum(energies))


@dataclass
class Answer:
    protocol: str
    stream: bool
    status: int
    seconds: float
    retry_after: int | None  # seconds, from the Retry-After header
    stream_error: bool  # a 200 stream that ended with an error event


HEALTH_POLL_S = 0.5  # as a Kubernetes probe might (its default timeout: 1 s)
PROXY_MARGIN_S = 2.0  # a reply may come this long after the request timeout (issue 22's acceptance)

OVERLOAD_ROUTES = {  # protocol -> (path, body of a request for `prompt` with `n` new tokens, streaming or not)
    "tgi": lambda prompt, n, stream: ("/generate_stream" if stream else "/generate",
                                      {"inputs": prompt, "parameters": {"max_new_tokens": n}}),
    "openai": lambda prompt, n, stream: ("/v1/completions", {"prompt": prompt, "max_tokens": n, "stream": stream}),
    "ollama": lambda prompt, n, stream: ("/api/generate", {"prompt": prompt, "stream": stream,
                                                           "options": {"num_predict": n}}),
}


async def overload_burst(url: str, prompts: list[str], total: int, max_new: int,
                         timeout_s: float) -> tuple[list[Answer], list[tuple[int, float]]]:
    """``total`` requests at once (every 4th a stream, protocols in turn) and /health polled until all answered."""
    limits = httpx.Limits(max_connections=total + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s + 60, limits=limits) as client:
        async def one(i: int) -> Answer:
            protocol, stream = list(OVERLOAD_ROUTES)[i % 3], i % 4 == 3
            path, body = OVERLOAD_ROUTES[protocol](prompts[i % len(prompts)], max_new, stream)
            t0 = time.perf_counter()
            async with client.stream("POST", path, json=body) as r:
                text = (await r.aread()).decode("utf-8", "replace")
            retry = r.headers.get("retry-after")
            failed = r.status_code == 200 and stream and ("event: error" in text or '{"error"' in text)
            return Answer(protocol, stream, r.status_code, time.perf_counter() - t0,
                          int(retry) if retry is not None else None, failed)

        done = threading.Event()
        health: list[tuple[int, float]] = []
        # a probe of its own, like a kubelet's: not queued behind this loop's 300 requests
        poller = threading.Thread(target=poll_health, args=(url, done, health))
        poller.start()
        try:
            answers = await asyncio.gather(*(one(i) for i in range(total)))
        finally:
            done.set()
            await asyncio.to_thread(poller.join)
        return answers, health


def poll_health(url: str, done: threading.Event, health: list[tuple[int, float]]) -> None:
    """GET /health every HEALTH_POLL_S, a new connection each time (as a kubelet does), until ``done``:
    (status, or 0 when it failed or took 10 s, seconds)."""
    with httpx.Client(base_url=url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while not done.is_set():
            t0 = time.perf_counter()
            try:
                status = client.get("/health").status_code
            except httpx.TransportError:
                status = 0
            health.append((status, time.perf_counter() - t0))
            done.wait(HEALTH_POLL_S)


def report_overload(answers: list[Answer], health: list[tuple[int, float]], timeout_s: float, header: str) -> None:
    counts = {s: sum(a.status == s for a in answers) for s in sorted({a.status for a in answers})}
    refused = [a for a in answers if a.status in (429, 503)]
    admitted = [a.seconds for a in answers if a.status == 200]
    print(f"\n{header}")
    print("status counts: " + ", ".join(f"{s}: {n}" for s, n in counts.items()))
    for kind in (False, True):
        part = [a for a in answers if a.stream is kind]
        print(f"  {'streams' if kind else 'batches'}: {len(part)} sent, "
              + ", ".join(f"{s}: {sum(a.status == s for a in part)}" for s in counts))
    with_retry = [a.retry_after for a in refused if a.retry_after is not None and a.retry_after >= 1]
    print(f"refusals with Retry-After >= 1: {len(with_retry)} of {len(refused)}"
          + (f" (values {min(with_retry)}-{max(with_retry)} s)" if with_retry else ""))
    if admitted:
        print(f"admitted (200): p50 {percentile(admitted, 0.5):.2f} s, p95 {percentile(admitted, 0.95):.2f} s, "
              f"max {max(admitted):.2f} s; streams ending with an error event: {sum(a.stream_error for a in answers)}")
    if refused:
        print(f"refused: p50 {percentile([a.seconds for a in refused], 0.5):.3f} s")
    late = sum(a.seconds > timeout_s + PROXY_MARGIN_S for a in answers)
    print(f"slowest answer {max(a.seconds for a in answers):.2f} s (request timeout {timeout_s:g} s); "
          f"answers later than {timeout_s + PROXY_MARGIN_S:g} s: {late}")
    other = sorted({a.status for a in answers} - {200, 429, 503})
    print(f"answers other than 200/429/503: {sum(a.status in other for a in answers)} {other or ''}".rstrip())
    ok = sum(s == 200 for s, _ in health)
    slow = sum(t > 1.0 for _, t in health)
    print(f"/health every {HEALTH_POLL_S:g} s during the burst: {ok}/{len(health)} answered 200, {slow} took over "
          f"1 s, worst {max(t for _, t in health):.3f} s"
          if health else "/health: not polled (the burst ended at once)")
    print(f"load average (1/5/15 min) at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def run_overload(args: argparse.Namespace, prompts: list[str]) -> None:
    from ray import serve

    from workflows.serve import run

    cfg = ServeConfig(model={"name": args.model}, default_gate="full", num_cpus=args.num_cpus,
                      max_context_tokens=1024, max_batch_size=args.max_batch_size)
    url = f"http://127.0.0.1:{args.port}"
    run(cfg, port=args.port)
    asyncio.run(load_level(url, prompts, "full", 1, 2, args.max_new_tokens))  # warm-up
    answers, health = asyncio.run(overload_burst(url, prompts, args.overload, args.max_new_tokens,
                                                 cfg.admission.request_timeout_s))
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    serve.shutdown()
    lanes = cfg.admission
    report_overload(answers, health, lanes.request_timeout_s,
                    f"GreenCode overload: {args.overload} concurrent requests, one replica, model {args.model}, "
                    f"gate full, {args.max_new_tokens} new tokens each, replica CPUs {args.num_cpus}; per lane "
                    f"(streams, batches) {lanes.max_active} active + {lanes.max_queued} queued, "
                    f"request timeout {lanes.request_timeout_s:g} s")
    print("/metrics error counters: " + "; ".join(line for line in metrics.splitlines()
                                                  if line.startswith("greencode_request_errors_total{")))
    if args.out:
        write_json(Path(args.out), {"answers": [asdict(a) for a in answers], "health": health})


def write_json(out: Path, data: object) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, out)


def random_policy(lm, path: Path) -> Path:
    """An UNTRAINED policy with the model's fingerprint: exercises the serving path only, says nothing of quality."""
    policy = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint=lm.fingerprint,
                        metadata={"note": "RANDOM-INIT policy made by benchmarks/serve_load.py (untrained)"})
    return policy.save(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="model.name (default: the embedded SmolLM2-135M)")
    p.add_argument("--policy", help="ExitPolicy file; default: a RANDOM-INIT policy, clearly labelled")
    p.add_argument("--threshold", type=float, default=0.5, help="policy threshold T (default 0.5)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=8, help="requests per level (at least the concurrency)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--num-cpus", type=float, default=float(max(1, (os.cpu_count() or 2) - 1)), help="replica CPUs")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--overload", type=int, metavar="N",
                   help="instead of the latency grid: N requests at once against one replica (e.g. 300)")
    p.add_argument("--out", help="also write the cells (or the overload answers) as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from ray import serve

    from workflows.serve import run

    lm = load_model(ModelConfig(name=args.model))
    files = load_corpus(DataConfig(corpus="stdlib")).split("test")
    prompts = [s.context_text for s in line_completion_samples(files, lm.tokenizer, 32, context_cap=256)]
    if args.overload:
        del lm
        run_overload(args, prompts)
        return
    scratch = Path(tempfile.mkdtemp(prefix="greencode-bench-"))
    if args.policy:
        policy_path, policy_label = Path(args.policy), f"policy file {args.policy}"
    else:
        policy_path = random_policy(lm, scratch / "random_policy.pt")
        policy_label = "RANDOM-INIT policy (untrained: speed of the serving path only, not a quality result)"
    num_layers = lm.num_layers
    del lm

    url = f"http://127.0.0.1:{args.port}"
    base = {"model": {"name": args.model}, "policy_path": str(policy_path), "gate": {"threshold": args.threshold},
            "num_cpus": args.num_cpus, "max_context_tokens": 1024}
    cells: list[Cell] = []
    top = max(args.concurrency)
    for batch, levels in ((args.max_batch_size, args.concurrency), (1, [top])):
        run(ServeConfig(**base, max_batch_size=batch), port=args.port)
        asyncio.run(load_level(url, prompts, "full", 1, 2, args.max_new_tokens))  # warm-up
        for gate in ("full", "policy"):
            for c in levels:
                cell = asyncio.run(load_level(url, prompts, gate, c, max(args.requests, c), args.max_new_tokens))
                cell.max_batch_size = batch
                cells.append(cell)
                log.info("%s", cell)
        serve.delete("greencode")
    serve.shutdown()

    print(f"\nGreenCode serving load test: model {args.model} ({num_layers} layers), {policy_label}, "
          f"T={args.threshold}, "
          f"{args.max_new_tokens} new tokens per request, prompts from the stdlib corpus, replica CPUs {args.num_cpus}")
    print(f"{'gate':<7} {'batch':>5} {'conc':>4} {'reqs':>4} {'p50 s':>7} {'p95 s':>7} {'tok/s':>7} {'layers':>6} "
          f"{'rows/batch':>10} {'energy J':>9}")
    for c in cells:
        energy = f"{c.energy_j:.1f}" if c.energy_j is not None else "n/a"
        print(f"{c.gate:<7} {c.max_batch_size:>5} {c.concurrency:>4} {c.requests:>4} {c.p50_s:>7.2f} {c.p95_s:>7.2f} "
              f"{c.tokens_per_s:>7.1f} {c.mean_layers:>6.2f} {c.mean_batch:>10.2f} {energy:>9}")
    by = {(c.gate, c.max_batch_size, c.concurrency): c for c in cells}
    print()
    for c in args.concurrency:
        full, policy = by[("full", args.max_batch_size, c)], by[("policy", args.max_batch_size, c)]
        print(f"policy / full at concurrency {c:>2}: tokens/s x{policy.tokens_per_s / full.tokens_per_s:.2f}, "
              f"p50 x{policy.p50_s / full.p50_s:.2f}, layers {policy.mean_layers:.2f} vs {full.mean_layers:.2f}")
    for gate in ("full", "policy"):
        on, off = by[(gate, args.max_batch_size, top)], by[(gate, 1, top)]
        print(f"batching gain ({gate}, concurrency {top}, max_batch_size {args.max_batch_size} vs 1): "
              f"tokens/s x{on.tokens_per_s / off.tokens_per_s:.2f}, p50 x{on.p50_s / off.p50_s:.2f}")
    print("energy: n/a = no meter on this machine (reported as null, never estimated)")
    if args.out:
        write_json(Path(args.out), [asdict(c) for c in cells])


if __name__ == "__main__":
    main()
