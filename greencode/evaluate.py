"""Evaluation harness: the METHOD §6 baselines on line completion -> a report directory.

For every context fraction the harness builds line-completion samples from the
held-out files of a corpus, runs every *setting* (base model full, fine-tuned full,
fixed exit at each exit point, confidence at each c, policy at each T) over the same
samples in batches, and writes:

    OUTPUT/parts/<setting>/<batch>.json   one finished (setting, batch), written atomically
    OUTPUT/results.json, results.csv     one row per setting: quality, layers, time, energy
    OUTPUT/report.md                     the table in the shape of the published ones
    OUTPUT/quality_vs_layers.png, quality_vs_time.png (+ quality_vs_energy.png when measured)

A rerun skips every part whose file exists and matches the run (same model, samples,
gate and generation settings), so an interrupted evaluation resumes where it stopped.

The prompt pass always runs all layers (METHOD §5), so it is the same for every gate:
each batch's prompt pass is computed once per model and replayed for every setting
(:class:`PromptCachingGenerator`); its measured time and energy are added to every
setting's totals, so each row still reports the full cost of its completions.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from greencode.atomic import write_atomic
from greencode.config import EvalConfig, GateConfig
from greencode.data import (
    CompletionSample,
    CorpusError,
    line_completion_samples,
    load_corpus,
)
from greencode.energy import EnergyMeter
from greencode.gates import FullGate, Gate, build_gate
from greencode.generate import GatedGenerator, StepOutput
from greencode.metrics import quality_metrics
from greencode.modeling import EarlyExitModel, load_model
from greencode.policy import ExitPolicy

log = logging.getLogger(__name__)

FAMILIES = ("base", "full", "fixed", "confidence", "policy")
QUALITY_KEYS = ("codebleu", "codebleu_library", "codebleu_ngram", "codebleu_weighted_ngram", "codebleu_syntax", "codebleu_dataflow",
                "rouge_l", "bleu", "chrf", "exact_match", "levenshtein", "levenshtein_ratio", "token_accuracy")
REPORT_FILES = ("results.json", "results.csv", "report.md", "quality_vs_layers.png", "quality_vs_time.png")
ENERGY_PLOT = "quality_vs_energy.png"


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Setting:
    """One row of the report: a gate on one model at one context fraction."""

    name: str  # unique and file-safe, e.g. "fixed-k6@0.2"
    family: str  # one of FAMILIES
    param: float | None  # k, c or T
    context_fraction: float
    gate: GateConfig

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
    model_fingerprint: str

    def settings_for(self, batch: Batch) -> list[Setting]:
        return [s for s in self.settings if s.context_fraction == batch.context_fraction]


def plan_settings(cfg: EvalConfig, exit_points: Sequence[int]) -> list[Setting]:
    """Every setting the config asks for; policy rows only when a policy file is given."""
    if "policy" in cfg.gates and not cfg.policy_path:
        log.info("no policy file given: the policy rows are left out of the report")
    settings = []
    for frac in cfg.context_fractions:
        rows: list[tuple[str, str, float | None, GateConfig]] = []
        if "full" in cfg.gates:
            if cfg.base_model is not None:
                rows.append(("base", "base", None, GateConfig(mode="full")))
            rows.append(("full", "full", None, GateConfig(mode="full")))
        if "fixed" in cfg.gates:
            rows += [(f"fixed-k{k}", "fixed", k, GateConfig(mode="fixed", exit_layer=k)) for k in exit_points]
        if "confidence" in cfg.gates:
            rows += [(f"confidence-c{c}", "confidence", c, GateConfig(mode="confidence", confidence=c))
                     for c in cfg.confidences]
        if "policy" in cfg.gates and cfg.policy_path:
            rows += [(f"policy-T{t}", "policy", t, GateConfig(mode="policy", threshold=t, policy_path=cfg.policy_path))
                     for t in cfg.thresholds]
        settings += [Setting(f"{name}@{frac}", family, param, frac, gate) for name, family, param, gate in rows]
    return settings


def build_samples(cfg: EvalConfig, tokenizer: Any) -> dict[float, list[CompletionSample]]:
    """Line-completion samples per context fraction from the test split, topped up from the
    validation split (also never trained on) when the test split has too few usable files."""
    corpus = load_corpus(cfg.data)
    test, validation = corpus.split("test"), corpus.split("validation")
    d = cfg.data
    out = {}
    for frac in cfg.context_fractions:
        make = lambda files, n: line_completion_samples(  # noqa: E731
            files, tokenizer, n, context_fraction=frac, context_cap=d.context_cap, target_tokens=d.target_tokens,
            min_file_tokens=d.min_file_tokens, seed=d.seed)
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


def make_plan(cfg: EvalConfig, lm: EarlyExitModel) -> EvalPlan:
    """Settings and batches of a run; a policy that does not fit the model fails here, before any work."""
    settings = plan_settings(cfg, lm.exit_points)
    if not settings:
        raise ValueError(f"gates {cfg.gates} give nothing to evaluate (the policy gate needs policy_path / --policy)")
    if any(s.family == "policy" for s in settings):
        load_policy(cfg.policy_path, lm)
    samples = build_samples(cfg, lm.tokenizer)
    batches = [
        Batch(f"ctx{frac}-b{i // cfg.batch_size:04d}", frac, tuple(group[i : i + cfg.batch_size]))
        for frac, group in samples.items()
        for i in range(0, len(group), cfg.batch_size)
    ]
    return EvalPlan(settings, batches, samples, lm.num_layers, lm.exit_points, lm.fingerprint)


# --------------------------------------------------------------------------- running


@dataclass
class _PromptMemo:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    output: StepOutput


class PromptCachingGenerator(GatedGenerator):
    """A GatedGenerator that replays the last prompt pass when the same prompts come again.

    The prompt pass runs all layers whatever the gate, so its K/V cache and logits are
    the same for every setting; replaying them is exact. Later decoding steps never
    modify the stored tensors (the cache concatenates into new ones).
    """

    def __init__(self, lm: EarlyExitModel, meter: EnergyMeter | None = None) -> None:
        super().__init__(lm, meter)
        self._memo: _PromptMemo | None = None

    def step(self, input_ids, attention_mask, cache, gate, active=None, collect_exit_states=False) -> StepOutput:
        is_prompt = cache is not None and active is None and isinstance(gate, FullGate) and cache.get_seq_length() == 0
        if not is_prompt or collect_exit_states:
            return super().step(input_ids, attention_mask, cache, gate, active, collect_exit_states)
        memo = self._memo
        if (memo is not None and memo.input_ids.shape == input_ids.shape and torch.equal(memo.input_ids, input_ids)
                and torch.equal(memo.attention_mask, attention_mask)):
            for index, (keys, values) in enumerate(memo.kv):
                cache.update(keys, values, index)
            return memo.output
        out = super().step(input_ids, attention_mask, cache, gate, active)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self._memo = _PromptMemo(input_ids.clone(), attention_mask.clone(), kv, out)
        return out


class Evaluator:
    """Holds the models (and policy) and runs settings on batches: the unit of parallel work."""

    def __init__(self, cfg: EvalConfig, lm: EarlyExitModel | None = None) -> None:
        self.cfg = cfg
        self.lm = lm or load_model(cfg.model, cfg.exits)
        self._base: EarlyExitModel | None = None
        self._policy: ExitPolicy | None = None
        self._generators: dict[bool, PromptCachingGenerator] = {}

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
            self._policy = load_policy(self.cfg.policy_path, self.lm)
        return build_gate(setting.gate, self._policy if setting.family == "policy" else None)

    def _generator(self, base: bool) -> PromptCachingGenerator:
        if base not in self._generators:
            self._generators[base] = PromptCachingGenerator(self._model(base))
        return self._generators[base]

    def run_batch(self, batch: Batch, settings: Sequence[Setting], run_keys: dict[str, str]) -> list[dict[str, Any]]:
        """Run ``settings`` on one batch; one part (a JSON-able dict) per setting."""
        prompts = [list(s.context_ids) for s in batch.samples]
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


def _energy_sum(results: Sequence[Any]) -> float | None:
    values = [r.energy_j for r in results]
    return None if any(v is None for v in values) else float(sum(values))


def load_policy(path: str | None, lm: EarlyExitModel) -> ExitPolicy:
    if not path:
        raise ValueError("policy settings need policy_path")
    return ExitPolicy.load(path, hidden_size=lm.hidden_size, exit_points=lm.exit_points,
                           model_fingerprint=lm.fingerprint)


# --------------------------------------------------------------------------- parts on disk (resume)


def part_path(out_dir: Path, setting: str, batch_id: str) -> Path:
    return out_dir / "parts" / setting / f"{batch_id}.json"


def run_keys(cfg: EvalConfig, plan: EvalPlan, batch: Batch) -> dict[str, str]:
    """Identity of each (setting, batch) result: a stored part is reused only when it matches."""
    common = {
        "samples": [(s.sample_id, len(s.context_ids), s.target_ids) for s in batch.samples],
        "generation": cfg.generation.model_dump(mode="json"),
        "exit_points": plan.exit_points,
    }
    keys = {}
    for setting in plan.settings_for(batch):
        model = cfg.base_model.model_dump(mode="json") if setting.uses_base_model else plan.model_fingerprint
        blob = json.dumps({**common, "model": model, "gate": setting.gate.model_dump(mode="json")}, sort_keys=True)
        keys[setting.name] = hashlib.sha256(blob.encode()).hexdigest()[:20]
    return keys


def load_part(path: Path, key: str) -> dict[str, Any] | None:
    try:
        part = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return part if isinstance(part, dict) and part.get("key") == key else None


@dataclass
class Job:
    batch: Batch
    settings: list[Setting]
    keys: dict[str, str]


def pending_jobs(cfg: EvalConfig, plan: EvalPlan, out_dir: Path) -> list[Job]:
    """(batch, settings still missing) for every batch with unfinished work."""
    jobs = []
    for batch in plan.batches:
        keys = run_keys(cfg, plan, batch)
        todo = [s for s in plan.settings_for(batch)
                if load_part(part_path(out_dir, s.name, batch.batch_id), keys[s.name]) is None]
        if todo:
            jobs.append(Job(batch, todo, keys))
    return jobs


def save_parts(out_dir: Path, parts: Iterable[dict[str, Any]]) -> None:
    for part in parts:
        write_atomic(part_path(out_dir, part["setting"], part["batch_id"]), json.dumps(part))


def run_jobs_locally(cfg: EvalConfig, lm: EarlyExitModel, jobs: Sequence[Job], out_dir: Path) -> None:
    if not jobs:
        return
    evaluator = Evaluator(cfg, lm)
    for job in tqdm(jobs, desc="eval batches", unit="batch"):
        save_parts(out_dir, evaluator.run_batch(job.batch, job.settings, job.keys))


# --------------------------------------------------------------------------- report


def summarize(setting: Setting, parts: Sequence[dict[str, Any]], samples: Sequence[CompletionSample],
              num_layers: int, model_name: str) -> dict[str, Any]:
    """One report row from the finished parts of a setting."""
    by_id = {s.sample_id: s for s in samples}
    comps = [c for p in parts for c in p["completions"]]
    refs = [by_id[c["sample_id"]] for c in comps]
    quality = quality_metrics([c["text"] for c in comps], [s.target_text for s in refs], [s.lang for s in refs],
                              [c["token_ids"] for c in comps], [s.target_ids for s in refs])
    layers = [n for c in comps for n in c["layers"]]
    after_first = [n for c in comps for n in c["layers"][1:]]
    decode_time = sum(p["decode_time_s"] for p in parts)
    total_time = sum(p["prompt_time_s"] for p in parts) + decode_time
    gate_time = sum(p["gate_time_s"] for p in parts)
    energies = [p["energy_j"] for p in parts]
    energy = None if any(e is None for e in energies) else float(sum(energies))
    mean_layers = sum(layers) / len(layers) if layers else 0.0
    return {
        "setting": setting.name,
        "family": setting.family,
        "param": setting.param,
        "context_fraction": setting.context_fraction,
        "model": model_name,
        "gate": gate_description(setting),
        "samples": len(comps),
        **{k: quality[k] for k in QUALITY_KEYS},
        "num_layers": num_layers,
        "mean_layers": mean_layers,
        "mean_layers_after_first": sum(after_first) / len(after_first) if after_first else mean_layers,
        "layers_skipped_pct": 100.0 * (1 - mean_layers / num_layers),
        "generated_tokens": len(layers),
        "time_s": total_time,
        "prompt_time_s": total_time - decode_time,
        "decode_time_s": decode_time,
        "latency_s": total_time / len(comps),
        "decode_latency_s": decode_time / len(comps),
        "tokens_per_s": len(layers) / total_time if total_time > 0 else None,
        "gate_time_s": gate_time,
        "gate_overhead": gate_time / total_time if total_time > 0 else None,
        "energy_j": energy,
        "energy_per_completion_j": energy / len(comps) if energy is not None else None,
        "energy_source": next((p["energy_source"] for p in parts if p.get("energy_source")), None),
    }


def gate_description(setting: Setting) -> str:
    g = setting.gate
    return {"full": "all layers", "fixed": f"exit after layer {g.exit_layer}",
            "confidence": f"max prob >= {g.confidence}", "policy": f"p[exit] > {g.threshold}"}[g.mode]


@dataclass
class EvalReport:
    output_dir: Path
    rows: list[dict[str, Any]]

    def files(self) -> list[Path]:
        names = list(REPORT_FILES) + ([ENERGY_PLOT] if any(r["energy_j"] is not None for r in self.rows) else [])
        return [self.output_dir / n for n in names]


def write_report(cfg: EvalConfig, plan: EvalPlan, out_dir: Path) -> EvalReport:
    """Aggregate every finished part into results.json/.csv, report.md and the plots."""
    rows = []
    for setting in plan.settings:
        parts = []
        for batch in plan.batches:
            if batch.context_fraction != setting.context_fraction:
                continue
            part = load_part(part_path(out_dir, setting.name, batch.batch_id), run_keys(cfg, plan, batch)[setting.name])
            if part is None:
                raise RuntimeError(f"setting {setting.name} has no result for batch {batch.batch_id}; rerun to finish it")
            parts.append(part)
        name = cfg.base_model.name if setting.uses_base_model else cfg.model.name
        rows.append(summarize(setting, parts, plan.samples[setting.context_fraction], plan.num_layers, name))
    _add_deltas(rows, cfg.quality_margin)
    meta = {
        "model": cfg.model.name,
        "base_model": cfg.base_model.name if cfg.base_model else None,
        "policy": cfg.policy_path,
        "corpus": cfg.data.corpus,
        "num_layers": plan.num_layers,
        "exit_points": plan.exit_points,
        "samples": {str(f): len(s) for f, s in plan.samples.items()},
        "energy_source": next((r["energy_source"] for r in rows if r["energy_source"]), None),
        "config": cfg.model_dump(mode="json"),
    }
    write_atomic(out_dir / "results.json", json.dumps({**meta, "rows": rows}, indent=2))
    write_atomic(out_dir / "results.csv", _csv(rows))
    write_atomic(out_dir / "report.md", markdown_report(rows, meta, cfg.quality_margin))
    write_plots(rows, out_dir)
    log.info("report written to %s", out_dir)
    return EvalReport(out_dir, rows)


def _add_deltas(rows: list[dict[str, Any]], margin: float) -> None:
    """ROUGE-L difference to the fine-tuned full model of the same context fraction."""
    full = {r["context_fraction"]: r["rouge_l"] for r in rows if r["family"] == "full"}
    for r in rows:
        ref = full.get(r["context_fraction"])
        r["rouge_l_delta_vs_full"] = None if ref is None else r["rouge_l"] - ref
        r["within_margin"] = None if ref is None else r["rouge_l"] >= ref - margin


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["setting"])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


TABLE_COLUMNS: tuple[tuple[str, str, Callable[[dict[str, Any]], Any]], ...] = (
    ("Setting", "l", lambda r: r["setting"].split("@")[0]),
    ("Model", "l", lambda r: r["model"]),
    ("CodeBLEU", "r", lambda r: _fmt(r["codebleu"])),
    ("CodeBLEU (lib)", "r", lambda r: _fmt(r["codebleu_library"])),
    ("Syntax", "r", lambda r: _fmt(r["codebleu_syntax"])),
    ("Dataflow", "r", lambda r: _fmt(r["codebleu_dataflow"])),
    ("ROUGE-L", "r", lambda r: _fmt(r["rouge_l"])),
    ("BLEU", "r", lambda r: _fmt(r["bleu"])),
    ("chrF", "r", lambda r: _fmt(r["chrf"])),
    ("EM", "r", lambda r: _fmt(r["exact_match"])),
    ("Edit dist", "r", lambda r: _fmt(r["levenshtein"], 1)),
    ("Tok acc", "r", lambda r: _fmt(r["token_accuracy"])),
    ("Layers", "r", lambda r: f"{r['mean_layers']:.1f}/{r['num_layers']}"),
    ("Layers after 1st", "r", lambda r: f"{r['mean_layers_after_first']:.1f}"),
    ("Skipped", "r", lambda r: f"{r['layers_skipped_pct']:.0f}%"),
    ("Latency (s)", "r", lambda r: _fmt(r["latency_s"], 2)),
    ("Decode (s)", "r", lambda r: _fmt(r["decode_latency_s"], 2)),
    ("Tok/s", "r", lambda r: _fmt(r["tokens_per_s"], 1)),
    ("Energy (J)", "r", lambda r: _fmt(r["energy_per_completion_j"], 1)),
    ("Gate share", "r", lambda r: _fmt(100 * r["gate_overhead"] if r["gate_overhead"] is not None else None, 1) + "%"),
    ("ΔROUGE-L", "r", lambda r: _fmt(r["rouge_l_delta_vs_full"], 3)),
)


def markdown_report(rows: Sequence[dict[str, Any]], meta: dict[str, Any], margin: float) -> str:
    lines = [
        "# GreenCode evaluation",
        "",
        f"- model: `{meta['model']}`" + (f", base model: `{meta['base_model']}`" if meta["base_model"] else "")
        + (f", policy: `{meta['policy']}`" if meta["policy"] else ", no policy (policy rows absent)"),
        f"- corpus: `{meta['corpus']}`; samples per context fraction: {meta['samples']}",
        f"- {meta['num_layers']} layers, exit points {meta['exit_points']}",
        f"- energy: {meta['energy_source'] or 'not measured on this machine (n/a), never estimated'}",
        "",
        "Layers = mean decoder layers per generated token, including the first token (the prompt pass always "
        "runs all layers); 'after 1st' leaves that token out. Skipped = share of layers not run. "
        "Latency = wall time per completion (prompt pass + decoding, batched, amortised over the batch); "
        "Decode = the part after the shared prompt pass, where the gates differ. Energy per completion. "
        "Gate share = time spent in the gate's decisions / total time. "
        "CodeBLEU counts an unmatched data-flow as 0; 'CodeBLEU (lib)' is the codebleu package's total, "
        "which counts it as 1. "
        f"ΔROUGE-L = difference to the fine-tuned full model (stated tolerance {margin}).",
    ]
    for frac in sorted({r["context_fraction"] for r in rows}):
        lines += ["", f"## Context {frac:.0%} of the file (capped), greedy, target = next tokens", ""]
        lines.append("| " + " | ".join(c[0] for c in TABLE_COLUMNS) + " |")
        lines.append("|" + "|".join(":---" if c[1] == "l" else "---:" for c in TABLE_COLUMNS) + "|")
        for r in rows:
            if r["context_fraction"] == frac:
                lines.append("| " + " | ".join(str(c[2](r)) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_plots(rows: Sequence[dict[str, Any]], out_dir: Path) -> None:
    """Quality against mean layers, time (and energy when measured): one curve per gate family."""
    axes_x = [("mean_layers", "mean layers per token", "quality_vs_layers.png"),
              ("decode_latency_s", "decode time per completion (s), after the shared prompt pass",
               "quality_vs_time.png")]
    if any(r["energy_j"] is not None for r in rows):
        axes_x.append(("energy_per_completion_j", "energy per completion (J)", ENERGY_PLOT))
    for key, label, name in axes_x:
        _plot(rows, key, label, out_dir / name)


def _plot(rows: Sequence[dict[str, Any]], x_key: str, x_label: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (metric, title) in zip(axes, (("codebleu", "CodeBLEU"), ("rouge_l", "ROUGE-L"))):
        for family in FAMILIES:
            for frac in sorted({r["context_fraction"] for r in rows}):
                pts = sorted((r[x_key], r[metric]) for r in rows
                             if r["family"] == family and r["context_fraction"] == frac and r[x_key] is not None)
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", linestyle="-" if len(pts) > 1 else "none", label=f"{family} @{frac}")
        ax.set_xlabel(x_label)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- entry (in-process)


def evaluate(cfg: EvalConfig, lm: EarlyExitModel | None = None) -> EvalReport:
    """Run (or resume) every setting in this process and write the report."""
    out_dir = Path(cfg.output_dir)
    lm = lm or load_model(cfg.model, cfg.exits)
    plan = make_plan(cfg, lm)
    jobs = pending_jobs(cfg, plan, out_dir)
    log.info("%d settings x %d batches; %d batches with work left", len(plan.settings), len(plan.batches), len(jobs))
    run_jobs_locally(cfg, lm, jobs, out_dir)
    return write_report(cfg, plan, out_dir)
