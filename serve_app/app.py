"""GreenCode on Ray Serve: one deployment speaking the wire formats IDE clients already use.

    greencode serve --model runs/demo/lite --policy runs/demo/policy/exit_policy.pt --port 8000   (workflows/serve.py)
    serve run serve_app/config.yaml                                                                (build_app)

Routes (see docs/serving.md): TGI ``/generate``,
``/generate_stream`` (SSE) and ``/`` (text_generation client); Ollama / llm-vscode
``/api/generate`` (+ trailing slash, NDJSON when streaming), ``/api/show``,
``/api/tags``; OpenAI ``/v1/completions`` (+ SSE); ``/ready``; ``/metrics``. ``/health`` is an
application of its own beside this one (probe.py), so it answers however busy this replica is.

A request passes, in order: the Guard (guard.py: Host, Origin, route and method, API key (which
names the tenant) before the body, JSON content type, body size and rate, strict UTF-8 JSON),
the request schema (schemas.py),
the request limits (limits.py), admission to its lane (admission.py: streams and
non-streaming batches are admitted separately; 429 with Retry-After when the lane's queue is
full, 503 when no slot frees before the request timeout, counted from the Guard's first sight of the
request), tokenization (on its own thread;
fill-in-the-middle requests get the served model's own FIM layout, prompts.py), then
generation. Non-streaming requests go through Serve batching: requests that arrive
together and share gate + sampling settings and cache partition run as one batch, each row
still exiting (and failing) on its own; batches run side by side. Each replica keeps a prefix
cache (``prefix_cache_mb``) partitioned by tenant and ``cache_salt``: a request reuses the
full-depth keys/values of the longest prompt prefix an earlier request of its partition stored.
All model work runs one step at a time on one worker thread per replica, the tenants taking
turns (fair.py), so a stream's tokens interleave with a batch's steps and the event loop keeps
accepting requests; a client that disconnects cancels
its request, which stops a stream after the current token and a batch once all its rows are
gone. Response shapes are in formats.py, errors in errors.py, metrics (and the error counter)
in metrics.py.
"""


import asyncio
import copy
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve
from ray.serve.deployment import Application
from ray.serve.exceptions import RayServeException

from greencode.config import ConfigError, GateConfig, GenerationConfig, ServeConfig, validate
from greencode.gates import build_gate
from greencode.generate import Finished, GenerationResult, TokenEvent
from greencode.modeling import EarlyExitModel, load_model
from greencode.policy import ExitPolicy
from greencode.prefix_cache import Partition, PrefixCache
from greencode.speculative import LosslessGenerator
from serve_app import errors, formats
from serve_app.admission import Admission, Deadline, TimedOut
from serve_app.errors import ERRORS, ApiError, GenerationFailed
from serve_app.fair import FairWorker
from serve_app.formats import OLLAMA, OPENAI, TGI, Completion
from serve_app.guard import add_guard, arrival_of, tenant_of
from serve_app.limits import check_request
from serve_app.metrics import ErrorCounter, ServeMetrics
from serve_app.prompts import PromptBuilder
from serve_app.schemas import (
    Ask,
    CompletionRequest,
    OllamaRequest,
    OllamaShowRequest,
    TGIRequest,
)

log = logging.getLogger("greencode.serve")

ModelLoader = Callable[[ServeConfig], EarlyExitModel]
# Non-streaming batches run side by side, taking turns step by step on the model thread (serve_app/fair.py):
# a request arriving while a long batch runs starts between two of its steps instead of after its end. The
# lane's admission (admission.max_active) bounds the requests; this bound only has to stay above it.
CONCURRENT_BATCHES = 256

api = FastAPI(
    title="GreenCode",
    version="0.1.0",
    description="Energy-aware early-exit code completion. Speaks TGI, Ollama/llm-vscode and OpenAI completions; "
                "every response carries `greencode` details (layers per token, time, energy or null).",
)
errors.install(api)


# --------------------------------------------------------------------------- jobs


