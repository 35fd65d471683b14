"""``GET /health``: liveness from a lightweight deployment of its own, never queued behind the model's work.

Measured on the 2-core CPU box (issue 22; docs/serving.md): during a 300-request burst,
``/health`` served by the model replica answered up to 0.8 s late with Serve's cap of 104 ongoing
requests per replica and 1.2-1.6 s late with 4000 (a tiny model slowed to a CPU replica's step
time), 2.1 s and past 10 s in the issue's runs on the real model, while Serve's proxy answered
its own ``/-/healthz`` within 0.5 s throughout: the time goes to the model replica's event loop,
which reads, checks and refuses every request of the burst, and, with the cap reached, to Serve's
router, which holds the probe behind the queued requests. No route of the model replica can be
answered sooner than that loop gets to it.

So ``/health`` is its own Serve application (``route_prefix: /health``): one replica with no
model, no lanes, no CPU reserved, with its own router, behind the same Guard (Host, Origin,
route and method; no key needed). An answer says the HTTP path is alive: proxy, Serve routing and
a replica process. What is loaded (model, layers, exit points, default gate, FIM family...) comes
from the model deployment (``describe``) and is cached, asked again in the background every
``DESCRIBE_AGAIN_S``; until the model first answers, ``model`` is null. Whether the model
replica can take a request now is ``GET /ready`` on the model app (readiness, answered by that
replica: a replica too busy to answer it in time is, in effect, not ready); a wedged model
replica is replaced by Serve itself (``check_health``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.deployment import Application

from greencode.config import ServeConfig, validate
from serve_app.guard import add_guard

log = logging.getLogger("greencode.serve")

HEALTH_APP = "greencode-health"  # the probe's Serve application, at route_prefix HEALTH_PREFIX
HEALTH_PREFIX = "/health"
MODEL_APP = "greencode"  # the model's Serve application, whose ingress answers ``describe``
DESCRIBE_WAIT_S = 0.5  # how long the first /health waits for the model's description before answering without it
DESCRIBE_AGAIN_S = 10.0  # a description older than this is asked again (a redeployed model), answered from cache


class AtRoot:
    """ASGI middleware: Serve hands the app ``/health`` with root_path ``/health``, which Starlette would route as
    "" and answer with a redirect to ``/health/``; it goes to the "/" route instead."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("root_path") and scope["path"] == scope["root_path"]:
            scope = {**scope, "path": scope["path"] + "/", "raw_path": scope["path"].encode() + b"/"}
        await self.app(scope, receive, send)


probe_api = FastAPI(title="GreenCode health", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(probe_api)
class HealthProbe:
    """Answers ``/health`` without the model: liveness, and the model's description once it has it."""

    def __init__(self, cfg: dict[str, Any], model_app: str = MODEL_APP) -> None:
        self.cfg = validate(ServeConfig, cfg, source="serve config")
        self.model_app = model_app
        self.description: dict[str, Any] | None = None
        self.described_at = 0.0
        self._asking: asyncio.Future[Any] | None = None  # the model's answer, while awaited
        self._refresh: asyncio.Future[None] | None = None  # a background re-ask of a description that has aged

    def __serve_build_asgi_app__(self) -> Any:
        """The probe's app behind the same Guard as the model's (its one route is open: no key)."""
        self.app.add_middleware(AtRoot)  # inside the Guard, which reports the path the client sent
        add_guard(self.app, self.cfg, open_paths=("/",))
        return self.app

    async def _describe(self) -> None:
        """Ask the model deployment what it serves (one question at a time); cached once answered."""
        try:
            if self._asking is None or self._asking.done():
                handle = serve.get_deployment_handle("GreenCodeServer", app_name=self.model_app)
                self._asking = asyncio.ensure_future(handle.describe.remote())
            self.description = await asyncio.wait_for(asyncio.shield(self._asking), DESCRIBE_WAIT_S)
            self.described_at = time.monotonic()
        except Exception as err:  # noqa: BLE001 (not deployed yet, busy, restarting: answered without it)
            log.info("health: the model's description is not available yet (%s: %s)", type(err).__name__, err)

    def _aged(self) -> bool:
        return time.monotonic() - self.described_at > DESCRIBE_AGAIN_S

    @probe_api.get("/", tags=["ops"], summary="liveness + what is loaded (no API key needed; no paths)")
    async def health(self) -> dict[str, Any]:
        if self.description is None:
            await self._describe()
        elif self._aged() and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.ensure_future(self._describe())  # this answer comes from the cache meanwhile
        return {"status": "ok", **(self.description or {"model": None})}


def build_probe(args: ServeConfig | dict[str, Any], model_app: str = MODEL_APP) -> Application:
    """`serve run` builder of the health application (the same ``args`` as the model's)."""
    cfg = args if isinstance(args, ServeConfig) else validate(ServeConfig, args or {}, source="serve config")
    return HealthProbe.bind(cfg.model_dump(mode="json"), model_app)


def serve_apps(cfg: ServeConfig, model_app: Application, blocking: bool = False) -> list[Any]:
    """Deploy the model application at ``/`` and the health application beside it in one call: Serve starts
    both replicas at once (measured: 8.3 s against 12.7 s one after the other, tiny model, 2-core CPU);
    returns their DeploymentHandles, the model's first."""
    return serve.run_many([serve.RunTarget(model_app, name=MODEL_APP, route_prefix="/"),
                           serve.RunTarget(build_probe(cfg), name=HEALTH_APP, route_prefix=HEALTH_PREFIX)],
                          blocking=blocking)
