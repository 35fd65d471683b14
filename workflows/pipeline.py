"""The main job: corpus -> LITE model -> shards -> exit policy -> evaluation report.

    python -m workflows.pipeline --preset demo            # what `make demo` runs
    python -m workflows.pipeline --config my.yaml --set run_dir=runs/x
    ray job submit --working-dir . -- .venv/bin/python -m workflows.pipeline --preset demo

Each stage writes a plain artifact under ``run_dir`` (HF model dir, Parquet shards, policy
file, report dir) and is recorded in ``run_dir/manifest.json`` with its identity: the resolved
stage config and the content digests of its inputs (greencode.manifest). A rerun reuses a stage
only when its identity and its artifacts' digests are unchanged; a changed config or input re-runs
it and, through the new artifacts' digests, everything downstream. An interrupted stage resumes
from its own checkpoints, a stage whose identity changed starts from nothing. Every artifact is
written to a temporary path and renamed, so a killed run never leaves one a later stage trusts;
a lock (``run_dir/pipeline.lock``) keeps a second pipeline out of the run dir.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from greencode.atomic import atomic_path, recover, remove_path, write_atomic, write_json
from greencode.config import ModelConfig, PipelineConfig, load_config, result_config, validate
from greencode.digests import tree_digest
from greencode.locks import RunDirBusy, RunDirLock
from greencode.manifest import Decision, Manifest, StageIdentity, StaleWorkError, relative_to_run
from greencode.modeling import model_digest
from greencode.storage import ObjectLock, Store, is_uri, join, scratch_dir
from workflows.common import PRESETS, ConfigCommand, cli_errors, init_ray

log = logging.getLogger("greencode.pipeline")

MANIFEST = "manifest.json"
SIZING = "sizing.json"  # the probe this run dir was sized with: a rerun keeps the sizes (and stage identities)


def preset_path(name: str) -> Path:
    """The shipped preset file ``name`` (a PipelineConfig YAML; --config files and --set go over it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Path(str(resources.files("workflows") / "presets" / f"{name}.yaml"))


def stage_preset(name: str, stage: str) -> dict[str, Any]:
    """Preset ``name``'s config of one stage (``finetune``, ``extract``, ``train_policy``, ``sweep``,
    ``evaluate``), as the pipeline would run it: what ``greencode <stage> --preset NAME`` starts from."""
    return stage_configs(load_config(PipelineConfig, preset_path(name)))[stage].model_dump(mode="json")


# --------------------------------------------------------------------------- stage plans


def run_root(cfg: PipelineConfig) -> Path:
    """Where the stages write: the run dir, or for a run dir on object storage its local scratch copy,
    from which each finished stage's artifacts are published to the URI."""
    return scratch_dir(cfg.run_dir) if is_uri(cfg.run_dir) else Path(cfg.run_dir).resolve()


def stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
    """Stage configs with the shared model/data/exits and every artifact path under run_dir.

    On object storage the stages write under the local scratch copy, while what other nodes load (the
    model, translators and policy, fetched where they are loaded) and Ray Train's checkpoints are
    named by their URIs."""
    root = run_root(cfg)

    def reached(rel: str) -> str:
        return join(cfg.run_dir, rel) if is_uri(cfg.run_dir) else str(root / rel)

    finetuned = "finetune" in cfg.stages
    dtype = {"dtype": cfg.inference_dtype} if cfg.inference_dtype else {}
    base = ModelConfig(**{**cfg.model.model_dump(), **dtype})  # as extraction and evaluation run it
    model = ModelConfig(**{**base.model_dump(), "name": reached("model")}) if finetuned else base
    translators = str(root / "translators")
    if "fit_exits" in cfg.stages:  # every stage after it decodes exits through the translators it fits
        fitted, model = model, ModelConfig(**{**model.model_dump(), "translators": reached("translators")})
    else:
        fitted = model
    shared = {"data": cfg.data.model_dump(), "exits": cfg.exits.model_dump()}

    def section(name: str, **fields: Any) -> dict[str, Any]:
        return {**getattr(cfg, name).model_dump(mode="json"), **fields}

    from greencode.config import (
        EvalConfig,
        ExtractConfig,
        FinetuneConfig,
        FitExitsConfig,
        PolicyTrainConfig,
        SweepConfig,
    )

    policy_path = str(root / "policy" / "exit_policy.pt")
    # env runners and Tune trials on any node read the shards at their URIs; the learner (in the driver)
    # keeps its RLlib checkpoints in scratch, Tune its experiment at the URI
    policy = section("policy", shards_dir=reached("shards/train"), eval_shards_dir=reached("shards/heldout"),
                     output_path=policy_path, storage_path=str(root / "rllib"))
    tune_storage = {"tune_storage_path": reached("tune")} if is_uri(cfg.run_dir) else {}
    return {
        "finetune": validate(FinetuneConfig, section("finetune", model=cfg.model.model_dump(), **shared,
                                                      storage_path=reached("finetune"),
                                                      output_dir=str(root / "model"))),
        "fit_exits": validate(FitExitsConfig, section("fit_exits", model=fitted.model_dump(), **shared,
                                                      output_dir=translators)),
        "extract": validate(ExtractConfig, section("extract", model=model.model_dump(), **shared, split="train",
                                                   output_dir=str(root / "shards" / "train"))),
        "extract_heldout": validate(ExtractConfig, section("extract", model=model.model_dump(), **shared,
                                                           split="validation", num_samples=cfg.heldout_samples,
                                                           output_dir=str(root / "shards" / "heldout"))),
        "train_policy": validate(PolicyTrainConfig, policy),
        "sweep": validate(SweepConfig, section("sweep", base=policy, storage_path=str(root / "sweep"),
                                               **tune_storage)),
        "evaluate": validate(EvalConfig, section(
            "evaluate", model=model.model_dump(), base_model=base.model_dump() if finetuned else None,
            data=cfg.data.model_dump(), exits=cfg.exits.model_dump(),
            policy_path=reached("policy/exit_policy.pt") if {"train_policy", "sweep"} & set(cfg.stages) else None,
            output_dir=str(root / "report"))),
    }


@dataclass
class Stage:
    """One stage as the pipeline sees it: what runs on which config, what it reads and leaves behind."""

    name: str
    config: Any
    run: Callable[[Any], Any]
    artifacts: list[Path]  # what a finished run leaves; their digests go into the manifest
    inputs: dict[str, Path | ModelConfig | None]  # role -> upstream artifact or external model, digested
    # Work dirs the workflow resumes from (checkpoints, finished shards): local paths, or URIs where Ray
    # writes them to object storage itself. The workflow records in a local one which identity it belongs
    # to and refuses another's (StaleWorkError); evaluation parts need no entry here, they are keyed by
    # the contents they were computed from.
    work: list[Path | str]
    # The workflow's own run identity, where it keeps one (the sweep: its best.json and Tune experiment
    # record it); the manifest then records the stage with that same identity.
    identity: Callable[[Any], StageIdentity] | None = None
    # Published beside the artifacts on object storage, outside the manifest (the whole report dir).
    outputs: list[Path] = field(default_factory=list)


def _stages(cfg: PipelineConfig, plans: dict[str, Any]) -> list[Stage]:
    """The configured stages in pipeline order."""
    from workflows import evaluate, extract, finetune, fit_exits, sweep, train_policy

    ft, ev, pol = plans["finetune"], plans["evaluate"], plans["train_policy"]
    model: Path | ModelConfig = Path(ft.output_dir) if "finetune" in cfg.stages else cfg.model
    train_shards, heldout_shards = Path(plans["extract"].output_dir), Path(plans["extract_heldout"].output_dir)
    shards = {"train_shards": train_shards, "heldout_shards": heldout_shards}
    policy = Path(pol.output_path)
    fx = plans["fit_exits"]
    translators = Path(fx.output_dir) if "fit_exits" in cfg.stages else None
    decoded = {"model": model, "translators": translators}  # what the stages that decode exits read
    out = [
        Stage("finetune", ft, finetune.run, [Path(ft.output_dir)], {"base_model": cfg.model},
              [ft.storage_path if is_uri(ft.storage_path) else Path(ft.storage_path)]),
        Stage("fit_exits", fx, fit_exits.run, [Path(fx.output_dir)], {"model": model}, []),
        Stage("extract", plans["extract"], extract.run, [train_shards], decoded, [train_shards]),
        Stage("extract_heldout", plans["extract_heldout"], extract.run, [heldout_shards], decoded,
              [heldout_shards]),
        Stage("train_policy", pol, train_policy.run, [policy, policy.with_suffix(".json")], shards,
              [Path(pol.storage_path)]),
        Stage("sweep", plans["sweep"], sweep.run, [policy], shards,
              [Path(plans["sweep"].storage_path), *filter(None, [plans["sweep"].tune_storage_path])],
              sweep.run_identity),
        Stage("evaluate", ev, evaluate.run, [Path(ev.output_dir) / "results.json"],
              {**decoded, "base_model": ev.base_model, "policy": policy if ev.policy_path else None},
              [], outputs=[Path(ev.output_dir)]),
    ]
    wanted = set(cfg.stages) | ({"extract_heldout"} if "extract" in cfg.stages else set())
    return [s for s in out if s.name in wanted]


def _identity(stage: Stage, root: Path, digests: dict[str, str | None], uri: str | None = None) -> StageIdentity:
    """The stage's resolved config (run-dir relative, operational fields left out) and its inputs'
    digests (cached in ``digests``); or the workflow's own identity where it keeps one."""
    if stage.identity is not None:
        return stage.identity(stage.config)
    inputs: dict[str, str | None] = {}
    for role, source in stage.inputs.items():
        if source is None:
            continue
        key = str(source.resolve()) if isinstance(source, Path) else f"model:{source.name}"
        if key not in digests:
            if isinstance(source, Path):
                digests[key] = tree_digest(source) if source.exists() else None
            else:
                digests[key] = model_digest(source)
        inputs[role] = digests[key]
    config = relative_to_run(result_config(stage.config), root)
    return StageIdentity(relative_to_run(config, uri) if uri else config, inputs)


def _drop(stage: Stage, paths: list[Path | str], why: str, remote: RemoteRun | None = None) -> None:
    for path in paths:
        if isinstance(path, str):  # work Ray keeps on object storage
            if Store(path).exists():
                log.info("%s: removing %s (%s)", stage.name, path, why)
                Store(path).delete("")
            continue
        if path.exists():
            log.info("%s: removing %s (%s)", stage.name, path, why)
        remove_path(path)
        if remote is not None:
            remote.withdraw(path)


def _prepare(stage: Stage, decision: Decision, remote: RemoteRun | None = None) -> None:
    """Drop what a stage must not start from: stale artifacts, and work made from other inputs.

    Work made from the same inputs with other settings is left to the workflow's own check, which
    keeps what still applies (a longer fine-tuning run continues from the shorter one's checkpoints).
    """
    if decision.start == "republish":
        _drop(stage, [*stage.artifacts], "changed since it was recorded", remote)
    if decision.start == "fresh":
        _drop(stage, [*stage.artifacts], "of another identity", remote)
    if decision.start == "fresh" and not decision.same_inputs:
        _drop(stage, stage.work, "made from other inputs", remote)


def _run_stage(stage: Stage) -> Any:
    """Run the stage; when its workflow refuses a work dir of another identity, drop that dir and run once more."""
    try:
        return stage.run(stage.config)
    except StaleWorkError as err:
        if not isinstance(err.path, Path) or not any(err.path.resolve().is_relative_to(w.resolve())
                                                     for w in stage.work if isinstance(w, Path)):
            raise
        log.info("%s: %s; removing it and starting over", stage.name, err)
        remove_path(err.path)
        return stage.run(stage.config)


def _recover(stage: Stage) -> None:
    """Finish or undo interrupted swaps in the stage's artifacts, work and outputs, and remove the temp
    files their killed writers left there."""
    for path in stage.artifacts + stage.work + stage.outputs:
        if isinstance(path, Path):
            recover(path)


def _summary(result: Any) -> Any:
    if isinstance(result, (str, Path)):
        return str(result)
    if isinstance(result, dict):
        plain = (int, float, str, bool, type(None), dict)
        return {k: v for k, v in result.items() if isinstance(v, plain) and k != "config"}
    return {"output_dir": str(getattr(result, "output_dir", ""))} if hasattr(result, "output_dir") else str(result)


class RemoteRun:
    """A run dir on object storage (``s3://...``) and the local scratch copy its stages work in.

    The manifest lives at the URI (uploaded on every save). A finished stage's artifacts are published
    by pointer (greencode.storage): uploaded under a fresh attempt prefix, visible once their pointer is
    written, and only then recorded done in the manifest; so a stage killed anywhere leaves nothing a
    reader or a rerun trusts. Local checkpoint dirs are mirrored to the URI after their stage.
    """

    def __init__(self, uri: str, root: Path) -> None:
        self.store, self.root = Store(uri), root

    def rel(self, path: Path) -> str:
        return path.resolve().relative_to(self.root.resolve()).as_posix()

    def pull(self) -> None:
        """Take the manifest and the sizing probe from the URI: they, not the scratch copy, are the record."""
        for name in (MANIFEST, SIZING):
            raw = self.store.read_bytes(name)
            if raw is None:
                (self.root / name).unlink(missing_ok=True)
            else:
                write_atomic(self.root / name, raw)

    def push(self, path: Path) -> None:
        self.store.write_bytes(self.rel(path), path.read_bytes())

    def materialize(self, manifest: Manifest) -> None:
        """Fetch into scratch the published artifacts of finished stages that scratch lacks (a fresh node);
        publish again a recorded artifact whose pointer went missing while scratch still holds it."""
        from greencode.digests import tree_digest

        for rec in manifest.stages.values():
            if rec.get("status") != "done":
                continue
            for rel, digest in rec.get("artifacts", {}).items():
                local = manifest.artifact_path(rel)
                pointer = self.store.pointer(self.rel(local))
                published = pointer is not None and pointer.get("digest") == digest
                if local.exists() and tree_digest(local) == digest:
                    if not published:
                        log.info("publishing %s again (its pointer at %s is gone)", self.rel(local),
                                 self.store.location)
                        self.store.publish(local, self.rel(local), digest)
                    continue
                if not published:
                    continue  # manifest.decide finds it missing or changed, and the stage runs again
                remove_path(local)
                with atomic_path(local, directory=pointer.get("kind") == "dir") as tmp:
                    self.store.fetch(self.rel(local), tmp)
                log.info("fetched %s from %s", self.rel(local), self.store.location)

    def clean(self, path: Path) -> None:
        """Remove uploads of ``path`` that were cut off before their pointer was written."""
        self.store.clean_attempts(self.rel(path))

    def publish(self, stage: Stage, produced: dict[Path, str]) -> None:
        from greencode.digests import tree_digest

        for path, digest in produced.items():
            self.store.publish(path, self.rel(path), digest)
        for path in stage.outputs:
            self.store.publish(path, self.rel(path), tree_digest(path))
        for path in stage.work:  # checkpoints (shard dirs are artifacts, published above)
            if isinstance(path, Path) and path.exists() and path not in stage.artifacts:
                self.store.delete(self.rel(path))
                self.store.upload(path, self.rel(path))

    def withdraw(self, path: Path) -> None:
        self.store.unpublish(self.rel(path))


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every configured stage in order, reusing those whose identity and artifacts are unchanged.

    Holds the run-dir lock throughout: a second pipeline on the same run dir fails at once. On object
    storage the location is checked (and its lock taken) before anything is written or Ray starts.
    """
    remote_uri = cfg.run_dir if is_uri(cfg.run_dir) else None
    store = Store(remote_uri) if remote_uri else None  # a scheme with no file system fails here
    root = run_root(cfg)
    stage_configs(cfg)  # a bad config fails before the run dir is touched
    with ExitStack() as held:
        if store is not None:
            store.check()  # a missing bucket or denied access: one error naming the URI
            held.enter_context(ObjectLock(store, lease_s=cfg.lock_lease_s))
        root.mkdir(parents=True, exist_ok=True)
        held.enter_context(RunDirLock(root))
        remote = RemoteRun(remote_uri, root) if remote_uri else None
        if remote is not None:
            remote.pull()
        cfg = _sized(cfg, root)
        if remote is not None and (root / SIZING).exists():
            remote.push(root / SIZING)
        plans = stage_configs(cfg)
        manifest = Manifest(root / MANIFEST, on_save=remote.push if remote else None)
        if remote is not None:
            remote.materialize(manifest)
        init_ray()
        stages = _stages(cfg, plans)
        digests: dict[str, str | None] = {}
        for i, stage in enumerate(stages, 1):
            _recover(stage)  # interrupted swaps, temp files of writers that were killed
            for path in stage.artifacts + stage.outputs if remote else []:
                remote.clean(path)
            identity = _identity(stage, root, digests, remote_uri)
            decision = manifest.decide(stage.name, identity)
            if decision.reuse:
                digests.update(decision.artifact_digests)
                log.info("[%d/%d] %s: %s, skipping", i, len(stages), stage.name, decision.reason)
                continue
            log.info("[%d/%d] %s ... (%s)", i, len(stages), stage.name, decision.reason)
            _prepare(stage, decision, remote)
            manifest.begin(stage.name, identity)
            started = time.time()
            result = _run_stage(stage)
            _recover(stage)  # a worker of a killed run that outlived its driver by a moment left a temp file
            missing = [str(p) for p in stage.artifacts if not p.exists()]
            if missing:
                raise RuntimeError(f"stage {stage.name} finished without writing {', '.join(missing)}")
            produced = {p: tree_digest(p) for p in stage.artifacts}
            digests.update({str(p.resolve()): d for p, d in produced.items()})
            if remote is not None:
                remote.publish(stage, produced)
            manifest.finish(stage.name, identity, started, produced, _summary(result))
            log.info("[%d/%d] %s finished in %.0f s", i, len(stages), stage.name, time.time() - started)
    where = remote_uri or str(root)
    return {"run_dir": where, "manifest": join(remote_uri, MANIFEST) if remote_uri else str(manifest.path),
            "plans": plans, "scratch": str(root) if remote_uri else None}


def _sized(cfg: PipelineConfig, root: Path) -> PipelineConfig:
    """``cfg`` fitted to this machine (greencode.sizing) when it asks for it; the probe is measured once per run dir."""
    if cfg.sizing is None:
        return cfg
    import torch

    from greencode.modeling import load_model
    from greencode.precision import train_precision, training_weights
    from greencode.sizing import probe_seconds, size

    path = root / SIZING
    try:
        probe_s = float(json.loads(path.read_text())["probe_s"])
    except (OSError, ValueError, KeyError, TypeError):
        cpu = torch.device("cpu")
        precision = train_precision(cfg.finetune.precision, cpu)
        weights = {"device": "cpu", "dtype": training_weights(cfg.model.dtype)}
        lm = load_model(cfg.model.model_copy(update=weights), cfg.exits)
        probe_s = probe_seconds(lm, precision, cfg.finetune.batch_size, cfg.finetune.seq_len)
        write_json(path, {"probe_s": probe_s, "precision": precision,
                          "cpu_capability": torch.backends.cpu.get_cpu_capability()})
    sized, line = size(cfg, probe_s)
    log.info("%s (probe kept in %s)", line, path)
    return sized


def final_message(cfg: PipelineConfig, outcome: dict[str, Any]) -> str:
    """The evaluation table, where the plots are, and how to serve the result."""
    plans = outcome["plans"]
    lines = [f"run dir: {outcome['run_dir']}  (manifest: {outcome['manifest']})"]
    if outcome.get("scratch"):
        lines.append(f"local scratch copy: {outcome['scratch']} (every artifact is published to the run dir)")
    if "evaluate" in cfg.stages:
        report = Path(plans["evaluate"].output_dir)
        lines += ["", (report / "report.md").read_text().strip(), ""]
        results = json.loads((report / "results.json").read_text())
        lines += [f"evaluated: {role} {results[role]} ({digest or 'a hub id not in the local cache: no digest'})"
                  for role, digest in results["digests"].items() if results.get(role)]
        lines += [f"plots: {p}" for p in sorted(report.glob("*.png"))]
    model = plans["evaluate"].model.name
    serve = f"greencode serve --model {model}"
    if plans["evaluate"].model.translators:
        serve += f" --translators {plans['evaluate'].model.translators}"
    if {"train_policy", "sweep"} & set(cfg.stages):
        serve += f" --policy {plans['evaluate'].policy_path or plans['train_policy'].output_path}"
    lines += ["", f"serve it:  .venv/bin/{serve} --port 8000",
              "then:      curl -s localhost:8000/generate -H 'content-type: application/json' "
              "-d '{\"inputs\": \"def fib(n):\", \"parameters\": {\"max_new_tokens\": 15}}'"]
    return "\n".join(lines)


COMMAND = ConfigCommand(PipelineConfig, "Run the GreenCode pipeline end to end.", prog="greencode pipeline",
                        presets={name: preset_path(name) for name in PRESETS})


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = COMMAND.parse(argv)
    try:
        outcome = run(cfg)
    except RunDirBusy as err:
        raise SystemExit(f"error: {err}") from None
    print(final_message(cfg, outcome), flush=True)


if __name__ == "__main__":
    main()
