"""Metric values on identical, disjoint and hand-computed cases."""

from __future__ import annotations

import pytest

from greencode.metrics import (
    CodeTokenizer,
    bleu,
    chrf,
    codebleu,
    exact_match,
    levenshtein,
    quality_metrics,
    rouge_l,
    token_accuracy,
)

PY = "def add(a, b):\n    total = a + b\n    return total\n"
JAVA = "public int add(int a, int b) {\n    int total = a + b;\n    return total;\n}\n"


@pytest.mark.parametrize("lang,code", [("python", PY), ("java", JAVA)])
def test_identical_code_scores_one_everywhere(lang, code):
    scores = quality_metrics([code, code], [code, code], lang, [[1, 2, 3], [4]], [[1, 2, 3], [4]])
    for key in ("codebleu", "codebleu_ngram", "codebleu_weighted_ngram", "codebleu_syntax", "codebleu_dataflow",
                "rouge_l", "bleu", "chrf", "exact_match", "levenshtein_ratio", "token_accuracy"):
        assert scores[key] == pytest.approx(1.0), key
    assert scores["levenshtein"] == 0


def test_codebleu_parts_combine_to_the_total():
    scores = codebleu(["int total = a - b;"], ["int total = a + b;"], "java")
    parts = [scores[k] for k in ("codebleu_ngram", "codebleu_weighted_ngram", "codebleu_syntax", "codebleu_dataflow")]
    assert all(0 <= p <= 1 for p in parts)
    assert scores["codebleu"] == pytest.approx(sum(parts) / 4)
    assert scores["codebleu"] < 1


def test_codebleu_without_reference_dataflow_reports_none():
    scores = codebleu(["return y"], ["return x + 1"], "python")
    assert scores["codebleu_dataflow"] is None
    rest = scores["codebleu_ngram"] + scores["codebleu_weighted_ngram"] + scores["codebleu_syntax"]
    assert scores["codebleu"] == pytest.approx(rest / 3)
    assert scores["codebleu_library"] == pytest.approx(rest / 4 + 0.25)  # the library counts the part as 1


def test_codebleu_counts_an_unmatched_dataflow_as_zero():
    # "pass" matches nothing of "x = y + 1"; the library's total still gives it 0.25
    scores = codebleu(["pass"], ["x = y + 1"], "python")
    assert scores["codebleu_dataflow"] == 0 and scores["codebleu"] == 0
    assert scores["codebleu_library"] == pytest.approx(0.25)


def test_rouge_l_keeps_code_symbols_and_case():
    assert CodeTokenizer().tokenize("a(b) != A[0.5]") == ["a", "(", "b", ")", "!", "=", "A", "[", "0.5", "]"]
    # tokens a ( b ) vs a [ b ]: LCS 2 of 4 -> P = R = F = 0.5 (the default tokenizer says 1.0)
    assert rouge_l(["a[b]"], ["a(b)"]) == pytest.approx(0.5)
    assert rouge_l(["Foo"], ["foo"]) == 0
    # mean over samples: 1.0 and 0.0
    assert rouge_l(["x = 1", "y"], ["x = 1", "z"]) == pytest.approx(0.5)


def test_bleu_and_chrf_bounds():
    assert bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)
    assert bleu(["q r s t u"], ["a b c d e"]) == 0
    assert chrf(["abcdef"], ["abcdef"]) == pytest.approx(1.0)
    assert chrf(["zzzz"], ["abcd"]) == 0
    assert 0 < chrf(["abcdxy"], ["abcdef"]) < 1


def test_exact_match_ignores_edge_whitespace_only():
    assert exact_match([" x = 1\n", "x=1", "y"], ["x = 1", "x = 1", "y"]) == pytest.approx(2 / 3)


def test_levenshtein_hand_computed():
    distance, ratio = levenshtein(["kitten", "abc"], ["sitting", "abc"])
    assert distance == pytest.approx(3 / 2)  # (3 + 0) / 2
    # ratio = 1 - indel/(len1+len2): LCS("kitten","sitting") = 4 -> indel 5 -> 8/13; mean with 1.0
    assert ratio == pytest.approx((8 / 13 + 1) / 2)


def test_token_accuracy_counts_reference_positions():
    assert token_accuracy([[1, 2, 3], [4]], [[1, 2, 4], [4, 5]]) == pytest.approx(3 / 5)
    assert token_accuracy([[9, 9, 9, 9]], [[9]]) == 1.0  # extra predicted tokens are not positions
    with pytest.raises(ValueError, match="at least one reference token"):
        token_accuracy([[]], [[]])


def test_mixed_languages_weight_codebleu_by_count():
    mixed = quality_metrics([PY, PY, "int x = y;"], [PY, PY, JAVA], ["python", "python", "java"])
    java = codebleu(["int x = y;"], [JAVA], "java")["codebleu"]
    assert mixed["codebleu"] == pytest.approx((2 * 1.0 + java) / 3)
    assert mixed["token_accuracy"] is None


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        rouge_l([], [])
    with pytest.raises(ValueError, match="CodeBLEU language"):
        codebleu(["x"], ["x"], "cobol")
