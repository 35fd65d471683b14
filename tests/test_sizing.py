"""The demo's time budget on a slower machine (issue 20): the measured probe sizes the model-bound work."""

from __future__ import annotations

import json
import math

import pytest

from conftest import make_tiny
from greencode.config import PipelineConfig, load_config, validate
from greencode.sizing import probe_seconds, size

SIZING = {"budget_min": 14.0, "reference_probe_s": 1.0,
          "reference_minutes": {"finetune": 6.0, "extract": 2.0, "evaluate": 5.0}}


def pipeline(**extra) -> PipelineConfig:
    return validate(PipelineConfig, {"sizing": SIZING, "finetune": {"max_steps": 30},
                                     "extract": {"num_samples": 120, "samples_per_shard": 30},
                                     "heldout_samples": 30, "evaluate": {"num_samples": 400}, **extra})


def test_a_machine_as_fast_as_the_reference_runs_the_preset_as_written():
    cfg = pipeline()
    sized, line = size(cfg, probe_s=1.04)
    assert sized == cfg and "projected 13.5 min, within the 14 min budget" in line


def test_a_slower_machine_shrinks_the_work_to_the_budget_and_says_so():
    cfg = pipeline()
    sized, line = size(cfg, probe_s=1.6)  # 13 min x 1.6 = 20.8 min projected
    assert 10 <= sized.finetune.max_steps < 30 and sized.extract.num_samples < 120
    assert sized.heldout_samples == 30  # its floor: one shard
    assert 200 <= sized.evaluate.num_samples < 400
    share = sized.finetune.max_steps / 30
    minutes = 1.6 * (6 * share + 2 * (sized.extract.num_samples + sized.heldout_samples) / 150
                     + 5 * sized.evaluate.num_samples / 400)
    assert minutes <= 14 and "projected 20.8 min, over the 14 min budget" in line
    assert f"finetune.max_steps 30 -> {sized.finetune.max_steps}" in line and line.endswith("fits)")
    assert sized.finetune.seq_len == cfg.finetune.seq_len and sized.evaluate.gates == cfg.evaluate.gates


def test_the_line_names_only_what_changed_in_the_stages_that_run():
    cfg = pipeline(stages=["extract", "train_policy", "evaluate"])
    _, line = size(cfg, probe_s=1.6)
    assert "finetune" not in line.split("budget:")[1] and "extract.num_samples 120 ->" in line
    assert "heldout_samples" not in line  # at its floor already: unchanged


def test_the_floors_hold_however_slow_the_machine():
    sized, line = size(pipeline(), probe_s=50.0)
    assert (sized.finetune.max_steps, sized.extract.num_samples, sized.heldout_samples,
            sized.evaluate.num_samples) == (10, 30, 30, 200)
    assert "still over it: the floors hold" in line


def test_the_probe_times_a_training_step():
    lm = make_tiny("llama")
    seconds = probe_seconds(lm, "fp32", batch_size=2, seq_len=16, rounds=2)
    assert 0 < seconds < 10 and math.isfinite(seconds)
    assert all(p.grad is None for p in lm.model.parameters())  # leaves the model as it found it


def test_the_pipeline_keeps_the_probe_of_its_run_dir(tmp_path, caplog):
    """A rerun sizes from run_dir/sizing.json (same sizes, same stage identities) without probing again:
    the model named here does not exist, so a new probe would fail."""
    from workflows.pipeline import _sized

    (tmp_path / "sizing.json").write_text(json.dumps({"probe_s": 1.6}))
    cfg = pipeline(model={"name": str(tmp_path / "no-such-model")})
    with caplog.at_level("INFO", "greencode.pipeline"):
        sized = _sized(cfg, tmp_path)
    assert sized == size(cfg, 1.6)[0] and sized.finetune.max_steps < 30
    assert "over the 14 min budget" in caplog.text
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        _sized(cfg, tmp_path / "fresh")


def test_the_demo_preset_is_sized_and_as_written_on_its_reference_machine():
    from workflows.pipeline import preset_path

    cfg = load_config(PipelineConfig, preset_path("demo"))
    assert cfg.sizing is not None and cfg.evaluate.num_samples >= cfg.sizing.min_eval_samples
    sized, line = size(cfg, cfg.sizing.reference_probe_s)
    assert sized == cfg and "the preset runs as written" in line
