"""Bootstrap intervals: the per-sample statistics give back the corpus metrics exactly, the interval covers the
point and shrinks with n, and the paired difference of identical rows is exactly [0, 0]."""

from __future__ import annotations

import random

import numpy as np
import pytest

from greencode.evaluation.intervals import (
    bootstrap,
    mean_stats,
    percentile_interval,
    quality_stats,
    resample_weights,
)
from greencode.metrics import quality_metrics

SNIPPETS = ["x = y + 1", "return self.value", "for i in range(10):", "if not items:", "def f(a, b):",
            "total += step", "print(x)", "    self.value = start", "import os", "result = os.path.join(a, b)",
            "while n > 0: n -= 1", "value = compute(a)", "pass", "a[i] = b[j]", "return x if y else z"]


def _pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    refs = [rng.choice(SNIPPETS) for _ in range(n)]
    preds = [r if rng.random() < 0.4 else rng.choice(SNIPPETS) for r in refs]
    return preds, refs


def test_full_weight_statistics_give_back_every_corpus_metric():
    preds, refs = _pairs(40)
    langs = ["python"] * 30 + ["java"] * 10
    pred_ids = [[ord(c) for c in p][:6] for p in preds]
    ref_ids = [[ord(c) for c in r][:6] for r in refs]
    want = quality_metrics(preds, refs, langs, pred_ids, ref_ids)
    got = bootstrap(quality_stats(preds, refs, langs, pred_ids, ref_ids), np.ones((1, len(refs))))
    assert set(got) == set(want)
    for key, value in want.items():
        if value is None:
            assert np.isnan(got[key][0]), key
        else:
            assert got[key][0] == pytest.approx(value, abs=1e-9), key


def test_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (30, 300, 3000):
        values = rng.random(n)
        stats = [mean_stats("m", values)]
        lo, hi = percentile_interval(bootstrap(stats, resample_weights(n, 1000, seed=1))["m"])
        assert lo < values.mean() < hi
        widths.append(hi - lo)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]


def test_paired_difference_of_identical_columns_is_zero_and_seeded():
    preds, refs = _pairs(25, seed=2)
    weights = resample_weights(len(refs), 200, seed=7)
    a = bootstrap(quality_stats(preds, refs, ["python"] * 25, None, None), weights)
    b = bootstrap(quality_stats(list(preds), list(refs), ["python"] * 25, None, None), weights)
    for key in a:
        assert percentile_interval(a[key] - b[key]) in ((0.0, 0.0), (None, None)), key
    assert np.array_equal(weights, resample_weights(len(refs), 200, seed=7))
    assert weights.sum(axis=1).tolist() == [25] * 200  # each resample draws n samples
    assert percentile_interval(np.array([np.nan, np.nan])) == (None, None)
