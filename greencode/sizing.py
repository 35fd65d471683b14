"""Fit a preset's model-bound work to the machine it runs on (``PipelineConfig.sizing``, issue 20).

A preset sized on a CPU with native bfloat16 takes several times longer where ``auto`` falls back
to float32 (an AVX2 CPU). Before the stages run, the pipeline times one forward+backward of the
model in the precision fine-tuning will use (the probe) and compares it with the probe on the
machine the preset was sized on. The stage minutes measured there, scaled by that ratio, give
the projection; when it passes the budget, fine-tuning steps, extraction samples and evaluation
samples shrink by one common factor, each never below its floor (evaluation never below 200
samples, so every quality figure keeps its interval). The probe is the driver's CPU: a preset
that fine-tunes on GPUs has no ``sizing``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from greencode.config import PipelineConfig, SizingConfig
from greencode.modeling import EarlyExitModel
from greencode.training import autocast

log = logging.getLogger(__name__)


def probe_seconds(lm: EarlyExitModel, precision: str, batch_size: int, seq_len: int, rounds: int = 3) -> float:
    """CPU seconds of one forward+backward of ``lm`` on ``batch_size`` x ``seq_len`` tokens under ``precision``,
    on one thread (the fastest of ``rounds``; the first warms the kernels up). A batch of one would hide most of
    what bf16 gains: 1.2x there against 1.7x at the demo's 4 x 128 on an AVX-512 BF16 + AMX Xeon.

    CPU time of one thread measures the machine, not its load: other processes on a shared box stretch the
    wall clock but not this thread's own time (with more threads, OpenMP's spin-waiting would count)."""
    ids = torch.randint(0, lm.model.config.vocab_size, (batch_size, seq_len),
                        generator=torch.Generator().manual_seed(0))
    threads, best = torch.get_num_threads(), math.inf
    torch.set_num_threads(1)
    try:
        for _ in range(rounds):
            start = time.thread_time()
            with autocast(precision, lm.device):
                loss = lm.model(input_ids=ids.to(lm.device), labels=ids.to(lm.device)).loss
            loss.backward()
            best = min(best, time.thread_time() - start)
            lm.model.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    return best


def _scaled(configured: int, floor: int, share: float) -> int:
    return max(min(floor, configured), math.floor(configured * share))


def _minutes(sizing: SizingConfig, ratio: float, counts: dict[str, tuple[int, int]]) -> float:
    """Projected minutes of the model-bound stages when each runs ``counts[stage] = (new, configured)`` units."""
    return sum(minutes * ratio * counts[stage][0] / counts[stage][1] if stage in counts else minutes * ratio
               for stage, minutes in sizing.reference_minutes.items())  # fit_exits: a fixed cost, not shrunk


def size(cfg: PipelineConfig, probe_s: float) -> tuple[PipelineConfig, str]:
    """``cfg`` with its elastic work shrunk to fit ``cfg.sizing.budget_min`` at the measured ``probe_s``,
    and one line that says what was measured, projected and changed."""
    sizing = cfg.sizing
    ratio = probe_s / sizing.reference_probe_s
    configured = {"finetune": cfg.finetune.max_steps, "extract": cfg.extract.num_samples + cfg.heldout_samples,
                  "evaluate": cfg.evaluate.num_samples}
    projected = _minutes(sizing, ratio, {k: (v, v) for k, v in configured.items()})
    head = (f"sizing: probe {probe_s:.2f} s here vs {sizing.reference_probe_s:.2f} s where the preset was sized "
            f"({ratio:.2f}x); model-bound stages projected {projected:.1f} min")
    if projected <= sizing.budget_min:
        return cfg, f"{head}, within the {sizing.budget_min:g} min budget: the preset runs as written"

    def shrunk(share: float) -> dict[str, Any]:
        return {"max_steps": _scaled(cfg.finetune.max_steps, sizing.min_finetune_steps, share),
                "num_samples": _scaled(cfg.extract.num_samples, cfg.extract.samples_per_shard, share),
                "heldout": _scaled(cfg.heldout_samples, cfg.extract.samples_per_shard, share),
                "eval": _scaled(cfg.evaluate.num_samples, sizing.min_eval_samples, share)}

    def minutes(share: float) -> float:
        n = shrunk(share)
        return _minutes(sizing, ratio, {"finetune": (n["max_steps"], configured["finetune"]),
                                        "extract": (n["num_samples"] + n["heldout"], configured["extract"]),
                                        "evaluate": (n["eval"], configured["evaluate"])})

    low, high = 0.0, 1.0  # the largest common share that fits (the floors may keep it from fitting at all)
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if minutes(mid) <= sizing.budget_min else (low, mid)
    n = shrunk(low)
    sized = cfg.model_copy(update={
        "finetune": cfg.finetune.model_copy(update={"max_steps": n["max_steps"]}),
        "extract": cfg.extract.model_copy(update={"num_samples": n["num_samples"]}),
        "heldout_samples": n["heldout"],
        "evaluate": cfg.evaluate.model_copy(update={"num_samples": n["eval"]})})
    fits = "fits" if minutes(low) <= sizing.budget_min else "still over it: the floors hold"
    changes = [f"{name} {before} -> {after}" for name, before, after in (
        ("finetune.max_steps", cfg.finetune.max_steps, n["max_steps"]),
        ("extract.num_samples", cfg.extract.num_samples, n["num_samples"]),
        ("heldout_samples", cfg.heldout_samples, n["heldout"]),
        ("evaluate.num_samples", cfg.evaluate.num_samples, n["eval"]),
    ) if before != after and (name != "finetune.max_steps" or "finetune" in cfg.stages)]
    return sized, (f"{head}, over the {sizing.budget_min:g} min budget: {', '.join(changes) or 'nothing can shrink'} "
                   f"(projected {minutes(low):.1f} min, {fits})")
