"""`greencode finetune`: LITE fine-tuning on Ray Train (DDP or FSDP, CPU or GPU workers).

    python -m workflows.finetune --config configs/finetune-demo.yaml
    ray job submit --working-dir . -- .venv/bin/python -m workflows.finetune --config configs/finetune-demo.yaml \
        --set storage_path=$PWD/runs/finetune

The driver tokenizes the corpus once and ships the blocks to the workers through the
object store; each worker trains on its own slice of a seeded per-epoch permutation
(greencode.training.BlockSampler), so a resumed run sees the same data order.
Checkpoints are Hugging Face dirs (+ exit_plan.json + trainer_state.pt); the last one
is copied atomically to ``output_dir``. See docs/finetune.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from greencode.config import ConfigError, FinetuneConfig
from greencode.data import CorpusError, load_corpus
from greencode.modeling import load_model, resolve_model_path
from greencode.training import (
    TRAINER_STATE_FILE,
    BlockSampler,
    BlockSet,
    LiteObjective,
    LiteStepper,
    StepStats,
    all_reduce_sum,
    build_blocks,
    build_optimizer,
    build_scheduler,
    check_precision,
    evaluate,
    exit_plan,
    full_params,
    load_optimizer_state,
    loss_weights,
    optimizer_state,
    publish_model_dir,
    read_exit_plan,
    save_model_dir,
)
from workflows.common import (
    config_parser,
    exit_on_config_error,
    init_ray,
    load_from_args,
    setup_logging,
)

log = logging.getLogger("greencode.finetune")


# --------------------------------------------------------------------------- paths


def is_remote(path: str) -> bool:
    return "://" in path


def run_dir(cfg: FinetuneConfig) -> str:
    """Ray Train's storage dir of this run (absolute for local paths: workers may start elsewhere)."""
    root = cfg.storage_path if is_remote(cfg.storage_path) else os.path.abspath(cfg.storage_path)
    return f"{root.rstrip('/')}/{cfg.run_name}"


def final_model_dir(cfg: FinetuneConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).absolute()
    if is_remote(cfg.storage_path):
        raise ConfigError(f"storage_path {cfg.storage_path!r} is remote: set output_dir to a local path for the final model")
    return Path(run_dir(cfg)) / "model"


def finished_model(cfg: FinetuneConfig) -> Path | None:
    """The final model dir when it exists, is complete and was trained for ``max_steps`` from this base."""
    out = final_model_dir(cfg)
    plan = read_exit_plan(out)
    if plan and plan.get("step", 0) >= cfg.max_steps and plan.get("base_model") == cfg.model.name:
        return out
    return None


# --------------------------------------------------------------------------- driver side


def check_config(cfg: FinetuneConfig) -> None:
    """Checks that need no Ray: what the requested hardware cannot run."""
    if cfg.precision == "fp16" and not cfg.use_gpu:
        raise ConfigError("precision fp16 needs GPU workers (use_gpu: true); on CPU use precision bf16 or fp32")
    if cfg.strategy == "fsdp" and cfg.num_workers > 1 and not cfg.use_gpu:
        raise ConfigError("strategy fsdp needs GPU workers (use_gpu: true; Ray Train shards only on GPUs); "
                          "on CPU use strategy ddp")


def check_resources(cfg: FinetuneConfig) -> None:
    """Refuse, with the numbers, a request a local Ray cannot place (it would wait forever)."""
    import ray

    have = ray.cluster_resources()
    need_cpu = cfg.num_workers * cfg.cpus_per_worker
    problems = []
    if need_cpu > have.get("CPU", 0):
        problems.append(f"num_workers x cpus_per_worker = {need_cpu:g} CPUs but Ray has {have.get('CPU', 0):g} "
                        f"(lower cpus_per_worker, e.g. cpus_per_worker={have.get('CPU', 0) / cfg.num_workers:g})")
    if cfg.use_gpu and cfg.num_workers > have.get("GPU", 0):
        problems.append(f"use_gpu with {cfg.num_workers} workers needs {cfg.num_workers} GPUs but Ray has "
                        f"{have.get('GPU', 0):g} (set use_gpu: false or fewer num_workers)")
    if not problems:
        return
    message = "; ".join(problems)
    if os.environ.get("RAY_ADDRESS"):
        log.warning("%s — waiting for the cluster (autoscaler) to provide them", message)
    else:
        raise ConfigError(message)


