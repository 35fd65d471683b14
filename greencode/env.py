"""ExitEnv: the exit decision of METHOD §3 as a Gymnasium environment replaying shards.

The LLM is not in the loop: hidden states and per-exit predictions were extracted once
(greencode.shards), so many environments run in parallel on CPUs.

- observation: the hidden state (float32, shape ``[hidden_size]``) of the current token at the
  current exit point, followed by the exit's own confidence features when the shards recorded
  them (``ShardMeta.features``, greencode/confidence.py); optionally standardised per dimension
  with fixed statistics.
- actions: ``0 = continue`` (go to the next exit point of the same token), ``1 = exit`` (the
  token is done; the next observation is the next token at the first exit point). Continuing
  past the last exit point finishes the token at the final layer.
- episode: one sample drawn uniformly from the env's shards; it ends after the last decision on
  the last token (no truncation).

Rewards, with exit indices ``e`` (current), ``o`` (optimal, ``n`` = final layer) and ``n`` decision
points. Distances are counted in exit-point steps and **divided by n**, so with coefficients in
[0, 1] every penalty lies in [-1, 0]::

    exit:      +1                      if prediction == y and e == o
               -α (e - o) / n          if prediction == y and e != o   (too late)
               -β (o - e) / n          if prediction != y and e <  o   (too early)
               -ε                      otherwise (wrong at/after the optimum: rare)
    continue:  +1                      if e < o
               -γ (e + 1 - o) / n      otherwise

The final layer's prediction is ground truth y (it is the generated token), so finishing a token
at the final layer is never wrong; it earns only the reward of the ``continue`` that got there.

Run it::

    env = ExitEnv({"shards_dir": "runs/shards", "reward": {"beta": 0.5, "gamma": 0.5}})
    obs, info = env.reset(seed=0)

Always-continue gets +1 per step up to the optimum and penalties after it; a policy that exits at
the optimum of every token earns ``(o + 1)`` per token, the episode's maximum. Scoring a trained
policy on held-out shards is greencode.scoring's job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from greencode.config import RewardConfig, validate
from greencode.policy import CONTINUE, EXIT
from greencode.shards import ShardData, list_shards, load_shards

log = logging.getLogger(__name__)


def step_reward(action: int, current: int, optimal: int, correct: bool, num_exits: int, reward: RewardConfig) -> float:
    """Reward of one decision (see the module docstring); ``correct`` = this exit's prediction == y."""
    if action == EXIT:
        if correct and current == optimal:
            return 1.0
        if correct:
            return -reward.alpha * (current - optimal) / num_exits
        if current < optimal:
            return -reward.beta * (optimal - current) / num_exits
        return -reward.epsilon
    if current < optimal:
        return 1.0
    return -reward.gamma * (current + 1 - optimal) / num_exits


def shard_paths_for_worker(paths: Sequence[str | Path], worker_index: int, num_workers: int) -> list[str]:
    """Runner ``i`` of ``N`` remote runners (1-based; 0 = local) reads every N-th shard.

    With fewer shards than runners every runner reads all shards (episodes then overlap).
    """
    paths = [str(p) for p in paths]
    if num_workers <= 1 or worker_index == 0 or len(paths) < num_workers:
        return paths
    return paths[worker_index - 1 :: num_workers]


def observation_stats(data: ShardData) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of the hidden states over all tokens and exit points (float32).

    Raw residual streams have a few huge dimensions that saturate a tanh MLP; standardising
    is a per-dimension affine map, so it folds exactly into the policy's first linear layer.
    """
    flat = data.observations().reshape(-1, data.meta.observation_size)
    return flat.mean(axis=0), np.maximum(flat.std(axis=0), 1e-6)


def _normalizer(config: dict[str, Any], hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, 1/std) from ``obs_mean``/``obs_std`` in the config; identity when absent."""
    if config.get("obs_mean") is None:
        return np.zeros(hidden, np.float32), np.ones(hidden, np.float32)
    mean, std = np.asarray(config["obs_mean"], np.float32), np.asarray(config["obs_std"], np.float32)
    if mean.shape != (hidden,) or std.shape != (hidden,) or (std <= 0).any():
        raise ValueError(f"obs_mean/obs_std must be {hidden} values (std > 0), got shapes {mean.shape}, {std.shape}")
    return mean, 1.0 / std


