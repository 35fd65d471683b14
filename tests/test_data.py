"""Corpora from every source (on fixtures made here), splits, and sample construction."""

from __future__ import annotations

import json
import zipfile

import pytest

from greencode.blocks import token_blocks
from greencode.config import DataConfig
from greencode.data import (
    Corpus,
    CorpusError,
    SourceFile,
    detokenize,
    glob_regex,
    line_completion_samples,
    load_corpus,
    random_cut_samples,
)
from greencode.tokens import encode

PY_SOURCE = '''import os


def join_all(parts):
    """Join path parts, skipping empty ones."""
    result = ""
    for part in parts:
        if part:
            result = os.path.join(result, part)
    return result


class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value
'''

JAVA_SOURCE = '''package demo;

import java.util.ArrayList;
import java.util.List;

public class Stack<T> {
    private final List<T> items = new ArrayList<>();

    public void push(T item) {
        items.add(item);
    }

    public T pop() {
        if (items.isEmpty()) {
            throw new IllegalStateException("empty stack");
        }
        return items.remove(items.size() - 1);
    }
}
'''


@pytest.fixture
def source_dir(tmp_path):
    root = tmp_path / "src"
    (root / "pkg" / "sub").mkdir(parents=True)
    for i in range(6):
        (root / "pkg" / f"mod{i}.py").write_text(PY_SOURCE.replace("Counter", f"Counter{i}"))
    (root / "pkg" / "sub" / "Stack.java").write_text(JAVA_SOURCE)
    (root / "pkg" / "binary.py").write_bytes(b"\x00\x01\x02 not text" * 20)
    (root / "pkg" / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1") * 20)
    (root / "pkg" / "tiny.py").write_text("x = 1\n")
    (root / "README.md").write_text("not code " * 50)
    return root


def java_zip(tmp_path, count=4):
    path = tmp_path / "src.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(count):
            zf.writestr(f"java.base/java/util/Stack{i}.java", JAVA_SOURCE.replace("Stack", f"Stack{i}"))
        zf.writestr("java.base/java/util/", "")  # a directory entry
        zf.writestr("java.base/java/util/broken.java", b"\xff\xfe\x00\x00")
        zf.writestr("java.base/META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n" * 10)
    return path


def test_dir_corpus_reads_code_and_counts_skipped(source_dir):
    corpus = load_corpus(DataConfig(corpus=f"dir:{source_dir}"))
    paths = {f.path for f in corpus.files}
    assert paths == {f"dir:pkg/mod{i}.py" for i in range(6)} | {"dir:pkg/sub/Stack.java"}
    assert corpus.skipped == 3  # binary, latin-1, tiny
    langs = {f.path: f.lang for f in corpus.files}
    assert langs["dir:pkg/sub/Stack.java"] == "java" and langs["dir:pkg/mod0.py"] == "python"


def test_dir_corpus_glob_and_lang(source_dir):
    java = load_corpus(DataConfig(corpus=f"dir:{source_dir}", lang="java"))
    assert [f.path for f in java.files] == ["dir:pkg/sub/Stack.java"]
    top = load_corpus(DataConfig(corpus=f"dir:{source_dir}", glob="pkg/*.py"))
    assert len(top.files) == 6 and all(f.lang == "python" for f in top.files)


def test_glob_regex_matches_like_a_path_glob():
    assert glob_regex("**/*.py").match("a.py")
    assert glob_regex("**/*.py").match("x/y/a.py")
    assert not glob_regex("*.py").match("x/a.py")
    assert not glob_regex("**/*.py").match("a.pyc")


def test_zip_corpus_java(tmp_path):
    corpus = load_corpus(DataConfig(corpus=f"zip:{java_zip(tmp_path)}", lang="java"))
    assert [f.path for f in corpus.files] == [f"zip:java.base/java/util/Stack{i}.java" for i in range(4)]
    assert all(f.lang == "java" and "public class" in f.text for f in corpus.files)
    assert corpus.skipped == 1  # the undecodable file; the manifest does not match the glob


def test_max_files_is_a_seeded_sample(tmp_path):
    path = java_zip(tmp_path, count=10)
    def pick(seed):
        return [f.path for f in load_corpus(DataConfig(corpus=f"zip:{path}", max_files=3, seed=seed)).files]

    assert len(pick(0)) == 3 and pick(0) == pick(0)
    assert len({tuple(pick(s)) for s in range(5)}) > 1


def test_stdlib_corpus_is_python_and_fast():
    corpus = load_corpus(DataConfig(corpus="stdlib", max_files=50))
    assert len(corpus.files) == 50
    assert all(f.path.startswith("stdlib:") and f.path.endswith(".py") and f.lang == "python" for f in corpus.files)
    assert not any("site-packages" in f.path for f in corpus.files)


def test_splits_are_disjoint_complete_and_stable():
    files = [SourceFile(f"f{i}.py", "x = 1\n" * 20, "python") for i in range(200)]
    corpus = Corpus(files, 0, seed=3, val_fraction=0.1, test_fraction=0.05)
    parts = {name: {f.path for f in corpus.split(name)} for name in ("train", "validation", "test")}
    assert (len(parts["train"]), len(parts["validation"]), len(parts["test"])) == (170, 20, 10)
    assert parts["train"] | parts["validation"] | parts["test"] == {f.path for f in files}
    assert not parts["train"] & parts["test"] and not parts["validation"] & parts["test"]
    # a file keeps its split when the corpus shrinks (hash of the path, not its position)
    smaller = Corpus(files[:100], 0, seed=3, val_fraction=0.1, test_fraction=0.05)
    again = Corpus(files, 0, seed=3, val_fraction=0.1, test_fraction=0.05)
    assert {f.path for f in again.split("test")} == parts["test"]
    assert {f.path for f in smaller.split("train")} <= parts["train"] | parts["validation"] | parts["test"]
    other = Corpus(files, 0, seed=4, val_fraction=0.1, test_fraction=0.05)
    assert {f.path for f in other.split("test")} != parts["test"]
    with pytest.raises(ValueError, match="unknown split"):
        corpus.split("dev")


CODEXGLUE_JAVA = ["<s>", "package", "demo", ";", "public", "class", "A", "{", "String", "s", "=", '"<STR_LIT:hi>"', ";",
                  "int", "n", "=", "<NUM_LIT>", ";", "char", "c", "=", "'<CHAR_LIT>'", ";",
                  "void", "f", "(", ")", "{", "g", "(", "s", ",", "n", ")", ";", "}", "}", "</s>"]


def test_detokenize_codexglue():
    assert detokenize(CODEXGLUE_JAVA) == (
        'package demo; public class A { String s = "hi"; int n = 0; char c = \'c\'; void f() { g(s, n); } }\n'
    )
    py = ("<s> import os <EOL> def f ( x ) : <EOL> return os . path . join ( x , '<STR_LIT:aU+0020bU+002Cc>' , "
          "<NUM_LIT:2> ) </s>")
    assert detokenize(py.split()) == "import os\ndef f(x):\nreturn os.path.join(x, 'a b,c', 2)\n"
    # placeholders without quotes (other exports) still become literals
    assert detokenize(["x", "=", "<STR_LIT:v>", "+", "<STR_LIT>", "+", "<CHAR_LIT:z>"]) == "x = \"v\" + \"\" + 'z'\n"


def test_codexglue_corpus_java_and_python(tmp_path):
    java = tmp_path / "javaCorpus_test.jsonl"
    rows = [{"id": i, "code": CODEXGLUE_JAVA * 3} for i in range(3)]
    java.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    corpus = load_corpus(DataConfig(corpus=f"codexglue:{java}"))
    assert len(corpus.files) == 3 and corpus.skipped == 1
    assert all(f.lang == "java" and "public class A" in f.text and "<" not in f.text for f in corpus.files)

    py = tmp_path / "py150.txt"
    line = ('<s> import os <EOL> def main ( argv ) : <EOL> print ( "<STR_LIT:helloU+0020world>" , argv ) <EOL> '
            'main ( [ ] ) </s>')
    py.write_text(json.dumps({"id": 0, "path": "repo/main.py", "code": line}) + "\n" + line + "\n")
    files = load_corpus(DataConfig(corpus=f"codexglue:{py}", min_file_tokens=8)).files
    assert [f.lang for f in files] == ["python", "python"]
    assert files[0].path == "codexglue:repo/main.py#0"
    assert 'print("hello world", argv)' in files[0].text


def test_bad_corpus_specs_name_the_problem(tmp_path):
    with pytest.raises(CorpusError, match="not understood"):
        load_corpus(DataConfig(corpus="ftp:somewhere"))
    with pytest.raises(CorpusError, match="no such directory"):
        load_corpus(DataConfig(corpus=f"dir:{tmp_path}/missing"))
    (tmp_path / "fake.zip").write_text("zip? no")
    with pytest.raises(CorpusError, match="not a zip archive"):
        load_corpus(DataConfig(corpus=f"zip:{tmp_path}/fake.zip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no readable"):
        load_corpus(DataConfig(corpus=f"dir:{tmp_path}/empty"))
    unknown = tmp_path / "tokens.txt"
    unknown.write_text("<s> a b c </s>\n")
    with pytest.raises(CorpusError, match="--lang"):
        load_corpus(DataConfig(corpus=f"codexglue:{unknown}"))
    with pytest.raises(CorpusError, match="stdlib"):
        load_corpus(DataConfig(corpus="stdlib", lang="java"))


def test_hf_corpus_fails_clearly_offline_or_without_datasets(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CorpusError, match="datasets|cannot load"):
        load_corpus(DataConfig(corpus="hf:code_x_glue_cc_code_completion_token:java"))


def files_for_samples():
    return [SourceFile(f"f{i}.py", PY_SOURCE * (i + 2), "python") for i in range(8)]


def test_line_completion_samples_follow_method(tokenizer):
    files = files_for_samples()
    samples = line_completion_samples(files, tokenizer, 5, context_fraction=0.3, target_tokens=15)
    assert len(samples) == 5 and len({s.path for s in samples}) == 5
    for s in samples:
        ids = encode(tokenizer, next(f.text for f in files if f.path == s.path))
        cut = int(len(ids) * 0.3)
        assert s.context_ids == ids[:cut] and s.target_ids == ids[cut : cut + 15]
        assert s.target_text == tokenizer.decode(s.target_ids) and s.lang == "python"
    again = line_completion_samples(files, tokenizer, 5, context_fraction=0.3)
    assert [s.sample_id for s in again] == [s.sample_id for s in samples]


def test_line_completion_caps_context_and_skips_short_files(tokenizer):
    long_file = SourceFile("long.py", PY_SOURCE * 40, "python")
    short_file = SourceFile("short.py", "x = 1\n", "python")
    samples = line_completion_samples([long_file, short_file], tokenizer, 5, context_cap=32)
    assert [s.path for s in samples] == ["long.py"]
    ids = encode(tokenizer, long_file.text)
    cut = int(len(ids) * 0.2)
    assert samples[0].context_ids == ids[cut - 32 : cut]


def test_random_cut_samples_within_range(tokenizer):
    files = files_for_samples()
    samples = random_cut_samples(files, tokenizer, 30, min_fraction=0.2, max_fraction=0.6, seed=1)
    assert len(samples) == 30
    for s in samples:
        ids = encode(tokenizer, next(f.text for f in files if f.path == s.path))
        cut = len(s.context_ids)
        assert 0.2 * len(ids) - 1 <= cut <= 0.6 * len(ids)
        assert s.target_ids == ids[cut : cut + 64]
    assert [s.sample_id for s in random_cut_samples(files, tokenizer, 30, seed=1)] == [s.sample_id for s in samples]
    with pytest.raises(ValueError, match="no file"):
        random_cut_samples([SourceFile("s.py", "x = 1\n", "python")], tokenizer, 1)


def test_token_blocks_pack_and_truncate(tokenizer):
    files = files_for_samples()[:3]
    stream = [t for f in files for t in encode(tokenizer, f.text) + [tokenizer.eos_token_id]]
    blocks = list(token_blocks(files, tokenizer, 64))
    assert all(len(b) == 64 for b in blocks) and len(blocks) == len(stream) // 64
    assert [t for b in blocks for t in b] == stream[: len(blocks) * 64]
    single = list(token_blocks(files, tokenizer, 64, pack=False))
    assert len(single) == 3 and all(len(b) == 64 for b in single)
    assert single[0] == encode(tokenizer, files[0].text)[:64]
