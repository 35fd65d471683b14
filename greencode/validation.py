"""Per-exit validation of a LITE model: next-token accuracy, loss, and agreement with the final layer.

Counts are summed per rank and all-reduced before dividing, so validation splits its blocks
across Ray Train workers and still reports one set of numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from greencode.blocks import BlockSet
from greencode.distributed import all_reduce_sum
from greencode.modeling import EarlyExitModel
from greencode.training import autocast


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
            fwd = lm.forward_exits(input_ids, attention_mask)
        targets = input_ids[:, 1:]
        valid = torch.ones_like(targets, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].bool()
        preds, nll = [], []
        for h, layer in zip(fwd.hidden_states, fwd.layers):
            logits = lm.decode_exit(h, layer)[:, :-1].float()  # Shape: [b, s - 1, v]
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


def metrics_from_counts(counts: torch.Tensor, layers: Sequence[int]) -> dict[str, float]:
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


def validation_metrics(lm: EarlyExitModel, blocks: BlockSet, batch_size: int, *, rank: int = 0, world_size: int = 1,
                       precision: str = "fp32") -> dict[str, float]:
    """Validation metrics over ``blocks``, rows split across ranks (every rank must call this: it all-reduces)."""
    mine = list(range(rank, len(blocks), world_size))
    batches = (blocks.batch(mine[i:i + batch_size], lm.device) for i in range(0, len(mine), batch_size))
    counts = all_reduce_sum(validation_counts(lm, batches, precision))
    layers = list(lm.exit_points) + [lm.num_layers]
    return metrics_from_counts(counts, layers)
