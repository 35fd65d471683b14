"""LITE recipes side by side: which keeps the final layer and teaches the deep exits most per CPU-second.

    .venv/bin/python -m benchmarks.lite_recipes --steps 40                        # every built-in recipe
    .venv/bin/python -m benchmarks.lite_recipes --budget-s 400 --recipes demo,old-demo,distill-deep
    .venv/bin/python -m benchmarks.lite_recipes --steps 30 --recipe 'mine: loss.target=mix optim.lr=1e-4'
    .venv/bin/python -m benchmarks.lite_recipes --timing 3                        # per-step cost only
    .venv/bin/python -m benchmarks.lite_recipes --steps 60 --recipes distill-deep --save /tmp/recipes
    .venv/bin/python -m benchmarks.lite_recipes --steps 30 --recipes demo --translators 20480  # + translators
    .venv/bin/greencode eval --model /tmp/recipes/distill-deep --base-model embedded --gates full ...

Every recipe starts from the same model (the embedded SmolLM2-135M unless ``--model``) and trains,
in this process (no Ray), on the same data order: blocks of the stdlib's ``train`` split in a seeded
permutation (``greencode.blocks.BlockSampler``), until ``--steps`` optimizer steps or ``--budget-s``
seconds of training, whichever comes first. It is then scored on held-out blocks of the
``validation`` split (never trained on), always cut at ``--val-seq-len``:

- ``acc``: final-layer next-token accuracy, and ``acc/base`` its ratio to the untuned model's;
- ``final=base``: how often the final layer's argmax equals the *untuned* model's final argmax;
- ``L{k}``: how often exit k's argmax equals the untuned model's final argmax (the row ``untuned``
  is the starting point).

Scoring always runs in fp32 (as the model is served), whatever precision a recipe trains in.

``--translators TOKENS`` adds, for the untuned model and after every recipe, a row scored with exit
translators fit on that model (greencode.translators, closed form at ``--translator-ridge``) from the
first TOKENS training tokens: LITE, translators on the frozen base model, and translators on a LITE
model side by side on the same held-out blocks.

``--timing N`` instead measures the per-step cost of each recipe: N rounds, each building every
recipe fresh and timing its second step on one fixed batch, recipes interleaved so that load from
other processes hits them alike; it prints the median seconds per step and the ratio to the first
recipe. Timings depend on the machine's load: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from greencode.atomic import atomic_path
from greencode.blocks import BlockSampler, BlockSet, build_blocks
from greencode.checkpoints import exit_plan, save_model_dir
from greencode.config import DataConfig, ExitConfig, FinetuneConfig, ModelConfig, load_config, parse_overrides
from greencode.data import SourceFile, load_corpus
from greencode.modeling import EarlyExitModel, load_model
from greencode.precision import training_weights
from greencode.training import (
    LiteStepper,
    build_objective,
    build_optimizer,
    build_scheduler,
    exit_predictions,
)
from greencode.translators import ExitTranslators, collect_stats

log = logging.getLogger("benchmarks.lite_recipes")
CPU = torch.device("cpu")

# Shared by every recipe unless it overrides them: the demo's shape (4 x 128-token blocks, one
# micro-batch per step) on the 2-core CPU.
BASE = {"seq_len": 128, "batch_size": 4, "grad_accum": 1, "precision": "auto", "optim": {"lr": 3e-5}}
DEEP = {"first_half_budget": 0.0}  # only the second-half exits (18, 22, 26 on 30 layers) and the final layer
RECIPES: dict[str, dict[str, Any]] = {
    "old-demo": {"precision": "fp32", "optim": {"lr": 2e-4}},  # the demo before issue 10: decaying, final 0.1
    # workflows/presets/demo.yaml: self-distillation on the deep exits + final, anchored to the base model
    "demo": {"loss": {"target": "distill", "second_half_budget": 0.5, "final_budget": 0.5, "anchor_weight": 2.0,
                      **DEEP}, "optim": {"lr": 1e-4}},
    "dataset": {"loss": {"final_budget": 0.5}},
    "distill": {"loss": {"target": "distill", "final_budget": 0.5}},
    "mix": {"loss": {"target": "mix", "final_budget": 0.5}},
    "distill-deep": {"loss": {"target": "distill", "final_budget": 0.5, **DEEP}},
    "distill-deep-pos25": {"loss": {"target": "distill", "final_budget": 0.5, "position_fraction": 0.25, **DEEP}},
    "distill-rot3": {"loss": {"target": "distill", "final_budget": 0.5, "exit_sampling": "rotational"}},
}


@dataclass
class Recipe:
    name: str
    cfg: FinetuneConfig
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    recipe: Recipe
    steps: int
    seconds: float
    step_seconds: list[float]
    acc: float
    final_agree: float
    exit_agree: list[float]


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def make_recipe(name: str, overrides: dict[str, Any], args: argparse.Namespace) -> Recipe:
    data = {"corpus": args.corpus, "max_files": args.max_files, "seed": args.seed}
    spec = merge(merge(BASE, {"model": {"name": args.model}, "data": data, "seed": args.seed}), overrides)
    if args.steps:
        spec.setdefault("max_steps", args.steps)
    cfg = load_config(FinetuneConfig, None, _flatten(spec))
    if not args.steps and (cfg.loss.exit_sampling == "gradual" or cfg.optim.schedule == "linear"):
        raise SystemExit(f"recipe {name}: a gradual curriculum or linear schedule needs --steps (its planned length)")
    return Recipe(name, cfg, overrides)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def parse_recipe(text: str) -> tuple[str, dict[str, Any]]:
    """'name: key=value key.sub=value' -> (name, nested overrides)."""
    name, _, rest = text.partition(":")
    if not name.strip() or not rest.strip():
        raise SystemExit(f"--recipe {text!r} must look like 'name: key=value [key.sub=value ...]'")
    nested: dict[str, Any] = {}
    for dotted, value in parse_overrides(rest.split()).items():
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return name.strip(), nested


# --------------------------------------------------------------------------- data


class Data:
    """Train blocks per seq_len (files in a seeded order, tokenized once) and the held-out batches."""

    def __init__(self, args: argparse.Namespace, tokenizer: Any) -> None:
        corpus = load_corpus(DataConfig(corpus=args.corpus, max_files=args.max_files, seed=args.seed))

        def shuffled(files: list[SourceFile]) -> list[SourceFile]:  # the first blocks are not one package's files
            return sorted(files, key=lambda f: hashlib.sha1(f"{args.seed}:{f.path}".encode()).hexdigest())

        self.train_files = shuffled(corpus.split("train"))
        self.tokenizer, self.limit = tokenizer, args.max_train_blocks
        self._train: dict[int, BlockSet] = {}
        val = build_blocks(shuffled(corpus.split("validation")), tokenizer, args.val_seq_len, limit=args.val_blocks)
        self.val_batches = list(val.batches(8, CPU))
        log.info("%d train files, %d held-out blocks of %d tokens", len(self.train_files), len(val), args.val_seq_len)

    def train(self, seq_len: int) -> BlockSet:
        if seq_len not in self._train:
            self._train[seq_len] = build_blocks(self.train_files, self.tokenizer, seq_len, limit=self.limit)
        return self._train[seq_len]


# --------------------------------------------------------------------------- runs


def new_stepper(base: EarlyExitModel, recipe: Recipe) -> tuple[EarlyExitModel, LiteStepper]:
    """A fresh trainable copy of the base model; the base itself (frozen) is the teacher."""
    cfg = recipe.cfg
    lm = EarlyExitModel(copy.deepcopy(base.model).requires_grad_(True), base.tokenizer, base.exit_points)
    objective = build_objective(lm, cfg, base=base)
    optimizer = build_optimizer(objective.named_parameters(), cfg.optim)
    return lm, LiteStepper(objective, optimizer, build_scheduler(optimizer, cfg.optim, cfg.max_steps), cfg, CPU)


def train(base: EarlyExitModel, recipe: Recipe, data: Data, args: argparse.Namespace,
          reference: torch.Tensor) -> tuple[Result, EarlyExitModel]:
    cfg = recipe.cfg
    blocks = data.train(cfg.seq_len)
    sampler = BlockSampler(len(blocks), cfg.batch_size, cfg.grad_accum, seed=cfg.seed)
    lm, stepper = new_stepper(base, recipe)
    times: list[float] = []
    while len(times) < (args.steps or sys.maxsize) and sum(times) < (args.budget_s or float("inf")):
        batches = [blocks.batch(rows, CPU) for rows in sampler.micro_batches(len(times))]
        started = time.perf_counter()
        stats = stepper.train_step(batches)
        times.append(time.perf_counter() - started)
        log.info("%s step %d: loss %.3f, %.1f s", recipe.name, len(times), stats.loss, times[-1])
    if args.save:
        with atomic_path(Path(args.save) / recipe.name, directory=True) as tmp:
            save_model_dir(lm.model, lm.tokenizer, exit_plan(lm, cfg, len(times)), tmp)
    return score(lm, recipe, data, reference, len(times), times), lm


def score(lm: EarlyExitModel, recipe: Recipe, data: Data, reference: torch.Tensor, steps: int,
          times: list[float]) -> Result:
    preds, targets = exit_predictions(lm, data.val_batches, "fp32")  # as served, and as the reference was
    agree = (preds == reference[-1]).double().mean(dim=1).tolist()
    return Result(recipe, steps, sum(times), times, float((preds[-1] == targets).double().mean()), agree[-1],
                  agree[:-1])


def with_translators(lm: EarlyExitModel, name: str, data: Data, args: argparse.Namespace,
                     reference: torch.Tensor) -> Result:
    """``lm`` scored with exit translators fit on it (closed form, ``--translator-ridge``) from the first
    ``--translators`` training tokens; the seconds are the fit's (one forward pass and the solves)."""
    started = time.perf_counter()
    blocks = data.train(args.val_seq_len)
    count = min(len(blocks), -(-args.translators // args.val_seq_len))
    stats = collect_stats(lm, (blocks.batch(slice(s, min(s + 4, count)), CPU) for s in range(0, count, 4)))
    translators = ExitTranslators(lm.exit_points, lm.hidden_size, {"model_fingerprint": lm.fingerprint})
    for i, layer in enumerate(lm.exit_points):
        translators.set_map(layer, *stats.solve(i, args.translator_ridge))
    seconds = time.perf_counter() - started
    lm.attach_translators(translators)
    try:
        return score(lm, Recipe(f"{name} + translators", FinetuneConfig()), data, reference, 0, [seconds])
    finally:
        lm.attach_translators(None)


def timing(base: EarlyExitModel, recipes: list[Recipe], data: Data, rounds: int) -> dict[str, list[float]]:
    """Seconds of each recipe's second step on one fixed batch, recipes interleaved within each round."""
    seconds: dict[str, list[float]] = {r.name: [] for r in recipes}
    for _ in range(rounds):
        for recipe in recipes:
            cfg = recipe.cfg
            batch = data.train(cfg.seq_len).batch(list(range(cfg.batch_size)), CPU)
            _, stepper = new_stepper(base, recipe)
            stepper.train_step([batch] * cfg.grad_accum)
            started = time.perf_counter()
            stepper.train_step([batch] * cfg.grad_accum)
            seconds[recipe.name].append(time.perf_counter() - started)
            log.info("%s: %.2f s", recipe.name, seconds[recipe.name][-1])
    return seconds


# --------------------------------------------------------------------------- output


def print_table(results: list[Result], untuned: list[float], base_acc: float, layers: list[int]) -> None:
    exits = " ".join(f"{'L' + str(k):>5}" for k in layers)
    print(f"\n{'recipe':<22} {'steps':>5} {'sec':>6} {'s/step':>6} {'acc':>6} {'acc/base':>8} {'final=base':>10} "
          f"{exits} {'mean':>5}")
    print(f"{'untuned':<22} {0:>5} {0:>6} {'':>6} {base_acc:>6.3f} {1:>8.3f} {1:>10.3f} "
          + " ".join(f"{a:>5.3f}" for a in untuned) + f" {statistics.mean(untuned):>5.3f}")
    for r in results:
        per_step = statistics.median(r.step_seconds) if r.step_seconds else 0.0
        print(f"{r.recipe.name:<22} {r.steps:>5} {r.seconds:>6.0f} {per_step:>6.2f} {r.acc:>6.3f} "
              f"{r.acc / base_acc:>8.3f} {r.final_agree:>10.3f} " + " ".join(f"{a:>5.3f}" for a in r.exit_agree)
              + f" {statistics.mean(r.exit_agree):>5.3f}")


def write_csv(path: str, results: list[Result], layers: list[int]) -> None:
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["recipe", "overrides", "steps", "seconds", "median_step_s", "acc", "final_agree_base",
                      *[f"agree_base_l{k}" for k in layers]])
        for r in results:
            out.writerow([r.recipe.name, r.recipe.overrides, r.steps, f"{r.seconds:.1f}",
                          f"{statistics.median(r.step_seconds):.2f}" if r.step_seconds else "", f"{r.acc:.4f}",
                          f"{r.final_agree:.4f}", *[f"{a:.4f}" for a in r.exit_agree]])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--max-files", type=int, default=None, help="read a seeded sample of N files (default all)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of built-in recipes: {', '.join(RECIPES)}")
    p.add_argument("--recipe", action="append", default=[], help="extra recipe 'name: key=value ...' (repeatable)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per recipe")
    p.add_argument("--budget-s", type=float, default=None, help="seconds of training per recipe")
    p.add_argument("--timing", type=int, default=0, metavar="ROUNDS", help="only measure per-step cost, interleaved")
    p.add_argument("--val-blocks", type=int, default=32, help="held-out validation blocks")
    p.add_argument("--val-seq-len", type=int, default=128)
    p.add_argument("--max-train-blocks", type=int, default=2048, help="tokenize at most this many train blocks")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=None, help="also write the results here")
    p.add_argument("--translators", type=int, default=0, metavar="TOKENS",
                   help="also score every model (the untuned one too) with exit translators fit on TOKENS training "
                        "tokens: the recipes side by side with translators on a frozen model")
    p.add_argument("--translator-ridge", type=float, default=0.01, help="ridge strength (x tokens) of those fits")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="save each trained model as DIR/<recipe> (a model dir `greencode eval --model` loads)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    if not (args.steps or args.budget_s or args.timing):
        p.error("give --steps and/or --budget-s (or --timing ROUNDS)")
    torch.set_num_threads(args.threads)
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; built-in: {', '.join(RECIPES)}")
    recipes = [make_recipe(n, RECIPES[n], args) for n in names]
    recipes += [make_recipe(*parse_recipe(text), args) for text in args.recipe]

    base = load_model(ModelConfig(name=args.model, device="cpu", dtype=training_weights("auto")), ExitConfig())
    base.model.requires_grad_(False)
    data = Data(args, base.tokenizer)
    layers = list(base.exit_points)
    if args.timing:
        seconds = timing(base, recipes, data, args.timing)
        first = statistics.median(seconds[recipes[0].name])
        print(f"\nper-step seconds ({args.timing} interleaved rounds, median; {args.threads} threads)")
        print(f"{'recipe':<22} {'s/step':>7} {'vs ' + recipes[0].name:>14}  all rounds")
        for name, values in seconds.items():
            median = statistics.median(values)
            print(f"{name:<22} {median:>7.2f} {median / first:>13.2f}x  " + " ".join(f"{v:.2f}" for v in values))
        return
    reference, targets = exit_predictions(base, data.val_batches, "fp32")
    base_acc = float((reference[-1] == targets).double().mean())
    untuned = (reference[:-1] == reference[-1]).double().mean(dim=1).tolist()
    results = [with_translators(base, "untuned", data, args, reference)] if args.translators else []
    for recipe in recipes:
        result, lm = train(base, recipe, data, args, reference)
        results.append(result)
        if args.translators:
            results.append(with_translators(lm, recipe.name, data, args, reference))
        r = result
        log.info("%s done: %d steps in %.0f s; acc %.3f, final=base %.3f, exits %s", recipe.name, r.steps, r.seconds,
                 r.acc, r.final_agree, " ".join(f"{a:.3f}" for a in r.exit_agree))
    limit = " and ".join(x for x in (f"{args.steps} steps" if args.steps else "",
                                     f"{args.budget_s:g} s" if args.budget_s else "") if x)
    print(f"\nLITE recipes: up to {limit} each, {targets.numel()} held-out positions "
          f"({len(data.val_batches)} batches), agreement = argmax equals the untuned model's final argmax")
    print_table(results, untuned, base_acc, layers)
    if args.csv:
        write_csv(args.csv, results, layers)


if __name__ == "__main__":
    main()
