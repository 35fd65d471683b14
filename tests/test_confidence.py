"""The translated exit's own confidence as policy features: one function for extraction and the gate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_tiny
from greencode.confidence import confidence_features
from greencode.config import GenerationConfig
from greencode.env import ExitEnv
from greencode.extraction import ShardSample, extract_rows, meta_for
from greencode.gates import PolicyGate
from greencode.generate import GatedGenerator
from greencode.policy import ExitPolicy, PolicyMismatchError
from greencode.shards import build_table, load_shards, write_shard
from greencode.translators import ExitTranslators

FEATURES = ("top1", "margin", "entropy")
SHORTLIST = 300


@pytest.fixture(scope="module")
def lm():
    lm = make_tiny("llama", vocab_size=512)
    t = ExitTranslators(lm.exit_points, lm.hidden_size, {"model_fingerprint": lm.fingerprint})
    g = torch.Generator().manual_seed(0)
    for k in lm.exit_points:
        t.set_map(k, 3 * torch.randn(lm.hidden_size, lm.hidden_size, generator=g) / 8, torch.zeros(lm.hidden_size))
    lm.attach_translators(t)
    return lm


def test_features_are_the_translated_exits_shortlist_softmax(lm):
    hidden = torch.randn(5, lm.hidden_size)
    feats = confidence_features(lm, hidden, 6, FEATURES, SHORTLIST)
    p = torch.softmax(lm.decode_exit(hidden, 6)[:, :SHORTLIST].float(), dim=-1)
    top = p.topk(2, dim=-1).values
    entropy = -(p * p.log()).sum(-1) / math.log(SHORTLIST)
    torch.testing.assert_close(feats, torch.stack([top[:, 0], top[:, 0] - top[:, 1], entropy], dim=-1))
    assert confidence_features(lm, hidden, 6, ["entropy"], SHORTLIST).shape == (5, 1)
    # another exit's translator, another confidence
    assert not torch.allclose(feats, confidence_features(lm, hidden, 10, FEATURES, SHORTLIST))


def test_shards_record_features_and_the_env_observes_them(lm, tmp_path):
    meta = meta_for(lm, "float32", FEATURES, SHORTLIST)
    samples = [ShardSample("a", list(range(100, 120)), [5, 6]), ShardSample("b", list(range(300, 307)), [])]
    rows = extract_rows(lm, samples, 4, meta)
    for row in rows:
        expected = torch.stack([confidence_features(lm, torch.as_tensor(row["hidden"][i])[None], k, FEATURES,
                                                    SHORTLIST)[0] for i, k in enumerate(lm.exit_points)])
        np.testing.assert_allclose(row["exit_features"], expected.numpy(), rtol=1e-4, atol=1e-5)
    write_shard(build_table(meta, rows), tmp_path / "shard-00000.parquet")
    data = load_shards([tmp_path / "shard-00000.parquet"])
    assert data.meta.features == FEATURES and data.meta.observation_size == lm.hidden_size + 3
    env = ExitEnv({"shards_dir": str(tmp_path), "seed": 0})
    obs, _ = env.reset()
    assert env.observation_space.shape == (lm.hidden_size + 3,)
    row = env._row
    np.testing.assert_allclose(obs, np.concatenate([data.hidden[row, 0], data.exit_features[row, 0]]), rtol=1e-6)
    plain = meta_for(lm, "float32")
    assert "exit_features" not in extract_rows(lm, samples[:1], 2, plain)[0]


def test_a_policy_that_reads_only_top1_gates_on_the_translated_confidence(lm, tmp_path):
    hidden = torch.randn(64, lm.hidden_size) * 4
    top1 = confidence_features(lm, hidden, 6, ["top1"], SHORTLIST)[:, 0]
    cut = float(top1.median())
    policy = ExitPolicy(lm.hidden_size, hidden_sizes=[], exit_points=lm.exit_points, model_fingerprint=lm.fingerprint,
                        features=["top1"], feature_shortlist=SHORTLIST)
    with torch.no_grad():  # z_exit - z_continue = 1e4 (top1 - cut): exit where the exit is surer than the median
        policy.net[0].weight.zero_()
        policy.net[0].weight[1, -1] = 1e4
        policy.net[0].bias.copy_(torch.tensor([0.0, -1e4 * cut]))
    policy.save(tmp_path / "p.pt")
    loaded = ExitPolicy.load_for(tmp_path / "p.pt", lm)
    assert loaded.features == ["top1"] and loaded.feature_shortlist == SHORTLIST
    leave, _ = PolicyGate(loaded, 0.5).exit_mask(hidden, 6, lm)
    assert torch.equal(leave, top1 > cut) and 0 < int(leave.sum()) < 64
    result = GatedGenerator(lm).generate([[5, 17, 42, 9]], PolicyGate(loaded, 0.5), GenerationConfig(max_new_tokens=6))
    assert len(result[0].token_ids) == 6
    with pytest.raises(PolicyMismatchError, match="exit features"):
        loaded.check_compatible(features=([], 0))
