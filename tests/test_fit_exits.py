"""`greencode fit-exits` on Ray Data: partial statistics from two workers add up to the one-pass statistics,
the artifact loads with the model, and the pipeline stage re-runs when (and only when) the model changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_tiny
from greencode.config import FitExitsConfig, ModelConfig, PipelineConfig, validate
from greencode.modeling import load_model
from greencode.translators import META_FILE, collect_stats
from workflows import fit_exits, pipeline

pytestmark = pytest.mark.ray

DATA = {"corpus": "stdlib", "max_files": 60, "seed": 0, "val_fraction": 0.2, "test_fraction": 0.2}


def fit_config(model_dir, out, **extra) -> FitExitsConfig:
    return validate(FitExitsConfig, {"model": {"name": str(model_dir)}, "data": DATA, "seq_len": 32,
                                     "train_tokens": 320, "validation_tokens": 64, "heldout_tokens": 64,
                                     "blocks_per_task": 3, "output_dir": str(out), **extra})


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_two_ray_data_workers_sum_to_the_one_pass_statistics(model_dir, tmp_path, ray_local):
    cfg = fit_config(model_dir, tmp_path / "t", num_workers=2)
    lm = load_model(cfg.model, cfg.exits)
    train = fit_exits._blocks(cfg, lm.tokenizer)["train"]
    assert len(train) == 10  # four chunks of three blocks (the last one shorter): both workers get some
    summed = fit_exits.summed_stats(cfg, train, lm.exit_points, lm.hidden_size)
    one_pass = collect_stats(lm, [train.batch(slice(0, len(train)), torch.device("cpu"))])
    assert summed.count == one_pass.count == 320
    for name in ("xtx", "xty", "sum_x", "sum_y"):
        np.testing.assert_allclose(getattr(summed, name), getattr(one_pass, name), rtol=1e-7, atol=1e-6)


def test_fit_exits_writes_translators_the_model_loads_and_reuses_them(model_dir, tmp_path, ray_local, capsys):
    out = tmp_path / "translators"
    fit_exits.main(["--model", str(model_dir), "--output-dir", str(out), "--set", "seq_len=32",
                    "--set", "train_tokens=320", "--set", "validation_tokens=64", "--set", "heldout_tokens=64",
                    "--set", f"data.max_files={DATA['max_files']}", "--set", "data.val_fraction=0.2",
                    "--set", "data.test_fraction=0.2", "--set", "ridge_grid=[0.01,1.0]"])
    printed = json.loads(capsys.readouterr().out)
    meta = json.loads((out / META_FILE).read_text())
    assert printed["train_tokens"] == meta["train_tokens"] == 320
    assert set(meta["ridge"]) == {"4", "6", "10"} and set(meta["ridge"].values()) <= {0.01, 1.0}
    assert meta["heldout"]["tokens"] > 0 and len(meta["heldout"]["translated"]) == 3
    lm = load_model(ModelConfig(name=str(model_dir), translators=str(out)))
    assert lm.translators is not None and lm.translators.meta["model_fingerprint"] == lm.fingerprint
    stamp = (out / META_FILE).stat().st_mtime_ns
    cfg = fit_config(model_dir, out, ridge_grid=[0.01, 1.0])
    assert fit_exits.run(cfg)["train_tokens"] == 320 and (out / META_FILE).stat().st_mtime_ns == stamp  # reused


def test_the_pipeline_stage_reruns_when_the_model_changes_and_not_otherwise(tmp_path, tokenizer, ray_local):
    model = tmp_path / "model"
    save_tiny(model, tokenizer)
    cfg = validate(PipelineConfig, {"run_dir": str(tmp_path / "run"), "model": {"name": str(model)}, "data": DATA,
                                    "stages": ["fit_exits"],
                                    "fit_exits": {"seq_len": 32, "train_tokens": 128, "validation_tokens": 32,
                                                  "heldout_tokens": 0, "ridge_grid": [0.01]}})
    meta = tmp_path / "run" / "translators" / META_FILE

    def fitted_at() -> int:
        pipeline.run(cfg)
        return json.loads(meta.read_text())["time_s"], meta.stat().st_mtime_ns

    first = fitted_at()
    assert fitted_at() == first  # unchanged: reused
    save_tiny(model, tokenizer, arch="opt")  # another model in the same place
    assert fitted_at() != first
    lm = load_model(ModelConfig(name=str(model), translators=str(meta.parent)))
    assert lm.translators.meta["model_fingerprint"] == lm.fingerprint


def test_bad_input_is_one_clear_error_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match=r"config error: .*ridge_grid.0: Input should be greater than 0"):
        fit_exits.main(["--set", "ridge_grid=[0]", "--output-dir", str(tmp_path / "t")])
    with pytest.raises(SystemExit, match="error: cannot load model"):
        fit_exits.main(["--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "t")])
    assert not (tmp_path / "t").exists()


def test_translators_written_to_a_uri_are_published_there_and_load_from_it(model_dir, tmp_path, ray_local,
                                                                           s3_server, monkeypatch, capsys):
    """Any stage command's output path may name object storage: it is written in a scratch copy and
    published by pointer when the run finishes; a bucket that does not exist fails before any work."""
    from greencode.storage import Store

    monkeypatch.setenv("GREENCODE_CACHE", str(tmp_path / "cache"))
    args = ["--model", str(model_dir), "--set", "seq_len=32", "--set", "train_tokens=128",
            "--set", "validation_tokens=32", "--set", "heldout_tokens=0", "--set", "ridge_grid=[0.01]",
            "--set", f"data.max_files={DATA['max_files']}"]
    with pytest.raises(SystemExit, match=r"error: s3://no-such-bucket/run: cannot write to it"):
        fit_exits.main([*args, "--output-dir", "s3://no-such-bucket/run/translators"])
    assert not (tmp_path / "cache").exists() and not Path("s3:").exists()  # nothing written
    bucket = s3_server.bucket()
    fit_exits.main([*args, "--output-dir", f"s3://{bucket}/run/translators"])
    assert json.loads(capsys.readouterr().out)["train_tokens"] == 128
    assert Store(f"s3://{bucket}/run").pointer("translators")["kind"] == "dir"
    lm = load_model(ModelConfig(name=str(model_dir), translators=f"s3://{bucket}/run/translators"))
    assert lm.translators is not None and lm.translators.meta["model_fingerprint"] == lm.fingerprint
