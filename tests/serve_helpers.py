"""Real GreenCode Serve apps on 127.0.0.1 for the serving tests, and what those tests share.

The apps run on a local 2-CPU Ray and are called over real HTTP. Starting Ray, Serve and an app
costs 15-50 s on the shared 2-core machine, so test modules that declare a ``SERVE_APP`` and run
one after the other share one Ray + Serve (``shared_app``), and those naming the same app share
the app; everything stops after the last of them.

Models, built in the replica (both real Hugging Face models with the real SmolLM2 tokenizer):

- ``tiny_loader``: the seeded tiny random Llama of ``conftest.make_tiny`` (tests/test_serve.py's);
- ``abuse_loader``: a *scripted* tiny OPT (``scripted_model``) whose learned position embeddings
  make it say fixed token sequences. Every decoder block is an identity (zero output
  projections) and token embeddings are zero, so the last position alone picks the next token: a
  prompt of L tokens continues with the script placed at positions L-1.., then EOS, under greedy
  and sampled decoding alike; unscripted positions say " x". That gives exact, known completions
  (any Unicode, split across byte tokens where the script says). The token " poison" has a NaN
  embedding: a sequence that feeds it to the model gets NaN logits from that step on, in its own
  row only, which is a server-side generation fault on demand.

Protocol descriptions (``TGI``, ``OPENAI``, ``OLLAMA``) build each client's body for the same
request and read its text, stream and error shape, so one test runs over all three.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

import conftest
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


FAULT_WORD = " kaboom"  # faulty_loader's model raises on it
FAULT_SECRET = "secret-detail-of-the-fault"  # what its exception says: no reply may show it


def faulty_loader(cfg):
    """``tiny_loader``'s model, whose embedding raises ``RuntimeError(FAULT_SECRET)`` on a sequence holding the last
    token of ``FAULT_WORD``: a server fault (a bug, not a request error) on demand, in that request's batch only."""
    lm = tiny_loader(cfg)
    trigger = lm.tokenizer(FAULT_WORD)["input_ids"][-1]

    def explode(module, args):
        if bool((args[0] == trigger).any()):
            raise RuntimeError(f"{FAULT_SECRET}: token {trigger} in {args[0].tolist()}")

    lm.model.get_input_embeddings().register_forward_pre_hook(explode)
    return lm


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


def scripted_model(tokenizer, scripts: Sequence[Script], poison: Sequence[int] = (), default_token: int | None = None,
                   hidden: int = 256):
    """The scripted tiny OPT (see the module docstring); checks itself on every script before returning.

    Positions no script covers predict ``default_token`` (logit 8 against 0: greedy always picks
    it, sampling at temperature 1 picks it about 6% of the time).
    """
    from transformers import OPTConfig, OPTForCausalLM

    from greencode.config import GenerationConfig
    from greencode.gates import FullGate
    from greencode.generate import GatedGenerator
    from greencode.modeling import wrap_model

    eos = tokenizer.eos_token_id
    next_at: dict[int, int] = {}  # position -> the token that position predicts
    for s in scripts:
        start = len(tokenizer(s.prompt)["input_ids"]) - 1
        for offset, token in enumerate((*s.tokens, eos)):
            if next_at.setdefault(start + offset, token) != token:
                raise ValueError(f"script of {s.prompt[-30:]!r} overlaps another one at position {start + offset}: "
                                 "give the prompts lengths further apart")
    if len(next_at) >= hidden:
        raise ValueError(f"scripts use {len(next_at)} positions; the model has a basis of {hidden - 1}")

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=len(tokenizer), hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=4,
                    num_attention_heads=4, max_position_embeddings=1024, word_embed_proj_dim=hidden,
                    tie_word_embeddings=False, eos_token_id=eos, bos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    model = OPTForCausalLM(cfg).eval()
    dec = model.model.decoder
    default_dim = hidden - 1
    with torch.no_grad():
        for layer in dec.layers:  # identity blocks: the residual stream carries the position embedding through
            for proj in (layer.self_attn.out_proj, layer.fc2):
                proj.weight.zero_()
                proj.bias.zero_()
        dec.embed_tokens.weight.zero_()
        dec.embed_tokens.weight[list(poison)] = float("nan")
        dec.embed_positions.weight.zero_()
        model.lm_head.weight.zero_()
        dec.final_layer_norm.bias.zero_()
        if default_token is not None:
            dec.final_layer_norm.bias[default_dim] = 1.0
            model.lm_head.weight[default_token, default_dim] = 8.0
        offset = dec.embed_positions.offset
        for dim, (position, token) in enumerate(sorted(next_at.items())):
            dec.embed_positions.weight[position + offset, dim] = 1.0
            model.lm_head.weight[token, dim] = 4.0  # a logit of ~64 against <= 8 for every other token
    lm = wrap_model(model, tokenizer)
    clean = [s for s in scripts if not set(s.tokens) & set(poison)]
    if clean:  # one batch: rows are independent and positions ignore the left padding
        steps = GenerationConfig(max_new_tokens=max(len(s.tokens) for s in clean) + 1)
        results = GatedGenerator(lm).generate([s.prompt for s in clean], FullGate(), steps)
        for s, result in zip(clean, results, strict=True):
            if tuple(result.token_ids) != (*s.tokens, eos):
                raise AssertionError(f"the scripted model does not say its script for {s.prompt[-30:]!r}")
    return lm


