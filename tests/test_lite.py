"""LITE loss (METHOD §2) and the cheaper-step estimators: exit schedules and position sampling."""

import copy
import math

import pytest
import torch

from conftest import make_tiny
from greencode.config import LiteLossConfig
from greencode.lite import (
    exit_schedule,
    gather_rows,
    lite_loss,
    next_token_loss,
    prediction_rows,
    sample_rows,
    token_cross_entropy,
)
from greencode.training import LiteObjective, MetricWindow, StepStats


def objective(lm, weights=None, **loss):
    weights = weights or [1.0] * (len(lm.exit_points) + 1)
    return LiteObjective(lm, weights, LiteLossConfig(**loss), max_steps=10)


def test_lite_with_weight_only_on_final_equals_ordinary_loss():
    lm = make_tiny("llama", vocab_size=500)
    ids = torch.randint(0, 500, (2, 16))
    weights = [0.0] * len(lm.exit_points) + [1.0]
    total, per_exit = objective(lm, weights)(ids)
    ordinary = lm.model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(total, ordinary)
    assert per_exit[:-1].isnan().all()  # weight 0: never decoded


def test_lite_loss_is_weighted_mean_golden_value():
    losses = torch.tensor([2.0, 4.0, 1.0])
    assert lite_loss(losses, [1.0, 1.0, 2.0]).item() == (2 + 4 + 2) / 4


def test_lite_loss_estimate_scales_decoded_exits_and_keeps_the_full_denominator():
    losses = torch.tensor([2.0, math.nan, 1.0])  # exit 2 not decoded at this step
    assert lite_loss(losses, [1.0, 1.0, 2.0], [2.0, 2.0, 1.0]).item() == (2 * 1 * 2 + 1 * 2 * 1) / 4


def test_gradients_reach_every_exit_layer():
    lm = make_tiny("opt", vocab_size=500)
    lm.model.train()
    ids = torch.randint(0, 500, (2, 12))
    objective(lm)(ids)[0].backward()
    for i, layer in enumerate(lm.adapter.layers):
        grads = [p.grad for p in layer.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"layer {i + 1} got no gradient"


def test_only_early_exit_weight_leaves_deeper_layers_without_gradient():
    lm = make_tiny("llama", vocab_size=500)
    ids = torch.randint(0, 500, (1, 10))
    w = [1.0] + [0.0] * len(lm.exit_points)  # only exit after layer 4
    objective(lm, w)(ids)[0].backward()
    deep = lm.adapter.layers[5]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in deep.parameters())


def test_next_token_loss_ignores_padding():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[1, 2, -100, -100]])
    expected = torch.nn.functional.cross_entropy(logits[0, :1], labels[0, 1:2])
    torch.testing.assert_close(next_token_loss(logits, labels), expected)


def test_prediction_rows_pair_each_position_with_its_next_token():
    labels = torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])
    rows, targets = prediction_rows(labels)
    assert rows.tolist() == [0, 1, 3] and targets.tolist() == [6, 7, 9]  # flat index b * 3 + t
    hidden = torch.arange(2 * 4, dtype=torch.float).view(2, 4, 1)
    assert gather_rows(hidden, rows).flatten().tolist() == [0.0, 1.0, 4.0]


# --------------------------------------------------------------------------- position sampling


def test_sample_rows_keeps_all_at_fraction_one_and_draws_distinct_rows():
    assert sample_rows(10, 1.0) is None
    pick = sample_rows(10, 0.3, torch.Generator().manual_seed(0))
    assert len(pick) == 3 and len(set(pick.tolist())) == 3 and pick.max() < 10
    assert len(sample_rows(10, 0.01)) == 1  # never empty
    with pytest.raises(ValueError, match="position fraction"):
        sample_rows(10, 0.0)


def test_sampled_positions_give_an_unbiased_estimate_of_the_mean_loss():
    per_position = torch.rand(40, generator=torch.Generator().manual_seed(1)) * 5
    gen = torch.Generator().manual_seed(2)
    estimates = torch.stack([per_position[sample_rows(40, 0.25, gen)].mean() for _ in range(4000)])
    stderr = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - per_position.mean()) < 4 * stderr


