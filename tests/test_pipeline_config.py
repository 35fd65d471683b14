"""Shipped configs parse and validate: the cluster launcher file, the presets, the demo configs."""

from pathlib import Path

import pytest
import yaml

from greencode.config import ConfigError, PipelineConfig, load_config, validate
from workflows.pipeline import COMMAND, PRESETS, preset_path, stage_configs

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does first; raises on schema violations
    types = config["available_node_types"]
    assert any("GPU" in t["resources"] for t in types.values())
    assert "GPU" not in types[config["head_node_type"]]["resources"]
    [start] = [c for c in config["head_start_ray_commands"] if " start " in c]
    assert "--dashboard-host=127.0.0.1" in start  # its job API runs any command: reached over `ray dashboard` SSH


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate_and_put_every_artifact_under_run_dir(name):
    cfg = load_config(PipelineConfig, preset_path(name))
    plans = stage_configs(cfg)
    root = str(Path(cfg.run_dir).resolve())
    assert plans["extract"].output_dir.startswith(root) and plans["train_policy"].output_path.startswith(root)
    assert plans["evaluate"].output_dir.startswith(root) and plans["finetune"].output_dir.startswith(root)
    assert plans["evaluate"].model.name == str(Path(root) / "model")  # evaluates the fine-tuned model


def test_pipeline_rejects_train_policy_with_sweep():
    with pytest.raises(ConfigError, match="train_policy' or 'sweep"):
        validate(PipelineConfig, {"stages": ["extract", "train_policy", "sweep"]})


SHIPPED_YAML = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "serve_app").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_YAML, ids=lambda p: p.name)
def test_shipped_yaml_files_parse(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_preset_then_config_files_then_set(tmp_path):
    """The one config path: the preset, then each --config file over it, then --set over everything."""
    mine, more = tmp_path / "mine.yaml", tmp_path / "more.yaml"
    mine.write_text("run_dir: runs/mine\nfinetune: {max_steps: 7, batch_size: 3}\n")
    more.write_text("finetune: {max_steps: 9}\n")
    args = COMMAND.parser.parse_args(["--preset", "demo", "--config", str(mine), "--config", str(more),
                                      "--set", "evaluate.num_samples=5"])
    cfg = COMMAND.config(args)
    assert cfg.run_dir == "runs/mine" and cfg.finetune.batch_size == 3 and cfg.finetune.max_steps == 9
    assert cfg.finetune.optim.lr == 2e-4 and cfg.extract.num_samples == 120  # from the preset
    assert cfg.evaluate.num_samples == 5
    with pytest.raises(ConfigError, match="finetune.max_steps"):
        COMMAND.config(COMMAND.parser.parse_args(["--preset", "demo", "--set", "finetune.max_steps=0"]))
