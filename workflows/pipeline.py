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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from greencode.atomic import recover, remove_path, write_json
from greencode.config import ModelConfig, PipelineConfig, validate
from greencode.locks import RunDirBusy, RunDirLock
from greencode.manifest import Decision, Manifest, StageIdentity, relative_to_run, tree_digest
from workflows.common import ConfigCommand, cli_errors, init_ray

log = logging.getLogger("greencode.pipeline")

PRESETS = ("demo", "paper")
MANIFEST = "manifest.json"
PROVENANCE = "provenance.json"  # in the report dir: the model and policy it evaluated, by digest


def preset_path(name: str) -> Path:
    """The shipped preset file ``name`` (a PipelineConfig YAML; --config files and --set go over it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Path(str(resources.files("workflows") / "presets" / f"{name}.yaml"))


# --------------------------------------------------------------------------- stage plans


def stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
    """Stage configs with the shared model/data/exits and every artifact path under run_dir."""
    root = Path(cfg.run_dir).resolve()
    finetuned = "finetune" in cfg.stages
    model = ModelConfig(**{**cfg.model.model_dump(), "name": str(root / "model")}) if finetuned else cfg.model
    shared = {"data": cfg.data.model_dump(), "exits": cfg.exits.model_dump()}

    def section(name: str, **fields: Any) -> dict[str, Any]:
        return {**getattr(cfg, name).model_dump(mode="json"), **fields}

    from greencode.config import (
        EvalConfig,
        ExtractConfig,
        FinetuneConfig,
        PolicyTrainConfig,
        SweepConfig,
    )

    policy_path = str(root / "policy" / "exit_policy.pt")
    policy = section("policy", shards_dir=str(root / "shards" / "train"),
                     eval_shards_dir=str(root / "shards" / "heldout"), output_path=policy_path,
                     storage_path=str(root / "rllib"))
    return {
        "finetune": validate(FinetuneConfig, section("finetune", model=cfg.model.model_dump(), **shared,
                                                      storage_path=str(root / "finetune"),
                                                      output_dir=str(root / "model"))),
        "extract": validate(ExtractConfig, section("extract", model=model.model_dump(), **shared, split="train",
                                                   output_dir=str(root / "shards" / "train"))),
        "extract_heldout": validate(ExtractConfig, section("extract", model=model.model_dump(), **shared,
                                                           split="validation", num_samples=cfg.heldout_samples,
                                                           output_dir=str(root / "shards" / "heldout"))),
        "train_policy": validate(PolicyTrainConfig, policy),
        "sweep": validate(SweepConfig, section("sweep", base=policy, storage_path=str(root / "sweep"))),
        "evaluate": validate(EvalConfig, section(
            "evaluate", model=model.model_dump(), base_model=cfg.model.model_dump() if finetuned else None,
            data=cfg.data.model_dump(), exits=cfg.exits.model_dump(),
            policy_path=policy_path if {"train_policy", "sweep"} & set(cfg.stages) else None,
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
    scratch: list[Path]  # outputs and work dirs (checkpoints): dropped before a fresh start
    # Work units keyed by their own content (evaluation parts): kept when only the stage config changed.
    keyed_parts: bool = False
    after: Callable[[Stage, StageIdentity], None] | None = None


def _stages(cfg: PipelineConfig, plans: dict[str, Any]) -> list[Stage]:
    """The configured stages in pipeline order."""
    from workflows import evaluate, extract, finetune, sweep, train_policy

    ft, ev, pol = plans["finetune"], plans["evaluate"], plans["train_policy"]
    model: Path | ModelConfig = Path(ft.output_dir) if "finetune" in cfg.stages else cfg.model
    train_shards, heldout_shards = Path(plans["extract"].output_dir), Path(plans["extract_heldout"].output_dir)
    shards = {"train_shards": train_shards, "heldout_shards": heldout_shards}
    policy = Path(pol.output_path)
    report = Path(ev.output_dir)
    out = [
        Stage("finetune", ft, finetune.run, [Path(ft.output_dir)], {"base_model": cfg.model},
              [Path(ft.output_dir), Path(ft.storage_path)]),
        Stage("extract", plans["extract"], extract.run, [train_shards], {"model": model}, [train_shards]),
        Stage("extract_heldout", plans["extract_heldout"], extract.run, [heldout_shards], {"model": model},
              [heldout_shards]),
        Stage("train_policy", pol, train_policy.run, [policy], shards,
              [policy, policy.with_suffix(".json"), Path(pol.storage_path)]),
        Stage("sweep", plans["sweep"], sweep.run, [policy], shards,
              [policy, policy.with_suffix(".json"), Path(plans["sweep"].storage_path)]),
        Stage("evaluate", ev, evaluate.run, [report / "results.json", report / PROVENANCE],
              {"model": model, "base_model": ev.base_model, "policy": Path(ev.policy_path) if ev.policy_path else None},
              [report], keyed_parts=True, after=_write_provenance),
    ]
    wanted = set(cfg.stages) | ({"extract_heldout"} if "extract" in cfg.stages else set())
    return [s for s in out if s.name in wanted]


def _write_provenance(stage: Stage, identity: StageIdentity) -> None:
    """Name in the report dir the exact model and policy it evaluated, by content digest."""
    ev = stage.config
    write_json(Path(ev.output_dir) / PROVENANCE, {
        "model": {"name": ev.model.name, "digest": identity.inputs.get("model")},
        "base_model": ({"name": ev.base_model.name, "digest": identity.inputs.get("base_model")}
                       if ev.base_model else None),
        "policy": {"path": ev.policy_path, "digest": identity.inputs.get("policy")} if ev.policy_path else None,
        "stage_identity": identity.digest,
    })


def model_digest(model: ModelConfig) -> str | None:
    """Content digest of an external model: the embedded GGUF, a local file or dir; None for a hub id."""
    from greencode.modeling import embedded_gguf_path

    path = embedded_gguf_path() if model.name == "embedded" else Path(model.name)
    return tree_digest(path) if path.exists() else None


def _identity(stage: Stage, root: Path, digests: dict[str, str | None]) -> StageIdentity:
    """The stage's resolved config (run-dir relative) and its inputs' digests (cached in ``digests``)."""
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
    return StageIdentity(relative_to_run(stage.config.model_dump(mode="json"), root), inputs)


def _prepare(stage: Stage, decision: Decision) -> None:
    """Drop what a stage must not start from: stale artifacts, or outputs and checkpoints of another identity."""
    drop: list[Path] = []
    if decision.start == "republish":
        drop = stage.artifacts
    elif decision.start == "fresh":
        drop = stage.artifacts if stage.keyed_parts and decision.same_inputs else stage.scratch
    elif decision.start == "revalidate" and stage.keyed_parts:
        drop = stage.scratch  # parts made with an unknown model or policy cannot be tied to this identity
    for path in drop:
        if path.exists():
            log.info("%s: removing %s", stage.name, path)
        remove_path(path)


def _summary(result: Any) -> Any:
    if isinstance(result, (str, Path)):
        return str(result)
    if isinstance(result, dict):
        plain = (int, float, str, bool, type(None), dict)
        return {k: v for k, v in result.items() if isinstance(v, plain) and k != "config"}
    return {"output_dir": str(getattr(result, "output_dir", ""))} if hasattr(result, "output_dir") else str(result)


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every configured stage in order, reusing those whose identity and artifacts are unchanged.

    Holds the run-dir lock throughout: a second pipeline on the same run dir fails at once.
    """
    root = Path(cfg.run_dir).resolve()
    plans = stage_configs(cfg)
    root.mkdir(parents=True, exist_ok=True)
    with RunDirLock(root):
        manifest = Manifest(root / MANIFEST)
        init_ray()
        stages = _stages(cfg, plans)
        digests: dict[str, str | None] = {}
        for i, stage in enumerate(stages, 1):
            for path in stage.scratch:  # interrupted swaps, and temp files of writers that were killed
                recover(path)
            identity = _identity(stage, root, digests)
            decision = manifest.decide(stage.name, identity)
            if decision.reuse:
                digests.update(decision.artifact_digests)
                log.info("[%d/%d] %s: %s, skipping", i, len(stages), stage.name, decision.reason)
                continue
            log.info("[%d/%d] %s ... (%s)", i, len(stages), stage.name, decision.reason)
            _prepare(stage, decision)
            manifest.begin(stage.name, identity)
            started = time.time()
            result = stage.run(stage.config)
            if stage.after is not None:
                stage.after(stage, identity)
            missing = [str(p) for p in stage.artifacts if not p.exists()]
            if missing:
                raise RuntimeError(f"stage {stage.name} finished without writing {', '.join(missing)}")
            produced = {p: tree_digest(p) for p in stage.artifacts}
            digests.update({str(p.resolve()): d for p, d in produced.items()})
            manifest.finish(stage.name, identity, started, produced, _summary(result))
            log.info("[%d/%d] %s finished in %.0f s", i, len(stages), stage.name, time.time() - started)
    return {"run_dir": str(root), "manifest": str(manifest.path), "plans": plans}


def final_message(cfg: PipelineConfig, outcome: dict[str, Any]) -> str:
    """The evaluation table, where the plots are, and how to serve the result."""
    plans = outcome["plans"]
    lines = [f"run dir: {outcome['run_dir']}  (manifest: {outcome['manifest']})"]
    if "evaluate" in cfg.stages:
        report = Path(plans["evaluate"].output_dir)
        lines += ["", (report / "report.md").read_text().strip(), ""]
        provenance = json.loads((report / PROVENANCE).read_text())
        lines += [f"evaluated: {role} {item.get('name') or item.get('path')} "
                  f"({item['digest'] or 'a hub id: no local files to digest'})"
                  for role, item in provenance.items() if isinstance(item, dict)]
        lines += [f"plots: {p}" for p in sorted(report.glob("*.png"))]
    model = plans["evaluate"].model.name
    serve = f"greencode serve --model {model}"
    if {"train_policy", "sweep"} & set(cfg.stages):
        serve += f" --policy {plans['train_policy'].output_path}"
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
