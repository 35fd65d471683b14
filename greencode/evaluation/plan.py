"""What an evaluation runs: every setting the config asks for, over batches of held-out samples.

A *setting* is one row of the report: base model full, fine-tuned full, fixed exit at each exit
point, confidence at each c, policy at each T, and the lossless rows asked for (the same gates
drafting for the full model, METHOD §7); each at every context fraction. Samples are
line completions (METHOD §6) from the test split, topped up from the validation split. With
``task: fim`` the same spans are filled in the middle: the model also sees up to
``fim_suffix_tokens`` of the file after the span, in its own FIM layout (greencode/fim.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from greencode.config import ConfigError, EvalConfig, GateConfig
from greencode.data import CompletionSample, CorpusError, line_completion_samples, load_corpus
from greencode.digests import tree_digest
from greencode.fim import fim_format, fim_prompt_ids
from greencode.modeling import EarlyExitModel, model_digest
from greencode.policy import ExitPolicy
from greencode.storage import local_copy

log = logging.getLogger(__name__)

FAMILIES = ("base", "full", "fixed", "confidence", "policy", "lossless-fixed", "lossless-confidence", "lossless-policy")


@dataclass(frozen=True)
class Setting:
    """One row of the report: a gate on one model at one context fraction."""

    name: str  # unique and file-safe, e.g. "fixed-k6@0.2", "lossless-policy-T0.9@0.2"
    family: str  # one of FAMILIES
    param: float | None  # k, c or T
    context_fraction: float
    gate: GateConfig
    lossless: bool = False  # the gate only drafts; the text is the full model's

    @property
    def uses_base_model(self) -> bool:
        return self.family == "base"


@dataclass(frozen=True)
class Batch:
    batch_id: str  # e.g. "ctx0.2-b0003"
    context_fraction: float
    samples: tuple[CompletionSample, ...]


@dataclass
class EvalPlan:
    settings: list[Setting]
    batches: list[Batch]
    samples: dict[float, list[CompletionSample]]
    num_layers: int
    exit_points: list[int]
    # Content digests of what is evaluated ("model", "base_model", "policy"; None: absent, or a hub id not
    # in the local cache). Parts are keyed by them and the report names them.
    digests: dict[str, str | None]

    def settings_for(self, batch: Batch) -> list[Setting]:
        return [s for s in self.settings if s.context_fraction == batch.context_fraction]


def plan_settings(cfg: EvalConfig, exit_points: Sequence[int]) -> list[Setting]:
    """Every setting the config asks for; policy rows only when a policy file is given."""
    if "policy" in cfg.gates and not cfg.policy_path:
        log.info("no policy file given: the policy rows are left out of the report")
    def gate_rows(family: str) -> list[tuple[str, float | None, GateConfig]]:
        if family == "fixed":
            return [(f"fixed-k{k}", k, GateConfig(mode="fixed", exit_layer=k)) for k in exit_points]
        if family == "confidence":
            return [(f"confidence-c{c}", c, GateConfig(mode="confidence", confidence=c)) for c in cfg.confidences]
        if family == "policy" and cfg.policy_path:
            return [(f"policy-T{t}", t, GateConfig(mode="policy", threshold=t, policy_path=cfg.policy_path))
                    for t in cfg.thresholds]
        return []

    settings = []
    for frac in cfg.context_fractions:
        if "full" in cfg.gates:
            if cfg.base_model is not None:
                settings.append(Setting(f"base@{frac}", "base", None, frac, GateConfig(mode="full")))
            settings.append(Setting(f"full@{frac}", "full", None, frac, GateConfig(mode="full")))
        for family in ("fixed", "confidence", "policy"):
            if family in cfg.gates:
                settings += [Setting(f"{name}@{frac}", family, param, frac, gate)
                             for name, param, gate in gate_rows(family)]
        for family in cfg.lossless:
            settings += [Setting(f"lossless-{name}@{frac}", f"lossless-{family}", param, frac, gate, lossless=True)
                         for name, param, gate in gate_rows(family)]
    return settings


def build_samples(cfg: EvalConfig, tokenizer: Any) -> dict[float, list[CompletionSample]]:
    """Line-completion samples per context fraction from held-out files only: the test split first (several
    cut points per file when it is small), topped up from the validation split (also never trained on)."""
    corpus = load_corpus(cfg.data)
    test, validation = corpus.split("test"), corpus.split("validation")
    d = cfg.data
    suffix_tokens = cfg.fim_suffix_tokens if cfg.task == "fim" else 0
    out = {}
    for frac in cfg.context_fractions:
        def make(files, n, frac=frac):
            return line_completion_samples(
                files, tokenizer, n, context_fraction=frac, context_cap=d.context_cap, target_tokens=d.target_tokens,
                min_file_tokens=d.min_file_tokens, seed=d.seed, suffix_tokens=suffix_tokens,
                max_cuts_per_file=d.max_cuts_per_file, cut_stride=d.cut_stride)

        samples = make(test, cfg.num_samples)
        if len(samples) < cfg.num_samples and validation:
            log.warning("test split gave %d of %d samples; topping up from the validation split",
                        len(samples), cfg.num_samples)
            samples += make(validation, cfg.num_samples - len(samples))
        if not samples:
            raise CorpusError(f"data.corpus {d.corpus!r} gave no samples: no held-out file has "
                              f">= {d.min_file_tokens} tokens")
        out[frac] = samples
    return out


def prompt_ids(cfg: EvalConfig, tokenizer: Any, sample: CompletionSample) -> list[int]:
    """What the model is given for ``sample``: its context, or (task fim) the FIM prompt around the span."""
    if cfg.task == "fim":
        return fim_prompt_ids(tokenizer, sample.context_text, sample.suffix_text, cfg.fim_order)
    return list(sample.context_ids)


def make_plan(cfg: EvalConfig, lm: EarlyExitModel) -> EvalPlan:
    """Settings and batches of a run; a policy that does not fit the model, or a FIM task on a model without FIM
    tokens, fails here, before any work."""
    settings = plan_settings(cfg, lm.exit_points)
    if not settings:
        raise ConfigError(f"gates {cfg.gates} give nothing to evaluate (the policy gate needs policy_path / --policy)")
    uses_policy = any(s.gate.mode == "policy" for s in settings)
    if uses_policy:
        ExitPolicy.load_for(cfg.policy_path, lm)
    if cfg.lossless and cfg.generation.kv_mode != "propagate":
        raise ConfigError("lossless: lossless rows verify drafts against the KV cache: generation.kv_mode must be "
                          "'propagate'")
    if cfg.task == "fim":
        fim = fim_format(lm.tokenizer)
        if cfg.fim_order == "spm" and not fim.spm:
            raise ConfigError(f"fim_order: the {fim.family} FIM format was trained prefix-suffix-middle only: "
                              "use 'psm'")
    digests = {"model": model_digest(cfg.model),
               "base_model": model_digest(cfg.base_model) if cfg.base_model else None,
               "policy": tree_digest(local_copy(cfg.policy_path)) if uses_policy else None}
    samples = build_samples(cfg, lm.tokenizer)
    batches = [
        Batch(f"ctx{frac}-b{i // cfg.batch_size:04d}", frac, tuple(group[i : i + cfg.batch_size]))
        for frac, group in samples.items()
        for i in range(0, len(group), cfg.batch_size)
    ]
    return EvalPlan(settings, batches, samples, lm.num_layers, lm.exit_points, digests)
