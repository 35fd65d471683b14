"""`greencode sweep`: Ray Tune over the reward coefficients alpha, beta, gamma.

Each trial trains a PPO exit policy (the same loop as train-policy) and is scored every
iteration on the held-out shards of ``base.eval_shards_dir``: exit accuracy, mean exit
layer, and ``advantage_vs_fixed`` = exit accuracy minus that of fixed exits of the same
mean depth (the quality-vs-layers score the best trial is picked by). Combinations with
alpha > beta are skipped (exiting late must never cost more than exiting early). Results
go to TensorBoard (Tune's trial dirs) and ``results.csv`` (with a Pareto flag over
accuracy vs layers); the best policy is exported to ``base.output_path``.

    python -m workflows.sweep --set base.shards_dir=runs/shards/train --set base.eval_shards_dir=runs/shards/eval
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from greencode.atomic import write_atomic, write_json
from greencode.config import ConfigError, PolicyTrainConfig, SweepConfig, result_config, validate
from greencode.digests import tree_digest
from greencode.manifest import StageIdentity, claim_work_dir
from greencode.policy import ExitPolicy
from greencode.scoring import pareto_front, policy_logits, score_exits
from greencode.shards import check_shards, list_shards, load_shards
from workflows.common import ConfigCommand, cli_errors, init_ray, stage_presets
from workflows.train_policy import SaveCheckpoint, algo_config, plan_resources, train

log = logging.getLogger("greencode.sweep")

POLICY_FILE = "exit_policy.pt"
SCORE = "eval_advantage_vs_fixed"


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


def _absolute(base: PolicyTrainConfig) -> dict[str, Any]:
    """Trials run in their own directories: give them absolute paths."""
    data = base.model_dump()
    for key in ("shards_dir", "eval_shards_dir", "output_path", "storage_path"):
        data[key] = str(Path(data[key]).resolve())
    return data


def trial(config: dict[str, Any]) -> None:
    """Tune function trainable: PPO with this trial's rewards, scored on held-out shards each iteration.

    Every ``ppo.checkpoint_every`` iterations (and after the last) it reports a checkpoint holding the
    RLlib state and the policy so far; a trial restarted after a failure or a restored sweep continues
    from it, and the last one holds the trial's final policy.
    """
    from ray import tune

    cfg = validate(PolicyTrainConfig, {**config["base"], "reward": config["reward"]}, source="sweep trial")
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


def run_identity(cfg: SweepConfig) -> StageIdentity:
    """What the sweep's trials and its best policy depend on: the grid, the base settings, the shards."""
    return StageIdentity(result_config(cfg), {"shards": tree_digest(cfg.base.shards_dir),
                                              "eval_shards": tree_digest(cfg.base.eval_shards_dir)})


def run(cfg: SweepConfig) -> dict[str, Any]:
    """Run the sweep, resume a killed one, or reuse a finished one; returns the best trial's rewards and scores.

    A sweep killed midway is restored with ``Tuner.restore``: finished trials are kept, unfinished
    and failed ones continue from their last checkpoint. Failed trials (after ``max_failures``
    restarts) are reported and left out; the best finished trial's policy is exported.
    """
    import ray
    from ray import tune

    if not cfg.base.eval_shards_dir:
        raise ConfigError("sweep: base.eval_shards_dir must name held-out shards (trials are scored on them)")
    for shards in (cfg.base.shards_dir, cfg.base.eval_shards_dir):
        check_shards(shards)  # missing or bad shards: one clear error before Ray starts
    identity = run_identity(cfg)
    out_dir = Path(cfg.storage_path).resolve() / cfg.name
    summary_path = out_dir / "best.json"
    if summary_path.is_file() and Path(cfg.base.output_path).is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("run_identity") == identity.digest:
            log.info("sweep %s already finished; delete %s to rerun", cfg.name, out_dir)
            return summary
    grid = reward_grid(cfg)
    claim_work_dir(out_dir, identity, "sweep trials")
    init_ray()
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    plan = plan_resources(cfg.base.ppo, cluster_cpus)
    shard_paths = [str(p) for p in list_shards(cfg.base.shards_dir)]
    ppo_config = algo_config(cfg.base, shard_paths, plan)
    trainable = tune.with_resources(trial, ppo_config.algo_class.default_resource_request(ppo_config))
    if tune.Tuner.can_restore(out_dir):
        log.info("resuming the sweep in %s: finished trials are kept, the others continue from their last "
                 "checkpoint", out_dir)
        tuner = tune.Tuner.restore(str(out_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        concurrent = cfg.max_concurrent or max(1, math.floor(cluster_cpus / plan.total))
        log.info("%d trials x %d samples, up to %d at a time (%.3g CPU each)", len(grid), cfg.num_samples,
                 concurrent, plan.total)
        tuner = tune.Tuner(
            trainable,
            param_space={"base": _absolute(cfg.base), "reward": tune.grid_search(grid)},
            tune_config=tune.TuneConfig(num_samples=cfg.num_samples, max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=cfg.name, storage_path=str(out_dir.parent), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    results = tuner.fit()
    summary = export_best(cfg, results, out_dir)
    summary["run_identity"] = identity.digest
    write_json(summary_path, summary)
    return summary


def export_best(cfg: SweepConfig, results: Any, out_dir: Path) -> dict[str, Any]:
    """results.csv over the finished trials, and the best one's policy at ``base.output_path``."""
    finished = [r for r in results if r.error is None and r.checkpoint is not None and SCORE in r.metrics]
    failed = [r for r in results if r.error is not None]
    if not finished:
        raise RuntimeError(f"every sweep trial failed; the first error: {failed[0].error if failed else 'none'}")
    if failed:
        log.warning("%d of %d sweep trials failed; the best of the %d finished ones is exported. First error: %s",
                    len(failed), len(results), len(finished), failed[0].error)
    frame = results.get_dataframe()
    frame = frame[frame["trial_id"].isin({r.metrics["trial_id"] for r in finished})].copy()
    frame["pareto"] = pareto_front(frame["eval_exit_accuracy"].to_numpy(), frame["eval_mean_exit_layer"].to_numpy())
    write_atomic(out_dir / "results.csv", frame.to_csv(index=False))
    best = max(finished, key=lambda r: r.metrics[SCORE])
    with best.checkpoint.as_directory() as ckpt:
        policy = ExitPolicy.load(Path(ckpt) / POLICY_FILE)
    policy.save(cfg.base.output_path)
    summary = {
        "best_reward": best.config["reward"],
        "best_eval": {k[5:]: v for k, v in best.metrics.items() if k.startswith("eval_")},
        "policy_path": cfg.base.output_path,
        "results_csv": str(out_dir / "results.csv"),
        "tensorboard": f"tensorboard --logdir {out_dir}",
        "trials": len(finished),
        "failed_trials": [{"reward": r.config["reward"], "error": str(r.error)} for r in failed],
    }
    log.info("best of %d trials: %s -> %s", len(finished), summary["best_reward"], summary["best_eval"])
    return summary


COMMAND = ConfigCommand(SweepConfig, "Ray Tune sweep over the exit-policy reward coefficients.", prog="greencode sweep",
                        presets=stage_presets("sweep"))


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = COMMAND.parse(argv)
    print(json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    main()
