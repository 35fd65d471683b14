"""`greencode generate` end to end, in-process, on a tiny model saved as a real HF dir."""

import json

import pytest
import torch

from conftest import make_tiny_qwen_fim, save_tiny
from greencode.policy import ExitPolicy
from workflows import cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny-llama")
    return d, save_tiny(d, tokenizer)


def generate(capsys, *args) -> dict:
    """Run `greencode generate ... --json` through the real entry point; the printed JSON record."""
    cli.main(["generate", *args, "--json"])
    return json.loads(capsys.readouterr().out)


def test_generate_json_record(model_dir, tmp_path, capsys):
    d, _ = model_dir
    prompt = tmp_path / "p.py"
    prompt.write_text("def add(a, b):\n    return")
    rec = generate(capsys, "--model", str(d), "--gate", "fixed", "--exit-layer", "4", "--max-new-tokens", "5",
                   "--prompt-file", str(prompt))
    for key in ("text", "token_ids", "layers_per_token", "mean_layers", "time_s", "energy_j"):
        assert key in rec
    assert rec["layers_per_token"] == [12, 4, 4, 4, 4] and rec["gate"] == "fixed(k=4)"


def test_config_file_then_flags_then_set(model_dir, tmp_path, capsys):
    """One config path: --config file, a dedicated flag over it, --set over both."""
    d, _ = model_dir
    config = tmp_path / "gate.yaml"
    config.write_text(f"model: {{name: {d}}}\ngate: {{mode: fixed, exit_layer: 6}}\n"
                      "generation: {max_new_tokens: 7}\n")
    rec = generate(capsys, "--config", str(config), "--exit-layer", "4", "--set", "generation.max_new_tokens=3",
                   "--prompt", "import os")
    assert rec["layers_per_token"] == [12, 4, 4]


def test_generate_with_policy_file(model_dir, tmp_path, capsys):
    d, lm = model_dir
    policy = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint=lm.fingerprint)
    with torch.no_grad():
        policy.net[-1].bias.copy_(torch.tensor([-10.0, 10.0]))  # always exit at the first point
    path = policy.save(tmp_path / "policy.pt")
    rec = generate(capsys, "--model", str(d), "--gate", "policy", "--policy", str(path), "--threshold", "0.9",
                   "--max-new-tokens", "4", "--prompt", "import os")
    assert rec["layers_per_token"] == [12, 4, 4, 4]


def test_suffix_file_generates_in_the_fim_layout(tmp_path, capsys):
    from greencode.config import GenerationConfig, ModelConfig
    from greencode.fim import fim_prompt_ids
    from greencode.gates import FullGate
    from greencode.generate import GatedGenerator
    from greencode.modeling import load_model

    saved = make_tiny_qwen_fim()
    d = tmp_path / "tiny-qwen-fim"
    saved.model.save_pretrained(d)
    saved.tokenizer.save_pretrained(d)
    lm = load_model(ModelConfig(name=str(d)))  # as the command loads it
    (tmp_path / "before.py").write_text("def area(r):\n    return ")
    (tmp_path / "after.py").write_text("\n\nprint(area(2.0))\n")
    rec = generate(capsys, "--model", str(d), "--gate", "full", "--max-new-tokens", "6",
                   "--prompt-file", str(tmp_path / "before.py"), "--suffix-file", str(tmp_path / "after.py"))
    ids = fim_prompt_ids(lm.tokenizer, "def area(r):\n    return ", "\n\nprint(area(2.0))\n")
    [want] = GatedGenerator(lm).generate([ids], FullGate(), GenerationConfig(max_new_tokens=6))
    assert rec["token_ids"] == want.token_ids and rec["prompt_tokens"] == len(ids)


def test_suffix_file_on_a_model_without_fim_tokens_is_one_clear_error(model_dir, tmp_path):
    d, _ = model_dir
    (tmp_path / "after.py").write_text("return x\n")
    with pytest.raises(SystemExit, match="error: fill-in-the-middle needs a model whose tokenizer has FIM tokens"):
        cli.main(["generate", "--model", str(d), "--prompt", "def f(x):", "--suffix-file", str(tmp_path / "after.py")])


def test_policy_for_another_model_is_refused(model_dir, tmp_path):
    d, lm = model_dir
    policy = ExitPolicy(lm.hidden_size, exit_points=lm.exit_points, model_fingerprint="0123456789abcdef")
    path = policy.save(tmp_path / "p.pt")
    with pytest.raises(SystemExit, match="trained on model 0123456789abcdef"):
        cli.main(["generate", "--model", str(d), "--gate", "policy", "--policy", str(path), "--prompt", "x"])


def test_bad_arguments_are_named(model_dir):
    d, _ = model_dir
    with pytest.raises(SystemExit, match="exit_layer"):
        cli.main(["generate", "--model", str(d), "--gate", "fixed", "--prompt", "x"])
    with pytest.raises(SystemExit, match="gate.threshold"):
        cli.main(["generate", "--model", str(d), "--threshold", "1.5", "--prompt", "x"])


def test_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit, match="(?s)unknown command 'nope'.*generate"):
        cli.main(["nope"])
