"""Exit translators: the closed-form fit, summed statistics, and the one decode every path goes through."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny, save_tiny
from greencode.blocks import BlockSet
from greencode.config import GenerationConfig, ModelConfig
from greencode.gates import ConfidenceGate, FixedGate, FullGate, PolicyGate
from greencode.generate import GatedGenerator
from greencode.modeling import load_model, model_digest
from greencode.policy import ExitPolicy
from greencode.speculative import LosslessGenerator
from greencode.training import exit_predictions
from greencode.translators import (
    ExitTranslators,
    TranslatorMismatchError,
    TranslatorStats,
    collect_stats,
    fit_translators,
)
from test_speculative import GREEDY as LOSSLESS
from test_speculative import one_thread  # noqa: F401  (autouse: tiny models run fastest on one thread)
from test_speculative import tiny as sharp_tiny

PROMPTS = [[5, 17, 42, 9, 33, 2, 71], [88, 3, 3, 19], [7, 140, 52, 11, 64, 9, 23, 5, 41]]
GREEDY = GenerationConfig(max_new_tokens=10)


def random_translators(lm, seed: int = 0) -> ExitTranslators:
    """Random rotations: far enough from the identity that translated exits pick other tokens than untranslated ones."""
    g = torch.Generator().manual_seed(seed)
    t = ExitTranslators(lm.exit_points, lm.hidden_size, {"model_fingerprint": lm.fingerprint})
    h = lm.hidden_size
    for k in lm.exit_points:
        rotation, _ = torch.linalg.qr(torch.randn(h, h, generator=g))
        t.set_map(k, rotation, torch.zeros(h))
    return t


def blocks(n: int, seq: int = 16, vocab: int = 400, seed: int = 0) -> BlockSet:
    rng = np.random.default_rng(seed)
    return BlockSet(rng.integers(1, vocab, (n, seq)).astype(np.int32), np.full(n, seq, dtype=np.int32))


def batches(b: BlockSet, size: int = 2):
    return [b.batch(slice(s, s + size), torch.device("cpu")) for s in range(0, len(b), size)]


def hf_greedy(lm, prompt, n=GREEDY.max_new_tokens):
    out = lm.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def coin_policy(lm):
    torch.manual_seed(0)
    policy = ExitPolicy(lm.hidden_size, hidden_sizes=[], exit_points=lm.exit_points, model_fingerprint=lm.fingerprint)
    with torch.no_grad():
        policy.net[0].weight.mul_(20.0)
    return policy


@pytest.fixture(scope="module", params=["llama", "opt"])
def lm(request):
    """Exits that disagree with the last layer now and then (so drafts are both accepted and rejected)."""
    return sharp_tiny(request.param)


# --------------------------------------------------------------------------- the fit


def test_the_ridge_solve_recovers_a_known_affine_map():
    rng = np.random.default_rng(0)
    h, n = 12, 4000
    w_true, b_true = rng.normal(size=(h, h)), rng.normal(size=h)
    x = rng.normal(size=(n, h)) * rng.uniform(0.5, 3, size=h) + rng.normal(size=h)
    y = x @ w_true.T + b_true
    stats = TranslatorStats.zeros([3], h)
    stats.add_([torch.tensor(x)], torch.tensor(y))
    w, b = stats.solve(0, 1e-9)
    np.testing.assert_allclose(w, w_true, atol=1e-5)
    np.testing.assert_allclose(b, b_true, atol=1e-5)
    # an overwhelming ridge falls back to the identity plus the mean shift, not to a constant
    w_strong, b_strong = stats.solve(0, 1e9)
    np.testing.assert_allclose(w_strong, np.eye(h), atol=1e-5)
    np.testing.assert_allclose(b_strong, y.mean(0) - x.mean(0), atol=1e-4)


def test_statistics_summed_over_any_partition_equal_one_pass(lm):
    data = blocks(6)
    whole = collect_stats(lm, batches(data, 6))
    for cut in ([0, 1, 6], [0, 3, 4, 6], [0, 2, 4, 5, 6]):
        parts = [collect_stats(lm, batches(BlockSet(data.ids[a:b], data.lengths[a:b]), 2))
                 for a, b in zip(cut, cut[1:])]
        total = sum(parts[1:], parts[0])
        assert total.count == whole.count == 6 * 16
        for name in ("xtx", "xty", "sum_x", "sum_y"):
            np.testing.assert_allclose(getattr(total, name), getattr(whole, name), rtol=1e-9, atol=1e-9)
    padded = BlockSet(data.ids[:2].copy(), np.array([16, 9], dtype=np.int32))
    assert collect_stats(lm, batches(padded)).count == 25  # padding is no token
    with pytest.raises(ValueError, match="different exit points"):
        whole + TranslatorStats.zeros([1, 2], lm.hidden_size)


def test_the_fit_picks_the_ridge_that_agrees_most_and_beats_untranslated_on_its_own_data(lm):
    data = blocks(8, seed=1)
    stats = collect_stats(lm, batches(data))
    translators, report = fit_translators(lm, stats, batches(data), [1e-4, 1e-2, 10.0])
    for k in lm.exit_points:
        scores = report["validation_agreement"][str(k)]
        assert scores[repr(report["ridge"][str(k)])] == max(scores.values())
    before = exit_predictions(lm, batches(data))[0]
    lm.attach_translators(translators)  # fit for this model: accepted
    try:
        after = exit_predictions(lm, batches(data))[0]
    finally:
        lm.attach_translators(None)
    agree = lambda p: (p[:-1] == p[-1]).float().mean()  # noqa: E731
    assert agree(after) > agree(before)
    assert torch.equal(after[-1], before[-1])  # the final layer is never translated


# --------------------------------------------------------------------------- one decode everywhere


def test_identity_translators_leave_every_decode_unchanged(lm):
    gates = [FixedGate(lm.exit_points[0]), ConfidenceGate(0.05), PolicyGate(coin_policy(lm), 0.5)]
    plain = [GatedGenerator(lm).generate(PROMPTS, g, GREEDY) for g in gates]
    preds = exit_predictions(lm, batches(blocks(4)))[0]
    lm.attach_translators(ExitTranslators(lm.exit_points, lm.hidden_size, {"model_fingerprint": lm.fingerprint}))
    try:
        for g, before in zip(gates, plain):
            after = GatedGenerator(lm).generate(PROMPTS, g, GREEDY)
            assert [r.token_ids for r in after] == [r.token_ids for r in before]
            assert [r.layers_per_token for r in after] == [r.layers_per_token for r in before]
        assert torch.equal(exit_predictions(lm, batches(blocks(4)))[0], preds)
    finally:
        lm.attach_translators(None)


def test_gated_tokens_are_the_translated_exits_argmax(lm):
    k = lm.exit_points[1]
    translators = random_translators(lm)
    lm.attach_translators(translators)
    try:
        res = GatedGenerator(lm).generate([PROMPTS[0]], FixedGate(k),
                                          GenerationConfig(max_new_tokens=6, kv_mode="none"))[0]
        seq, expected = list(PROMPTS[0]) + [res.token_ids[0]], [res.token_ids[0]]
        for _ in range(5):
            h = lm.forward_exits(torch.tensor([seq])).hidden_states[lm.exit_points.index(k)][:, -1]
            tok = int(lm.adapter.lm_head(translators(lm.adapter.final_norm(h), k)).argmax(-1))
            expected.append(tok)
            seq.append(tok)
        assert res.token_ids == expected
        states = lm.forward_exits(torch.tensor([seq])).hidden_states[lm.exit_points.index(k)][0, len(PROMPTS[0]):]
        untranslated = [int(lm.decode(h).argmax(-1)) for h in states]
        assert untranslated[:5] != expected[1:], "the test maps must change the exit's tokens"
    finally:
        lm.attach_translators(None)


def fitted(lm) -> ExitTranslators:
    """Translators fit on the model's own states (as `greencode fit-exits` fits them)."""
    data = blocks(8, seed=2)
    translators, _ = fit_translators(lm, collect_stats(lm, batches(data)), batches(data), [1e-2])
    return translators


