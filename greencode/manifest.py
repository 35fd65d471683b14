"""A run dir's ``manifest.json`` and stage identity: a finished stage is reused only when rerunning it
would start from exactly the same things.

A stage's identity is its resolved config plus the content digests of the artifacts it reads (the
model it fine-tunes or extracts from, the shards, the policy it evaluates). The manifest keeps, per
stage, the identity, config and input digests it ran with and the digests of what it produced. A
stage is reused only when its identity and its artifacts' digests still match; a changed config or
input re-runs it, and since its new artifacts digest differently, everything downstream re-runs too.
Paths under the run dir enter the identity relative to it, so a run dir moved (or mounted elsewhere)
keeps its stages.

An unreadable manifest is set aside (``manifest.json.corrupt-<time>``) with a warning; the stages
are then re-validated from their artifacts (each stage's own completeness checks) and recorded anew.

The workflows guard their own work dirs the same way, with or without the pipeline
(:func:`claim_work_dir`): a dir of checkpoints or shards records the identity it was made for, and a
run with another identity refuses to resume from it (:class:`StaleWorkError`) instead of mixing them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from greencode.atomic import write_json
from greencode.config import ConfigError
from greencode.digests import tree_digest

log = logging.getLogger(__name__)

FORMAT = 2
RUN_DIR = "${run_dir}"
WORK_MARKER = ".greencode-work.json"  # in a work dir: the identity its contents were made for


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def relative_to_run(value: Any, run_dir: Path | str) -> Any:
    """``value`` (JSON) with every path under ``run_dir`` (a local path or a URI) written as ``${run_dir}/...``."""
    root = str(run_dir).rstrip("/") if isinstance(run_dir, str) else str(run_dir)
    if isinstance(value, str) and (value == root or value.startswith(root + os.sep)):
        return RUN_DIR + value[len(root):]
    if isinstance(value, dict):
        return {k: relative_to_run(v, run_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [relative_to_run(v, run_dir) for v in value]
    return value


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for mod in ("greencode", "torch", "transformers", "ray", "gymnasium"):
        try:
            out[mod] = version(mod)
        except PackageNotFoundError:
            out[mod] = "not installed"
    return out


@dataclass(frozen=True)
class StageIdentity:
    """What a stage's result depends on: its resolved config (JSON) and its inputs' digests by role."""

    config: dict[str, Any]
    inputs: dict[str, str | None] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        blob = json.dumps({"config": self.config, "inputs": self.inputs}, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def changes_from(self, record: dict[str, Any]) -> list[str]:
        """What differs from a manifest record, in words (``config optim.lr: 0.001 -> 0.002``)."""
        out = [f"config {key}: {old!r} -> {new!r}" for key, old, new in _diff(record.get("config"), self.config)]
        before = record.get("inputs") or {}
        for role in sorted(set(before) | set(self.inputs)):
            if before.get(role) != self.inputs.get(role):
                out.append(f"input {role}: {_short(before.get(role))} -> {_short(self.inputs.get(role))}")
        return out or ["identity format changed"]


class StaleWorkError(ConfigError):
    """A work dir holds another run's partial results; resuming from them would mix two runs."""

    def __init__(self, path: Path | str, what: str, changes: list[str]) -> None:
        self.path = path
        super().__init__(f"{path} holds {what} of another run ({'; '.join(changes)}): delete it to start over, "
                         "or rerun with the settings it was made with")


def claim_work_dir(path: str | Path, identity: StageIdentity, what: str) -> Path | str:
    """Record in ``path`` (a local dir, or a prefix on object storage) the identity its ``what``
    (checkpoints, shards ...) belong to, or raise StaleWorkError when it already holds work of another
    identity, or unrecorded work."""
    from greencode.storage import Store, is_uri

    path = str(path) if is_uri(path) else Path(path)
    store = Store(path)
    raw = store.read_bytes(WORK_MARKER)
    if raw is not None:
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if isinstance(record, dict) and record.get("identity") == identity.digest:
            return path
        changes = identity.changes_from(record) if isinstance(record, dict) else ["its record is unreadable"]
        raise StaleWorkError(path, what, changes)
    if any(not name.startswith(".") for name in store.children("")):
        raise StaleWorkError(path, what, ["no record of the settings it was made with"])
    record = {"identity": identity.digest, "config": identity.config, "inputs": identity.inputs}
    store.write_bytes(WORK_MARKER, json.dumps(record, indent=2, default=str).encode())
    return path


def _short(digest: str | None) -> str:
    return digest[:19] if digest else "none"


def _diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [(prefix.rstrip(".") or "<root>", old, new)]


@dataclass
class Decision:
    """Whether a stage's recorded result is reused; if not, why, and what its next run may start from.

    ``start``: ``resume`` (an attempt with this identity was interrupted: keep its outputs and
    checkpoints), ``republish`` (its recorded artifacts went missing or changed: drop them, keep its
    checkpoints), ``fresh`` (its identity changed, or it never ran here: drop its artifacts, and its
    checkpoints unless ``same_inputs``, leaving those to the workflow's own check, claim_work_dir),
    ``revalidate`` (the manifest was lost: the stage's own checks decide what on disk is complete).
    ``same_inputs``: a fresh start whose inputs are those of the recorded run.
    """

    reuse: bool
    reason: str
    start: Literal["reuse", "resume", "republish", "fresh", "revalidate"]
    same_inputs: bool = False
    artifact_digests: dict[str, str] = field(default_factory=dict)


