"""The API key (issue 13): refused empty at startup, checked before the body is read, /health without secrets.

The server here has a key and an exit policy file (whose path /health must not show). Unit
tests of serve_app/guard.py's key check, then real HTTP, including a raw socket that sends the
headers and never the body.
"""

import asyncio
import json
import socket

import httpx
import pytest

from greencode.config import ConfigError, RequestLimits, ServeConfig, validate
from serve_app.guard import Guard
from serve_helpers import PROMPT, PROTOCOL_IDS, PROTOCOLS, TGI, assert_error, save_policy, shared_app, tiny_loader

SERVE_APP = "keyed"
API_KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def policy_path(tmp_path_factory) -> str:
    return save_policy(tmp_path_factory.mktemp("policy") / "exit_policy.pt")


@pytest.fixture(scope="module")
def server(request, policy_path):
    cfg = {"api_key": API_KEY, "policy_path": policy_path}
    yield from shared_app(request, SERVE_APP, lambda: cfg, tiny_loader)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=60) as client:
        yield client


# --------------------------------------------------------------------------- startup and serve_app/guard.py (no Ray)


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_api_key_is_refused_at_startup(key):
    """An empty key used to switch auth off without a word."""
    with pytest.raises(ConfigError, match="api_key"):
        validate(ServeConfig, {"api_key": key})


def test_guard_refuses_an_empty_key():
    with pytest.raises(ValueError, match="tenant_keys"):
        Guard(None, limits=RequestLimits(), tenant_keys={"default": " "})


def _call(guard: Guard, path: str, headers: dict[str, str], body: bytes = b"{}") -> tuple[list, int]:
    """Drive the ASGI middleware directly; returns (messages sent, how often the body was read)."""
    sent, reads = [], 0

    async def receive():
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [
        (k.lower().encode(), v.encode()) for k, v in {"host": "127.0.0.1:8000", **headers}.items()]}
    asyncio.run(guard(scope, receive, send))
    return sent, reads


def test_guard_checks_the_key_before_reading_a_byte():
    async def app(scope, receive, send):
        message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": message["body"]})

    guard = Guard(app, limits=RequestLimits(), tenant_keys={"default": API_KEY})
    json_type = {"content-type": "application/json"}
    sent, reads = _call(guard, "/v1/completions", {"authorization": "Bearer nope", **json_type})
    assert (sent[0]["status"], reads) == (401, 0)
    assert (b"www-authenticate", b'Bearer realm="greencode"') in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["type"] == "authentication_error"
    sent, reads = _call(guard, "/generate", {"authorization": f"bearer {API_KEY}", **json_type}, b'{"a": 1}')
    assert (sent[0]["status"], sent[1]["body"], reads) == (200, b'{"a": 1}', 1)
    sent, _ = _call(guard, "/ready", {})
    assert sent[0]["status"] != 401  # open path: no key needed (then the content type is what is wrong)


# --------------------------------------------------------------------------- over HTTP


WRONG = {
    "none": {},
    "wrong": {"Authorization": "Bearer wrong"},
    "basic": {"Authorization": f"Basic {API_KEY}"},
    "empty": {"Authorization": "Bearer"},
    "bare": {"Authorization": API_KEY},
    "prefix": {"Authorization": f"Bearer {API_KEY[:-1]}"},
}


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
@pytest.mark.parametrize("headers", WRONG.values(), ids=WRONG.keys())
def test_missing_or_wrong_key_is_a_401_in_the_client_shape(http, protocol, headers):
    assert_error(protocol.post(http, protocol.body(), headers=headers), 401, "API key")


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_a_401_names_the_scheme(http, protocol):
    response = protocol.post(http, protocol.body(), headers=WRONG["wrong"])
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.ray
def test_the_scheme_is_case_insensitive_and_the_key_is_served(http):
    response = TGI.post(http, TGI.body(), headers={"Authorization": f"bearer {API_KEY}"})
    assert response.status_code == 200, response.text


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_the_key_is_checked_before_the_body_is_parsed(http, protocol):
    response = http.post(protocol.path, content=b'{"inputs": oops', headers={**WRONG["wrong"],
                                                                            "content-type": "application/json"})
    assert_error(response, 401, "API key")


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_the_key_is_checked_before_the_body_size(http, protocol):
    body = protocol.body(prompt="x" * (RequestLimits().max_body_bytes + 1))
    assert_error(protocol.post(http, body, headers=WRONG["wrong"]), 401, "API key")


@pytest.mark.ray
def test_the_key_is_checked_before_the_body_arrives(server):
    """Headers announce a 1 MB body that never comes: the 401 must not wait for it."""
    url = httpx.URL(server)
    head = (f"POST /generate HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer wrong\r\nContent-Length: 1000000\r\n\r\n")
    with socket.create_connection((url.host, url.port), timeout=5) as conn:
        conn.sendall(head.encode() + b'{"inputs": "')
        reply = conn.recv(4096)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]


@pytest.mark.ray
def test_health_is_open_and_shows_no_paths(server, policy_path):
    response = httpx.get(f"{server}/health", timeout=60)
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert policy_path not in response.text and "/tmp" not in response.text and "policy_path" not in response.text


@pytest.mark.ray
def test_metrics_needs_the_key_and_the_schema_does_not(server):
    assert_error(httpx.get(f"{server}/metrics", timeout=60), 401, "API key", TGI)
    assert httpx.get(f"{server}/metrics", headers=AUTH, timeout=60).status_code == 200
    assert "/generate" in httpx.get(f"{server}/openapi.json", timeout=60).json()["paths"]


@pytest.mark.ray
def test_official_openai_client_sees_an_authentication_error(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.completions.create(model="greencode", prompt=PROMPT, max_tokens=2)
    assert "API key" in err.value.message
