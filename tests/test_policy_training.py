"""End to end on a tiny model: Ray Data extraction -> RLlib PPO (2 env runners, 2 CPUs) -> ExitPolicy
-> `greencode generate --gate policy`, plus export parity with RLlib's own module and a Tune sweep."""

from __future__ import annotations

import csv
import json
import logging
import math

import pytest
import torch

from greencode.config import ConfigError, ExtractConfig, PolicyPPOConfig, PolicyTrainConfig, SweepConfig
from greencode.digests import file_digest
from greencode.env import observation_stats
from greencode.extraction import MANIFEST
from greencode.policy import ExitPolicy
from greencode.shards import list_shards, load_shards, read_meta
from workflows import extract, sweep, train_policy

pytestmark = pytest.mark.ray

TINY_PPO = {"total_env_steps": 300, "train_batch_size": 150, "minibatch_size": 50, "num_epochs": 1,
            "num_env_runners": 2, "envs_per_env_runner": 2}


@pytest.fixture(scope="module")
def shards(ray_local, tiny_model_dir, tmp_path_factory):
    cfg = ExtractConfig(model={"name": str(tiny_model_dir), "device": "cpu"}, data={"max_files": 20}, num_samples=8,
                        samples_per_shard=2, tokens_per_sample=4, output_dir=str(tmp_path_factory.mktemp("shards")))
    return cfg, extract.run(cfg)


def test_resource_plan_starts_on_two_cores():
    plan = train_policy.plan_resources(PolicyPPOConfig(num_env_runners=2), 2)
    assert plan.total <= 2 and plan.num_env_runners == 2
    assert train_policy.plan_resources(PolicyPPOConfig(num_env_runners=4, cpus_per_env_runner=1), 16).total == 5


def test_extraction_writes_resumable_shards(shards):
    cfg, manifest = shards
    paths = list_shards(cfg.output_dir)
    assert [p.name for p in paths] == manifest["shards"] and len(paths) == 4
    meta = read_meta(paths[0])
    assert meta.exit_points == [4, 6, 10] and meta.hidden_size == 64 and meta.num_layers == 12
    mtimes = {p: p.stat().st_mtime_ns for p in paths}
    paths[1].unlink()
    (paths[0].parent / MANIFEST).unlink()
    assert extract.run(cfg)["shards"] == manifest["shards"]  # only the missing shard is rewritten
    assert paths[0].stat().st_mtime_ns == mtimes[paths[0]] and paths[1].is_file()


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    cfg, _ = shards
    out = tmp_path_factory.mktemp("policy")
    train_cfg = PolicyTrainConfig(shards_dir=cfg.output_dir, eval_shards_dir=cfg.output_dir, ppo=TINY_PPO,
                                  output_path=str(out / "exit_policy.pt"), storage_path=str(out / "rllib"))
    return train_cfg, train_policy.run(train_cfg)


def test_ppo_reports_metrics_and_exports_a_policy(trained, tiny_model_dir):
    cfg, summary = trained
    metrics = summary["train"]
    assert metrics["env_steps"] >= TINY_PPO["total_env_steps"]
    for name in ("episode_return_mean", "step_reward_mean", "exit_accuracy", "mean_exit_layer", "mean_optimal_layer"):
        assert math.isfinite(metrics[name]), name
    assert 4 <= metrics["mean_exit_layer"] <= 12 and 0 <= summary["eval"]["exit_accuracy"] <= 1
    meta = read_meta(list_shards(cfg.shards_dir)[0])
    policy = ExitPolicy.load(cfg.output_path, hidden_size=64, exit_points=[4, 6, 10],
                             model_fingerprint=meta.model_fingerprint)
    assert policy.metadata["eval"] == summary["eval"]
    assert train_policy.run(cfg) == json.loads(json.dumps(summary))  # finished: reused, not retrained


def test_exported_mlp_reproduces_rllib_logits(trained):
    from ray.rllib.core.rl_module.rl_module import RLModule

    cfg, _ = trained
    rl_module = "checkpoint/rllib/learner_group/learner/rl_module/default_policy"
    module = RLModule.from_checkpoint(f"{cfg.storage_path}/{rl_module}")
    mean, std = (torch.from_numpy(x) for x in observation_stats(load_shards(list_shards(cfg.shards_dir))))
    hidden = torch.randn(32, 64) * std + mean  # raw hidden states; RLlib saw them standardised
    with torch.no_grad():
        expected = module.forward_inference({"obs": (hidden - mean) / std})["action_dist_inputs"]
    torch.testing.assert_close(ExitPolicy.load(cfg.output_path)(hidden), expected, rtol=1e-4, atol=1e-5)


