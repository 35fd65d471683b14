"""Shipped configs validate (every YAML in the repository, each against its schema); the one config path."""

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from greencode.config import PIPELINE_OWNED, ConfigError, PipelineConfig, ServeConfig, load_config, validate
from workflows.pipeline import COMMAND, PRESETS, preset_path, stage_configs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_validate_and_put_every_artifact_under_run_dir(name):
    cfg = load_config(PipelineConfig, preset_path(name))
    plans = stage_configs(cfg)
    root = str(Path(cfg.run_dir).resolve())
    assert plans["extract"].output_dir.startswith(root) and plans["train_policy"].output_path.startswith(root)
    assert plans["evaluate"].output_dir.startswith(root) and plans["finetune"].output_dir.startswith(root)
    assert plans["fit_exits"].output_dir.startswith(root)
    if "finetune" in cfg.stages:
        assert plans["evaluate"].model.name == str(Path(root) / "model")  # evaluates the fine-tuned model
    if "fit_exits" in cfg.stages:  # fit on the untranslated model; every later stage decodes through them
        assert plans["fit_exits"].model.translators is None
        for stage in ("extract", "extract_heldout", "evaluate"):
            assert plans[stage].model.translators == plans["fit_exits"].output_dir
        assert plans["fit_exits"].model.name == plans["evaluate"].model.name


def test_pipeline_rejects_train_policy_with_sweep():
    with pytest.raises(ConfigError, match="train_policy' or 'sweep"):
        validate(PipelineConfig, {"stages": ["extract", "train_policy", "sweep"]})


def _cluster(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))  # what `ray up` does first; raises on schema violations
    types = config["available_node_types"]
    assert any("GPU" in t["resources"] for t in types.values())
    assert "GPU" not in types[config["head_node_type"]]["resources"]
    [start] = [c for c in config["head_start_ray_commands"] if " start " in c]
    assert "--dashboard-host=127.0.0.1" in start  # its job API runs any command: reached over `ray dashboard` SSH
    setup = " ".join(config.get("initialization_commands", []) + config.get("setup_commands", []))
    # shared storage holds pickled checkpoints: never world-writable
    assert not re.search(r"chmod\s+(-R\s+)?(0?[0-7][0-7][2367]\b|[ao]\+w)", setup), setup


def _serve(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))  # what `serve deploy` checks
    for app in config.applications:
        validate(ServeConfig, app.args, source=str(path))  # what build_app checks, field by field


def _preset(path: Path) -> None:
    from workflows import evaluate, extract, finetune, fit_exits, sweep, train_policy

    cfg = load_config(PipelineConfig, path)
    stage_configs(cfg)
    for command in (finetune.COMMAND, fit_exits.COMMAND, extract.COMMAND, train_policy.COMMAND, sweep.COMMAND,
                    evaluate.COMMAND):
        command.config(command.parser.parse_args(["--preset", path.stem]))  # each stage's --preset NAME


VALIDATORS = {"cluster.yaml": _cluster, "serve_app/config.yaml": _serve,
              **{f"workflows/presets/{name}.yaml": _preset for name in PRESETS}}


def shipped_yaml() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "*.yaml", "*.yml"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:  # an exported tree without git
        return sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.y*ml")
                      if not {".venv", "runs", ".git"} & set(p.relative_to(ROOT).parts))
    return listed.stdout.split()


@pytest.mark.parametrize("name", shipped_yaml())
def test_every_shipped_yaml_validates_against_its_schema(name):
    """One test over every YAML in the repository; a new one fails until it has a validator here."""
    assert name in VALIDATORS, f"{name}: no validator (add one to VALIDATORS in {Path(__file__).name})"
    VALIDATORS[name](ROOT / name)