# --------------------------------------------------------------------------- the apps the abuse tests share


def padded_prompts(tokenizer, tails: dict[str, tuple[str, int]], first: int = 200) -> dict[str, str]:
    """Prompts ``' a' * n + tail`` of increasing token lengths from ``first``, each ``room`` positions apart.

    Short prompts (what other tests send) never reach position ``first``, so they never meet a script.
    """
    prompts, length = {}, first
    for name, (tail, room) in tails.items():
        pad = length - len(tokenizer(tail)["input_ids"]) if tail else length
        prompts[name] = " a" * pad + tail
        length += room + 2
    return prompts


TEXTS = {  # what the scripted model says, and how its tokens split the text
    "cjk_bytes": ("# 日本語のコメント\n", "bytes"),
    "emoji_bytes": (" 😀 👩\u200d💻 🇯🇵 ok", "bytes"),
    "mixed": (" Ελληνικά العربية ✓ 中文 e\u0301 x", "natural"),
    "stop": ("# 日本語です\nprint('ok')\n", "bytes"),
    "ascii": (" return fib(n - 1) + fib(n - 2)\n", "natural"),
    "poison_mid": (" one two three poison four", "natural"),
}
POISON_WORD = " poison"  # one token; its embedding is NaN in the abuse model
DEFAULT_WORD = " x"  # what the abuse model says wherever no script is placed


@dataclass(frozen=True)
class AbuseScripts:
    """The scripts of the shared abuse model, computed the same way in the driver and the replica."""

    scripts: dict[str, Script]
    texts: dict[str, str]
    poison: int
    default: int
    poison_prompt: str  # a prompt holding the poison token: NaN from the prompt pass on

    @classmethod
    def build(cls, tokenizer) -> AbuseScripts:
        tokens = {name: byte_tokens(tokenizer, text) if split == "bytes" else tuple(tokenizer(text)["input_ids"])
                  for name, (text, split) in TEXTS.items()}
        tails = {name: ("", len(t)) for name, t in tokens.items()} | {"poison_prompt": (POISON_WORD, 0)}
        prompts = padded_prompts(tokenizer, tails)
        [poison] = tokenizer(POISON_WORD)["input_ids"]
        [default] = tokenizer(DEFAULT_WORD)["input_ids"]
        return cls({name: Script(prompts[name], t) for name, t in tokens.items()},
                   {name: text for name, (text, _) in TEXTS.items()}, poison, default, prompts["poison_prompt"])


def abuse_loader(cfg):
    """Replica-side loader of the shared abuse model (scripts, poison token, default token)."""
    tokenizer = smollm2_tokenizer()
    plan = AbuseScripts.build(tokenizer)
    return scripted_model(tokenizer, list(plan.scripts.values()), [plan.poison], plan.default)


ABUSE_CONFIG = {"max_batch_size": 8, "batch_wait_timeout_s": 0.05}  # every request here names its max tokens


