"""NaN-proof next-token choice: near-zero temperatures are greedy, broken rows are reported, not raised."""

import pytest
import torch

from greencode.sampling import GREEDY_BELOW, effective_temperature, pick_tokens


def logits(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("temperature", [0.0, 5e-324, 1e-300, 1e-30, GREEDY_BELOW / 2])
def test_temperatures_below_the_threshold_are_greedy(temperature):
    x = logits()
    assert effective_temperature(temperature) == 0.0
    picked = pick_tokens(x, temperature, top_p=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(picked.tokens, x.argmax(-1)) and not picked.any_failed


@pytest.mark.parametrize("scale", [1.0, 1e30, 1e37])  # 1e37: differences overflow float32
def test_smallest_sampled_temperature_stays_finite_even_for_huge_logits(scale):
    x = logits() * scale
    picked = pick_tokens(x, GREEDY_BELOW, generator=torch.Generator().manual_seed(0))
    assert torch.equal(picked.tokens, x.argmax(-1)) and not picked.any_failed


def test_tiny_top_p_keeps_the_top_token():
    x = logits()
    assert torch.equal(pick_tokens(x, 1.0, top_p=1e-300).tokens, x.argmax(-1))


def test_sampling_does_not_fall_back_to_greedy():
    x = torch.zeros(1, 8)
    rng = torch.Generator().manual_seed(0)
    drawn = {int(pick_tokens(x, 1.0, generator=rng).tokens) for _ in range(64)}
    assert len(drawn) >= 6  # flat distribution over 8 tokens


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_rows_with_nan_or_inf_fail_alone(temperature):
    x = logits(rows=5)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    x[3] = float("-inf")
    x[4, :10] = float("-inf")  # masked entries are fine while some stay finite
    picked = pick_tokens(x, temperature, generator=torch.Generator().manual_seed(0))
    assert picked.failed.tolist() == [False, True, True, True, False]
    assert int(picked.tokens[4]) >= 10
    if temperature == 0.0:
        assert int(picked.tokens[0]) == int(x[0].argmax()) and int(picked.tokens[4]) == int(x[4].argmax())


def test_half_precision_logits():
    x = logits().half()
    picked = pick_tokens(x, 1e-4, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert picked.tokens.dtype == torch.long and not picked.any_failed
