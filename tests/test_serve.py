"""The Serve app over real HTTP on 127.0.0.1, called with the official client libraries.

One app on a tiny random Llama (real SmolLM2 tokenizer: no FIM tokens) and a policy whose exit
probability varies with the hidden state, started once for the module on a local Ray (2 CPUs);
a second app on a tiny Qwen2-shaped model with a Qwen FIM tokenizer for fill-in-the-middle.
Every request carries the bearer key the apps are started with.
"""

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

import conftest
from conftest import fim_tokenizer, make_tiny, make_tiny_qwen_fim

log = logging.getLogger(__name__)

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "def fibonacci(n):\n    "
FIM_PREFIX, FIM_SUFFIX = "def area(r):\n    return ", "\n\nprint(area(2.0))\n"
STARCODER_FIM = f"<fim_prefix>{FIM_PREFIX}<fim_suffix>{FIM_SUFFIX}<fim_middle>"  # llm-vscode's default template


def tiny_loader(cfg):
    """Replica-side model loader: the same seeded tiny model the driver fingerprints."""
    from transformers import AutoTokenizer

    from greencode.config import ModelConfig
    from greencode.modeling import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(ModelConfig(name="embedded"))[0])
    return make_tiny("llama", tokenizer=tokenizer)


def save_varying_policy(lm, path: Path) -> Path:
    """A policy for the tiny model whose p[exit] varies with the hidden state, over about [0.26, 0.8].

    The tiny model's hidden states have norm ~0.3, so the input layer is scaled up (x50) to
    spread the tanh features and the output layer (x3, zero bias) to spread p[exit] around 0.5.
    """
    from greencode.policy import ExitPolicy

    torch.manual_seed(1)
    policy = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint=lm.fingerprint,
                        metadata={"note": "test policy, untrained"})
    with torch.no_grad():
        policy.net[0].weight.mul_(50.0)
        policy.net[-1].weight.mul_(3.0)
        policy.net[-1].bias.zero_()
    return policy.save(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    import ray
    import ray.cloudpickle
    from ray import serve

    from greencode.config import ServeConfig
    from workflows.serve import run

    # The loader travels to the replica by value: neither this module nor conftest is importable there.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(conftest)
    policy_path = save_varying_policy(make_tiny("llama", tokenizer=tokenizer),
                                      tmp_path_factory.mktemp("policy") / "exit_policy.pt")
    cfg = ServeConfig(policy_path=str(policy_path), gate={"threshold": 0.5}, generation={"max_new_tokens": 8},
                      max_context_tokens=256, max_batch_size=8, batch_wait_timeout_s=0.05, api_key=API_KEY,
                      num_cpus=1)
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never another process's Ray
    try:
        run(cfg, port=port, model_loader=tiny_loader)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def fim_server(server):
    """A second app on the same Ray: the tiny Qwen2-shaped model with a Qwen FIM tokenizer, under /fim."""
    from ray import serve

    from greencode.config import ServeConfig
    from serve_app.app import build_app_with_loader

    cfg = ServeConfig(generation={"max_new_tokens": 8}, default_gate="full", api_key=API_KEY, num_cpus=1,
                      max_context_tokens=256)
    serve.run(build_app_with_loader(cfg, make_tiny_qwen_fim), name="fim", route_prefix="/fim")
    yield f"{server}/fim"
    serve.delete("fim")


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as client:
        yield client


def metric(http, name: str) -> float:
    """Sum of one Prometheus metric over its label sets."""
    text = http.get("/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith(name + "_created"))


# --------------------------------------------------------------------------- request schemas, builder (no Ray)


def test_nested_llm_ls_parameters_merge_and_unknown_knobs_are_reported():
    from serve_app.schemas import TGIRequest

    body = {"inputs": "x", "parameters": {"max_new_tokens": 5, "parameters": {"max_new_tokens": 9, "top_k": 3,
                                                                             "return_full_text": True}}}
    ask = TGIRequest.model_validate(body).to_ask()
    assert (ask.max_new_tokens, ask.include_prompt, ask.ignored) == (5, True, ["top_k"])


def test_ollama_body_spellings_and_stream_default():
    from serve_app.schemas import OllamaRequest

    green = OllamaRequest.model_validate({"inputs": "x", "options": {"num_predict": 7, "RL_agent_thresh": 0.8}})
    ask = green.to_ask()
    assert (ask.prompt, ask.max_new_tokens, ask.gate["threshold"], green.streams()) == ("x", 7, 0.8, False)
    assert OllamaRequest.model_validate({"prompt": "x"}).streams()
    assert not OllamaRequest.model_validate({"prompt": "x", "stream": False}).streams()
    sampled = OllamaRequest.model_validate({"prompt": "x", "parameters": {"do_sample": True}}).to_ask()
    assert sampled.temperature == 1.0


def test_shipped_serve_config_is_valid_and_bad_configs_name_the_field():
    from greencode.config import ConfigError, ServeConfig, load_yaml, validate
    from serve_app.app import build_app

    app = load_yaml(Path(__file__).parents[1] / "serve_app" / "config.yaml")["applications"][0]
    assert app["import_path"] == "serve_app.app:build_app"
    validate(ServeConfig, app["args"])
    with pytest.raises(ConfigError, match="max_batch_size"):
        build_app({"max_batch_size": 0})


def test_cli_flags_become_the_serve_config(tmp_path, monkeypatch):
    from greencode.config import ConfigError
    from workflows.serve import parse

    policy = tmp_path / "p.pt"
    policy.write_bytes(b"")
    monkeypatch.setenv("GREENCODE_API_KEY", "from-env")
    cfg, args = parse(["--model", "runs/lite", "--policy", str(policy), "--replicas", "2", "--num-gpus", "0.5",
                       "--threshold", "0.8", "--set", "max_context_tokens=4096", "--port", "9000"])
    assert (cfg.model.name, cfg.num_replicas, cfg.num_gpus, cfg.gate.threshold, cfg.max_context_tokens) == (
        "runs/lite", 2, 0.5, 0.8, 4096)
    assert cfg.api_key == "from-env" and args.port == 9000
    assert cfg.gate.temperature == 1.0 and cfg.generation.max_new_tokens == 60  # defaults from the config, not the CLI
    with pytest.raises(ConfigError, match="policy_path"):
        parse(["--policy", str(tmp_path / "missing.pt")])
    with pytest.raises(ConfigError, match="gate.threshold"):
        parse(["--threshold", "2"])
    assert cfg.allowed_hosts == ["127.0.0.1", "localhost", "::1"]  # loopback: only its own names (DNS rebinding)
    exposed = parse(["--host", "0.0.0.0"])[0].allowed_hosts  # its own names and addresses, never '*'
    assert exposed[:3] == ["127.0.0.1", "localhost", "::1"] and socket.gethostname().lower() in exposed
    assert "*" not in exposed
    assert parse(["--host", "0.0.0.0", "--set", "allowed_hosts=[gpu1.lan]"])[0].allowed_hosts == ["gpu1.lan"]
    assert parse(["--allowed-origin", "https://ide.example"])[0].allowed_origins == ["https://ide.example"]
    monkeypatch.setenv("GREENCODE_API_KEY", "")
    with pytest.raises(ConfigError, match="api_key"):
        parse([])


def test_an_exposed_bind_without_a_key_refuses_to_start_unless_no_auth(tmp_path, monkeypatch):
    from greencode.config import ConfigError
    from workflows.serve import main, parse

    monkeypatch.delenv("GREENCODE_API_KEY", raising=False)
    monkeypatch.delenv("GREENCODE_API_KEYS_FILE", raising=False)
    with pytest.raises(ConfigError, match="--no-auth"):
        parse(["--host", "0.0.0.0"])
    with pytest.raises(SystemExit) as exit_info:  # the command itself: an error naming the flag, before Ray starts
        main(["--host", "192.0.2.1"])
    assert exit_info.value.code != 0
    cfg, _ = parse(["--host", "0.0.0.0", "--no-auth"])
    assert cfg.tenant_keys == {} and "*" not in cfg.allowed_hosts
    assert parse(["--host", "127.0.0.1"])[0].tenant_keys == {}  # loopback without a key stays the default


def test_a_key_file_names_one_tenant_per_key(tmp_path, monkeypatch):
    from greencode.config import ConfigError
    from workflows.serve import parse

    monkeypatch.delenv("GREENCODE_API_KEY", raising=False)
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nalice = key-a\n\nbob=key-b\n")
    cfg, _ = parse(["--host", "0.0.0.0", "--api-key-file", str(keys)])
    assert cfg.tenant_keys == {"alice": "key-a", "bob": "key-b"}
    monkeypatch.setenv("GREENCODE_API_KEYS_FILE", str(keys))
    monkeypatch.setenv("GREENCODE_API_KEY", "key-d")
    assert parse([])[0].tenant_keys == {"alice": "key-a", "bob": "key-b", "default": "key-d"}
    for text, error in [("alice key-a\n", "line 1: expected 'tenant=key'"), ("a=1\na=2\n", "line 2: tenant 'a'"),
                        ("a=same\nb=same\n", "same key"), ("# nothing\n", "no 'tenant=key' line")]:
        keys.write_text(text)
        with pytest.raises(ConfigError, match=error):
            parse([])


def qwen_ids(tok, prefix, suffix):
    """PSM with Qwen's sentinels, the code as plain text: what the served Qwen model must receive."""
    p, s, m = tok.convert_tokens_to_ids(["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"])
    plain = tok.encode(prefix, add_special_tokens=False), tok.encode(suffix, add_special_tokens=False)
    return [p, *plain[0], s, *plain[1], m]


def test_fim_bodies_get_the_models_own_token_layout():
    """Ollama and OpenAI `suffix`, llm-vscode's and Continue's pre-formatted prompts: one layout, the model's tokens."""
    from greencode.config import ConfigError
    from serve_app.prompts import PromptBuilder
    from serve_app.schemas import CompletionRequest, OllamaRequest, TGIRequest

    tok = fim_tokenizer("qwen")
    expected = qwen_ids(tok, FIM_PREFIX, FIM_SUFFIX)
    asks = {
        "ollama suffix (Continue)": OllamaRequest.model_validate(
            {"model": "greencode", "prompt": FIM_PREFIX, "suffix": FIM_SUFFIX, "raw": True, "stream": True}).to_ask(),
        "openai suffix": CompletionRequest.model_validate(
            {"model": "greencode", "prompt": FIM_PREFIX, "suffix": FIM_SUFFIX, "max_tokens": 8}).to_asks()[0],
        "llm-vscode tgi": TGIRequest.model_validate(
            {"inputs": STARCODER_FIM, "parameters": {"max_new_tokens": 60, "temperature": 0.2}}).to_ask(),
        "llm-vscode ollama": OllamaRequest.model_validate(
            {"prompt": STARCODER_FIM, "model": "greencode", "stream": False, "parameters": {"max_new_tokens": 60}}
        ).to_ask(),
        "continue qwen template": OllamaRequest.model_validate(
            {"prompt": f"<|fim_prefix|>{FIM_PREFIX}<|fim_suffix|>{FIM_SUFFIX}<|fim_middle|>", "raw": True}).to_ask(),
    }
    builder = PromptBuilder(tok)
    assert {name: builder.ids(ask) for name, ask in asks.items()} == {name: expected for name in asks}
    assert builder.ids(OllamaRequest.model_validate({"prompt": FIM_PREFIX}).to_ask()) == \
        tok.encode(FIM_PREFIX, add_special_tokens=False)  # no suffix: plain completion

    starcoder = fim_tokenizer("starcoder")
    p, s, m = starcoder.convert_tokens_to_ids(["<fim_prefix>", "<fim_suffix>", "<fim_middle>"])
    spm = PromptBuilder(starcoder, "spm").ids(asks["openai suffix"])
    assert spm == [p, s, *starcoder.encode(FIM_SUFFIX, add_special_tokens=False), m,
                   *starcoder.encode(FIM_PREFIX, add_special_tokens=False)]
    with pytest.raises(ConfigError, match="fim_order"):
        PromptBuilder(tok, "spm")  # Qwen was trained PSM only


def test_a_model_without_fim_tokens_refuses_fim_naming_the_field(tokenizer):
    from serve_app.errors import ApiError
    from serve_app.prompts import PromptBuilder
    from serve_app.schemas import OllamaRequest, TGIRequest

    builder = PromptBuilder(tokenizer)  # the embedded SmolLM2 tokenizer
    with pytest.raises(ApiError, match="fill-in-the-middle") as err:
        builder.ids(OllamaRequest.model_validate({"prompt": FIM_PREFIX, "suffix": FIM_SUFFIX}).to_ask())
    assert err.value.param == "suffix"
    with pytest.raises(ApiError, match="fillInTheMiddle.enabled") as err:
        builder.ids(TGIRequest.model_validate({"inputs": STARCODER_FIM}).to_ask())
    assert err.value.param == "prompt"


def test_serve_app_does_not_reach_into_workflows():
    import serve_app.app

    assert not hasattr(serve_app.app, "run") and not hasattr(serve_app.app, "main")


# --------------------------------------------------------------------------- official clients


@pytest.mark.ray
def test_openai_client_plain_and_stream(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY)
    full = client.completions.create(model="greencode", prompt=PROMPT, max_tokens=6, extra_body={"gate": "full"})
    choice = full.choices[0]
    assert choice.finish_reason == "length" and full.usage.completion_tokens == 6
    details = full.model_extra["greencode"]
    assert details["layers_per_token"] == [12] * 6 and details["energy_j"] is None  # no meter on this CPU

    chunks = list(client.completions.create(model="greencode", prompt=PROMPT, max_tokens=6, stream=True,
                                            extra_body={"gate": "full"}))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].model_extra["greencode"]["mean_layers"] == 12


@pytest.mark.ray
def test_text_generation_client_plain_and_stream(server):
    from text_generation import Client

    client = Client(server, headers=AUTH, timeout=60)
    response = client.generate(PROMPT, max_new_tokens=5)  # POST / -> [{...}], with nulls for unset knobs
    assert response.details.generated_tokens == 5 and len(response.details.tokens) == 5
    sent = httpx.post(server, headers=AUTH, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": True,
                                                                                  "watermark": False, "top_k": None}},
                      timeout=60)
    assert sent.json()[0]["greencode"]["ignored_parameters"] == []
    assert response.details.finish_reason.value == "length"

    events = list(client.generate_stream(PROMPT, max_new_tokens=5))
    assert [e.token.id for e in events] == [t.id for t in response.details.tokens]
    assert events[-1].generated_text == response.generated_text
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].details.generated_tokens == 5