def test_objective_exit_losses_use_exactly_the_sampled_positions():
    lm = make_tiny("llama", vocab_size=500, exit_points=[4, 8])
    ids = torch.randint(0, 500, (2, 16))
    obj = objective(lm, position_fraction=0.25)
    with torch.no_grad():
        _, per_exit = obj(ids, step=3)
        rows, targets = prediction_rows(ids)
        pick = sample_rows(len(rows), 0.25, obj._generator(3, 0))
        hidden = lm.forward_exits(ids).hidden_states
        expected = token_cross_entropy(lm.decode(gather_rows(hidden[0], rows[pick])), targets[pick])
        full = token_cross_entropy(lm.decode(gather_rows(hidden[-1], rows)), targets)
    torch.testing.assert_close(per_exit[0], expected)
    torch.testing.assert_close(per_exit[-1], full)  # the final layer always sees every position
    with torch.no_grad():
        assert not torch.equal(per_exit, obj(ids, step=4)[1])  # another step, other positions


# --------------------------------------------------------------------------- exit schedules


def test_schedule_all_decodes_every_weighted_exit():
    assert exit_schedule([0.5, 0.0, 0.2], 7, "all") == {0: 1.0, 2: 1.0}


def test_rotational_schedule_visits_each_exit_once_per_cycle():
    weights = [0.3, 0.2, 0.1, 0.0, 0.1]  # 4 weighted exits, 3 per step -> 2 groups
    cycle = [exit_schedule(weights, s, "rotational", exits_per_step=3) for s in range(2)]
    assert cycle[0] == {0: 2.0, 2: 2.0} and cycle[1] == {1: 2.0, 4: 2.0}
    assert exit_schedule(weights, 2, "rotational", exits_per_step=3) == cycle[0]
    assert exit_schedule(weights, 5, "rotational", exits_per_step=4) == {0: 1.0, 1: 1.0, 2: 1.0, 4: 1.0}


def test_rotational_loss_averaged_over_a_cycle_equals_the_full_loss():
    lm = make_tiny("llama", vocab_size=500)  # exits [4, 6, 10]
    ids = torch.randint(0, 500, (2, 12))
    weights = [0.5, 0.3, 0.1, 0.1]
    with torch.no_grad():
        full = objective(lm, weights)(ids)[0]
        rotating = objective(lm, weights, exit_sampling="rotational", exits_per_step=1)
        per_step = [rotating(ids, step=s)[0] for s in range(3)]
    torch.testing.assert_close(torch.stack(per_step).mean(), full)


def test_gradual_schedule_turns_exits_on_deepest_first():
    weights = [0.1] * 4
    on = [sorted(exit_schedule(weights, s, "gradual", max_steps=8, gradual_fraction=0.5)) for s in range(6)]
    assert on[0] == [] and on[1] == [3] and on[2] == [2, 3] and on[3] == [1, 2, 3] and on[4] == on[5] == [0, 1, 2, 3]
    assert set(exit_schedule(weights, 1, "gradual", max_steps=8, gradual_fraction=0.5).values()) == {1.0}


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="exit sampling mode 'random'"):
        exit_schedule([0.1], 0, "random")


def test_exits_can_leave_the_shared_head_to_the_final_layer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from greencode.modeling import wrap_model

    torch.manual_seed(0)
    # untied: the head's gradient is the head's own
    cfg = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    start = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 500, (2, 12))
    grads = {}
    for update in (True, False):
        lm = wrap_model(copy.deepcopy(start), None)
        weights = [1.0] * len(lm.exit_points) + [0.0]  # only the exits count
        objective(lm, weights, exits_update_head=update)(ids)[0].backward()
        grads[update] = (lm.adapter.lm_head.weight.grad, lm.adapter.layers[0].mlp.up_proj.weight.grad)
    (head_trained, layer_trained), (head_frozen, layer_frozen) = grads[True], grads[False]
    assert head_trained.abs().sum() > 0 and (head_frozen is None or head_frozen.abs().sum() == 0)
    torch.testing.assert_close(layer_frozen, layer_trained)  # the layers learn exactly as before


def test_metric_window_averages_each_exit_over_the_steps_that_decoded_it():
    window = MetricWindow(3, torch.device("cpu"))
    window.add(StepStats(1.0, [math.nan, 2.0, 5.0], 0.5, 10))  # exit 4 not sampled this step
    window.add(StepStats(3.0, [1.0, 4.0, 7.0], 1.5, 10))
    out = window.flush([4, 8, 12])
    assert out["train/loss"] == 2.0 and out["train/loss_l4"] == 1.0 and out["train/loss_l8"] == 3.0
    assert out["train/loss_l12"] == 6.0 and out["train/grad_norm"] == 1.0
    window.add(StepStats(1.0, [math.nan, 1.0, 1.0], 0.0, 10))
    assert math.isnan(window.flush([4, 8, 12])["train/loss_l4"])
