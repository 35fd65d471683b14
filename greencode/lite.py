"""LITE loss: every exit point decoded by the model's own final norm + LM head (METHOD §2).

Pure functions in the style of torchtune's early-exit loss: tensors in, scalar out.
Per-exit cross-entropies are computed one exit at a time so the ``[e, b, s, vocab]``
logits tensor never exists (it would be gigabytes for a 49k vocabulary).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. Shapes: logits [b, s, v], labels [b, s] (unshifted)."""
    shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def exit_losses(
    hidden_states: Sequence[torch.Tensor],
    labels: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Next-token loss of each exit's hidden state decoded by ``decode`` (final norm + LM head).

    hidden_states: e tensors of shape [b, s, h]; labels: [b, s]. Returns shape [e].
    """
    return torch.stack([next_token_loss(decode(h), labels) for h in hidden_states])


def lite_loss(losses: torch.Tensor, weights: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Weighted aggregate Σ w_i·loss_i / Σ w_i. Shapes: losses [e], weights [e]."""
    w = torch.as_tensor(weights, dtype=losses.dtype, device=losses.device)
    if w.shape != losses.shape:
        raise ValueError(f"{losses.numel()} exit losses but {w.numel()} weights")
    return (w * losses).sum() / w.sum()