@pytest.mark.ray
def test_ollama_client_plain_and_stream(server):
    from ollama import Client

    client = Client(host=server, headers=AUTH)
    response = client.generate(model="greencode", prompt=PROMPT, options={"num_predict": 5, "top_k": 40})
    assert response.done and response.eval_count == 5 and response.done_reason == "length"

    parts = list(client.generate(model="greencode", prompt=PROMPT, options={"num_predict": 5}, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.response for p in parts) == response.response


@pytest.mark.ray
def test_ollama_stream_is_the_default_and_reports_ignored_options(http):
    body = {"model": "x", "prompt": PROMPT, "options": {"num_predict": 3, "top_k": 40}}
    response = http.post("/api/generate", json=body)
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[-1]["done"] and lines[-1]["greencode"]["ignored_parameters"] == ["top_k"]
    assert http.post("/api/generate", json={"model": "x"}).json()["done_reason"] == "load"  # Ollama's warm-up call


# --------------------------------------------------------------------------- what llm-ls sends


@pytest.mark.ray
@pytest.mark.parametrize("path, body, text_key", [
    # backend "tgi"/"huggingface" with the default llm.requestBody
    ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 60, "temperature": 0.2, "top_p": 0.95,
                                                    "return_full_text": False}}, "generated_text"),
    # the nested quirk when the user's requestBody has no "parameters"
    ("/generate", {"inputs": PROMPT, "parameters": {"parameters": {"return_full_text": False}}}, "generated_text"),
    # backend "ollama"
    ("/api/generate", {"parameters": {"max_new_tokens": 60, "temperature": 0.2, "top_p": 0.95},
                       "prompt": PROMPT, "model": "greencode", "stream": False}, "response"),
    # backend "openai"
    ("/v1/completions", {"parameters": {"max_new_tokens": 60, "temperature": 0.2, "top_p": 0.95},
                         "prompt": PROMPT, "model": "greencode", "stream": False}, None),
    # the published GREEN-CODE endpoint: Ollama path, TGI body, trailing slash, no redirect
    ("/api/generate/", {"inputs": PROMPT, "options": {"num_predict": 4, "temperature": 0.2, "top_p": 0.95,
                                                       "RL_agent_thresh": 0.9}}, "generated_text"),
])
def test_llm_ls_bodies(http, path, body, text_key):
    response = http.post(path, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    text = data["choices"][0]["text"] if text_key is None else data[text_key]
    assert isinstance(text, str) and text
    assert data["greencode"]["mean_layers"] > 0


@pytest.mark.ray
def test_nested_parameters_are_merged(http):
    body = {"inputs": PROMPT, "parameters": {"parameters": {"max_new_tokens": 3, "return_full_text": True}}}
    data = http.post("/generate", json=body).json()
    assert data["details"]["generated_tokens"] == 3 and data["generated_text"].startswith(PROMPT)


# --------------------------------------------------------------------------- the energy knob


@pytest.mark.ray
def test_raising_the_threshold_uses_more_layers(http):
    """Same prompt, greedy: a higher T keeps tokens in the network longer (METHOD §5)."""
    def mean_layers(threshold: float) -> float:
        body = {"inputs": PROMPT, "options": {"num_predict": 12, "RL_agent_thresh": threshold}}
        data = http.post("/api/generate/", json=body).json()
        assert data["greencode"]["gate"].startswith(f"policy(T={threshold}")
        return data["greencode"]["mean_layers"]

    low, mid, high = mean_layers(0.2), mean_layers(0.5), mean_layers(0.9)
    assert low < mid < high, (low, mid, high)
    assert high > 10 and low < 6


@pytest.mark.ray
def test_gate_modes_per_request(http):
    body = {"prompt": PROMPT, "max_tokens": 4, "gate": "fixed", "exit_layer": 6}
    fixed = http.post("/v1/completions", json=body).json()
    assert fixed["greencode"]["layers_per_token"] == [12, 6, 6, 6]  # the prefill token always runs every layer
    confident = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "gate": "confidence",
                                                                              "confidence": 1e-9}}).json()
    assert confident["greencode"]["layers_per_token"][1:] == [4, 4, 4]


