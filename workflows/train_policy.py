"""`greencode train-policy`: PPO exit policy with RLlib (new API stack) over replayed shards.

N env runners x M ExitEnvs each, every runner reading its own shards; the learner runs in
the main process. The actor MLP is exported as a greencode ExitPolicy file (with the exit
points, hidden size and model fingerprint of the shards) that
``greencode generate --gate policy --policy FILE`` loads; with ``eval_shards_dir`` the
policy is scored on held-out shards against fixed exits of the same mean depth.

    python -m workflows.train_policy --preset demo --set ppo.total_env_steps=200000
    ray job submit --working-dir . -- .venv/bin/python -m workflows.train_policy --config ...
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray.rllib.callbacks.callbacks import RLlibCallback

from greencode.atomic import atomic_path, recover, write_json
from greencode.config import PolicyPPOConfig, PolicyTrainConfig, result_config
from greencode.digests import tree_digest
from greencode.env import ExitEnv, observation_stats
from greencode.manifest import StageIdentity, claim_work_dir
from greencode.policy import ExitPolicy, PolicyMismatchError
from greencode.policy_export import ObsStats, export_policy
from greencode.scoring import score_policy
from greencode.shards import check_shards, list_shards, load_shards, read_meta
from greencode.storage import artifact_digest, is_uri
from workflows.common import ConfigCommand, cli_errors, init_ray, published_outputs, stage_presets

log = logging.getLogger("greencode.train_policy")

EPISODE_METRICS = ("exit_accuracy", "mean_exit_layer", "mean_optimal_layer", "step_reward_mean")


class ExitMetricsCallback(RLlibCallback):
    """Logs ExitEnv's per-episode metrics; they appear under ``result["env_runners"][name]``."""

    def on_episode_end(self, *, episode, prev_episode_chunks=None, metrics_logger=None, **kwargs) -> None:
        chunks = [*(prev_episode_chunks or []), episode]
        length = sum(len(c) for c in chunks)
        metrics_logger.log_value("step_reward_mean", sum(c.get_return() for c in chunks) / max(length, 1))
        info = episode.get_infos(-1)
        for name in EPISODE_METRICS[:3]:
            if name in info:
                metrics_logger.log_value(name, info[name])


@dataclass
class ResourcePlan:
    """CPUs for the main process (learner) and each env runner, sized to fit the cluster."""

    num_env_runners: int
    cpus_per_env_runner: float
    cpus_for_main: float

    @property
    def total(self) -> float:
        return self.cpus_for_main + self.num_env_runners * self.cpus_per_env_runner


def plan_resources(ppo: PolicyPPOConfig, cluster_cpus: float) -> ResourcePlan:
    """Fractional CPUs so N runners + the learner start even on 2 cores (RLlib wants 1 + N otherwise)."""
    main = min(1.0, cluster_cpus / 4)
    runners = ppo.num_env_runners
    per_runner = min(ppo.cpus_per_env_runner, (cluster_cpus - main) / runners) if runners else 0.0
    return ResourcePlan(runners, round(per_runner, 3), main)


def shards_location(directory: str) -> str:
    """How an env runner on any node reaches a shard dir: its URI, or its absolute local path."""
    return directory if is_uri(directory) else str(Path(directory).resolve())