class ExitEnv(gym.Env):
    """Replays hidden-state shards; see the module docstring for observation, actions and rewards.

    Config keys: ``shard_paths`` (list) or ``shards_dir``; ``reward`` (RewardConfig fields);
    ``seed``; optional ``obs_mean``/``obs_std`` (see :func:`observation_stats`) to standardise
    observations. Under RLlib the config is an EnvContext whose ``worker_index``/``num_workers``
    pick this runner's own shards.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = config if config is not None else {}
        if config.get("shard_paths"):
            paths = list(config["shard_paths"])
        elif config.get("shards_dir"):
            paths = list_shards(config["shards_dir"])
        else:
            raise ValueError("ExitEnv needs 'shard_paths' (list of shard files) or 'shards_dir' in its config")
        worker_index = int(getattr(config, "worker_index", 0))
        num_workers = int(getattr(config, "num_workers", 0))
        self.shard_paths = shard_paths_for_worker(paths, worker_index, num_workers)
        self.data: ShardData = load_shards(self.shard_paths)
        self.reward_cfg = validate(RewardConfig, dict(config.get("reward") or {}), source="env_config.reward")
        self.episodes = self.data.episode_bounds()
        if len(self.episodes) == 0:
            raise ValueError(f"shards {self.shard_paths} hold no tokens")
        self.num_exits = self.data.meta.num_exits
        self.layers = self.data.exit_layers()
        size = self.data.meta.observation_size
        bound = float(np.finfo(np.float32).max)
        self.observation_space = gym.spaces.Box(-bound, bound, shape=(size,), dtype=np.float32)
        self.obs_mean, self.obs_scale = _normalizer(config, size)
        self.observations = self.data.observations()  # [N, n_exits, size]: hidden state (+ exit features)
        self.action_space = gym.spaces.Discrete(2)
        self._seed = config.get("seed")
        self._row = self._stop = self._exit = 0
        self._stats: list[tuple[bool, int, int]] = []
        log.debug("ExitEnv worker %d/%d: %d shards, %d episodes", worker_index, num_workers, len(self.shard_paths),
                  len(self.episodes))

    def _obs(self, row: int | None = None, exit_index: int | None = None) -> np.ndarray:
        obs = self.observations[self._row if row is None else row, self._exit if exit_index is None else exit_index]
        return (obs - self.obs_mean) * self.obs_scale

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None and self._seed is not None:
            seed, self._seed = self._seed, None
        super().reset(seed=seed)
        start, stop = self.episodes[self.np_random.integers(len(self.episodes))]
        self._row, self._stop, self._exit = int(start), int(stop), 0
        self._stats = []
        return self._obs(), {"sample_id": str(self.data.sample_id[self._row])}

    def step(self, action):
        action = int(action)
        if action not in (CONTINUE, EXIT):
            raise ValueError(f"action must be 0 (continue) or 1 (exit), got {action}")
        row, current = self._row, self._exit
        optimal = int(self.data.optimal_exit[row])
        final = int(self.data.final_token[row])
        correct = int(self.data.exit_predictions[row, current]) == final
        reward = step_reward(action, current, optimal, correct, self.num_exits, self.reward_cfg)

        token_done = action == EXIT or current + 1 == self.num_exits
        if token_done:
            exited = current if action == EXIT else self.num_exits
            self._stats.append((correct or exited == self.num_exits, exited, optimal))
            self._row, self._exit = row + 1, 0
        else:
            self._exit = current + 1
        terminated = self._row >= self._stop
        info: dict[str, Any] = {}
        if terminated:
            info = self.episode_metrics()
            self._row = row  # keep a valid observation for the terminal step
            return self._obs(row, current), reward, True, False, info
        return self._obs(), reward, False, False, info

    def episode_metrics(self) -> dict[str, float]:
        """Exit accuracy, mean exit layer and mean optimal layer of the tokens finished so far."""
        correct = np.array([c for c, _, _ in self._stats], dtype=float)
        exited = np.array([e for _, e, _ in self._stats])
        optimal = np.array([o for _, _, o in self._stats])
        return {
            "exit_accuracy": float(correct.mean()),
            "mean_exit_layer": float(self.layers[exited].mean()),
            "mean_optimal_layer": float(self.layers[optimal].mean()),
        }