def test_pipeline_sections_reject_the_keys_the_pipeline_sets():
    """One way to configure a pipeline: finetune.data.max_files is not silently dropped."""
    with pytest.raises(ConfigError, match="finetune.data is set by the pipeline from the top-level data"):
        validate(PipelineConfig, {"finetune": {"data": {"max_files": 10}}})
    with pytest.raises(ConfigError, match="evaluate.policy_path is set by the pipeline"):
        COMMAND.config(COMMAND.parser.parse_args(["--preset", "demo", "--set", "evaluate.policy_path=x.pt"]))
    for section, keys in PIPELINE_OWNED.items():
        for key in keys:
            assert key in type(getattr(PipelineConfig(), section)).model_fields, (section, key)
    assert validate(PipelineConfig, {"finetune": {"run_name": "mine"}}).finetune.run_name == "mine"  # not owned


def test_preset_then_config_files_then_set(tmp_path):
    """The one config path: the preset, then each --config file over it, then --set over everything."""
    mine, more = tmp_path / "mine.yaml", tmp_path / "more.yaml"
    mine.write_text("run_dir: runs/mine\nfinetune: {max_steps: 7, batch_size: 3}\n")
    more.write_text("finetune: {max_steps: 9}\n")
    args = COMMAND.parser.parse_args(["--preset", "demo", "--config", str(mine), "--config", str(more),
                                      "--set", "evaluate.num_samples=5"])
    cfg = COMMAND.config(args)
    assert cfg.run_dir == "runs/mine" and cfg.finetune.batch_size == 3 and cfg.finetune.max_steps == 9
    preset = load_config(PipelineConfig, preset_path("demo"))
    assert cfg.finetune.optim.lr == preset.finetune.optim.lr and cfg.extract.num_samples == 120  # from the preset
    assert cfg.evaluate.num_samples == 5
    with pytest.raises(ConfigError, match="finetune.max_steps"):
        COMMAND.config(COMMAND.parser.parse_args(["--preset", "demo", "--set", "finetune.max_steps=0"]))


def test_the_manifest_records_the_sweep_by_its_own_identity_and_a_grid_change_touches_only_the_sweep(tmp_path):
    from workflows import pipeline, sweep

    def identities(**sections) -> dict[str, str]:
        cfg = validate(PipelineConfig, {"run_dir": str(tmp_path), "stages": ["extract", "sweep", "evaluate"],
                                        **sections})
        plans = stage_configs(cfg)
        out = {s.name: pipeline._identity(s, tmp_path, {}).digest for s in pipeline._stages(cfg, plans)}
        assert out["sweep"] == sweep.run_identity(plans["sweep"]).digest  # what best.json and the experiment record
        return out

    before = identities()
    after = identities(sweep={"alpha": [0.1, 0.2]})
    assert {name for name in before if before[name] != after[name]} == {"sweep"}  # evaluate follows via the policy
    assert identities(run_dir=str(tmp_path / "moved"))["sweep"] == before["sweep"]  # shards by content, not path


def test_a_stage_s_outputs_lose_the_temp_files_of_writers_that_died(tmp_path):
    """A killed evaluation leaves a part's temp file deep in the report dir (an output, not an artifact):
    the pipeline removes it before and after the stage, keeping a live writer's."""
    from greencode.atomic import _temp_prefix
    from workflows.pipeline import Stage, _recover

    parts = tmp_path / "report" / "parts" / "fixed-k4@0.2"
    parts.mkdir(parents=True)
    writer = subprocess.Popen(["true"])
    writer.wait()  # a writer that died
    prefix = _temp_prefix(parts / "ctx0.2-b0000.json")  # .ctx0.2-b0000.json.tmp-<host>-<this pid>-
    killed = parts / (prefix.replace(f"-{os.getpid()}-", f"-{writer.pid}-") + "abc.tmp")
    alive = parts / (prefix + "def.tmp")
    killed.write_text("{half")
    alive.write_text("{writing")
    stage = Stage("evaluate", None, lambda cfg: None, [tmp_path / "report" / "results.json"], {}, [],
                  outputs=[tmp_path / "report"])
    _recover(stage)
    assert not killed.exists() and alive.exists()
