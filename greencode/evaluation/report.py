"""The report of an evaluation: one row per setting from its finished parts, written as

    OUTPUT/results.json, results.csv     one row per setting: quality, layers, time, energy
    OUTPUT/report.md                     base vs LITE at full depth, per-exit agreement, then the gate tables
    OUTPUT/quality_vs_layers.png, quality_vs_passes.png, quality_vs_time.png (+ quality_vs_energy.png when
                                         measured), with 95% error bars
    OUTPUT/agreement.csv, agreement_vs_layer.png   per-exit agreement with the base model (when computed)

Every quality column has a 95% bootstrap interval (``<metric>_lo``/``_hi``) and a paired interval of its
difference to the fine-tuned full row of the same context fraction (``<metric>_vs_full``, ``_lo``, ``_hi``).
Lossless rows have the full model's quality and compute at least every layer per token (drafts +
verification), so they are compared by time and by *layer passes*: the sequential layer calls per
emitted token, which is what batch-1 latency follows (a verification over several tokens counts once).
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
from greencode.evaluation.intervals import (
    SampleStats,
    bootstrap,
    percentile_interval,
    quality_stats,
    resample_weights,
)
from greencode.evaluation.parts import load_part, part_path, run_keys
from greencode.evaluation.plan import FAMILIES, EvalPlan, Setting
from greencode.metrics import quality_metrics

log = logging.getLogger(__name__)

QUALITY_KEYS = ("codebleu", "codebleu_library", "codebleu_ngram", "codebleu_weighted_ngram", "codebleu_syntax",
                "codebleu_dataflow", "rouge_l", "bleu", "chrf", "exact_match", "levenshtein", "levenshtein_ratio",
                "token_accuracy")
REPORT_FILES = ("results.json", "results.csv", "report.md", "quality_vs_layers.png", "quality_vs_passes.png",
                "quality_vs_time.png")
ENERGY_PLOT = "quality_vs_energy.png"
AGREEMENT_FILES = ("agreement.csv", "agreement_vs_layer.png")


def summarize(setting: Setting, parts: Sequence[dict[str, Any]], samples: Sequence[CompletionSample],
              num_layers: int, model_name: str) -> dict[str, Any]:
    """One report row from the finished parts of a setting."""
    comps, refs = _completions(parts, samples)
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
    rounds = [p["speculative"] for p in parts if "speculative" in p]
    drafted = sum(s["drafted_tokens"] for s in rounds)
    passes = sum(s["layer_passes"] for s in rounds) / len(layers) if rounds and layers else mean_layers
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
        "lossless": setting.lossless,
        "layer_passes_per_token": passes,  # a gated token's own layers; lossless: sequential calls per token
        "acceptance_rate": sum(s["accepted_tokens"] for s in rounds) / drafted if drafted else None,
        "mean_draft_depth": sum(s["draft_depth_sum"] for s in rounds) / drafted if drafted else None,
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


def _completions(parts: Sequence[dict[str, Any]],
                 samples: Sequence[CompletionSample]) -> tuple[list[dict[str, Any]], list[CompletionSample]]:
    """A setting's completions in plan order (the same order for every setting of a context fraction) and
    their samples."""
    by_id = {s.sample_id: s for s in samples}
    comps = [c for p in parts for c in p["completions"]]
    return comps, [by_id[c["sample_id"]] for c in comps]


def row_stats(parts: Sequence[dict[str, Any]], samples: Sequence[CompletionSample]) -> list[SampleStats]:
    """Per-sample statistics of every quality column of a setting (for its bootstrap intervals)."""
    comps, refs = _completions(parts, samples)
    return quality_stats([c["text"] for c in comps], [s.target_text for s in refs], [s.lang for s in refs],
                         [c["token_ids"] for c in comps], [s.target_ids for s in refs])


def add_intervals(rows: list[dict[str, Any]], stats: Sequence[list[SampleStats]], resamples: int,
                  seed: int) -> None:
    """95% percentile intervals of every quality column, and paired ones of its difference to the fine-tuned full
    row of the same context fraction: one set of resample weights per fraction, shared by its rows."""
    for frac in sorted({r["context_fraction"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["context_fraction"] == frac]
        n = rows[idx[0]]["samples"]
        boots = {i: bootstrap(stats[i], resample_weights(n, resamples, seed)) for i in idx} if resamples else {}
        full = next((i for i in idx if rows[i]["family"] == "full"), None)
        for i in idx:
            r = rows[i]
            for key in QUALITY_KEYS:
                lo, hi = percentile_interval(boots[i][key]) if boots else (None, None)
                diff = None if full is None or r[key] is None or rows[full][key] is None else r[key] - rows[full][key]
                dlo, dhi = percentile_interval(boots[i][key] - boots[full][key]) if boots and diff is not None \
                    else (None, None)
                r.update({f"{key}_lo": lo, f"{key}_hi": hi, f"{key}_vs_full": diff, f"{key}_vs_full_lo": dlo,
                          f"{key}_vs_full_hi": dhi})


def gate_description(setting: Setting) -> str:
    g = setting.gate
    text = {"full": "all layers", "fixed": f"exit after layer {g.exit_layer}",
            "confidence": f"max prob >= {g.confidence}", "policy": f"p[exit] > {g.threshold}"}[g.mode]
    return f"lossless, drafts: {text}" if setting.lossless else text


@dataclass
class EvalReport:
    output_dir: Path
    rows: list[dict[str, Any]]

    agreement: dict[str, Any] | None = None

    def files(self) -> list[Path]:
        names = list(REPORT_FILES) + ([ENERGY_PLOT] if any(r["energy_j"] is not None for r in self.rows) else [])
        names += list(AGREEMENT_FILES) if self.agreement is not None else []
        return [self.output_dir / n for n in names]


def write_report(cfg: EvalConfig, plan: EvalPlan, out_dir: Path,
                 agreement: dict[str, Any] | None = None) -> EvalReport:
    """Aggregate every finished part into results.json/.csv, report.md and the plots (with the per-exit
    agreement of greencode.evaluation.agreement when given)."""
    rows, stats = [], []
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
        stats.append(row_stats(parts, plan.samples[setting.context_fraction]) if cfg.bootstrap_resamples else [])
    _add_deltas(rows, cfg.quality_margin)
    add_intervals(rows, stats, cfg.bootstrap_resamples, cfg.bootstrap_seed)
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
        "bootstrap": {"resamples": cfg.bootstrap_resamples, "seed": cfg.bootstrap_seed, "level": 0.95,
                      "paired": True, "kind": "percentile"},
        "agreement": {k: v for k, v in agreement.items() if k != "key"} if agreement else None,
        "config": cfg.model_dump(mode="json"),
    }
    write_atomic(out_dir / "results.json", json.dumps({**meta, "rows": rows}, indent=2))
    write_atomic(out_dir / "results.csv", _csv(rows))
    write_atomic(out_dir / "report.md", markdown_report(rows, meta, cfg.quality_margin))
    write_plots(rows, out_dir)
    if agreement is not None:
        write_atomic(out_dir / "agreement.csv", _csv(agreement_rows(agreement)))
        _agreement_plot(agreement, out_dir / "agreement_vs_layer.png")
    log.info("report written to %s", out_dir)
    return EvalReport(out_dir, rows, agreement)


AGREEMENT_COLUMNS = {  # key -> label, in the order the report shows them
    "untuned": "Base model's exits",
    "untranslated": "Evaluated, untranslated",
    "finetuned": "Evaluated, as decoded",
}


def agreement_rows(agreement: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per exit (and the final layer): agreement with the base model's final argmax of every computed
    decoding (base model's exits; the evaluated model's without and with its translators), and the change from
    the first to the last."""
    present = [k for k in AGREEMENT_COLUMNS if agreement.get(k)]
    rows = []
    for i, layer in enumerate(agreement["layers"]):
        row = {"layer": layer, **{k: agreement[k][i] if agreement.get(k) else None for k in AGREEMENT_COLUMNS}}
        first, last = row[present[0]], row[present[-1]]
        row["change"] = None if len(present) < 2 else last - first
        row["tokens"] = agreement["tokens"]
        rows.append(row)
    return rows


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


