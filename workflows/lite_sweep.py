"""`greencode lite-sweep`: Ray Tune over the LITE loss (budgets, decay, scheme, target, lr).

Each trial is one Ray Train fine-tuning run (the same loop as `greencode finetune`, run by
:func:`workflows.finetune.run` from the Tune trial, the pattern of Ray Train V2 + Tune), in its
own run dir under the sweep: it checkpoints every ``base.checkpoint_every`` steps and writes
TensorBoard event files there, and a restarted trial resumes its run. The trained model is
then scored on the validation blocks against the base model (final-layer accuracy as a share
of the base model's, each exit's agreement with the base model's final prediction), and the
scores go to the trial's TensorBoard dir and to Tune.

Outputs under ``storage_path/name``: ``results.csv`` (every trial, ``pareto`` flag),
``pareto.csv`` (the front over final-accuracy ratio vs deep-exit agreement), ``best.json``
and ``output_path``: the best settings as a ``finetune:`` block for ``--config``. A killed
sweep resumes (``Tuner.restore``): finished trials are kept, unfinished ones continue from
their last checkpoint.

    greencode lite-sweep --preset demo-lite-sweep   # or --config my.yaml --set base.max_steps=8
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from greencode.atomic import write_atomic, write_json
from greencode.blocks import BlockSet
from greencode.config import ConfigError, FinetuneConfig, LiteSweepConfig, set_dotted
from greencode.scoring import pareto_front
from workflows.common import ConfigCommand, cli_errors, init_ray

log = logging.getLogger("greencode.lite_sweep")

SCORE = "deep_agree_base"
# A trial only drives its Ray Train run (whose workers reserve the CPUs) and scores the result;
# Tune refuses an empty request, so it reserves a token share of a CPU.
DRIVER_CPU = 0.01
FINAL = "final_acc_ratio"


def trial_grid(cfg: LiteSweepConfig) -> list[dict[str, Any]]:
    """Every combination of ``grid`` values, each checked by building its FinetuneConfig."""
    if not cfg.grid or any(not values for values in cfg.grid.values()):
        raise ConfigError("grid: give at least one value for every key")
    keys = list(cfg.grid)
    trials = [dict(zip(keys, values)) for values in itertools.product(*(cfg.grid[k] for k in keys))]
    for params in trials:
        trial_config(cfg, params, Path("."))  # a bad key or value fails here, naming it
    return trials


def trial_key(params: dict[str, Any]) -> str:
    """A stable run name for a trial's settings: a rerun finds (and resumes) the same run dir."""
    return "trial-" + hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def trial_config(cfg: LiteSweepConfig, params: dict[str, Any], out_dir: Path) -> FinetuneConfig:
    data = cfg.base.model_dump(mode="json")
    for dotted, value in params.items():
        try:
            set_dotted(data, dotted, value)
        except ConfigError as err:
            raise ConfigError(f"grid.{dotted}: {err}") from None
    runs = out_dir / "trials"
    data.update(storage_path=str(runs), run_name=trial_key(params), output_dir=str(runs / trial_key(params) / "model"))
    try:
        return FinetuneConfig.model_validate(data)
    except Exception as err:  # pydantic ValidationError: name the grid entry
        raise ConfigError(f"grid {params}: {err}") from None


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


def _batches(blocks: BlockSet, batch_size: int):
    for i in range(0, len(blocks), batch_size):
        yield blocks.batch(slice(i, i + batch_size), torch.device("cpu"))


def reference_predictions(cfg: FinetuneConfig, val: BlockSet) -> dict[str, Any]:
    """The base model's predictions on the validation blocks, computed once for every trial."""
    from greencode.modeling import load_model
    from greencode.training import exit_predictions

    lm = load_model(cfg.model.model_copy(update={"device": "cpu"}), cfg.exits)
    preds, targets = exit_predictions(lm, _batches(val, cfg.batch_size), cfg.precision)
    return {"reference": preds, "targets": targets, "layers": list(lm.exit_points) + [lm.num_layers]}


