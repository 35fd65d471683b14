"""What a fine-tuning checkpoint is on disk: a Hugging Face model dir, its exit plan, and the trainer state.

    checkpoint_000100/
        config.json, model.safetensors, tokenizer files   loadable by ``from_pretrained``
        exit_plan.json                                    exit points + LITE weights it was trained with
        trainer_state.pt                                  step, optimizer, scheduler, grad scaler, config

The published model dir is the same minus ``trainer_state.pt``. Ray-free: the Ray Train
worker hands these files to ``ray.train.Checkpoint``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from greencode.atomic import atomic_path
from greencode.config import FinetuneConfig
from greencode.modeling import EarlyExitModel
from greencode.training import loss_weights

EXIT_PLAN_FILE = "exit_plan.json"
EXIT_PLAN_FORMAT = "greencode.exit_plan/v1"
TRAINER_STATE_FILE = "trainer_state.pt"


def exit_plan(lm: EarlyExitModel, cfg: FinetuneConfig, step: int, run_identity: str | None = None) -> dict[str, Any]:
    """What a consumer needs to use the checkpoint's exits the way they were trained, and which run
    made it (``run_identity``: settings + base model digest, what a rerun checks before reusing it)."""
    return {
        "format": EXIT_PLAN_FORMAT,
        "exit_points": list(lm.exit_points),
        "num_layers": lm.num_layers,
        "loss": {**cfg.loss.model_dump(), "weights": loss_weights(lm, cfg)},
        "base_model": cfg.model.name,
        "seq_len": cfg.seq_len,
        "step": step,
        "max_steps": cfg.max_steps,
        "run_identity": run_identity,
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


@dataclass
class TrainerState:
    """Everything besides the weights that a resumed run needs to continue exactly."""

    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    config: dict[str, Any]

    def save(self, checkpoint_dir: str | Path) -> Path:
        path = Path(checkpoint_dir) / TRAINER_STATE_FILE
        torch.save(self.__dict__, path)
        return path

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> TrainerState:
        # weights_only: tensors and plain containers only, so a file planted in shared storage cannot run code
        path = Path(checkpoint_dir) / TRAINER_STATE_FILE
        return cls(**torch.load(path, map_location="cpu", weights_only=True))
