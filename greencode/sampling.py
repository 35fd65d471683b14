"""Next-token choice that cannot produce NaN, and that reports rows the model broke instead of raising.

``softmax(logits / 1e-300)`` divides by a float32 zero: the top logit becomes inf - inf = NaN
and ``torch.multinomial`` raises for the whole batch. Here a temperature below
``GREEDY_BELOW`` means greedy (vLLM's rule; TGI refuses temperatures <= 0 instead), the
scaling subtracts each row's maximum first so every finite row stays finite, and a row whose
logits hold NaN or +inf (a fault of the model, not of the request) is reported in ``failed``
while the other rows of the batch get their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures under this are greedy decoding (vLLM's _SAMPLING_EPS)


def effective_temperature(temperature: float, greedy_below: float = GREEDY_BELOW) -> float:
    """The temperature actually used: 0.0 (greedy) below ``greedy_below``, else unchanged."""
    return 0.0 if temperature < greedy_below else float(temperature)


@dataclass
class Picked:
    tokens: torch.Tensor  # [B] long; meaningless where ``failed``
    failed: torch.Tensor  # [B] bool: rows whose logits were not finite

    @property
    def any_failed(self) -> bool:
        return bool(self.failed.any())


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                generator: torch.Generator | None = None, greedy_below: float = GREEDY_BELOW) -> Picked:
    """Greedy or top-p sampling for each row of ``logits`` [B, V]; never raises on NaN/inf."""
    logits = logits.float()
    top = logits.amax(dim=-1, keepdim=True)  # NaN if the row holds one, +inf if any is, -inf if all are
    failed = ~torch.isfinite(top[:, 0])
    if bool(failed.any()):  # one reduction per step; the rewrite only when a row broke
        logits = torch.where(failed[:, None], torch.zeros_like(logits), logits)
        top = torch.where(failed[:, None], torch.zeros_like(top), top)
    temperature = effective_temperature(temperature, greedy_below)
    if temperature == 0.0:
        return Picked(logits.argmax(dim=-1), failed)
    probs = torch.softmax((logits - top) / temperature, dim=-1)  # scaled logits <= 0, the top token at exactly 0
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        keep[:, 0] = True  # the top token always stays (a top_p of 1e-300 is 0.0 in float32)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return Picked(torch.multinomial(probs, 1, generator=generator).squeeze(-1), failed)
