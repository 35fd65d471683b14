"""`greencode generate` end to end on a tiny model saved as a real HF dir."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import save_tiny
from greencode.policy import ExitPolicy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny-llama")
    return d, save_tiny(d, tokenizer)


def cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "workflows.cli", "generate", *args], capture_output=True,
                          text=True, timeout=300, input=input)


def test_generate_json_record(model_dir, tmp_path):
    d, _ = model_dir
    prompt = tmp_path / "p.py"
    prompt.write_text("def add(a, b):\n    return")
    out = cli("--model", str(d), "--gate", "fixed", "--exit-layer", "4", "--max-new-tokens", "5",
              "--prompt-file", str(prompt), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rec = json.loads(out.stdout)
    for key in ("text", "token_ids", "layers_per_token", "mean_layers", "time_s", "energy_j"):
        assert key in rec
    assert rec["layers_per_token"] == [12, 4, 4, 4, 4] and rec["gate"] == "fixed(k=4)"


def test_generate_with_policy_file(model_dir, tmp_path):
    d, lm = model_dir
    policy = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint=lm.fingerprint)
    with torch.no_grad():
        policy.net[-1].bias.copy_(torch.tensor([-10.0, 10.0]))  # always exit at the first point
    path = policy.save(tmp_path / "policy.pt")
    out = cli("--model", str(d), "--gate", "policy", "--policy", str(path), "--threshold", "0.9",
              "--max-new-tokens", "4", "--prompt", "import os", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["layers_per_token"] == [12, 4, 4, 4]


def test_policy_for_another_model_is_refused(model_dir, tmp_path):
    d, lm = model_dir
    path = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint="0123456789abcdef").save(tmp_path / "p.pt")
    out = cli("--model", str(d), "--gate", "policy", "--policy", str(path), "--prompt", "x")
    assert out.returncode != 0 and "trained on model 0123456789abcdef" in out.stderr


def test_bad_arguments_are_named(model_dir):
    d, _ = model_dir
    out = cli("--model", str(d), "--gate", "fixed", "--prompt", "x")
    assert out.returncode != 0 and "exit_layer" in out.stderr
    out = cli("--model", str(d), "--threshold", "1.5", "--prompt", "x")
    assert out.returncode != 0 and "threshold" in out.stderr
