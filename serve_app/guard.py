"""The checks every request passes before the app reads its body: host, origin, route, key, content type, size.

With the documented setup (127.0.0.1, no key) any web page the developer opens can send
requests to the server. A browser sends a cross-site POST without asking first only when its
content type is ``text/plain``, a form type or absent; so a JSON content type is required (415
otherwise). A page served from a rebinding domain (``evil.example`` resolving to 127.0.0.1)
reaches the server as same-origin, but its ``Host`` header still names that domain: on a
loopback deployment only loopback host names are accepted (403), and an ``Origin`` header, when
a browser sends one, must name an allowed host too (403). A path the app does not serve is a
404, and a method its route does not take a 405 (with ``Allow``), from the headers alone: no
request holds a connection slot for a body nothing will read (``POST /health``). The API key
names the request's tenant (``tenant_keys``; every key is compared, in constant time) and is
checked before a single body byte is read (401 with ``WWW-Authenticate``); the tenant travels in
the ASGI scope (:func:`tenant_of`). Bodies are read by at most ``max_body_readers`` requests at
once (503 with Retry-After beyond), counted as they arrive (413 past ``max_body_bytes``, at once
when ``Content-Length`` says so) and must keep arriving at ``body_min_rate_bytes_s`` after
``body_grace_s``, within ``body_timeout_s`` in all (408 otherwise). The body is then decoded
once, here, strictly: UTF-8 (no UTF-16/32, no BOM), nested at most ``MAX_JSON_DEPTH`` levels
(counted before the parser recurses), valid JSON with numbers of at most ``MAX_NUMBER_CHARS``
characters, no lone surrogate in any key or value, or it is refused with a 4xx naming what is
wrong; the app's own JSON parser only ever sees bodies that passed. With ``require_json=False``
(an explicit opt-out, for a trusted front end) any POST body is read as JSON whatever its
content type, as Ollama does. Scopes other than HTTP (websockets) are refused; lifespan events
pass.

:class:`Guard` is a plain ASGI middleware (no BaseHTTPMiddleware: client disconnects must still
reach streaming responses). Refusals use the calling client's error shape (serve_app.formats).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from starlette.routing import Match

from greencode.config import LOOPBACK_HOSTS, ServeConfig
from serve_app import formats
from serve_app.limits import (
    NumberTooLong,
    RequestLimits,
    Violation,
    body_too_large,
    check_content_length,
    check_json,
    json_depth,
    parse_float,
    parse_int,
)

ANY_HOST = "*"
BODY_METHODS = ("POST", "PUT", "PATCH")
OPEN_PATHS = ("/ready", "/docs", "/openapi.json")  # no key needed: readiness, the API's own description
MAX_JSON_DEPTH = 64  # objects/arrays nested in a body; no client request comes near
TENANT = "greencode.tenant"  # ASGI scope key of the request's tenant
ARRIVAL = "greencode.arrival"  # ASGI scope key: time.monotonic() when the replica first saw the request
ANONYMOUS = "anonymous"  # the one tenant of a server without keys


def route_path(scope: dict[str, Any]) -> str:
    """The path the app's routes see: ``path`` without the ``root_path`` a Serve ``route_prefix`` puts before it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


def arrival_of(scope: dict[str, Any]) -> float | None:
    """When the Guard first saw the request (``time.monotonic()``); the request deadline counts from it."""
    return scope.get(ARRIVAL)


def tenant_of(scope: dict[str, Any]) -> str:
    """The tenant the Guard identified for a request (every request of a server without keys: ANONYMOUS)."""
    return scope.get(TENANT, ANONYMOUS)


def host_name(value: str) -> str:
    """``Host`` header or URL netloc -> lowercase host name without port (IPv6 without brackets)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def host_allowed(host: str | None, allowed: Sequence[str]) -> bool:
    if ANY_HOST in allowed:
        return True
    return host is not None and host_name(host) in allowed


def origin_allowed(origin: str | None, allowed_hosts: Sequence[str], allowed_origins: Sequence[str] = ()) -> bool:
    """No ``Origin`` (IDE plugins, curl) passes; a browser's must be listed or be http(s) on an allowed host."""
    if origin is None or ANY_HOST in allowed_origins or origin in allowed_origins:
        return True
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and host_allowed(parts.netloc, allowed_hosts)


