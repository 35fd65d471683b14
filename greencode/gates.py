"""Exit decisions at exit points (METHOD §5 and the §6 baselines).

A gate sees the hidden states ``[B, H]`` of the current token at one decision
layer and returns which rows leave the network there. The generator only asks
at the gate's ``decision_layers`` so ``fixed(k)`` costs nothing elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from greencode.confidence import confidence_features
from greencode.config import GateConfig
from greencode.policy import CONTINUE, EXIT, ExitPolicy

if TYPE_CHECKING:
    from greencode.modeling import EarlyExitModel


class Gate:
    """Base gate: never exits (the full model)."""

    name = "full"
    makes_logits = False  # whether exit_mask computes the exit's logits (then a draft reuses them)

    def decision_layers(self, exit_points: Sequence[int], num_layers: int) -> list[int]:
        return [k for k in exit_points if k < num_layers]

    def exit_mask(self, hidden: torch.Tensor, layer: int,
                  lm: EarlyExitModel) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(exit? [B] bool, logits [B, V] if the gate had to compute them, else None); ``lm`` decodes the exit
        (``lm.decode_exit``) for the gates that need its logits or features."""
        return torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device), None

    def describe(self) -> str:
        return self.name


class FullGate(Gate):
    def decision_layers(self, exit_points: Sequence[int], num_layers: int) -> list[int]:
        return []


class FixedGate(Gate):
    """Exit every token after layer ``exit_layer`` (1-based; L means the full model)."""

    name = "fixed"

    def __init__(self, exit_layer: int) -> None:
        if exit_layer < 1:
            raise ValueError(f"fixed exit_layer must be >= 1, got {exit_layer}")
        self.exit_layer = exit_layer

    def decision_layers(self, exit_points: Sequence[int], num_layers: int) -> list[int]:
        if self.exit_layer > num_layers:
            raise ValueError(f"fixed exit_layer {self.exit_layer} exceeds the model's {num_layers} layers")
        return [self.exit_layer] if self.exit_layer < num_layers else []

    def exit_mask(self, hidden, layer, lm):
        return torch.full((hidden.shape[0],), layer == self.exit_layer, dtype=torch.bool, device=hidden.device), None

    def describe(self) -> str:
        return f"fixed(k={self.exit_layer})"


class ConfidenceGate(Gate):
    """Exit when the exit's own softmax is confident: max p ≥ c (costs one LM-head call per point)."""

    name = "confidence"
    makes_logits = True

    def __init__(self, confidence: float) -> None:
        if not 0 < confidence <= 1:
            raise ValueError(f"confidence must be in (0, 1], got {confidence}")
        self.confidence = confidence

    def exit_mask(self, hidden, layer, lm):
        logits = lm.decode_exit(hidden, layer)
        top = torch.softmax(logits.float(), dim=-1).amax(dim=-1)
        return top >= self.confidence, logits

    def describe(self) -> str:
        return f"confidence(c={self.confidence})"


class PolicyGate(Gate):
    """Exit when softmax(policy(h) / τ)[exit] > T.

    With two actions that is sigmoid((z_exit - z_continue) / τ) > T, i.e. a logit margin
    above τ·log(T / (1 - T)), precomputed once. The policy's last layer is folded the same way
    into one weight row (exit minus continue), so the per-layer gate is, for all running rows
    at once, one fused matmul + activation per hidden layer, one matrix-vector product and one
    comparison, with no host synchronisation (it runs at every exit point of every token, so it
    must stay cheap). The policy's weights are read when the gate is built.
    """

    name = "policy"

    def __init__(self, policy: ExitPolicy, threshold: float, temperature: float = 1.0) -> None:
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.policy, self.threshold, self.temperature = policy, threshold, temperature
        if threshold >= 1:
            self.margin = math.inf
        elif threshold <= 0:
            self.margin = -math.inf
        else:
            self.margin = temperature * math.log(threshold / (1 - threshold))
        linears = [m for m in policy.net if isinstance(m, torch.nn.Linear)]
        self._hidden = [(m.weight.detach().T.contiguous(), m.bias.detach()) for m in linears[:-1]]
        last = linears[-1]
        self._exit_row = (last.weight[EXIT] - last.weight[CONTINUE]).detach()
        self._exit_bias = (last.bias[EXIT] - last.bias[CONTINUE]).detach()
        self._activation = torch.tanh if policy.activation == "tanh" else torch.relu

    def exit_margins(self, hidden: torch.Tensor) -> torch.Tensor:
        """z_exit - z_continue of the policy for ``hidden`` [B, H]: [B]."""
        x = hidden.to(self._exit_row.dtype)
        for weight, bias in self._hidden:
            x = self._activation(torch.addmm(bias, x, weight))
        return torch.addmv(self._exit_bias, x, self._exit_row)

    def exit_mask(self, hidden, layer, lm):
        observation = hidden
        if self.policy.features:  # the translated exit's confidence, as the policy saw it in training
            features = confidence_features(lm, hidden, layer, self.policy.features, self.policy.feature_shortlist)
            observation = torch.cat([hidden, features.to(hidden.dtype)], dim=-1)
        return self.exit_margins(observation) > self.margin, None

    def describe(self) -> str:
        return f"policy(T={self.threshold}, tau={self.temperature})"


def build_gate(cfg: GateConfig, policy: ExitPolicy | None = None) -> Gate:
    """Gate from a validated config; a ``policy`` gate needs the loaded ExitPolicy."""
    if cfg.mode == "full":
        return FullGate()
    if cfg.mode == "fixed":
        return FixedGate(cfg.exit_layer)
    if cfg.mode == "confidence":
        return ConfidenceGate(cfg.confidence)
    if policy is None:
        raise ValueError("gate mode 'policy' needs a loaded ExitPolicy")
    return PolicyGate(policy, cfg.threshold, cfg.temperature)