def algo_config(cfg: PolicyTrainConfig, plan: ResourcePlan, obs_stats: ObsStats | None = None):
    """RLlib's PPO algorithm config for METHOD §4 (separate value net, tanh MLP, linear lr decay).

    Each env runner lists the shard dir itself and replays its own share of it (a dir on object storage
    is fetched once per node), so runners need no disk shared with the driver."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig

    ppo = cfg.ppo
    lr = [[0, ppo.lr], [ppo.total_env_steps, ppo.lr * 1e-3]] if ppo.lr_decay else ppo.lr
    env_config: dict[str, Any] = {"shards_dir": shards_location(cfg.shards_dir), "reward": cfg.reward.model_dump()}
    if obs_stats is not None:
        env_config.update(obs_mean=obs_stats[0].tolist(), obs_std=obs_stats[1].tolist())
    return (
        PPOConfig()
        .environment(ExitEnv, env_config=env_config)
        .env_runners(
            num_env_runners=plan.num_env_runners,
            num_envs_per_env_runner=ppo.envs_per_env_runner,
            num_cpus_per_env_runner=plan.cpus_per_env_runner,
        )
        .resources(num_cpus_for_main_process=plan.cpus_for_main)
        .learners(num_learners=0)
        .training(
            train_batch_size_per_learner=ppo.train_batch_size,
            minibatch_size=min(ppo.minibatch_size, ppo.train_batch_size),
            num_epochs=ppo.num_epochs,
            lr=lr,
            gamma=ppo.discount,
        )
        .rl_module(
            model_config=DefaultModelConfig(
                fcnet_hiddens=list(ppo.hidden_sizes),
                fcnet_activation=ppo.activation,
                head_fcnet_hiddens=[],
                vf_share_layers=False,
            )
        )
        .callbacks(ExitMetricsCallback)
        .debugging(seed=cfg.seed)
    )


def iteration_metrics(result: dict[str, Any]) -> dict[str, float]:
    runners = result.get("env_runners", {})
    metrics = {"episode_return_mean": runners.get("episode_return_mean", math.nan)}
    metrics.update({name: runners.get(name, math.nan) for name in EPISODE_METRICS})
    key = "num_env_steps_sampled_lifetime"
    metrics["env_steps"] = result.get(key) or runners.get(key, 0)
    return {k: float(v) for k, v in metrics.items()}


CHECKPOINT_PROGRESS = "progress.json"  # in a checkpoint: the metrics (env steps) it was taken at
SaveCheckpoint = Callable[[Path], None]


def train(
    cfg: PolicyTrainConfig,
    *,
    on_iteration: Callable[[dict[str, float], ExitPolicy, SaveCheckpoint | None], None] | None = None,
    resume_from: Path | None = None,
    progress: bool = True,
) -> tuple[ExitPolicy, dict[str, float]]:
    """The PPO loop shared by train-policy and the sweep's trials; Ray must already be running.

    ``on_iteration(metrics, policy, save)`` sees each iteration's metrics and the policy exported from
    it; every ``ppo.checkpoint_every`` iterations and after the last one ``save`` is given too:
    ``save(dir)`` writes a checkpoint (RLlib state + progress) into ``dir`` that ``resume_from``
    continues from. A checkpoint of a finished run resumes to the same policy without training.
    """
    import ray
    from tqdm import tqdm

    shard_paths = [str(p) for p in list_shards(cfg.shards_dir)]
    meta = read_meta(shard_paths[0])
    plan = plan_resources(cfg.ppo, ray.cluster_resources().get("CPU", 1))
    torch.set_num_threads(max(1, int(plan.cpus_for_main)))
    obs_stats = observation_stats(load_shards(shard_paths)) if cfg.ppo.normalize_observations else None
    log.info("PPO on %d shards (%s): %d env runners x %d envs, %.3g CPU each + %.3g for the learner",
             len(shard_paths), cfg.shards_dir, plan.num_env_runners, cfg.ppo.envs_per_env_runner,
             plan.cpus_per_env_runner, plan.cpus_for_main)
    algo = algo_config(cfg, plan, obs_stats).build_algo()
    metrics: dict[str, float] = {"env_steps": 0.0}
    if resume_from is not None:
        algo.restore_from_path(str(Path(resume_from).resolve() / "rllib"))
        metrics = json.loads((Path(resume_from) / CHECKPOINT_PROGRESS).read_text())
        log.info("resuming from %s (iteration %d, %d env steps)", resume_from, algo.iteration, metrics["env_steps"])

    def export() -> ExitPolicy:
        return export_policy(algo.get_module(), meta, cfg.ppo, obs_stats, {
            "reward": cfg.reward.model_dump(), "ppo": cfg.ppo.model_dump(), "env_steps": metrics["env_steps"],
            "shards_dir": cfg.shards_dir,
        })

    def save(directory: Path) -> None:
        algo.save_to_path(str(Path(directory).resolve() / "rllib"))
        write_json(Path(directory) / CHECKPOINT_PROGRESS, metrics)

    bar = tqdm(total=cfg.ppo.total_env_steps, initial=int(metrics["env_steps"]), unit="step", desc="PPO",
               disable=not progress)
    try:
        while metrics["env_steps"] < cfg.ppo.total_env_steps:
            metrics = iteration_metrics(algo.train())
            bar.update(int(metrics["env_steps"]) - bar.n)
            bar.set_postfix(ret=f"{metrics['episode_return_mean']:.2f}", acc=f"{metrics['exit_accuracy']:.3f}",
                            layer=f"{metrics['mean_exit_layer']:.1f}/{metrics['mean_optimal_layer']:.1f}")
            log.info("iter %d steps %d: return %.3f, step reward %.3f, exit accuracy %.3f, exit layer %.2f "
                     "(optimal %.2f)", algo.iteration, metrics["env_steps"], metrics["episode_return_mean"],
                     metrics["step_reward_mean"], metrics["exit_accuracy"], metrics["mean_exit_layer"],
                     metrics["mean_optimal_layer"])
            last = metrics["env_steps"] >= cfg.ppo.total_env_steps
            due = last or algo.iteration % cfg.ppo.checkpoint_every == 0
            if on_iteration is not None:
                on_iteration(metrics, export(), save if due else None)
        policy = export()
    finally:
        bar.close()
        algo.stop()
    return policy, metrics


def run_identity(cfg: PolicyTrainConfig) -> StageIdentity:
    """What the policy and the RLlib checkpoints depend on: the settings and the shards' contents."""
    shards = {"shards": artifact_digest(cfg.shards_dir)}
    if cfg.eval_shards_dir:
        shards["eval_shards"] = artifact_digest(cfg.eval_shards_dir)
    return StageIdentity(result_config(cfg), shards)


