"""Running settings on batches: the Evaluator (one per process or Ray actor) and the in-process entry.

The prompt pass always runs all layers (METHOD §5), so it is the same for every gate: each
batch's prompt pass is computed once per model and replayed for every setting
(:class:`PromptReplayGenerator`); its measured time and energy are added to every setting's
totals, so each row still reports the full cost of its completions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from greencode.config import EvalConfig
from greencode.energy import EnergyMeter
from greencode.evaluation.parts import PendingBatch, pending_batches, save_parts
from greencode.evaluation.plan import Batch, Setting, make_plan, prompt_ids
from greencode.evaluation.report import EvalReport, write_report
from greencode.gates import FullGate, Gate, build_gate
from greencode.generate import GatedGenerator, GenerationResult, Prefill, StepOutput
from greencode.modeling import EarlyExitModel, load_model
from greencode.policy import ExitPolicy

log = logging.getLogger(__name__)


@dataclass
class _StoredPrefill:
    encoded: list[list[int]]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    output: StepOutput


class PromptReplayGenerator(GatedGenerator):
    """A GatedGenerator whose :meth:`prefill` replays the last prompt pass when the same prompts come again.

    The prompt pass runs all layers whatever the gate, so its K/V cache and logits are the same
    for every setting and replaying them is exact (same token ids, exact match). Later decoding
    steps never modify the stored tensors (the cache concatenates into new ones). ``passes`` and
    ``replays`` count computed and replayed prompt passes.
    """

    def __init__(self, lm: EarlyExitModel, meter: EnergyMeter | None = None) -> None:
        super().__init__(lm, meter)
        self._stored: _StoredPrefill | None = None
        self.passes = 0
        self.replays = 0

    def prefill(self, encoded: list[list[int]], collect_exit_states: bool, use_cache: bool = True) -> Prefill:
        if collect_exit_states or not use_cache:
            return super().prefill(encoded, collect_exit_states, use_cache)
        stored = self._stored
        if stored is not None and stored.encoded == encoded:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.lm.model.config)
            for index, (keys, values) in enumerate(stored.kv):
                cache.update(keys, values, index)
            self.replays += 1
            return Prefill(stored.input_ids, stored.attention_mask, cache, stored.output)
        done = super().prefill(encoded, collect_exit_states, use_cache)
        self.passes += 1
        kv = [(layer.keys, layer.values) for layer in done.cache.layers]
        self._stored = _StoredPrefill([list(p) for p in encoded], done.input_ids, done.attention_mask, kv, done.output)
        return done


class Evaluator:
    """Holds the models (and policy) and runs settings on batches: the unit of parallel work."""

    def __init__(self, cfg: EvalConfig, lm: EarlyExitModel | None = None) -> None:
        self.cfg = cfg
        self.lm = lm or load_model(cfg.model, cfg.exits)
        self._base: EarlyExitModel | None = None
        self._policy: ExitPolicy | None = None
        self._generators: dict[bool, PromptReplayGenerator] = {}

    def _model(self, base: bool) -> EarlyExitModel:
        if not base:
            return self.lm
        if self._base is None:
            if self.cfg.base_model is None:
                raise ValueError("the base setting needs base_model in the config")
            self._base = load_model(self.cfg.base_model, self.cfg.exits)
        return self._base

    def _gate(self, setting: Setting) -> Gate:
        if setting.family == "policy" and self._policy is None:
            self._policy = ExitPolicy.load_for(self.cfg.policy_path, self.lm)
        return build_gate(setting.gate, self._policy if setting.family == "policy" else None)

    def _generator(self, base: bool) -> PromptReplayGenerator:
        if base not in self._generators:
            self._generators[base] = PromptReplayGenerator(self._model(base))
        return self._generators[base]

    def run_batch(self, batch: Batch, settings: Sequence[Setting], run_keys: dict[str, str]) -> list[dict[str, Any]]:
        """Run ``settings`` on one batch; one part (a JSON-able dict) per setting."""
        prompts = [prompt_ids(self.cfg, self.lm.tokenizer, s) for s in batch.samples]
        gen_cfg = self.cfg.generation
        shared_prompt = gen_cfg.kv_mode == "propagate"
        prompt_cost: dict[bool, tuple[float, float | None]] = {}
        parts = []
        for setting in settings:
            base = setting.uses_base_model
            generator = self._generator(base)
            if shared_prompt and base not in prompt_cost:
                # one full-depth token = the prompt pass every setting shares; measured once, added to each
                first = generator.generate(prompts, FullGate(), gen_cfg.model_copy(update={"max_new_tokens": 1}))
                prompt_cost[base] = (first[0].time_s, _energy_sum(first))
            results = generator.generate(prompts, self._gate(setting), gen_cfg)
            prompt_time, prompt_energy = prompt_cost.get(base, (0.0, 0.0))
            decode_energy = _energy_sum(results)
            parts.append({
                "key": run_keys[setting.name],
                "setting": setting.name,
                "batch_id": batch.batch_id,
                "prompt_time_s": prompt_time,
                "decode_time_s": results[0].time_s,
                "gate_time_s": results[0].gate_time_s,
                "energy_j": None if prompt_energy is None or decode_energy is None else prompt_energy + decode_energy,
                "energy_source": generator.meter.source,
                "completions": [
                    {"sample_id": s.sample_id, "text": r.text, "token_ids": r.token_ids, "layers": r.layers_per_token}
                    for s, r in zip(batch.samples, results)
                ],
            })
        return parts


def _energy_sum(results: Sequence[GenerationResult]) -> float | None:
    values = [r.energy_j for r in results]
    return None if any(v is None for v in values) else float(sum(values))


def run_pending(cfg: EvalConfig, lm: EarlyExitModel, pending: Sequence[PendingBatch], out_dir: Path) -> None:
    """Every pending batch in this process, saving each batch's parts as it finishes."""
    if not pending:
        return
    evaluator = Evaluator(cfg, lm)
    for item in tqdm(pending, desc="eval batches", unit="batch"):
        save_parts(out_dir, evaluator.run_batch(item.batch, item.settings, item.keys))


def run_evaluation(cfg: EvalConfig, lm: EarlyExitModel | None = None) -> EvalReport:
    """Run (or resume) every setting in this process and write the report."""
    out_dir = Path(cfg.output_dir)
    lm = lm or load_model(cfg.model, cfg.exits)
    plan = make_plan(cfg, lm)
    pending = pending_batches(cfg, plan, out_dir)
    log.info("%d settings x %d batches; %d batches with work left", len(plan.settings), len(plan.batches), len(pending))
    run_pending(cfg, lm, pending, out_dir)
    return write_report(cfg, plan, out_dir)
