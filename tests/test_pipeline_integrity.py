"""Failure injection on the tiny pipeline (real processes, real Ray, one shared run dir).

``chain`` runs ``python -m workflows.pipeline`` four times on one run dir, each run a separate process
that joins this module's local Ray cluster (``RAY_ADDRESS``, as a job on a cluster does), and
SIGKILLs it inside each stage in turn: finetune (after a Ray Train worker was SIGKILLed and training
restarted from its checkpoint), extract (after its first shard), sweep (after its first trial finished
and the second one checkpointed) and evaluate (after its first part). Ray ends a killed driver's
workers; each kill waits until the cluster is idle again. A fifth run, in process, completes. Kills
are triggered by what the stage writes (checkpoint registry, shard, trial and part files, log lines),
never by sleeping. The tests after it change the config or the artifacts of the finished run dir in
process. Sharing one Ray cluster saves a Ray start-up per run; this file replaces the end-to-end test
of tests/test_pipeline.py (every stage, manifest, report files, skipping finished stages).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import save_tiny
from greencode.config import PipelineConfig, validate
from greencode.digests import tree_digest

# The chain is one fixture (about 9-10 min at load 4-20 on the shared 2-core machine): past the suite default.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 4
SWEEP_ALPHAS = (0.1, 0.25)  # one trial each, one at a time
PPO_STEPS = 400  # two PPO iterations of 200 per trial: the kill falls between them


def pipeline_config(root: Path, **sections: Any) -> dict[str, Any]:
    """The tiny pipeline's config as YAML data; ``sections`` are merged into it (``evaluate={...}``)."""
    data: dict[str, Any] = {
        "run_dir": str(root / "run"),
        "model": {"name": str(root / "base")},
        "data": {"corpus": f"dir:{root / 'corpus'}", "glob": "*.py", "val_fraction": 0.2, "test_fraction": 0.2,
                 "seed": 0},
        "stages": ["finetune", "extract", "sweep", "evaluate"],
        "finetune": {"seq_len": 32, "batch_size": 2, "grad_accum": 1, "max_steps": MAX_STEPS, "num_workers": 1,
                     "cpus_per_worker": 0.5, "report_every": 1, "val_every": MAX_STEPS, "val_batches": 1,
                     "checkpoint_every": 1, "max_failures": 1, "optim": {"lr": 1e-3}},
        "extract": {"num_samples": 12, "samples_per_shard": 4, "tokens_per_sample": 4},
        "heldout_samples": 4,
        "policy": {"ppo": {"total_env_steps": PPO_STEPS, "train_batch_size": 200, "minibatch_size": 50, "num_epochs": 1,
                           "num_env_runners": 1, "envs_per_env_runner": 1, "cpus_per_env_runner": 0.25,
                           "checkpoint_every": 1}},
        "sweep": {"alpha": list(SWEEP_ALPHAS), "beta": [0.5], "gamma": [0.5], "max_concurrent": 1},
        "evaluate": {"num_samples": 4, "gates": ["full", "fixed", "policy"], "thresholds": [0.5], "batch_size": 2,
                     "num_workers": 1, "generation": {"max_new_tokens": 4}},
    }
    for name, values in sections.items():
        data[name] = {**data[name], **values} if isinstance(values, dict) else values
    return data


# --------------------------------------------------------------------------- processes


def session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (a pipeline started here and any process it forked itself)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except ProcessLookupError:
                continue
    return pids


def wait_until_ray_is_idle(timeout: float = 60) -> None:
    """Until every CPU of this module's Ray is free again: the killed driver's workers are gone."""
    import ray

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        assert time.monotonic() < deadline, f"Ray still busy after the kill: {ray.available_resources()}"
        time.sleep(0.1)


