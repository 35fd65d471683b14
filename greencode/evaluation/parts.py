"""Finished work on disk: one JSON part per (setting, batch), so an interrupted evaluation resumes.

    OUTPUT/parts/<setting>/<batch>.json   written atomically (temp file + rename)

A part is reused only when its key matches the run (same model and policy *contents*, samples, gate
and generation settings); anything else is redone, so a retrained policy or model saved under the
same path never reuses the old one's rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from greencode.atomic import write_atomic
from greencode.config import EvalConfig, ModelConfig
from greencode.evaluation.plan import Batch, EvalPlan, Setting


def part_path(out_dir: Path, setting: str, batch_id: str) -> Path:
    return out_dir / "parts" / setting / f"{batch_id}.json"


def run_keys(cfg: EvalConfig, plan: EvalPlan, batch: Batch) -> dict[str, str]:
    """Identity of each (setting, batch) result: a stored part is reused only when it matches."""
    common = {
        "samples": [(s.sample_id, len(s.context_ids), s.target_ids) for s in batch.samples],
        "generation": cfg.generation.model_dump(mode="json"),
        "exit_points": plan.exit_points,
    }
    if cfg.task == "fim":  # (completion parts keep the keys they always had)
        common["fim"] = [cfg.fim_order, cfg.fim_suffix_tokens, [len(s.suffix_text) for s in batch.samples]]
    keys = {}
    for setting in plan.settings_for(batch):
        if setting.uses_base_model:
            model = _model_key(cfg.base_model, plan.digests["base_model"])
        else:
            model = _model_key(cfg.model, plan.digests["model"])
        gate = setting.gate.model_dump(mode="json", exclude={"policy_path"})
        if setting.family == "policy":
            gate["policy"] = plan.digests["policy"]
        blob = json.dumps({**common, "model": model, "gate": gate}, sort_keys=True)
        keys[setting.name] = hashlib.sha256(blob.encode()).hexdigest()[:20]
    return keys


def _model_key(model: ModelConfig, digest: str | None) -> dict[str, Any]:
    """A model by its content (by name only when no local file names it) and the settings that change its outputs."""
    return {**model.model_dump(mode="json", exclude={"name"}), "content": digest or model.name}


def load_part(path: Path, key: str) -> dict[str, Any] | None:
    try:
        part = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return part if isinstance(part, dict) and part.get("key") == key else None


@dataclass
class PendingBatch:
    """A batch with the settings it still lacks: the unit of work handed to an Evaluator."""

    batch: Batch
    settings: list[Setting]
    keys: dict[str, str]


def pending_batches(cfg: EvalConfig, plan: EvalPlan, out_dir: Path) -> list[PendingBatch]:
    """Every batch with unfinished settings."""
    pending = []
    for batch in plan.batches:
        keys = run_keys(cfg, plan, batch)
        todo = [s for s in plan.settings_for(batch)
                if load_part(part_path(out_dir, s.name, batch.batch_id), keys[s.name]) is None]
        if todo:
            pending.append(PendingBatch(batch, todo, keys))
    return pending


def save_parts(out_dir: Path, parts: Iterable[dict[str, Any]]) -> None:
    for part in parts:
        write_atomic(part_path(out_dir, part["setting"], part["batch_id"]), json.dumps(part))
