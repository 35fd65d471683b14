"""`greencode lite-sweep`: Ray Tune over the LITE loss (budgets, decay, scheme, target, lr).

Each trial is one Ray Train fine-tuning run (the same loop as `greencode finetune`, run by
:func:`workflows.finetune.run` from the Tune trial, the pattern of Ray Train V2 + Tune), in its
own run dir under the sweep (``runs/<key>``, named by its settings): it checkpoints every
``base.checkpoint_every`` steps and writes TensorBoard event files there, and a restarted
trial resumes its run. The trained model is then scored on the validation blocks against the
base model (final-layer accuracy as a share of the base model's, each exit's agreement with the
base model's final prediction), and the scores go to the trial's TensorBoard dir and to Tune.

Outputs under ``storage_path/name``: ``results.csv`` (every trial, ``pareto`` flag),
``pareto.csv`` (the front over final-accuracy ratio vs deep-exit agreement), ``best.json``
and ``output_path``: the best settings as a ``finetune:`` block for ``--config``. Reuse of
finished trials (a value added to the grid trains only the new points), restore of a killed
sweep of the same settings and these outputs are the shared Tune driver's (workflows.tune).

    greencode lite-sweep --preset demo-lite-sweep   # or --config my.yaml --set base.max_steps=8
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from greencode.atomic import write_atomic
from greencode.blocks import BlockSet
from greencode.config import ConfigError, FinetuneConfig, LiteSweepConfig, result_config, set_dotted
from greencode.manifest import StageIdentity
from workflows import tune as tune_driver
from workflows.common import ConfigCommand, summary_main
from workflows.tune import Trial, TunePlan, key_of

log = logging.getLogger("greencode.lite_sweep")

SCORE = "deep_agree_base"
# A trial only drives its Ray Train run (whose workers reserve the CPUs) and scores the result;
# Tune refuses an empty request, so it reserves a token share of a CPU.
DRIVER_CPU = 0.01
FINAL = "final_acc_ratio"
SCORES = (SCORE, FINAL, "final_acc", "base_final_acc", "final_agree_base", "steps")  # and agree_base_l<layer>


def trial_grid(cfg: LiteSweepConfig) -> list[dict[str, Any]]:
    """Every combination of ``grid`` values, each checked by building its FinetuneConfig."""
    if not cfg.grid or any(not values for values in cfg.grid.values()):
        raise ConfigError("grid: give at least one value for every key")
    keys = list(cfg.grid)
    trials = [dict(zip(keys, values)) for values in itertools.product(*(cfg.grid[k] for k in keys))]
    for params in trials:
        trial_config(cfg, params)  # a bad key or value fails here, naming it
    return trials


def trial_config(cfg: LiteSweepConfig, params: dict[str, Any]) -> FinetuneConfig:
    """``base`` with one trial's grid values (its run dir is set by :func:`trials`)."""
    data = cfg.base.model_dump(mode="json")
    for dotted, value in params.items():
        try:
            set_dotted(data, dotted, value)
        except ConfigError as err:
            raise ConfigError(f"grid.{dotted}: {err}") from None
    try:
        return FinetuneConfig.model_validate(data)
    except Exception as err:  # pydantic ValidationError: name the grid entry
        raise ConfigError(f"grid {params}: {err}") from None


def _scoring(cfg: LiteSweepConfig) -> dict[str, Any]:
    """Settings the scores depend on beyond training: the deep exits scored, the validation blocks scored on."""
    return {"deep_from": cfg.deep_from, "val_batches": cfg.base.val_batches}


def run_identity(cfg: LiteSweepConfig, base_model: str | None) -> StageIdentity:
    """What the sweep's trials and its best settings depend on: grid, base recipe, scoring, base model content."""
    return StageIdentity({**result_config(cfg), "scoring": _scoring(cfg)}, {"base_model": base_model})