class Attempt:
    """One command in its own session, joined to this module's Ray, its output in a log file."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        import ray

        self.log_path = log_path
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_DEDUP_LOGS": "0",
               "PYTHONUNBUFFERED": "1"}
        with log_path.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 300) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                raise AssertionError(f"exited ({self.proc.returncode}) before {what}:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {what} after {timeout} s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the pipeline (and whatever it forked), then wait until Ray has ended its workers."""
        sid = self.proc.pid
        deadline = time.monotonic() + 30
        while (pids := session_pids(sid)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.poll()
            time.sleep(0.1)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL
        wait_until_ray_is_idle()


def pipeline_argv(config_path: Path) -> list[str]:
    return ["-m", "workflows.pipeline", "--config", str(config_path)]


# --------------------------------------------------------------------------- run-dir observations


def stages_of(run: Path) -> dict[str, dict[str, Any]]:
    path = run / "manifest.json"
    return json.loads(path.read_text())["stages"] if path.is_file() else {}


def latest_checkpoint(run: Path) -> str | None:
    """The newest checkpoint Ray Train has registered (written once it is complete)."""
    try:
        snapshot = json.loads((run / "finetune" / "lite" / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return None
    latest = snapshot.get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name")


def sweep_trials(run: Path) -> dict[float, Path]:
    """The sweep's trial dirs by their alpha."""
    trials = {}
    for params in (run / "sweep" / "reward_sweep" / "tune").glob("*/params.json"):
        try:
            trials[json.loads(params.read_text())["trial"]["params"]["alpha"]] = params.parent
        except (OSError, ValueError, KeyError):
            continue  # being written
    return trials


def sweep_restorable_mid_trial(run: Path) -> bool:
    """The second trial has a checkpoint and Tune's experiment state was saved after it (what a
    restore reads); the first trial finished before the second started (one trial at a time)."""
    trials = sweep_trials(run)
    second = trials.get(SWEEP_ALPHAS[1])
    checkpoints = list(second.glob("checkpoint_*")) if second else []
    states = list((run / "sweep" / "reward_sweep" / "tune").glob("experiment_state-*.json"))
    return SWEEP_ALPHAS[0] in trials and bool(checkpoints and states) and (max(s.stat().st_mtime for s in states)
                                             > max(c.stat().st_mtime for c in checkpoints))


def mtimes(paths) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in paths}


def debris(run: Path) -> list[str]:
    """Temp files, set-aside versions and trash anywhere in the run dir."""
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*")
                  if re.search(r"\.(tmp|old)$|\.tmp-|\.trash-", p.name))


@dataclass
class Chain:
    root: Path
    run: Path
    config_path: Path
    logs: list[str] = field(default_factory=list)
    after_kill: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage killed -> what was on disk
    second: dict[str, Any] = field(default_factory=dict)
    final_output: str = ""


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tokenizer, ray_local) -> Chain:
    root = tmp_path_factory.mktemp("integrity")
    save_tiny(root / "base", tokenizer)
    (root / "corpus").mkdir()
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]:
        shutil.copy(f, root / "corpus" / f.name)
    config_path = root / "pipeline.yaml"
    config_path.write_text(yaml.safe_dump(pipeline_config(root)))
    c = Chain(root, root / "run", config_path)
    run = c.run

    def attempt() -> Attempt:
        return Attempt(pipeline_argv(config_path), root / f"attempt{len(c.logs) + 1}.log")

    def killed(a: Attempt, stage: str, **extra: Any) -> None:
        a.kill()
        c.logs.append(a.log())
        c.after_kill[stage] = {"stages": stages_of(run), "model": (run / "model").exists(),
                               "policy": (run / "policy" / "exit_policy.pt").exists(),
                               "results": (run / "report" / "results.json").exists(), **extra}

    # 1: finetune. A second pipeline on the run dir is refused; a Ray Train worker is SIGKILLed once a
    # checkpoint is registered (Train restarts the worker group from it); the pipeline is SIGKILLed
    # as soon as the restarted worker has resumed.
    a = attempt()
    a.wait_for(lambda: "[1/5] finetune ..." in a.log(), "the finetune stage")
    started = time.monotonic()
    second = subprocess.run([sys.executable, *pipeline_argv(config_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    c.second = {"returncode": second.returncode, "output": second.stdout + second.stderr,
                "seconds": time.monotonic() - started, "first_alive": a.proc.poll() is None, "first_pid": a.proc.pid}
    a.wait_for(lambda: latest_checkpoint(run), "a registered checkpoint")
    worker = int(re.findall(r"\(RayTrainWorker pid=(\d+)\)", a.log())[-1])
    assert "ray::" in Path(f"/proc/{worker}/cmdline").read_text()  # a Ray worker process of this test's Ray
    os.kill(worker, signal.SIGKILL)
    a.wait_for(lambda: re.search(r"resuming at step \d", a.log()), "the restarted worker resuming")
    killed(a, "finetune", killed_worker=worker)

    # 2: extract, after its first shard
    a = attempt()
    first_shard = run / "shards" / "train" / "shard-00000.parquet"
    a.wait_for(first_shard.exists, "the first shard")
    killed(a, "extract", shard_mtime=mtimes([first_shard]))

    # 3: sweep, once its first trial has finished and the second one has checkpointed
    a = attempt()
    a.wait_for(lambda: sweep_restorable_mid_trial(run), "a checkpoint of the second trial", timeout=400)
    trials = sweep_trials(run)
    killed(a, "sweep", first_trial=(trials[SWEEP_ALPHAS[0]] / "result.json").read_text(),
           second_trial=(trials[SWEEP_ALPHAS[1]] / "result.json").read_text())

    # 4: evaluate, after its first batch
    a = attempt()
    parts = run / "report" / "parts"
    a.wait_for(lambda: parts.is_dir() and any(parts.rglob("*.json")), "the first evaluation part")
    killed(a, "evaluate", part_mtimes=mtimes(parts.rglob("*.json")))

    # 5: completes (in this process)
    from workflows import pipeline

    cfg = validate(PipelineConfig, pipeline_config(root))
    with captured_logs() as lines:
        outcome = pipeline.run(cfg)
    c.final_output = "\n".join([*lines, pipeline.final_message(cfg, outcome)])
    c.logs.append(c.final_output)
    return c


@contextmanager
def captured_logs() -> Iterator[list[str]]:
    """The greencode loggers' INFO+ messages while the block runs."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.name}: {record.getMessage()}")

    logger, handler = logging.getLogger("greencode"), Collect(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def in_process_config(c: Chain, **sections: Any) -> PipelineConfig:
    return validate(PipelineConfig, pipeline_config(c.root, **sections))


# --------------------------------------------------------------------------- kills


def test_a_second_pipeline_on_the_same_run_dir_fails_at_once_naming_the_first(chain):
    s = chain.second
    assert s["first_alive"] and s["returncode"] != 0
    assert f"is in use by another pipeline (pid {s['first_pid']} on this host" in s["output"]
    assert "Traceback" not in s["output"] and s["seconds"] < 30  # no waiting on the lock, no Ray started
    # the next attempt took over the lock the SIGKILLed one could not release
    assert f"taking over the lock of pid {s['first_pid']} on this host" in chain.logs[1]


def test_a_killed_train_worker_restarts_from_its_checkpoint_and_reaches_the_step_count(chain):
    pid, resumed = re.search(r"RayTrainWorker pid=(\d+)\)[^\n]*resuming at step (\d+)", chain.logs[0]).groups()
    assert int(pid) != chain.after_kill["finetune"]["killed_worker"]  # a new worker ...
    assert 1 <= int(resumed) < MAX_STEPS  # ... from the checkpoint: not from scratch, not after the end
    exit_plan = json.loads((chain.run / "model" / "exit_plan.json").read_text())
    assert exit_plan["step"] == MAX_STEPS  # what an uninterrupted run trains


def test_sigkill_in_each_stage_then_rerun_completes_without_redoing_finished_stages(chain):
    final = stages_of(chain.run)
    assert set(final) == {"finetune", "extract", "extract_heldout", "sweep", "evaluate"}
    assert all(rec["status"] == "done" and rec["artifacts"] and rec["config"] for rec in final.values())
    assert final["finetune"]["versions"]["torch"]
    order = ["finetune", "extract", "sweep", "evaluate"]
    for i, killed in enumerate(order):
        seen = chain.after_kill[killed]["stages"]
        # nothing from the killed attempt is trusted: the stage is on record as unfinished ...
        assert seen[killed]["status"] == "running" and "artifacts" not in seen[killed], killed
        # ... and every stage finished before the kill is never run again
        for done in order[:i]:
            assert seen[done]["status"] == "done" and seen[done]["finished_at"] == final[done]["finished_at"], done
    completed_in = {1: ["finetune"], 2: ["extract", "extract_heldout"], 3: ["sweep"], 4: ["evaluate"]}
    for attempt, log in enumerate(chain.logs):
        for stage in [s for k, names in completed_in.items() if k < attempt for s in names]:
            assert f"] {stage}: done earlier" in log, (attempt + 1, stage)
        for stage in completed_in.get(attempt, []):
            assert f"] {stage} ... (" in log and f"] {stage} finished in" in log, (attempt + 1, stage)
    assert not chain.after_kill["finetune"]["model"]  # training never finished: no model published
    assert not chain.after_kill["sweep"]["policy"] and not chain.after_kill["evaluate"]["results"]

    # the killed stages resumed from their own finished work units
    assert re.search(r"resuming at step [1-9]", chain.logs[1])
    assert re.search(r"12 samples in 3 shards; [0-2] to write", chain.logs[2])
    assert mtimes(map(Path, chain.after_kill["extract"]["shard_mtime"])) == chain.after_kill["extract"]["shard_mtime"]
    assert mtimes(map(Path, chain.after_kill["evaluate"]["part_mtimes"])) == chain.after_kill["evaluate"]["part_mtimes"]

    # the final run wrote the whole report, says what it evaluated (by digest) and how to serve it,
    # and left no temp file or half-swapped artifact
    report = chain.run / "report"
    for name in ("results.json", "results.csv", "report.md", "quality_vs_layers.png"):
        assert (report / name).is_file(), name
    rows = json.loads((report / "results.json").read_text())["rows"]
    assert {r["family"] for r in rows} == {"base", "full", "fixed", "policy"}
    policy = chain.run / "policy" / "exit_policy.pt"
    assert f"evaluated: policy {policy} ({tree_digest(policy)})" in chain.final_output
    assert f"evaluated: model {chain.run / 'model'} ({tree_digest(chain.run / 'model')})" in chain.final_output
    assert f"greencode serve --model {chain.run / 'model'} --policy {policy}" in chain.final_output
    assert debris(chain.run) == []


def test_a_sweep_killed_midway_keeps_its_finished_trial_and_resumes_the_other(chain):
    trials = sweep_trials(chain.run)
    assert sorted(trials) == list(SWEEP_ALPHAS)  # each trial once: none started over under a new trial dir
    killed = chain.after_kill["sweep"]
    assert (trials[SWEEP_ALPHAS[0]] / "result.json").read_text() == killed["first_trial"]  # not run again
    at_kill = [json.loads(line) for line in killed["second_trial"].splitlines()]
    assert at_kill and at_kill[-1]["env_steps"] < PPO_STEPS  # the second trial was mid-way ...
    assert "resuming the sweep in" in chain.logs[3]  # ... Tuner.restore picked it up ...
    results = [json.loads(line) for line in (trials[SWEEP_ALPHAS[1]] / "result.json").read_text().splitlines()]
    first_after = results[len(at_kill)]
    assert first_after["iterations_since_restore"] == 1  # ... restored from its checkpoint ...
    steps = [r["env_steps"] for r in results]
    assert steps == sorted(set(steps)) and steps[-1] >= PPO_STEPS  # ... not from zero: no PPO iteration done twice
    best = json.loads((chain.run / "sweep" / "reward_sweep" / "best.json").read_text())
    assert best["trials"] == len(SWEEP_ALPHAS) and best["failed_trials"] == []


# --------------------------------------------------------------------------- identity


def finished_at(run: Path) -> dict[str, str]:
    return {k: v["finished_at"] for k, v in stages_of(run).items()}


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {k for k in after if after[k] != before.get(k)}


def test_an_unchanged_config_reruns_nothing(chain, ray_local, caplog):
    from workflows import pipeline

    before = stages_of(chain.run)
    with caplog.at_level(logging.INFO, logger="greencode.pipeline"):
        pipeline.run(in_process_config(chain))
    assert stages_of(chain.run) == before  # same identities from the YAML/CLI and the in-process config
    assert caplog.text.count("done earlier") == 5


def test_changed_thresholds_rerun_only_evaluate_and_keep_its_finished_parts(chain, ray_local):
    from workflows import pipeline

    before = finished_at(chain.run)
    parts = mtimes((chain.run / "report" / "parts").rglob("*.json"))
    pipeline.run(in_process_config(chain, evaluate={"thresholds": [0.5, 0.9]}))
    assert changed(before, finished_at(chain.run)) == {"evaluate"}
    rows = json.loads((chain.run / "report" / "results.json").read_text())["rows"]
    assert sorted(r["param"] for r in rows if r["family"] == "policy") == [0.5, 0.9]
    assert mtimes(map(Path, parts)) == parts  # the unchanged settings were not recomputed
    assert stages_of(chain.run)["evaluate"]["config"]["thresholds"] == [0.5, 0.9]


def test_a_grown_sweep_grid_reruns_the_sweep_and_its_dependents_only_training_the_new_point(chain, ray_local):
    from workflows import pipeline

    before = finished_at(chain.run)
    summary = json.loads((chain.run / "sweep" / "reward_sweep" / "best.json").read_text())
    pipeline.run(in_process_config(chain, evaluate={"thresholds": [0.5, 0.9]},
                                   sweep={"alpha": [*SWEEP_ALPHAS, 0.5]}))
    rerun = changed(before, finished_at(chain.run))
    assert "sweep" in rerun and rerun <= {"sweep", "evaluate"}  # evaluate only if the best policy changed
    grown = json.loads((chain.run / "sweep" / "reward_sweep" / "best.json").read_text())
    assert sorted(grown["reused"]) == sorted(summary["ran"]) and len(grown["ran"]) == 1
    assert stages_of(chain.run)["sweep"]["identity"] == grown["run_identity"]  # the manifest carries the sweep's own


RETRAINED = {"stages": ["finetune", "extract", "train_policy", "evaluate"], "evaluate": {"thresholds": [0.5, 0.9]}}


def test_a_retrained_policy_reruns_evaluate_and_the_report_names_its_digest(chain, ray_local):
    from workflows import pipeline

    policy = chain.run / "policy" / "exit_policy.pt"
    old = tree_digest(policy)
    before = finished_at(chain.run)
    cfg = in_process_config(chain, **RETRAINED)  # the policy now comes from train_policy instead of the sweep
    outcome = pipeline.run(cfg)
    assert changed(before, finished_at(chain.run)) == {"train_policy", "evaluate"}
    new = tree_digest(policy)
    assert new != old
    results = json.loads((chain.run / "report" / "results.json").read_text())
    assert results["digests"] == {"model": tree_digest(chain.run / "model"),
                                  "base_model": tree_digest(chain.root / "base"), "policy": new}
    assert f"policy `{new}`" in (chain.run / "report" / "report.md").read_text()
    assert stages_of(chain.run)["evaluate"]["inputs"]["policy"] == new
    assert new in pipeline.final_message(cfg, outcome)


def test_a_corrupt_manifest_is_set_aside_and_the_stages_revalidated_from_their_artifacts(chain, ray_local, caplog):
    from workflows import pipeline

    cfg = in_process_config(chain, **RETRAINED)
    kept = {name: tree_digest(chain.run / name) for name in ("model", "shards/train", "policy/exit_policy.pt")}
    parts = mtimes((chain.run / "report" / "parts").rglob("*.json"))
    (chain.run / "manifest.json").write_text('{"format": 2, "stages": {"finetune": {"sta')
    with caplog.at_level(logging.INFO):
        pipeline.run(cfg)
    aside = list(chain.run.glob("manifest.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text().startswith('{"format": 2')
    assert f"set aside as {aside[0].name}; every stage is re-validated from its artifacts" in caplog.text
    # complete artifacts were re-validated by their workflows' own checks, not rebuilt; evaluation parts
    # are keyed by the contents they came from, so the report was rebuilt from them without generating
    assert {name: tree_digest(chain.run / name) for name in kept} == kept
    assert "already trained for" in caplog.text and "is complete" in caplog.text and "already trained;" in caplog.text
    assert mtimes(map(Path, parts)) == parts
    stages = stages_of(chain.run)
    assert all(rec["status"] == "done" for rec in stages.values()) and len(stages) == 5
    assert stages["evaluate"]["inputs"]["policy"] == kept["policy/exit_policy.pt"]


def test_a_nan_in_a_shard_stops_train_policy_before_ray_work_naming_file_row_and_column(chain, tmp_path):
    from workflows import train_policy

    shards = tmp_path / "shards"
    shutil.copytree(chain.run / "shards" / "train", shards)
    bad = shards / "shard-00001.parquet"
    table = pq.read_table(bad)
    hidden = table.column("hidden").to_pylist()
    hidden[3] = [float("nan"), *hidden[3][1:]]
    field_index = table.schema.get_field_index("hidden")
    pq.write_table(table.set_column(field_index, table.schema.field("hidden"),
                                    pa.array(hidden, table.schema.field("hidden").type)), bad)
    with pytest.raises(SystemExit, match=re.escape(f"error: {bad}: row 3, column hidden: NaN or inf")):
        train_policy.main(["--set", f"shards_dir={shards}", "--set", f"output_path={tmp_path / 'p.pt'}",
                           "--set", f"storage_path={tmp_path / 'rllib'}"])
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "rllib").exists()
