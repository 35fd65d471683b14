"""LITE fine-tuning throughput on Ray Train: tokens/s for 1 vs N workers on this machine.

    .venv/bin/python -m benchmarks.finetune_throughput                      # embedded model, CPU, 1 and 2 workers
    .venv/bin/python -m benchmarks.finetune_throughput --use-gpu --workers 1 2 --steps 6

The machine's CPUs are split evenly between the workers (1 worker x 2 CPUs vs 2 workers x 1 CPU
on a 2-core box), so the ratio shows what data parallelism buys on the same hardware. The
first ``--warmup`` steps are excluded from the timing; tokens/s counts every rank's tokens.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

from greencode.config import FinetuneConfig


def measure(args: argparse.Namespace, workers: int, total_cpus: float, root: str) -> dict[str, float]:
    from workflows.finetune import fit

    cfg = FinetuneConfig.model_validate({
        "model": {"name": args.model},
        "data": {"corpus": args.corpus, "max_files": args.max_files, "val_fraction": 0.05},
        "seq_len": args.seq_len, "batch_size": args.batch_size, "grad_accum": 1,
        "max_steps": args.warmup + args.steps, "report_every": args.warmup,
        "checkpoint_every": 10_000, "val_every": 10_000, "val_batches": 1,
        "num_workers": workers, "cpus_per_worker": total_cpus / workers, "use_gpu": args.use_gpu,
        "precision": args.precision, "storage_path": root, "run_name": f"bench-{workers}w",
        "output_dir": os.path.join(root, f"model-{workers}w"),
    })
    metrics = fit(cfg).metrics  # the last report covers only the steps after the warm-up
    return {"workers": workers, "cpus_per_worker": cfg.cpus_per_worker, "tokens_per_s": metrics["train/tokens_per_s"],
            "loss": metrics["train/loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--max-files", type=int, default=60)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4, help="per worker")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from workflows.common import init_ray

    init_ray(include_dashboard=False)
    total_cpus = ray.cluster_resources().get("CPU", 1.0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="greencode-bench-") as root:
        for workers in args.workers:
            rows.append(measure(args, workers, total_cpus, root))
    base = rows[0]["tokens_per_s"]
    device = "GPU" if args.use_gpu else "CPU"
    print(f"\nLITE fine-tuning throughput ({args.model}, seq_len {args.seq_len}, batch {args.batch_size}/worker, "
          f"{device}, {total_cpus:g} CPUs, {args.steps} timed steps)")
    print(f"{'workers':>8} {'CPU/worker':>11} {'tokens/s':>10} {'vs ' + str(rows[0]['workers']) + ' worker':>12}")
    for row in rows:
        print(f"{row['workers']:>8} {row['cpus_per_worker']:>11g} {row['tokens_per_s']:>10.1f} "
              f"{row['tokens_per_s'] / base:>11.2f}x")


if __name__ == "__main__":
    main()
