"""LITE loss: every exit point decoded by the model's own final norm + LM head (METHOD §2).

Pure functions in the style of torchtune's early-exit loss: tensors in, scalar out.
Per-exit losses are computed one exit at a time so the ``[e, b, s, vocab]`` logits
tensor never exists (it would be gigabytes for a 49k vocabulary).

Two targets per exit: the dataset's next token (cross-entropy, METHOD §2) or the
frozen starting model's final-layer distribution (self-distillation, KL). The step
cost is dominated by the LM head run at every exit, so the helpers below also let a
step decode only some exits (:func:`exit_schedule`) and only some positions
(:func:`sample_rows`), with weights that keep the loss an unbiased estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. Shapes: logits [b, s, v], labels [b, s] (unshifted)."""
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def lite_loss(losses: torch.Tensor, weights: torch.Tensor | Sequence[float],
              scales: torch.Tensor | Sequence[float] | None = None) -> torch.Tensor:
    """Weighted aggregate Σ w_i·loss_i / Σ w_i (METHOD §2), or its estimate from the exits a step decoded.

    losses [e]: NaN where an exit was not decoded this step; weights [e]; scales [e] (default 1):
    each decoded loss counts s_i·w_i, with s_i = 1 / (share of steps that decode exit i) so the
    estimate stays unbiased. The denominator is always Σ w_i over every exit.
    """
    w = torch.as_tensor(weights, dtype=losses.dtype, device=losses.device)
    if w.shape != losses.shape:
        raise ValueError(f"{losses.numel()} exit losses but {w.numel()} weights")
    s = torch.ones_like(w) if scales is None else torch.as_tensor(scales, dtype=losses.dtype, device=losses.device)
    terms = torch.where(losses.isnan(), torch.zeros_like(losses), s * w * losses.nan_to_num())  # Shape: [e]
    return terms.sum() / w.sum()


# --------------------------------------------------------------------------- flattened positions


def prediction_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions predict a real next token, flattened.

    labels: [b, s] (unshifted, IGNORE_INDEX on padding). Returns (rows [n], targets [n]): ``rows``
    index the flattened [b * (s - 1)] positions ``h[:, :-1]``, ``targets`` are their next tokens.
    """
    next_tokens = labels[:, 1:].reshape(-1)  # Shape: [b * (s - 1)]
    rows = (next_tokens != IGNORE_INDEX).nonzero().squeeze(1)  # Shape: [n]
    return rows, next_tokens[rows]


def gather_rows(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Hidden states of the predicting positions. hidden: [b, s, h], rows: [n] -> [n, h]."""
    return hidden[:, :-1].reshape(-1, hidden.size(-1))[rows]


def sample_rows(n: int, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """A uniform sample (without replacement) of ``round(fraction * n)`` of ``n`` positions, at least one.

    Returns indices [k] into the n positions, or None when ``fraction`` keeps them all. The mean
    loss over a uniform sample is an unbiased estimate of the mean over all n positions.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"position fraction must be in (0, 1], got {fraction}")
    k = max(1, round(fraction * n))
    if k >= n:
        return None
    return torch.randperm(n, generator=generator)[:k]


# --------------------------------------------------------------------------- per-position losses


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against the dataset's tokens. Shapes: logits [n, v], targets [n] -> []."""
    return F.cross_entropy(logits.float(), targets)


def teacher_log_probs(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities of the teacher at ``temperature`` (fp32). Shape: [n, v] -> [n, v]."""
    return F.log_softmax(teacher_logits.float() / temperature, dim=-1)


def distill_loss(student_logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) per position, averaged, times T² (Hinton et al.: gradients keep their scale).

    student_logits: [n, v]; teacher_logp: [n, v] from :func:`teacher_log_probs` at the same
    ``temperature``. Returns []; exactly 0 when the student's distribution equals the teacher's.
    """
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)  # Shape: [n, v]
    kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="none").sum(-1)  # Shape: [n]
    return kl.mean() * temperature**2


def target_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logp: torch.Tensor | None,
                distill_share: float, temperature: float) -> torch.Tensor:
    """(1 - d)·CE(dataset) + d·KL(teacher), skipping the term whose share is 0.

    student_logits: [n, v]; targets: [n]; teacher_logp: [n, v] or None when d = 0. Returns [].
    """
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if distill_share < 1:
        loss = loss + (1 - distill_share) * token_cross_entropy(student_logits, targets)
    if distill_share > 0:
        if teacher_logp is None:
            raise ValueError("a distillation share > 0 needs the teacher's log-probabilities")
        loss = loss + distill_share * distill_loss(student_logits, teacher_logp, temperature)
    return loss


# --------------------------------------------------------------------------- which exits a step decodes


def exit_schedule(weights: Sequence[float], step: int, mode: str, *, exits_per_step: int = 1,
                  max_steps: int = 1, gradual_fraction: float = 0.5) -> dict[int, float]:
    """Exits (indices into ``weights``, final layer excluded) to decode at ``step``, with their weight scale.

    weights: loss weight of each exit point (the final layer's is not passed); exits with weight 0
    are never decoded. Modes:

    - ``all``: every exit, scale 1;
    - ``rotational``: the n weighted exits are dealt into R = ceil(n / exits_per_step) groups
      (exit j in group j mod R) and step s decodes group s mod R, scaled by R, so every R
      consecutive steps sum to R times the full loss (an unbiased estimate over each cycle);
    - ``gradual``: LayerSkip/torchtune's curriculum, deepest exits first: the j-th of n
      weighted exits (shallowest first) is on once step / max_steps >= gradual_fraction·(n - j) / n,
      scale 1 (a curriculum, not an estimate: all exits are on after gradual_fraction of training).
    """
    active = [i for i, w in enumerate(weights) if w > 0]
    n = len(active)
    if mode == "all" or n == 0:
        return {i: 1.0 for i in active}
    if mode == "rotational":
        if exits_per_step < 1:
            raise ValueError(f"exits_per_step must be >= 1, got {exits_per_step}")
        groups = math.ceil(n / exits_per_step)
        return {i: float(groups) for j, i in enumerate(active) if j % groups == step % groups}
    if mode == "gradual":
        done = step / max(1, max_steps)
        return {i: 1.0 for j, i in enumerate(active) if done >= gradual_fraction * (n - j) / n}
    raise ValueError(f"unknown exit sampling mode {mode!r}; expected all | rotational | gradual")
