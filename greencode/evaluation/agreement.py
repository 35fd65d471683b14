"""Per-exit agreement with the base model's final prediction, before and after fine-tuning.

On held-out token blocks (the test split, packed), at every position: does exit k's argmax equal
the *base* model's final-layer argmax? "untuned" is the base model's own exits, "fine-tuned" the
evaluated model's. This is what LITE must raise without losing the final layer (issue 10), and
it is cheap: one forward per model, no generation. Stored as OUTPUT/agreement.json under a key,
so a rerun reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from greencode.atomic import write_atomic
from greencode.blocks import BLOCKS_PER_PASS, BlockSet, build_blocks
from greencode.config import EvalConfig
from greencode.data import load_corpus
from greencode.modeling import EarlyExitModel, load_model
from greencode.training import exit_predictions

log = logging.getLogger(__name__)

AGREEMENT_FILE = "agreement.json"


def exit_argmax(lm: EarlyExitModel, blocks: BlockSet) -> torch.Tensor:
    """Argmax of every exit and the final layer at every predicting position: [exits + 1, N]."""
    return exit_predictions(lm, blocks.batches(BLOCKS_PER_PASS, lm.device))[0]


def agreement_table(tuned: torch.Tensor, base: torch.Tensor | None, layers: list[int],
                    untranslated: torch.Tensor | None = None) -> dict[str, Any]:
    """Share of positions where each exit (and the final layer) agrees with the base model's final argmax.

    ``tuned``: the evaluated model's exits as it decodes them; ``base``: the base model's own exits
    (untranslated); ``untranslated``: the evaluated model's exits decoded without its translators.
    """
    reference = (base if base is not None else tuned)[-1]

    def share(rows: torch.Tensor | None) -> list[float] | None:
        return None if rows is None else [float((row == reference).float().mean()) for row in rows]

    return {"layers": layers, "tokens": int(reference.numel()), "finetuned": share(tuned), "untuned": share(base),
            "untranslated": share(untranslated)}


def _key(cfg: EvalConfig, lm: EarlyExitModel) -> str:
    translators = lm.translators.meta.get("weights_digest") if lm.translators is not None else None
    blob = json.dumps({"model": lm.fingerprint, "translators": translators,
                       "base": cfg.base_model.model_dump(mode="json") if cfg.base_model else None,
                       "data": cfg.data.model_dump(mode="json"), "tokens": cfg.agreement_tokens,
                       "seq_len": cfg.agreement_seq_len, "exits": lm.exit_points}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def compute_agreement(cfg: EvalConfig, lm: EarlyExitModel, out_dir: Path) -> dict[str, Any] | None:
    """The agreement table of this run (reused from OUTPUT/agreement.json when its key matches); None when
    ``agreement_tokens`` is 0 or no held-out file is long enough."""
    if cfg.agreement_tokens == 0:
        return None
    path, key = out_dir / AGREEMENT_FILE, _key(cfg, lm)
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored
    except (OSError, ValueError):
        pass
    corpus = load_corpus(cfg.data)
    limit = math.ceil(cfg.agreement_tokens / cfg.agreement_seq_len)
    blocks = build_blocks(corpus.split("test") or corpus.split("validation"), lm.tokenizer, cfg.agreement_seq_len,
                          limit=limit)
    if not len(blocks):
        log.warning("no held-out tokens for the exit agreement: left out of the report")
        return None
    tuned = exit_argmax(lm, blocks)
    base = exit_argmax(load_model(cfg.base_model, cfg.exits), blocks) if cfg.base_model is not None else None
    untranslated = None
    if lm.translators is not None:  # what the translators bring: the same exits decoded without them
        translators = lm.translators
        lm.attach_translators(None)
        try:
            untranslated = exit_argmax(lm, blocks)
        finally:
            lm.attach_translators(translators)
    layers = [*lm.exit_points, lm.num_layers]
    table = {"key": key, "blocks": len(blocks), **agreement_table(tuned, base, layers, untranslated)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(table, indent=2))
    log.info("exit agreement on %d held-out tokens written to %s", table["tokens"], path)
    return table
