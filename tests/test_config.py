import pytest

from greencode.config import (
    ConfigError,
    EvalConfig,
    FinetuneConfig,
    GateConfig,
    RewardConfig,
    load_config,
    parse_overrides,
    validate,
)


def test_defaults_carry_method_numbers():
    ft = FinetuneConfig()
    assert ft.optim.lr == 1e-5 and ft.optim.betas == (0.9, 0.99) and ft.optim.weight_decay == 0.01
    assert ft.optim.grad_clip == 1.0 and ft.batch_size == 4 and ft.grad_accum == 32 and ft.seq_len == 256
    assert ft.loss.first_half_budget == 0.7 and ft.loss.second_half_budget == 0.2 and ft.loss.final_budget == 0.1
    assert ft.loss.decay == 0.9
    ev = EvalConfig()
    assert ev.data.context_fraction == 0.2 and ev.data.context_cap == 512 and ev.generation.max_new_tokens == 15


def test_errors_name_the_field(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("optim:\n  lr: -1\nbatch_size: two\n")
    with pytest.raises(ConfigError) as err:
        load_config(FinetuneConfig, path)
    assert "optim.lr" in str(err.value) and "batch_size" in str(err.value) and str(path) in str(err.value)


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        validate(FinetuneConfig, {"optim": {"learning_rate": 1}})


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="alpha must be <= beta"):
        validate(RewardConfig, {"alpha": 0.9, "beta": 0.5})
    with pytest.raises(ConfigError, match="exit_layer"):
        validate(GateConfig, {"mode": "fixed"})


def test_yaml_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(FinetuneConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(FinetuneConfig, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(FinetuneConfig, listy)


def test_overrides():
    cfg = load_config(FinetuneConfig, None, parse_overrides(["optim.lr=3e-4", "exits.exit_points=[2, 4]"]))
    assert cfg.optim.lr == 3e-4 and cfg.exits.exit_points == [2, 4]
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["nonsense"])


def test_every_config_field_has_a_description():
    """Help text and docs read the descriptions; LiteLossConfig's fields belong to issue 10's branch for now."""
    from pydantic import BaseModel

    import greencode.config as config

    models = [c for c in vars(config).values() if isinstance(c, type) and issubclass(c, BaseModel)
              and c.__module__ == config.__name__ and c.model_fields and c is not config.LiteLossConfig]
    assert len(models) > 15
    missing = [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items() if not f.description]
    assert not missing, f"fields without a description: {missing}"


def test_serve_defaults_come_from_the_gate_and_generation_configs():
    from greencode.config import GateConfig, GenerationConfig, ServeConfig

    serve = ServeConfig()
    gate = GateConfig()
    assert (serve.gate.threshold, serve.gate.temperature, serve.gate.confidence) == (
        gate.threshold, gate.temperature, gate.confidence)
    assert serve.generation.model_dump(exclude={"max_new_tokens"}) == GenerationConfig().model_dump(
        exclude={"max_new_tokens"})