def trials(cfg: LiteSweepConfig, out_dir: Path, base_model: str | None) -> list[Trial]:
    """One trial per grid point. Its Ray Train run dir (``runs/<key>``) is named by its fine-tuning
    settings and base model, its record by those and the scoring settings: a scoring change rescores
    the trained models without training them again."""
    inputs = {"base_model": base_model}
    out = []
    for params in trial_grid(cfg):
        ft = trial_config(cfg, params)
        run_name = key_of(StageIdentity(result_config(ft), inputs), "run")
        runs = out_dir / "runs"
        ft = ft.model_copy(update={"storage_path": str(runs), "run_name": run_name,
                                   "output_dir": str(runs / run_name / "model")})
        key = key_of(StageIdentity({"finetune": result_config(ft), "scoring": _scoring(cfg)}, inputs))
        out.append(Trial(key, params, {"cfg": ft.model_dump(mode="json"), "deep_from": cfg.deep_from}))
    return out


def nested(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in params.items():
        set_dotted(out, dotted, value)
    return out


def score(preds: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor, layers: list[int],
          deep_from: float) -> dict[str, float]:
    """Scores of a tuned model's predictions ``preds`` [e + 1, N] against the base model's ``reference``.

    ``deep_agree_base``: mean agreement with the base model's final argmax over the exits deeper
    than ``deep_from`` of the layers; ``final_acc_ratio``: final-layer accuracy / the base model's.
    """
    base_acc = float((reference[-1] == targets).double().mean())
    out = {"final_acc": float((preds[-1] == targets).double().mean()), "base_final_acc": base_acc}
    out[FINAL] = out["final_acc"] / base_acc if base_acc > 0 else math.nan
    agree = (preds == reference[-1]).double().mean(dim=1).tolist()
    out["final_agree_base"] = agree[-1]
    deep = []
    for layer, a in zip(layers[:-1], agree[:-1]):
        out[f"agree_base_l{layer}"] = a
        if layer > deep_from * layers[-1]:
            deep.append(a)
    out[SCORE] = sum(deep) / len(deep) if deep else math.nan
    return out


def reference_predictions(cfg: FinetuneConfig, val: BlockSet) -> dict[str, Any]:
    """The base model's predictions on the validation blocks, computed once for every trial."""
    from greencode.modeling import load_model
    from greencode.training import exit_predictions

    lm = load_model(cfg.model.model_copy(update={"device": "cpu"}), cfg.exits)
    preds, targets = exit_predictions(lm, val.batches(cfg.batch_size, torch.device("cpu")), cfg.precision)
    return {"reference": preds, "targets": targets, "layers": list(lm.exit_points) + [lm.num_layers]}


def trial(config: dict[str, Any], val_blocks: BlockSet, reference: dict[str, Any]) -> None:
    """Tune function trainable: fine-tune with this trial's settings on Ray Train, then score it."""
    from ray import tune

    from greencode.modeling import load_model
    from greencode.training import exit_predictions
    from workflows import finetune
    from workflows.finetune import _tensorboard

    cfg = FinetuneConfig.model_validate(config["trial"]["config"]["cfg"])
    model_dir = finetune.run(cfg)  # resumes the trial's run from its last checkpoint after a restart
    lm = load_model(cfg.model.model_copy(update={"name": str(model_dir), "device": "cpu"}), cfg.exits)
    preds, targets = exit_predictions(lm, val_blocks.batches(cfg.batch_size, torch.device("cpu")), cfg.precision)
    if not torch.equal(targets, reference["targets"]):
        raise RuntimeError("validation blocks differ from the ones the base model was scored on")
    metrics = score(preds, targets, reference["reference"], reference["layers"], config["trial"]["config"]["deep_from"])
    writer = _tensorboard(f"{finetune.run_dir(cfg)}/tensorboard")
    if writer is not None:
        for key, value in metrics.items():
            writer.add_scalar(f"sweep/{key}", value, cfg.max_steps)
        writer.close()
    tune.report({**metrics, "steps": cfg.max_steps, "model_dir": str(model_dir)})


def keep(trial: Trial, result: Any, trial_dir: Path) -> tuple[dict[str, Any], Path]:
    """A finished trial's scores; its artifact is the model its Ray Train run published."""
    scores = {k: v for k, v in result.metrics.items() if k in SCORES or k.startswith("agree_base_l")}
    return scores, Path(result.metrics["model_dir"])


def pick_best(rows: list[dict[str, Any]], min_final_ratio: float) -> dict[str, Any]:
    """Most deep agreement among trials keeping ``min_final_ratio``; else the one keeping the most accuracy."""
    def num(value: float) -> float:  # NaN (a base model that predicts nothing right) ranks last
        return -math.inf if math.isnan(value) else value

    kept = [r for r in rows if r[FINAL] >= min_final_ratio]
    if kept:
        return max(kept, key=lambda r: (num(r[SCORE]), num(r[FINAL])))
    log.warning("no trial keeps %.2f of the base final accuracy: the best is the one that keeps the most",
                min_final_ratio)
    return max(rows, key=lambda r: (num(r[FINAL]), num(r[SCORE])))


def run(cfg: LiteSweepConfig) -> dict[str, Any]:
    """Run (resume, or reuse a finished) sweep; returns the best trial's settings and scores."""
    import ray
    from ray import tune

    from greencode.modeling import model_digest
    from workflows.finetune import check_config, prepare_data

    check_config(cfg.base)
    out_dir = Path(cfg.storage_path).resolve() / cfg.name
    base_model = model_digest(cfg.base.model)
    grid = trials(cfg, out_dir, base_model)  # a bad grid key or value fails here, naming it

    @functools.cache
    def scored_on() -> tuple[BlockSet, dict[str, Any]]:
        """The validation blocks and the base model's predictions on them (only when something is scored)."""
        _, val = prepare_data(cfg.base)
        if len(val) == 0:
            raise ConfigError("base.data: no validation blocks to score the trials on (raise data.val_fraction)")
        return val, reference_predictions(cfg.base, val)

    def plan(pending: list[Trial]) -> TunePlan:
        val, reference = scored_on()
        trainable = tune.with_resources(tune.with_parameters(trial, val_blocks=val, reference=reference),
                                       {"CPU": DRIVER_CPU})
        per_trial = cfg.base.num_workers * cfg.base.cpus_per_worker
        log.info("LITE trials of %d steps", cfg.base.max_steps)
        return TunePlan(trainable, cfg.max_concurrent or max(1, math.floor(ray.cluster_resources().get("CPU", 1)
                                                                          / (per_trial + DRIVER_CPU))))

    def export(best: dict[str, Any]) -> dict[str, Any]:
        params = {k: best[k] for k in cfg.grid}
        write_atomic(cfg.output_path, "# written by greencode lite-sweep: the best trial's settings\n"
                     + yaml.safe_dump({"finetune": nested(params)}, sort_keys=False))
        _, reference = scored_on()
        untuned = score(reference["reference"], reference["targets"], reference["reference"], reference["layers"],
                        cfg.deep_from)  # the starting point every trial is compared with
        scores = {k: v for k, v in best.items() if k in SCORES or k.startswith("agree_base_l")}
        return {"best": params, "scores": scores, "untuned": untuned, "best_yaml": str(Path(cfg.output_path).resolve())}

    return tune_driver.run(tune_driver.Sweep(
        "LITE sweep", out_dir, run_identity(cfg, base_model), grid, Path(cfg.output_path), plan, keep,
        ((FINAL, "max"), (SCORE, "max")), lambda rows: pick_best(rows, cfg.min_final_ratio), export))


COMMAND = ConfigCommand(LiteSweepConfig, "Ray Tune sweep over the LITE loss (one Ray Train run per trial).",
                        prog="greencode lite-sweep")


main = summary_main(COMMAND, run, outputs=("output_path",))

if __name__ == "__main__":
    main()