def _finished(cfg: PolicyTrainConfig, identity: StageIdentity) -> dict[str, Any] | None:
    """The summary of an earlier run of this identity when its policy file is complete and fits the shards."""
    out, summary_path = Path(cfg.output_path), Path(cfg.output_path).with_suffix(".json")
    if not (out.is_file() and summary_path.is_file()):
        return None
    summary = json.loads(summary_path.read_text())
    if summary.get("run_identity") != identity.digest or summary.get("policy_digest") != tree_digest(out):
        log.info("retraining: %s was trained with other settings or shards, or replaced since", out)
        return None
    meta = read_meta(list_shards(cfg.shards_dir)[0])
    try:
        ExitPolicy.load(out, hidden_size=meta.hidden_size, exit_points=meta.exit_points,
                        model_fingerprint=meta.model_fingerprint)
    except PolicyMismatchError as err:
        log.warning("retraining: %s", err)
        return None
    return summary


def latest_checkpoint(path: Path) -> Path | None:
    """``path`` when it holds a complete checkpoint (after finishing or undoing an interrupted swap)."""
    recover(path)
    return path if (path / CHECKPOINT_PROGRESS).is_file() else None


def replace_checkpoint(path: Path, save: SaveCheckpoint) -> None:
    """Write a new checkpoint beside ``path`` and swap it in: a kill mid-save keeps the previous one."""
    with atomic_path(path, directory=True) as tmp:
        save(tmp)


def run(cfg: PolicyTrainConfig) -> dict[str, Any]:
    """Train (or reuse) the policy, export it, score it on held-out shards; returns the summary."""
    for shards in filter(None, (cfg.shards_dir, cfg.eval_shards_dir)):
        check_shards(shards)  # missing or bad shards: one clear error (file, row, column) before Ray starts
    identity = run_identity(cfg)
    done = _finished(cfg, identity)
    if done is not None:
        log.info("policy %s already trained; delete it to retrain", cfg.output_path)
        return done
    storage = claim_work_dir(Path(cfg.storage_path).resolve(), identity, "RLlib checkpoints")
    checkpoint = storage / "checkpoint"
    init_ray()
    start = time.perf_counter()

    def keep(metrics: dict[str, float], policy: ExitPolicy, save: SaveCheckpoint | None) -> None:
        if save is not None:
            replace_checkpoint(checkpoint, save)

    policy, metrics = train(cfg, on_iteration=keep, resume_from=latest_checkpoint(checkpoint))
    summary: dict[str, Any] = {"policy_path": cfg.output_path, "train": metrics,
                               "train_time_s": time.perf_counter() - start, "run_identity": identity.digest}
    if cfg.eval_shards_dir:
        scores = score_policy(policy, cfg.eval_shards_dir, cfg.eval_thresholds)
        for threshold, score in scores.items():
            log.info("held-out, T=%.2f: exit accuracy %.3f at %.2f mean layers; fixed exits at the same depth %.3f "
                     "(fixed at layer %d: %.3f); optimal mean layer %.2f", threshold, score.exit_accuracy,
                     score.mean_exit_layer, score.fixed_same_depth_accuracy, score.fixed_deeper_layer,
                     score.fixed_deeper_accuracy, score.mean_optimal_layer)
        summary["eval"] = scores[cfg.eval_thresholds[0]].to_dict() | {"threshold": cfg.eval_thresholds[0]}
        summary["eval_by_threshold"] = {str(t): s.to_dict() for t, s in scores.items()}
        policy.metadata["eval"] = summary["eval"]
    policy.save(cfg.output_path)
    summary["policy_digest"] = tree_digest(cfg.output_path)
    write_json(Path(cfg.output_path).with_suffix(".json"), summary)
    log.info("policy written to %s", cfg.output_path)
    return summary


COMMAND = ConfigCommand(PolicyTrainConfig, "Train the PPO exit policy on hidden-state shards (RLlib).",
                        prog="greencode train-policy", presets=stage_presets("train_policy"))


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = COMMAND.parse(argv)
    with published_outputs(cfg, "output_path") as local:
        summary = run(local)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
