"""LITE fine-tuning core: objective, optimizer, deterministic data order, validation, HF checkpoints.

Ray-agnostic on purpose: ``workflows/finetune.py`` (Ray Train) and any Tune trainable
drive the same pieces, and tests run them in-process. Distributed code paths only use
``torch.distributed`` (all-reduce of metrics) and work unchanged on one process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from greencode.atomic import atomic_path
from greencode.config import FinetuneConfig, LiteLossConfig, OptimConfig
from greencode.data import SourceFile, token_blocks
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

log = logging.getLogger(__name__)

EXIT_PLAN_FILE = "exit_plan.json"
EXIT_PLAN_FORMAT = "greencode.exit_plan/v1"
TRAINER_STATE_FILE = "trainer_state.pt"
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
            hidden = lm.forward_exits(input_ids, attention_mask).hidden_states
            preds.append(torch.stack([lm.decode(gather_rows(h, rows)).argmax(-1) for h in hidden]))
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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
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
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")

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
            sync = contextlib.nullcontext() if last or not hasattr(self.objective, "no_sync") else self.objective.no_sync()
            with sync:
                with autocast(self.cfg.precision, self.device):
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


# --------------------------------------------------------------------------- data


@dataclass
class BlockSet:
    """Token blocks as one array, cheap to ship to workers. Rows shorter than seq_len are right-padded."""

    ids: np.ndarray  # Shape: [n, seq_len], int32
    lengths: np.ndarray  # Shape: [n], real tokens per row (all seq_len when packed)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def padded(self) -> bool:
        return bool((self.lengths < self.ids.shape[1]).any())

    def batch(self, rows: Sequence[int] | slice, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input_ids [b, s], attention_mask [b, s] or None when every row is full)."""
        ids = torch.as_tensor(self.ids[rows], dtype=torch.long, device=device)
        lengths = torch.as_tensor(self.lengths[rows], device=device)
        if bool((lengths == ids.shape[1]).all()):
            return ids, None
        return ids, (torch.arange(ids.shape[1], device=device) < lengths[:, None]).long()


