"""Prometheus metrics of one replica, served as text on ``GET /metrics``.

Each replica keeps its own registry (label ``replica``); with several replicas a
scrape through the HTTP proxy reaches one of them, so scrape replicas directly or
sum over ``replica`` in Prometheus. Every 4xx/5xx answer is counted by status
(``greencode_request_errors_total``) by :class:`ErrorCounter`, which wraps the whole app,
refusals before the routes included; a stream that fails after its 200 counts as
``greencode_requests_total{outcome="error"}``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from greencode.prefix_cache import PrefixCacheStats
from serve_app.formats import protocol_of

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class ServeMetrics:
    def __init__(self, replica: str, num_layers: int) -> None:
        self.registry = CollectorRegistry()
        self.replica = replica
        labels = ["replica", "protocol"]
        self.requests = Counter("greencode_requests", "HTTP completion requests by outcome", labels + ["outcome"],
                                registry=self.registry)
        self.latency = Histogram("greencode_request_latency_seconds", "end-to-end completion latency", labels,
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("greencode_generated_tokens", "tokens generated", ["replica", "gate"],
                              registry=self.registry)
        self.layers = Histogram("greencode_layers_per_token", "decoder layers each generated token ran",
                                ["replica", "gate"], buckets=tuple(range(1, num_layers + 1)), registry=self.registry)
        self.mean_layers = Gauge("greencode_mean_layers_per_token", "running mean of layers per token",
                                 ["replica", "gate"], registry=self.registry)
        self.energy = Counter("greencode_energy_joules", "measured energy of generation (only when a meter exists)",
                              ["replica", "gate"], registry=self.registry)
        self.unmeasured = Counter("greencode_energy_unmeasured_requests", "generations with no energy meter",
                                  ["replica", "gate"], registry=self.registry)
        self.batch_size = Histogram("greencode_batch_size", "rows per generation batch", ["replica"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.cancelled = Counter("greencode_cancelled_requests", "requests whose client went away mid-generation",
                                 labels, registry=self.registry)
        self.errors = Counter("greencode_request_errors", "HTTP answers with a 4xx/5xx status", labels + ["status"],
                              registry=self.registry)
        spec = ["replica", "gate"]  # gate: the drafting gate of lossless requests, e.g. "lossless-policy"
        self.spec_counts = {
            key: Counter(f"greencode_lossless_{key}", doc, spec, registry=self.registry)
            for key, doc in (("rounds", "draft-and-verify rounds of lossless requests"),
                             ("drafted_tokens", "tokens drafted by the gate in lossless requests"),
                             ("accepted_tokens", "drafted tokens the full model kept"),
                             ("layer_passes", "sequential decoder-layer calls of lossless requests (a verification "
                                              "over several tokens counts once)"),
                             ("draft_layers", "decoder layers the drafts ran before the gate exited them"))
        }
        self.acceptance = Gauge("greencode_lossless_acceptance_rate", "accepted / drafted tokens so far", spec,
                                registry=self.registry)
        self.draft_depth = Gauge("greencode_lossless_mean_draft_depth", "mean exit layer of the drafts so far", spec,
                                 registry=self.registry)
        self.passes_per_token = Gauge("greencode_lossless_layer_passes_per_token",
                                      "sequential layer calls per emitted token so far (layers computed per token: "
                                      "greencode_mean_layers_per_token of the same gate)", spec, registry=self.registry)
        self._spec_sums: dict[str, list[float]] = {}  # gate -> drafted, accepted, draft layers, passes, tokens
        self._layer_sums: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()  # streams record on the event loop, batches on the generation thread

    def record_request(self, protocol: str, outcome: str, latency_s: float | None = None) -> None:
        self.requests.labels(self.replica, protocol, outcome).inc()
        if latency_s is not None:
            self.latency.labels(self.replica, protocol).observe(latency_s)

    def record_tokens(self, gate: str, layers_per_token: list[int]) -> None:
        """Count generated tokens and the layers each ran (streams call this token by token)."""
        self.tokens.labels(self.replica, gate).inc(len(layers_per_token))
        histogram = self.layers.labels(self.replica, gate)
        for n in layers_per_token:
            histogram.observe(n)
        with self._lock:
            total, count = self._layer_sums.get(gate, (0, 0))
            total, count = total + sum(layers_per_token), count + len(layers_per_token)
            self._layer_sums[gate] = (total, count)
            if count:
                self.mean_layers.labels(self.replica, gate).set(total / count)

    def record_energy(self, gate: str, energy_j: float | None) -> None:
        if energy_j is None:
            self.unmeasured.labels(self.replica, gate).inc()
        else:
            self.energy.labels(self.replica, gate).inc(energy_j)

    def record_speculative(self, gate: str, spec: dict[str, Any], tokens: int) -> None:
        """Count one lossless result's rounds (``spec``: its ``speculative`` statistics; ``tokens`` it emitted)."""
        depth = (spec["mean_draft_depth"] or 0) * spec["drafted_tokens"]
        values = {"rounds": spec["rounds"], "drafted_tokens": spec["drafted_tokens"],
                  "accepted_tokens": spec["accepted_tokens"], "layer_passes": spec["layer_passes"],
                  "draft_layers": depth}
        for key, value in values.items():
            self.spec_counts[key].labels(self.replica, gate).inc(value)
        with self._lock:
            sums = self._spec_sums.setdefault(gate, [0.0] * 5)
            for i, value in enumerate((spec["drafted_tokens"], spec["accepted_tokens"], depth, spec["layer_passes"],
                                       tokens)):
                sums[i] += value
            drafted, accepted, depth_sum, passes, emitted = sums
            if drafted:
                self.acceptance.labels(self.replica, gate).set(accepted / drafted)
                self.draft_depth.labels(self.replica, gate).set(depth_sum / drafted)
            if emitted:
                self.passes_per_token.labels(self.replica, gate).set(passes / emitted)

    def record_batch(self, size: int) -> None:
        self.batch_size.labels(self.replica).observe(size)

    def record_cancelled(self, protocol: str) -> None:
        self.cancelled.labels(self.replica, protocol).inc()

    def record_error(self, protocol: str, status: int) -> None:
        self.errors.labels(self.replica, protocol, str(status)).inc()

    def watch_prefix_cache(self, stats: Callable[[], PrefixCacheStats]) -> None:
        """Export the replica's prefix cache, read at scrape time (its counters live under the cache's lock)."""
        self.registry.register(_PrefixCacheCollector(self.replica, stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ErrorCounter:
    """ASGI middleware: reports the status of every 4xx/5xx answer (and of an exception that becomes a 500)."""

    def __init__(self, app: Any, *, record: Callable[[str, int], None]) -> None:
        self.app, self.record = app, record

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        protocol, started = protocol_of(scope["path"]), False

        async def counted(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] >= 400:
                    self.record(protocol, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not started:  # Starlette's outermost handler answers it with a 500
                self.record(protocol, 500)
            raise


class _PrefixCacheCollector:
    """``greencode_prefix_cache_*``: lookups, hits, prompt and reused tokens, hit rate, bytes held, evictions."""

    def __init__(self, replica: str, stats: Callable[[], PrefixCacheStats]) -> None:
        self.replica, self.stats = replica, stats

    def collect(self) -> Iterator[Metric]:
        st = self.stats()
        counters = (("lookups", "prompts looked up in the prefix cache", st.lookups),
                    ("hits", "prompts that reused at least one cached token", st.hits),
                    ("prompt_tokens", "tokens of the prompts looked up", st.prompt_tokens),
                    ("reused_tokens", "prompt tokens whose K/V came from the cache", st.reused_tokens),
                    ("evictions", "entries dropped (least recently used) to stay within the budget", st.evictions),
                    ("rejected", "sequences not stored because they alone exceed the budget", st.rejected))
        gauges = (("hit_rate", "share of looked-up prompt tokens served from the cache", st.hit_rate),
                  ("bytes", "bytes of K/V held", st.bytes_held),
                  ("budget_bytes", "the cache's budget (prefix_cache_mb)", st.budget_bytes),
                  ("entries", "token sequences held", st.entries))
        for name, doc, value in counters:
            family = CounterMetricFamily(f"greencode_prefix_cache_{name}", doc, labels=["replica"])
            family.add_metric([self.replica], value)
            yield family
        for name, doc, value in gauges:
            family = GaugeMetricFamily(f"greencode_prefix_cache_{name}", doc, labels=["replica"])
            family.add_metric([self.replica], value)
            yield family
