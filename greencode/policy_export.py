"""RLlib's trained actor -> a plain ExitPolicy file (no Ray needed to read or run it).

The RLModule's actor (``encoder.actor_encoder`` + ``pi`` head, with a separate value network)
has the ExitPolicy MLP's shape; its weights are copied layer by layer. Observation
standardisation (h - mean) / std folds into the first layer, so the exported policy reads raw
hidden states: W' = W / std, b' = b - W' mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from greencode.config import PolicyPPOConfig
from greencode.policy import ExitPolicy
from greencode.shards import ShardMeta

ObsStats = tuple[np.ndarray, np.ndarray]  # per-dimension (mean, std) of the training observations


def export_policy(module: torch.nn.Module, meta: ShardMeta, ppo: PolicyPPOConfig, obs_stats: ObsStats | None = None,
                  metadata: dict[str, Any] | None = None) -> ExitPolicy:
    """Copy the RLModule's actor into an ExitPolicy for the shards' model, folding ``obs_stats`` in."""
    actor = [m for m in module.encoder.actor_encoder.modules() if isinstance(m, torch.nn.Linear)]
    actor += [m for m in module.pi.modules() if isinstance(m, torch.nn.Linear)]
    policy = ExitPolicy(meta.hidden_size, ppo.hidden_sizes, ppo.activation, meta.exit_points, meta.model_fingerprint,
                        metadata, meta.features, meta.feature_shortlist)
    targets = [m for m in policy.net if isinstance(m, torch.nn.Linear)]
    if [tuple(m.weight.shape) for m in actor] != [tuple(m.weight.shape) for m in targets]:
        raise RuntimeError(f"RLModule actor layers {[m.weight.shape for m in actor]} do not match "
                           f"ExitPolicy {policy.net}")
    with torch.no_grad():
        for src, dst in zip(actor, targets):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        if obs_stats is not None:
            first = targets[0]
            mean, std = (torch.from_numpy(np.asarray(x, dtype=np.float32)) for x in obs_stats)
            first.weight.div_(std)
            first.bias.sub_(first.weight @ mean)
    return policy.eval()
