"""`greencode eval`: the METHOD §6 baselines on a corpus, spread over Ray actors -> report dir.

    greencode eval --model embedded --corpus stdlib --samples 100 --gates full,fixed,confidence
    greencode eval --model runs/demo/lite --base-model embedded --policy runs/demo/policy/exit_policy.pt \
        --corpus zip:/usr/lib/jvm/java-17-openjdk-amd64/lib/src.zip --lang java --output reports/java

Each Ray actor loads the model once and takes whole batches (every pending setting on
that batch, so the shared prompt pass is computed once per batch); the driver writes each
finished (setting, batch) atomically, so a rerun resumes. One actor per CPU (per GPU when
the cluster has GPUs) unless ``num_workers`` says otherwise; with one worker it all runs
in this process.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from greencode.config import EvalConfig
from greencode.evaluate import (
    EvalReport,
    Evaluator,
    Job,
    make_plan,
    pending_jobs,
    run_jobs_locally,
    save_parts,
    write_report,
)
from greencode.modeling import load_model
from workflows.common import config_parser, exit_on_config_error, init_ray, load_from_args, setup_logging

log = logging.getLogger("greencode.eval")


class EvalWorker:
    """Ray actor body: one model load, then batches on demand."""

    def __init__(self, cfg_data: dict[str, Any], torch_threads: int) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        setup_logging()
        self.evaluator = Evaluator(EvalConfig.model_validate(cfg_data))

    def run_batch(self, job: Job) -> list[dict[str, Any]]:
        return self.evaluator.run_batch(job.batch, job.settings, job.keys)


def worker_count(cfg: EvalConfig, resources: dict[str, float], jobs: int) -> tuple[int, dict[str, float]]:
    """(actors, resources per actor) sized from the cluster: one per GPU if any, else one per CPU."""
    gpus = int(resources.get("GPU", 0))
    per_actor = {"num_gpus": 1, "num_cpus": 1} if gpus and cfg.model.device != "cpu" else {"num_cpus": 1}
    available = gpus if "num_gpus" in per_actor else int(resources.get("CPU", 1))
    return max(1, min(cfg.num_workers or available, available, jobs)), per_actor


def run(cfg: EvalConfig) -> EvalReport:
    """Run or resume the evaluation of ``cfg`` and write its report directory."""
    init_ray()
    import ray
    from ray.util import ActorPool

    out_dir = Path(cfg.output_dir)
    lm = load_model(cfg.model, cfg.exits)
    plan = make_plan(cfg, lm)
    jobs = pending_jobs(cfg, plan, out_dir)
    workers, per_actor = worker_count(cfg, ray.cluster_resources(), len(jobs))
    log.info("%d settings x %d batches; %d batches with work left; %d worker(s)",
             len(plan.settings), len(plan.batches), len(jobs), workers)
    if workers <= 1:
        run_jobs_locally(cfg, lm, jobs, out_dir)
    else:
        actor = ray.remote(**per_actor)(EvalWorker)
        pool = ActorPool([actor.remote(cfg.model_dump(mode="json"), 1) for _ in range(workers)])
        for parts in tqdm(pool.map_unordered(lambda a, job: a.run_batch.remote(job), jobs), total=len(jobs),
                          desc="eval batches", unit="batch"):
            save_parts(out_dir, parts)
    return write_report(cfg, plan, out_dir)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = config_parser("Evaluate gates (full, fixed, confidence, policy) on a code corpus -> report dir.")
    p.prog = "greencode eval"
    p.add_argument("--model", help="'embedded', HF dir, hub id or .gguf (the fine-tuned model)")
    p.add_argument("--base-model", help="the not-fine-tuned model for the 'base' row")
    p.add_argument("--policy", help="ExitPolicy file; without it the policy rows are absent")
    p.add_argument("--corpus", help="stdlib | dir:PATH | zip:PATH | codexglue:FILE | hf:NAME[:CONFIG]")
    p.add_argument("--lang", choices=["python", "java"], help="language (default: from file extensions)")
    p.add_argument("--glob", help="file pattern inside dir:/zip: corpora, e.g. '**/*.java'")
    p.add_argument("--max-files", type=int, help="read at most this many files (seeded sample)")
    p.add_argument("--samples", type=int, help="completions per setting and context fraction")
    p.add_argument("--gates", type=_names, help="comma list of full,fixed,confidence,policy")
    p.add_argument("--confidences", type=_floats, help="comma list of c for the confidence gate")
    p.add_argument("--thresholds", type=_floats, help="comma list of T for the policy gate")
    p.add_argument("--context-fractions", type=_floats, help="comma list, e.g. 0.2,0.3,0.5")
    p.add_argument("--batch-size", type=int, help="prompts generated together")
    p.add_argument("--workers", type=int, help="Ray actors (default: one per CPU/GPU)")
    p.add_argument("--output", help="report directory")
    return p


FLAG_FIELDS = {
    "model": "model.name", "base_model": "base_model.name", "policy": "policy_path", "corpus": "data.corpus",
    "lang": "data.lang", "glob": "data.glob", "max_files": "data.max_files", "samples": "num_samples",
    "gates": "gates", "confidences": "confidences", "thresholds": "thresholds",
    "context_fractions": "context_fractions", "batch_size": "batch_size", "workers": "num_workers",
    "output": "output_dir",
}


def config_from_args(argv: list[str] | None) -> tuple[EvalConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    flags = {field: getattr(args, name) for name, field in FLAG_FIELDS.items() if getattr(args, name) is not None}
    return load_from_args(EvalConfig, args, flags), args


@exit_on_config_error
def main(argv: list[str] | None = None) -> None:
    cfg, args = config_from_args(argv)
    setup_logging(args.verbose)
    try:
        report = run(cfg)
    except (FileNotFoundError, ValueError) as err:  # bad corpus, policy or model: one line, no traceback
        raise SystemExit(f"error: {err}") from None
    print((report.output_dir / "report.md").read_text())
    print(f"report: {report.output_dir}")


if __name__ == "__main__":
    main()
