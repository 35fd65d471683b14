"""`greencode sweep`: Ray Tune over the reward coefficients alpha, beta, gamma.

Each trial trains a PPO exit policy (the same loop as train-policy) and is scored every
iteration on the held-out shards of ``base.eval_shards_dir``: exit accuracy, mean exit
layer, and ``advantage_vs_fixed`` = exit accuracy minus that of fixed exits of the same
mean depth (the quality-vs-layers score the best trial is picked by). Combinations with
alpha > beta are skipped (exiting late must never cost more than exiting early). Results
go to TensorBoard (Tune's trial dirs), ``results.csv`` (with a Pareto flag over accuracy vs
layers) and ``pareto.csv``; the best policy is exported to ``base.output_path``. Reuse of finished
trials, restore of a killed sweep and the outputs are the shared Tune driver's (workflows.tune).

    python -m workflows.sweep --set base.shards_dir=runs/shards/train --set base.eval_shards_dir=runs/shards/eval
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from greencode.atomic import write_atomic
from greencode.config import ConfigError, PolicyTrainConfig, RewardConfig, SweepConfig, result_config, validate
from greencode.manifest import StageIdentity
from greencode.policy import ExitPolicy
from greencode.scoring import policy_logits, score_exits
from greencode.shards import check_shards, list_shards, load_shards
from greencode.storage import artifact_digest, join
from workflows import tune as tune_driver
from workflows.common import ConfigCommand, stage_presets, summary_main
from workflows.train_policy import (
    EPISODE_METRICS,
    SaveCheckpoint,
    algo_config,
    plan_resources,
    shards_location,
    train,
)
from workflows.tune import Trial, TunePlan, key_of

log = logging.getLogger("greencode.sweep")

POLICY_FILE = "exit_policy.pt"
SCORE = "eval_advantage_vs_fixed"
TRAIN_METRICS = frozenset({"episode_return_mean", "env_steps", *EPISODE_METRICS})  # kept beside the eval_ scores
SHARD_PATHS = ("shards_dir", "eval_shards_dir")


def reward_grid(cfg: SweepConfig) -> list[dict[str, float]]:
    """Every (alpha, beta, gamma) with alpha <= beta; epsilon from the base config."""
    combos = [
        {"alpha": a, "beta": b, "gamma": g, "epsilon": cfg.base.reward.epsilon}
        for a, b, g in itertools.product(cfg.alpha, cfg.beta, cfg.gamma)
        if a <= b
    ]
    skipped = len(cfg.alpha) * len(cfg.beta) * len(cfg.gamma) - len(combos)
    if skipped:
        log.info("skipping %d combinations with alpha > beta", skipped)
    if not combos:
        raise ConfigError("sweep: no (alpha, beta, gamma) combination has alpha <= beta")
    return combos


def _settings(base: PolicyTrainConfig) -> dict[str, Any]:
    """The base settings a result depends on; the shard dirs enter by content (``inputs``), not by path."""
    return {k: v for k, v in result_config(base).items() if k not in SHARD_PATHS}


def _inputs(cfg: SweepConfig) -> dict[str, str | None]:
    return {"shards": artifact_digest(cfg.base.shards_dir), "eval_shards": artifact_digest(cfg.base.eval_shards_dir)}


def run_identity(cfg: SweepConfig) -> StageIdentity:
    """What the sweep's trials and its best policy depend on: the grid, the base settings, the shards' contents
    (the pipeline's manifest records the sweep stage with this identity)."""
    return StageIdentity({**result_config(cfg), "base": _settings(cfg.base)}, _inputs(cfg))


def trials(cfg: SweepConfig) -> list[Trial]:
    """One trial per grid point and sample, keyed by its own settings and the shards' contents."""
    inputs = _inputs(cfg)
    out = []
    for reward in reward_grid(cfg):
        base = cfg.base.model_copy(update={"reward": RewardConfig(**reward)})
        for sample in range(cfg.num_samples):
            key = key_of(StageIdentity({"base": _settings(base), "sample": sample}, inputs))
            out.append(Trial(key, {**reward, "sample": sample}, _absolute(base)))
    return out


def _absolute(base: PolicyTrainConfig) -> dict[str, Any]:
    """Trials run in their own directories, maybe on other nodes: give them absolute paths or URIs."""
    data = base.model_dump()
    for key in SHARD_PATHS:
        data[key] = shards_location(data[key])
    for key in ("output_path", "storage_path"):
        data[key] = str(Path(data[key]).resolve())
    return data


def trial(config: dict[str, Any]) -> None:
    """Tune function trainable: PPO with this trial's rewards, scored on held-out shards each iteration.

    Every ``ppo.checkpoint_every`` iterations (and after the last) it reports a checkpoint holding the
    RLlib state and the policy so far; a trial restarted after a failure or a restored sweep continues
    from it, and the last one holds the trial's final policy.
    """
    from ray import tune

    cfg = validate(PolicyTrainConfig, config["trial"]["config"], source="sweep trial")
    held_out = load_shards(list_shards(cfg.eval_shards_dir))

    def report(metrics: dict[str, float], policy: ExitPolicy, save: SaveCheckpoint | None) -> None:
        score = score_exits(held_out, policy_logits(policy), threshold=cfg.eval_thresholds[0]).to_dict()
        result = {**metrics, **{f"eval_{k}": float(v) for k, v in score.items()}}
        if save is None:
            tune.report(result)
            return
        policy.metadata["eval"] = score
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            policy.save(Path(tmp) / POLICY_FILE)
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))

    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as resume:
        train(cfg, on_iteration=report, resume_from=Path(resume) if resume else None, progress=False)


