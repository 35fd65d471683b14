"""Unicode streaming (issue 13): the joined stream is exactly the non-streamed text, never U+FFFD.

The served model says known texts (tests/serve_helpers.py TEXTS): CJK and emoji split across
one token per UTF-8 byte, mixed scripts as the tokenizer splits them, and an ASCII control. A
stop sequence that spans tokens (or sits inside split characters) must not leak into the stream
either (greencode/detokenize.py releases the text inside the generator).
"""

import pytest

from serve_helpers import OLLAMA, PROTOCOL_IDS, PROTOCOLS, TGI

SERVE_APP = "abuse"
MAX_NEW = 64  # more than any script: every script ends with EOS


def complete(http, protocol, prompt: str, **knobs) -> str:
    response = protocol.post(http, protocol.body(prompt=prompt, max_new_tokens=MAX_NEW, **knobs))
    assert response.status_code == 200, response.text[:300]
    return protocol.text(response.json())


def streamed(http, protocol, prompt: str, **knobs):
    response = protocol.post(http, protocol.body(prompt=prompt, max_new_tokens=MAX_NEW, stream=True, **knobs),
                             stream=True)
    assert response.status_code == 200, response.text[:300]
    result = protocol.read_stream(response)
    assert result.error is None and result.final is not None
    return result


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
@pytest.mark.parametrize("script", ["cjk_bytes", "emoji_bytes", "mixed", "ascii"])
def test_the_non_streamed_text_is_what_the_model_said(http, plan, protocol, script):
    assert complete(http, protocol, plan.scripts[script].prompt) == plan.texts[script]


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
@pytest.mark.parametrize("script", [
    "cjk_bytes", "emoji_bytes", "mixed", "ascii",
])
def test_the_joined_stream_is_the_text_without_replacement_characters(http, plan, protocol, script):
    result = streamed(http, protocol, plan.scripts[script].prompt)
    assert result.text == plan.texts[script]
    assert not any("\ufffd" in piece for piece in result.pieces), result.pieces
    if protocol is TGI:
        assert result.final["generated_text"] == plan.texts[script]


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
@pytest.mark.parametrize("script, stop, expected", [
    ("stop", "本語", "# 日"),  # inside characters split across byte tokens
    ("stop", "\nprint", "# 日本語です"),
    ("ascii", " + fib", " return fib(n - 1)"),  # spans tokens: ' +', ' fib'
])
def test_a_stop_sequence_never_reaches_the_stream(http, plan, protocol, script, stop, expected):
    prompt = plan.scripts[script].prompt
    assert complete(http, protocol, prompt, stop=[stop]) == expected
    result = streamed(http, protocol, prompt, stop=[stop])
    assert result.text == expected and stop not in result.text


@pytest.mark.ray
@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_a_stop_sequence_is_honoured_without_streaming(http, plan, protocol):
    """Control: the non-streamed text already ends before the stop sequence."""
    assert complete(http, protocol, plan.scripts["stop"].prompt, stop=["本語"]) == "# 日"


@pytest.mark.ray
def test_official_clients_join_to_the_text(server, plan):
    import ollama
    import openai
    from text_generation import Client

    prompt, text = plan.scripts["cjk_bytes"].prompt, plan.texts["cjk_bytes"]
    events = list(Client(server, timeout=60).generate_stream(prompt, max_new_tokens=MAX_NEW))
    assert "".join(e.token.text for e in events if not e.token.special) == events[-1].generated_text == text
    chunks = openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0).completions.create(
        model="greencode", prompt=prompt, max_tokens=MAX_NEW, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == text
    parts = ollama.Client(host=server).generate(model="greencode", prompt=prompt, options={"num_predict": MAX_NEW},
                                                stream=True)
    assert "".join(p.response for p in parts) == text


@pytest.mark.ray
def test_a_unicode_prompt_comes_back_exactly_with_return_full_text(http):
    prompt = "# 日本語 😀 e\u0301\n"
    data = TGI.post(http, TGI.body(prompt=prompt, return_full_text=True)).json()
    assert data["generated_text"] == prompt + " x x x x"
    data = OLLAMA.post(http, OLLAMA.body(prompt=prompt)).json()
    assert data["response"] == " x x x x" and data["prompt_eval_count"] > 0
