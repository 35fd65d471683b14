"""`greencode extract`: hidden-state shards for the exit environment, with Ray Data.

The driver draws the samples (METHOD §3: a file uniform, context cut uniform in
[min_context_fraction, max_context_fraction], capped) and cuts them into shards of
``samples_per_shard``; a pool of model actors (``num_workers``) generates T tokens per
sample with the full model and writes one Parquet shard per chunk (temp file + rename).
Existing shards are skipped, so an interrupted run resumes; ``manifest.json`` marks a
finished directory.

    python -m workflows.extract --set num_samples=200 --set output_dir=runs/shards/train
    python -m workflows.extract --set split=validation --set num_samples=50 --set output_dir=runs/shards/eval
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from greencode.atomic import write_json
from greencode.config import ExitConfig, ExtractConfig, ModelConfig, dump_yaml
from greencode.shards import (
    ShardError,
    build_table,
    extract_rows,
    list_shards,
    meta_for,
    read_meta,
    write_shard,
)
from workflows.common import (
    config_parser,
    exit_on_config_error,
    init_ray,
    load_from_args,
    setup_logging,
)

log = logging.getLogger("greencode.extract")

MANIFEST = "manifest.json"


def draw_samples(cfg: ExtractConfig) -> list:
    """The run's samples, deterministic in the config (so a resumed run cuts the same shards)."""
    from transformers import AutoTokenizer

    from greencode.data import load_corpus, random_cut_samples
    from greencode.modeling import resolve_model_path

    path, gguf_file = resolve_model_path(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    files = load_corpus(cfg.data).split(cfg.split)
    return random_cut_samples(
        files, tokenizer, cfg.num_samples, min_fraction=cfg.min_context_fraction, max_fraction=cfg.max_context_fraction,
        context_cap=cfg.data.context_cap, min_file_tokens=cfg.data.min_file_tokens, seed=cfg.data.seed,
    )


def shard_path(output_dir: str | Path, index: int) -> Path:
    return Path(output_dir) / f"shard-{index:05d}.parquet"


def _is_complete(path: Path) -> bool:
    try:
        read_meta(path)
        return True
    except ShardError:
        return False


class _Sample:
    """A sample rebuilt from a Ray Data row (only what extraction needs)."""

    def __init__(self, sample_id: str, context_ids, target_ids) -> None:
        self.sample_id = str(sample_id)
        self.context_ids = [int(t) for t in context_ids]
        self.target_ids = [int(t) for t in target_ids]


class ShardWriter:
    """Ray Data actor: loads the model once, turns each chunk of samples into one shard file."""

    def __init__(self, model: dict[str, Any], exits: dict[str, Any], tokens_per_sample: int, hidden_dtype: str, threads: int) -> None:
        import torch

        from greencode.modeling import load_model

        torch.set_num_threads(threads)
        self.lm = load_model(ModelConfig(**model), ExitConfig(**exits))
        self.meta = meta_for(self.lm, hidden_dtype)
        self.tokens_per_sample = tokens_per_sample

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        written, rows_out = [], []
        for path, ids, contexts, targets in zip(batch["shard"], batch["sample_ids"], batch["context_ids"], batch["target_ids"]):
            samples = [_Sample(*parts) for parts in zip(ids, contexts, targets)]
            rows = extract_rows(self.lm, samples, self.tokens_per_sample)
            write_shard(build_table(self.meta, rows), path)
            written.append(str(path))
            rows_out.append(len(rows))
        return {"shard": written, "rows": rows_out}


def _actor_resources(cfg: ExtractConfig, cluster: dict[str, float]) -> dict[str, float]:
    """Leave half a CPU free for Ray Data's own tasks; share GPUs when the model runs on one."""
    cpus = max(0.5, min(4.0, (cluster.get("CPU", 1) - 0.5) / cfg.num_workers))
    gpus = cluster.get("GPU", 0)
    resources = {"num_cpus": cpus}
    if gpus and cfg.model.device != "cpu":
        resources["num_gpus"] = min(1.0, gpus / cfg.num_workers)
    return resources


def run(cfg: ExtractConfig) -> dict[str, Any]:
    """Write (or finish) the shards of ``cfg.output_dir``; returns the manifest."""
    out = Path(cfg.output_dir)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if all(_is_complete(out / s) for s in manifest["shards"]):
            log.info("%s is complete (%d shards); delete it to re-extract", out, len(manifest["shards"]))
            return manifest
    import ray

    start = time.perf_counter()
    samples = draw_samples(cfg)
    chunks = [samples[i : i + cfg.samples_per_shard] for i in range(0, len(samples), cfg.samples_per_shard)]
    todo = [
        {"shard": str(shard_path(out, i)), "sample_ids": [s.sample_id for s in chunk],
         "context_ids": [s.context_ids for s in chunk], "target_ids": [s.target_ids for s in chunk]}
        for i, chunk in enumerate(chunks)
        if not _is_complete(shard_path(out, i))
    ]
    log.info("%d samples in %d shards; %d to write", len(samples), len(chunks), len(todo))
    if todo:
        init_ray()
        resources = _actor_resources(cfg, ray.cluster_resources())
        ds = ray.data.from_items(todo).map_batches(
            ShardWriter,
            fn_constructor_kwargs={
                "model": cfg.model.model_dump(), "exits": cfg.exits.model_dump(), "tokens_per_sample": cfg.tokens_per_sample,
                "hidden_dtype": cfg.hidden_dtype, "threads": max(1, int(resources["num_cpus"])),
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(cfg.num_workers, len(todo))),
            **resources,
        )
        for row in ds.take_all():
            log.info("wrote %s (%d tokens)", row["shard"], row["rows"])
    shards = list_shards(out)[: len(chunks)]
    metas = {p.name: read_meta(p) for p in shards}
    keys = {m.compatible_key() for m in metas.values()}
    if len(keys) > 1:
        raise ShardError(f"{out} mixes shards from different models or exit points: {sorted(keys)}; use a fresh output_dir")
    first = next(iter(metas.values()))
    manifest = {
        "shards": sorted(metas), "num_samples": len(samples), "split": cfg.split, **first.__dict__,
        "config": dump_yaml(cfg), "time_s": time.perf_counter() - start,
    }
    write_json(manifest_path, manifest)
    log.info("%d shards in %s (%.1f s)", len(shards), out, manifest["time_s"])
    return manifest


@exit_on_config_error
def main(argv: list[str] | None = None) -> None:
    args = config_parser("Extract hidden-state shards for the exit environment (Ray Data).").parse_args(argv)
    setup_logging(args.verbose)
    manifest = run(load_from_args(ExtractConfig, args))
    print(json.dumps({k: v for k, v in manifest.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
