"""The checks every request passes before the app reads its body: host, origin, key, content type, size.

With the documented setup (127.0.0.1, no key) any web page the developer opens can send
requests to the server. A browser sends a cross-site POST without asking first only when its
content type is ``text/plain``, a form type or absent; so a JSON content type is required (415
otherwise). A page served from a rebinding domain (``evil.example`` resolving to 127.0.0.1)
reaches the server as same-origin, but its ``Host`` header still names that domain: on a
loopback deployment only loopback host names are accepted (403), and an ``Origin`` header, when
a browser sends one, must name an allowed host too (403). The API key is compared before a
single body byte is read (401 with ``WWW-Authenticate``), and the body is counted as it arrives
(413 past ``max_body_bytes``, at once when ``Content-Length`` says so; 408 if it has not all
arrived within ``body_timeout_s``: a slow sender must not hold a connection). A body that is
not UTF-8, or whose JSON holds a lone surrogate (key or value), is refused naming the field
(the tokenizer and the reply encoder would fail on it later, possibly for a whole batch).
With ``require_json=False`` (an explicit opt-out, for a trusted front end) any POST body is read
as JSON whatever its content type, as Ollama does.

:class:`Guard` is a plain ASGI middleware (no BaseHTTPMiddleware: client disconnects must still
reach streaming responses). Refusals use the calling client's error shape (serve_app.formats).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from greencode.config import LOOPBACK_HOSTS
from serve_app import formats
from serve_app.limits import RequestLimits, Violation, body_too_large, check_content_length, invalid_unicode

ANY_HOST = "*"
BODY_METHODS = ("POST", "PUT", "PATCH")
OPEN_PATHS = ("/health", "/docs", "/openapi.json")  # no key needed: liveness, and the API's own description


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


def bearer_matches(header: str | None, api_key: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


class Guard:
    """ASGI middleware applying the checks above, in that order, before the wrapped app runs."""

    def __init__(self, app: Any, *, limits: RequestLimits, api_key: str | None = None,
                 open_paths: Sequence[str] = OPEN_PATHS, allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
                 allowed_origins: Sequence[str] = (), require_json: bool = True) -> None:
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key: an empty key would let every request in; leave it unset or set a real key")
        self.app, self.limits, self.api_key = app, limits, api_key
        self.open_paths, self.allowed_hosts = tuple(open_paths), tuple(allowed_hosts)
        self.allowed_origins = tuple(allowed_origins)
        self.require_json = require_json

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._check_headers(scope, headers)
        if refusal is None and scope["method"] in BODY_METHODS:
            body, refusal = await self._read_body(receive)
            if refusal is None:
                refusal = check_text(body)
                receive = _replay(body, receive)
            if refusal is None and not is_json_content_type(headers.get("content-type")):
                scope = _as_json(scope)  # require_json is off: read it as JSON anyway
        if refusal is not None:
            await self._refuse(scope, send, refusal)
            return
        await self.app(scope, receive, send)

    def _check_headers(self, scope: dict[str, Any], headers: dict[str, str]) -> Violation | None:
        if not host_allowed(headers.get("host"), self.allowed_hosts):
            return Violation(f"Host {headers.get('host')!r} is not a name of this server (allowed: "
                             f"{', '.join(self.allowed_hosts)}); set allowed_hosts to serve other names", None, 403)
        if not origin_allowed(headers.get("origin"), self.allowed_hosts, self.allowed_origins):
            return Violation(f"requests from the web page at {headers['origin']!r} are not allowed; "
                             "set allowed_origins to let a page use this server", None, 403)
        if self.api_key is not None and scope["path"] not in self.open_paths \
                and not bearer_matches(headers.get("authorization"), self.api_key):
            return Violation("missing or wrong API key: send the header 'Authorization: Bearer <key>'", None, 401)
        if scope["method"] in BODY_METHODS:
            if self.require_json and not is_json_content_type(headers.get("content-type")):
                return Violation(f"Content-Type {headers.get('content-type')!r} is not JSON: send "
                                 "'Content-Type: application/json'", None, 415)
            return check_content_length(headers.get("content-length"), self.limits)
        return None

    async def _read_body(self, receive: Any) -> tuple[bytes, Violation | None]:
        """The whole body, counted as it arrives and within ``body_timeout_s`` (a slow sender holds a connection)."""
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return b"", Violation(f"the request body did not arrive within {self.limits.body_timeout_s:g} s",
                                      None, 408)
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
        protocol = formats.protocol_of(scope["path"])
        status = refusal.status or formats.invalid_request_status(protocol)
        body = json.dumps(formats.error_body(protocol, refusal.message, status, refusal.param)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="greencode"'))
        if status == 413 or scope["method"] in BODY_METHODS:
            headers.append((b"connection", b"close"))  # the unread rest of the body is not worth reading
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def check_text(body: bytes) -> Violation | None:
    """The body is UTF-8 and its JSON (when it parses; the app reports JSON errors) has no lone surrogate.

    Surrogates encoded as UTF-8 bytes are let through the decoding so the JSON check names their field.
    """
    try:
        text = body.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as err:
        return Violation(f"request body is not valid UTF-8 (byte {err.start}: {body[err.start:err.start + 1]!r}): "
                         "send UTF-8 JSON", None)
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return invalid_unicode(data)


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
