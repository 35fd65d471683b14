"""The whole pipeline on a tiny model: every stage, a manifest, and resume without redoing work."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from conftest import save_tiny
from greencode.config import PipelineConfig, validate

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = root / "base"
    save_tiny(model_dir, tokenizer)
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(stdlib.glob("*.py"))[:40]:
        shutil.copy(f, corpus / f.name)
    return root, model_dir, corpus


def tiny_config(root: Path, model_dir: Path, corpus: Path, stages) -> PipelineConfig:
    return validate(PipelineConfig, {
        "run_dir": str(root / "run"),
        "model": {"name": str(model_dir)},
        "data": {"corpus": f"dir:{corpus}", "glob": "*.py", "val_fraction": 0.2, "test_fraction": 0.2, "seed": 0},
        "stages": stages,
        "finetune": {"seq_len": 32, "batch_size": 2, "grad_accum": 1, "max_steps": 3, "num_workers": 1,
                     "cpus_per_worker": 0.5, "report_every": 1, "val_every": 3, "val_batches": 1,
                     "checkpoint_every": 3, "optim": {"lr": 1e-3}},
        "extract": {"num_samples": 8, "samples_per_shard": 4, "tokens_per_sample": 4},
        "heldout_samples": 4,
        "policy": {"ppo": {"total_env_steps": 400, "train_batch_size": 200, "minibatch_size": 50, "num_epochs": 1,
                           "num_env_runners": 1, "envs_per_env_runner": 1, "cpus_per_env_runner": 0.25}},
        "evaluate": {"num_samples": 4, "gates": ["full", "fixed", "policy"], "thresholds": [0.5], "batch_size": 4,
                     "num_workers": 1},
    })


def test_pipeline_end_to_end_then_resume(ray_local, tiny_setup):
    from workflows import pipeline

    root, model_dir, corpus = tiny_setup
    # First only the first two stages, as if the job had been killed after them...
    first = tiny_config(root, model_dir, corpus, ["finetune", "extract"])
    pipeline.run(first)
    manifest = json.loads((root / "run" / "manifest.json").read_text())
    done_before = {k: v["finished_at"] for k, v in manifest["stages"].items()}
    assert set(done_before) == {"finetune", "extract", "extract_heldout"}

    # ...then the whole pipeline: finished stages are skipped, the rest run.
    full = tiny_config(root, model_dir, corpus, ["finetune", "extract", "train_policy", "evaluate"])
    outcome = pipeline.run(full)
    manifest = json.loads(Path(outcome["manifest"]).read_text())
    stages = manifest["stages"]
    assert {k: stages[k]["finished_at"] for k in done_before} == done_before
    assert set(stages) == {"finetune", "extract", "extract_heldout", "train_policy", "evaluate"}
    assert all(s["status"] == "done" and s["artifacts"] for s in stages.values())
    assert manifest["versions"]["torch"] and "config" in manifest

    report = root / "run" / "report"
    for name in ("results.json", "results.csv", "report.md", "quality_vs_layers.png"):
        assert (report / name).is_file(), name
    rows = json.loads((report / "results.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert {r["family"] for r in rows} == {"base", "full", "fixed", "policy"}
    message = pipeline.final_message(full, outcome)
    assert "greencode serve" in message and "--policy" in message

    # A changed artifact is noticed and its stage redone.
    policy = Path(outcome["plans"]["train_policy"].output_path)
    policy.unlink()
    mf = pipeline.Manifest(root / "run" / "manifest.json", full)
    assert not mf.finished("train_policy") and mf.finished("extract")
