"""The main job: corpus -> LITE model -> shards -> exit policy -> evaluation report.

    python -m workflows.pipeline --preset demo            # what `make demo` runs
    python -m workflows.pipeline --config my.yaml --set run_dir=runs/x
    ray job submit --working-dir . -- .venv/bin/python -m workflows.pipeline --preset demo

Each stage writes a plain artifact under ``run_dir`` (HF model dir, Parquet shards, policy
file, report dir) and is recorded in ``run_dir/manifest.json`` (config, versions, timings,
artifact hashes) only once it has finished. A rerun skips recorded stages whose artifacts still
hash the same and resumes an interrupted stage from its own checkpoints; every artifact is
written to a temporary path and renamed, so a killed run never leaves one a later stage trusts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from greencode.atomic import write_json
from greencode.config import ModelConfig, PipelineConfig, dump_yaml, validate
from workflows.common import ConfigCommand, cli_errors, init_ray

log = logging.getLogger("greencode.pipeline")

PRESETS = ("demo", "paper")


def preset_path(name: str) -> Path:
    """The shipped preset file ``name`` (a PipelineConfig YAML; --config files and --set go over it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return Path(str(resources.files("workflows") / "presets" / f"{name}.yaml"))


# --------------------------------------------------------------------------- manifest


def tree_digest(path: Path) -> str:
    """sha256 over every file under ``path`` (relative names + contents); stable across machines."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("greencode", "torch", "transformers", "ray", "gymnasium"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:
            out[mod] = "not installed"
    return out


class Manifest:
    """``run_dir/manifest.json``: what ran, with which config, how long, and what it produced."""

    def __init__(self, path: Path, cfg: PipelineConfig) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        self.data.update({"config": cfg.model_dump(mode="json"), "versions": versions()})
        self.data.setdefault("stages", {})

    def finished(self, stage: str) -> bool:
        rec = self.data["stages"].get(stage)
        if not rec or rec.get("status") != "done":
            return False
        for path, digest in rec["artifacts"].items():
            if not Path(path).exists() or tree_digest(Path(path)) != digest:
                log.warning("%s: artifact %s is missing or changed since it was recorded; redoing the stage", stage, path)
                return False
        return True

    def record(self, stage: str, config: str, started: float, artifacts: list[Path], result: Any) -> None:
        self.data["stages"][stage] = {
            "status": "done",
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "time_s": round(time.time() - started, 1),
            "config": config,
            "artifacts": {str(p): tree_digest(p) for p in artifacts},
            "result": result,
        }
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)


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


Stage = tuple[str, Any, Callable[[Any], Any], Callable[[Any], list[Path]]]


def _stages(cfg: PipelineConfig, plans: dict[str, Any]) -> list[Stage]:
    """(name, stage config, run function, artifacts of a finished run) in pipeline order."""
    from workflows import evaluate, extract, finetune, sweep, train_policy

    out = [
        ("finetune", plans["finetune"], finetune.run, lambda r: [Path(r)]),
        ("extract", plans["extract"], extract.run, lambda r: [Path(plans["extract"].output_dir)]),
        ("extract_heldout", plans["extract_heldout"], extract.run,
         lambda r: [Path(plans["extract_heldout"].output_dir)]),
        ("train_policy", plans["train_policy"], train_policy.run, lambda r: [Path(plans["train_policy"].output_path)]),
        ("sweep", plans["sweep"], sweep.run, lambda r: [Path(plans["sweep"].base.output_path)]),
        ("evaluate", plans["evaluate"], evaluate.run, lambda r: [Path(plans["evaluate"].output_dir) / "results.json"]),
    ]
    wanted = set(cfg.stages) | ({"extract_heldout"} if "extract" in cfg.stages else set())
    return [s for s in out if s[0] in wanted]


def _summary(result: Any) -> Any:
    if isinstance(result, (str, Path)):
        return str(result)
    if isinstance(result, dict):
        plain = (int, float, str, bool, type(None), dict)
        return {k: v for k, v in result.items() if isinstance(v, plain) and k != "config"}
    return {"output_dir": str(getattr(result, "output_dir", ""))} if hasattr(result, "output_dir") else str(result)


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every configured stage in order, skipping the ones already finished."""
    root = Path(cfg.run_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(root / "manifest.json", cfg)
    manifest.save()
    init_ray()
    plans = stage_configs(cfg)
    stages = _stages(cfg, plans)
    for i, (name, stage_cfg, run_stage, artifacts) in enumerate(stages, 1):
        if manifest.finished(name):
            log.info("[%d/%d] %s: done earlier (%s), skipping", i, len(stages), name, manifest.data["stages"][name]["time_s"])
            continue
        log.info("[%d/%d] %s ...", i, len(stages), name)
        started = time.time()
        result = run_stage(stage_cfg)
        manifest.record(name, dump_yaml(stage_cfg), started, artifacts(result), _summary(result))
        log.info("[%d/%d] %s finished in %.0f s", i, len(stages), name, time.time() - started)
    return {"run_dir": str(root), "manifest": str(manifest.path), "plans": plans}


def final_message(cfg: PipelineConfig, outcome: dict[str, Any]) -> str:
    """The evaluation table, where the plots are, and how to serve the result."""
    plans = outcome["plans"]
    lines = [f"run dir: {outcome['run_dir']}  (manifest: {outcome['manifest']})"]
    if "evaluate" in cfg.stages:
        report = Path(plans["evaluate"].output_dir)
        lines += ["", (report / "report.md").read_text().strip(), ""]
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
    outcome = run(cfg)
    print(final_message(cfg, outcome), flush=True)


if __name__ == "__main__":
    main()
