import torch

from conftest import make_tiny
from greencode.lite import exit_losses, lite_loss, next_token_loss


def test_lite_with_weight_only_on_final_equals_ordinary_loss():
    lm = make_tiny("llama", vocab_size=500)
    ids = torch.randint(0, 500, (2, 16))
    fwd = lm.forward_exits(ids)
    losses = exit_losses(fwd.hidden_states, ids, lm.decode)
    weights = [0.0] * (len(losses) - 1) + [1.0]
    ordinary = lm.model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(lite_loss(losses, weights), ordinary)


def test_lite_loss_is_weighted_mean_golden_value():
    losses = torch.tensor([2.0, 4.0, 1.0])
    assert lite_loss(losses, [1.0, 1.0, 2.0]).item() == (2 + 4 + 2) / 4


def test_gradients_reach_every_exit_layer():
    lm = make_tiny("opt", vocab_size=500)
    lm.model.train()
    ids = torch.randint(0, 500, (2, 12))
    fwd = lm.forward_exits(ids)
    loss = lite_loss(exit_losses(fwd.hidden_states, ids, lm.decode), [1.0] * len(fwd.hidden_states))
    loss.backward()
    for i, layer in enumerate(lm.adapter.layers):
        grads = [p.grad for p in layer.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"layer {i + 1} got no gradient"


def test_only_early_exit_weight_leaves_deeper_layers_without_gradient():
    lm = make_tiny("llama", vocab_size=500)
    ids = torch.randint(0, 500, (1, 10))
    fwd = lm.forward_exits(ids)
    w = [1.0] + [0.0] * (len(fwd.hidden_states) - 1)  # only exit after layer 4
    lite_loss(exit_losses(fwd.hidden_states, ids, lm.decode), w).backward()
    deep = lm.adapter.layers[5]
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in deep.parameters())


def test_next_token_loss_ignores_padding():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[1, 2, -100, -100]])
    expected = torch.nn.functional.cross_entropy(logits[0, :1], labels[0, 1:2])
    torch.testing.assert_close(next_token_loss(logits, labels), expected)
