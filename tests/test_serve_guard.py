"""serve_app/guard.py without Ray (issue 25): tenants from keys, refusals from the headers, bounded body reads,
strict UTF-8 JSON, websockets refused."""

import asyncio
import json

from fastapi import FastAPI

from greencode.config import RequestLimits
from serve_app.guard import Guard, check_text, tenant_of
from serve_app.limits import json_depth

LIMITS = RequestLimits(body_grace_s=0.2, body_min_rate_bytes_s=1000, max_body_readers=1)
KEYS = {"alice": "key-a", "bob": "key-b"}


def scope(path="/generate", method="POST", key=None, **extra):
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    return {"type": "http", "method": method, "path": path, "headers": headers, **extra}


def drive(guard, scopes_and_bodies):
    """Run requests through the guard concurrently; returns, per request, (status, body, tenant the app saw)."""
    async def one(s, parts):
        sent, seen = [], []

        async def receive():
            if parts:
                part = parts.pop(0)
                if part is None:  # the client stalls
                    await asyncio.sleep(30)
                return {"type": "http.request", "body": part, "more_body": bool(parts)}
            await asyncio.sleep(30)

        async def send(message):
            sent.append(message)

        async def app(app_scope, app_receive, app_send):
            seen.append(tenant_of(app_scope))
            await app_send({"type": "http.response.start", "status": 200, "headers": []})
            await app_send({"type": "http.response.body", "body": b"{}"})

        guard.app = app
        await asyncio.wait_for(guard(s, receive, send), 10)
        return sent[0]["status"], json.loads(sent[1]["body"]) if len(sent) > 1 else None, seen

    async def run():
        return await asyncio.gather(*(one(s, list(parts)) for s, parts in scopes_and_bodies))

    return asyncio.run(run())


def routed_guard():
    api = FastAPI()
    api.get("/health")(lambda: {})
    api.post("/generate")(lambda: {})
    return Guard(None, limits=LIMITS, tenant_keys=KEYS, routes=api.routes)


def test_the_key_names_the_tenant_and_no_key_is_anonymous():
    guard = routed_guard()
    [(a, _, seen_a)] = drive(guard, [(scope(key="key-a"), [b"{}"])])
    [(b, _, seen_b)] = drive(guard, [(scope(key="key-b"), [b"{}"])])
    [(wrong, _, seen_wrong)] = drive(guard, [(scope(key="key-c"), [b"{}"])])
    assert (a, seen_a, b, seen_b, wrong, seen_wrong) == (200, ["alice"], 200, ["bob"], 401, [])
    open_guard = Guard(None, limits=LIMITS)
    [(status, _, seen)] = drive(open_guard, [(scope(), [b"{}"])])
    assert (status, seen) == (200, ["anonymous"])


def test_get_only_and_unknown_paths_are_refused_before_any_body_byte():
    guard = routed_guard()
    results = drive(guard, [(scope("/health"), [None]), (scope("/nowhere", key="key-a"), [None]),
                            (scope("/generate", method="PUT", key="key-a"), [None])])
    assert [status for status, _, _ in results] == [405, 404, 405]
    assert results[0][1]["error"] == "/health does not take POST; it takes GET"


def test_bodies_slower_than_the_minimum_rate_are_408_and_readers_are_bounded():
    guard = routed_guard()
    [(slow, body, _), (crowded, crowd_body, _)] = drive(guard, [
        (scope(key="key-a"), [b'{"inputs": "', None]), (scope(key="key-a"), [b"{}"])])
    assert slow == 408 and "too slowly" in body["error"]
    assert crowded == 503 and "retry shortly" in crowd_body["error"]


def test_bodies_are_strict_utf8_json():
    guard = routed_guard()
    bodies = ['{"inputs": "x"}'.encode("utf-16"), '{"inputs": "x"}'.encode("utf-16-le"),
              '{"inputs": "x"}'.encode("utf-32"), b"\xef\xbb\xbf{}", b"[" * 100 + b"]" * 100,
              b'{"inputs": "\\ud800"}', b'{"inputs": "ok"}']
    results = []
    for body in bodies:  # one at a time: the guard lets one body reader in
        results += drive(guard, [(scope(key="key-a"), [body])])
    statuses = [status for status, _, _ in results]
    assert statuses == [422] * 6 + [200], results
    assert "deeper than 64" in results[4][1]["error"] and "lone surrogate" in results[5][1]["error"]


def test_websockets_are_closed_before_the_app():
    sent = []

    async def send(message):
        sent.append(message)

    async def app(*args):
        raise AssertionError("the app must not see a websocket")

    async def receive():
        return {"type": "websocket.connect"}

    asyncio.run(Guard(app, limits=LIMITS)({"type": "websocket", "path": "/generate", "headers": []}, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "this server speaks HTTP only"}]


def test_json_depth_is_counted_before_parsing_and_skips_strings():
    assert json_depth("") == 0 and json_depth('{"a": [1, {"b": []}]}') == 4
    assert json_depth('{"a": "[[[[ {{ \\" [[[ \\\\"}') == 1  # brackets and escaped quotes inside a string
    assert json_depth('["\\\\", [["]]]"]]]') == 3  # an escaped backslash ends before the quote
    assert json_depth("[" * 100_000) == 100_000 and json_depth("]" * 10 + "[[") <= 2


def test_malformed_json_is_refused_before_the_parser_recurses_or_converts():
    deep = check_text(b"[" * 10_000 + b"]" * 10_000)
    assert deep.status is None and deep.message == "request body nests JSON deeper than 64 levels (10000)"
    assert "a number of 1000 characters" in check_text(b'{"max_tokens": ' + b"9" * 1000 + b"}").message
    assert "a number of 70 characters" in check_text(b'{"t": 0.' + b"1" * 68 + b"}").message
    assert check_text(b'{"t": 0.' + b"1" * 60 + b', "n": -12345678901234567890}') is None
    for body in (b"\\" * 2**20, b'{"inputs": "' + b"\\" * (2**20 + 1) + b'"}'):
        assert "not valid JSON" in check_text(body).message
    assert check_text(b'{"inputs": "' + b"\\" * 2**20 + b'"}') is None  # valid: 512 Ki escaped backslashes
