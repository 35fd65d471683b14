"""The LITE loss sweep: Ray Tune trials that each fine-tune on Ray Train, scored against the base model."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch

from greencode.config import ConfigError, LiteSweepConfig, PipelineConfig, load_config
from test_finetune import tiny_run_config
from workflows.lite_sweep import pick_best, score, trial_grid


def test_score_compares_every_exit_with_the_base_models_final_prediction():
    reference = torch.tensor([[1, 1, 1, 1], [0, 1, 2, 3], [0, 1, 2, 3]])  # base: exits 10, 20, final 30
    targets = torch.tensor([0, 1, 2, 9])  # base final accuracy 0.75
    preds = torch.tensor([[0, 1, 0, 0], [0, 1, 2, 0], [0, 1, 9, 3]])
    s = score(preds, targets, reference, [10, 20, 30], deep_from=0.5)
    assert s["base_final_acc"] == 0.75 and s["final_acc"] == 0.5
    assert s["final_acc_ratio"] == pytest.approx(0.5 / 0.75)
    assert s["final_agree_base"] == 0.75
    assert s["agree_base_l10"] == 0.5 and s["agree_base_l20"] == 0.75
    assert s["deep_agree_base"] == 0.75  # only layer 20 is deeper than half of 30


def test_best_keeps_the_final_layer_before_it_counts_agreement():
    rows = [{"final_acc_ratio": 0.90, "deep_agree_base": 0.6}, {"final_acc_ratio": 0.97, "deep_agree_base": 0.4},
            {"final_acc_ratio": 0.99, "deep_agree_base": 0.3}]
    assert pick_best(rows, 0.96) is rows[1]
    assert pick_best(rows, 1.0) is rows[2]  # none keeps it: the one that keeps most
    nan = [{"final_acc_ratio": float("nan"), "deep_agree_base": 0.1},
           {"final_acc_ratio": float("nan"), "deep_agree_base": 0.2}]
    assert pick_best(nan, 0.96) is nan[1] and pick_best(nan[::-1], 0.96) is nan[1]  # order-free


def test_grid_errors_name_the_key():
    with pytest.raises(ConfigError, match="grid.*loss.*nonsense"):
        trial_grid(LiteSweepConfig(grid={"loss.nonsense": [1]}))
    with pytest.raises(ConfigError, match="target"):
        trial_grid(LiteSweepConfig(grid={"loss.target": ["teacher"]}))
    assert len(trial_grid(LiteSweepConfig(grid={"loss.target": ["dataset", "distill"], "optim.lr": [1e-4]}))) == 2


def experiment_trials(experiment) -> list[str]:
    """The trial keys a Tune experiment dir ran (from each Tune trial's params.json)."""
    return sorted(json.loads(p.read_text())["trial"]["key"] for p in experiment.glob("*/params.json"))


@pytest.mark.ray
def test_sweep_reuses_only_trials_of_the_same_settings_and_restores_only_into_them(ray_local, tiny_model_dir,
                                                                                   tmp_path, caplog):
    from workflows.lite_sweep import run

    base = tiny_run_config(tiny_model_dir, tmp_path, max_steps=1, num_workers=1, cpus_per_worker=1.0,
                           val_batches=2).model_dump(mode="json")
    cfg = LiteSweepConfig(base=base, grid={"loss.target": ["dataset", "distill"]}, storage_path=str(tmp_path / "s"),
                          name="tiny", output_path=str(tmp_path / "best.yaml"))
    out = tmp_path / "s" / "tiny"
    summary = run(cfg)
    first = sorted(summary["ran"])
    assert len(first) == 2 and summary["reused"] == [] and experiment_trials(out / "tune") == first
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["loss.target"] for r in rows) == ["dataset", "distill"]
    # a random tiny model predicts no next token right: only the agreements are numbers here
    assert all(0 <= float(r["deep_agree_base"]) <= 1 and 0 <= float(r["final_agree_base"]) <= 1 for r in rows)
    assert list(csv.DictReader((out / "pareto.csv").open()))
    best = load_config(PipelineConfig, tmp_path / "best.yaml")  # a `finetune:` block the pipeline accepts
    assert best.finetune.loss.target == summary["best"]["loss.target"]
    runs = sorted((out / "runs").iterdir())
    for run_dir in runs:
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert list(run_dir.glob("checkpoint_0*"))
    models = mtimes(out / "runs")

    # unchanged: the finished sweep is returned as it is
    assert json.dumps(run(cfg)) == json.dumps(summary)  # (as JSON: the untrained tiny model's scores hold NaN)

    # killed after its trials finished, before their records and the summary: restored, nothing trained
    for path in [out / "best.json", out / "results.csv", *(out / "trials").glob("*.json")]:
        path.unlink()
    with caplog.at_level(logging.INFO, logger="greencode.tune"):
        again = run(cfg)
    assert "resuming the sweep in" in caplog.text
    assert again["best"] == summary["best"] and mtimes(out / "runs") == models

    # a value added to the grid: only the new point trains, in a new experiment (the old one set aside)
    caplog.clear()
    grown = cfg.model_copy(update={"grid": {"loss.target": ["dataset", "distill", "mix"]}})
    with caplog.at_level(logging.INFO, logger="greencode.tune"):
        summary = run(grown)
    assert sorted(summary["reused"]) == first and len(summary["ran"]) == 1
    assert "config grid.loss.target: ['dataset', 'distill'] -> ['dataset', 'distill', 'mix']" in caplog.text
    assert experiment_trials(out / "tune") == summary["ran"]  # a new experiment, of the new point alone
    assert [experiment_trials(p) for p in out.glob("tune.set-aside-*")] == [first]
    rows = {r["loss.target"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert sorted(rows) == ["dataset", "distill", "mix"] and rows["mix"]["trial"] == summary["ran"][0]
    assert rows["mix"]["reused"] == "False" and rows["dataset"]["reused"] == "True"
    assert summary["trials"] == 3 and summary["best_trial"] == rows[summary["best"]["loss.target"]]["trial"]
    assert load_config(PipelineConfig, tmp_path / "best.yaml").finetune.loss.target == summary["best"]["loss.target"]
    assert mtimes(out / "runs").items() >= models.items()  # the first two models were not retrained

    # the base recipe's learning rate changed: no finished trial is reused
    relearned = LiteSweepConfig(**{**cfg.model_dump(), "base": {**base, "optim": {**base["optim"], "lr": 3e-4}},
                                   "grid": {"loss.target": ["dataset"]}})
    summary = run(relearned)
    assert summary["reused"] == [] and len(summary["ran"]) == 1 and summary["ran"][0] not in first

    # a scoring setting changed: the models trained for it are rescored in Tune, none is trained again
    checkpoints = sorted(out.glob("runs/*/checkpoint_*"))
    summary = run(cfg.model_copy(update={"deep_from": 0.3}))
    assert len(summary["ran"]) == 2 and not set(summary["ran"]) & set(first) and summary["reused"] == []
    assert {k: v for k, v in mtimes(out / "runs").items() if k in models} == models
    assert sorted(out.glob("runs/*/checkpoint_*")) == checkpoints


def mtimes(root) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "model" in p.parts}