def keep(trial: Trial, result: Any, trial_dir: Path) -> tuple[dict[str, Any], Path]:
    """A finished trial's scores, and its policy copied out of Tune's last checkpoint."""
    if result.checkpoint is None or SCORE not in result.metrics:
        raise RuntimeError(f"sweep trial {trial.params} finished without a scored checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        policy = ExitPolicy.load(Path(ckpt) / POLICY_FILE)
    scores = {k: float(v) for k, v in result.metrics.items() if k in TRAIN_METRICS or k.startswith("eval_")}
    return scores, policy.save(trial_dir / POLICY_FILE)


def run(cfg: SweepConfig) -> dict[str, Any]:
    """Run the sweep, resume a killed one, or reuse a finished one; returns the best trial's rewards and scores.

    Trials finished by an earlier sweep with the same settings and shards are reused (workflows.tune).
    Failed trials (after ``max_failures`` restarts) are reported and left out; the best finished
    trial's policy is exported to ``base.output_path``.
    """
    import ray
    from ray import tune

    if not cfg.base.eval_shards_dir:
        raise ConfigError("sweep: base.eval_shards_dir must name held-out shards (trials are scored on them)")
    for shards in (cfg.base.shards_dir, cfg.base.eval_shards_dir):
        check_shards(shards)  # missing or bad shards: one clear error before Ray starts

    def plan(pending: list[Trial]) -> TunePlan:
        cluster_cpus = ray.cluster_resources().get("CPU", 1)
        resources = plan_resources(cfg.base.ppo, cluster_cpus)
        ppo_config = algo_config(cfg.base, resources)
        trainable = tune.with_resources(trial, ppo_config.algo_class.default_resource_request(ppo_config))
        return TunePlan(trainable, cfg.max_concurrent or max(1, math.floor(cluster_cpus / resources.total)),
                        {"failure_config": tune.FailureConfig(max_failures=cfg.max_failures),
                         "checkpoint_config": tune.CheckpointConfig(num_to_keep=1)})

    def export(best: dict[str, Any]) -> dict[str, Any]:
        write_atomic(cfg.base.output_path, Path(best["artifact"]).read_bytes())
        return {"best_reward": {k: best[k] for k in ("alpha", "beta", "gamma", "epsilon")},
                "best_eval": {k[5:]: v for k, v in best.items() if k.startswith("eval_")},
                "policy_path": cfg.base.output_path}

    return tune_driver.run(tune_driver.Sweep(
        "sweep", Path(cfg.storage_path).resolve() / cfg.name, run_identity(cfg), trials(cfg),
        Path(cfg.base.output_path), plan, keep, (("eval_exit_accuracy", "max"), ("eval_mean_exit_layer", "min")),
        lambda rows: max(rows, key=lambda r: r[SCORE]), export,
        tune_storage=join(cfg.tune_storage_path, cfg.name) if cfg.tune_storage_path else None))


COMMAND = ConfigCommand(SweepConfig, "Ray Tune sweep over the exit-policy reward coefficients.", prog="greencode sweep",
                        presets=stage_presets("sweep"))


main = summary_main(COMMAND, run, outputs=("base.output_path", "storage_path"))

if __name__ == "__main__":
    main()