@dataclass(eq=False)
class Job:
    """One sequence to generate: validated gate and sampling settings, then (tokenizer thread) its prompt ids.

    ``batch_key`` is computed when the job is built, in its own request: nothing about one job can fail
    later while the batch it shares with others is being grouped."""

    ask: Ask
    gate: GateConfig
    generation: GenerationConfig
    partition: Partition  # the prefix cache entries it may match and adds to: its tenant's, with its salt
    cache_prompt: bool = True  # read and write the replica's prefix cache
    arrived: float | None = None  # time.monotonic() when the replica first saw its request: the deadline's start
    batch_key: str = ""  # jobs with equal keys can share one generation batch
    prompt_ids: list[int] = field(default_factory=list)  # filled on the tokenizer thread
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.batch_key = "|".join((self.gate.model_dump_json(), self.generation.model_dump_json(),
                                   str(self.cache_prompt), self.partition.digest.hex()))


def _label(gate: str, job: Job) -> str:
    """The metrics' gate label: lossless requests count apart (their layers include the verification)."""
    return f"lossless-{gate}" if job.generation.lossless else gate


def load_served_model(cfg: ServeConfig) -> EarlyExitModel:
    """The default model loader: ``cfg.model`` with ``cfg.exits`` (tests inject a tiny model instead)."""
    return load_model(cfg.model, cfg.exits)


def _replica_name() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # outside a replica (direct construction)
        return str(os.getpid())


