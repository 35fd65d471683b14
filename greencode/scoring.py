"""Scoring exit gates on held-out shards, without the LLM: exit accuracy and depth vs fixed exits.

A gate is any function from hidden states ``[N, H]`` to action logits ``[N, 2]``; a token exits at
the first exit point where softmax(logits)[exit] > T. The score is what the policy is judged by:
its exit accuracy (agreement with the final layer) next to fixed exits of the same mean depth.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from greencode.policy import EXIT, ExitPolicy
from greencode.shards import ShardData, list_shards, load_shards
from greencode.storage import is_uri

log = logging.getLogger(__name__)


@dataclass
class ExitScore:
    """How a gate did on held-out tokens, next to fixed exits of the same mean depth."""

    exit_accuracy: float
    mean_exit_layer: float
    mean_optimal_layer: float
    fixed_same_depth_accuracy: float  # fixed exits at the two neighbouring points, mixed to the same mean depth
    fixed_deeper_accuracy: float  # the single fixed exit point at or just deeper than the mean depth
    fixed_deeper_layer: int
    num_tokens: int

    @property
    def advantage(self) -> float:
        return self.exit_accuracy - self.fixed_same_depth_accuracy

    def to_dict(self) -> dict[str, float]:
        return {**self.__dict__, "advantage_vs_fixed": self.advantage}


def fixed_exit_accuracy(data: ShardData) -> np.ndarray:
    """Accuracy of always exiting at each exit index (the final layer, last, is 1 by definition)."""
    per_exit = (data.exit_predictions == data.final_token[:, None]).mean(axis=0)
    return np.concatenate([per_exit, [1.0]])


def score_exits(data: ShardData, exit_logits: Callable[[np.ndarray], np.ndarray], threshold: float = 0.5) -> ExitScore:
    """Replay every held-out token through a gate: ``exit_logits([N, observation size]) -> [N, 2]`` action logits
    (an observation is the hidden state, then the exit features the shards recorded).

    A token exits at the first exit point where softmax(logits)[exit] > threshold, else at the final layer.
    """
    n, size = data.meta.num_exits, data.meta.observation_size
    logits = exit_logits(data.observations().reshape(-1, size)).reshape(len(data), n, 2)
    logits = logits - logits.max(axis=-1, keepdims=True)
    p_exit = np.exp(logits[..., EXIT]) / np.exp(logits).sum(axis=-1)
    leave = p_exit > threshold
    exited = np.where(leave.any(axis=1), leave.argmax(axis=1), n)
    layers = data.exit_layers()
    predictions = np.concatenate([data.exit_predictions, data.final_token[:, None]], axis=1)
    correct = predictions[np.arange(len(data)), exited] == data.final_token
    mean_layer = float(layers[exited].mean())
    curve = fixed_exit_accuracy(data)
    deeper = int(np.searchsorted(layers, mean_layer, side="left"))
    return ExitScore(
        exit_accuracy=float(correct.mean()),
        mean_exit_layer=mean_layer,
        mean_optimal_layer=float(layers[data.optimal_exit].mean()),
        fixed_same_depth_accuracy=float(np.interp(mean_layer, layers, curve)),
        fixed_deeper_accuracy=float(curve[deeper]),
        fixed_deeper_layer=int(layers[deeper]),
        num_tokens=len(data),
    )


def policy_logits(policy: ExitPolicy) -> Callable[[np.ndarray], np.ndarray]:
    """An ExitPolicy as the ``exit_logits`` function :func:`score_exits` takes."""

    def logits(observations: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return policy(torch.from_numpy(observations)).numpy()

    return logits


def score_policy(policy: ExitPolicy, shards_dir: str, thresholds: list[float]) -> dict[float, ExitScore]:
    """Held-out exit accuracy and mean layer vs fixed exits of the same mean depth, per gate threshold."""
    if not is_uri(shards_dir) and not (Path(shards_dir) / "manifest.json").is_file():  # published: complete
        log.warning("%s has no manifest.json: its extraction may be unfinished, scoring the shards present", shards_dir)
    data = load_shards(list_shards(shards_dir))
    policy.check_compatible(hidden_size=data.meta.hidden_size, exit_points=data.meta.exit_points,
                            model_fingerprint=data.meta.model_fingerprint, source="policy",
                            features=(list(data.meta.features), data.meta.feature_shortlist))
    return {t: score_exits(data, policy_logits(policy), threshold=t) for t in thresholds}


def pareto_front(accuracy: np.ndarray, layers: np.ndarray) -> np.ndarray:
    """True where no other point is at least as accurate with fewer layers (or more accurate at no more)."""
    front = np.ones(len(accuracy), dtype=bool)
    for i in range(len(accuracy)):
        better = (accuracy >= accuracy[i]) & (layers <= layers[i]) & ((accuracy > accuracy[i]) | (layers < layers[i]))
        front[i] = not better.any()
    return front
