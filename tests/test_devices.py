"""Everything a gate uses follows the model's device (issue 13): the policy, the sampler, the detokenizer.

An exit policy loaded on the CPU next to a GPU model failed every request on the default gate.
These tests run on every device the machine has: the CPU always, CUDA where one exists (marked
``gpu``). On a CPU-only machine the ``meta`` device stands in for "not the CPU": a policy left
on the CPU cannot take a hidden state from there.
"""

import pytest
import torch

from conftest import make_tiny
from greencode.config import GenerationConfig
from greencode.gates import ConfidenceGate, FixedGate, FullGate, PolicyGate
from greencode.generate import GatedGenerator
from greencode.policy import ExitPolicy

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]),
]
PROMPTS = ["def fibonacci(n):\n    ", "import os\n# 日本語\n"]


def saved_policy(lm, path) -> str:
    torch.manual_seed(0)
    policy = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint=lm.fingerprint)
    return str(policy.save(path))


def test_the_policy_follows_the_model_to_another_device(tmp_path):
    lm = make_tiny("llama")
    path = saved_policy(lm, tmp_path / "p.pt")
    lm.model.to("meta")
    policy = ExitPolicy.load_for(path, lm)
    assert {p.device.type for p in policy.parameters()} == {"meta"}
    leave, _ = PolicyGate(policy, 0.5).exit_mask(torch.zeros(3, lm.hidden_size, device="meta"), 4, lm)
    assert leave.device.type == "meta" and leave.shape == (3,)


@pytest.mark.parametrize("device", DEVICES)
def test_every_gate_and_sampler_runs_on_the_models_device(device, tmp_path, tokenizer):
    lm = make_tiny("llama", tokenizer=tokenizer)
    path = saved_policy(lm, tmp_path / "p.pt")
    lm.model.to(device)
    policy = ExitPolicy.load_for(path, lm)
    assert {p.device.type for p in policy.parameters()} == {torch.device(device).type}
    generator = GatedGenerator(lm)
    gates = [FullGate(), FixedGate(6), ConfidenceGate(0.05), PolicyGate(policy, 0.5)]
    settings = [GenerationConfig(max_new_tokens=5), GenerationConfig(max_new_tokens=5, temperature=0.8, seed=1),
                GenerationConfig(max_new_tokens=5, temperature=1e-300, top_p=1e-300, stop=["\n"])]
    for gate in gates:
        for cfg in settings:
            results = generator.generate(PROMPTS, gate, cfg)
            for r in results:
                assert r.error is None and r.finish_reason != "error", (gate.describe(), cfg)
                assert 1 <= len(r.token_ids) <= 5 and len(r.layers_per_token) == len(r.token_ids)
                assert all(1 <= n <= lm.num_layers for n in r.layers_per_token)
    full = generator.generate(PROMPTS, FullGate(), settings[0])
    assert all(r.layers_per_token == [lm.num_layers] * len(r.token_ids) for r in full)
