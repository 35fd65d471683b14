"""What the exit policy may observe besides the hidden state: the translated exit's own confidence.

Untranslated exits are confidently wrong; translated ones are calibrated (docs/method.md §8), so the
exit's own top-1 probability, its margin over the runner-up and its entropy say much about whether
the exit already agrees with the last layer — things a small MLP over the raw hidden state hardly
learns from a few thousand tokens. They are computed over a *shortlist*, the first ``shortlist``
token ids (byte-level BPE's most frequent merges), so one feature call costs a ``shortlist``-row
slice of the LM head rather than all of it. Extraction and the policy gate call the same function,
so the policy sees at inference exactly what it was trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

FEATURES = ("top1", "margin", "entropy")


def check_features(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ValueError(f"unknown exit features {unknown}; choose from {list(FEATURES)}")
    return list(names)


@torch.no_grad()
def confidence_features(lm: Any, hidden: torch.Tensor, layer: int, names: Sequence[str],
                        shortlist: int) -> torch.Tensor:
    """[B, len(names)] float32 features of states ``hidden`` ([B, H]) that left after ``layer``.

    top1 = the largest probability, margin = top1 minus the second, entropy = the entropy divided by
    log(shortlist) (0: certain, 1: uniform); the softmax runs over the shortlist's logits.
    """
    head = lm.adapter.lm_head
    size = min(shortlist, head.weight.shape[0])
    logits = lm.exit_normed(hidden, layer) @ head.weight[:size].T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[:size]
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(2, dim=-1).values.exp()
    values = {"top1": top[:, 0], "margin": top[:, 0] - top[:, 1],
              "entropy": -(logp.exp() * logp).sum(-1) / math.log(size)}
    return torch.stack([values[n] for n in names], dim=-1)
