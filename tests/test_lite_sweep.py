"""The LITE loss sweep: Ray Tune trials that each fine-tune on Ray Train, scored against the base model."""

from __future__ import annotations

import csv

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


@pytest.mark.ray
def test_sweep_writes_csv_pareto_yaml_and_event_files_and_resumes(ray_local, tiny_model_dir, tmp_path):
    from workflows.lite_sweep import run

    base = tiny_run_config(tiny_model_dir, tmp_path, max_steps=1, num_workers=1, cpus_per_worker=1.0,
                           val_batches=2).model_dump(mode="json")
    cfg = LiteSweepConfig(base=base, grid={"loss.target": ["dataset", "distill"]}, storage_path=str(tmp_path / "s"),
                          name="tiny", output_path=str(tmp_path / "best.yaml"))
    summary = run(cfg)
    out = tmp_path / "s" / "tiny"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted(r["loss.target"] for r in rows) == ["dataset", "distill"]
    # a random tiny model predicts no next token right: only the agreements are numbers here
    assert all(0 <= float(r["deep_agree_base"]) <= 1 and 0 <= float(r["final_agree_base"]) <= 1 for r in rows)
    assert list(csv.DictReader((out / "pareto.csv").open()))
    best = load_config(PipelineConfig, tmp_path / "best.yaml")  # a `finetune:` block the pipeline accepts
    assert best.finetune.loss.target == summary["best"]["loss.target"]
    for trial_dir in (out / "trials").iterdir():
        assert list((trial_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert list(trial_dir.glob("checkpoint_0*"))

    # killed after the trials, before the summary: the rerun restores the Tune experiment, trains nothing
    (out / "best.json").unlink()
    (out / "results.csv").unlink()
    assert run(cfg)["best"] == summary["best"]
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 2