@pytest.mark.ray
def test_concurrent_requests_are_batched_and_still_exit_per_sequence(server):
    """A burst with two gate settings: grouped batches, and each answer equals the same request made alone."""
    bodies = [{"inputs": f"{PROMPT}# case {i}\n", "parameters": {"max_new_tokens": 6, "threshold": t}}
              for i, t in enumerate([0.3, 0.7] * 3)]

    async def burst():
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))

    together = [r.json() for r in asyncio.run(burst())]
    assert max(d["greencode"]["batch_size"] for d in together) > 1
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as client:
        alone = [client.post("/generate", json=b).json() for b in bodies]
    assert [d["greencode"]["batch_size"] for d in alone] == [1] * len(bodies)
    for t, a in zip(together, alone):
        assert t["greencode"]["layers_per_token"] == a["greencode"]["layers_per_token"]
        assert t["generated_text"] == a["generated_text"]


# --------------------------------------------------------------------------- streams, disconnects, ops


@pytest.mark.ray
def test_tgi_generate_stream_sse(http):
    with http.stream("POST", "/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 4 and events[-1]["details"]["finish_reason"] == "length"
    assert len(events[-1]["greencode"]["layers_per_token"]) == 4


@pytest.mark.ray
def test_client_disconnect_stops_generation(server, http):
    cancelled_before = metric(http, "greencode_cancelled_requests_total")
    tokens_before = metric(http, "greencode_generated_tokens_total")
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 240, "gate": "full"}}
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as client, \
            client.stream("POST", "/generate_stream", json=body) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.time() + 20
    while metric(http, "greencode_cancelled_requests_total") <= cancelled_before and time.time() < deadline:
        time.sleep(0.2)
    assert metric(http, "greencode_cancelled_requests_total") == cancelled_before + 1
    generated = metric(http, "greencode_generated_tokens_total") - tokens_before
    time.sleep(1.0)
    assert metric(http, "greencode_generated_tokens_total") - tokens_before == generated < 240


