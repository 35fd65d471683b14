"""Stage identity and the manifest, without Ray: what is reused, what re-runs and why, and what an
unreadable manifest turns into."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from greencode.config import FinetuneConfig, PolicyTrainConfig, result_config
from greencode.digests import tree_digest
from greencode.manifest import WORK_MARKER, Manifest, StageIdentity, StaleWorkError, claim_work_dir, relative_to_run


@pytest.fixture
def run_dir(tmp_path) -> Path:
    root = tmp_path / "run"
    (root / "model").mkdir(parents=True)
    (root / "model" / "weights.bin").write_bytes(b"\x00" * 64)
    (root / "policy.pt").write_bytes(b"policy v1")
    return root


def identity(root: Path, lr: float = 1e-3, policy: str = "sha256:p1") -> StageIdentity:
    config = {"optim": {"lr": lr}, "output_dir": str(root / "report"), "thresholds": [0.5]}
    return StageIdentity(relative_to_run(config, root), {"model": "sha256:m1", "policy": policy})


def finished(root: Path, ident: StageIdentity, stage: str = "evaluate") -> Manifest:
    manifest = Manifest(root / "manifest.json")
    manifest.begin(stage, ident)
    manifest.finish(stage, ident, 0.0, {root / "model": tree_digest(root / "model"),
                                        root / "policy.pt": tree_digest(root / "policy.pt")}, {"ok": True})
    return Manifest(root / "manifest.json")


def test_a_finished_stage_with_the_same_identity_and_artifacts_is_reused(run_dir):
    manifest = finished(run_dir, identity(run_dir))
    decision = manifest.decide("evaluate", identity(run_dir))
    assert decision.reuse
    assert decision.artifact_digests[str(run_dir / "policy.pt")] == tree_digest(run_dir / "policy.pt")
    record = manifest.stages["evaluate"]
    assert record["config"]["output_dir"] == "${run_dir}/report" and record["inputs"]["policy"] == "sha256:p1"
    assert set(record["artifacts"]) == {"${run_dir}/model", "${run_dir}/policy.pt"}
    assert record["versions"]["python"] and "config" not in manifest.data  # per stage, never top-level


def test_a_changed_config_reruns_from_nothing_and_names_the_key(run_dir):
    manifest = finished(run_dir, identity(run_dir))
    decision = manifest.decide("evaluate", identity(run_dir, lr=2e-3))
    assert not decision.reuse and decision.start == "fresh" and decision.same_inputs
    assert "config optim.lr: 0.001 -> 0.002" in decision.reason


def test_a_changed_input_digest_reruns_and_says_which_input(run_dir):
    manifest = finished(run_dir, identity(run_dir))
    decision = manifest.decide("evaluate", identity(run_dir, policy="sha256:p2"))
    assert decision.start == "fresh" and not decision.same_inputs
    assert "input policy: sha256:p1 -> sha256:p2" in decision.reason


def test_an_interrupted_attempt_resumes_only_under_the_same_identity(run_dir):
    manifest = Manifest(run_dir / "manifest.json")
    manifest.begin("finetune", identity(run_dir))
    reread = Manifest(run_dir / "manifest.json")
    assert reread.stages["finetune"]["status"] == "running"
    assert reread.decide("finetune", identity(run_dir)).start == "resume"
    assert reread.decide("finetune", identity(run_dir, lr=5.0)).start == "fresh"
    reread.begin("finetune", identity(run_dir))
    assert reread.stages["finetune"]["attempt"] == 2


def test_a_stage_never_run_here_starts_fresh_unless_the_manifest_was_lost(run_dir):
    assert Manifest(run_dir / "manifest.json").decide("sweep", identity(run_dir)).start == "revalidate"  # no manifest
    manifest = finished(run_dir, identity(run_dir))
    assert manifest.decide("sweep", identity(run_dir)).start == "fresh"  # e.g. switched from train_policy


def test_a_changed_or_missing_artifact_is_republished(run_dir):
    manifest = finished(run_dir, identity(run_dir))
    (run_dir / "policy.pt").write_bytes(b"policy edited by hand")
    decision = manifest.decide("evaluate", identity(run_dir))
    assert decision.start == "republish" and "policy.pt changed since it was recorded" in decision.reason
    shutil.rmtree(run_dir / "model")
    assert "model is missing" in manifest.decide("evaluate", identity(run_dir)).reason


def test_a_moved_run_dir_keeps_its_stages(run_dir, tmp_path):
    finished(run_dir, identity(run_dir))
    moved = tmp_path / "elsewhere"
    shutil.move(run_dir, moved)
    assert Manifest(moved / "manifest.json").decide("evaluate", identity(moved)).reuse


@pytest.mark.parametrize("content, problem", [
    ("", "empty"),
    ('{"format": 2, "stages": {"finetune": {"status": "do', "not valid JSON"),
    ("[1, 2]", "top level is list"),
    ('{"format": 2, "stages": {"finetune": "done"}}', "record of stage 'finetune' is malformed"),
])
def test_an_unreadable_manifest_is_set_aside_with_a_warning(run_dir, caplog, content, problem):
    (run_dir / "manifest.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="greencode.manifest"):
        manifest = Manifest(run_dir / "manifest.json")
    assert manifest.stages == {} and not (run_dir / "manifest.json").exists()
    assert manifest.set_aside.read_text() == content and manifest.set_aside.name.startswith("manifest.json.corrupt-")
    assert problem in caplog.text and manifest.set_aside.name in caplog.text and "re-validated" in caplog.text
    assert manifest.decide("finetune", identity(run_dir)).start == "revalidate"


def test_a_manifest_without_identities_is_kept_aside_and_its_stages_revalidated(run_dir):
    old = {"config": {"run_dir": "x"}, "versions": {}, "stages": {"finetune": {"status": "done", "artifacts": {}}}}
    (run_dir / "manifest.json").write_text(json.dumps(old))
    manifest = Manifest(run_dir / "manifest.json")
    assert manifest.set_aside.name.startswith("manifest.json.old-format-")
    assert manifest.decide("finetune", identity(run_dir)).start == "revalidate"


def test_tree_digest_covers_names_sizes_and_contents_but_not_dotfiles(tmp_path):
    def tree(name: str, files: dict[str, str]) -> str:
        root = tmp_path / name
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        return tree_digest(root)

    base = tree("a", {"x": "12", "sub/y": "3"})
    assert base == tree("b", {"x": "12", "sub/y": "3"}) and base.startswith("sha256:")
    assert base != tree("c", {"x1": "2", "sub/y": "3"})  # the name/content boundary counts
    assert base != tree("d", {"x": "12", "sub/z": "3"})
    assert base == tree("e", {"x": "12", "sub/y": "3", ".x.tmp": "half-written", ".lock": ""})


def test_result_config_leaves_out_only_what_never_changes_a_result():
    cfg = FinetuneConfig(max_failures=3, num_workers=2, output_dir="/x", optim={"lr": 0.5})
    out = result_config(cfg)
    assert out["optim"]["lr"] == 0.5 and out["num_workers"] == 2  # data-parallel ranks change the data order
    assert not {"max_failures", "output_dir", "storage_path", "checkpoint_every"} & set(out)
    ppo = result_config(PolicyTrainConfig(ppo={"cpus_per_env_runner": 0.1, "checkpoint_every": 3}))["ppo"]
    assert "cpus_per_env_runner" not in ppo and "checkpoint_every" not in ppo and "num_env_runners" in ppo


def test_a_work_dir_is_claimed_once_and_refused_to_another_identity(tmp_path):
    mine = StageIdentity({"optim": {"lr": 1e-3}}, {"model": "sha256:m1"})
    work = claim_work_dir(tmp_path / "ckpt", mine, "checkpoints")
    for root in (work, tmp_path / "unmarked"):
        (root / "checkpoint_000001").mkdir(parents=True)
        (root / "checkpoint_000001" / "weights").write_text("1")
    assert claim_work_dir(work, mine, "checkpoints") == work  # the same run resumes
    assert tree_digest(work) == tree_digest(tmp_path / "unmarked")  # the marker never enters an artifact's digest
    with pytest.raises(StaleWorkError, match=r"holds checkpoints of another run \(config optim.lr: 0.001 -> 0.002\)"):
        claim_work_dir(work, StageIdentity({"optim": {"lr": 2e-3}}, {"model": "sha256:m1"}), "checkpoints")
    with pytest.raises(StaleWorkError, match="input model: sha256:m1 -> sha256:m2") as err:
        claim_work_dir(work, StageIdentity({"optim": {"lr": 1e-3}}, {"model": "sha256:m2"}), "checkpoints")
    assert err.value.path == work
    (work / WORK_MARKER).unlink()  # work made before markers, or by another tool: never adopted silently
    with pytest.raises(StaleWorkError, match="no record of the settings it was made with"):
        claim_work_dir(work, mine, "checkpoints")
