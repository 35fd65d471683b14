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

import itertools
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from greencode.atomic import write_json
from greencode.config import ConfigError, PolicyTrainConfig, SweepConfig, validate
from greencode.policy import ExitPolicy
from greencode.scoring import pareto_front, policy_logits, score_exits
from greencode.shards import list_shards, load_shards, read_meta
from workflows.common import ConfigCommand, cli_errors, init_ray
from workflows.train_policy import algo_config, plan_resources, train

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
    """Tune function trainable: PPO with this trial's rewards, scored on held-out shards each iteration."""
    from ray import tune

    cfg = validate(PolicyTrainConfig, {**config["base"], "reward": config["reward"]}, source="sweep trial")
    held_out = load_shards(list_shards(cfg.eval_shards_dir))

    def scored(metrics: dict[str, float], policy: ExitPolicy) -> dict[str, float]:
        score = score_exits(held_out, policy_logits(policy), threshold=cfg.eval_thresholds[0]).to_dict()
        return {**metrics, **{f"eval_{k}": float(v) for k, v in score.items()}}

    last: dict[str, float] = {}

    def report(metrics: dict[str, float], policy: ExitPolicy) -> None:
        last.update(scored(metrics, policy))
        tune.report(last)

    policy, metrics = train(cfg, on_iteration=report, progress=False)
    policy.metadata["eval"] = {k[5:]: v for k, v in scored(metrics, policy).items() if k.startswith("eval_")}
    with tempfile.TemporaryDirectory() as tmp:
        policy.save(Path(tmp) / POLICY_FILE)
        tune.report(last, checkpoint=tune.Checkpoint.from_directory(tmp))


def run(cfg: SweepConfig) -> dict[str, Any]:
    """Run the sweep (or reuse a finished one); returns the best trial's rewards and scores."""
    import ray
    from ray import tune

    if not cfg.base.eval_shards_dir:
        raise ConfigError("sweep: base.eval_shards_dir must name held-out shards (trials are scored on them)")
    out_dir = Path(cfg.storage_path).resolve() / cfg.name
    summary_path = out_dir / "best.json"
    if summary_path.is_file() and Path(cfg.base.output_path).is_file():
        log.info("sweep %s already finished; delete %s to rerun", cfg.name, out_dir)
        return json.loads(summary_path.read_text())
    read_meta(list_shards(cfg.base.eval_shards_dir)[0])  # fail early on missing/foreign shards
    grid = reward_grid(cfg)
    init_ray()
    cluster_cpus = ray.cluster_resources().get("CPU", 1)
    plan = plan_resources(cfg.base.ppo, cluster_cpus)
    shard_paths = [str(p) for p in list_shards(cfg.base.shards_dir)]
    ppo_config = algo_config(cfg.base, shard_paths, plan)
    resources = ppo_config.algo_class.default_resource_request(ppo_config)
    concurrent = cfg.max_concurrent or max(1, math.floor(cluster_cpus / plan.total))
    log.info("%d trials x %d samples, up to %d at a time (%.3g CPU each)", len(grid), cfg.num_samples, concurrent,
             plan.total)
    tuner = tune.Tuner(
        tune.with_resources(trial, resources),
        param_space={"base": _absolute(cfg.base), "reward": tune.grid_search(grid)},
        tune_config=tune.TuneConfig(num_samples=cfg.num_samples, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=cfg.name, storage_path=str(out_dir.parent), verbose=1),
    )
    results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} sweep trials failed; first error: {results.errors[0]}")
    frame = results.get_dataframe()
    frame["pareto"] = pareto_front(frame["eval_exit_accuracy"].to_numpy(), frame["eval_mean_exit_layer"].to_numpy())
    frame.to_csv(out_dir / "results.csv", index=False)
    best = results.get_best_result(metric=SCORE, mode="max", scope="last")
    with best.checkpoint.as_directory() as ckpt:
        policy = ExitPolicy.load(Path(ckpt) / POLICY_FILE)
    policy.save(cfg.base.output_path)
    summary = {
        "best_reward": best.config["reward"],
        "best_eval": {k[5:]: v for k, v in best.metrics.items() if k.startswith("eval_")},
        "policy_path": cfg.base.output_path,
        "results_csv": str(out_dir / "results.csv"),
        "tensorboard": f"tensorboard --logdir {out_dir}",
        "trials": len(frame),
    }
    write_json(summary_path, summary)
    log.info("best of %d trials: %s -> %s", len(frame), summary["best_reward"], summary["best_eval"])
    return summary


COMMAND = ConfigCommand(SweepConfig, "Ray Tune sweep over the exit-policy reward coefficients.", prog="greencode sweep")


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = COMMAND.parse(argv)
    print(json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    main()
