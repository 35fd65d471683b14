"""Cross-site requests to a loopback server without a key (issue 13): JSON content type, Host and Origin.

With the documented setup (127.0.0.1, no key) a web page the developer opens can POST to the
server; a browser does so without asking first only for text/plain, form or absent content
types. A DNS-rebinding page reaches it as same-origin but with its own name in ``Host``.
Unit tests of serve_app/guard.py, then the same over real HTTP.
"""

import asyncio
import json

import httpx
import pytest

from greencode.config import RequestLimits
from serve_app.guard import Guard, host_allowed, host_name, is_json_content_type, origin_allowed
from serve_app.metrics import ErrorCounter
from serve_helpers import PROTOCOL_IDS, PROTOCOLS, TGI, assert_error

SERVE_APP = "abuse"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


# --------------------------------------------------------------------------- serve_app/guard.py (no Ray)


@pytest.mark.parametrize("value, name", [
    ("127.0.0.1:8000", "127.0.0.1"), ("LOCALHOST", "localhost"), ("[::1]:8000", "::1"), ("::1", "::1"),
    ("evil.example:80", "evil.example"), ("localhost.evil.example", "localhost.evil.example"),
])
def test_host_names(value, name):
    assert host_name(value) == name


def test_hosts_and_origins():
    assert host_allowed("localhost:1234", LOOPBACK) and not host_allowed("evil.example", LOOPBACK)
    assert not host_allowed(None, LOOPBACK) and host_allowed("anything", ("*",))
    assert origin_allowed(None, LOOPBACK)  # IDE plugins and curl send no Origin
    assert origin_allowed("http://localhost:5173", LOOPBACK) and origin_allowed("https://[::1]:8443", LOOPBACK)
    for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example", "file://", "vscode-webview://x"):
        assert not origin_allowed(origin, LOOPBACK), origin
    assert origin_allowed("vscode-webview://x", LOOPBACK, ("vscode-webview://x",))


@pytest.mark.parametrize("value, ok", [
    ("application/json", True), ("Application/JSON; charset=utf-8", True), ("application/vnd.api+json", True),
    ("text/plain", False), ("text/plain; charset=application/json", False),
    ("application/x-www-form-urlencoded", False),
    ("multipart/form-data; boundary=x", False), (None, False), ("", False), ("application/jsonp", False),
])
def test_json_content_types(value, ok):
    assert is_json_content_type(value) is ok


async def _echo(scope, receive, send):
    """The wrapped app: answers with the body it received."""
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps({"received": body.decode()}).encode()})


def guarded(record=None, **kwargs) -> httpx.AsyncClient:
    """The echo app behind the Guard, behind the error counter when ``record`` is given (as the app wires them)."""
    app = Guard(_echo, limits=RequestLimits(max_body_bytes=2048), **kwargs)
    if record is not None:
        app = ErrorCounter(app, record=record)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8000")


def test_guard_refuses_in_the_client_shape_and_passes_the_body_on():
    refused = []

    async def run():
        async with guarded(record=lambda protocol, status: refused.append((protocol, status))) as client:
            ok = await client.post("/generate", content='{"inputs": "é"}'.encode(),
                                   headers={"content-type": "application/json"})
            plain = await client.post("/v1/completions", content=b"{}", headers={"content-type": "text/plain"})
            rebound = await client.get("/health", headers={"host": "evil.example:8000"})
            page = await client.post("/api/generate", json={}, headers={"origin": "http://evil.example"})

            async def chunks():  # no Content-Length: counted as it arrives
                yield b'{"inputs": "'
                for _ in range(40):
                    yield b"x" * 64
                yield b'"}'

            big = await client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
            latin1 = await client.post("/generate", content=b'{"inputs": "caf\xe9"}',
                                       headers={"content-type": "application/json"})
            return ok, plain, rebound, page, big, latin1

    ok, plain, rebound, page, big, latin1 = asyncio.run(run())
    assert ok.json() == {"received": '{"inputs": "é"}'}
    assert plain.status_code == 415 and set(plain.json()["error"]) == {"message", "type", "param", "code"}
    assert rebound.status_code == 403 and set(rebound.json()) == {"error", "error_type"}
    assert page.status_code == 403 and set(page.json()) == {"error"}
    assert big.status_code == 413 and "2048" in big.json()["error"]
    assert latin1.status_code == 422 and "UTF-8" in latin1.json()["error"]
    assert refused == [("openai", 415), ("tgi", 403), ("ollama", 403), ("tgi", 413), ("tgi", 422)]


