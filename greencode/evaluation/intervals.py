"""95% bootstrap confidence intervals for every quality metric, and for a row's difference to another row.

Every metric is written as per-sample *sufficient statistics* whose sums give the corpus score
(a mean is (value, 1); token accuracy is (hits, reference tokens); BLEU and chrF are sacrebleu's
own per-sentence statistics; CodeBLEU's four parts are the codebleu package's n-gram counts,
subtree matches and data-flow matches, computed per sample with the package's own helpers). So a
bootstrap resample is a weight vector over the samples and costs one matrix product, not a
re-run of the metric; at full weight the statistics give back exactly the corpus value
(tests/test_intervals.py checks this against :func:`greencode.metrics.quality_metrics`).

Resampling is *paired*: the same resample weights are applied to every row of one context
fraction (the rows share their samples), so the interval of ``row - full`` is the percentile
interval of the per-resample differences. Percentile intervals, seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# score(sums) for B resamples at once: sums is (B, k), the result one (B,) array per metric (NaN where undefined)
Scorer = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class SampleStats:
    """Per-sample sufficient statistics of one or more metrics: ``values`` (n, k), and the scorer of their sums."""

    values: np.ndarray
    score: Scorer


def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) counts: how often each sample is drawn in each bootstrap resample (n draws with replacement)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    weights = np.zeros((resamples, n), dtype=np.float64)
    np.add.at(weights, (np.arange(resamples)[:, None], draws), 1.0)
    return weights


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float | None, float | None]:
    """(lo, hi) percentile interval of bootstrap values; None when every value is undefined."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None, None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap(groups: Sequence[SampleStats], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric on every resample (weights from :func:`resample_weights`): name -> (B,) values."""
    out: dict[str, np.ndarray] = {}
    for group in groups:
        out.update(group.score(weights @ group.values))
    return out


def mean_stats(name: str, values: Sequence[float]) -> SampleStats:
    """A metric that is the mean of one per-sample value (ROUGE-L, exact match, edit distance)."""
    arr = np.column_stack([np.asarray(values, dtype=np.float64), np.ones(len(values))])
    return SampleStats(arr, lambda s: {name: s[:, 0] / s[:, 1]})


def ratio_stats(name: str, numerators: Sequence[float], denominators: Sequence[float]) -> SampleStats:
    """A metric that is sum(numerators) / sum(denominators) (token accuracy)."""
    arr = np.column_stack([np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)])
    return SampleStats(arr, lambda s: {name: np.where(s[:, 1] > 0, s[:, 0] / np.maximum(s[:, 1], 1e-300), np.nan)})


def sacrebleu_stats(name: str, metric: object, predictions: Sequence[str], references: Sequence[str]) -> SampleStats:
    """BLEU or chrF (a sacrebleu metric object) from its own per-sentence statistics, scaled to [0, 1]."""
    arr = np.asarray(metric._extract_corpus_statistics(list(predictions), [list(references)]), dtype=np.float64)

    def score(sums: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.array([metric._compute_score_from_stats([int(round(x)) for x in row]).score / 100
                                for row in sums])}

    return SampleStats(arr, score)


# --------------------------------------------------------------------------- CodeBLEU

CODEBLEU_KEYS = ("codebleu", "codebleu_library", "codebleu_ngram", "codebleu_weighted_ngram", "codebleu_syntax",
                 "codebleu_dataflow")
# columns of one sample's CodeBLEU statistics
_NG, _WNG, _SYN, _DF = slice(0, 10), slice(10, 20), slice(20, 22), slice(22, 24)


def _ngram_counts(module: object, refs: list, hyp: list[str], precision: Callable) -> list[float]:
    """4 numerators, 4 denominators, hypothesis length, closest reference length (one sample)."""
    nums, dens = [], []
    for n in range(1, 5):
        p = precision(refs, hyp, n)
        nums.append(p.numerator if hasattr(p, "numerator") else p[0])
        dens.append(p.denominator if hasattr(p, "denominator") else p[1])
    return [*nums, *dens, len(hyp), module.closest_ref_length(refs, len(hyp))]


