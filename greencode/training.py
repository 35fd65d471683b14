"""One LITE optimizer step: the objective, optimizer, schedule, precision and the metric window.

Ray-agnostic on purpose: ``workflows/finetune.py`` (Ray Train) and any Tune trainable
drive the same pieces, and tests run them in-process. Distributed code paths only use
``torch.distributed`` (greencode.distributed) and work unchanged on one process. The data
order lives in greencode.blocks, validation in greencode.validation, checkpoints in
greencode.checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from greencode.config import FinetuneConfig, LiteLossConfig, OptimConfig
from greencode.distributed import all_reduce_sum, clip_grad_norm
from greencode.exits import lite_weights
from greencode.lite import (
    IGNORE_INDEX,
    distill_loss,
    exit_schedule,
    gather_rows,
    lite_loss,
    prediction_rows,
    sample_rows,
    target_loss,
    teacher_log_probs,
    token_cross_entropy,
)
from greencode.modeling import EarlyExitModel
from greencode.precision import train_precision

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- objective


class FrozenTeacher:
    """The starting model, frozen: its final-layer logits are the self-distillation target.

    Held by the objective as a plain attribute, not a registered submodule, so DDP/FSDP neither
    sync, shard nor checkpoint it and the optimizer never sees it. It takes no gradient (no_grad,
    ``requires_grad`` off) and follows the student to its device on first use: Ray Train moves
    the objective to the worker's GPU after it is built.
    """

    def __init__(self, model: nn.Module) -> None:
        model.eval().requires_grad_(False)
        self.lm = EarlyExitModel(model, None, [])

    @classmethod
    def copy_of(cls, lm: EarlyExitModel) -> FrozenTeacher:
        return cls(copy.deepcopy(lm.model))

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
        """Final-layer logits at the flattened predicting positions ``rows`` [n]. Shape: [n, v]."""
        if self.lm.device != input_ids.device:
            self.lm.model.to(input_ids.device)
        final = self.lm.forward_exits(input_ids, attention_mask).hidden_states[-1]  # Shape: [b, s, h]
        return self.lm.decode(gather_rows(final, rows))


class LiteObjective(nn.Module):
    """The LITE loss as a module, so DDP/FSDP wrap it: their gradient sync only runs through ``__call__``.

    ``lm.forward_exits`` calls the decoder layers directly, not ``model.forward``; wrapping the
    HF model itself in DDP would therefore silently skip the all-reduce.

    ``loss`` (default: dataset labels, every exit, every position) picks the target and which exits
    and positions a step decodes; the final layer is decoded at every position on every step, so
    every parameter gets a gradient each step (DDP needs no ``find_unused_parameters``). A teacher is
    only built when the target needs one: by default a frozen copy of ``lm`` (pass the starting
    model when ``lm`` was resumed from a checkpoint, see :func:`build_objective`).
    """

    def __init__(self, lm: EarlyExitModel, weights: Sequence[float], loss: LiteLossConfig | None = None, *,
                 teacher: FrozenTeacher | None = None, max_steps: int = 1, seed: int = 0) -> None:
        super().__init__()
        if len(weights) != len(lm.exit_points) + 1:
            raise ValueError(f"{len(weights)} loss weights for {len(lm.exit_points)} exit points + the final layer")
        self.model = lm.model  # registers the parameters
        self.lm = lm
        self.weights = [float(w) for w in weights]
        self.loss_cfg = loss or LiteLossConfig()
        self.max_steps, self.seed = max_steps, seed
        self.teacher = (teacher or FrozenTeacher.copy_of(lm)) if self.loss_cfg.needs_teacher else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, step: int = 0,
                micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(aggregate loss [], per-exit losses [e + 1]) for blocks input_ids [b, s] (mask: right padding).

        ``step``/``micro`` (optimizer step, micro-batch) pick the exits and seed the positions; an
        exit not decoded at this step has loss NaN (not measured).
        """
        cfg, w = self.loss_cfg, self.weights
        out = self.lm.forward_exits(input_ids, attention_mask)
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        rows, targets = prediction_rows(labels)  # Shape: [n], [n]
        teacher_logp = None
        if self.teacher is not None:
            teacher_logp = teacher_log_probs(self.teacher.logits(input_ids, attention_mask, rows), cfg.temperature)
        share = cfg.distill_share
        losses = [torch.full((), math.nan, device=input_ids.device) for _ in w]  # not decoded: NaN
        scales = [1.0] * len(w)
        schedule = exit_schedule(w[:-1], step, cfg.exit_sampling, exits_per_step=cfg.exits_per_step,
                                 max_steps=self.max_steps, gradual_fraction=cfg.gradual_fraction)
        if schedule:
            pick = sample_rows(len(rows), cfg.position_fraction, self._generator(step, micro))
            if pick is not None:
                pick = pick.to(rows.device)
            exit_rows = rows if pick is None else rows[pick]  # Shape: [k]
            exit_targets = targets if pick is None else targets[pick]
            exit_teacher = teacher_logp if teacher_logp is None or pick is None else teacher_logp[pick]
            for i, scale in schedule.items():
                logits = self._decode_exit(gather_rows(out.hidden_states[i], exit_rows))  # Shape: [k, v]
                losses[i] = target_loss(logits, exit_targets, exit_teacher, share, cfg.temperature)
                scales[i] = scale
        logits = self.lm.decode(gather_rows(out.hidden_states[-1], rows))  # Shape: [n, v]
        kl = distill_loss(logits, teacher_logp, cfg.temperature) if teacher_logp is not None else None
        final = (1 - share) * token_cross_entropy(logits, targets) if share < 1 else 0.0
        losses[-1] = final + share * kl if share > 0 else final
        per_exit = torch.stack(losses)  # Shape: [e + 1]
        total = lite_loss(per_exit, w, scales)
        if cfg.anchor_weight > 0:
            total = total + cfg.anchor_weight * kl
        return total, per_exit

    def _decode_exit(self, hidden: torch.Tensor) -> torch.Tensor:
        """An exit's logits; with ``exits_update_head`` off the LM head is used detached (no gradient to
        it, and no weight-gradient matmul), so only the final layer shapes the head all exits share."""
        if self.loss_cfg.exits_update_head:
            return self.lm.decode(hidden)
        head = self.lm.adapter.lm_head
        bias = None if head.bias is None else head.bias.detach()
        return F.linear(self.lm.adapter.final_norm(hidden), head.weight.detach(), bias)

    def _generator(self, step: int, micro: int) -> torch.Generator:
        """Position sampling seeded by (seed, step, micro-batch, rank): a resumed run draws the same positions."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        seed = int(np.random.SeedSequence([self.seed, step, micro, rank]).generate_state(1)[0])
        return torch.Generator().manual_seed(seed)


def build_objective(lm: EarlyExitModel, cfg: FinetuneConfig, base: EarlyExitModel | None = None) -> LiteObjective:
    """The LITE objective of ``cfg`` for ``lm``.

    ``base``: the starting model, to pass when ``lm`` was resumed from a checkpoint, because the
    teacher must stay the model fine-tuning started from (default: a frozen copy of ``lm``; ``base``
    is frozen in place and used as the teacher).
    """
    teacher = FrozenTeacher(base.model) if base is not None and cfg.loss.needs_teacher else None
    return LiteObjective(lm, loss_weights(lm, cfg), cfg.loss, teacher=teacher, max_steps=cfg.max_steps, seed=cfg.seed)


@torch.no_grad()
def exit_predictions(lm: EarlyExitModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                     precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax of every exit and the final layer at every predicting position, and the dataset's next tokens.

    Returns (predictions [e + 1, N], targets [N]) over all batches, N = positions with a real next
    token: compare two models' rows to get e.g. agreement of each exit with the *base* model's final
    prediction (what a tuned model must keep), not only with its own final layer.
    """
    was_training = lm.model.training
    lm.model.eval()
    preds, targets = [], []
    for input_ids, attention_mask in batches:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        rows, next_tokens = prediction_rows(labels)
        with autocast(precision, lm.device):
            fwd = lm.forward_exits(input_ids, attention_mask)
            preds.append(torch.stack([lm.decode_exit(gather_rows(h, rows), layer).argmax(-1)
                                      for h, layer in zip(fwd.hidden_states, fwd.layers)]))
        targets.append(next_tokens)
    lm.model.train(was_training)
    return torch.cat(preds, dim=1), torch.cat(targets)


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


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on ``device``; ``auto`` is decided by greencode.precision (bf16 only where native)."""
    precision = train_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[precision])


# --------------------------------------------------------------------------- train step


@dataclass
class StepStats:
    loss: float
    exit_losses: list[float]  # one per exit point, then the final layer; NaN where the step decoded no such exit
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
        self.precision = train_precision(cfg.precision, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")

    @property
    def step(self) -> int:
        """Optimizer steps taken so far: the scheduler's count, which a resumed run restores with its state."""
        return self.scheduler.last_epoch

    def train_step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> StepStats:
        """One optimizer step over ``micro_batches`` of (input_ids [b, s], attention_mask or None)."""
        self.objective.train()
        total, per_exit, tokens = 0.0, None, 0
        step = self.step
        for i, (input_ids, attention_mask) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            defer_sync = not last and hasattr(self.objective, "no_sync")  # DDP: all-reduce on the last micro-batch
            sync = self.objective.no_sync() if defer_sync else contextlib.nullcontext()
            with sync:
                with autocast(self.precision, self.device):
                    loss, losses = self.objective(input_ids, attention_mask, step=step, micro=i)
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
    """Sums of step statistics between two reports, averaged across ranks when flushed.

    An exit a step did not decode (exit sampling) reports NaN; each exit's loss is averaged over
    the steps that decoded it (NaN when none did in the window).
    """

    def __init__(self, num_losses: int, device: torch.device) -> None:
        self.num_losses, self.device = num_losses, device
        self._reset()

    def _reset(self) -> None:
        # loss, exit losses..., exit counts..., grad norm, tokens, steps, ranks
        self.sums = torch.zeros(2 * self.num_losses + 5, dtype=torch.float64)
        self.started = time.perf_counter()

    def add(self, stats: StepStats) -> None:
        losses = torch.tensor(stats.exit_losses, dtype=torch.float64)
        seen = ~losses.isnan()
        self.sums += torch.cat([torch.tensor([stats.loss], dtype=torch.float64), losses.nan_to_num(0.0),
                                seen.double(),
                                torch.tensor([stats.grad_norm, stats.tokens, 1.0, 0.0], dtype=torch.float64)])

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
        n = self.num_losses
        out = {"train/loss": float(sums[0]) / steps_x_ranks}
        for i, layer in enumerate(layers):
            seen = float(sums[1 + n + i])
            out[f"train/loss_l{layer}"] = float(sums[1 + i]) / seen if seen else math.nan
        out["train/grad_norm"] = float(sums[-4]) / steps_x_ranks
        out["train/tokens_per_s"] = float(sums[-3]) / max(elapsed, 1e-9)
        out["train/ranks"] = ranks
        return out