def is_json_content_type(value: str | None) -> bool:
    """``application/json`` or any ``application/*+json``, parameters (charset) ignored."""
    if value is None:
        return False
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def bearer_tenant(header: str | None, tenant_keys: dict[str, str]) -> str | None:
    """The tenant whose key the ``Authorization: Bearer`` header holds; every key is compared (constant time each)."""
    scheme, _, token = (header or "").partition(" ")
    sent = token.strip().encode()
    found = None
    for tenant, key in tenant_keys.items():
        if hmac.compare_digest(sent, key.encode()) and scheme.lower() == "bearer":
            found = tenant
    return found


def add_guard(app: Any, cfg: ServeConfig, open_paths: Sequence[str] = OPEN_PATHS) -> None:
    """Wrap the FastAPI ``app`` in the Guard with a deployment's settings (the model's app and /health's)."""
    app.add_middleware(Guard, limits=cfg.limits, tenant_keys=cfg.tenant_keys, allowed_hosts=cfg.allowed_hosts,
                       allowed_origins=cfg.allowed_origins, require_json=cfg.require_json, routes=app.routes,
                       open_paths=open_paths)


class Guard:
    """ASGI middleware applying the checks above, in that order, before the wrapped app runs."""

    def __init__(self, app: Any, *, limits: RequestLimits, tenant_keys: dict[str, str] | None = None,
                 open_paths: Sequence[str] = OPEN_PATHS, allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
                 allowed_origins: Sequence[str] = (), require_json: bool = True,
                 routes: Sequence[Any] | None = None) -> None:
        tenant_keys = dict(tenant_keys or {})
        if any(not key.strip() for key in tenant_keys.values()):
            raise ValueError("tenant_keys: an empty key would let every request in; leave it unset or set a real key")
        self.app, self.limits, self.tenant_keys = app, limits, tenant_keys
        self.open_paths, self.allowed_hosts = tuple(open_paths), tuple(allowed_hosts)
        self.allowed_origins = tuple(allowed_origins)
        self.require_json = require_json
        self.routes = RouteTable(routes) if routes is not None else None  # None: everything goes to the app
        self.readers = 0  # requests reading their body now

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # a websocket: closing before accepting answers the handshake with a 403
            await send({"type": "websocket.close", "code": 1008, "reason": "this server speaks HTTP only"})
            return
        scope = {**scope, ARRIVAL: time.monotonic()}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal, tenant = self._check_headers(scope, headers)
        if tenant is not None:
            scope = {**scope, TENANT: tenant}
        if refusal is None and scope["method"] in BODY_METHODS:
            if self.readers >= self.limits.max_body_readers:
                refusal = Violation(f"{self.readers} requests are sending their bodies already; retry shortly",
                                    None, 503)
            else:
                self.readers += 1
                try:
                    body, refusal = await self._read_body(receive)
                finally:
                    self.readers -= 1
                if refusal is None:
                    refusal = check_text(body)
                    receive = _replay(body, receive)
            if refusal is None and not is_json_content_type(headers.get("content-type")):
                scope = _as_json(scope)  # require_json is off: read it as JSON anyway
        if refusal is not None:
            await self._refuse(scope, send, refusal)
            return
        await self.app(scope, receive, send)

    def _check_headers(self, scope: dict[str, Any], headers: dict[str, str]) -> tuple[Violation | None, str | None]:
        """(refusal or None, the tenant its key names: None without keys or key)."""
        if not host_allowed(headers.get("host"), self.allowed_hosts):
            allowed = ", ".join(self.allowed_hosts)
            return Violation(f"Host {headers.get('host')!r} is not a name of this server (allowed: {allowed}); "
                             "set allowed_hosts to serve other names", None, 403), None
        if not origin_allowed(headers.get("origin"), self.allowed_hosts, self.allowed_origins):
            return Violation(f"requests from the web page at {headers['origin']!r} are not allowed; "
                             "set allowed_origins to let a page use this server", None, 403), None
        if (wrong_route := self._check_route(scope)) is not None:
            return wrong_route, None
        tenant = bearer_tenant(headers.get("authorization"), self.tenant_keys) if self.tenant_keys else None
        if self.tenant_keys and tenant is None and route_path(scope) not in self.open_paths:
            return Violation("missing or wrong API key: send the header 'Authorization: Bearer <key>'", None, 401), None
        if scope["method"] in BODY_METHODS:
            if self.require_json and not is_json_content_type(headers.get("content-type")):
                return Violation(f"Content-Type {headers.get('content-type')!r} is not JSON: send "
                                 "'Content-Type: application/json'", None, 415), tenant
            return check_content_length(headers.get("content-length"), self.limits), tenant
        return None, tenant

    def _check_route(self, scope: dict[str, Any]) -> Violation | None:
        """404 / 405 for what no route takes (GET-only paths refuse a POST before its body is read)."""
        if self.routes is None:
            return None
        methods = self.routes.methods(route_path(scope))
        if not methods:
            return Violation(f"no route {scope['path'][:200]!r}: see /docs for the routes", None, 404)
        if scope["method"] not in methods:
            return Violation(f"{scope['path']} does not take {scope['method'][:20]}; it takes "
                             f"{', '.join(sorted(methods))}", None, 405)
        return None

    async def _read_body(self, receive: Any) -> tuple[bytes, Violation | None]:
        """The whole body, counted as it arrives, at ``body_min_rate_bytes_s`` after ``body_grace_s`` and within
        ``body_timeout_s`` (a slow sender must not hold a connection)."""
        limits = self.limits
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            # the next bytes are due when the body so far would have arrived at the minimum rate after the grace
            due = min(start + limits.body_timeout_s, start + limits.body_grace_s + size / limits.body_min_rate_bytes_s)
            try:
                message = await asyncio.wait_for(receive(), max(0.0, due - loop.time()))
            except TimeoutError:
                return b"", Violation(f"the request body arrived too slowly ({size} bytes in "
                                      f"{loop.time() - start:.1f} s): send it at {limits.body_min_rate_bytes_s:g} "
                                      f"bytes/s or more, within {limits.body_timeout_s:g} s in all", None, 408)
            if message["type"] != "http.request":  # the client left while sending
                return b"", Violation("the client disconnected before sending its body", None, 400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if (too_large := body_too_large(size, self.limits)) is not None:
                return b"", too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    async def _refuse(self, scope: dict[str, Any], send: Any, refusal: Violation) -> None:
        protocol = formats.protocol_of(route_path(scope))
        status = refusal.status or formats.invalid_request_status(protocol)
        body = json.dumps(formats.error_body(protocol, refusal.message, status, refusal.param)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="greencode"'))
        if status == 405 and self.routes is not None:
            headers.append((b"allow", ", ".join(sorted(self.routes.methods(route_path(scope)))).encode()))
        if status == 503:
            headers.append((b"retry-after", b"1"))
        if status == 413 or scope["method"] in BODY_METHODS:
            headers.append((b"connection", b"close"))  # the unread rest of the body is not worth reading
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RouteTable:
    """The methods the app's routes take at a path, asked of the routes themselves (Starlette's ``matches``:
    FULL = path and method, PARTIAL = the path only); remembered for the paths that exist."""

    METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    def __init__(self, routes: Sequence[Any]) -> None:
        self.routes = list(routes)
        self.known: dict[str, frozenset[str]] = {}

    def methods(self, path: str) -> frozenset[str]:
        if path in self.known:
            return self.known[path]
        found = frozenset(m for m in self.METHODS if any(
            route.matches({"type": "http", "path": path, "root_path": "", "method": m})[0] == Match.FULL
            for route in self.routes))
        if found:  # unknown paths are not remembered: a client could send endless ones
            self.known[path] = found
        return found


def check_text(body: bytes) -> Violation | None:
    """The body is UTF-8 JSON, decoded strictly: no other encoding, no BOM, no lone surrogate, bounded depth.

    Surrogates encoded as UTF-8 bytes are let through the decoding so the JSON check names their field.
    An empty body is left to the app (its routes say which field is missing).
    """
    if not body:
        return None
    try:
        text = body.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as err:
        return Violation(f"request body is not valid UTF-8 (byte {err.start}: {body[err.start:err.start + 1]!r}): "
                         "send UTF-8 JSON", None)
    if (depth := json_depth(text)) > MAX_JSON_DEPTH:  # before the parser, which recurses once per level
        return Violation(f"request body nests JSON deeper than {MAX_JSON_DEPTH} levels ({depth})", None)
    try:  # a str: json never guesses another encoding here
        data = json.loads(text, parse_int=parse_int, parse_float=parse_float)
    except NumberTooLong as err:
        return Violation(f"request body holds {err}", None)
    except ValueError as err:
        return Violation(f"request body is not valid JSON ({str(err)[:200]}): send UTF-8 JSON", None)
    return check_json(data)


def _as_json(scope: dict[str, Any]) -> dict[str, Any]:
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
    return {**scope, "headers": headers + [(b"content-type", b"application/json")]}


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that hands the app the buffered body, then passes on later messages (disconnects)."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