SMOOTHING_EPSILON = 0.1  # codebleu's SmoothingFunction().method1 default, used by its corpus_bleu


def _ngram_scores(block: np.ndarray) -> np.ndarray:
    """codebleu's corpus_bleu tail (brevity penalty, method1 smoothing, uniform weights) on summed counts, for
    every resample at once: block is (B, 10) = 4 numerators, 4 denominators, hypothesis and reference length.
    (The weighted n-gram part's unigram counts are weighted, keywords 1 and other tokens 0.2: not integers.)"""
    nums, dens, hyp_len, ref_len = block[:, :4], block[:, 4:8], block[:, 8], block[:, 9]
    with np.errstate(divide="ignore", invalid="ignore"):
        bp = np.where(hyp_len > ref_len, 1.0, np.where(hyp_len == 0, 0.0, np.exp(1 - ref_len / hyp_len)))
        p = np.where(nums == 0, nums + SMOOTHING_EPSILON, nums) / dens
        score = bp * np.exp(np.sum(0.25 * np.log(p), axis=1))
    return np.where(nums[:, 0] == 0, 0.0, score)


def _sub_trees(root: object) -> list[str]:
    """codebleu's syntax_match subtree list: every node with children, as its s-expression."""
    out, stack = [], [root]
    while stack:
        node = stack.pop()
        out.append(str(node))
        stack.extend(child for child in node.children if len(child.children) != 0)
    return out