def test_full_gate_with_translators_equals_hf_greedy_and_lossless_drafts_stay_exact(lm):
    references = [hf_greedy(lm, p, LOSSLESS.max_new_tokens) for p in PROMPTS]
    lm.attach_translators(fitted(lm))
    try:
        full = GatedGenerator(lm).generate(PROMPTS, FullGate(), LOSSLESS.model_copy(update={"lossless": False}))
        assert [r.token_ids for r in full] == references
        for gate in (FixedGate(lm.exit_points[0]), FixedGate(lm.exit_points[-1]), ConfidenceGate(0.05),
                     PolicyGate(coin_policy(lm), 0.5)):
            results = LosslessGenerator(lm).generate(PROMPTS, gate, LOSSLESS)
            assert [r.token_ids for r in results] == references, gate.describe()
            drafted = sum(r.speculative["drafted_tokens"] for r in results)
            assert 0 < sum(r.speculative["accepted_tokens"] for r in results) < drafted, gate.describe()
    finally:
        lm.attach_translators(None)


# --------------------------------------------------------------------------- the artifact


def test_translators_for_another_model_are_refused_naming_both_fingerprints(lm):
    other = make_tiny("llama", vocab_size=512, seed=7)
    t = random_translators(other)
    with pytest.raises(TranslatorMismatchError, match=f"{other.fingerprint}.*{lm.fingerprint}"):
        lm.attach_translators(t)
    assert lm.translators is None


def test_saved_translators_load_with_the_model_and_enter_its_digest(tmp_path, tokenizer):
    model_dir = tmp_path / "model"
    lm = save_tiny(model_dir, tokenizer)
    translators = random_translators(lm)
    translators.meta["ridge"] = {"4": 0.01}
    translators.save(tmp_path / "translators")
    spec = ModelConfig(name=str(model_dir), translators=str(tmp_path / "translators"), dtype="float32")
    loaded = load_model(spec)
    assert loaded.translators is not None and loaded.translators.meta["ridge"] == {"4": 0.01}
    h = torch.randn(3, lm.hidden_size)
    torch.testing.assert_close(loaded.decode_exit(h, 4), lm.adapter.lm_head(translators(lm.adapter.final_norm(h), 4)))
    assert load_model(ModelConfig(name=str(model_dir))).translators is None
    plain = model_digest(ModelConfig(name=str(model_dir)))
    assert model_digest(spec) not in (None, plain) and model_digest(spec).startswith(plain)
    translators.save(model_dir)  # saved beside the model: picked up without naming them
    assert load_model(ModelConfig(name=str(model_dir))).translators is not None
    assert load_model(ModelConfig(name=str(model_dir), translators="none")).translators is None
    with pytest.raises(FileNotFoundError, match="fit-exits"):
        load_model(ModelConfig(name=str(model_dir), translators=str(tmp_path / "missing")))
