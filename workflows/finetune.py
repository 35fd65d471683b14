"""`greencode finetune`: LITE fine-tuning on Ray Train (DDP or FSDP, CPU or GPU workers).

    python -m workflows.finetune --preset demo          # the demo pipeline's fine-tuning stage
    ray job submit --working-dir . -- .venv/bin/python -m workflows.finetune --preset demo \
        --set storage_path=$PWD/runs/finetune

The driver tokenizes the corpus once and ships the blocks to the workers through the
object store; each worker trains on its own slice of a seeded per-epoch permutation
(greencode.blocks.BlockSampler), so a resumed run sees the same data order. The worker
loop is :class:`LiteRecipe`: setup, train_step, validate, save_checkpoint, read by name.
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

from greencode.blocks import BlockSampler, BlockSet, build_blocks
from greencode.checkpoints import TrainerState, exit_plan, publish_model_dir, read_exit_plan, save_model_dir
from greencode.config import ConfigError, FinetuneConfig, result_config
from greencode.data import CorpusError, load_corpus
from greencode.distributed import full_params, load_optimizer_state, optimizer_state
from greencode.manifest import StageIdentity, claim_work_dir
from greencode.modeling import load_model, load_tokenizer, model_digest
from greencode.precision import train_precision, training_weights
from greencode.storage import is_uri
from greencode.training import (
    LiteStepper,
    MetricWindow,
    StepStats,
    build_objective,
    build_optimizer,
    build_scheduler,
)
from greencode.validation import validation_metrics
from workflows.common import (
    ConfigCommand,
    cli_errors,
    init_ray,
    published_outputs,
    setup_logging,
    stage_presets,
    verbose,
)

log = logging.getLogger("greencode.finetune")


# --------------------------------------------------------------------------- paths


def run_dir(cfg: FinetuneConfig) -> str:
    """Ray Train's storage dir of this run (absolute for local paths: workers may start elsewhere)."""
    root = cfg.storage_path if is_uri(cfg.storage_path) else os.path.abspath(cfg.storage_path)
    return f"{root.rstrip('/')}/{cfg.run_name}"


def final_model_dir(cfg: FinetuneConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).absolute()
    if is_uri(cfg.storage_path):
        raise ConfigError(f"storage_path {cfg.storage_path!r} is remote: set output_dir (a local path, or a URI "
                          "it is published to) for the final model")
    return Path(run_dir(cfg)) / "model"


# A longer run may continue from the checkpoints of a shorter one (same settings otherwise).
RESUMABLE = frozenset({"max_steps"})


def run_identity(cfg: FinetuneConfig) -> StageIdentity:
    """What the checkpoints and the final model depend on: the settings that shape training (less
    max_steps) and the base model's content. Checkpoints and the published model record it."""
    config = {k: v for k, v in result_config(cfg).items() if k not in RESUMABLE}
    return StageIdentity(config, {"base_model": model_digest(cfg.model)})


def finished_model(cfg: FinetuneConfig, identity: StageIdentity) -> Path | None:
    """The final model dir when it exists, is complete and was trained for ``max_steps`` by this run."""
    out = final_model_dir(cfg)
    plan = read_exit_plan(out)
    if plan and plan.get("step", 0) >= cfg.max_steps and plan.get("run_identity") == identity.digest:
        return out
    return None


# --------------------------------------------------------------------------- driver side


def check_config(cfg: FinetuneConfig) -> None:
    """Checks that need no Ray: what the requested hardware cannot run."""
    if cfg.precision == "fp16" and not cfg.use_gpu:
        raise ConfigError("precision fp16 needs GPU workers (use_gpu: true); on CPU use precision auto or fp32")
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
    try:
        tokenizer = load_tokenizer(cfg.model)
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


