"""ExitPolicy: the tiny MLP that looks at a hidden state and says continue (0) or exit (1).

The policy file is self-describing: it carries the hidden size, the exit points it
was trained for and the fingerprint of the model whose hidden states it saw, so
loading it against another model fails loudly instead of gating at random.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from greencode.atomic import atomic_path
from greencode.storage import local_copy

POLICY_FORMAT = "greencode.exit_policy/v1"
CONTINUE, EXIT = 0, 1

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}


class PolicyMismatchError(ValueError):
    """A policy file does not belong to the model it is being used with."""


def mlp(in_size: int, hidden_sizes: Sequence[int], out_size: int, activation: str = "tanh") -> nn.Sequential:
    """in -> hidden... -> out with ``activation`` between layers (no activation on the output)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    prev = in_size
    for size in hidden_sizes:
        layers += [nn.Linear(prev, size), _ACTIVATIONS[activation]()]
        prev = size
    layers.append(nn.Linear(prev, out_size))
    return nn.Sequential(*layers)


class ExitPolicy(nn.Module):
    """Actor MLP ``hidden_size (+ features) -> 64 -> 64 -> 2`` (tanh) over raw hidden states at exit points,
    followed by the exit features it was trained on (``features``, computed over ``feature_shortlist``)."""

    def __init__(
        self,
        hidden_size: int,
        hidden_sizes: Sequence[int] = (64, 64),
        activation: str = "tanh",
        exit_points: Sequence[int] = (),
        model_fingerprint: str | None = None,
        metadata: dict[str, Any] | None = None,
        features: Sequence[str] = (),
        feature_shortlist: int = 0,
    ) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.features = list(features)  # observed after the hidden state (greencode/confidence.py)
        self.feature_shortlist = int(feature_shortlist)
        self.hidden_sizes = [int(s) for s in hidden_sizes]
        self.activation = activation
        self.exit_points = [int(p) for p in exit_points]
        self.model_fingerprint = model_fingerprint
        self.metadata = dict(metadata or {})
        self.net = mlp(self.hidden_size + len(self.features), self.hidden_sizes, 2, activation)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        """Action logits [..., 2] for observations [..., hidden_size (+ features)]."""
        return self.net(observation.to(self.net[0].weight.dtype))

    @torch.no_grad()
    def exit_probability(self, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """p[exit] = softmax(z / τ)[exit]."""
        return torch.softmax(self(hidden) / temperature, dim=-1)[..., EXIT]

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename) so a crash never leaves half a policy."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": POLICY_FORMAT,
            "hidden_size": self.hidden_size,
            "hidden_sizes": self.hidden_sizes,
            "activation": self.activation,
            "exit_points": self.exit_points,
            "model_fingerprint": self.model_fingerprint,
            "metadata": self.metadata,
            "features": self.features,
            "feature_shortlist": self.feature_shortlist,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        hidden_size: int | None = None,
        exit_points: Sequence[int] | None = None,
        model_fingerprint: str | None = None,
    ) -> ExitPolicy:
        """Load a policy file (a local path, or a URI: fetched once per digest), checking it against the
        model it will gate (when given)."""
        path = local_copy(path)
        if not path.is_file():
            raise FileNotFoundError(f"policy file not found: {path}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for corrupt files
            raise PolicyMismatchError(f"{path} is not a readable GreenCode policy file: {err}") from None
        if not isinstance(payload, dict) or payload.get("format") != POLICY_FORMAT:
            raise PolicyMismatchError(f"{path} is not a GreenCode policy file (expected format {POLICY_FORMAT})")
        policy = cls(
            payload["hidden_size"],
            payload["hidden_sizes"],
            payload["activation"],
            payload["exit_points"],
            payload["model_fingerprint"],
            payload.get("metadata"),
            payload.get("features", ()),
            payload.get("feature_shortlist", 0),
        )
        policy.load_state_dict(payload["state_dict"])
        policy.check_compatible(hidden_size=hidden_size, exit_points=exit_points, model_fingerprint=model_fingerprint,
                                source=str(path))
        return policy.eval()

    @classmethod
    def load_for(cls, path: str | Path, lm: Any) -> ExitPolicy:
        """Load the policy file that will gate ``lm`` (an EarlyExitModel), refusing one made for another model.

        The policy is placed on the model's device: the gate feeds it hidden states from there.
        """
        policy = cls.load(path, hidden_size=lm.hidden_size, exit_points=lm.exit_points,
                          model_fingerprint=lm.fingerprint)
        return policy.to(lm.device)

    def check_compatible(
        self,
        *,
        hidden_size: int | None = None,
        exit_points: Sequence[int] | None = None,
        model_fingerprint: str | None = None,
        source: str = "policy",
        features: tuple[list[str], int] | None = None,
    ) -> None:
        if features is not None and (list(features[0]), features[1] if features[0] else 0) != (
                self.features, self.feature_shortlist if self.features else 0):
            raise PolicyMismatchError(f"{source} observes exit features {self.features} (shortlist "
                                      f"{self.feature_shortlist}), the shards hold {list(features[0])} (shortlist "
                                      f"{features[1]}): train the policy on these shards")
        if hidden_size is not None and hidden_size != self.hidden_size:
            raise PolicyMismatchError(f"{source} expects hidden size {self.hidden_size}, the model has {hidden_size}")
        if exit_points is not None and self.exit_points and list(exit_points) != self.exit_points:
            raise PolicyMismatchError(f"{source} was trained for exit points {self.exit_points}, "
                                      f"the model uses {list(exit_points)}")
        if model_fingerprint is not None and self.model_fingerprint and model_fingerprint != self.model_fingerprint:
            raise PolicyMismatchError(
                f"{source} was trained on model {self.model_fingerprint}, this model is {model_fingerprint}: "
                "retrain or extract shards from this model"
            )