@pytest.fixture(scope="module")
def server(request) -> Iterator[str]:
    """The real Serve app on 127.0.0.1 of a module with ``SERVE_APP = "abuse"``; modules serving another app define
    their own ``server``, which takes precedence (tests/conftest.py registers this module as a plugin)."""
    yield from shared_app(request, "abuse", lambda: ABUSE_CONFIG, abuse_loader)


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    """An HTTP client of the abuse app (the slowest request, a 2 MiB body, stays well within its timeout)."""
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def plan(tokenizer) -> AbuseScripts:
    return AbuseScripts.build(tokenizer)


def save_policy(path) -> str:
    """An untrained exit policy for ``tiny_loader``'s model (its fingerprint), so a server can load one."""
    from greencode.policy import ExitPolicy

    lm = make_tiny("llama")
    torch.manual_seed(0)
    policy = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint=lm.fingerprint,
                        metadata={"note": "test policy, untrained"})
    return str(policy.save(path))


# --------------------------------------------------------------------------- running an app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_instance() -> Iterator[str]:
    """A local 2-CPU Ray with Serve's HTTP proxy on a free 127.0.0.1 port; yields the base URL."""
    import ray
    from ray import serve

    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never another process's Ray
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(cfg: dict[str, Any], loader: Callable[[Any], Any]) -> None:
    """Deploy the GreenCode app (a ServeConfig mapping + model loader) at / and its /health app, replacing those up."""
    import ray.cloudpickle

    from greencode.config import ServeConfig, validate
    from serve_app.app import build_app_with_loader
    from serve_app.probe import serve_apps

    # Loaders travel to the replica by value: the tests directory is not importable there.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(conftest)
    config = validate(ServeConfig, {"num_cpus": 1, **cfg}, source="test serve config")
    serve_apps(config, build_app_with_loader(config, loader))


_running: dict[str, Any] = {}  # url and exit stack of the Serve instance, name of the app deployed on it


def _stop() -> None:
    if _running:
        _running.pop("stack").close()
        _running.clear()


def shared_app(request, name: str, cfg: Callable[[], dict[str, Any]], loader: Callable[[Any], Any]) -> Iterator[str]:
    """Module fixture body: the app ``name`` (deployed with ``cfg()`` and ``loader`` unless it is up).

    Ray and Serve stay up after the module only if the next module of this run declares a
    ``SERVE_APP`` and uses the ``server`` fixture (nothing else runs while they are up); the app
    is redeployed only when that module names another one.
    """
    if not _running:
        stack = ExitStack()
        _running.update(url=stack.enter_context(serve_instance()), stack=stack)
    if _running.get("name") != name:
        deploy(cfg(), loader)
        _running["name"] = name
    try:
        yield _running["url"]
    finally:
        if not _next_module_serves(request):
            _stop()


def _next_module_serves(request) -> bool:
    upcoming = conftest._next_item.get("item")
    return (upcoming is not None and hasattr(upcoming.module, "SERVE_APP")
            and conftest.next_module_uses(request, "server"))


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
    failure_status: int  # what it answers when generation fails (a server fault)
    prompt_field: str
    max_tokens_field: str
    knobs_key: str | None  # where sampling/gate knobs go (None = top level)

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

    def field(self, knob: str) -> str:
        """How this protocol's error messages name a knob (``parameters.stop``, ``stop``, ``options.stop``)."""
        return f"{self.knobs_key}.{knob}" if self.knobs_key else knob

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


TGI = Protocol("tgi", "/generate", "/generate_stream", 422, 424, "inputs", "max_new_tokens", "parameters")
OPENAI = Protocol("openai", "/v1/completions", "/v1/completions", 400, 500, "prompt", "max_tokens", None)
OLLAMA = Protocol("ollama", "/api/generate", "/api/generate", 400, 500, "prompt", "num_predict", "options")
PROTOCOLS = (TGI, OPENAI, OLLAMA)
PROTOCOL_IDS = [p.name for p in PROTOCOLS]


def protocol_of(path: str) -> Protocol:
    return OPENAI if path.startswith("/v1/") else OLLAMA if path.startswith("/api/") else TGI


# --------------------------------------------------------------------------- the error shapes


def tgi_error_type(status: int) -> str:
    """TGI's error_type for a status (its router's names and codes; 'authentication' is GreenCode's)."""
    if status == 401:
        return "authentication"
    if status in (429, 503):
        return "overloaded"
    return "generation" if status == 424 or status >= 500 else "validation"


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