def trial(config: dict[str, Any], val_blocks: BlockSet, reference: dict[str, Any]) -> None:
    """Tune function trainable: fine-tune with this trial's settings on Ray Train, then score it."""
    from ray import tune

    from greencode.modeling import load_model
    from greencode.training import exit_predictions
    from workflows import finetune
    from workflows.finetune import _tensorboard

    cfg = FinetuneConfig.model_validate(config["trial"]["cfg"])
    model_dir = finetune.run(cfg)  # resumes the trial's run from its last checkpoint after a restart
    lm = load_model(cfg.model.model_copy(update={"name": str(model_dir), "device": "cpu"}), cfg.exits)
    preds, targets = exit_predictions(lm, _batches(val_blocks, cfg.batch_size), cfg.precision)
    if not torch.equal(targets, reference["targets"]):
        raise RuntimeError("validation blocks differ from the ones the base model was scored on")
    metrics = score(preds, targets, reference["reference"], reference["layers"], config["deep_from"])
    writer = _tensorboard(f"{finetune.run_dir(cfg)}/tensorboard")
    if writer is not None:
        for key, value in metrics.items():
            writer.add_scalar(f"sweep/{key}", value, cfg.max_steps)
        writer.close()
    tune.report({**metrics, "steps": cfg.max_steps, "model_dir": str(model_dir)})


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

    from workflows.finetune import check_config, prepare_data

    out_dir = Path(cfg.storage_path).resolve() / cfg.name
    summary_path = out_dir / "best.json"
    if summary_path.is_file() and Path(cfg.output_path).is_file():
        log.info("LITE sweep %s already finished; delete %s to rerun", cfg.name, out_dir)
        return json.loads(summary_path.read_text())
    grid = trial_grid(cfg)
    check_config(cfg.base)
    init_ray()
    _, val = prepare_data(cfg.base)
    if len(val) == 0:
        raise ConfigError("base.data: no validation blocks to score the trials on (raise data.val_fraction)")
    reference = reference_predictions(cfg.base, val)
    trainable = tune.with_resources(tune.with_parameters(trial, val_blocks=val, reference=reference),
                                   {"CPU": DRIVER_CPU})
    per_trial = cfg.base.num_workers * cfg.base.cpus_per_worker
    concurrent = cfg.max_concurrent or max(1, math.floor(ray.cluster_resources().get("CPU", 1)
                                                         / (per_trial + DRIVER_CPU)))
    experiment = str(out_dir / "tune")
    if tune.Tuner.can_restore(experiment):
        log.info("resuming the LITE sweep in %s", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        space = [{"params": p, "cfg": trial_config(cfg, p, out_dir).model_dump(mode="json")} for p in grid]
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(space), "deep_from": cfg.deep_from},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name="tune", storage_path=str(out_dir), verbose=1),
        )
    log.info("%d LITE trials of %d steps, up to %d at a time", len(grid), cfg.base.max_steps, concurrent)
    results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"{len(results.errors)} LITE sweep trials failed; first error: {results.errors[0]}")
    rows = []
    for result in results:
        params = result.config["trial"]["params"]
        rows.append({**params, **{k: v for k, v in result.metrics.items() if k == SCORE or k == FINAL or k in (
            "final_acc", "base_final_acc", "final_agree_base", "steps", "model_dir") or k.startswith("agree_base_l")}})
    rows.sort(key=lambda r: trial_key({k: r[k] for k in cfg.grid}))  # one order, fresh or restored
    front = pareto_front(_col(rows, FINAL), -_col(rows, SCORE))
    for row, on in zip(rows, front):
        row["pareto"] = bool(on)
    import pandas as pd

    frame = pd.DataFrame(rows)
    write_atomic(out_dir / "results.csv", frame.to_csv(index=False))
    write_atomic(out_dir / "pareto.csv", frame[frame["pareto"]].sort_values(FINAL).to_csv(index=False))
    best = pick_best(rows, cfg.min_final_ratio)
    params = {k: best[k] for k in cfg.grid}
    write_atomic(cfg.output_path, "# written by greencode lite-sweep: the best trial's settings\n"
                 + yaml.safe_dump({"finetune": nested(params)}, sort_keys=False))
    untuned = score(reference["reference"], reference["targets"], reference["reference"], reference["layers"],
                    cfg.deep_from)  # the starting point every trial is compared with
    summary = {"best": params, "scores": {k: v for k, v in best.items() if k not in params}, "untuned": untuned,
               "best_yaml": str(Path(cfg.output_path).resolve()), "results_csv": str(out_dir / "results.csv"),
               "pareto_csv": str(out_dir / "pareto.csv"), "tensorboard": f"tensorboard --logdir {out_dir / 'trials'}",
               "trials": len(rows)}
    write_json(summary_path, summary)
    log.info("best of %d LITE trials: %s -> %s %.3f, %s %.3f", len(rows), params, FINAL, best[FINAL], SCORE,
             best[SCORE])
    return summary


def _col(rows: list[dict[str, Any]], key: str):
    import numpy as np

    return np.array([r[key] for r in rows], dtype=float)


COMMAND = ConfigCommand(LiteSweepConfig, "Ray Tune sweep over the LITE loss (one Ray Train run per trial).",
                        prog="greencode lite-sweep")


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = COMMAND.parse(argv)
    print(json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    main()
