"""Strings that are not valid Unicode (issue 13): a 4xx naming the field, in the client's shape, never a 500.

``"\\ud800"`` is valid JSON but a lone surrogate, which the tokenizer and the response encoder
cannot handle; the JSON decoder also turns UTF-8-encoded surrogate bytes into one. Bodies here
are sent as raw bytes so the surrogates reach the server as they are; valid-Unicode controls
check that nothing valid is refused.
"""

import asyncio
import json

import httpx
import pytest

from serve_helpers import OLLAMA, OPENAI, PROMPT, PROTOCOL_IDS, PROTOCOLS, TGI, assert_error

SERVE_APP = "abuse"
JSON = {"content-type": "application/json"}


def send(http, path: str, body: dict) -> httpx.Response:
    """POST ``body`` as JSON, escaping lone surrogates as JSON does (``\\ud800``)."""
    return http.post(path, content=json.dumps(body).encode(), headers=JSON)


def lone_surrogate_cases():
    """(protocol, body, field the error must name) for a lone surrogate in each place a client can put one."""
    for p in PROTOCOLS:
        yield p, p.body(prompt="def f():\ud800"), p.prompt_field
        yield p, p.body(stop=["\udfff"]), p.field("stop") + ".0"
        yield p, {**p.body(), "client_note": "x\ud800"}, "client_note"
        yield p, {**p.body(), "note\ud800": 1}, "(key)"
    yield TGI, {**TGI.body(), "parameters": {"max_new_tokens": 2, "top_k\udc00": 1}}, "parameters.top_k"
    yield OPENAI, OPENAI.body(prompt=["fine", "bad \ud83d"]), "prompt.1"
    yield OPENAI, {**OPENAI.body(), "suffix": "\ude00"}, "suffix"
    yield OPENAI, {**OPENAI.body(), "model": "m\ud800"}, "model"
    yield OLLAMA, {**OLLAMA.body(), "suffix": "\ude00"}, "suffix"
    yield OLLAMA, {**OLLAMA.body(), "model": "m\ud800"}, "model"
    yield OLLAMA, {"model": "m", "inputs": "x\ud800", "options": {"num_predict": 2}}, "inputs"


CASES = list(lone_surrogate_cases())


@pytest.mark.ray
@pytest.mark.parametrize("protocol, body, field", CASES, ids=[f"{p.name}-{f}" for p, _, f in CASES])
def test_lone_surrogate_is_a_4xx_naming_the_field(http, protocol, body, field):
    message = assert_error(send(http, protocol.path, body), protocol.validation_status, field)
    assert "surrogate" in message


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_utf8_encoded_surrogate_bytes_are_a_4xx(http, protocol):
    raw = json.dumps(protocol.body(prompt="PROMPT")).encode().replace(b"PROMPT", b"def f():\xed\xa0\x80")
    response = http.post(protocol.path, content=raw, headers=JSON)
    assert_error(response, protocol.validation_status, protocol.prompt_field)


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_body_that_is_not_utf8_is_a_4xx(http, protocol):
    raw = json.dumps(protocol.body(prompt="PROMPT")).encode().replace(b"PROMPT", b"caf\xe9 \xff")
    message = assert_error(http.post(protocol.path, content=raw, headers=JSON), protocol.validation_status)
    assert "UTF-8" in message


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_valid_unicode_escapes_are_served(http, protocol):
    """Control: a surrogate *pair* is one character, NUL is a character; both are fine."""
    body = protocol.body(prompt="# \ud83d\ude00 \u0000 caf\u00e9\n", stop=["\ud83d\ude03"])
    response = send(http, protocol.path, body)
    assert response.status_code == 200, response.text
    assert protocol.text(response.json()) == " x x x x"


@pytest.mark.ray
def test_a_bad_stop_does_not_fail_the_requests_batched_with_it(server):
    """Requests arriving together share a Serve batch; a lone surrogate in one's stop failed all of them."""
    bodies = [TGI.body(prompt=f"{PROMPT}# {i}\n") for i in range(4)] + [TGI.body(stop=["\udfff"])]

    async def burst():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            return await asyncio.gather(*(client.post("/generate", content=json.dumps(b).encode(), headers=JSON)
                                          for b in bodies))

    *good, bad = asyncio.run(burst())
    assert [r.status_code for r in good] == [200] * 4, [r.text[:200] for r in good]
    assert_error(bad, 422, "parameters.stop.0", TGI)