def test_generate_cli_gates_with_the_trained_policy(trained, tiny_model_dir, capsys):
    from workflows import generate

    cfg, _ = trained
    generate.main(["--model", str(tiny_model_dir), "--gate", "policy", "--policy", cfg.output_path,
                   "--threshold", "0.5", "--prompt", "def add(a, b):", "--max-new-tokens", "3", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert record["generated_tokens"] == 3 and 1 <= record["mean_layers"] <= 12


def experiment_trials(experiment) -> list[str]:
    """The trial keys a Tune experiment dir ran (from each Tune trial's params.json)."""
    return sorted(json.loads(p.read_text())["trial"]["key"] for p in experiment.glob("*/params.json"))


def test_sweep_reuses_only_trials_of_the_same_settings_and_restores_only_into_them(trained, tmp_path, caplog):
    cfg, _ = trained
    base = cfg.model_copy(update={"output_path": str(tmp_path / "best.pt")})
    sweep_cfg = SweepConfig(base=base, alpha=[0.1, 0.9], beta=[0.5], gamma=[0.5], storage_path=str(tmp_path / "sweep"))
    assert len(sweep.reward_grid(sweep_cfg)) == 1
    out = tmp_path / "sweep" / "reward_sweep"
    summary = sweep.run(sweep_cfg)
    first = summary["ran"]
    assert summary["trials"] == 1 and summary["best_reward"]["alpha"] == 0.1 and len(first) == 1
    assert (out / "results.csv").is_file() and (out / "pareto.csv").is_file()
    assert list(out.rglob("events.out.tfevents*"))  # TensorBoard
    ExitPolicy.load(tmp_path / "best.pt", hidden_size=64)
    assert json.dumps(sweep.run(sweep_cfg)) == json.dumps(summary)  # unchanged: the finished sweep, as it is
    (tmp_path / "best.pt").write_bytes(b"replaced")  # the export replaced: exported again, nothing trained
    assert sweep.run(sweep_cfg)["ran"] == []
    ExitPolicy.load(tmp_path / "best.pt", hidden_size=64)
    with pytest.raises(ConfigError, match="appear twice"):
        sweep.run(sweep_cfg.model_copy(update={"alpha": [0.1, 0.1]}))

    # killed after its trial finished, before its record and the summary: restored, nothing trained
    for path in [out / "best.json", *(out / "trials").glob("*.json")]:
        path.unlink()
    with caplog.at_level(logging.INFO, logger="greencode.tune"):
        again = sweep.run(sweep_cfg)
    assert "resuming the sweep in" in caplog.text and again["best_eval"] == summary["best_eval"]
    assert experiment_trials(out / "tune") == first

    # a value added to the grid: only the new point trains, in a new experiment (the old one set aside)
    caplog.clear()
    grown = sweep_cfg.model_copy(update={"alpha": [0.1, 0.25, 0.9]})
    with caplog.at_level(logging.INFO, logger="greencode.tune"):
        summary = sweep.run(grown)
    assert summary["reused"] == first and len(summary["ran"]) == 1 and summary["trials"] == 2
    assert "config alpha: [0.1, 0.9] -> [0.1, 0.25, 0.9]" in caplog.text
    assert experiment_trials(out / "tune") == summary["ran"]
    assert [experiment_trials(p) for p in out.glob("tune.set-aside-*")] == [first]
    rows = {float(r["alpha"]): r for r in csv.DictReader((out / "results.csv").open())}
    assert sorted(rows) == [0.1, 0.25] and rows[0.25]["trial"] == summary["ran"][0]
    assert rows[0.25]["reused"] == "False" and rows[0.1]["reused"] == "True"
    best = rows[summary["best_reward"]["alpha"]]
    assert summary["best_trial"] == best["trial"]
    assert float(best["eval_advantage_vs_fixed"]) == max(float(r["eval_advantage_vs_fixed"]) for r in rows.values())
    assert file_digest(tmp_path / "best.pt") == file_digest(out / "trials" / best["trial"] / "exit_policy.pt")

    # the base PPO learning rate changed: no finished trial is reused
    relearned = sweep_cfg.model_copy(update={"base": base.model_copy(update={
        "ppo": base.ppo.model_copy(update={"lr": base.ppo.lr * 2})})})
    summary = sweep.run(relearned)
    assert summary["reused"] == [] and len(summary["ran"]) == 1 and summary["ran"] != first