def _ci(r: dict[str, Any], key: str, digits: int = 3) -> str:
    """``value [lo, hi]`` when the row has a 95% interval for ``key``, else the value."""
    text = _fmt(r[key], digits)
    if r.get(f"{key}_lo") is None:
        return text
    return f"{text} [{r[f'{key}_lo']:.{digits}f}, {r[f'{key}_hi']:.{digits}f}]"


TABLE_COLUMNS: tuple[tuple[str, str, Callable[[dict[str, Any]], Any]], ...] = (
    ("Setting", "l", lambda r: r["setting"].split("@")[0]),
    ("Model", "l", lambda r: r["model"]),
    ("CodeBLEU", "r", lambda r: _ci(r, "codebleu")),
    ("CodeBLEU (lib)", "r", lambda r: _ci(r, "codebleu_library")),
    ("Syntax", "r", lambda r: _ci(r, "codebleu_syntax")),
    ("Dataflow", "r", lambda r: _ci(r, "codebleu_dataflow")),
    ("ROUGE-L", "r", lambda r: _ci(r, "rouge_l")),
    ("BLEU", "r", lambda r: _ci(r, "bleu")),
    ("chrF", "r", lambda r: _ci(r, "chrf")),
    ("EM", "r", lambda r: _ci(r, "exact_match")),
    ("Edit dist", "r", lambda r: _ci(r, "levenshtein", 1)),
    ("Tok acc", "r", lambda r: _ci(r, "token_accuracy")),
    ("Layers", "r", lambda r: f"{r['mean_layers']:.1f}/{r['num_layers']}"),
    ("Layers after 1st", "r", lambda r: f"{r['mean_layers_after_first']:.1f}"),
    ("Skipped", "r", lambda r: f"{r['layers_skipped_pct']:.0f}%"),
    ("Passes/tok", "r", lambda r: f"{r['layer_passes_per_token']:.1f}"),
    ("Accept", "r", lambda r: _fmt(r["acceptance_rate"], 2)),
    ("Latency (s)", "r", lambda r: _fmt(r["latency_s"], 2)),
    ("Decode (s)", "r", lambda r: _fmt(r["decode_latency_s"], 2)),
    ("Tok/s", "r", lambda r: _fmt(r["tokens_per_s"], 1)),
    ("Energy (J)", "r", lambda r: _fmt(r["energy_per_completion_j"], 1)),
    ("Gate share", "r", lambda r: _fmt(100 * r["gate_overhead"] if r["gate_overhead"] is not None else None, 1) + "%"),
    ("ΔROUGE-L", "r", lambda r: _ci(r, "rouge_l_vs_full")),
)

