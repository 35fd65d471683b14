"""Exit-environment throughput: raw ExitEnv steps/s, then PPO env steps/s with 1, 2, 4 env runners.

Prints one table row per runner count (measured wall time per step, split into sampling and
learning by the shares of RLlib's own timers) and projects the wall time of a 500k-step PPO run on a 16-CPU node:
``500k * (1 / (15 runners * per-runner sampling rate) + learner seconds per step)``
(PPO samples, then learns, so the two add up; the learner keeps one CPU).

    .venv/bin/python -m workflows.extract --set num_samples=40 --set output_dir=runs/shards/train   # once
    .venv/bin/python benchmarks/env_throughput.py --shards-dir runs/shards/train
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from greencode.config import PolicyTrainConfig
from greencode.env import ExitEnv
from greencode.shards import ShardError, list_shards
from workflows.train_policy import algo_config, plan_resources

TARGET_STEPS = 500_000
NODE_CPUS = 16


def raw_env_rate(shards_dir: str, steps: int = 20_000) -> float:
    """Steps/s of one ExitEnv in this process with random actions (no Ray, no policy)."""
    env = ExitEnv({"shards_dir": shards_dir})
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    start = time.perf_counter()
    for action in rng.integers(0, 2, steps):
        if env.step(int(action))[2]:
            env.reset()
    return steps / (time.perf_counter() - start)


def ppo_rate(shards_dir: str, runners: int, batch: int, iterations: int) -> dict[str, float]:
    """PPO env steps/s with ``runners`` env runners, after one warm-up iteration."""
    import ray

    cfg = PolicyTrainConfig(shards_dir=shards_dir, ppo={"num_env_runners": runners, "envs_per_env_runner": 4,
                                                        "train_batch_size": batch, "minibatch_size": 512,
                                                        "num_epochs": 6, "cpus_per_env_runner": 1.0})
    plan = plan_resources(cfg.ppo, ray.cluster_resources()["CPU"])
    algo = algo_config(cfg, [str(p) for p in list_shards(shards_dir)], plan).build_algo()
    try:
        algo.train()
        start, first = time.perf_counter(), None
        for _ in range(iterations):
            result = algo.train()
            first = first if first is not None else result["num_env_steps_sampled_lifetime"] - batch
        seconds_per_step = (time.perf_counter() - start) / (result["num_env_steps_sampled_lifetime"] - first)
        # RLlib's timers are smoothed averages: use them only to split the measured wall time
        timers = result["timers"]
        sample_share = timers["env_runner_sampling_timer"] / timers["training_step"]
        learn_share = timers["learner_update_timer"] / timers["training_step"]
    finally:
        algo.stop()
    return {"runners": runners, "cpus_per_runner": plan.cpus_per_env_runner, "steps_per_s": 1 / seconds_per_step,
            "sampling_steps_per_s": 1 / (seconds_per_step * sample_share),
            "learner_s_per_step": seconds_per_step * learn_share}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards-dir", default="runs/shards/train")
    p.add_argument("--runners", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch", type=int, default=4096, help="train batch per iteration (METHOD §4: 4096)")
    p.add_argument("--iterations", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        list_shards(args.shards_dir)
    except ShardError:
        raise SystemExit(f"no shards in {args.shards_dir}: run `.venv/bin/python -m workflows.extract --set "
                         f"num_samples=40 --set output_dir={args.shards_dir}` first (embedded model, ~6 min on 2 cores)"
                         ) from None

    import ray

    from workflows.common import init_ray

    print(f"raw ExitEnv, 1 process, random actions: {raw_env_rate(args.shards_dir):,.0f} steps/s")
    init_ray()
    cpus = ray.cluster_resources()["CPU"]
    print(f"PPO on {cpus:g} CPUs, batch {args.batch}, 6 epochs, minibatch 512:")
    print(f"{'runners':>7} {'CPU/runner':>10} {'PPO steps/s':>12} {'sampling steps/s':>17} {'learner ms/1k steps':>20}")
    rows = [ppo_rate(args.shards_dir, n, args.batch, args.iterations) for n in args.runners]
    for r in rows:
        print(f"{r['runners']:>7} {r['cpus_per_runner']:>10.3g} {r['steps_per_s']:>12,.0f} "
              f"{r['sampling_steps_per_s']:>17,.0f} {r['learner_s_per_step'] * 1e6:>20,.1f}")
    one = rows[0]
    per_runner = one["sampling_steps_per_s"] / one["runners"]
    seconds = TARGET_STEPS * (1 / (per_runner * (NODE_CPUS - 1)) + one["learner_s_per_step"])
    print(f"projection, {TARGET_STEPS:,} PPO steps on a {NODE_CPUS}-CPU node ({NODE_CPUS - 1} runners at "
          f"{per_runner:,.0f} steps/s each, measured here with {one['cpus_per_runner']:g} CPU): {seconds / 60:.1f} min")
    ray.shutdown()


if __name__ == "__main__":
    main()
