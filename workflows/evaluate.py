"""`greencode eval`: the METHOD §6 baselines on a corpus, spread over Ray actors -> report dir.

    greencode eval --model embedded --corpus stdlib --samples 100 --gates full,fixed,confidence
    greencode eval --model runs/demo/lite --base-model embedded --policy runs/demo/policy/exit_policy.pt \
        --corpus zip:/usr/lib/jvm/java-17-openjdk-amd64/lib/src.zip --lang java --output reports/java
    greencode eval --model Qwen/Qwen2.5-Coder-0.5B --task fim --context-fractions 0.5 --output reports/fim
    greencode eval --model runs/demo/lite --policy runs/demo/policy/exit_policy.pt --gates full,policy \
        --lossless policy,fixed --output reports/lossless   (lossless rows next to the lossy ones)

Each Ray actor loads the model once and takes whole batches (every pending setting on
that batch, so the shared prompt pass is computed once per batch); the driver writes each
finished (setting, batch) atomically, so a rerun resumes. One actor per CPU (per GPU when
the cluster has GPUs) unless ``num_workers`` says otherwise; with one worker it all runs
in this process. The work itself is greencode.evaluation's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from greencode.config import EvalConfig
from greencode.evaluation.agreement import compute_agreement
from greencode.evaluation.parts import PendingBatch, pending_batches, save_parts
from greencode.evaluation.plan import make_plan
from greencode.evaluation.report import EvalReport, write_report
from greencode.evaluation.runner import Evaluator, run_pending
from greencode.modeling import load_model
from workflows.common import (
    ConfigCommand,
    Flag,
    cli_errors,
    comma_list,
    init_ray,
    published_outputs,
    setup_logging,
    stage_presets,
)

log = logging.getLogger("greencode.eval")


class EvalWorker:
    """Ray actor body: one model load, then batches on demand."""

    def __init__(self, cfg_data: dict[str, Any], torch_threads: int) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        setup_logging()
        self.evaluator = Evaluator(EvalConfig.model_validate(cfg_data))

    def run_batch(self, item: PendingBatch) -> list[dict[str, Any]]:
        return self.evaluator.run_batch(item.batch, item.settings, item.keys)


def worker_count(cfg: EvalConfig, resources: dict[str, float], pending: int) -> tuple[int, dict[str, float]]:
    """(actors, resources per actor) sized from the cluster: one per GPU if any, else one per CPU."""
    gpus = int(resources.get("GPU", 0))
    per_actor = {"num_gpus": 1, "num_cpus": 1} if gpus and cfg.model.device != "cpu" else {"num_cpus": 1}
    available = gpus if "num_gpus" in per_actor else int(resources.get("CPU", 1))
    return max(1, min(cfg.num_workers or available, available, pending)), per_actor


def run(cfg: EvalConfig) -> EvalReport:
    """Run or resume the evaluation of ``cfg`` and write its report directory."""
    init_ray()
    import ray
    from ray.util import ActorPool

    out_dir = Path(cfg.output_dir)
    lm = load_model(cfg.model, cfg.exits)
    plan = make_plan(cfg, lm)
    pending = pending_batches(cfg, plan, out_dir)
    workers, per_actor = worker_count(cfg, ray.cluster_resources(), len(pending))
    log.info("%d settings x %d batches; %d batches with work left; %d worker(s)",
             len(plan.settings), len(plan.batches), len(pending), workers)
    if workers <= 1:
        run_pending(cfg, lm, pending, out_dir)
    else:
        actor = ray.remote(**per_actor)(EvalWorker)
        pool = ActorPool([actor.remote(cfg.model_dump(mode="json"), 1) for _ in range(workers)])
        for parts in tqdm(pool.map_unordered(lambda a, item: a.run_batch.remote(item), pending), total=len(pending),
                          desc="eval batches", unit="batch"):
            save_parts(out_dir, parts)
    return write_report(cfg, plan, out_dir, compute_agreement(cfg, lm, out_dir))


COMMAND = ConfigCommand(
    EvalConfig, "Evaluate gates (full, fixed, confidence, policy) on a code corpus -> report dir.",
    prog="greencode eval",
    presets=stage_presets("evaluate"),
    flags=[
        Flag("--model", "model.name"),
        Flag("--base-model", "base_model.name"),
        Flag("--policy", "policy_path"),
        Flag("--corpus", "data.corpus"),
        Flag("--lang", "data.lang", choices=["python", "java"]),
        Flag("--glob", "data.glob"),
        Flag("--max-files", "data.max_files", type=int),
        Flag("--samples", "num_samples", type=int),
        Flag("--gates", "gates", type=comma_list()),
        Flag("--confidences", "confidences", type=comma_list(float)),
        Flag("--thresholds", "thresholds", type=comma_list(float)),
        Flag("--lossless", "lossless", type=comma_list()),
        Flag("--context-fractions", "context_fractions", type=comma_list(float)),
        Flag("--task", "task", choices=["completion", "fim"]),
        Flag("--fim-order", "fim_order", choices=["psm", "spm"]),
        Flag("--batch-size", "batch_size", type=int),
        Flag("--workers", "num_workers", type=int),
        Flag("--output", "output_dir"),
    ],
)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = COMMAND.parse(argv)
    with published_outputs(cfg, "output_dir") as local:
        report = run(local)
    print((report.output_dir / "report.md").read_text())
    print(f"report: {report.output_dir}")


if __name__ == "__main__":
    main()