@pytest.mark.ray
def test_health_metrics_and_openapi(server, http):
    health = httpx.get(f"{server}/health", timeout=60).json()  # no key needed
    assert health["exit_points"] == [4, 6, 10] and health["default_gate"] == "policy"
    text = http.get("/metrics").text
    for name in ("greencode_requests_total", "greencode_generated_tokens_total", "greencode_layers_per_token_bucket",
                 "greencode_mean_layers_per_token", "greencode_request_latency_seconds_bucket",
                 "greencode_energy_unmeasured_requests_total"):
        assert name in text
    paths = httpx.get(f"{server}/openapi.json", timeout=60).json()["paths"]
    assert {"/generate", "/generate_stream", "/", "/api/generate", "/api/show", "/v1/completions"} <= set(paths)
    show = http.post("/api/show", json={"model": "greencode"}).json()
    assert show["model_info"]["llama.context_length"] == 256
    assert show["capabilities"] == ["completion"] and ".Suffix" not in show["template"]  # no FIM tokens


@pytest.mark.ray
def test_prefix_cache_per_response_and_in_metrics(http):
    """The same prompt twice: the second reuses all but its last token and answers the same; cache_prompt: false
    neither reads nor writes the cache."""
    reused_before = metric(http, "greencode_prefix_cache_reused_tokens_total")
    body = {"model": "greencode", "prompt": PROMPT + "# prefix cache\n", "max_tokens": 5, "gate": "full"}
    first, second = (http.post("/v1/completions", json=body).json() for _ in range(2))
    prompt_tokens = second["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == prompt_tokens - 1
    assert second["choices"][0]["greencode"]["cached_prompt_tokens"] == prompt_tokens - 1
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    off = http.post("/v1/completions", json={**body, "cache_prompt": False}).json()
    assert off["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert off["choices"][0]["text"] == first["choices"][0]["text"]
    tgi = http.post("/generate", json={"inputs": body["prompt"], "parameters": {"max_new_tokens": 5, "gate": "full"}})
    assert tgi.json()["greencode"]["cached_prompt_tokens"] == prompt_tokens - 1
    ollama = http.post("/api/generate", json={"prompt": body["prompt"], "stream": False,
                                              "options": {"num_predict": 5, "gate": "full"}}).json()
    assert ollama["greencode"]["cached_prompt_tokens"] == prompt_tokens - 1
    assert metric(http, "greencode_prefix_cache_reused_tokens_total") - reused_before >= 3 * (prompt_tokens - 1)
    text = http.get("/metrics").text
    for name in ("greencode_prefix_cache_lookups_total", "greencode_prefix_cache_hits_total",
                 "greencode_prefix_cache_hit_rate", "greencode_prefix_cache_bytes", "greencode_prefix_cache_evictions"):
        assert name in text
    assert 0 < metric(http, "greencode_prefix_cache_bytes") <= metric(http, "greencode_prefix_cache_budget_bytes")


@pytest.mark.ray
def test_type_along_replies_carry_cached_completion_tokens_in_every_protocol(http, tokenizer):
    """Issue 22: after a suggestion, a prompt that typed its first tokens is answered from the stored completion
    (the rest of it, then decoding) with the cold request's text; every protocol reports the count."""
    from greencode.tokens import encode

    prompt, n = PROMPT + "# type along\n", 8
    first = http.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": n, "gate": "full"}})
    ids = [t["id"] for t in first.json()["details"]["tokens"]]
    prompt_ids = encode(tokenizer, prompt)
    # typed text that ends on a token boundary which re-tokenizes to the suggestion's own tokens
    k = next(k for k in range(1, len(ids))
             if encode(tokenizer, prompt + tokenizer.decode(ids[:k])) == prompt_ids + ids[:k])
    along, served = prompt + tokenizer.decode(ids[:k]), len(ids) - k
    openai = {"model": "greencode", "prompt": along, "max_tokens": n, "gate": "full"}
    cold = http.post("/v1/completions", json={**openai, "cache_prompt": False}).json()
    assert cold["greencode"]["cached_completion_tokens"] == 0
    expected = cold["choices"][0]["text"]

    tgi = http.post("/generate", json={"inputs": along, "parameters": {"max_new_tokens": n, "gate": "full"}}).json()
    assert (tgi["generated_text"], tgi["greencode"]["cached_completion_tokens"]) == (expected, served)
    assert [t["id"] for t in tgi["details"]["tokens"]][:served] == ids[k:]
    reply = http.post("/v1/completions", json=openai).json()
    assert (reply["choices"][0]["text"], reply["greencode"]["cached_completion_tokens"]) == (expected, served)
    assert reply["choices"][0]["greencode"]["cached_completion_tokens"] == served
    assert reply["usage"]["completion_tokens_details"]["cached_tokens"] == served
    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] == reply["usage"]["prompt_tokens"]
    ollama = http.post("/api/generate", json={"prompt": along, "stream": False,
                                              "options": {"num_predict": n, "gate": "full"}}).json()
    assert (ollama["response"], ollama["greencode"]["cached_completion_tokens"]) == (expected, served)
    streamed = http.post("/v1/completions", json={**openai, "stream": True})
    chunks = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["greencode"]["cached_completion_tokens"] == served
    sampled = http.post("/v1/completions", json={**openai, "temperature": 0.7, "seed": 1}).json()
    assert sampled["greencode"]["cached_completion_tokens"] == 0  # sampling never reuses a completion


@pytest.mark.ray
def test_lossless_on_every_route_is_the_full_models_text(http):
    """lossless: true on every route, streamed and not (the server's policy gate drafts; fixed on OpenAI): the
    text of the plain full-model request, with the round statistics in each response and in /metrics."""
    prompt, n = PROMPT + "# lossless\n", 8
    knobs = {"max_new_tokens": n, "lossless": True}
    want = http.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": n, "gate": "full"}}).json()
    drafted_before = metric(http, "greencode_lossless_drafted_tokens_total")

    def sse(path, body):
        with http.stream("POST", path, json=body) as r:
            return [json.loads(line[5:]) for line in r.iter_lines()
                    if line.startswith("data:") and "[DONE]" not in line]

    got = {}
    tgi = http.post("/generate", json={"inputs": prompt, "parameters": knobs}).json()
    got["/generate"] = tgi["generated_text"], tgi["greencode"]
    events = sse("/generate_stream", {"inputs": prompt, "parameters": knobs})
    got["/generate_stream"] = events[-1]["generated_text"], events[-1]["greencode"]
    [compat] = http.post("/", json={"inputs": prompt, "parameters": knobs}).json()
    got["/"] = compat["generated_text"], compat["greencode"]
    events = sse("/", {"inputs": prompt, "parameters": knobs, "stream": True})
    got["/ stream"] = events[-1]["generated_text"], events[-1]["greencode"]
    options = {"num_predict": n, "lossless": True}
    ollama = http.post("/api/generate", json={"prompt": prompt, "stream": False, "options": options}).json()
    got["/api/generate"] = ollama["response"], ollama["greencode"]
    lines = [json.loads(line) for line in http.post("/api/generate", json={"prompt": prompt, "options": options})
             .text.splitlines()]
    got["/api/generate stream"] = "".join(line["response"] for line in lines), lines[-1]["greencode"]
    body = {"prompt": prompt, "max_tokens": n, "lossless": True, "gate": "fixed", "exit_layer": 4}
    openai = http.post("/v1/completions", json=body).json()
    got["/v1/completions"] = openai["choices"][0]["text"], openai["choices"][0]["greencode"]
    chunks = sse("/v1/completions", {**body, "stream": True})
    got["/v1/completions stream"] = "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["greencode"]
    for route, (text, details) in got.items():
        assert text == want["generated_text"], route
        assert details["lossless"] and details["speculative"]["drafted_tokens"] > 0, route
        assert details["mean_layers"] >= 12 and not want["greencode"]["lossless"], route
    drafted = sum(details["speculative"]["drafted_tokens"] for _, details in got.values())
    assert metric(http, "greencode_lossless_drafted_tokens_total") - drafted_before == drafted
    metrics = http.get("/metrics").text
    for name in ("greencode_lossless_accepted_tokens_total", "greencode_lossless_acceptance_rate",
                 "greencode_lossless_mean_draft_depth", "greencode_lossless_layer_passes_per_token"):
        assert name in metrics
    [depth] = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("greencode_lossless_mean_draft_depth{") and 'gate="lossless-fixed"' in line]
    assert depth == 4.0  # the fixed gate's drafts all exit after layer 4