def test_a_body_that_does_not_arrive_in_time_is_a_408():
    """A client that announces a body and sends it too slowly (slowloris) is answered, not waited for."""
    sent = []

    async def trickle():  # the first part, then nothing
        yield {"type": "http.request", "body": b'{"inputs": "', "more_body": True}
        await asyncio.sleep(30)

    async def run():
        parts = trickle()
        guard = Guard(_echo, limits=RequestLimits(body_timeout_s=0.2))
        scope = {"type": "http", "method": "POST", "path": "/generate",
                 "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]}

        async def send(message):
            sent.append(message)

        start = asyncio.get_running_loop().time()
        await guard(scope, parts.__anext__, send)
        return asyncio.get_running_loop().time() - start

    assert asyncio.run(run()) < 2
    assert sent[0]["status"] == 408 and json.loads(sent[1]["body"])["error_type"] == "validation"


def test_without_require_json_any_body_is_read_as_json():
    """The documented opt-out (a trusted front end): curl -d sends a form type, the app still gets JSON."""
    async def run():
        async with guarded(require_json=False) as client:
            return await client.post("/generate", content=b'{"inputs": "x"}',
                                     headers={"content-type": "application/x-www-form-urlencoded"})

    response = asyncio.run(run())
    assert response.status_code == 200 and response.json() == {"received": '{"inputs": "x"}'}


# --------------------------------------------------------------------------- over HTTP


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None,
], ids=["text", "form", "multipart", "none"])
def test_post_without_a_json_content_type_is_a_415(http, protocol, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = http.post(protocol.path, content=json.dumps(protocol.body()).encode(), headers=headers)
    assert response.request.headers.get("content-type") == content_type
    assert_error(response, 415, "Content-Type")


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_json_with_a_charset_is_served(http, protocol):
    body = json.dumps(protocol.body()).encode()
    response = http.post(protocol.path, content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200, response.text


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "localhost.evil.example:{port}"])
def test_a_foreign_host_name_is_a_403(http, protocol, host):
    """DNS rebinding: the page's name still arrives in Host."""
    port = http.base_url.port
    response = protocol.post(http, protocol.body(), headers={"host": host.format(port=port)})
    assert_error(response, 403, "Host")


@pytest.mark.ray
@pytest.mark.parametrize("path", ["/health", "/metrics", "/v1/models"])
def test_a_foreign_host_name_cannot_read_either(http, path):
    assert_error(http.get(path, headers={"host": "evil.example"}), 403, "Host")


@pytest.mark.ray
@pytest.mark.parametrize("host", ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "LOCALHOST"])
def test_loopback_host_names_are_served(http, host):
    response = TGI.post(http, TGI.body(), headers={"host": host.format(port=http.base_url.port)})
    assert response.status_code == 200, response.text


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
@pytest.mark.parametrize("origin", ["http://evil.example", "null", "https://localhost.evil.example"])
def test_a_foreign_origin_is_a_403(http, protocol, origin):
    assert_error(protocol.post(http, protocol.body(), headers={"origin": origin}), 403, "origin")


@pytest.mark.ray
@pytest.mark.parametrize("origin", ["http://localhost:{port}", "http://127.0.0.1:{port}"])
def test_a_loopback_origin_is_served(http, origin):
    response = TGI.post(http, TGI.body(), headers={"origin": origin.format(port=http.base_url.port)})
    assert response.status_code == 200, response.text


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_a_simple_cross_site_post_as_a_browser_sends_it_is_refused(http, protocol):
    """fetch(url, {method: 'POST', body: JSON.stringify(...)}) from a page: text/plain, the page's Origin."""
    headers = {"content-type": "text/plain;charset=UTF-8", "origin": "https://evil.example"}
    response = http.post(protocol.path, content=json.dumps(protocol.body()).encode(), headers=headers)
    assert response.status_code == 403, response.text[:300]


@pytest.mark.ray
def test_preflight_from_a_foreign_origin_gets_no_cors_grant(http):
    response = http.options("/generate", headers={"origin": "http://evil.example",
                                                   "access-control-request-method": "POST",
                                                   "access-control-request-headers": "content-type"})
    assert response.status_code < 500
    assert "access-control-allow-origin" not in response.headers
