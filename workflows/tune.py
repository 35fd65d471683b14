"""The Ray Tune driver both sweeps run on (`greencode sweep`, `greencode lite-sweep`): which trials train,
which are reused, when a killed sweep is restored, and what a finished sweep leaves behind.

A sweep has an identity (its settings and its inputs' digests, :class:`greencode.manifest.StageIdentity`)
and so has each of its trials (the settings it trains with and the same digests); a trial's key names
its identity. Under the sweep's dir ``storage_path/name``:

- ``trials/<key>.json``: a finished trial (its grid values, scores and artifact). A sweep whose grid
  holds a trial of that key reuses it without training: a value added to the grid trains the new
  points only, a changed base setting changes every key and trains them all.
- ``tune/``: the Tune experiment of the trials not finished yet, recording the sweep identity it runs
  for. A killed sweep is restored from it (``Tuner.restore``) only by a sweep of the same identity;
  for any other it is set aside as ``tune.set-aside-<time>`` (the log names what changed) and a new
  experiment runs. On a cluster whose nodes share no disk the experiment lives on object storage
  instead (``Sweep.tune_storage``, a URI Tune's trials write to from any node); there a stale one is
  deleted, object stores having no rename.
- ``results.csv`` (the current grid's trials, a ``pareto`` flag and whether each was reused),
  ``pareto.csv``, ``best.json`` and the sweep's export of the best trial (at its ``output_path``), each
  written atomically once the trials are in. A rerun whose ``best.json`` has the same identity and
  whose export is unchanged returns it as it is.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from greencode.atomic import write_atomic, write_json
from greencode.config import ConfigError
from greencode.digests import tree_digest
from greencode.manifest import StageIdentity, StaleWorkError, claim_work_dir
from greencode.scoring import pareto_front
from greencode.storage import Store, join
from workflows.common import init_ray

log = logging.getLogger("greencode.tune")

EXPERIMENT = "tune"
TRIALS = "trials"
SUMMARY = "best.json"


def key_of(identity: StageIdentity, prefix: str = "trial") -> str:
    """A short stable name for an identity (a trial's record, a trial's run dir)."""
    return f"{prefix}-{identity.digest.split(':', 1)[1][:12]}"


@dataclass(frozen=True)
class Trial:
    """One point of a sweep: ``params`` name it in the results, ``config`` is what its trainable gets
    (as ``config["trial"]["config"]``), ``key`` names its identity (settings + input digests)."""

    key: str
    params: dict[str, Any]
    config: dict[str, Any]


@dataclass
class TunePlan:
    """How the trials not finished yet run: decided once Ray is up (resources depend on the cluster)."""

    trainable: Any
    max_concurrent: int
    run_config: dict[str, Any] = field(default_factory=dict)  # more tune.RunConfig settings


@dataclass
class Sweep:
    """What one sweep brings to the driver; the driver does the rest the same way for every sweep.

    ``plan(pending)``: the Tune trainable and concurrency for the trials to train. ``keep(trial,
    result, trial_dir)``: a finished Tune result's scores and the path of its artifact (after
    copying it out of Tune's checkpoint where it lives there). ``pareto``: two score columns and
    whether more or less is better on each. ``pick_best(rows)``: the best row. ``export(best)``:
    write the best trial's artifact at ``output_path`` (atomically) and return the summary's own entries.
    """

    what: str
    out_dir: Path
    identity: StageIdentity
    trials: list[Trial]
    output_path: Path
    plan: Callable[[list[Trial]], TunePlan]
    keep: Callable[[Trial, Any, Path], tuple[dict[str, Any], Path]]
    pareto: tuple[tuple[str, Literal["max", "min"]], tuple[str, Literal["max", "min"]]]
    pick_best: Callable[[list[dict[str, Any]]], dict[str, Any]]
    export: Callable[[dict[str, Any]], dict[str, Any]]
    constants: dict[str, Any] = field(default_factory=dict)  # param_space entries shared by every trial
    tune_storage: str | None = None  # where the Tune experiment lives (a URI); None: in out_dir


def run(sweep: Sweep) -> dict[str, Any]:
    """Reuse the finished sweep, or train the trials not finished yet (restoring a killed experiment of
    the same identity), then write results, Pareto front, best export and summary; returns the summary."""
    keys = [t.key for t in sweep.trials]
    if len(set(keys)) != len(keys):
        twice = next(t.params for t in sweep.trials if keys.count(t.key) > 1)
        raise ConfigError(f"grid: the settings {twice} appear twice (repeated value?)")
    done = finished(sweep)
    if done is not None:
        log.info("%s %s already finished with these settings; delete %s to rerun", sweep.what,
                 sweep.out_dir.name, sweep.out_dir)
        return done
    records = {t.key: rec for t in sweep.trials if (rec := _record(sweep.out_dir, t)) is not None}
    pending = [t for t in sweep.trials if t.key not in records]
    if records:
        log.info("%s: reusing %d finished trial(s) of the same settings; %d to train", sweep.what, len(records),
                 len(pending))
    failed: list[dict[str, Any]] = []
    if pending:
        for trial, result in _fit(sweep, pending):
            if result.error is not None:
                failed.append({"trial": trial.key, "params": trial.params, "error": str(result.error)})
                continue
            trial_dir = sweep.out_dir / TRIALS / trial.key
            scores, artifact = sweep.keep(trial, result, trial_dir)
            records[trial.key] = {"key": trial.key, "params": trial.params, "scores": scores,
                                  "artifact": os.path.relpath(artifact, sweep.out_dir)}
            write_json(sweep.out_dir / TRIALS / f"{trial.key}.json", records[trial.key])
    return _summarize(sweep, records, [t.key for t in pending], failed)


def finished(sweep: Sweep) -> dict[str, Any] | None:
    """The summary of the last run when it ran with this identity, no trial failed and its export is unchanged."""
    path = sweep.out_dir / SUMMARY
    if not (path.is_file() and sweep.output_path.exists()):
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        return None
    if summary.get("run_identity") != sweep.identity.digest or summary.get("failed_trials"):
        return None
    if summary.get("output_digest") != tree_digest(sweep.output_path):
        log.info("%s was replaced since the sweep wrote it: exporting the best trial again", sweep.output_path)
        return None
    return summary


def _record(out_dir: Path, trial: Trial) -> dict[str, Any] | None:
    """The finished trial of this key, when its record is readable and its artifact is still there."""
    path = out_dir / TRIALS / f"{trial.key}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        log.warning("%s is unreadable: training the trial again", path)
        return None
    if not (out_dir / record.get("artifact", "")).exists():
        log.warning("the artifact of %s is gone: training the trial again", path)
        return None
    return record


def _experiment(sweep: Sweep) -> Path | str:
    """The Tune experiment dir, claimed for this sweep's identity; another sweep's is set aside (deleted on
    object storage, which has no rename)."""
    location = join(sweep.tune_storage, EXPERIMENT) if sweep.tune_storage else sweep.out_dir / EXPERIMENT
    try:
        return claim_work_dir(location, sweep.identity, "the Tune experiment")
    except StaleWorkError as err:
        if isinstance(location, str):
            log.info("%s; deleting it and starting a new one", err)
            Store(location).delete("")
        else:
            aside = location.with_name(f"{EXPERIMENT}.set-aside-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}")
            log.info("%s; setting it aside as %s and starting a new one", err, aside.name)
            os.rename(location, aside)
        return claim_work_dir(location, sweep.identity, "the Tune experiment")


def _fit(sweep: Sweep, pending: list[Trial]) -> list[tuple[Trial, Any]]:
    """Run (or restore) the Tune experiment of the pending trials; returns each one's Tune result."""
    from ray import tune

    experiment = _experiment(sweep)
    init_ray()
    plan = sweep.plan(pending)
    if tune.Tuner.can_restore(experiment):
        log.info("resuming the sweep in %s: finished trials are kept, the others continue from their last "
                 "checkpoint", experiment)
        tuner = tune.Tuner.restore(str(experiment), plan.trainable, resume_unfinished=True, resume_errored=True)
    else:
        log.info("%s: %d trial(s), up to %d at a time", sweep.what, len(pending), plan.max_concurrent)
        space = [{"key": t.key, "params": t.params, "config": t.config} for t in pending]
        tuner = tune.Tuner(
            plan.trainable,
            param_space={**sweep.constants, "trial": tune.grid_search(space)},
            tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=sweep.tune_storage or str(sweep.out_dir),
                                      verbose=1, **plan.run_config),
        )
    by_key = {t.key: t for t in pending}
    return [(by_key[r.config["trial"]["key"]], r) for r in tuner.fit() if r.config["trial"]["key"] in by_key]


