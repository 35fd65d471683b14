"""Self-distillation as a LITE target: the frozen starting model as teacher, mix and anchor; bf16 on CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny
from greencode.blocks import BlockSet
from greencode.config import ConfigError, FinetuneConfig, LiteLossConfig, validate
from greencode.lite import distill_loss, teacher_log_probs
from greencode.training import (
    FrozenTeacher,
    LiteObjective,
    LiteStepper,
    build_objective,
    build_optimizer,
    build_scheduler,
    exit_predictions,
)

CPU = torch.device("cpu")
VOCAB = 500


def ids(b: int = 2, s: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def finetune_cfg(**loss) -> FinetuneConfig:
    return FinetuneConfig(loss=loss, optim={"lr": 3e-3}, grad_accum=1, max_steps=4)


def stepper(lm, cfg: FinetuneConfig, base=None) -> LiteStepper:
    objective = build_objective(lm, cfg, base)
    optimizer = build_optimizer(objective.named_parameters(), cfg.optim)
    return LiteStepper(objective, optimizer, build_scheduler(optimizer, cfg.optim, cfg.max_steps), cfg, CPU)


def test_distill_loss_golden_value_and_zero_for_equal_distributions():
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    student = torch.zeros(1, 2)  # q = (1/2, 1/2)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert distill_loss(student, teacher_log_probs(teacher, 1.0), 1.0).item() == pytest.approx(kl, rel=1e-5)
    # temperature 2 softens both (teacher p = (1, √3) / (1 + √3)) and the KL is multiplied by 2²
    p = torch.tensor([1.0, math.sqrt(3.0)]) / (1 + math.sqrt(3.0))
    expected = 4 * float((p * (p / 0.5).log()).sum())
    assert distill_loss(student, teacher_log_probs(teacher, 2.0), 2.0).item() == pytest.approx(expected, rel=1e-5)
    logits = torch.randn(5, VOCAB)
    assert distill_loss(logits, teacher_log_probs(logits, 1.5), 1.5).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_is_zero_when_the_student_equals_the_teacher():
    lm = make_tiny("llama", vocab_size=VOCAB)
    objective = LiteObjective(lm, [1.0] * 4, LiteLossConfig(target="distill", anchor_weight=1.0))
    with torch.no_grad():
        total, per_exit = objective(ids())
    assert per_exit[-1].item() == pytest.approx(0.0, abs=1e-6)  # the final layer is the teacher, untouched
    assert (per_exit[:-1] > 0).all()  # the exits are not (yet) the teacher
    # the aggregate is the exits' mean KL: the final term and the anchor contribute 0
    assert total.item() == pytest.approx(per_exit[:-1].sum().item() / 4, rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_gradients_reach_every_exit_and_none_reach_the_teacher(arch):
    lm = make_tiny(arch, vocab_size=VOCAB)
    lm.model.train()
    objective = LiteObjective(lm, [1.0] * 4, LiteLossConfig(target="distill", anchor_weight=0.5))
    teacher = objective.teacher.lm.model
    objective(ids())[0].backward()
    for i, layer in enumerate(lm.adapter.layers):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters()), f"layer {i + 1}"
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # not a registered submodule: what DDP/FSDP wrap, the optimizer and the checkpoint never see it
    student_params = {id(p) for p in objective.parameters()}
    assert not student_params & {id(p) for p in teacher.parameters()}
    assert all(key.startswith("model.") for key in objective.state_dict())


def test_teacher_stays_the_starting_model_while_the_student_moves():
    lm = make_tiny("llama", vocab_size=VOCAB)
    start = {k: v.clone() for k, v in lm.model.state_dict().items()}
    train = stepper(lm, finetune_cfg(target="distill"))
    for _ in range(3):
        train.train_step([(ids(seed=1), None)])
    teacher = train.objective.teacher.lm.model.state_dict()
    assert all(torch.equal(teacher[k], start[k]) for k in start)
    assert any(not torch.equal(lm.model.state_dict()[k], start[k]) for k in start)


def test_resumed_student_distils_from_the_base_it_started_from():
    base = make_tiny("llama", vocab_size=VOCAB, seed=0)
    resumed = make_tiny("llama", vocab_size=VOCAB, seed=1)  # stands in for a checkpoint
    objective = build_objective(resumed, finetune_cfg(target="distill"), base=base)
    assert objective.teacher.lm.model is base.model
    x = ids()
    with torch.no_grad():
        rows = torch.arange(x.shape[0] * (x.shape[1] - 1))
        expected = base.decode(base.forward_exits(x).hidden_states[-1][:, :-1].reshape(-1, 64))
        torch.testing.assert_close(objective.teacher.logits(x, None, rows), expected)


def test_dataset_target_builds_no_teacher_and_anchor_alone_does():
    lm = make_tiny("llama", vocab_size=VOCAB)
    assert build_objective(lm, finetune_cfg()).teacher is None
    assert build_objective(lm, finetune_cfg(anchor_weight=0.2)).teacher is not None


def test_mix_is_the_weighted_sum_of_both_targets_and_anchor_adds_the_final_kl():
    lm = make_tiny("opt", vocab_size=VOCAB)
    with torch.no_grad():  # the student has moved away from its teacher (the same seed's model)
        for p in lm.adapter.layers[-1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher_model = make_tiny("opt", vocab_size=VOCAB).model
    x, w = ids(), [0.4, 0.3, 0.2, 0.1]

    def run(**loss):
        objective = LiteObjective(lm, w, LiteLossConfig(temperature=2.0, **loss), teacher=FrozenTeacher(teacher_model))
        with torch.no_grad():
            return objective(x)

    _, dataset = run(target="dataset")
    _, distill = run(target="distill")
    _, mix = run(target="mix", mix_share=0.25)
    torch.testing.assert_close(mix, 0.75 * dataset + 0.25 * distill)
    plain, per_exit = run(target="distill")
    anchored, _ = run(target="distill", anchor_weight=0.5)
    assert per_exit[-1] > 0
    torch.testing.assert_close(anchored - plain, 0.5 * per_exit[-1])


def test_distill_trains_under_ddp_with_the_teacher_outside_the_wrapper(tmp_path):
    """DDP (what Ray Train's prepare_model applies) as a 1-process gloo group on CPU."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        lm = make_tiny("llama", vocab_size=VOCAB)
        cfg = finetune_cfg(target="distill", anchor_weight=0.5, exit_sampling="rotational", exits_per_step=1,
                           position_fraction=0.5)
        objective = DDP(build_objective(lm, cfg))
        assert objective.module.teacher is not None
        assert not any("teacher" in name for name, _ in objective.named_parameters())
        optimizer = build_optimizer(objective.named_parameters(), cfg.optim)
        train = LiteStepper(objective, optimizer, build_scheduler(optimizer, cfg.optim, cfg.max_steps), cfg, CPU)
        stats = [train.train_step([(ids(seed=s), None)]) for s in range(3)]
    finally:
        dist.destroy_process_group()
    decoded = [[not math.isnan(x) for x in s.exit_losses[:-1]] for s in stats]
    assert decoded == [[True, False, False], [False, True, False], [False, False, True]]  # one exit per step
    assert all(math.isfinite(s.loss) and s.grad_norm > 0 for s in stats)


def test_bf16_autocast_step_runs_on_cpu_and_matches_fp32_roughly():
    losses = {}
    for precision in ("fp32", "bf16"):
        lm = make_tiny("llama", vocab_size=VOCAB)
        cfg = finetune_cfg(target="mix", position_fraction=0.5).model_copy(update={"precision": precision})
        train = stepper(lm, cfg)
        losses[precision] = [train.train_step([(ids(seed=s), None)]).loss for s in range(3)]
    assert all(math.isfinite(x) for x in losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_exit_predictions_compare_a_model_with_its_base():
    lm = make_tiny("llama", vocab_size=VOCAB)
    blocks = BlockSet(np.asarray(ids(3, 10, seed=4), dtype=np.int32), np.array([10, 10, 6], dtype=np.int32))
    batches = [blocks.batch(slice(0, 2), CPU), blocks.batch(slice(2, 3), CPU)]
    preds, targets = exit_predictions(lm, batches)
    assert preds.shape == (len(lm.exit_points) + 1, 2 * 9 + 5) and targets.shape == (23,)
    with torch.no_grad():
        logits = lm.model(torch.as_tensor(blocks.ids[:2], dtype=torch.long)).logits[:, :-1]
    assert torch.equal(preds[-1, :18], logits.argmax(-1).reshape(-1))
    assert torch.equal(targets[:18], torch.as_tensor(blocks.ids[:2, 1:], dtype=torch.long).reshape(-1))


@pytest.mark.parametrize(("loss", "field"), [({"target": "teacher"}, "loss.target"),
                                             ({"position_fraction": 0}, "loss.position_fraction"),
                                             ({"temperature": -1}, "loss.temperature")])
def test_bad_loss_settings_name_the_field(loss, field):
    with pytest.raises(ConfigError, match=field):
        validate(FinetuneConfig, {"loss": loss})


def test_kl_matches_torch_reference_on_random_logits():
    student, teacher = torch.randn(4, 9), torch.randn(4, 9)
    expected = F.kl_div(F.log_softmax(student, -1), F.softmax(teacher, -1), reduction="batchmean")
    torch.testing.assert_close(distill_loss(student, teacher_log_probs(teacher, 1.0), 1.0), expected)


@pytest.mark.ray
def test_distill_config_trains_under_ray_train_with_two_cpu_workers(ray_local, tiny_model_dir, tmp_path):
    from greencode.checkpoints import read_exit_plan
    from test_finetune import tiny_run_config
    from workflows.finetune import fit, publish

    cfg = tiny_run_config(tiny_model_dir, tmp_path, max_steps=2, checkpoint_every=2, val_every=2,
                          loss={"target": "distill", "anchor_weight": 0.5})
    result = fit(cfg)
    assert result.metrics["train/ranks"] == 2 and math.isfinite(result.metrics["train/loss"])
    assert all(math.isfinite(result.metrics[f"train/loss_l{k}"]) for k in (4, 6, 10, 12))
    plan = read_exit_plan(publish(cfg, result))
    assert plan["step"] == 2 and plan["loss"]["target"] == "distill"
