"""Extraction: run the model once over sampled contexts and keep what the exit environment replays.

For each sample (METHOD §3: a file drawn uniformly, a context cut uniform in
[min_context_fraction, max_context_fraction], capped) T tokens are generated greedily by the
full model; for every generated token the hidden state at each exit point of the position that
predicted it is recorded on the way (one pass, no re-forward), decoded at every exit, and
written as one shard row (greencode.shards holds the format). ``workflows/extract.py`` runs
:func:`write_shard_for` on a Ray Data actor pool; a directory is finished when its
``manifest.json`` lists complete shards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from greencode.atomic import write_json
from greencode.confidence import check_features, confidence_features
from greencode.config import ExtractConfig, GenerationConfig, dump_yaml
from greencode.data import CompletionSample, load_corpus, random_cut_samples
from greencode.gates import FullGate
from greencode.generate import GatedGenerator
from greencode.modeling import EarlyExitModel, load_tokenizer
from greencode.shards import (
    ShardError,
    ShardMeta,
    build_table,
    is_complete,
    list_shards,
    read_meta,
    shard_path,
    write_shard,
)

MANIFEST = "manifest.json"


class Sample(Protocol):
    """What extraction needs of a sample (greencode.data.CompletionSample fits)."""

    sample_id: Any
    context_ids: list[int]
    target_ids: list[int]


@dataclass(frozen=True)
class ShardSample:
    """A sample reduced to what extraction needs (what a Ray Data row carries)."""

    sample_id: str
    context_ids: list[int] = field(default_factory=list)
    target_ids: list[int] = field(default_factory=list)


def optimal_exit(predictions: Sequence[int], final_token: int) -> int:
    """Index of the first exit point predicting ``final_token``; ``len(predictions)`` (final layer) if none."""
    for index, token in enumerate(predictions):
        if token == final_token:
            return index
    return len(predictions)


def meta_for(lm: EarlyExitModel, hidden_dtype: str = "float16", features: Sequence[str] = (),
             feature_shortlist: int = 0) -> ShardMeta:
    """The shard metadata of rows extracted from ``lm`` (with the exit features the policy will observe)."""
    return ShardMeta(list(lm.exit_points), lm.hidden_size, lm.num_layers, lm.fingerprint, hidden_dtype,
                     features=tuple(check_features(features)), feature_shortlist=feature_shortlist if features else 0)


@torch.no_grad()
def extract_rows(lm: EarlyExitModel, samples: Sequence[Sample], tokens_per_sample: int,
                 meta: ShardMeta | None = None) -> list[dict[str, Any]]:
    """Generate T tokens greedily with the full model, keeping each token's view at every exit point.

    The observation for generated token t is the hidden state, after each exit point, at the
    position that predicts it; the generator records it on the way (one pass, no re-forward).
    """
    generated = GatedGenerator(lm).generate(
        [list(s.context_ids) for s in samples], FullGate(), GenerationConfig(max_new_tokens=tokens_per_sample),
        collect_exit_states=True,
    )
    rows: list[dict[str, Any]] = []
    for sample, result in zip(samples, generated):
        new = list(result.token_ids)
        hidden = result.exit_states  # Shape: [T, n, H]
        predictions = torch.stack([lm.decode_exit(hidden[:, i], k).argmax(dim=-1)
                                   for i, k in enumerate(lm.exit_points)], dim=1).cpu().tolist()  # [T, n]
        hidden_np = hidden.float().cpu().numpy()
        features = None
        if meta is not None and meta.features:  # [T, n, F]: what the policy gate computes at inference
            features = torch.stack([confidence_features(lm, hidden[:, i], k, meta.features, meta.feature_shortlist)
                                    for i, k in enumerate(lm.exit_points)], dim=1).cpu().numpy()
        for t, token in enumerate(new):
            rows.append(
                {
                    "sample_id": sample.sample_id,
                    "token_index": t,
                    "hidden": hidden_np[t],
                    "exit_predictions": predictions[t],
                    "final_token": token,
                    "dataset_token": sample.target_ids[t] if t < len(sample.target_ids) else -1,
                    "optimal_exit": optimal_exit(predictions[t], token),
                    **({"exit_features": features[t]} if features is not None else {}),
                }
            )
    return rows


def write_shard_for(lm: EarlyExitModel, meta: ShardMeta, samples: Sequence[Sample], tokens_per_sample: int,
                    path: str | Path) -> int:
    """Extract ``samples`` and write them as one shard at ``path`` (atomically); returns its rows."""
    rows = extract_rows(lm, samples, tokens_per_sample, meta)
    write_shard(build_table(meta, rows), path)
    return len(rows)


# --------------------------------------------------------------------------- a shard directory


def draw_samples(cfg: ExtractConfig) -> list[CompletionSample]:
    """The run's samples, deterministic in the config (so a resumed run cuts the same shards)."""
    files = load_corpus(cfg.data).split(cfg.split)
    return random_cut_samples(
        files, load_tokenizer(cfg.model), cfg.num_samples, min_fraction=cfg.min_context_fraction,
        max_fraction=cfg.max_context_fraction, context_cap=cfg.data.context_cap,
        min_file_tokens=cfg.data.min_file_tokens, seed=cfg.data.seed,
    )


@dataclass
class ShardPlan:
    """The shards of a directory: every chunk of samples, and those whose shard is still missing."""

    samples: list[CompletionSample]
    chunks: list[list[CompletionSample]]
    missing: list[int]  # chunk indices without a complete shard


def plan_shards(cfg: ExtractConfig) -> ShardPlan:
    samples = draw_samples(cfg)
    chunks = [samples[i : i + cfg.samples_per_shard] for i in range(0, len(samples), cfg.samples_per_shard)]
    missing = [i for i in range(len(chunks)) if not is_complete(shard_path(cfg.output_dir, i))]
    return ShardPlan(samples, chunks, missing)


def finished_manifest(cfg: ExtractConfig) -> dict[str, Any] | None:
    """The manifest of an earlier run whose shards are all complete, else None."""
    out = Path(cfg.output_dir)
    path = out / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return manifest if all(is_complete(out / s) for s in manifest["shards"]) else None


def write_manifest(cfg: ExtractConfig, plan: ShardPlan, time_s: float) -> dict[str, Any]:
    """Check that the directory's shards belong together, then mark it finished with ``manifest.json``."""
    out = Path(cfg.output_dir)
    shards = list_shards(out)[: len(plan.chunks)]
    metas = {p.name: read_meta(p) for p in shards}
    keys = {m.compatible_key() for m in metas.values()}
    if len(keys) > 1:
        raise ShardError(f"{out} mixes shards from different models or exit points: {sorted(keys)}; "
                         "use a fresh output_dir")
    first = next(iter(metas.values()))
    manifest = {
        "shards": sorted(metas), "num_samples": len(plan.samples), "split": cfg.split, **first.__dict__,
        "config": dump_yaml(cfg), "time_s": time_s,
    }
    write_json(out / MANIFEST, manifest)
    return manifest