class Manifest:
    """``run_dir/manifest.json``: per stage, the identity it ran with, when, and what it produced."""

    def __init__(self, path: str | Path, on_save: Callable[[Path], None] | None = None) -> None:
        """``on_save``: called with the path after every save (a run dir on object storage uploads it)."""
        self.path = Path(path)
        self.on_save = on_save
        self.run_dir = self.path.parent.resolve()
        self.set_aside: Path | None = None
        self.data: dict[str, Any] = {"format": FORMAT, "stages": {}}
        # No (readable) manifest: what is on disk may still be good work whose record was lost.
        self.recovering = not self.path.exists()
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        try:
            data = json.loads(raw)
            problem = self._problem(data)
        except ValueError as err:  # JSON and UTF-8 errors
            data, problem = None, "empty" if not raw.strip() else f"not valid JSON ({err})"
        if problem is None:
            self.data["stages"] = data["stages"]
            return
        self.recovering = True
        label = "old-format" if problem == "old format" else "corrupt"
        aside = self.path.with_name(f"{self.path.name}.{label}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}")
        os.rename(self.path, aside)
        self.set_aside = aside
        if label == "old-format":
            log.info("%s has no stage identities (older GreenCode): kept as %s; every stage is re-validated from its "
                     "artifacts", self.path, aside.name)
        else:
            log.warning("%s is unreadable (%s): set aside as %s; every stage is re-validated from its artifacts",
                        self.path, problem, aside.name)

    @staticmethod
    def _problem(data: Any) -> str | None:
        if not isinstance(data, dict):
            return f"top level is {type(data).__name__}, not an object"
        stages = data.get("stages")
        if not isinstance(stages, dict):
            return "'stages' is missing or not an object"
        if data.get("format") != FORMAT:
            return "old format"
        for name, rec in stages.items():
            if not (isinstance(rec, dict) and isinstance(rec.get("identity"), str)
                    and isinstance(rec.get("artifacts", {}), dict)):
                return f"the record of stage {name!r} is malformed"
        return None

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    def artifact_path(self, rel: str) -> Path:
        """The local path of a recorded artifact (``${run_dir}/...``)."""
        return Path(rel.replace(RUN_DIR, str(self.run_dir), 1))

    def _rel(self, path: Path) -> str:
        return relative_to_run(str(Path(path).resolve()), self.run_dir)

    def decide(self, stage: str, identity: StageIdentity) -> Decision:
        """Reuse the stage's recorded result, or say why it must run and what it may start from."""
        rec = self.stages.get(stage)
        if not rec:
            if self.recovering:
                lost = f"{self.set_aside.name} was unreadable" if self.set_aside else "no manifest yet"
                return Decision(False, f"no record ({lost}): whatever it finds on disk is re-validated", "revalidate")
            return Decision(False, "no record of an earlier run", "fresh")
        if rec["identity"] != identity.digest:
            changes = identity.changes_from(rec)
            return Decision(False, "changed since it ran: " + "; ".join(changes), "fresh",
                            same_inputs=(rec.get("inputs") or {}) == identity.inputs)
        if rec.get("status") != "done":
            return Decision(False, f"an attempt started {rec.get('started_at')} did not finish: resuming it", "resume")
        digests = {}
        for rel, recorded in rec.get("artifacts", {}).items():
            path = self.artifact_path(rel)
            if not path.exists():
                return Decision(False, f"its artifact {path} is missing", "republish")
            digests[str(path)] = tree_digest(path)
            if digests[str(path)] != recorded:
                return Decision(False, f"its artifact {path} changed since it was recorded", "republish")
        return Decision(True, f"done earlier ({rec.get('time_s')} s, finished {rec.get('finished_at')})", "reuse",
                        artifact_digests=digests)

    def begin(self, stage: str, identity: StageIdentity) -> None:
        """Record an attempt before it starts: a kill leaves 'running' with the identity it ran for."""
        rec = self.stages.get(stage) or {}
        attempt = rec.get("attempt", 0) + 1 if rec.get("identity") == identity.digest else 1
        self.stages[stage] = {
            "status": "running", "identity": identity.digest, "config": identity.config, "inputs": identity.inputs,
            "attempt": attempt, "started_at": _now(), "host": socket.gethostname(), "pid": os.getpid(),
            "versions": versions(),
        }
        self.save()

    def finish(self, stage: str, identity: StageIdentity, started: float, artifacts: dict[Path, str],
               result: Any) -> None:
        """Mark the attempt done with its artifacts' digests (``artifacts``: path -> digest)."""
        rec = self.stages[stage]
        if rec.get("identity") != identity.digest:
            raise RuntimeError(f"manifest: stage {stage} finished for an identity it did not begin with")
        rec.update(status="done", finished_at=_now(), time_s=round(time.time() - started, 1),
                   artifacts={self._rel(p): d for p, d in artifacts.items()}, result=result)
        self.save()

    def save(self) -> None:
        self.data["updated_at"] = _now()
        write_json(self.path, self.data)
        if self.on_save is not None:
            self.on_save(self.path)