# the columns of the base-vs-LITE table: (label, key, digits)
HEADLINE_METRICS = (("ROUGE-L", "rouge_l", 3), ("CodeBLEU", "codebleu", 3), ("BLEU", "bleu", 3), ("chrF", "chrf", 3),
                    ("Exact match", "exact_match", 3), ("Token accuracy", "token_accuracy", 3),
                    ("Edit distance", "levenshtein", 1))


def _headline(rows: Sequence[dict[str, Any]], frac: float) -> list[str]:
    """Base model vs the fine-tuned model, both at full depth: the first thing the report says."""
    base = next((r for r in rows if r["family"] == "base" and r["context_fraction"] == frac), None)
    full = next((r for r in rows if r["family"] == "full" and r["context_fraction"] == frac), None)
    if base is None or full is None:
        return []
    lines = [f"### Base model vs fine-tuned at full depth (context {frac:.0%}, {full['samples']} held-out samples)", "",
             "| Metric | Base | Fine-tuned full | Fine-tuned − base [95% CI, paired] | Fine-tuned / base |",
             "|:---|---:|---:|---:|---:|"]
    for label, key, digits in HEADLINE_METRICS:
        if full[key] is None or base[key] is None:
            continue
        # the base row holds base − full and its interval; the table shows full − base
        diff = _fmt(-base[f"{key}_vs_full"], digits)
        if base.get(f"{key}_vs_full_lo") is not None:
            diff += f" [{-base[f'{key}_vs_full_hi']:.{digits}f}, {-base[f'{key}_vs_full_lo']:.{digits}f}]"
        ratio = _fmt(full[key] / base[key], 2) if base[key] else "n/a"
        lines.append(f"| {label} | {_ci(base, key, digits)} | {_ci(full, key, digits)} | {diff} | {ratio} |")
    return lines + [""]


def _agreement_section(agreement: dict[str, Any] | None) -> list[str]:
    if not agreement:
        return []
    lines = [f"### Agreement of each exit with the base model's final prediction ({agreement['tokens']} held-out "
             "tokens)", "",
             "Share of positions where the exit's argmax equals the base model's final-layer argmax. Untuned = the "
             "base model's own exits" + ("" if agreement["untuned"] else " (no base model given: the evaluated "
                                         "model's final layer is the reference)") + "; untranslated = the evaluated "
             "model's exits through the shared head alone; as decoded = through its exit translators when it has "
             "them (what every gate uses).", ""]
    present = [k for k in AGREEMENT_COLUMNS if agreement.get(k)]
    lines += ["| Exit layer | " + " | ".join(AGREEMENT_COLUMNS[k] for k in present) + " | Change |",
              "|---:|" + "---:|" * (len(present) + 1)]
    for row in agreement_rows(agreement):
        change = "n/a" if row["change"] is None else f"{row['change']:+.3f}"
        lines.append(f"| {row['layer']} | " + " | ".join(_fmt(row[k]) for k in present) + f" | {change} |")
    return lines + [""]