def prepare_data(cfg: FinetuneConfig) -> tuple[BlockSet, BlockSet]:
    """Train blocks (every train file) and validation blocks (``val_batches`` x ``batch_size``)."""
    from transformers import AutoTokenizer

    try:
        path, gguf_file = resolve_model_path(cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name {cfg.model.name!r} cannot be loaded: {err}") from None
    try:
        corpus = load_corpus(cfg.data)
    except CorpusError as err:
        raise ConfigError(str(err)) from None
    started = time.perf_counter()
    train = build_blocks(corpus.split("train"), tokenizer, cfg.seq_len, pack=cfg.pack)
    val = build_blocks(corpus.split("validation"), tokenizer, cfg.seq_len, pack=cfg.pack,
                       limit=cfg.val_batches * cfg.batch_size)
    log.info("tokenized %d train / %d validation blocks of %d tokens in %.1f s",
             len(train), len(val), cfg.seq_len, time.perf_counter() - started)
    if len(train) == 0:
        raise ConfigError(f"data.corpus {cfg.data.corpus!r} gives no training block of seq_len={cfg.seq_len}")
    if len(val) == 0:
        log.warning("no validation blocks (data.val_fraction=%s): periodic validation is off", cfg.data.val_fraction)
    return train, val


def fit(cfg: FinetuneConfig):
    """Run (or resume) the TorchTrainer; returns its ``ray.train.Result``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_config(cfg)
    init_ray()
    check_resources(cfg)
    train, val = prepare_data(cfg)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    storage = run_dir(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "train_blocks": ray.put(train),
            "val_blocks": ray.put(val),
            "tensorboard_dir": None if is_remote(storage) else f"{storage}/tensorboard",
        },
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run_name, storage_path=storage.rsplit("/", 1)[0],
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    log.info("fine-tuning %s: %d worker(s), %d steps, run dir %s", cfg.model.name, cfg.num_workers, cfg.max_steps, storage)
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def run(cfg: FinetuneConfig) -> Path:
    """Fine-tune (resuming when the run has checkpoints) and publish the final HF model dir."""
    done = finished_model(cfg)
    if done:
        log.info("final model %s already trained for %d steps: skipping", done, cfg.max_steps)
        return done
    return publish(cfg, fit(cfg))


def publish(cfg: FinetuneConfig, result) -> Path:
    """Copy the run's last checkpoint (model files only) to the final model dir, atomically."""
    if result.checkpoint is None:
        raise RuntimeError(f"the run {run_dir(cfg)} finished without a checkpoint")
    out = final_model_dir(cfg)
    with result.checkpoint.as_directory() as ckpt_dir:
        publish_model_dir(ckpt_dir, out)
    log.info("final model: %s (%s)", out, _short(result.metrics))
    return out


def _short(metrics: dict[str, Any] | None) -> str:
    keys = ("step", "train/loss", "val/agree_mean", "train/tokens_per_s")
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if metrics and k in metrics)


# --------------------------------------------------------------------------- worker side


