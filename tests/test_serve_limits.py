"""Request limits (issue 13): body bytes, prompt characters, stop sequences, new tokens, prompts x n.

Unit tests of serve_app/limits.py, then the same limits over real HTTP in each client's error
shape. The server runs with the default RequestLimits, so the payloads here are sized from them.
"""

import json

import pytest

from greencode.config import RequestLimits
from serve_app.guard import MAX_JSON_DEPTH, check_text
from serve_app.limits import body_too_large, check_content_length, check_json, check_request
from serve_helpers import OLLAMA, OPENAI, PROTOCOL_IDS, PROTOCOLS, TGI, assert_error, metric

SERVE_APP = "abuse"
LIMITS = RequestLimits()


# --------------------------------------------------------------------------- serve_app/limits.py (no Ray)


def test_limits_defaults_and_bad_values_name_the_field():
    from pydantic import ValidationError

    assert LIMITS.max_body_bytes == 2 * 1024 * 1024 and LIMITS.max_sequences == 16
    with pytest.raises(ValidationError, match="max_prompt_chars"):
        RequestLimits(max_prompt_chars=0)
    with pytest.raises(ValidationError, match="max_body_byte"):
        RequestLimits(max_body_byte=10)  # a typo is an error, not a silent default


def test_content_length_and_counted_bytes():
    assert check_content_length(None, LIMITS) is None
    assert check_content_length(str(LIMITS.max_body_bytes), LIMITS) is None
    assert check_content_length(str(LIMITS.max_body_bytes + 1), LIMITS).status == 413
    assert check_content_length("12abc", LIMITS).status == 400
    assert body_too_large(LIMITS.max_body_bytes + 1, LIMITS).status == 413


def test_invalid_unicode_names_the_path_of_the_first_bad_string():
    body = json.loads('{"inputs": "ok \\ud83d\\ude00", "parameters": {"stop": ["fine", "bad \\ud800"]}}')
    bad = check_json(body)
    assert bad.param == "parameters.stop.1" and "\\ud800" in bad.message and bad.status is None
    key = check_json(json.loads('{"options": {"x\\udfff": 1}}'))
    assert key.param == "options.x\\udfff (key)"
    assert check_json(json.loads('{"prompt": ["a", "\\u0000", "\\ud83d\\ude00"], "n": 2}')) is None
    # the JSON decoder passes UTF-8-encoded surrogates through as lone surrogates
    assert check_json(json.loads(b'{"prompt": "a\xed\xa0\x80"}')).param == "prompt"


def test_json_nested_past_the_depth_bound_is_named_before_parsing():
    assert check_text(json.dumps({"a": [[1]] * 3}).encode()) is None
    at_bound = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert check_text(at_bound.encode()) is None
    bad = check_text(("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)).encode())
    assert bad.param is None and bad.message == f"request body nests JSON deeper than {MAX_JSON_DEPTH} levels (65)"


def test_request_checks_name_the_protocol_field():
    def check(**kw):
        return check_request(LIMITS, prompt_field="inputs", stop_field="parameters.stop",
                             max_new_tokens_field="parameters.max_new_tokens", **{"prompts": ["p"], **kw})

    assert check() is None
    assert check(prompts=["x" * LIMITS.max_prompt_chars]) is None
    assert check(prompts=["x" * LIMITS.max_prompt_chars], suffix="y").param == "inputs"
    assert check(stop=["s"] * (LIMITS.max_stop_sequences + 1)).param == "parameters.stop"
    assert "parameters.stop.1" in check(stop=["s", "s" * (LIMITS.max_stop_chars + 1)]).message
    assert check(max_new_tokens=LIMITS.max_new_tokens + 1).param == "parameters.max_new_tokens"
    assert check(sequences=LIMITS.max_sequences + 1).param == "n"


# --------------------------------------------------------------------------- over HTTP


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_body_over_the_limit_is_a_413(http, protocol):
    body = protocol.body(prompt="x" * (LIMITS.max_body_bytes + 1))
    assert_error(protocol.post(http, body), 413, "bytes")


@pytest.mark.ray
def test_chunked_body_over_the_limit_is_a_413_while_it_arrives(http):
    """No Content-Length: the body is counted as it comes, and refused before it ends."""
    def chunks():
        yield b'{"inputs": "'
        for _ in range(LIMITS.max_body_bytes // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    response = http.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "bytes")


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_prompt_over_max_chars_is_refused_before_tokenizing(http, protocol):
    response = protocol.post(http, protocol.body(prompt="x" * (LIMITS.max_prompt_chars + 1)))
    message = assert_error(response, protocol.validation_status, protocol.prompt_field)
    assert "characters" in message  # the character count, not the token count after tokenizing


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_too_many_stop_sequences(http, protocol):
    body = protocol.body(stop=[f"s{i}" for i in range(LIMITS.max_stop_sequences + 1)])
    assert_error(protocol.post(http, body), protocol.validation_status, protocol.field("stop"))


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_too_long_stop_sequence(http, protocol):
    body = protocol.body(stop=["ok", "s" * (LIMITS.max_stop_chars + 1)])
    assert_error(protocol.post(http, body), protocol.validation_status, protocol.field("stop"))


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_too_many_new_tokens(http, protocol):
    body = protocol.body(max_new_tokens=LIMITS.max_new_tokens + 1)
    assert_error(protocol.post(http, body), protocol.validation_status, protocol.field(protocol.max_tokens_field))


@pytest.mark.ray
def test_prompts_times_n_within_the_limit_is_served(http):
    n = 2
    response = http.post("/v1/completions", json={"prompt": ["a"] * (LIMITS.max_sequences // n), "n": n,
                                                  "max_tokens": 1})
    assert response.status_code == 200 and len(response.json()["choices"]) == LIMITS.max_sequences


@pytest.mark.ray
def test_prompts_times_n_over_the_limit(http):
    """16 prompts x n=8 would be 128 sequences from one request."""
    response = http.post("/v1/completions", json={"prompt": ["a"] * 16, "n": 8, "max_tokens": 1})
    assert_error(response, 400, "n", OPENAI)
    assert response.json()["error"]["param"] == "n"


@pytest.mark.ray
def test_refusals_are_counted_by_status_in_metrics(http):
    name = "greencode_request_errors_total"
    before = {s: metric(http, name, status=s) for s in ("413", "422", "400")}
    TGI.post(http, TGI.body(prompt="x" * (LIMITS.max_body_bytes + 1)))
    TGI.post(http, TGI.body(temperature=-1))
    OLLAMA.post(http, OLLAMA.body(temperature=-1))
    after = {s: metric(http, name, status=s) for s in ("413", "422", "400")}
    assert after == {s: before[s] + 1 for s in before}
