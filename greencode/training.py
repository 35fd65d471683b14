"""One LITE optimizer step: the objective, optimizer, schedule, precision and the metric window.

Ray-agnostic on purpose: ``workflows/finetune.py`` (Ray Train) and any Tune trainable
drive the same pieces, and tests run them in-process. Distributed code paths only use
``torch.distributed`` (greencode.distributed) and work unchanged on one process. The data
order lives in greencode.blocks, validation in greencode.validation, checkpoints in
greencode.checkpoints.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from greencode.config import FinetuneConfig, OptimConfig
from greencode.distributed import all_reduce_sum, clip_grad_norm
from greencode.exits import lite_weights
from greencode.lite import IGNORE_INDEX, exit_losses, lite_loss
from greencode.modeling import EarlyExitModel

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- objective


class LiteObjective(nn.Module):
    """The LITE loss as a module, so DDP/FSDP wrap it: their gradient sync only runs through ``__call__``.

    ``lm.forward_exits`` calls the decoder layers directly, not ``model.forward``; wrapping the
    HF model itself in DDP would therefore silently skip the all-reduce.
    """

    def __init__(self, lm: EarlyExitModel, weights: Sequence[float]) -> None:
        super().__init__()
        if len(weights) != len(lm.exit_points) + 1:
            raise ValueError(f"{len(weights)} loss weights for {len(lm.exit_points)} exit points + the final layer")
        self.model = lm.model  # registers the parameters
        self.lm = lm
        self.weights = [float(w) for w in weights]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(aggregate loss [], per-exit losses [e + 1]) for blocks input_ids [b, s] (mask: right padding)."""
        out = self.lm.forward_exits(input_ids, attention_mask)
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        losses = exit_losses(out.hidden_states, labels, self.lm.decode)  # Shape: [e + 1]
        return lite_loss(losses, self.weights), losses


def loss_weights(lm: EarlyExitModel, cfg: FinetuneConfig) -> list[float]:
    return lite_weights(lm.exit_points, lm.num_layers, cfg.loss)


# --------------------------------------------------------------------------- optimizer


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (METHOD §2 defaults); norms and biases (1-D tensors) get no weight decay."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant (the reference setting) or linear decay to zero at ``max_steps``."""
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / max_steps))


# --------------------------------------------------------------------------- precision


def check_precision(precision: str, device: torch.device) -> None:
    """Fail early, naming the fix, when the hardware cannot train in ``precision``."""
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA GPU (use_gpu: true) but training runs on {device.type}; "
                         "use precision bf16 or fp32 on CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("precision bf16 is not supported by this GPU; use fp16 or fp32")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[precision])


# --------------------------------------------------------------------------- train step


@dataclass
class StepStats:
    loss: float
    exit_losses: list[float]  # one per exit point, then the final layer
    grad_norm: float
    tokens: int


class LiteStepper:
    """One optimizer step of LITE with gradient accumulation, clipping, and mixed precision.

    ``objective`` may be wrapped in DDP/FSDP; accumulation micro-steps skip the gradient
    all-reduce (``no_sync``) so the network is used once per optimizer step.
    """

    def __init__(self, objective: nn.Module, optimizer: torch.optim.Optimizer, scheduler, cfg: FinetuneConfig,
                 device: torch.device) -> None:
        self.objective = objective
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.cfg = cfg
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")

    def train_step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> StepStats:
        """One optimizer step over ``micro_batches`` of (input_ids [b, s], attention_mask or None)."""
        self.objective.train()
        total, per_exit, tokens = 0.0, None, 0
        for i, (input_ids, attention_mask) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.objective, "no_sync") else self.objective.no_sync()
            with sync:
                with autocast(self.cfg.precision, self.device):
                    loss, losses = self.objective(input_ids, attention_mask)
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.item() / len(micro_batches)
            detached = losses.detach().float() / len(micro_batches)
            per_exit = detached if per_exit is None else per_exit + detached
            tokens += int(input_ids.numel() if attention_mask is None else attention_mask.sum())
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self.objective, self.cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepStats(total, per_exit.tolist(), float(grad_norm), tokens)


class MetricWindow:
    """Sums of step statistics between two reports, averaged across ranks when flushed."""

    def __init__(self, num_losses: int, device: torch.device) -> None:
        self.num_losses, self.device = num_losses, device
        self._reset()

    def _reset(self) -> None:
        # loss, exit losses..., grad norm, tokens, steps, ranks
        self.sums = torch.zeros(self.num_losses + 5, dtype=torch.float64)
        self.started = time.perf_counter()

    def add(self, stats: StepStats) -> None:
        self.sums += torch.tensor([stats.loss, *stats.exit_losses, stats.grad_norm, stats.tokens, 1.0, 0.0],
                                  dtype=torch.float64)

    def flush(self, layers: list[int]) -> dict[str, float]:
        """Collective (every rank must call it): mean losses over steps and ranks, global tokens/s."""
        sums = self.sums.clone()
        sums[-1] = 1.0  # rank count
        elapsed = time.perf_counter() - self.started
        sums = all_reduce_sum(sums.to(self.device)).cpu()
        steps_x_ranks, ranks = float(sums[-2]), float(sums[-1])
        self._reset()
        if steps_x_ranks == 0:
            return {}
        out = {"train/loss": float(sums[0]) / steps_x_ranks}
        for i, layer in enumerate(layers):
            out[f"train/loss_l{layer}"] = float(sums[1 + i]) / steps_x_ranks
        out["train/grad_norm"] = float(sums[-4]) / steps_x_ranks
        out["train/tokens_per_s"] = float(sums[-3]) / max(elapsed, 1e-9)
        out["train/ranks"] = ranks
        return out
