"""A real GreenCode Serve app on 127.0.0.1 for the serving tests, and what they share.

Each test module starts one app for itself (``running_app``) on a local 2-CPU Ray and talks
to it over real HTTP. Two model loaders, both real Hugging Face models built in the replica:

- ``tiny_loader``: the seeded tiny random Llama of ``conftest.make_tiny`` with the real SmolLM2
  tokenizer (what tests/test_serve.py serves);
- ``scripted_loader``: a tiny OPT whose learned position embeddings make it *say* fixed token
  sequences. Every decoder block is an identity (zero output projections), token embeddings are
  zero, so the last position alone picks the next token: a prompt of L tokens continues with the
  script placed at positions L-1.., then EOS. That gives exact, known completions (any Unicode,
  split across byte tokens wherever the script says) under greedy *and* sampled decoding.
  Tokens listed as ``poison`` get NaN embeddings: a sequence that feeds one back to the model gets
  NaN logits from that step on, in its own row only — a server-side generation fault on demand.

Protocol descriptions (``TGI``, ``OPENAI``, ``OLLAMA``) build each client's body for the same
request and read its text, stream and error shape, so one test can run over all three.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import conftest
import httpx
import torch
from conftest import make_tiny

PROMPT = "def fibonacci(n):\n    "


# --------------------------------------------------------------------------- models (built in the replica)


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from greencode.config import ModelConfig
    from greencode.modeling import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(ModelConfig(name="embedded"))[0])


def tiny_loader(cfg):
    """Replica-side loader: the seeded tiny random Llama (12 layers, exit points [4, 6, 10])."""
    return make_tiny("llama", tokenizer=smollm2_tokenizer())


@dataclass(frozen=True)
class Script:
    """``prompt`` (text) is answered with exactly the token ids ``tokens``, then EOS."""

    prompt: str
    tokens: tuple[int, ...]


def byte_tokens(tokenizer, text: str) -> tuple[int, ...]:
    """``text`` as one byte-level BPE token per UTF-8 byte: every multi-byte character split across tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    return tuple(tokenizer.convert_tokens_to_ids(alphabet[b]) for b in text.encode("utf-8"))


def scripted_model(tokenizer, scripts: Sequence[Script], poison: Sequence[int] = (), hidden: int = 256):
    """The scripted tiny OPT (see the module docstring); checks itself on every script before returning."""
    from transformers import OPTConfig, OPTForCausalLM

    from greencode.config import GenerationConfig
    from greencode.gates import FullGate
    from greencode.generate import GatedGenerator
    from greencode.modeling import wrap_model

    eos = tokenizer.eos_token_id
    next_at: dict[int, int] = {}  # position -> token that position predicts
    for s in scripts:
        start = len(tokenizer(s.prompt)["input_ids"]) - 1
        for offset, token in enumerate((*s.tokens, eos)):
            if next_at.setdefault(start + offset, token) != token:
                raise ValueError(f"script of {s.prompt!r} overlaps another one at position {start + offset}: "
                                 "give the prompts lengths further apart")
    if max(next_at) >= hidden:
        raise ValueError(f"scripts reach position {max(next_at)}; the model has a basis of {hidden} positions")

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=len(tokenizer), hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=4,
                    num_attention_heads=4, max_position_embeddings=1024, word_embed_proj_dim=hidden,
                    tie_word_embeddings=False, eos_token_id=eos, bos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    model = OPTForCausalLM(cfg).eval()
    dec = model.model.decoder
    with torch.no_grad():
        for layer in dec.layers:  # identity blocks: the residual stream carries the position embedding through
            for proj in (layer.self_attn.out_proj, layer.fc2):
                proj.weight.zero_()
                proj.bias.zero_()
        dec.embed_tokens.weight.zero_()
        dec.embed_tokens.weight[list(poison)] = float("nan")
        dec.embed_positions.weight.zero_()
        model.lm_head.weight.zero_()
        offset = dec.embed_positions.offset
        for position, token in next_at.items():
            dec.embed_positions.weight[position + offset, position] = 1.0
            model.lm_head.weight[token, position] = 4.0  # a logit of ~64 against 0 for every other token
    lm = wrap_model(model, tokenizer)
    generator = GatedGenerator(lm)
    for s in scripts:
        if set(s.tokens) & set(poison):
            continue
        [result] = generator.generate([s.prompt], FullGate(), GenerationConfig(max_new_tokens=len(s.tokens) + 1))
        if tuple(result.token_ids) != (*s.tokens, eos):
            raise AssertionError(f"the scripted model does not say its script for {s.prompt!r}")
    return lm


def scripted_loader(cfg, scripts: Sequence[Script], poison: Sequence[int] = ()):
    """Replica-side loader for ``scripted_model`` (bind the scripts with functools.partial)."""
    return scripted_model(smollm2_tokenizer(), scripts, poison)


def scripted(scripts: Sequence[Script], poison: Sequence[int] = ()) -> Callable[[Any], Any]:
    return partial(scripted_loader, scripts=tuple(scripts), poison=tuple(poison))


# --------------------------------------------------------------------------- the app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(cfg: dict[str, Any], loader: Callable[[Any], Any]) -> Iterator[str]:
    """Serve the app built from ``cfg`` (a ServeConfig mapping) with ``loader``; yields its base URL."""
    import ray
    import ray.cloudpickle
    from ray import serve

    from greencode.config import ServeConfig, validate
    from serve_app.app import build_app_with_loader

    # Loaders travel to the replica by value: the tests directory is not importable there.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(conftest)
    config = validate(ServeConfig, {"num_cpus": 1, **cfg}, source="test serve config")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app_with_loader(config, loader), name="greencode", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