def codebleu_sample_counts(prediction: str, reference: str, lang: str, parsers: dict) -> list[float]:
    """One sample's CodeBLEU statistics, computed as codebleu 0.7's corpus functions compute them."""
    from codebleu import bleu, dataflow_match, syntax_match, weighted_ngram_match
    from codebleu.codebleu import PACKAGE_DIR
    from codebleu.utils import get_tree_sitter_language
    from tree_sitter import Parser

    if lang not in parsers:
        parser = Parser()
        parser.language = get_tree_sitter_language(lang)
        keywords = (PACKAGE_DIR / "keywords" / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
        parsers[lang] = (parser, {k.strip() for k in keywords})
    parser, keywords = parsers[lang]
    hyp, ref = prediction.strip(), reference.strip()
    hyp_tokens, ref_tokens = hyp.split(), ref.split()
    ngram = _ngram_counts(bleu, [ref_tokens], hyp_tokens, bleu.modified_precision)
    weighted_ref = [[ref_tokens, {t: 1 if t in keywords else 0.2 for t in ref_tokens}]]
    weighted = _ngram_counts(weighted_ngram_match, weighted_ref, hyp_tokens, weighted_ngram_match.modified_recall)

    def clean(code: str) -> str:
        try:
            return syntax_match.remove_comments_and_docstrings(code, lang)
        except Exception:  # the package falls back to the raw code the same way
            return code

    cand, refc = clean(hyp), clean(ref)
    cand_trees = _sub_trees(parser.parse(bytes(cand, "utf8")).root_node)
    ref_trees = _sub_trees(parser.parse(bytes(refc, "utf8")).root_node)
    syntax = [sum(t in cand_trees for t in ref_trees), len(ref_trees)]
    dfg_parser = [parser, dataflow_match.dfg_function[lang]]
    cand_dfg = dataflow_match.normalize_dataflow(dataflow_match.get_data_flow(cand, dfg_parser))
    ref_dfg = dataflow_match.normalize_dataflow(dataflow_match.get_data_flow(refc, dfg_parser))
    matched = 0
    for item in ref_dfg:
        if item in cand_dfg:
            matched += 1
            cand_dfg.remove(item)
    return [*ngram, *weighted, *syntax, matched, len(ref_dfg)]


def codebleu_parts_from_sums(sums: np.ndarray) -> dict[str, np.ndarray]:
    """The CodeBLEU columns of greencode.metrics.codebleu from one language's summed statistics (B, 24);
    NaN where the data-flow part is undefined (no reference data-flow)."""
    from greencode.metrics import CODEBLEU_WEIGHTS

    w = CODEBLEU_WEIGHTS
    syn, df = sums[:, _SYN], sums[:, _DF]
    with np.errstate(divide="ignore", invalid="ignore"):
        syntax = np.where(syn[:, 1] > 0, syn[:, 0] / syn[:, 1], 0.0)
        dataflow = np.where(df[:, 1] > 0, df[:, 0] / df[:, 1], 0.0)
    ngram, weighted = _ngram_scores(sums[:, _NG]), _ngram_scores(sums[:, _WNG])
    has_dataflow = df[:, 1] > 0
    three = w[0] * ngram + w[1] * weighted + w[2] * syntax
    total = np.where(has_dataflow, three + w[3] * dataflow, three / sum(w[:3]))
    library = three + w[3] * np.where(dataflow == 0, 1.0, dataflow)
    return dict(zip(CODEBLEU_KEYS, (total, library, ngram, weighted, syntax, np.where(has_dataflow, dataflow, np.nan))))


def codebleu_stats(predictions: Sequence[str], references: Sequence[str], langs: Sequence[str]) -> SampleStats:
    """Every CodeBLEU column; several languages are averaged weighted by their sample counts, as
    greencode.metrics.quality_metrics does."""
    parsers: dict = {}
    counts = np.asarray([codebleu_sample_counts(p, r, lang, parsers)
                         for p, r, lang in zip(predictions, references, langs)], dtype=np.float64)
    names = sorted(set(langs))
    # one block of columns per language (zeros for the other languages' samples) plus its sample count
    width = counts.shape[1] + 1
    arr = np.zeros((len(langs), width * len(names)))
    for i, lang in enumerate(langs):
        j = names.index(lang)
        arr[i, j * width : (j + 1) * width - 1] = counts[i]
        arr[i, (j + 1) * width - 1] = 1.0

    def score(sums: np.ndarray) -> dict[str, np.ndarray]:
        per_lang = [(sums[:, (j + 1) * width - 1], codebleu_parts_from_sums(sums[:, j * width : (j + 1) * width - 1]))
                    for j in range(len(names))]
        out = {}
        for k in CODEBLEU_KEYS:  # languages weighted by their resampled counts, an undefined part left out
            num = sum(np.where(np.isnan(p[k]) | (n == 0), 0.0, n * np.nan_to_num(p[k])) for n, p in per_lang)
            den = sum(np.where(np.isnan(p[k]) | (n == 0), 0.0, n) for n, p in per_lang)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[k] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
        return out

    return SampleStats(arr, score)


def quality_stats(predictions: Sequence[str], references: Sequence[str], langs: Sequence[str],
                  predicted_ids: Sequence[Sequence[int]] | None,
                  reference_ids: Sequence[Sequence[int]] | None) -> list[SampleStats]:
    """SampleStats of every column of greencode.metrics.quality_metrics, over the same samples."""
    import Levenshtein
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.metrics import BLEU, CHRF

    from greencode.metrics import CodeTokenizer

    scorer = RougeScorer(["rougeL"], tokenizer=CodeTokenizer())
    pairs = list(zip(predictions, references))
    groups = [
        codebleu_stats(predictions, references, langs),
        mean_stats("rouge_l", [scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs]),
        sacrebleu_stats("bleu", BLEU(), predictions, references),
        sacrebleu_stats("chrf", CHRF(), predictions, references),
        mean_stats("exact_match", [float(p.strip() == r.strip()) for p, r in pairs]),
        mean_stats("levenshtein", [Levenshtein.distance(p, r) for p, r in pairs]),
        mean_stats("levenshtein_ratio", [Levenshtein.ratio(p, r) for p, r in pairs]),
    ]
    if predicted_ids is not None and reference_ids is not None:
        groups.append(ratio_stats("token_accuracy",
                                  [sum(a == b for a, b in zip(p, r)) for p, r in zip(predicted_ids, reference_ids)],
                                  [len(r) for r in reference_ids]))
    return groups
