"""`greencode extract`: hidden-state shards for the exit environment, with Ray Data.

The driver draws the samples and cuts them into shards of ``samples_per_shard``
(greencode.extraction); a pool of model actors (``num_workers``) writes one Parquet shard
per chunk (temp file + rename). An actor on another node than the driver's also returns the shard's
bytes, which the driver writes where the shard belongs: a cluster without shared storage ends up
with every shard on the driver's node. Existing shards are skipped, so an interrupted run resumes;
``manifest.json`` marks a finished directory. The directory records the settings and model digest
its shards were made with: a run with others refuses to mix its shards with them.

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

from greencode.atomic import write_atomic
from greencode.config import ExitConfig, ExtractConfig, ModelConfig, result_config
from greencode.extraction import (
    ShardSample,
    finished_manifest,
    meta_for,
    plan_shards,
    write_manifest,
    write_shard_for,
)
from greencode.manifest import StageIdentity, claim_work_dir
from greencode.modeling import model_digest
from greencode.shards import is_complete, shard_path
from workflows.common import ConfigCommand, cli_errors, init_ray, published_outputs, stage_presets

log = logging.getLogger("greencode.extract")


class ShardWriter:
    """Ray Data actor: loads the model once, turns each chunk of samples into one shard file."""

    def __init__(self, model: dict[str, Any], exits: dict[str, Any], tokens_per_sample: int, hidden_dtype: str,
                 features: list[str], feature_shortlist: int, threads: int, driver_node: str | None = None) -> None:
        import ray
        import torch

        from greencode.modeling import load_model

        torch.set_num_threads(threads)
        self.remote = driver_node is not None and ray.get_runtime_context().get_node_id() != driver_node
        self.lm = load_model(ModelConfig(**model), ExitConfig(**exits))
        self.meta = meta_for(self.lm, hidden_dtype, features, feature_shortlist)
        self.tokens_per_sample = tokens_per_sample

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        written, rows, data = [], [], []
        for path, ids, contexts, targets in zip(batch["shard"], batch["sample_ids"], batch["context_ids"],
                                                batch["target_ids"]):
            samples = [ShardSample(str(i), [int(t) for t in c], [int(t) for t in g])
                       for i, c, g in zip(ids, contexts, targets)]
            rows.append(write_shard_for(self.lm, self.meta, samples, self.tokens_per_sample, path))
            written.append(str(path))
            data.append(Path(path).read_bytes() if self.remote else b"")
        return {"shard": written, "rows": rows, "data": data}


def keep_on_driver(shard: str, data: bytes) -> None:
    """Write a shard an actor on another node returned, unless it is already here (shared storage)."""
    if data and not is_complete(shard):
        write_atomic(shard, data)


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
    start = time.perf_counter()
    plan = plan_shards(cfg)  # a bad model or corpus fails here, before the output dir is touched
    identity = StageIdentity(result_config(cfg), {"model": model_digest(cfg.model)})
    claim_work_dir(cfg.output_dir, identity, "shards")
    done = finished_manifest(cfg)
    if done is not None:
        log.info("%s is complete (%d shards); delete it to re-extract", cfg.output_dir, len(done["shards"]))
        return done
    import ray

    log.info("%d samples in %d shards; %d to write", len(plan.samples), len(plan.chunks), len(plan.missing))
    if plan.missing:
        todo = [{"shard": str(shard_path(cfg.output_dir, i)), "sample_ids": [s.sample_id for s in plan.chunks[i]],
                 "context_ids": [s.context_ids for s in plan.chunks[i]],
                 "target_ids": [s.target_ids for s in plan.chunks[i]]}
                for i in plan.missing]
        init_ray()
        resources = _actor_resources(cfg, ray.cluster_resources())
        ds = ray.data.from_items(todo).map_batches(
            ShardWriter,
            fn_constructor_kwargs={
                "model": cfg.model.model_dump(), "exits": cfg.exits.model_dump(),
                "tokens_per_sample": cfg.tokens_per_sample, "hidden_dtype": cfg.hidden_dtype,
                "features": list(cfg.features), "feature_shortlist": cfg.feature_shortlist,
                "threads": max(1, int(resources["num_cpus"])),
                "driver_node": ray.get_runtime_context().get_node_id(),
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(cfg.num_workers, len(todo))),
            **resources,
        )
        for row in ds.iter_rows():
            keep_on_driver(row["shard"], row["data"])
            log.debug("wrote %s (%d tokens)", row["shard"], row["rows"])
    manifest = write_manifest(cfg, plan, time.perf_counter() - start)
    log.info("%d shards in %s (%.1f s)", len(manifest["shards"]), cfg.output_dir, manifest["time_s"])
    return manifest


COMMAND = ConfigCommand(ExtractConfig, "Extract hidden-state shards for the exit environment (Ray Data).",
                        prog="greencode extract", presets=stage_presets("extract"))


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = COMMAND.parse(argv)
    with published_outputs(cfg, "output_dir") as local:
        manifest = run(local)
    print(json.dumps({k: v for k, v in manifest.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