# --------------------------------------------------------------------------- protocols


def _sse_data(text: str) -> Iterator[tuple[str | None, str]]:
    """(event name or None, data) of each server-sent event."""
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
        if data:
            yield event, "\n".join(data)


@dataclass(frozen=True)
class Stream:
    """A finished stream: the text pieces in order, the final chunk, and an error chunk if one came."""

    pieces: list[str]
    final: dict[str, Any] | None
    error: dict[str, Any] | None = None
    error_event: str | None = None  # SSE event name the error came with

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True)
class Protocol:
    name: str
    path: str
    stream_path: str
    validation_status: int  # what the protocol answers for an invalid request
    prompt_field: str
    max_tokens_field: str
    knobs_key: str | None  # where sampling/gate knobs go (None = top level)
    stream_flag: dict[str, Any] = field(default_factory=dict)

    def body(self, prompt: Any = PROMPT, max_new_tokens: int | None = 4, stream: bool = False,
             **knobs: Any) -> dict[str, Any]:
        """One completion request in this protocol's shape; ``knobs`` in its own spelling."""
        knobs = {self.max_tokens_field: max_new_tokens, **knobs} if max_new_tokens is not None else knobs
        body: dict[str, Any] = {self.prompt_field: prompt}
        if self.knobs_key is None:
            body.update(knobs)
        elif knobs:
            body[self.knobs_key] = knobs
        if self.name == "ollama":
            body["stream"] = stream
        elif stream and self.name == "openai":
            body["stream"] = True
        return body

    def post(self, client: httpx.Client, body: Any, stream: bool = False, **kwargs: Any) -> httpx.Response:
        return client.post(self.stream_path if stream else self.path, json=body, **kwargs)

    def text(self, data: dict[str, Any]) -> str:
        if self.name == "openai":
            return data["choices"][0]["text"]
        return data["generated_text"] if self.name == "tgi" else data["response"]

    def read_stream(self, response: httpx.Response) -> Stream:
        """Parse a whole streamed body (SSE for TGI/OpenAI, NDJSON for Ollama)."""
        pieces: list[str] = []
        final = None
        if self.name == "ollama":
            for line in response.text.splitlines():
                chunk = json.loads(line)
                if "error" in chunk:
                    return Stream(pieces, final, chunk)
                pieces.append(chunk["response"])
                final = chunk if chunk.get("done") else final
            return Stream(pieces, final)
        for event, data in _sse_data(response.text):
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            if event == "error" or "error" in chunk:
                return Stream(pieces, final, chunk, event)
            if self.name == "tgi":
                if not chunk["token"]["special"]:
                    pieces.append(chunk["token"]["text"])
                final = chunk if chunk["details"] is not None else final
            else:
                pieces.append(chunk["choices"][0]["text"])
                final = chunk if chunk["choices"][0]["finish_reason"] is not None else final
        return Stream(pieces, final)


TGI = Protocol("tgi", "/generate", "/generate_stream", 422, "inputs", "max_new_tokens", "parameters")
OPENAI = Protocol("openai", "/v1/completions", "/v1/completions", 400, "prompt", "max_tokens", None)
OLLAMA = Protocol("ollama", "/api/generate", "/api/generate", 400, "prompt", "num_predict", "options")
PROTOCOLS = (TGI, OPENAI, OLLAMA)
PROTOCOL_IDS = [p.name for p in PROTOCOLS]


def protocol_of(path: str) -> Protocol:
    return OPENAI if path.startswith("/v1/") else OLLAMA if path.startswith("/api/") else TGI


# --------------------------------------------------------------------------- the error shapes


def tgi_error_type(status: int) -> str:
    """TGI's error_type for a status (its router's names; 'authentication' is GreenCode's)."""
    if status == 401:
        return "authentication"
    if status in (429, 503):
        return "overloaded"
    return "validation" if status < 500 else "generation"


def openai_error_type(status: int) -> str:
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")


def check_error_body(protocol: Protocol, body: Any, status: int) -> str:
    """Assert ``body`` is exactly the protocol's error object for ``status``; returns its message."""
    if protocol.name == "openai":
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["type"] == openai_error_type(status), error
        message = error["message"]
    elif protocol.name == "ollama":
        assert isinstance(body, dict) and set(body) == {"error"}, body
        message = body["error"]
    else:
        assert isinstance(body, dict) and set(body) == {"error", "error_type"}, body
        assert body["error_type"] == tgi_error_type(status), body
        message = body["error"]
    assert isinstance(message, str) and message, body
    return message


def assert_error(response: httpx.Response, status: int, names: str | None = None,
                 protocol: Protocol | None = None) -> str:
    """A refusal: exactly ``status``, a JSON body in the client's error shape naming ``names``; returns the message.

    429 and 503 must also say when to come back (Retry-After, whole seconds >= 1).
    """
    protocol = protocol or protocol_of(response.request.url.path)
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    message = check_error_body(protocol, response.json(), status)
    if names is not None:
        assert names in message, message
        if protocol.name == "openai" and status in (400, 422):
            assert response.json()["error"]["param"] is not None
    if status in (429, 503):
        assert int(response.headers.get("retry-after", "0")) >= 1, response.headers
    return message


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """Sum of one Prometheus sample over the label sets that match ``labels``."""
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total
