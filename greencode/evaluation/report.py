"""The report of an evaluation: one row per setting from its finished parts, written as

    OUTPUT/results.json, results.csv     one row per setting: quality, layers, time, energy
    OUTPUT/report.md                     the table in the shape of the published ones
    OUTPUT/quality_vs_layers.png, quality_vs_time.png (+ quality_vs_energy.png when measured)
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from greencode.atomic import write_atomic
from greencode.config import EvalConfig
from greencode.data import CompletionSample
from greencode.evaluation.parts import load_part, part_path, run_keys
from greencode.evaluation.plan import FAMILIES, EvalPlan, Setting
from greencode.metrics import quality_metrics

log = logging.getLogger(__name__)

QUALITY_KEYS = ("codebleu", "codebleu_library", "codebleu_ngram", "codebleu_weighted_ngram", "codebleu_syntax",
                "codebleu_dataflow", "rouge_l", "bleu", "chrf", "exact_match", "levenshtein", "levenshtein_ratio",
                "token_accuracy")
REPORT_FILES = ("results.json", "results.csv", "report.md", "quality_vs_layers.png", "quality_vs_time.png")
ENERGY_PLOT = "quality_vs_energy.png"


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
                raise RuntimeError(f"setting {setting.name} has no result for batch {batch.batch_id}; "
                                   "rerun to finish it")
            parts.append(part)
        name = cfg.base_model.name if setting.uses_base_model else cfg.model.name
        rows.append(summarize(setting, parts, plan.samples[setting.context_fraction], plan.num_layers, name))
    _add_deltas(rows, cfg.quality_margin)
    meta = {
        "model": cfg.model.name,
        "base_model": cfg.base_model.name if cfg.base_model else None,
        "policy": cfg.policy_path,
        "digests": plan.digests,  # what exactly was evaluated: model, base model and policy by content
        "corpus": cfg.data.corpus,
        "task": cfg.task if cfg.task == "completion" else
        f"fim ({cfg.fim_order}, up to {cfg.fim_suffix_tokens} suffix tokens)",
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
        "- evaluated by content: " + ", ".join(f"{role} `{digest}`" for role, digest in meta["digests"].items()
                                                if digest),
        f"- corpus: `{meta['corpus']}`; task: {meta['task']}; samples per context fraction: {meta['samples']}",
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
        target = "the span after it, the file after the span given as suffix" if meta["task"] != "completion" \
            else "next tokens"
        lines += ["", f"## Context {frac:.0%} of the file (capped), greedy, target = {target}", ""]
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