def fit(cfg: FinetuneConfig, identity: StageIdentity | None = None):
    """Run (or resume) the TorchTrainer; returns its ``ray.train.Result``.

    Resumes only checkpoints of the same run identity: a run dir holding another's is refused
    (StaleWorkError) rather than continued with different settings.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_config(cfg)
    init_ray()
    check_resources(cfg)
    train, val = prepare_data(cfg)  # a bad model or corpus fails here, before the run dir is touched
    identity = identity or run_identity(cfg)
    storage = run_dir(cfg)
    if not is_uri(storage):  # on s3:// the run name alone keeps runs apart
        claim_work_dir(storage, identity, "Ray Train checkpoints")
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "train_blocks": ray.put(train),
            "val_blocks": ray.put(val),
            "tensorboard_dir": None if is_uri(storage) else f"{storage}/tensorboard",
            "verbose": verbose(),
            "run_identity": identity.digest,
        },
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=cfg.run_name, storage_path=storage.rsplit("/", 1)[0],
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING")),
    )
    log.info("fine-tuning %s: %d worker(s), %d steps, run dir %s", cfg.model.name, cfg.num_workers, cfg.max_steps,
             storage)
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def run(cfg: FinetuneConfig) -> Path:
    """Fine-tune (resuming when the run has checkpoints) and publish the final HF model dir."""
    identity = run_identity(cfg)
    done = finished_model(cfg, identity)
    if done:
        log.info("final model %s already trained for %d steps: skipping", done, cfg.max_steps)
        return done
    return publish(cfg, fit(cfg, identity))


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


class LiteRecipe:
    """One Ray Train worker's LITE fine-tuning, phase by phase (the shape of a torchtune recipe).

    :meth:`setup` loads the model (or the checkpoint Ray Train hands back after a restart) and
    builds objective, optimizer and stepper; :meth:`train` runs the remaining steps, calling
    :meth:`train_step`, :meth:`validate` and :meth:`save_checkpoint` as they fall due. Every
    rank runs every phase (validation, reports and checkpoints are collectives); rank 0 alone
    logs, shows the progress bar and writes TensorBoard and the checkpoint files.
    """

    def __init__(self, cfg: FinetuneConfig, train_blocks: BlockSet, val_blocks: BlockSet,
                 tensorboard_dir: str | None = None, run_identity: str | None = None) -> None:
        import ray.train
        import ray.train.torch

        self.cfg, self.train_blocks, self.val_blocks = cfg, train_blocks, val_blocks
        torch.set_num_threads(max(1, math.floor(cfg.cpus_per_worker)))
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.precision = train_precision(cfg.precision, self.device)  # fails early on what the device cannot run
        self.tensorboard_dir = tensorboard_dir if self.rank == 0 else None
        self.run_identity = run_identity
        self.start_step = 0

    # ------------------------------------------------------------------ phases

    def setup(self) -> None:
        """Model, objective (DDP/FSDP-wrapped), optimizer, schedule; resumed from Ray Train's checkpoint if any."""
        import ray.train
        import ray.train.torch

        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        checkpoint = ray.train.get_checkpoint()
        # Loaded on the CPU (Ray Train moves the model to the worker's device); auto trains float32 master
        # weights under finetune.precision's autocast.
        weights = {"device": "cpu", "dtype": training_weights(cfg.model.dtype)}
        with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as ckpt_dir:
            source = ckpt_dir or cfg.model.name
            self.lm = load_model(cfg.model.model_copy(update={"name": str(source), **weights}), cfg.exits,
                                 runs_on=self.device)
            state = TrainerState.load(ckpt_dir) if ckpt_dir else None
        # A resumed run distils from the model fine-tuning started from, not from its checkpoint.
        base = load_model(cfg.model.model_copy(update=weights), cfg.exits, runs_on=self.device) \
            if ckpt_dir and cfg.loss.needs_teacher else None
        objective = build_objective(self.lm, cfg, base)
        strategy = cfg.strategy if self.world > 1 else None
        self.objective = ray.train.torch.prepare_model(objective, parallel_strategy=strategy)
        self.optimizer = build_optimizer(self.objective.named_parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.max_steps)
        self.stepper = LiteStepper(self.objective, self.optimizer, self.scheduler, cfg, self.device)
        if state is not None:
            load_optimizer_state(self.objective, self.optimizer, state.optimizer)
            self.scheduler.load_state_dict(state.scheduler)
            self.stepper.scaler.load_state_dict(state.scaler)
            self.start_step = state.step
            if self.rank == 0:
                log.info("resuming at step %d from %s", self.start_step, checkpoint.path)
        self.sampler = BlockSampler(len(self.train_blocks), cfg.batch_size, cfg.grad_accum, self.world, self.rank,
                                    cfg.seed)
        self.layers = list(self.lm.exit_points) + [self.lm.num_layers]
        self.window = MetricWindow(len(self.layers), self.device)
        self.writer = _tensorboard(self.tensorboard_dir)

    def train_step(self, step: int) -> StepStats:
        """One optimizer step on this rank's micro-batches of ``step``."""
        batches = [self.train_blocks.batch(rows, self.device) for rows in self.sampler.micro_batches(step)]
        stats = self.stepper.train_step(batches)
        self.window.add(stats)
        return stats

    def validate(self) -> dict[str, float]:
        """Per-exit validation metrics over the validation blocks, split across ranks (collective)."""
        with full_params(self.objective):
            return validation_metrics(self.lm, self.val_blocks, self.cfg.batch_size, rank=self.rank,
                                      world_size=self.world, precision=self.precision)

    def save_checkpoint(self, step: int, metrics: dict[str, float]) -> None:
        """Report ``metrics`` with a checkpoint: the HF model dir + exit plan + trainer state (collective)."""
        import ray.train

        optim_state = optimizer_state(self.objective, self.optimizer)  # collective under FSDP
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            with full_params(self.objective):  # collective under FSDP
                if self.rank == 0:
                    plan = exit_plan(self.lm, self.cfg, step, self.run_identity)
                    save_model_dir(self.lm.model, self.lm.tokenizer, plan, tmp)
                    TrainerState(step, optim_state, self.scheduler.state_dict(), self.stepper.scaler.state_dict(),
                                 self.cfg.model_dump(mode="json")).save(tmp)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(self._with_progress(step, metrics), checkpoint=ckpt,
                             checkpoint_dir_name=f"checkpoint_{step:06d}")

    def report(self, step: int, metrics: dict[str, float]) -> None:
        """Report ``metrics`` to Ray Train (and TensorBoard) without a checkpoint."""
        import ray.train

        ray.train.report(self._with_progress(step, metrics))

    # ------------------------------------------------------------------ the loop

    def train(self) -> None:
        """Steps from the resumed one to ``max_steps``; validation before the first step of a fresh run."""
        from tqdm import tqdm

        cfg = self.cfg
        validate = len(self.val_blocks) > 0
        if self.start_step == 0 and validate:
            before = self.validate()
            self._log(0, before)
            self.report(0, before)
        bar = tqdm(total=cfg.max_steps, initial=self.start_step, desc="LITE fine-tuning", disable=self.rank != 0,
                   mininterval=2)
        for step in range(self.start_step, cfg.max_steps):
            stats = self.train_step(step)
            bar.update(1)
            bar.set_postfix(loss=f"{stats.loss:.3f}")
            done = step + 1
            last = done == cfg.max_steps
            due_val = validate and (done % cfg.val_every == 0 or last)
            due_ckpt = done % cfg.checkpoint_every == 0 or last
            if not (done % cfg.report_every == 0 or due_val or due_ckpt):
                continue
            metrics = self.window.flush(self.layers)
            if due_val:
                metrics.update(self.validate())
            self._log(done, metrics)
            if due_ckpt:
                self.save_checkpoint(done, metrics)
            else:
                self.report(done, metrics)
        bar.close()
        if self.writer is not None:
            self.writer.close()

    # ------------------------------------------------------------------ helpers

    def _with_progress(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        metrics = {"step": step, "start_step": self.start_step, "epoch": self.sampler.epoch(step),
                   "lr": self.scheduler.get_last_lr()[0], **metrics}
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        return metrics

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        """One line per report, from rank 0 only (the full metrics go to TensorBoard and Ray Train)."""
        if self.rank == 0:
            log.info("step %d/%d: %s", step, self.cfg.max_steps, _report_line(metrics, self.layers))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's worker function: everything it needs is in ``config`` (shared by Ray Train and Tune)."""
    import ray

    setup_logging(config.get("verbose", False))  # Ray Train logs every rank's whole report at INFO otherwise
    recipe = LiteRecipe(FinetuneConfig.model_validate(config["cfg"]), ray.get(config["train_blocks"]),
                        ray.get(config["val_blocks"]), config.get("tensorboard_dir"), config.get("run_identity"))
    recipe.setup()
    recipe.train()


def _report_line(metrics: dict[str, float], layers: list[int]) -> str:
    parts = []
    if "train/loss" in metrics:
        parts.append(f"loss {metrics['train/loss']:.3f}, {metrics['train/tokens_per_s']:.0f} tokens/s")
    agree = [f"L{k}={metrics[f'val/agree_l{k}']:.3f}" for k in layers[:-1] if f"val/agree_l{k}" in metrics]
    if agree:
        parts.append("agreement with the final layer " + " ".join(agree))
    return "; ".join(parts)


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


COMMAND = ConfigCommand(FinetuneConfig, "LITE fine-tuning on Ray Train (writes a Hugging Face model dir).",
                        prog="greencode finetune", presets=stage_presets("finetune"))


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = COMMAND.parse(argv)
    with published_outputs(cfg, "output_dir") as local:
        model = run(local)
    print(model)


if __name__ == "__main__":
    main()