@pytest.mark.ray
def test_fim_requests_reach_the_model_in_its_own_layout(fim_server):
    """Over HTTP, on the Qwen FIM model: each client's FIM body is answered with the greedy completion of the
    PSM token layout, which differs from the completion of the code before the cursor alone."""
    from greencode.config import GenerationConfig
    from greencode.gates import FullGate
    from greencode.generate import GatedGenerator

    lm = make_tiny_qwen_fim()  # the replica's model: same seed, same weights
    gen, cfg = GatedGenerator(lm), GenerationConfig(max_new_tokens=8)
    [want] = gen.generate([qwen_ids(lm.tokenizer, FIM_PREFIX, FIM_SUFFIX)], FullGate(), cfg)
    [without_suffix] = gen.generate([FIM_PREFIX], FullGate(), cfg)
    assert without_suffix.token_ids != want.token_ids  # the comparison below can tell the layouts apart
    with httpx.Client(base_url=fim_server, headers=AUTH, timeout=60) as client:
        ollama = client.post("/api/generate", json={"model": "greencode", "prompt": FIM_PREFIX, "suffix": FIM_SUFFIX,
                                                    "stream": False}).json()
        openai = client.post("/v1/completions", json={"model": "greencode", "prompt": FIM_PREFIX,
                                                      "suffix": FIM_SUFFIX}).json()
        tgi = client.post("/generate", json={"inputs": STARCODER_FIM, "parameters": {"max_new_tokens": 8}}).json()
        show = client.post("/api/show", json={"model": "greencode"}).json()
    assert [t["id"] for t in tgi["details"]["tokens"]] == want.token_ids
    assert ollama["response"] == openai["choices"][0]["text"] == tgi["generated_text"] == want.text
    assert ollama["prompt_eval_count"] == len(qwen_ids(lm.tokenizer, FIM_PREFIX, FIM_SUFFIX))
    assert "insert" in show["capabilities"] and ".Suffix" in show["template"]  # Continue then sends `suffix`