class SlotStream(StreamingResponse):
    """A streaming response that gives its admission slot back however it ends (even if never iterated)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], Any], media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.release()


# --------------------------------------------------------------------------- the deployment


@serve.deployment
@serve.ingress(api)
class GreenCodeServer:
    """Loads the model (+ exit policy) once per replica and serves every protocol from it."""

    def __init__(self, cfg: dict[str, Any], model_loader: ModelLoader | None = None) -> None:
        self.cfg = validate(ServeConfig, cfg, source="serve config")
        torch.set_num_threads(self.cfg.torch_threads or max(1, int(self.cfg.num_cpus)))
        self.lm = (model_loader or load_served_model)(self.cfg)
        self.policy = ExitPolicy.load_for(self.cfg.policy_path, self.lm) if self.cfg.policy_path else None
        self.default_gate = self.cfg.default_gate
        if self.default_gate == "policy" and self.policy is None:
            self.default_gate = "full"
        budget, tenants = int(self.cfg.prefix_cache_mb * 2**20), max(1, len(self.cfg.tenant_keys))
        self.prefix_cache = PrefixCache(
            budget, self.lm.fingerprint, max_entries=self.cfg.prefix_cache_entries,
            tenant_budget_bytes=budget // tenants, tenant_max_entries=max(1, self.cfg.prefix_cache_entries // tenants),
        ) if budget else None
        # plain and lossless requests alike (generation.lossless picks per request)
        self.generator = LosslessGenerator(self.lm, prefix_cache=self.prefix_cache)
        # requests that say cache_prompt: false (benchmarks, privacy) neither read nor write the cache
        self.uncached = LosslessGenerator(self.lm, self.generator.meter) if self.prefix_cache else self.generator
        self.model_name = Path(self.cfg.model.name).name
        positions = getattr(self.lm.model.config, "max_position_embeddings", None) or math.inf
        self.context_limit = int(min(self.cfg.max_context_tokens, positions))
        # prompts are tokenized on their own thread, with their own copy of the tokenizer: the generation
        # thread decodes with the model's at the same time
        self.prompts = PromptBuilder(copy.deepcopy(self.lm.tokenizer), self.cfg.fim_order)
        self.fim = self.prompts.fim
        self.worker = FairWorker("greencode-generate")  # all model work; tenants take turns step by step
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="greencode-tokenize")
        self.streams, self.batches = Admission(self.cfg.admission), Admission(self.cfg.admission)
        self.stats = ServeMetrics(_replica_name(), self.lm.num_layers)
        if self.prefix_cache is not None:
            self.stats.watch_prefix_cache(self.prefix_cache.stats)
        self._generate_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        log.info("serving %s: %d layers, exit points %s, default gate %s, policy %s, energy meter %s, device %s, "
                 "prefix cache %s MiB, FIM %s", self.model_name, self.lm.num_layers, self.lm.exit_points,
                 self.default_gate, self.cfg.policy_path, self.generator.meter.source, self.lm.device,
                 self.cfg.prefix_cache_mb, f"{self.fim.family} ({self.cfg.fim_order})" if self.fim else "none")

    def __serve_build_asgi_app__(self) -> Any:
        """Serve (2.60) calls this after ``__init__`` to get the replica's ASGI app: Serve's copy of ``api``,
        wrapped in the Guard and the error counter, which need this replica's config and metrics."""
        app = self.app  # set by serve.ingress's wrapper before this is called
        add_guard(app, self.cfg)
        app.add_middleware(ErrorCounter, record=self.stats.record_error)  # outermost: counts the Guard's refusals
        return app

    # ------------------------------------------------------------------ request -> job

    def _gate(self, fields: dict[str, Any]) -> GateConfig:
        mode = fields["mode"] or self.default_gate
        if mode == "policy" and self.policy is None:
            raise ApiError("gate 'policy' needs an exit policy and this server runs without one "
                           "(start it with --policy FILE); use gate 'full', 'fixed' or 'confidence'", "gate")

        def pick(key: str, default: Any) -> Any:
            return fields[key] if fields[key] is not None else default

        defaults = self.cfg.gate
        try:
            gate = validate(GateConfig, {
                "mode": mode,
                "exit_layer": pick("exit_layer", defaults.exit_layer),
                "threshold": pick("threshold", defaults.threshold),
                "temperature": pick("temperature", defaults.temperature),
                "confidence": pick("confidence", defaults.confidence),
                "policy_path": self.cfg.policy_path,
            })
        except ConfigError as err:
            raise ApiError(str(err), "gate") from None
        if gate.exit_layer is not None and gate.exit_layer > self.lm.num_layers:
            raise ApiError(f"exit_layer {gate.exit_layer} exceeds the model's {self.lm.num_layers} layers",
                           "exit_layer")
        return gate

    def _limits(self, asks: list[Ask]) -> None:
        """The request limits, in the fields the client sent (``parameters.stop``...), before any model work."""
        first, where = asks[0], asks[0].fields
        violation = check_request(
            self.cfg.limits, prompts=[a.prompt for a in asks], prompt_field=where.prompt, suffix=first.suffix,
            stop=first.stop, stop_field=where.knob("stop"), max_new_tokens=first.max_new_tokens,
            max_new_tokens_field=where.knob(where.max_new_tokens), sequences=len(asks),
            sequences_field=where.sequences, cache_salt=first.cache_salt, cache_salt_field=where.knob("cache_salt"))
        if violation is not None:
            raise ApiError(violation.message, violation.param, violation.status)

    def _job(self, ask: Ask, request: Request) -> Job:
        gate = self._gate(ask.gate)
        asked = {"max_new_tokens": ask.max_new_tokens, "temperature": ask.temperature, "top_p": ask.top_p,
                 "stop": ask.stop or None, "seed": ask.seed, "lossless": ask.lossless}
        try:
            generation = validate(GenerationConfig, {**self.cfg.generation.model_dump(),
                                                     **{k: v for k, v in asked.items() if v is not None}})
        except ConfigError as err:
            raise ApiError(str(err), "lossless" if "lossless" in str(err) else "max_new_tokens") from None
        return Job(ask, gate, generation, Partition(tenant_of(request.scope), ask.cache_salt),
                   cache_prompt=ask.cache_prompt is not False, arrived=arrival_of(request.scope))

    def _jobs(self, protocol: str, asks: list[Ask], request: Request) -> list[Job]:
        """Validated jobs of a request, nothing tokenized yet (a refusal here costs no model work)."""
        try:
            self._limits(asks)
            return [self._job(a, request) for a in asks]
        except ApiError:
            self.stats.record_request(protocol, "rejected")
            raise

    def _encode(self, jobs: list[Job]) -> None:
        """Runs on the tokenizer thread: each job's prompt ids, checked against the context limit."""
        for job in jobs:
            ids = self.prompts.ids(job.ask)  # FIM in the model's own layout, or an ApiError naming the field
            if not ids:
                raise ApiError("the prompt is empty", job.ask.fields.prompt)
            needed = len(ids) + job.generation.max_new_tokens
            if needed > self.context_limit:
                raise ApiError(f"the prompt is {len(ids)} tokens; with {job.generation.max_new_tokens} new tokens "
                               f"that exceeds the context limit of {self.context_limit} tokens: shorten the prompt "
                               "or ask for fewer tokens", job.ask.fields.prompt)
            job.prompt_ids = ids

    async def _tokenize(self, protocol: str, jobs: list[Job]) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.tokenizing, self._encode, jobs)
        except ApiError:
            self.stats.record_request(protocol, "rejected")
            raise

    # ------------------------------------------------------------------ generation

    def _completion(self, job: Job, result: GenerationResult, gate: str, batch_size: int) -> Completion:
        tok = self.lm.tokenizer
        text = job.ask.prompt + result.text if job.ask.include_prompt else result.text
        return Completion(result=result, text=text, token_texts=[tok.decode([t]) for t in result.token_ids],
                          gate=gate, ignored=job.ask.ignored, batch_size=batch_size, seed=job.generation.seed)

    async def _step(self, tenant: str, steps: Iterator[Any], deadline: Deadline | None = None) -> Any:
        """One generation step on the generation thread: streams and batches take turns step by step, and
        tenants take turns (serve_app/fair.py). With a deadline, waiting for the step (behind the others' steps)
        ends at it with TimedOut."""
        step = asyncio.wrap_future(self.worker.submit(tenant, next, steps))
        if deadline is None:
            return await step
        try:
            return await asyncio.wait_for(step, deadline.remaining())
        except TimeoutError:
            raise self._timed_out() from None

    async def _generate_group(self, group: list[Job]) -> list[Completion | None]:
        """One batch of jobs sharing settings; stops if every client left. A failed row fails only its job."""
        gate = build_gate(group[0].gate, self.policy)
        steps = self._generator(group[0]).stream([j.prompt_ids for j in group], gate, group[0].generation)
        tenant = group[0].partition.tenant
        try:
            while not isinstance(item := await self._step(tenant, steps), Finished):
                if all(j.cancelled for j in group):
                    log.info("all %d clients of a batch disconnected: generation stopped", len(group))
                    return [None] * len(group)
        finally:
            self.worker.submit(tenant, steps.close)  # after any step of it still running
        self.stats.record_batch(len(group))
        label = _label(gate.name, group[0])
        for r in item.results:
            self.stats.record_tokens(label, r.layers_per_token)
            self.stats.record_energy(label, r.energy_j)
            self._record_rounds(label, r)
        return [self._completion(j, r, gate.describe(), len(group)) for j, r in zip(group, item.results)]

    def _generator(self, job: Job) -> LosslessGenerator:
        """The generator of a job: over its own partition of the prefix cache, or over none."""
        if not job.cache_prompt or self.prefix_cache is None:
            return self.uncached
        return self.generator.scoped(self.prefix_cache.scoped(job.partition))

    def _record_rounds(self, label: str, result: GenerationResult) -> None:
        spec = getattr(result, "speculative", None)
        if spec is not None:
            self.stats.record_speculative(label, spec, len(result.token_ids))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01, max_concurrent_batches=CONCURRENT_BATCHES)
    async def _generate_batch(self, jobs: list[Job]) -> list[Completion | BaseException | None]:
        """Serve batching: requests arriving together, grouped by equal gate + sampling settings + cache partition.
        A group that fails answers its own requests with the error (Serve hands each caller its item); the
        other groups' requests are unaffected."""
        groups: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.batch_key, []).append(i)
        done = await asyncio.gather(*(self._generate_group([jobs[i] for i in idx]) for idx in groups.values()),
                                    return_exceptions=True)
        out: list[Completion | BaseException | None] = [None] * len(jobs)
        for indices, completions in zip(groups.values(), done):
            for n, i in enumerate(indices):
                out[i] = completions if isinstance(completions, BaseException) else completions[n]
        return out

    async def _complete(self, protocol: str, jobs: list[Job]) -> list[Completion]:
        """A non-streaming request: admitted to the batch lane, tokenized, generated within its deadline."""
        start = time.perf_counter()
        async with self.batches.slot(jobs[0].arrived, jobs[0].partition.tenant) as deadline:
            await self._tokenize(protocol, jobs)
            try:
                completions = await asyncio.wait_for(asyncio.gather(*(self._generate_batch(j) for j in jobs)),
                                                     deadline.remaining())
            except TimeoutError:
                for j in jobs:
                    j.cancelled = True
                self.stats.record_request(protocol, "error")
                raise self._timed_out() from None
            except asyncio.CancelledError:
                for j in jobs:
                    j.cancelled = True
                self.stats.record_cancelled(protocol)
                raise
        for c in completions:
            if isinstance(c, BaseException):  # its batch group failed: this request fails, its batch-mates do not
                self.stats.record_request(protocol, "error")
                raise c
        failed = [c.result.error for c in completions if c.result.error is not None]
        if failed:
            self.stats.record_request(protocol, "error")
            raise GenerationFailed(failed[0])
        self.stats.record_request(protocol, "ok", time.perf_counter() - start)
        return completions

    def _timed_out(self) -> TimedOut:
        limit = self.cfg.admission.request_timeout_s
        return TimedOut(f"the request did not finish within the request timeout of {limit:g} s; retry later "
                        "or ask for fewer tokens", self.batches.retry_after_s())

    async def _open_stream(self, protocol: str, job: Job, chunks: Callable[[Job, Deadline], AsyncIterator[str]],
                           media_type: str) -> StreamingResponse:
        """Admit a stream to its lane (a refusal is still an HTTP 429/503), tokenize, and hand the slot to the
        response, which gives it back when the stream ends."""
        slot = AsyncExitStack()
        deadline = await slot.enter_async_context(self.streams.slot(job.arrived, job.partition.tenant))
        try:
            await self._tokenize(protocol, [job])
        except BaseException:
            await slot.aclose()
            raise
        return SlotStream(self._tracked(protocol, chunks(job, deadline)), slot.aclose, media_type)

    async def _stream(self, job: Job, deadline: Deadline) -> AsyncIterator[tuple[TokenEvent, Completion | None]]:
        """Token events of one job as they are generated; the last one (it has a finish_reason) comes with
        the job's Completion, taken from the generator's Finished event. Stops when the consumer does;
        raises GenerationFailed when the row fails and TimedOut past the deadline."""
        gate = build_gate(job.gate, self.policy)
        steps = self._generator(job).stream([job.prompt_ids], gate, job.generation)
        tenant = job.partition.tenant
        last: TokenEvent | None = None
        label = _label(gate.name, job)
        try:
            # past the deadline the wait for the next step ends; once the last token is out, Finished is awaited
            while not isinstance(item := await self._step(tenant, steps, deadline if last is None else None),
                                 Finished):
                for event in item:
                    if event.error is not None:
                        raise GenerationFailed(event.error)
                    self.stats.record_tokens(label, [event.layers])
                    if event.finish_reason is None:
                        yield event, None
                    else:
                        last = event
            [result] = item.results
            self.stats.record_energy(label, result.energy_j)
            self._record_rounds(label, result)
            yield last, self._completion(job, result, gate.describe(), 1)
        finally:
            self.worker.submit(tenant, steps.close)  # after any step of it still running

    async def _tracked(self, protocol: str, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """Stream body with request metrics; a disconnect cancels it (and the generation under it); a failure
        after the 200 ends it with the protocol's error event."""
        start = time.perf_counter()
        try:
            async for chunk in chunks:
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            self.stats.record_cancelled(protocol)
            log.info("%s stream cancelled by the client", protocol)
            raise
        except (GenerationFailed, TimedOut) as err:
            log.error("%s stream failed: %s", protocol, err.message)
            status = err.status if isinstance(err, TimedOut) else formats.failure_status(protocol)
            prefix = "" if isinstance(err, TimedOut) else "generation failed: "
            self.stats.record_request(protocol, "error")
            yield formats.stream_error(protocol, prefix + err.message, status)
            return
        except Exception:  # a server fault: the client still gets an error event, not a cut connection
            request_id = errors.new_request_id()
            log.exception("%s stream failed (request id %s)", protocol, request_id)
            self.stats.record_request(protocol, "error")
            yield formats.stream_error(protocol, errors.internal_message(request_id), 500)
            return
        self.stats.record_request(protocol, "ok", time.perf_counter() - start)

    # ------------------------------------------------------------------ TGI

    async def _tgi_events(self, job: Job, deadline: Deadline) -> AsyncIterator[str]:
        index = 0
        async for event, final in self._stream(job, deadline):
            yield formats.tgi_stream_event(index, event, final)
            index += 1

    @api.post("/generate", responses=ERRORS, tags=["tgi"],
              summary="TGI generate (llm-vscode 'tgi'/'huggingface' backends)")
    async def tgi_generate(self, body: TGIRequest, request: Request) -> dict[str, Any]:
        [completion] = await self._complete(TGI, self._jobs(TGI, [body.to_ask()], request))
        return formats.tgi_response(completion)

    @api.post("/generate_stream", responses=ERRORS, tags=["tgi"], summary="TGI streaming generate (SSE)")
    async def tgi_generate_stream(self, body: TGIRequest, request: Request) -> StreamingResponse:
        [job] = self._jobs(TGI, [body.to_ask()], request)
        return await self._open_stream(TGI, job, self._tgi_events, "text/event-stream")

    @api.post("/", responses=ERRORS, tags=["tgi"],
              summary="TGI compat route of the text_generation client: a list, or SSE when stream")
    async def tgi_compat(self, body: TGIRequest, request: Request) -> Any:
        [job] = self._jobs(TGI, [body.to_ask()], request)
        if body.stream:
            return await self._open_stream(TGI, job, self._tgi_events, "text/event-stream")
        [completion] = await self._complete(TGI, [job])
        return [formats.tgi_response(completion)]

    # ------------------------------------------------------------------ Ollama / llm-vscode

    async def _ollama_lines(self, job: Job, deadline: Deadline) -> AsyncIterator[str]:
        start = time.perf_counter()
        async for event, final in self._stream(job, deadline):
            if event.text:
                yield formats.ollama_chunk(self.model_name, event.text)
            if final is not None:
                done = formats.ollama_final(self.model_name, final, time.perf_counter() - start)
                yield formats.json.dumps(done) + "\n"

    @api.post("/api/generate", responses=ERRORS, tags=["ollama"],
              summary="Ollama / llm-vscode generate (NDJSON when stream)")
    @api.post("/api/generate/", responses=ERRORS, include_in_schema=False)
    async def ollama_generate(self, body: OllamaRequest, request: Request) -> Any:
        ask = body.to_ask()
        if not ask.prompt and not ask.suffix:
            return formats.ollama_loaded(self.model_name)
        [job] = self._jobs(OLLAMA, [ask], request)
        if body.streams():
            return await self._open_stream(OLLAMA, job, self._ollama_lines, "application/x-ndjson")
        start = time.perf_counter()
        [completion] = await self._complete(OLLAMA, [job])
        return formats.ollama_final(self.model_name, completion, time.perf_counter() - start, text=completion.text)

    @api.post("/api/show", responses=ERRORS, tags=["ollama"], summary="Ollama model card (Continue probes it)")
    async def ollama_show(self, body: OllamaShowRequest) -> dict[str, Any]:
        arch = getattr(self.lm.model.config, "model_type", "unknown")
        return {
            "modelfile": "", "parameters": "", "template": formats.ollama_template(self.fim, self.cfg.fim_order),
            "details": {"format": "safetensors", "family": arch, "families": [arch],
                        "parameter_size": f"{sum(p.numel() for p in self.lm.model.parameters()) / 1e6:.0f}M",
                        "quantization_level": str(self.lm.model.dtype).removeprefix("torch.")},
            "model_info": {"general.architecture": arch, f"{arch}.context_length": self.context_limit,
                           f"{arch}.block_count": self.lm.num_layers},
            "capabilities": ["completion"] + (["insert"] if self.fim else []),
        }

    @api.get("/api/tags", responses=ERRORS, tags=["ollama"], summary="Ollama model list (the one served model)")
    async def ollama_tags(self) -> dict[str, Any]:
        return {"models": [{"name": self.model_name, "model": self.model_name, "modified_at": formats.now_iso(),
                            "size": 0, "digest": self.lm.fingerprint, "details": {}}]}

    # ------------------------------------------------------------------ OpenAI

    async def _openai_chunks(self, job: Job, deadline: Deadline) -> AsyncIterator[str]:
        cid, created = formats.openai_id(), int(time.time())
        async for event, final in self._stream(job, deadline):
            yield formats.openai_chunk(cid, created, self.model_name, event.text, event.finish_reason, final)
        yield formats.OPENAI_DONE

    @api.post("/v1/completions", responses=ERRORS, tags=["openai"],
              summary="OpenAI legacy completions (SSE when stream)")
    async def openai_completions(self, body: CompletionRequest, request: Request) -> Any:
        asks = body.to_asks()
        if body.stream and len(asks) > 1:
            raise ApiError("stream supports one prompt with n=1", "n")
        jobs = self._jobs(OPENAI, asks, request)
        if body.stream:
            return await self._open_stream(OPENAI, jobs[0], self._openai_chunks, "text/event-stream")
        return formats.openai_response(self.model_name, await self._complete(OPENAI, jobs))

    @api.get("/v1/models", responses=ERRORS, tags=["openai"], summary="OpenAI model list (the one served model)")
    async def openai_models(self) -> dict[str, Any]:
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "greencode"}
        return {"object": "list", "data": [model]}

    # ------------------------------------------------------------------ operations

    def describe(self) -> dict[str, Any]:
        """What this replica serves (no paths): the /health application asks for it once (serve_app/probe.py)."""
        return {"model": self.model_name, "num_layers": self.lm.num_layers,
                "exit_points": self.lm.exit_points, "default_gate": self.default_gate,
                "policy_loaded": self.policy is not None, "energy_meter": self.generator.meter.source,
                "context_limit": self.context_limit, "max_batch_size": self.cfg.max_batch_size,
                "prefix_cache_mb": self.cfg.prefix_cache_mb, "fim": self.fim.family if self.fim else None}

    def check_health(self) -> None:
        """Serve's own replica health check: a replica whose generation thread is gone is replaced."""
        if not self.worker.alive:
            raise RuntimeError("the generation thread is not running")

    @api.get("/ready", tags=["ops"], summary="readiness: the model is loaded and a request of either kind would be "
                                             "admitted now (503 with Retry-After when a lane is full; no API key)")
    async def ready(self) -> JSONResponse:
        lanes = {"streams": self.streams, "batches": self.batches}
        full = {name: lane for name, lane in lanes.items() if not lane.accepting}
        body = {"status": "busy" if full else "ready", "model": self.model_name,
                **{name: "full" if name in full else "accepting" for name in lanes}}
        if not full:
            return JSONResponse(body)
        retry = min(lane.retry_after_s() for lane in full.values())
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(retry)})

    @api.get("/metrics", responses=ERRORS, tags=["ops"], summary="Prometheus metrics of the replica that answers",
             response_class=PlainTextResponse)
    async def prometheus_metrics(self) -> PlainTextResponse:
        return PlainTextResponse(self.stats.render(), media_type="text/plain; version=0.0.4")


# --------------------------------------------------------------------------- builders


def build_app_with_loader(cfg: ServeConfig | dict[str, Any] | None,
                          model_loader: ModelLoader | None = None) -> Application:
    """Typed builder: the deployment sized by ``cfg``; ``model_loader`` (picklable) replaces load_model."""
    cfg = cfg if isinstance(cfg, ServeConfig) else validate(ServeConfig, cfg or {}, source="serve config")
    return GreenCodeServer.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=cfg.ongoing_requests,
        ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    ).bind(cfg.model_dump(mode="json"), model_loader)


def build_app(args: ServeConfig | dict[str, Any]) -> Application:
    """`serve run` builder (Serve passes the config file's ``args`` mapping as the one argument)."""
    return build_app_with_loader(args)
