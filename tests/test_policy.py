import pytest
import torch

from conftest import make_tiny
from greencode.config import GateConfig
from greencode.gates import PolicyGate, build_gate
from greencode.modeling import model_fingerprint
from greencode.policy import ExitPolicy, PolicyMismatchError


def test_default_shape_is_hidden_64_64_2_tanh():
    p = ExitPolicy(576)
    shapes = [tuple(m.weight.shape) for m in p.net if isinstance(m, torch.nn.Linear)]
    assert shapes == [(64, 576), (64, 64), (2, 64)]
    assert isinstance(p.net[1], torch.nn.Tanh)
    assert p(torch.randn(3, 576)).shape == (3, 2)


def test_save_load_roundtrip_is_self_describing(tmp_path):
    p = ExitPolicy(32, [16], "relu", exit_points=[4, 6], model_fingerprint="abc", metadata={"alpha": 0.1})
    path = p.save(tmp_path / "sub" / "policy.pt")
    q = ExitPolicy.load(path, hidden_size=32, exit_points=[4, 6], model_fingerprint="abc")
    x = torch.randn(5, 32)
    torch.testing.assert_close(p(x), q(x))
    assert q.metadata == {"alpha": 0.1} and q.hidden_sizes == [16] and q.activation == "relu"
    assert not list(tmp_path.glob("sub/.*.tmp"))  # atomic write leaves no temp file


@pytest.mark.parametrize("kwargs, match", [
    ({"hidden_size": 64}, "hidden size 32"),
    ({"exit_points": [4, 8]}, "exit points"),
    ({"model_fingerprint": "other"}, "trained on model abc"),
])
def test_loading_against_the_wrong_model_is_a_clear_error(tmp_path, kwargs, match):
    path = ExitPolicy(32, exit_points=[4, 6], model_fingerprint="abc").save(tmp_path / "p.pt")
    with pytest.raises(PolicyMismatchError, match=match):
        ExitPolicy.load(path, **kwargs)


def test_not_a_policy_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PolicyMismatchError, match="not a readable"):
        ExitPolicy.load(bad)
    with pytest.raises(FileNotFoundError):
        ExitPolicy.load(tmp_path / "missing.pt")


def test_fingerprint_changes_with_weights():
    lm = make_tiny("llama", vocab_size=300)
    before = model_fingerprint(lm.model)
    assert before == lm.fingerprint
    with torch.no_grad():
        lm.model.lm_head.weight.add_(0.01)
    assert model_fingerprint(lm.model) != before


def test_policy_gate_threshold_and_temperature():
    p = ExitPolicy(8, hidden_sizes=[])
    with torch.no_grad():
        p.net[0].weight.zero_()
        p.net[0].bias.copy_(torch.tensor([0.0, 1.0]))  # p[exit] = sigmoid(1) ~ 0.73
    h = torch.randn(4, 8)
    assert PolicyGate(p, 0.7).exit_mask(h, 4, None)[0].all()
    assert not PolicyGate(p, 0.8).exit_mask(h, 4, None)[0].any()
    assert PolicyGate(p, 0.8, temperature=0.5).exit_mask(h, 4, None)[0].all()  # sharper: ~0.88


def test_build_gate_needs_a_policy():
    with pytest.raises(ValueError, match="policy"):
        build_gate(GateConfig(mode="policy", policy_path="x.pt"))


@pytest.mark.parametrize("threshold, tau", [(0.0, 1.0), (0.3, 1.0), (0.5, 2.0), (0.9, 0.5), (0.99, 1.0), (1.0, 1.0)])
def test_policy_gate_margin_equals_softmax_rule(threshold, tau):
    torch.manual_seed(1)
    p = ExitPolicy(16, hidden_sizes=[8])
    h = torch.randn(256, 16) * 3
    expected = p.exit_probability(h, tau) > threshold
    assert torch.equal(PolicyGate(p, threshold, tau).exit_mask(h, 4, None)[0], expected)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_policy_gate_folded_margins_equal_the_policy(activation):
    """The gate's folded per-layer call (fused hidden layers, one exit-minus-continue row) is the policy's margin."""
    torch.manual_seed(2)
    p = ExitPolicy(32, activation=activation)
    h = torch.randn(20, 32) * 4
    z = p(h)
    torch.testing.assert_close(PolicyGate(p, 0.5).exit_margins(h), z[:, 1] - z[:, 0], rtol=1e-5, atol=1e-5)