# --------------------------------------------------------------------------- bad input -> 4xx in the client's shape


LONG_PROMPT = "x = 1\n" * 300


@pytest.mark.ray
@pytest.mark.parametrize("path, body, status, field", [
    ("/generate", {"inputs": PROMPT, "parameters": {"temperature": -1}}, 422, "parameters.temperature"),
    ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": "many"}}, 422, "max_new_tokens"),
    ("/generate", {"inputs": PROMPT, "parameters": {"gate": "turbo"}}, 422, "gate"),
    ("/generate", {"inputs": PROMPT, "parameters": {"gate": "fixed"}}, 422, "exit_layer"),
    ("/generate", {"inputs": PROMPT, "parameters": {"gate": "fixed", "exit_layer": 99}}, 422, "99"),
    ("/generate", {"inputs": LONG_PROMPT}, 422, "context limit of 256"),
    ("/generate", {"parameters": {}}, 422, "inputs"),
    ("/generate", b"{not json", 422, "not valid JSON"),
    ("/", {"inputs": "", "parameters": {}}, 422, "empty"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "n": 100}, 400, "n"),
    ("/v1/completions", {"prompt": PROMPT, "threshold": 1.5}, 400, "threshold"),
    ("/v1/completions", {"prompt": PROMPT, "lossless": "maybe"}, 400, "lossless"),
    ("/v1/completions", [1, 2], 400, "JSON object"),
    ("/api/generate", {"prompt": PROMPT, "suffix": "return x", "stream": False}, 400, "fill-in-the-middle"),
    ("/v1/completions", {"prompt": PROMPT, "suffix": "return x"}, 400, "fill-in-the-middle"),
    ("/generate", {"inputs": STARCODER_FIM}, 422, "llm.fillInTheMiddle.enabled"),
    ("/api/generate", {"prompt": PROMPT, "options": {"num_predict": 0}}, 400, "num_predict"),
    ("/api/generate", {"prompt": PROMPT, "options": {"RL_agent_thresh": "high"}}, 400, "RL_agent_thresh"),
])
def test_bad_input_is_a_4xx_naming_the_problem(http, path, body, status, field):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    message = error["message"] if path.startswith("/v1/") else error
    assert field in message
    if path.startswith("/v1/"):
        assert error["type"] == "invalid_request_error"
    elif not path.startswith("/api/"):
        assert response.json()["error_type"] == "validation"