def _summarize(sweep: Sweep, records: dict[str, dict[str, Any]], ran: list[str],
               failed: list[dict[str, Any]]) -> dict[str, Any]:
    """results.csv, pareto.csv, the best trial's export and best.json, from the current grid's finished trials."""
    import pandas as pd

    rows = [{**records[t.key]["params"], **records[t.key]["scores"], "trial": t.key, "reused": t.key not in ran}
            for t in sweep.trials if t.key in records]
    if not rows:
        raise RuntimeError(f"every {sweep.what} trial failed; the first error: {failed[0]['error']}")
    if failed:
        log.warning("%d of %d %s trials failed; the best of the %d finished ones is exported (a rerun retries the "
                    "failed ones). First error: %s", len(failed), len(sweep.trials), sweep.what, len(rows),
                    failed[0]["error"])
    (x, x_better), (y, y_better) = sweep.pareto
    frame = pd.DataFrame(rows)
    xs, ys = frame[x].to_numpy(dtype=float), frame[y].to_numpy(dtype=float)
    frame["pareto"] = pareto_front(xs if x_better == "max" else -xs, ys if y_better == "min" else -ys)
    out = sweep.out_dir
    write_atomic(out / "results.csv", frame.to_csv(index=False))
    write_atomic(out / "pareto.csv", frame[frame["pareto"]].sort_values(x).to_csv(index=False))
    best = sweep.pick_best(rows)
    record = records[best["trial"]]
    summary = {
        **sweep.export({**best, "artifact": out / record["artifact"]}),
        "best_trial": best["trial"],
        "results_csv": str(out / "results.csv"),
        "pareto_csv": str(out / "pareto.csv"),
        "tensorboard": f"tensorboard --logdir {out}",
        "trials": len(rows),
        "ran": [k for k in ran if k in records],  # finished by Tune this time: trained, resumed or (LITE) rescored
        "reused": [r["trial"] for r in rows if r["reused"]],
        "failed_trials": failed,
        "run_identity": sweep.identity.digest,
        "output_digest": tree_digest(sweep.output_path),
    }
    write_json(out / SUMMARY, summary)
    log.info("best of %d %s trials: %s (%s)", len(rows), sweep.what, records[best["trial"]]["params"], best["trial"])
    return summary