def markdown_report(rows: Sequence[dict[str, Any]], meta: dict[str, Any], margin: float) -> str:
    fracs = sorted({r["context_fraction"] for r in rows})
    lines = [
        "# GreenCode evaluation",
        "",
        f"- model: `{meta['model']}`" + (f", base model: `{meta['base_model']}`" if meta["base_model"] else "")
        + (f", policy: `{meta['policy']}`" if meta["policy"] else ", no policy (policy rows absent)"),
        "- evaluated by content: " + ", ".join(f"{role} `{digest}`" for role, digest in meta["digests"].items()
                                                if digest),
        f"- corpus: `{meta['corpus']}`; task: {meta['task']}; held-out samples per context fraction: "
        f"{meta['samples']}",
        f"- {meta['num_layers']} layers, exit points {meta['exit_points']}",
        f"- energy: {meta['energy_source'] or 'not measured on this machine (n/a), never estimated'}",
        "- intervals: " + (f"95% percentile bootstrap, {meta['bootstrap']['resamples']} paired resamples of the "
                           f"samples (seed {meta['bootstrap']['seed']})" if meta["bootstrap"]["resamples"]
                           else "none (bootstrap_resamples 0)"),
        "",
    ]
    for frac in fracs:
        lines += _headline(rows, frac)
    lines += _agreement_section(meta.get("agreement"))
    lines += [
        "### How to read the gate tables",
        "",
        "Layers = mean decoder layers per generated token, including the first token (the prompt pass always "
        "runs all layers); 'after 1st' leaves that token out. Skipped = share of layers not run. "
        "Latency = wall time per completion (prompt pass + decoding, batched, amortised over the batch); "
        "Decode = the part after the shared prompt pass, where the gates differ. Energy per completion. "
        "Gate share = time spent in the gate's decisions / total time. "
        "lossless-* rows: the full model's text, drafted by that gate and verified (METHOD §7); their Layers count "
        "drafts + verification (never below the model's depth), Passes/tok = sequential layer calls per token "
        "(what batch-1 latency follows; a verification over several tokens counts once; for the other rows a "
        "token's own layers), Accept = share of drafted tokens the full model kept. "
        "CodeBLEU counts an unmatched data-flow as 0; 'CodeBLEU (lib)' is the codebleu package's total, "
        "which counts it as 1. Quality cells are `value [95% CI]`. "
        f"ΔROUGE-L = difference to the fine-tuned full model with its paired 95% CI (stated tolerance {margin}).",
    ]
    for frac in fracs:
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
    axes_x = [("mean_layers", "mean layers computed per token", "quality_vs_layers.png"),
              ("layer_passes_per_token", "sequential layer passes per token", "quality_vs_passes.png"),
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
                pts = sorted((r[x_key], r[metric], r.get(f"{metric}_lo"), r.get(f"{metric}_hi")) for r in rows
                             if r["family"] == family and r["context_fraction"] == frac and r[x_key] is not None
                             and r[metric] is not None)
                if pts:
                    xs, ys, los, his = zip(*pts)
                    yerr = None if any(v is None for v in los + his) else \
                        [[y - lo for y, lo in zip(ys, los)], [hi - y for y, hi in zip(ys, his)]]
                    ax.errorbar(xs, ys, yerr=yerr, marker="o", capsize=3, linestyle="-" if len(pts) > 1 else "none",
                                label=f"{family} @{frac}")
        ax.set_xlabel(x_label)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("error bars: 95% bootstrap intervals", fontsize=9)
    _save(fig, path)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def _agreement_plot(agreement: dict[str, Any], path: Path) -> None:
    """Agreement with the base model's final prediction against exit layer, for every decoding the run computed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in AGREEMENT_COLUMNS.items():
        if agreement.get(key):
            ax.plot(agreement["layers"], agreement[key], marker="o", label=label)
    ax.set_xlabel("exit layer")
    ax.set_ylabel("agreement with base final argmax")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{agreement['tokens']} held-out tokens", fontsize=9)
    _save(fig, path)
