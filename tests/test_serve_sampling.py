"""Sampling edge cases (issue 13): near-zero temperature and top_p are greedy, never NaN, never a 500.

The served model says " x" greedily wherever no script is placed (a logit of 8 against 0 for
every other token), so greedy output is known and sampling at temperature 1 visibly differs.
greencode/sampling.py picks the generator's tokens.
"""

import asyncio
import json

import httpx
import pytest

from serve_helpers import PROMPT, PROTOCOL_IDS, PROTOCOLS, TGI, assert_error

SERVE_APP = "abuse"
GREEDY = " x x x x"  # what greedy decoding says for PROMPT in 4 tokens
JSON = {"content-type": "application/json"}


def completion(http, protocol, **knobs) -> str:
    response = protocol.post(http, protocol.body(**knobs))
    assert response.status_code == 200, response.text[:500]
    return protocol.text(response.json())


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_greedy_and_sampled_differ_and_a_seed_repeats(http, protocol):
    """Control for the tests below: greedy is GREEDY, temperature 1 samples, a seed reproduces it."""
    assert completion(http, protocol) == completion(http, protocol, temperature=0) == GREEDY
    sampled = completion(http, protocol, temperature=1.0, seed=7)
    assert sampled != GREEDY and completion(http, protocol, temperature=1.0, seed=7) == sampled


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
@pytest.mark.parametrize("temperature", [
    1e-300, 5e-324, 1e-30,
])
def test_near_zero_temperature_is_greedy(http, protocol, temperature):
    assert completion(http, protocol, temperature=temperature, seed=3) == GREEDY


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_near_zero_temperature_streams_greedy_text(http, protocol):
    response = protocol.post(http, protocol.body(temperature=1e-300, stream=True), stream=True)
    assert response.status_code == 200
    stream = protocol.read_stream(response)
    assert stream.error is None and stream.text == GREEDY


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_near_zero_top_p_keeps_the_top_token(http, protocol):
    assert completion(http, protocol, temperature=1.0, top_p=1e-300, seed=3) == GREEDY


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_a_4xx_naming_the_field(http, protocol, literal):
    """Python's JSON decoder accepts these literals; the request schema must not."""
    raw = json.dumps(protocol.body(temperature=12345.5)).replace("12345.5", literal)
    assert_error(http.post(protocol.path, content=raw, headers=JSON), protocol.validation_status,
                 protocol.field("temperature"))


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
@pytest.mark.parametrize("knobs, field", [
    ({"top_p": 0}, "top_p"),
    ({"temperature": 1e308}, "temperature"),
    ({"temperature": -1e-300}, "temperature"),
    ({"seed": 2**64}, "seed"),
])
def test_out_of_range_sampling_knobs_are_a_4xx(http, protocol, knobs, field):
    assert_error(protocol.post(http, protocol.body(**knobs)), protocol.validation_status, protocol.field(field))


@pytest.mark.ray
def test_largest_seed_and_do_sample_are_served(http):
    assert completion(http, TGI, temperature=1.0, seed=2**63 - 1) != GREEDY
    assert completion(http, TGI, do_sample=True, seed=1) != GREEDY  # TGI: do_sample without temperature = 1


@pytest.mark.ray
def test_a_near_zero_temperature_does_not_fail_the_requests_batched_with_it(server):
    bodies = [TGI.body(prompt=f"{PROMPT}# {i}\n") for i in range(5)] + [TGI.body(temperature=1e-300)]

    async def burst():
        async with httpx.AsyncClient(base_url=server, timeout=60) as client:
            return await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 6, [r.text[:200] for r in responses]
    assert all(r.json()["generated_text"] == GREEDY for r in responses)
