"""Shards: round trip, atomic/validated reads with clear errors, and extraction invariants on a tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import make_tiny
from greencode.extraction import ShardSample, extract_rows, meta_for, optimal_exit
from greencode.shards import (
    ShardError,
    ShardMeta,
    build_table,
    is_complete,
    load_shards,
    read_meta,
    read_shard,
    shard_path,
    write_shard,
)

META = ShardMeta(exit_points=[2, 4, 6], hidden_size=5, num_layers=8, model_fingerprint="abc123")


def toy_rows(num_samples=2, tokens=3, meta=META, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(num_samples):
        for t in range(tokens):
            preds = rng.integers(0, 10, meta.num_exits).tolist()
            final = int(rng.integers(0, 10))
            rows.append({"sample_id": f"s{s}", "token_index": t,
                         "hidden": rng.normal(size=(meta.num_exits, meta.hidden_size)),
                         "exit_predictions": preds, "final_token": final, "dataset_token": -1,
                         "optimal_exit": optimal_exit(preds, final)})
    return rows


def test_optimal_exit_is_first_match_or_final():
    assert optimal_exit([3, 7, 7], 7) == 1
    assert optimal_exit([7, 7, 7], 7) == 0
    assert optimal_exit([1, 2, 3], 9) == 3


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, dtype):
    meta = ShardMeta(**{**META.__dict__, "hidden_dtype": dtype})
    rows = toy_rows(meta=meta)
    path = write_shard(build_table(meta, rows), tmp_path / "shard-00000.parquet")
    assert not list(tmp_path.glob(".*tmp"))  # temp file renamed away
    data = read_shard(path)
    assert data.meta == meta
    assert data.hidden.shape == (6, 3, 5) and data.hidden.dtype == np.dtype(dtype)
    np.testing.assert_allclose(data.hidden, np.stack([r["hidden"] for r in rows]).astype(dtype))
    assert data.exit_predictions.tolist() == [r["exit_predictions"] for r in rows]
    assert data.optimal_exit.tolist() == [r["optimal_exit"] for r in rows]
    assert data.episode_bounds().tolist() == [[0, 3], [3, 6]]
    assert data.exit_layers().tolist() == [2, 4, 6, 8]


def test_corrupt_and_foreign_files_are_named(tmp_path):
    bad = tmp_path / "shard-00000.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ShardError, match="shard-00000.parquet is not a readable Parquet file"):
        read_shard(bad)
    import pyarrow as pa
    import pyarrow.parquet as pq

    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    with pytest.raises(ShardError, match="foreign.parquet is not a GreenCode shard"):
        read_meta(foreign)
    with pytest.raises(ShardError, match="shard not found"):
        read_shard(tmp_path / "missing.parquet")
    assert not is_complete(bad) and not is_complete(foreign)
    good = write_shard(build_table(META, toy_rows()), shard_path(tmp_path, 3))
    assert good.name == "shard-00003.parquet" and is_complete(good)


def test_shards_from_different_models_do_not_mix(tmp_path):
    a = write_shard(build_table(META, toy_rows()), tmp_path / "shard-00000.parquet")
    other = ShardMeta(**{**META.__dict__, "model_fingerprint": "zzz"})
    b = write_shard(build_table(other, toy_rows(meta=other)), tmp_path / "shard-00001.parquet")
    with pytest.raises(ShardError, match="another model"):
        load_shards([a, b])


def test_overflowing_hidden_states_are_refused():
    rows = toy_rows()
    rows[0]["hidden"][0, 0] = 1e6  # beyond float16
    with pytest.raises(ShardError, match="overflow"):
        build_table(META, rows)


def test_extract_rows_matches_a_plain_forward(tokenizer):
    lm = make_tiny("llama", tokenizer=tokenizer)
    samples = [ShardSample("a", list(range(100, 120)), [5, 6]), ShardSample("b", list(range(300, 307)), [])]
    rows = extract_rows(lm, samples, tokens_per_sample=4)
    assert [r["token_index"] for r in rows] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [r["dataset_token"] for r in rows[:4]] == [5, 6, -1, -1]
    generated = [r["final_token"] for r in rows[:4]]
    with torch.no_grad():
        fwd = lm.forward_exits(torch.tensor([samples[0].context_ids + generated]))
        full_logits = lm.decode(fwd.hidden_states[-1])[0]
    for t, row in enumerate(rows[:4]):
        pos = len(samples[0].context_ids) + t - 1
        # the observation for token t sits at the position that predicts it, at every exit point
        assert int(full_logits[pos].argmax()) == row["final_token"]
        for e in range(len(lm.exit_points)):
            np.testing.assert_allclose(row["hidden"][e], fwd.hidden_states[e][0, pos].numpy(), rtol=1e-5, atol=1e-5)
        assert row["optimal_exit"] == optimal_exit(row["exit_predictions"], row["final_token"])
    table = build_table(meta_for(lm), rows)
    assert table.num_rows == 8


@pytest.fixture
def shard_with(tmp_path):
    """A valid shard rewritten by plain pyarrow with one bad value (as bit rot or a foreign writer would)."""
    meta = ShardMeta(exit_points=[2, 4], hidden_size=3, num_layers=6, model_fingerprint="f")
    rng = np.random.default_rng(0)
    rows = [{"sample_id": "s0", "token_index": t, "hidden": rng.normal(size=(2, 3)), "exit_predictions": [1, 2],
             "final_token": 2, "dataset_token": -1, "optimal_exit": 1} for t in range(4)]
    path = write_shard(build_table(meta, rows), tmp_path / "shard-00000.parquet")

    def corrupt(column: str, row: int, value: Any) -> Path:
        table = pq.read_table(path)
        values = table.column(column).to_pylist()
        if column == "hidden":
            values[row] = [value, *values[row][1:]]
        else:
            values[row] = value
        table = table.set_column(table.schema.get_field_index(column), table.schema.field(column),
                                 pa.array(values, table.schema.field(column).type))
        pq.write_table(table, path)
        return path

    return corrupt


@pytest.mark.parametrize("column, value, problem", [
    ("hidden", float("nan"), "NaN or inf"), ("hidden", float("inf"), "NaN or inf"), ("hidden", None, "null"),
    ("final_token", None, "null"), ("exit_predictions", None, "null"), ("sample_id", None, "null"),
])
def test_a_shard_with_a_nan_inf_or_null_is_rejected_naming_file_row_and_column(shard_with, column, value, problem):
    path = shard_with(column, 2, value)
    with pytest.raises(ShardError) as err:
        read_shard(path)
    assert f"{path}: row 2, column {column}: {problem}" in str(err.value)
    with pytest.raises(ShardError, match="row 2"):
        load_shards([path])  # what PPO and scoring read through