@pytest.mark.ray
def test_api_key_is_required(server):
    for path, shape in [("/generate", "error_type"), ("/v1/completions", "error"), ("/api/generate", "error")]:
        response = httpx.post(f"{server}{path}", json={"inputs": PROMPT, "prompt": PROMPT},
                              headers={"Authorization": "Bearer wrong"}, timeout=60)
        assert response.status_code == 401 and shape in response.json()


@pytest.mark.ray
@pytest.mark.fuzz
def test_schemathesis_finds_no_server_error(server):
    """Fuzzing of the OpenAPI schema: every answer must be < 500. ``GREENCODE_FUZZ_EXAMPLES`` per operation
    (default 200: over 2,000 cases across the routes, ~10 minutes here); the summary is logged."""
    st = Path(sys.executable).with_name("st")
    if not st.exists():
        pytest.skip("schemathesis is not installed (pip install greencode[dev])")
    examples = int(os.environ.get("GREENCODE_FUZZ_EXAMPLES", "200"))
    cmd = [str(st), "run", f"{server}/openapi.json", "--checks", "not_a_server_error", "--max-examples",
           str(examples), "--phases", "examples,coverage,fuzzing", "--request-timeout", "30",
           "-H", f"Authorization: Bearer {API_KEY}", "--workers", "1", "--suppress-health-check", "all", "--seed", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + 10 * examples, check=False)
    log.info("schemathesis, %d examples per operation:\n%s", examples, done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
