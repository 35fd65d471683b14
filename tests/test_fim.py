"""Fill-in-the-middle: FIM tokens detected per family, prompt token layouts, client-formatted prompts.

The tokenizers are built here (never downloaded): the embedded SmolLM2 tokenizer is byte-level
BPE like StarCoder's, Qwen2.5-Coder's and DeepSeek-Coder's, so each family's sentinels are added
to a copy of it; Code Llama's SentencePiece-style tokenizer is a tiny CodeLlamaTokenizer set up
as the released tokenizer.json is, whose own infilling encoder is the reference.
"""

from functools import cache

import pytest
from tokenizers import normalizers
from transformers import CodeLlamaTokenizer

from conftest import DEEPSEEK_BOS, FIM_SENTINELS, fim_tokenizer
from greencode.fim import FimParts, FimUnsupportedError, detect_fim, fim_format, fim_prompt_ids, parse_fim_prompt

SENTINELS = FIM_SENTINELS
PREFIX = "def area(r):\n    return "
SUFFIX = "\n\nprint(area(2.0))\n"


byte_level = cache(fim_tokenizer)  # built once per family; the tests only read them


@pytest.fixture(scope="module")
def codellama():
    """Byte-fallback BPE with single-character pieces; the normalizer prepends '▁' as the real one does."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in "▁abcdefghijklmnopqrstuvwxyz()[]:.,=+-*/'\"0123456789":
        vocab.setdefault(piece, len(vocab))
    tok = CodeLlamaTokenizer(vocab=vocab, merges=[])
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.backend_tokenizer.pre_tokenizer = None
    return tok


def plain(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("family", sorted(SENTINELS))
def test_detects_each_family(family):
    tok = byte_level(family)
    fmt = detect_fim(tok)
    assert fmt.family == family
    assert [fmt.prefix_id, fmt.suffix_id, fmt.middle_id] == tok.convert_tokens_to_ids(list(SENTINELS[family]))
    assert fmt.spm == (family in ("starcoder", "santacoder"))


def test_codellama_is_detected_with_its_end_token(codellama):
    fmt = detect_fim(codellama)
    assert fmt.family == "codellama" and fmt.spm
    assert [fmt.prefix_id, fmt.suffix_id, fmt.middle_id, fmt.end_id] == \
        codellama.convert_tokens_to_ids(["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"])


def test_a_model_without_fim_tokens_is_refused_clearly(tokenizer):
    assert detect_fim(tokenizer) is None  # the embedded SmolLM2
    with pytest.raises(FimUnsupportedError, match="without a suffix"):
        fim_format(tokenizer)
    with pytest.raises(FimUnsupportedError, match="FIM tokens"):
        fim_prompt_ids(tokenizer, PREFIX, SUFFIX)


@pytest.mark.parametrize("family", sorted(SENTINELS))
def test_psm_layout(family):
    tok = byte_level(family)
    p, s, m = tok.convert_tokens_to_ids(list(SENTINELS[family]))
    bos = [tok.convert_tokens_to_ids(DEEPSEEK_BOS)] if family == "deepseek" else []
    ids = fim_prompt_ids(tok, PREFIX, SUFFIX)
    assert ids == [*bos, p, *plain(tok, PREFIX), s, *plain(tok, SUFFIX), m]
    assert fim_prompt_ids(tok, PREFIX, SUFFIX, fmt=detect_fim(tok)) == ids


def test_starcoder_psm_golden_tokens():
    tok = byte_level("starcoder")
    ids = fim_prompt_ids(tok, "x = f(", ")\n")
    assert tok.convert_ids_to_tokens(ids) == ["<fim_prefix>", "x", "Ġ=", "Ġf", "(", "<fim_suffix>", ")", "Ċ",
                                              "<fim_middle>"]


@pytest.mark.parametrize("family", ["starcoder", "santacoder"])
def test_spm_layout(family):
    tok = byte_level(family)
    p, s, m = tok.convert_tokens_to_ids(list(SENTINELS[family]))
    ids = fim_prompt_ids(tok, PREFIX, SUFFIX, order="spm")
    assert ids == [p, s, *plain(tok, SUFFIX), m, *plain(tok, PREFIX)]


@pytest.mark.parametrize("family", ["qwen", "deepseek"])
def test_spm_is_refused_for_psm_only_families(family):
    with pytest.raises(FimUnsupportedError, match="'psm'"):
        fim_prompt_ids(byte_level(family), PREFIX, SUFFIX, order="spm")
    with pytest.raises(ValueError, match="'psm' or 'spm'"):
        fim_prompt_ids(byte_level(family), PREFIX, SUFFIX, order="pms")


@pytest.mark.parametrize("prefix,suffix", [("def x(", ")\n return x"), (" a = [", "]"), ("f(", " + 1)")])
@pytest.mark.parametrize("order", ["psm", "spm"])
def test_codellama_matches_its_reference_encoder(codellama, prefix, suffix, order):
    reference = codellama(prefix, suffix=suffix, suffix_first=order == "spm")["input_ids"]
    assert fim_prompt_ids(codellama, prefix, suffix, order=order) == reference


def test_codellama_golden_tokens(codellama):
    """Meta's layout: BOS, <PRE>, the prefix with SentencePiece's leading space, <SUF>, the suffix without it, <MID>."""
    tokens = codellama.convert_ids_to_tokens(fim_prompt_ids(codellama, "f(x", ")\n"))
    assert tokens == ["<s>", "▁<PRE>", "▁", "f", "(", "x", "▁<SUF>", ")", "<0x0A>", "▁<MID>"]
    tokens = codellama.convert_ids_to_tokens(fim_prompt_ids(codellama, "f(x", ")\n", order="spm"))
    assert tokens == ["<s>", "▁<PRE>", "▁<SUF>", ")", "<0x0A>", "▁<MID>", "▁", "f", "(", "x"]


@pytest.mark.parametrize("family", sorted(SENTINELS))
def test_sentinels_in_the_users_code_stay_text(family):
    tok = byte_level(family)
    p, s, m = SENTINELS[family]
    ids = fim_prompt_ids(tok, f"MARKERS = ('{p}', '{s}', '{m}')\n", f"# {m}\n")
    for sentinel in SENTINELS[family]:
        assert ids.count(tok.convert_tokens_to_ids(sentinel)) == 1


# --------------------------------------------------------------------------- prompts clients format

BEFORE, AFTER = "def add(a, b):\n    return a + ", "\n\nx = add(1, 2)  "


@pytest.mark.parametrize("family,p,s,m", [
    # llm-vscode's fillInTheMiddle templates; llm-ls sends f"{prefix}{before}{suffix}{after}{middle}"
    ("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("codellama", "<PRE> ", " <SUF>", " <MID>"),
    ("deepseek", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
    # Continue's templates for Qwen2.5-Coder and SantaCoder-style tokens
    ("qwen", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("santacoder", "<fim-prefix>", "<fim-suffix>", "<fim-middle>"),
])
def test_client_formatted_psm_prompts_are_recognised(family, p, s, m):
    assert parse_fim_prompt(f"{p}{BEFORE}{s}{AFTER}{m}") == FimParts(BEFORE, AFTER, "", family, "psm")


def test_client_formatted_spm_prompts_are_recognised():
    assert parse_fim_prompt(f"<fim_prefix><fim_suffix>{AFTER}<fim_middle>{BEFORE}") == \
        FimParts(BEFORE, AFTER, "", "starcoder", "spm")
    assert parse_fim_prompt(f"<PRE> <SUF>{AFTER} <MID> {BEFORE}") == FimParts(BEFORE, AFTER, "", "codellama", "spm")


def test_a_recognised_prompt_is_rebuilt_with_the_models_own_tokens():
    """llm-vscode configured with StarCoder's sentinels, serving a Qwen-style model."""
    qwen = byte_level("qwen", extra=("<|repo_name|>", "<|file_sep|>"))
    parts = parse_fim_prompt(f"<fim_prefix>{BEFORE}<fim_suffix>{AFTER}<fim_middle>")
    p, s, m = qwen.convert_tokens_to_ids(list(SENTINELS["qwen"]))
    assert fim_prompt_ids(qwen, parts.prefix, parts.suffix) == [p, *plain(qwen, BEFORE), s, *plain(qwen, AFTER), m]
    # Qwen's repository format puts file context before the prefix sentinel: kept, special tokens included
    repo = "<|repo_name|>demo\n<|file_sep|>util.py\n"
    parts = parse_fim_prompt(f"{repo}<|fim_prefix|>{BEFORE}<|fim_suffix|>{AFTER}<|fim_middle|>")
    assert parts.preamble == repo
    ids = fim_prompt_ids(qwen, parts.prefix, parts.suffix, preamble=parts.preamble)
    assert ids[0] == qwen.convert_tokens_to_ids("<|repo_name|>") and ids.index(p) == len(plain(qwen, repo))


@pytest.mark.parametrize("text", [
    "def add(a, b):\n    return a + b\n",  # plain completion
    "<fim_prefix>x = 1<fim_suffix>y = 2",  # no middle sentinel
    "<fim_prefix>x = 1<fim_middle>",  # no suffix sentinel
    "<fim_prefix><fim_suffix>y = 2",  # SPM without the middle sentinel
    "<|fim_prefix|>x<|fim_suffix|>y<|fim_middle|> trailing text",  # qwen is PSM: the middle ends the prompt
])
def test_other_prompts_are_not_taken_for_fim(text):
    assert parse_fim_prompt(text) is None
