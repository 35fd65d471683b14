"""`greencode fit-exits`: exit translators on a frozen model, from statistics Ray Data sums.

    python -m workflows.fit_exits --model embedded --output-dir runs/translators
    greencode generate --model embedded --translators runs/translators --gate fixed --exit-layer 22 --prompt ...

Ray Data reads the training split's token blocks in chunks of ``blocks_per_task``; a pool of model
actors (``num_workers``) turns each chunk into the float64 sums of one ridge regression per exit (the
last layer's normalized state on the exit's, greencode.translators). The driver adds the partial sums,
solves once per exit at every strength of ``ridge_grid``, keeps per exit the one whose top-1 agrees most
with the final layer's on the validation split, measures the agreement on the test split (untranslated
and translated) and writes the translators atomically. The model itself is never changed: its
full-depth output stays the base model's, token for token.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from greencode.blocks import BLOCKS_PER_PASS
from greencode.config import ExitConfig, FitExitsConfig, ModelConfig, result_config
from greencode.translators import META_FILE, ExitTranslators, TranslatorStats
from workflows.common import ConfigCommand, Flag, cli_errors, init_ray, published_outputs, stage_presets

log = logging.getLogger("greencode.fit_exits")


def _untranslated(model: ModelConfig) -> ModelConfig:
    return model.model_copy(update={"translators": "none"})


class StatsWorker:
    """Ray Data actor: loads the model once, turns each chunk of token blocks into translator statistics."""

    def __init__(self, model: dict[str, Any], exits: dict[str, Any], threads: int) -> None:
        import torch

        from greencode.modeling import load_model

        torch.set_num_threads(threads)
        self.lm = load_model(_untranslated(ModelConfig(**model)), ExitConfig(**exits))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from greencode.blocks import BlockSet
        from greencode.translators import collect_stats

        out: dict[str, list] = {}
        for ids, lengths in zip(batch["ids"], batch["lengths"]):
            blocks = BlockSet(np.array(ids), np.array(lengths))  # writable copies: torch refuses read-only arrays
            stats = collect_stats(self.lm, blocks.batches(BLOCKS_PER_PASS, self.lm.device))
            for key, value in stats.to_dict().items():
                out.setdefault(key, []).append(value)
        return out


def _blocks(cfg: FitExitsConfig, tokenizer: Any) -> dict[str, Any]:
    """Token blocks of the three splits: statistics (train), ridge choice (validation), report (test)."""
    from greencode.blocks import build_blocks
    from greencode.data import load_corpus

    corpus = load_corpus(cfg.data)

    def split(name: str, tokens: int) -> Any:
        return build_blocks(corpus.split(name), tokenizer, cfg.seq_len, limit=max(1, math.ceil(tokens / cfg.seq_len)))

    blocks = {"train": split("train", cfg.train_tokens), "validation": split("validation", cfg.validation_tokens)}
    blocks["test"] = split("test", cfg.heldout_tokens) if cfg.heldout_tokens else None
    for name in ("train", "validation"):
        if not len(blocks[name]):
            raise ValueError(f"the corpus's {name} split has no file long enough for a {cfg.seq_len}-token block; "
                             "use more files (data.max_files) or a shorter seq_len")
    return blocks


def summed_stats(cfg: FitExitsConfig, train: Any, exit_points: list[int], hidden_size: int) -> TranslatorStats:
    """The statistics of every training block, summed over the chunks the Ray Data actors computed."""
    import ray

    chunks = [{"ids": train.ids[s : s + cfg.blocks_per_task], "lengths": train.lengths[s : s + cfg.blocks_per_task]}
              for s in range(0, len(train), cfg.blocks_per_task)]
    init_ray()
    cpus = max(0.5, min(4.0, (ray.cluster_resources().get("CPU", 1) - 0.5) / cfg.num_workers))
    ds = ray.data.from_items(chunks).map_batches(
        StatsWorker,
        fn_constructor_kwargs={"model": cfg.model.model_dump(), "exits": cfg.exits.model_dump(),
                               "threads": max(1, int(cpus))},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(cfg.num_workers, len(chunks))),
        num_cpus=cpus,
    )
    total = TranslatorStats.zeros(exit_points, hidden_size)
    for i, row in enumerate(ds.iter_rows(), 1):
        total = total + TranslatorStats.from_dict(row)
        log.info("statistics: %d/%d chunks, %d tokens", i, len(chunks), total.count)
    return total


def heldout_agreement(lm: Any, translators: ExitTranslators, test: Any) -> dict[str, Any]:
    """Agreement of every exit's top-1 with the final layer's on held-out blocks, untranslated and translated."""
    from greencode.training import exit_predictions

    def agreement() -> list[float]:
        preds = exit_predictions(lm, test.batches(BLOCKS_PER_PASS, lm.device))[0]
        return [round(float((row == preds[-1]).float().mean()), 4) for row in preds[:-1]]

    lm.attach_translators(None)
    before = agreement()
    lm.attach_translators(translators)
    after = agreement()
    tokens = int(sum(int(n) - 1 for n in test.lengths))
    return {"layers": list(lm.exit_points), "tokens": tokens, "untranslated": before, "translated": after}


def _finished(cfg: FitExitsConfig, identity: dict[str, Any]) -> dict[str, Any] | None:
    try:
        meta = json.loads((Path(cfg.output_dir) / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("identity") == identity else None


def run(cfg: FitExitsConfig) -> dict[str, Any]:
    """Fit (or reuse) the translators of ``cfg.model`` and write them to ``cfg.output_dir``; returns their JSON."""
    from greencode.modeling import load_model, model_digest

    start = time.perf_counter()
    identity = {"config": result_config(cfg), "model": model_digest(cfg.model)}
    done = _finished(cfg, identity)
    if done is not None:
        log.info("%s already holds these translators; delete it to fit again", cfg.output_dir)
        return done
    lm = load_model(_untranslated(cfg.model), cfg.exits)
    meta: dict[str, Any] = {"kind": cfg.kind, "model_fingerprint": lm.fingerprint, "model": cfg.model.name,
                            "identity": identity}
    if cfg.kind == "identity":
        translators = ExitTranslators([], lm.hidden_size, meta)
    else:
        blocks = _blocks(cfg, lm.tokenizer)
        log.info("fitting %d exit translators on %d training blocks of %d tokens", len(lm.exit_points),
                 len(blocks["train"]), cfg.seq_len)
        stats = summed_stats(cfg, blocks["train"], lm.exit_points, lm.hidden_size)
        from greencode.translators import fit_translators

        translators, report = fit_translators(lm, stats, blocks["validation"].batches(BLOCKS_PER_PASS, lm.device),
                                              cfg.ridge_grid)
        meta.update(report, train_tokens=stats.count)
        translators.meta = meta
        if blocks["test"] is not None and len(blocks["test"]):
            meta["heldout"] = heldout_agreement(lm, translators, blocks["test"])
            held = meta["heldout"]
            log.info("held-out agreement with the final layer (%d tokens): %s", held["tokens"], ", ".join(
                f"exit {k} {a:.2f} -> {b:.2f}" for k, a, b in zip(held["layers"], held["untranslated"],
                                                                    held["translated"])))
    meta["time_s"] = round(time.perf_counter() - start, 1)
    translators.meta = meta
    translators.save(cfg.output_dir)
    log.info("exit translators written to %s (%.0f s)", cfg.output_dir, meta["time_s"])
    return meta


COMMAND = ConfigCommand(
    FitExitsConfig, "Fit exit translators on a frozen model (Ray Data sums, closed-form ridge solve).",
    prog="greencode fit-exits", presets=stage_presets("fit_exits"),
    flags=[Flag("--model", "model.name"), Flag("--kind", "kind", choices=("affine", "identity")),
           Flag("--train-tokens", "train_tokens", type=int), Flag("--output-dir", "output_dir")])


@cli_errors
def main(argv: list[str] | None = None) -> None:
    cfg, _ = COMMAND.parse(argv)
    with published_outputs(cfg, "output_dir") as local:
        meta = run(local)
    print(json.dumps({k: v for k, v in meta.items() if k not in ("identity", "validation_agreement")}, indent=2))


if __name__ == "__main__":
    main()