class MetricWindow:
    """Sums of step statistics between two reports, averaged across ranks when flushed."""

    def __init__(self, num_losses: int, device: torch.device) -> None:
        self.num_losses, self.device = num_losses, device
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(self.num_losses + 5, dtype=torch.float64)  # loss, exits..., grad norm, tokens, steps, ranks
        self.started = time.perf_counter()

    def add(self, stats: StepStats) -> None:
        self.sums += torch.tensor([stats.loss, *stats.exit_losses, stats.grad_norm, stats.tokens, 1.0, 0.0],
                                  dtype=torch.float64)

    def flush(self, layers: list[int]) -> dict[str, float]:
        """Collective (every rank must call it): mean losses over steps and ranks, global tokens/s."""
        sums = self.sums.clone()
        sums[-1] = 1.0  # rank count
        elapsed = time.perf_counter() - self.started
        sums = all_reduce_sum(sums.to(self.device)).cpu()
        steps_x_ranks, ranks = float(sums[-2]), float(sums[-1])
        self._reset()
        if steps_x_ranks == 0:
            return {}
        out = {"train/loss": float(sums[0]) / steps_x_ranks}
        for i, layer in enumerate(layers):
            out[f"train/loss_l{layer}"] = float(sums[1 + i]) / steps_x_ranks
        out["train/grad_norm"] = float(sums[-4]) / steps_x_ranks
        out["train/tokens_per_s"] = float(sums[-3]) / max(elapsed, 1e-9)
        out["train/ranks"] = ranks
        return out


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: load (or resume) the model, train LITE, report, validate, checkpoint.

    Shared by Ray Train and Ray Tune trainables: everything it needs is in ``config``.
    """
    import ray
    import ray.train
    import ray.train.torch
    from tqdm import tqdm

    cfg = FinetuneConfig.model_validate(config["cfg"])
    torch.set_num_threads(max(1, math.floor(cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    check_precision(cfg.precision, device)
    train_blocks: BlockSet = ray.get(config["train_blocks"])
    val_blocks: BlockSet = ray.get(config["val_blocks"])
    torch.manual_seed(cfg.seed)

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as ckpt_dir:
        source = ckpt_dir or cfg.model.name
        lm = load_model(cfg.model.model_copy(update={"name": str(source), "device": "cpu"}), cfg.exits)
        state = torch.load(Path(ckpt_dir) / TRAINER_STATE_FILE, map_location="cpu", weights_only=False) if ckpt_dir else None
    tokenizer = lm.tokenizer
    objective = LiteObjective(lm, loss_weights(lm, cfg))
    objective = ray.train.torch.prepare_model(objective, parallel_strategy=cfg.strategy if world > 1 else None)
    optimizer = build_optimizer(objective.named_parameters(), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.max_steps)
    stepper = LiteStepper(objective, optimizer, scheduler, cfg, device)
    start = 0
    if state is not None:
        load_optimizer_state(objective, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        stepper.scaler.load_state_dict(state["scaler"])
        start = int(state["step"])
        log.info("rank %d resumes at step %d from %s", rank, start, checkpoint.path)

    sampler = BlockSampler(len(train_blocks), cfg.batch_size, cfg.grad_accum, world, rank, cfg.seed)
    layers = list(lm.exit_points) + [lm.num_layers]
    writer = _tensorboard(config.get("tensorboard_dir")) if rank == 0 else None
    window = MetricWindow(len(layers), device)
    validate = len(val_blocks) > 0

    def report(step: int, metrics: dict[str, float], save: bool) -> None:
        metrics = {"step": step, "start_step": start, "epoch": sampler.epoch(step), "lr": scheduler.get_last_lr()[0],
                   **metrics}
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)
            writer.flush()
        if not save:
            ray.train.report(metrics)
            return
        optim_state = optimizer_state(objective, optimizer)  # collective under FSDP
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            with full_params(objective):  # collective under FSDP
                if rank == 0:
                    save_model_dir(lm.model, tokenizer, exit_plan(lm, cfg, step), tmp)
                    torch.save({"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                                "scaler": stepper.scaler.state_dict(), "config": cfg.model_dump(mode="json")},
                               Path(tmp) / TRAINER_STATE_FILE)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_{step:06d}")

    def validation() -> dict[str, float]:
        with full_params(objective):
            return evaluate(lm, val_blocks, cfg.batch_size, rank=rank, world_size=world, precision=cfg.precision)

    if start == 0 and validate:
        before = validation()
        if rank == 0:
            log.info("before training: %s", _agreement_line(before, layers))
        report(0, before, save=False)

    bar = tqdm(total=cfg.max_steps, initial=start, desc="LITE fine-tuning", disable=rank != 0, mininterval=2)
    for step in range(start, cfg.max_steps):
        batches = [train_blocks.batch(rows, device) for rows in sampler.micro_batches(step)]
        stats = stepper.train_step(batches)
        window.add(stats)
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.3f}")
        done = step + 1
        last = done == cfg.max_steps
        due_val = validate and (done % cfg.val_every == 0 or last)
        due_ckpt = done % cfg.checkpoint_every == 0 or last
        if not (done % cfg.report_every == 0 or due_val or due_ckpt or last):
            continue
        metrics = window.flush(layers)
        if due_val:
            metrics.update(validation())
            if rank == 0:
                log.info("step %d: %s", done, _agreement_line(metrics, layers))
        report(done, metrics, save=due_ckpt)
    bar.close()
    if writer is not None:
        writer.close()


def _agreement_line(metrics: dict[str, float], layers: list[int]) -> str:
    parts = [f"L{k}={metrics[f'val/agree_l{k}']:.3f}" for k in layers[:-1] if f"val/agree_l{k}" in metrics]
    return "agreement with the final layer " + " ".join(parts)


def _tensorboard(log_dir: str | None):
    if not log_dir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed (pip install 'greencode[ray]'): no TensorBoard logs")
        return None
    return SummaryWriter(log_dir=log_dir)


# --------------------------------------------------------------------------- CLI


@exit_on_config_error
def main(argv: list[str] | None = None) -> None:
    parser = config_parser("LITE fine-tuning on Ray Train (writes a Hugging Face model dir)")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    cfg = load_from_args(FinetuneConfig, args)
    print(run(cfg))


if __name__ == "__main__":
    main()
