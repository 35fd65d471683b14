"""Generation failures (issue 13): an error event ends a stream, one failed request never fails its batch.

The served model's " poison" token has a NaN embedding (tests/serve_helpers.py): the
``poison_mid`` script says " one two three poison" and the next step has NaN logits, in that
row only; a prompt holding the token fails in the prompt pass. That is a server-side fault, so
the failed request itself gets the protocol's failure status (TGI 424 "generation", OpenAI and
Ollama 500) or, once a stream has started, an error event (SSE ``event: error``, an NDJSON
``{"error"}`` line) that the official clients raise as an error.
"""

import asyncio

import httpx
import pytest

from serve_helpers import (
    PROMPT,
    PROTOCOL_IDS,
    PROTOCOLS,
    TGI,
    assert_error,
    check_error_body,
    metric,
)

SERVE_APP = "abuse"
SAID_BEFORE_FAILING = " one two three poison"


def stream(http, protocol, prompt: str, **knobs):
    response = protocol.post(http, protocol.body(prompt=prompt, max_new_tokens=10, stream=True, **knobs), stream=True)
    assert response.status_code == 200, response.text[:300]
    return protocol.read_stream(response)  # reads the whole body: a cut connection raises here


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_a_stream_that_fails_midway_ends_with_an_error_event(http, plan, protocol):
    result = stream(http, protocol, plan.scripts["poison_mid"].prompt)
    assert result.text == SAID_BEFORE_FAILING and result.final is None
    assert result.error is not None, "the stream ended without an error event"
    check_error_body(protocol, result.error, protocol.failure_status)
    if protocol.name != "ollama":  # SSE: a named event, so clients that dispatch on it see an error
        assert result.error_event == "error"


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_a_stream_that_fails_in_the_prompt_pass_sends_only_the_error(http, plan, protocol):
    result = stream(http, protocol, plan.poison_prompt, temperature=0.7, seed=1)
    assert result.pieces == [] and result.error is not None
    check_error_body(protocol, result.error, protocol.failure_status)


@pytest.mark.ray
def test_official_clients_raise_the_stream_error(server, plan):
    import ollama
    import openai
    from text_generation import Client
    from text_generation.errors import GenerationError

    prompt = plan.scripts["poison_mid"].prompt
    with pytest.raises(GenerationError):
        list(Client(server, timeout=60).generate_stream(prompt, max_new_tokens=10))
    with pytest.raises(openai.APIError) as raised:
        list(openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0).completions.create(
            model="greencode", prompt=prompt, max_tokens=10, stream=True))
    assert type(raised.value) is openai.APIError  # an error event, not a dropped connection (APIConnectionError)
    with pytest.raises(ollama.ResponseError):
        list(ollama.Client(host=server).generate(model="greencode", prompt=prompt, options={"num_predict": 10},
                                                  stream=True))


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_a_failed_generation_is_the_protocols_failure_status(http, plan, protocol):
    response = protocol.post(http, protocol.body(prompt=plan.scripts["poison_mid"].prompt, max_new_tokens=10))
    assert_error(response, protocol.failure_status)


@pytest.mark.ray
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.5, "seed": 3}], ids=["greedy", "sampled"])
def test_a_failed_row_does_not_fail_the_rest_of_its_batch(server, plan, sampling):
    """Same settings, so one Serve batch and one generation group: only the poisoned row fails."""
    clean = [TGI.body(prompt=f"{PROMPT}# {i}\n", max_new_tokens=6, **sampling) for i in range(5)]
    poisoned = TGI.body(prompt=plan.scripts["poison_mid"].prompt, max_new_tokens=6, **sampling)

    async def burst(bodies):
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            return await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))

    *together, failed = asyncio.run(burst([*clean, poisoned]))
    assert [r.status_code for r in together] == [200] * 5, [r.text[:200] for r in together]
    assert max(r.json()["greencode"]["batch_size"] for r in together) > 1
    assert all(r.json()["details"]["generated_tokens"] == 6 for r in together)
    if not sampling:  # sampled rows draw from one generator per batch: their text depends on the batch
        assert all(r.json()["generated_text"] == " x" * 6 for r in together)
    assert_error(failed, 424, protocol=TGI)


@pytest.mark.ray
def test_failures_are_counted_in_metrics(http, plan):
    before_failed = metric(http, "greencode_request_errors_total", status="424")
    before_streams = metric(http, "greencode_requests_total", outcome="error")
    TGI.post(http, TGI.body(prompt=plan.scripts["poison_mid"].prompt, max_new_tokens=10))
    stream(http, TGI, plan.scripts["poison_mid"].prompt)
    assert metric(http, "greencode_request_errors_total", status="424") == before_failed + 1
    assert metric(http, "greencode_requests_total", outcome="error") == before_streams + 2


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_the_server_keeps_serving_after_a_failure(http, plan, protocol):
    protocol.post(http, protocol.body(prompt=plan.scripts["poison_mid"].prompt, max_new_tokens=10))
    response = protocol.post(http, protocol.body(prompt=plan.scripts["ascii"].prompt, max_new_tokens=40))
    assert response.status_code == 200 and protocol.text(response.json()) == plan.texts["ascii"]
