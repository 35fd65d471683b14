"""LITE fine-tuning: the Ray-agnostic core on tiny random models, then real Ray Train (2 CPU workers)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny
from greencode.blocks import BlockSampler, BlockSet, build_blocks
from greencode.checkpoints import TrainerState, read_exit_plan
from greencode.config import ConfigError, FinetuneConfig, PipelineConfig, load_config
from greencode.data import SourceFile
from greencode.lite import next_token_loss
from greencode.manifest import StaleWorkError
from greencode.training import (
    LiteObjective,
    LiteStepper,
    build_optimizer,
    build_scheduler,
    loss_weights,
)
from greencode.validation import validation_counts, validation_metrics

CPU = torch.device("cpu")


def stepper_for(lm, cfg: FinetuneConfig) -> LiteStepper:
    objective = LiteObjective(lm, loss_weights(lm, cfg))
    optimizer = build_optimizer(objective.named_parameters(), cfg.optim)
    return LiteStepper(objective, optimizer, build_scheduler(optimizer, cfg.optim, cfg.max_steps), cfg, CPU)


def random_blocks(n: int, seq_len: int, vocab: int = 49152, seed: int = 0) -> BlockSet:
    ids = np.random.default_rng(seed).integers(0, vocab, size=(n, seq_len), dtype=np.int32)
    return BlockSet(ids, np.full(n, seq_len, dtype=np.int32))


# --------------------------------------------------------------------------- data order


def test_sampler_covers_every_block_once_per_epoch_across_ranks():
    num_blocks, batch, accum, world = 48, 2, 3, 2  # 12 blocks per step -> exactly 4 steps per epoch
    seen = {rank: [] for rank in range(world)}
    for rank in range(world):
        sampler = BlockSampler(num_blocks, batch, accum, world, rank, seed=7)
        for step in range(4):
            for rows in sampler.micro_batches(step):
                assert len(rows) == batch
                seen[rank] += rows
    everything = seen[0] + seen[1]
    assert sorted(everything) == list(range(num_blocks))  # no block twice, none left out
    assert not set(seen[0]) & set(seen[1])
    # the next epoch is a different permutation of the same blocks
    nxt = [r for rank in range(world) for s in range(4, 8)
           for rows in BlockSampler(num_blocks, batch, accum, world, rank, seed=7).micro_batches(s) for r in rows]
    assert sorted(nxt) == list(range(num_blocks)) and nxt != everything


def test_sampler_is_a_pure_function_of_the_step():
    """What makes resume reproduce the data order: a fresh sampler gives the same rows at step s."""
    a = BlockSampler(100, 4, 2, 2, 1, seed=3)
    b = BlockSampler(100, 4, 2, 2, 1, seed=3)
    assert [a.micro_batches(s) for s in range(20)] == [b.micro_batches(s) for s in reversed(range(20))][::-1]
    assert a.micro_batches(0) != BlockSampler(100, 4, 2, 2, 1, seed=4).micro_batches(0)


def test_sampler_rejects_a_corpus_smaller_than_one_batch():
    with pytest.raises(ValueError, match="only 3 training blocks"):
        BlockSampler(3, 2, 1, world_size=2)


def test_build_blocks_packs_and_pads(tokenizer):
    files = [SourceFile("a.py", "def f(x):\n    return x + 1\n" * 20, "python"),
             SourceFile("b.py", "import os\nprint(os.getcwd())\n", "python")]
    packed = build_blocks(files, tokenizer, 16)
    assert packed.ids.shape[1] == 16 and not packed.padded
    unpacked = build_blocks(files, tokenizer, 64, pack=False)
    assert len(unpacked) == 2 and unpacked.padded
    ids, mask = unpacked.batch([1], CPU)
    n = int(unpacked.lengths[1])
    assert mask[0, :n].all() and not mask[0, n:].any()
    assert ids[0, n - 1].item() == tokenizer.eos_token_id  # files end with EOS


# --------------------------------------------------------------------------- objective and step


def test_objective_ignores_padding(tokenizer):
    lm = make_tiny("llama", tokenizer=tokenizer)
    objective = LiteObjective(lm, loss_weights(lm, FinetuneConfig()))
    ids = torch.randint(0, 49152, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    with torch.no_grad():
        full, per_exit = objective(ids)
        masked, per_exit_masked = objective(padded, mask)
    torch.testing.assert_close(per_exit_masked, per_exit)
    torch.testing.assert_close(masked, full)
    # the final entry is the model's ordinary next-token loss
    with torch.no_grad():
        plain = next_token_loss(lm.model(ids).logits, ids)
    torch.testing.assert_close(per_exit[-1], plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_train_steps_lower_the_loss_at_every_exit(tokenizer, arch):
    lm = make_tiny(arch, tokenizer=tokenizer)
    cfg = FinetuneConfig(optim={"lr": 3e-3}, grad_accum=1, max_steps=8)
    stepper = stepper_for(lm, cfg)
    batch = random_blocks(4, 16).batch(slice(0, 4), CPU)
    first = stepper.train_step([batch])
    for _ in range(7):
        last = stepper.train_step([batch])
    assert last.loss < first.loss - 0.5
    assert all(b < a for a, b in zip(first.exit_losses, last.exit_losses))
    assert first.tokens == 4 * 16 and first.grad_norm > 0


def test_grad_accumulation_equals_one_big_batch(tokenizer):
    """2 micro-batches of 2 must take the same optimizer step as one batch of 4 (equal-length blocks)."""
    blocks = random_blocks(4, 12)
    results = []
    for accum, batches in ((1, [blocks.batch(slice(0, 4), CPU)]),
                           (2, [blocks.batch(slice(0, 2), CPU), blocks.batch(slice(2, 4), CPU)])):
        lm = make_tiny("llama", tokenizer=tokenizer, seed=1)
        cfg = FinetuneConfig(grad_accum=accum, optim={"lr": 1e-3}, precision="fp32")  # exact sums need fp32
        stats = stepper_for(lm, cfg).train_step(batches)
        results.append((stats, copy.deepcopy(lm.model.state_dict())))
    (one, w_one), (two, w_two) = results
    assert one.loss == pytest.approx(two.loss, rel=1e-5)
    assert one.grad_norm == pytest.approx(two.grad_norm, rel=1e-4)
    # AdamW's first step moves a weight by ~lr * g / |g|: where g is ~0, float32 summation order (one batch vs two)
    # moves it by up to a few 1e-6 (seen: 2.3e-6 of lr 1e-3 on one of 8192 weights); 1% of lr still catches any
    # step in another direction (the scale of the gradient is checked by grad_norm above)
    for key in w_one:
        torch.testing.assert_close(w_one[key], w_two[key], rtol=1e-5, atol=1e-5)


def test_grad_clip_bounds_the_update(tokenizer):
    lm = make_tiny("llama", tokenizer=tokenizer)
    stepper = stepper_for(lm, FinetuneConfig(optim={"grad_clip": 1e-3}))
    norms = []  # the gradient norm the optimizer actually sees
    stepper.optimizer.register_step_pre_hook(lambda opt, args, kwargs: norms.append(torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None])).item()))
    stats = stepper.train_step([random_blocks(2, 12).batch(slice(0, 2), CPU)])
    assert stats.grad_norm > 1e-2  # reported: the norm before clipping
    assert norms == [pytest.approx(1e-3, rel=1e-3)]


def test_linear_schedule_decays_to_zero(tokenizer):
    lm = make_tiny("llama", tokenizer=tokenizer)
    cfg = FinetuneConfig(optim={"schedule": "linear", "lr": 1e-3}, max_steps=4)
    stepper = stepper_for(lm, cfg)
    lrs = []
    for _ in range(4):
        lrs.append(stepper.scheduler.get_last_lr()[0])
        stepper.train_step([random_blocks(1, 8).batch(slice(0, 1), CPU)])
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert stepper.scheduler.get_last_lr()[0] == 0.0


# --------------------------------------------------------------------------- validation


def test_validation_counts_match_a_manual_loop(tokenizer):
    lm = make_tiny("opt", tokenizer=tokenizer)
    blocks = random_blocks(3, 10, seed=5)
    metrics = validation_metrics(lm, blocks, batch_size=2)
    layers = lm.exit_points + [lm.num_layers]
    ids = torch.as_tensor(blocks.ids, dtype=torch.long)
    with torch.no_grad():
        preds = [lm.decode(h)[:, :-1].argmax(-1) for h in lm.forward_exits(ids).hidden_states]
    for layer, p in zip(layers, preds):
        assert metrics[f"val/acc_l{layer}"] == pytest.approx((p == ids[:, 1:]).float().mean().item())
    for layer, p in zip(layers[:-1], preds):
        assert metrics[f"val/agree_l{layer}"] == pytest.approx((p == preds[-1]).float().mean().item())
    assert f"val/agree_l{lm.num_layers}" not in metrics  # 1 by definition
    counts = validation_counts(lm, [blocks.batch(slice(0, 3), CPU)])
    assert torch.equal(counts[1, -1], counts[3, -1])  # the final layer agrees with itself everywhere


# --------------------------------------------------------------------------- configs


def test_demo_preset_is_the_demo_pipelines_finetune_stage():
    from workflows.finetune import COMMAND
    from workflows.pipeline import preset_path, stage_configs

    cfg = COMMAND.config(COMMAND.parser.parse_args(["--preset", "demo"]))
    assert cfg == stage_configs(load_config(PipelineConfig, preset_path("demo")))["finetune"]  # one source
    assert cfg.model.name == "embedded" and cfg.num_workers * cfg.cpus_per_worker <= 2 and cfg.max_failures >= 1


@pytest.mark.parametrize(("setting", "message"), [({"precision": "fp16"}, "fp16 needs GPU workers"),
                                                  ({"strategy": "fsdp", "num_workers": 2}, "fsdp needs GPU workers")])
def test_gpu_only_settings_without_gpu_are_config_errors_before_ray_starts(tmp_path, setting, message):
    from workflows.finetune import run

    with pytest.raises(ConfigError, match=message):
        run(FinetuneConfig(output_dir=str(tmp_path / "m"), **setting))


def test_fsdp_objective_trains_validates_and_saves_full_weights(tmp_path, tokenizer):
    """The FSDP code path (Ray Train uses it on GPU workers), here as a 1-process gloo group on CPU."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import AutoModelForCausalLM

    from greencode.distributed import full_params, load_optimizer_state, optimizer_state

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        lm = make_tiny("llama", tokenizer=tokenizer)
        cfg = FinetuneConfig(optim={"lr": 3e-3})
        objective = FSDP(LiteObjective(lm, loss_weights(lm, cfg)), device_id=CPU)
        optimizer = build_optimizer(objective.named_parameters(), cfg.optim)
        stepper = LiteStepper(objective, optimizer, build_scheduler(optimizer, cfg.optim, 4), cfg, CPU)
        batch = random_blocks(2, 12).batch(slice(0, 2), CPU)
        losses = [stepper.train_step([batch]).loss for _ in range(4)]
        assert losses[-1] < losses[0]
        with full_params(objective):
            assert validation_metrics(lm, random_blocks(2, 12), 2)["val/loss_l4"] > 0
            lm.model.save_pretrained(tmp_path / "out")
        load_optimizer_state(objective, optimizer, optimizer_state(objective, optimizer))
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
        assert saved.model.layers[0].mlp.up_proj.weight.shape == (128, 64)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- Ray Train


