"""Shared fixtures: tiny random Llama-, Qwen2- and OPT-shaped models built in the test (never downloaded)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# two xdist workers share the 2 cores of the reference machine: one thread each, else up to two
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(1 if XDIST_WORKERS > 1 else min(2, torch.get_num_threads()))

pytest_plugins = ["serve_helpers", "s3_helpers"]  # the abuse app's server/http/plan fixtures; a local S3 server


def make_tiny(arch: str = "llama", num_layers: int = 12, vocab_size: int = 49152, hidden: int = 64,
              seed: int = 0, tokenizer=None, exit_points=None):
    """A tiny random model wrapped as an EarlyExitModel (12 layers -> exit points [4, 6, 10])."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from greencode.config import ExitConfig
    from greencode.modeling import wrap_model

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":  # the Llama layout with q/k/v biases (Qwen2.5-Coder's shape)
        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024, tie_word_embeddings=True, use_sliding_window=False)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "opt":
        cfg = OPTConfig(vocab_size=vocab_size, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=num_layers,
                        num_attention_heads=4, max_position_embeddings=1024, word_embed_proj_dim=hidden)
        model = OPTForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    return wrap_model(model, tokenizer, ExitConfig(exit_points=exit_points) if exit_points else None)


def poison(lm, token: int) -> None:
    """Give ``token`` a NaN embedding: a row that feeds it to the model gets NaN logits from then on.

    The tiny models tie the LM head to the embeddings; it is untied first, or every row's logits would hold NaN.
    """
    head = lm.model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[token] = float("nan")


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2 tokenizer (converted once into the GreenCode cache)."""
    from transformers import AutoTokenizer

    from greencode.config import ModelConfig
    from greencode.modeling import resolve_model_path

    path, _ = resolve_model_path(ModelConfig(name="embedded"))
    return AutoTokenizer.from_pretrained(path)


FIM_SENTINELS = {  # as each family's tokenizer spells them
    "starcoder": ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    "santacoder": ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
    "qwen": ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    "deepseek": ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
}
DEEPSEEK_BOS = "<｜begin▁of▁sentence｜>"


def fim_tokenizer(family: str, extra: tuple[str, ...] = ()):
    """The embedded SmolLM2 tokenizer (byte-level BPE like StarCoder's, Qwen2.5-Coder's and DeepSeek-Coder's)
    with one family's FIM sentinels added as special tokens (ids from 49152 on)."""
    from transformers import AutoTokenizer

    from greencode.config import ModelConfig
    from greencode.modeling import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(ModelConfig(name="embedded"))[0])
    if family == "deepseek":  # DeepSeek-Coder's tokenizer puts its BOS before any text
        tok.add_special_tokens({"bos_token": DEEPSEEK_BOS})
        tok.add_bos_token = True
        tok.update_post_processor()
    tok.add_special_tokens({"additional_special_tokens": [*FIM_SENTINELS[family], *extra]})
    return tok


def make_tiny_qwen_fim(cfg=None):
    """A tiny Qwen2-shaped model with a Qwen FIM tokenizer (usable as a serve model loader)."""
    tok = fim_tokenizer("qwen")
    return make_tiny("qwen2", vocab_size=len(tok), tokenizer=tok)


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (SmolLM2-135M), loaded once per session.

    In float32 on every machine: its tests compare decoding paths token for token, which must not depend on
    the dtype ``auto`` picks for this CPU (that choice is tested in test_precision)."""
    from greencode.config import ModelConfig
    from greencode.modeling import load_model

    return load_model(ModelConfig(dtype="float32"))


@pytest.fixture(params=["llama", "opt"])
def tiny(request, tokenizer):
    return make_tiny(request.param, tokenizer=tokenizer)


def save_tiny(path, tokenizer, arch: str = "llama"):
    """A tiny model saved as a real Hugging Face dir (loadable by every stage and the CLI)."""
    lm = make_tiny(arch, tokenizer=tokenizer)
    lm.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return lm


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny(path, tokenizer)
    return path


def pytest_collection_modifyitems(session, config, items):
    """The modules that use ``ray_local`` run first and back to back, so one Ray serves them all; then the other
    modules that start a Ray (the Serve ones, back to back: one Ray and Serve for them), then the rest. Under
    pytest-xdist (``make test``) each worker takes whole modules in this order: the long ones start first and the
    short ones fill in at the end."""
    ray_modules = {item.module for item in items if "ray_local" in item.fixturenames}
    starts_ray = {item.module for item in items if item.get_closest_marker("ray")}
    items.sort(key=lambda item: 0 if item.module in ray_modules else 1 if item.module in starts_ray else 2)


_next_item: dict[str, Any] = {}  # the test this process runs after the one being torn down


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """Module fixtures are finalized in here: they keep Ray up only if the module this process runs next uses it
    (pytest-xdist gives each worker its own share of the modules, so the run's order alone cannot say)."""
    _next_item["item"] = nextitem
    yield
    _next_item.clear()


def next_module_uses(request, fixture: str) -> bool:
    """Whether the next module this process runs has a test that uses ``fixture`` (asked while ``request``'s
    module fixtures are finalized)."""
    upcoming = _next_item.get("item")
    return upcoming is not None and upcoming.module is not request.module and any(
        fixture in item.fixturenames for item in request.session.items if item.module is upcoming.module)


_ray_local: dict[str, str | None] = {}  # the shared Ray's RAY_TMPDIR and the one it replaced, while it is up


@pytest.fixture(scope="module")
def ray_local(request):
    """A local 2-CPU Ray, started by the first module that asks for it and kept up while the next module this
    process runs asks for it too (pytest_collection_modifyitems runs those modules back to back): one Ray start
    for all of them (per xdist worker).

    Ray Train's placement-group cleaner asks Ray's state API every second whether the Train
    controller is alive and tears the training workers down when told no. So the dashboard (which
    serves that API) runs, and the cluster keeps its files under its own RAY_TMPDIR (inherited by its
    processes) naming itself the current cluster: state queries otherwise go to "the latest cluster
    started on this machine", on a shared machine someone else's, which has no such controller.
    """
    import shutil
    import tempfile

    import ray

    if not _ray_local:
        _ray_local["previous"] = os.environ.get("RAY_TMPDIR")
        tmp = _ray_local["tmp"] = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's unix sockets live below
        os.environ["RAY_TMPDIR"] = tmp
        ray.init(address="local", num_cpus=2, include_dashboard=True)
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as fh:
            fh.write(ray.get_runtime_context().gcs_address)
    yield
    if next_module_uses(request, "ray_local"):
        assert ray.is_initialized(), f"{request.module.__name__} shut the shared Ray down"
        return
    ray.shutdown()
    previous, tmp = _ray_local.pop("previous"), _ray_local.pop("tmp")
    if previous is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = previous
    shutil.rmtree(tmp, ignore_errors=True)

