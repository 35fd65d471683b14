"""Corpus-level quality metrics for code completion (METHOD §6).

All scores are in [0, 1] except the Levenshtein distance (mean edit distance in
characters). Predictions and references are compared as decoded text, except the
token accuracy, which compares model token ids position by position.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

log = logging.getLogger(__name__)

CODEBLEU_WEIGHTS = (0.25, 0.25, 0.25, 0.25)  # n-gram, weighted n-gram, syntax, data-flow
CODEBLEU_LANGS = ("python", "java")

# identifiers, numbers, and every other non-space character as its own token: `a(b)` != `a[b]`
CODE_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d+)?|\S")


class CodeTokenizer:
    """ROUGE tokenizer for code: keeps case and symbols (rouge_score's default drops both)."""

    def tokenize(self, text: str) -> list[str]:
        return CODE_TOKEN.findall(text)


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not references:
        raise ValueError("metrics need at least one prediction/reference pair")


def codebleu(predictions: Sequence[str], references: Sequence[str], lang: str) -> dict[str, float | None]:
    """CodeBLEU and its four parts (codebleu 0.7 with tree-sitter grammars).

    The library adds ``theta * (dataflow or 1)``: a data-flow score of 0 (no reference flow
    matched) counts as a perfect 1, so a completely wrong prediction (``pass`` for
    ``x = y + 1``) scores 0.25. ``codebleu`` here uses the real data-flow score; when the
    references hold no data-flow at all the part is undefined (``codebleu_dataflow`` None)
    and the total is the mean of the other three parts. The library's own total is kept
    as ``codebleu_library`` for comparison with numbers computed by that package.
    """
    from codebleu import calc_codebleu

    _check(predictions, references)
    if lang not in CODEBLEU_LANGS:
        raise ValueError(f"CodeBLEU language must be one of {CODEBLEU_LANGS}, got {lang!r}")

    def score(refs: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
        root = logging.getLogger()
        root.disabled, was = True, root.disabled  # the library warns on the root logger
        try:
            return calc_codebleu(list(refs), list(preds), lang, weights=CODEBLEU_WEIGHTS)
        finally:
            root.disabled = was

    res = score(references, predictions)
    parts = [float(res["ngram_match_score"]), float(res["weighted_ngram_match_score"]),
             float(res["syntax_match_score"]), float(res["dataflow_match_score"])]
    # a zero data-flow score is either "nothing matched" or "nothing to match": the references
    # matched against themselves tell the two apart
    has_dataflow = parts[3] > 0 or score(references, references)["dataflow_match_score"] > 0
    if has_dataflow:
        total = sum(w * p for w, p in zip(CODEBLEU_WEIGHTS, parts))
    else:
        total = sum(w * p for w, p in zip(CODEBLEU_WEIGHTS[:3], parts[:3])) / sum(CODEBLEU_WEIGHTS[:3])
    return {
        "codebleu": total,
        "codebleu_library": float(res["codebleu"]),
        "codebleu_ngram": parts[0],
        "codebleu_weighted_ngram": parts[1],
        "codebleu_syntax": parts[2],
        "codebleu_dataflow": parts[3] if has_dataflow else None,
    }


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over samples, on code tokens (symbols kept, case kept)."""
    from rouge_score.rouge_scorer import RougeScorer

    _check(predictions, references)
    scorer = RougeScorer(["rougeL"], tokenizer=CodeTokenizer())
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return sum(scores) / len(scores)


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu, 13a tokenisation) scaled to [0, 1]."""
    import sacrebleu

    _check(predictions, references)
    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu) scaled to [0, 1]."""
    import sacrebleu

    _check(predictions, references)
    return sacrebleu.corpus_chrf(list(predictions), [list(references)]).score / 100


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference, ignoring leading/trailing whitespace."""
    _check(predictions, references)
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def levenshtein(predictions: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """(mean character edit distance, mean normalised similarity ratio in [0, 1])."""
    import Levenshtein

    _check(predictions, references)
    n = len(references)
    distance = sum(Levenshtein.distance(p, r) for p, r in zip(predictions, references)) / n
    ratio = sum(Levenshtein.ratio(p, r) for p, r in zip(predictions, references)) / n
    return distance, ratio


def token_accuracy(predicted_ids: Sequence[Sequence[int]], reference_ids: Sequence[Sequence[int]]) -> float:
    """Share of reference token positions where the model produced the same token id
    (a prediction that stops early scores the missing positions as wrong)."""
    if len(predicted_ids) != len(reference_ids):
        raise ValueError(f"{len(predicted_ids)} predicted id lists but {len(reference_ids)} references")
    total = sum(len(r) for r in reference_ids)
    if total == 0:
        raise ValueError("token accuracy needs at least one reference token")
    hits = sum(sum(p == r for p, r in zip(pred, ref)) for pred, ref in zip(predicted_ids, reference_ids))
    return hits / total


def quality_metrics(predictions: Sequence[str], references: Sequence[str], langs: str | Sequence[str],
                    predicted_ids: Sequence[Sequence[int]] | None = None,
                    reference_ids: Sequence[Sequence[int]] | None = None) -> dict[str, float | None]:
    """Every quality metric of METHOD §6 over one set of completions.

    ``langs`` is one language or one per sample; with several languages CodeBLEU is
    computed per language and averaged weighted by sample count.
    """
    _check(predictions, references)
    langs = [langs] * len(references) if isinstance(langs, str) else list(langs)
    if len(langs) != len(references):
        raise ValueError(f"{len(langs)} languages for {len(references)} samples")
    groups: dict[str, list[int]] = {}
    for i, lang in enumerate(langs):
        groups.setdefault(lang, []).append(i)
    per_lang = {lang: (len(idx), codebleu([predictions[i] for i in idx], [references[i] for i in idx], lang))
                for lang, idx in groups.items()}
    out: dict[str, float | None] = {}
    for key in next(iter(per_lang.values()))[1]:
        weighted = [(n, scores[key]) for n, scores in per_lang.values() if scores[key] is not None]
        out[key] = sum(n * v for n, v in weighted) / sum(n for n, _ in weighted) if weighted else None
    distance, ratio = levenshtein(predictions, references)
    have_ids = predicted_ids is not None and reference_ids is not None
    out.update(
        rouge_l=rouge_l(predictions, references),
        bleu=bleu(predictions, references),
        chrf=chrf(predictions, references),
        exact_match=exact_match(predictions, references),
        levenshtein=distance,
        levenshtein_ratio=ratio,
        token_accuracy=token_accuracy(predicted_ids, reference_ids) if have_ids else None,
    )
    return out