def build_blocks(files: Sequence[SourceFile], tokenizer: Any, seq_len: int, *, pack: bool = True,
                 limit: int | None = None) -> BlockSet:
    """Tokenize ``files`` into at most ``limit`` blocks of ``seq_len`` (packed, or one padded row per file)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: list[list[int]] = []
    for block in token_blocks(files, tokenizer, seq_len, pack=pack):
        if len(block) >= 2:  # a next-token loss needs two tokens
            rows.append(block)
        if limit is not None and len(rows) >= limit:
            break
    ids = np.full((len(rows), seq_len), pad, dtype=np.int32)
    for i, block in enumerate(rows):
        ids[i, : len(block)] = block
    return BlockSet(ids, np.array([len(b) for b in rows], dtype=np.int32))


# --------------------------------------------------------------------------- data order


class BlockSampler:
    """Which packed blocks each rank trains on at optimizer step ``step`` — a pure function of the step.

    The global stream is one seeded permutation of all blocks per epoch; position
    ``((step * grad_accum + micro) * world_size + rank) * batch_size + j`` of that stream
    feeds row j of a rank's micro-batch. So ranks never share a block, no block is seen twice
    in an epoch, and a resumed run continues exactly where the killed one stopped.
    """

    def __init__(self, num_blocks: int, batch_size: int, grad_accum: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        per_step = batch_size * grad_accum * world_size
        if num_blocks < batch_size * world_size:
            raise ValueError(f"the corpus gives only {num_blocks} training blocks but one micro-batch over "
                             f"{world_size} worker(s) needs {batch_size * world_size}; use more files, a shorter "
                             "seq_len or a smaller batch_size")
        self.num_blocks, self.batch_size, self.grad_accum = num_blocks, batch_size, grad_accum
        self.world_size, self.rank, self.seed, self.blocks_per_step = world_size, rank, seed, per_step
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            kept = {e: v for e, v in self._permutations.items() if e == epoch - 1}  # a step may straddle epochs
            self._permutations = {**kept, epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)}
        return self._permutations[epoch]

    def epoch(self, step: int) -> float:
        return step * self.blocks_per_step / self.num_blocks

    def micro_batches(self, step: int) -> list[list[int]]:
        out = []
        for micro in range(self.grad_accum):
            start = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
            out.append([int(self._permutation(p // self.num_blocks)[p % self.num_blocks])
                        for p in range(start, start + self.batch_size)])
        return out


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validation_counts(lm: EarlyExitModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                      precision: str = "fp32") -> torch.Tensor:
    """Per-exit sums over next-token positions. Shape: [4, e + 1] rows (correct, agree_with_final, nll, count).

    ``correct``: the exit's argmax equals the dataset's next token; ``agree_with_final``: it
    equals the final layer's argmax (the target the exit policy is rewarded on).
    Sums, not means, so ranks can all-reduce them before dividing.
    """
    n = len(lm.exit_points) + 1
    counts = torch.zeros(4, n, dtype=torch.float64, device=lm.device)
    was_training = lm.model.training
    lm.model.eval()
    for input_ids, attention_mask in batches:
        with autocast(precision, lm.device):
            hidden = lm.forward_exits(input_ids, attention_mask).hidden_states
        targets = input_ids[:, 1:]
        valid = torch.ones_like(targets, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].bool()
        preds, nll = [], []
        for h in hidden:
            logits = lm.decode(h)[:, :-1].float()  # Shape: [b, s - 1, v]
            preds.append(logits.argmax(-1))
            token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            nll.append(token_nll[valid].sum())
        final = preds[-1]
        for i, p in enumerate(preds):
            counts[0, i] += (p == targets)[valid].sum()
            counts[1, i] += (p == final)[valid].sum()
            counts[2, i] += nll[i]
            counts[3, i] += valid.sum()
    lm.model.train(was_training)
    return counts


def validation_metrics(counts: torch.Tensor, layers: Sequence[int]) -> dict[str, float]:
    """Flat, namespaced metrics (``val/agree_l4``) from summed counts; layer L's agreement is 1 by definition."""
    out: dict[str, float] = {}
    total = counts[3].clamp(min=1)
    for i, layer in enumerate(layers):
        out[f"val/acc_l{layer}"] = float(counts[0, i] / total[i])
        out[f"val/loss_l{layer}"] = float(counts[2, i] / total[i])
        if i < len(layers) - 1:
            out[f"val/agree_l{layer}"] = float(counts[1, i] / total[i])
    early = [out[f"val/agree_l{k}"] for k in layers[:-1]]
    out["val/agree_mean"] = float(np.mean(early)) if early else math.nan
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum across ranks when running distributed; identity otherwise."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def evaluate(lm: EarlyExitModel, blocks: BlockSet, batch_size: int, *, rank: int = 0, world_size: int = 1,
             precision: str = "fp32") -> dict[str, float]:
    """Validation metrics over ``blocks``, rows split across ranks (every rank must call this: it all-reduces)."""
    mine = list(range(rank, len(blocks), world_size))
    batches = (blocks.batch(mine[i:i + batch_size], lm.device) for i in range(0, len(mine), batch_size))
    counts = all_reduce_sum(validation_counts(lm, batches, precision))
    layers = list(lm.exit_points) + [lm.num_layers]
    return validation_metrics(counts, layers)


# --------------------------------------------------------------------------- HF checkpoints


def exit_plan(lm: EarlyExitModel, cfg: FinetuneConfig, step: int) -> dict[str, Any]:
    """What a consumer needs to use the checkpoint's exits the way they were trained."""
    return {
        "format": EXIT_PLAN_FORMAT,
        "exit_points": list(lm.exit_points),
        "num_layers": lm.num_layers,
        "loss": {**cfg.loss.model_dump(), "weights": loss_weights(lm, cfg)},
        "base_model": cfg.model.name,
        "seq_len": cfg.seq_len,
        "step": step,
        "max_steps": cfg.max_steps,
    }


def save_model_dir(model: nn.Module, tokenizer: Any, plan: dict[str, Any], path: str | Path) -> Path:
    """HF dir (``from_pretrained``-loadable) + tokenizer + exit plan."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    (path / EXIT_PLAN_FILE).write_text(json.dumps(plan, indent=2))
    return path


def read_exit_plan(path: str | Path) -> dict[str, Any] | None:
    """The exit plan of a finished model dir, or None when the dir is missing or incomplete."""
    path = Path(path)
    plan_file = path / EXIT_PLAN_FILE
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    if not (plan_file.is_file() and (path / "config.json").is_file() and has_weights):
        return None
    try:
        plan = json.loads(plan_file.read_text())
    except json.JSONDecodeError:
        return None
    return plan if plan.get("format") == EXIT_PLAN_FORMAT else None


def publish_model_dir(src: str | Path, dest: str | Path) -> Path:
    """Copy a checkpoint's model files (not the optimizer state) to ``dest`` atomically: temp dir + rename."""
    src, dest = Path(src), Path(dest)
    with atomic_path(dest, directory=True) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(TRAINER_STATE_FILE))
    return dest
