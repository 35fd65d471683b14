"""Distributed helpers of fine-tuning: FSDP-aware parameter, optimizer and gradient handling, metric sums.

Everything here is a no-op wrapper on one process and on plain/DDP models, so the same
training code runs in tests, on one worker and under Ray Train.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def full_params(objective: nn.Module) -> contextlib.AbstractContextManager:
    """Context in which ``lm.model`` holds its full weights, for validation and saving.

    FSDP shards them (a collective gathers them on every rank); plain and DDP models already have them.
    """
    if not _is_fsdp(objective):
        return contextlib.nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP.summon_full_params(objective, writeback=False)


def optimizer_state(objective: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state to checkpoint; under FSDP the full (unsharded) state, gathered collectively."""
    if _is_fsdp(objective):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.optim_state_dict(objective, optimizer)
    return optimizer.state_dict()


def load_optimizer_state(objective: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if _is_fsdp(objective):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        state = FSDP.optim_state_dict_to_load(objective, optimizer, state)
    optimizer.load_state_dict(state)


def clip_grad_norm(module: nn.Module, max_norm: float) -> torch.Tensor:
    """FSDP shards gradients, so its own clip (a collective) must be used there."""
    if _is_fsdp(module):
        return module.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum across ranks when running distributed; identity otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