def tiny_run_config(tiny_model_dir: Path, tmp: Path, **kw) -> FinetuneConfig:
    data = {"corpus": "stdlib", "max_files": 16, "val_fraction": 0.2, "test_fraction": 0.0}
    base = {"model": {"name": str(tiny_model_dir)}, "data": data, "seq_len": 32, "batch_size": 2, "grad_accum": 1,
            "optim": {"lr": 2e-3}, "num_workers": 2, "cpus_per_worker": 0.5, "report_every": 2,
            "checkpoint_every": 3, "val_every": 3, "val_batches": 2, "keep_checkpoints": 2,
            "storage_path": str(tmp / "runs"), "run_name": "t"}
    return FinetuneConfig.model_validate({**base, **kw})


@pytest.mark.ray
def test_ray_train_two_workers_checkpoint_and_resume(ray_local, tiny_model_dir, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from greencode.modeling import load_model
    from workflows.finetune import fit, prepare_data, publish, run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, max_steps=6, output_dir=str(tmp_path / "model6"))
    out = run(cfg)
    plan = read_exit_plan(out)
    assert plan["step"] == 6 and plan["exit_points"] == [4, 6, 10]
    assert not (out / "trainer_state.pt").exists()  # the published dir holds the model, not the optimizer
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert hf.config.num_hidden_layers == 12
    AutoTokenizer.from_pretrained(out)

    # the held-out validation loss of the published model is below the base model's, at every exit
    _, val = prepare_data(cfg)
    before = validation_metrics(load_model(cfg.model), val, 2)
    after = validation_metrics(load_model(cfg.model.model_copy(update={"name": str(out)})), val, 2)
    for layer in (4, 6, 10, 12):
        assert after[f"val/loss_l{layer}"] < before[f"val/loss_l{layer}"]

    # same run name + storage: the second run resumes at step 6 (optimizer + data order restored)
    assert run(cfg) == out  # finished model: skipped
    longer = cfg.model_copy(update={"max_steps": 9, "output_dir": str(tmp_path / "model9")})
    result = fit(longer)
    assert result.metrics["start_step"] == 6 and result.metrics["step"] == 9
    assert "val/agree_l4" in result.metrics and result.metrics["train/ranks"] == 2
    assert read_exit_plan(publish(longer, result))["step"] == 9
    # killed after its last checkpoint but before publishing: a rerun publishes without training
    shutil.rmtree(longer.output_dir)
    assert read_exit_plan(run(longer))["step"] == 9
    run_dir = tmp_path / "runs" / "t"
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_000006", "checkpoint_000009"]
    assert any((run_dir / "tensorboard").iterdir())
    state = TrainerState.load(run_dir / "checkpoint_000009")
    assert state.step == 9 and state.optimizer["state"]
    # another lr on the same run dir neither reuses its model nor continues its checkpoints: refused, named
    other = longer.model_copy(update={"optim": longer.optim.model_copy(update={"lr": 1e-3})})
    with pytest.raises(StaleWorkError, match=r"holds Ray Train checkpoints of another run \(config optim.lr: "):
        run(other)


@pytest.mark.ray
def test_missing_model_and_bad_corpus_are_config_errors(ray_local, tiny_model_dir, tmp_path):
    from workflows.finetune import run

    with pytest.raises(ConfigError, match="model.name .*nowhere"):
        run(tiny_run_config(tmp_path / "nowhere", tmp_path, max_steps=1))
    with pytest.raises(ConfigError, match="no such directory"):
        run(tiny_run_config(tiny_model_dir, tmp_path, max_steps=1, data={"corpus": f"dir:{tmp_path / 'missing'}"}))


@pytest.mark.ray
def test_more_cpus_than_the_cluster_has_is_a_clear_error(ray_local, tiny_model_dir, tmp_path):
    from workflows.finetune import run

    cfg = tiny_run_config(tiny_model_dir, tmp_path, max_steps=1, cpus_per_worker=2.0)
    with pytest.raises(ConfigError, match="4 CPUs but Ray has 2"):
        run(cfg)


def test_cli_reports_a_bad_config_in_one_line(tmp_path):
    from workflows.finetune import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"optim": {"lr": -1}}))
    with pytest.raises(SystemExit, match="optim.lr"):
        main(["--config", str(bad)])
