"""Code corpora -> files and completion samples (METHOD §3 and §6).

A corpus is a list of :class:`SourceFile` read from one source spec:

- ``stdlib``            the running Python's standard library ``.py`` files (~1.7k)
- ``dir:PATH``          files under a directory (``DataConfig.glob``, default by language)
- ``zip:PATH``          files inside a zip archive, e.g. the JDK's ``lib/src.zip``
- ``codexglue:FILE``    CodeXGLUE token-completion data (JSON lines or token lines),
                        detokenised back into readable code
- ``hf:NAME[:CONFIG]``  a Hugging Face dataset with CodeXGLUE-style rows (needs ``datasets``)

Files that cannot be read as text (binary, bad encoding, tiny) are skipped and counted,
never fatal. Loading never tokenizes, so building a corpus of thousands of files is fast;
the sample builders tokenize lazily, only as many files as they need.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import sysconfig
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from greencode.config import DataConfig
from greencode.tokens import encode

log = logging.getLogger(__name__)

EXTENSIONS = {".py": "python", ".java": "java"}
DEFAULT_GLOBS = {"python": "**/*.py", "java": "**/*.java", None: "**/*.*"}
SPLITS = ("train", "validation", "test")
# stdlib directories that hold installed third-party packages or deliberately broken fixture files;
# the test suites themselves are kept (real code, and they make the held-out splits big enough)
STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "data", "badsyntax"}


class CorpusError(ValueError):
    """A corpus spec cannot be loaded; the message says which part is wrong and how to fix it."""


@dataclass(frozen=True)
class SourceFile:
    path: str  # stable id, e.g. "stdlib:json/decoder.py" or "zip:java.base/java/util/List.java"
    text: str
    lang: str  # "python" | "java"


@dataclass
class Corpus:
    files: list[SourceFile]
    skipped: int  # unreadable / binary / too-small files left out
    seed: int = 0
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    _order: list[int] | None = field(default=None, init=False, repr=False)

    def split(self, name: str) -> list[SourceFile]:
        """Deterministic file-level split: files are ranked by a seeded hash of their path,
        the first ``test_fraction`` go to test, the next ``val_fraction`` to validation.

        Hashing the path (not the list position) keeps a file in the same split when
        other files are added or removed. A non-zero fraction gets at least one file
        when the corpus has three or more.
        """
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        if self._order is None:
            self._order = sorted(range(len(self.files)), key=lambda i: _hash_key(self.seed, self.files[i].path))
        n = len(self.files)
        n_test, n_val = _split_size(n, self.test_fraction), _split_size(n, self.val_fraction)
        bounds = {"test": (0, n_test), "validation": (n_test, n_test + n_val), "train": (n_test + n_val, n)}
        lo, hi = bounds[name]
        return [self.files[i] for i in sorted(self._order[lo:hi])]


def _hash_key(seed: int, path: str) -> str:
    return hashlib.sha1(f"{seed}:{path}".encode()).hexdigest()


def _split_size(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 3:
        return 0
    return max(1, round(n * fraction))


# --------------------------------------------------------------------------- loading


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the files of ``cfg.corpus`` (capped at ``cfg.max_files``, sampled by ``cfg.seed``)."""
    spec = cfg.corpus.strip()
    kind, _, arg = spec.partition(":")
    if kind == "stdlib" and not arg:
        candidates = _stdlib_candidates(cfg)
    elif kind == "dir" and arg:
        candidates = _dir_candidates(Path(arg).expanduser(), cfg)
    elif kind == "zip" and arg:
        candidates = _zip_candidates(Path(arg).expanduser(), cfg)
    elif kind == "codexglue" and arg:
        return _finish(_codexglue_files(Path(arg).expanduser(), cfg), cfg)
    elif kind == "hf" and arg:
        return _finish(_hf_files(arg, cfg), cfg)
    else:
        raise CorpusError(
            f"data.corpus {spec!r} is not understood; use one of: stdlib | dir:PATH | zip:PATH | "
            "codexglue:FILE | hf:NAME[:CONFIG]"
        )
    files, skipped = _read_candidates(candidates, cfg)
    if not files:
        raise CorpusError(f"data.corpus {spec!r} holds no readable {cfg.lang or 'python/java'} files "
                          f"(glob {cfg.glob or DEFAULT_GLOBS[cfg.lang]!r}, {skipped} skipped)")
    log.info("corpus %s: %d files (%d skipped)", spec, len(files), skipped)
    return Corpus(files, skipped, cfg.seed, cfg.val_fraction, cfg.test_fraction)


# a candidate is (stable id, language, reader of its raw bytes); reading happens only for kept ones
Candidate = tuple[str, str, Callable[[], bytes]]


def _read_candidates(candidates: list[Candidate], cfg: DataConfig) -> tuple[list[SourceFile], int]:
    """Decode candidates in a seeded order until ``max_files`` are kept (all of them without a cap)."""
    candidates = sorted(candidates, key=lambda c: c[0])
    if cfg.max_files is not None:
        random.Random(cfg.seed).shuffle(candidates)
    files: list[SourceFile] = []
    skipped = 0
    for path, lang, read in candidates:
        if cfg.max_files is not None and len(files) >= cfg.max_files:
            break
        text = _decode(read, path, cfg.min_file_tokens)
        if text is None:
            skipped += 1
        else:
            files.append(SourceFile(path, text, lang))
    files.sort(key=lambda f: f.path)
    return files, skipped


def _decode(read: Callable[[], bytes], path: str, min_chars: int) -> str | None:
    """Text of a file, or None when it is unreadable, binary, not UTF-8 or too small to sample from."""
    try:
        raw = read()
    except (OSError, zipfile.BadZipFile, RuntimeError) as err:
        log.debug("skipping %s: %s", path, err)
        return None
    if b"\0" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # a file with fewer characters than min_file_tokens cannot hold that many tokens
    return text if len(text.strip()) >= min_chars else None


def _lang_for(name: str, cfg: DataConfig) -> str | None:
    return cfg.lang or EXTENSIONS.get(PurePosixPath(name).suffix.lower())


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Regex for a path glob on '/'-separated relative paths: ``**/`` spans any number of dirs,
    ``*`` and ``?`` stay inside one path part (same meaning for directories and zip archives)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _matching(names: Iterable[str], cfg: DataConfig, prefix: str,
              reader: Callable[[str], Callable[[], bytes]]) -> list[Candidate]:
    pattern = glob_regex(cfg.glob or DEFAULT_GLOBS[cfg.lang])
    out = []
    for name in names:
        lang = _lang_for(name, cfg)
        if lang is not None and pattern.match(name):
            out.append((f"{prefix}:{name}", lang, reader(name)))
    return out


def _stdlib_candidates(cfg: DataConfig) -> list[Candidate]:
    if cfg.lang not in (None, "python"):
        raise CorpusError(f"data.corpus 'stdlib' is Python source; data.lang {cfg.lang!r} does not fit")
    root = Path(sysconfig.get_paths()["stdlib"])
    names = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if not STDLIB_EXCLUDED_DIRS.intersection(rel.parts[:-1]):
            names.append(rel.as_posix())
    return _matching(names, cfg.model_copy(update={"lang": "python"}), "stdlib",
                     lambda name: (root / name).read_bytes)


def _dir_candidates(root: Path, cfg: DataConfig) -> list[Candidate]:
    if not root.is_dir():
        raise CorpusError(f"data.corpus dir:{root}: no such directory")
    names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return _matching(names, cfg, "dir", lambda name: (root / name).read_bytes)


def _zip_candidates(path: Path, cfg: DataConfig) -> list[Candidate]:
    if not path.is_file():
        raise CorpusError(f"data.corpus zip:{path}: no such file")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise CorpusError(f"data.corpus zip:{path} is not a zip archive") from None
    names = [info.filename for info in archive.infolist() if not info.is_dir()]
    return _matching(names, cfg, "zip", lambda name: lambda: archive.read(name))


# --------------------------------------------------------------------------- CodeXGLUE


# CodeXGLUE keeps a literal's quotes around its placeholder ("<STR_LIT:x>", '<CHAR_LIT>') and
# writes spaces and commas inside kept values as U+0020 / U+002C, so tokens never hold spaces
PLACEHOLDER = re.compile(r"<(STR|NUM|CHAR)_LIT(?::(.*))?>", re.S)
PLACEHOLDER_DEFAULTS = {"STR": "", "NUM": "0", "CHAR": "c"}
BARE_QUOTES = {"STR": '"', "NUM": "", "CHAR": "'"}
_NO_SPACE_BEFORE = {")", "]", ",", ".", ":", ";", "++", "--"}
_NO_SPACE_AFTER = {"(", "[", ".", "@", "~"}
_KEYWORDS_BEFORE_PAREN = {"if", "for", "while", "switch", "catch", "return", "and", "or", "not", "in", "elif",
                          "assert", "yield", "synchronized", "try", "with", "lambda", "else", "is", "await"}


def _space_between(prev: str, tok: str) -> bool:
    if tok in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER:
        return False
    if tok in ("(", "["):  # a call or index sticks to its callee: f(x), a[i], g()(y)
        callee = (prev[-1:].isalnum() or prev[-1:] == "_") and prev not in _KEYWORDS_BEFORE_PAREN
        return not (prev in (")", "]") or callee)
    return True


def _literal(token: str) -> str:
    """Source text of a token, with any literal placeholder replaced by its value (or a stand-in)."""
    match = PLACEHOLDER.search(token)
    if match is None:
        return token
    kind, value = match.group(1), match.group(2)
    value = PLACEHOLDER_DEFAULTS[kind] if value is None else value.replace("U+0020", " ").replace("U+002C", ",")
    if match.group(0) == token:  # no quotes kept around it
        value = f"{BARE_QUOTES[kind]}{value}{BARE_QUOTES[kind]}"
    return token[: match.start()] + value + token[match.end() :]


def detokenize(tokens: Sequence[str]) -> str:
    """Readable code from CodeXGLUE tokens: drop ``<s>``/``</s>``, ``<EOL>`` -> newline, literal
    placeholders -> their kept value (``"<STR_LIT:x>"`` -> ``"x"``) or a stand-in (``""``, ``0``,
    ``'c'``), tokens joined with code-like spacing. Indentation is not in the data (PY150 drops
    it) and is not invented."""
    lines: list[list[str]] = [[]]
    for tok in tokens:
        if tok in ("<s>", "</s>", "<pad>"):
            continue
        if tok == "<EOL>":
            lines.append([])
            continue
        lines[-1].append(_literal(tok))
    out = []
    for line in lines:
        text = ""
        for i, tok in enumerate(line):
            if i and _space_between(line[i - 1], tok):
                text += " "
            text += tok
        out.append(text)
    return "\n".join(out).strip("\n") + "\n"


def _guess_lang(hint: str, record: dict[str, Any], cfg: DataConfig) -> str:
    if cfg.lang:
        return cfg.lang
    if "path" in record and str(record["path"]).endswith(".py"):
        return "python"
    low = hint.lower()
    for key, lang in (("java", "java"), ("py", "python")):
        if key in low:
            return lang
    raise CorpusError(f"cannot tell the language of {hint!r}: pass data.lang (--lang python|java)")


def codexglue_record(record: dict[str, Any] | str, index: int, hint: str, cfg: DataConfig) -> SourceFile:
    """One CodeXGLUE row (``{"id", "code": [tokens] | "tokens ..."}``, ``{"id", "path", "code"}``,
    or a bare line of space-separated tokens) as a readable :class:`SourceFile`."""
    if isinstance(record, str):
        record = {"code": record}
    code = record.get("code")
    if code is None:
        raise ValueError("row has no 'code' field")
    tokens = code.split() if isinstance(code, str) else [str(t) for t in code]
    lang = _guess_lang(hint, record, cfg)
    ident = record.get("path") or record.get("id", index)
    return SourceFile(f"codexglue:{ident}#{index}", detokenize(tokens), lang)


def _codexglue_files(path: Path, cfg: DataConfig) -> tuple[list[SourceFile], int]:
    if not path.is_file():
        raise CorpusError(f"data.corpus codexglue:{path}: no such file")
    files, skipped = [], 0
    with path.open("rb") as fh:
        for index, raw in enumerate(fh):
            try:
                line = raw.decode("utf-8").strip()
                if not line:
                    continue
                record = json.loads(line) if line.startswith("{") else line
                files.append(codexglue_record(record, index, path.name, cfg))
            except CorpusError:
                raise
            except (ValueError, TypeError) as err:
                log.debug("skipping line %d of %s: %s", index + 1, path, err)
                skipped += 1
    return files, skipped


def _hf_files(name: str, cfg: DataConfig) -> tuple[list[SourceFile], int]:
    """Rows of a Hugging Face dataset such as ``code_x_glue_cc_code_completion_token:java``."""
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"data.corpus hf:{name} needs the 'datasets' package: pip install datasets "
                          "(or download the CodeXGLUE files and use codexglue:FILE)") from None
    dataset, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(dataset, config or None, split="train")
    except Exception as err:  # offline, unknown name, missing config: all surface as one clear error
        raise CorpusError(f"cannot load Hugging Face dataset {name!r} ({type(err).__name__}: {err}); "
                          "offline runs need HF_DATASETS_OFFLINE=0 once, or use codexglue:FILE") from None
    files, skipped = [], 0
    for index, row in enumerate(rows):
        try:
            files.append(codexglue_record(dict(row), index, name, cfg))
        except (ValueError, TypeError):
            skipped += 1
    return files, skipped


def _finish(loaded: tuple[list[SourceFile], int], cfg: DataConfig) -> Corpus:
    files, skipped = loaded
    small = [f for f in files if len(f.text.strip()) < cfg.min_file_tokens]
    files = [f for f in files if len(f.text.strip()) >= cfg.min_file_tokens]
    skipped += len(small)
    if cfg.max_files is not None and len(files) > cfg.max_files:
        files = sorted(random.Random(cfg.seed).sample(files, cfg.max_files), key=lambda f: f.path)
    if not files:
        raise CorpusError(f"data.corpus {cfg.corpus!r} holds no usable rows ({skipped} skipped)")
    log.info("corpus %s: %d files (%d skipped)", cfg.corpus, len(files), skipped)
    return Corpus(files, skipped, cfg.seed, cfg.val_fraction, cfg.test_fraction)


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class CompletionSample:
    sample_id: str
    path: str
    lang: str
    context_ids: list[int]
    target_ids: list[int]
    context_text: str
    target_text: str
    suffix_text: str = ""  # fill-in-the-middle samples: the file after the target (the model sees it too)


def _sample(tokenizer: Any, sample_id: str, src: SourceFile, ids: list[int], cut: int, context_cap: int,
            target_tokens: int, suffix_tokens: int = 0) -> CompletionSample:
    context, target = ids[:cut][-context_cap:], ids[cut : cut + target_tokens]
    suffix = ids[cut + target_tokens : cut + target_tokens + suffix_tokens]
    return CompletionSample(sample_id, src.path, src.lang, context, target,
                            tokenizer.decode(context), tokenizer.decode(target),
                            tokenizer.decode(suffix) if suffix else "")


def line_completion_samples(files: Sequence[SourceFile], tokenizer: Any, num_samples: int, *,
                            context_fraction: float = 0.2, context_cap: int = 512, target_tokens: int = 15,
                            min_file_tokens: int = 64, seed: int = 0,
                            suffix_tokens: int = 0) -> list[CompletionSample]:
    """METHOD §6: one sample per file (files in a seeded order): context = the first
    ``context_fraction`` of its tokens (the last ``context_cap`` of them), target = the
    next ``target_tokens``. Files shorter than ``min_file_tokens`` are passed over.
    ``suffix_tokens`` > 0 makes fill-in-the-middle samples: the target is then a span cut from
    the file, and up to that many tokens after it are the sample's ``suffix_text``."""
    if not 0 < context_fraction < 1:
        raise ValueError(f"context_fraction must be in (0, 1), got {context_fraction}")
    order = sorted(files, key=lambda f: _hash_key(seed, f.path))
    samples = []
    for src in order:
        if len(samples) >= num_samples:
            break
        ids = encode(tokenizer, src.text)
        if len(ids) < max(min_file_tokens, 2):
            continue
        cut = max(1, min(int(len(ids) * context_fraction), len(ids) - 1))
        samples.append(_sample(tokenizer, f"{src.path}@{context_fraction}", src, ids, cut, context_cap, target_tokens,
                               suffix_tokens))
    if len(samples) < num_samples:
        log.warning("only %d of %d requested samples: too few files with >= %d tokens",
                    len(samples), num_samples, min_file_tokens)
    return samples


RANDOM_CUT_TARGET = 64


def random_cut_samples(files: Sequence[SourceFile], tokenizer: Any, num_samples: int, *,
                       min_fraction: float = 0.2, max_fraction: float = 0.6, context_cap: int = 512,
                       min_file_tokens: int = 64, seed: int = 0) -> list[CompletionSample]:
    """METHOD §3 episodes: a file drawn uniformly (with replacement), a cut uniform in
    ``[min_fraction, max_fraction]`` of its tokens; ``target_ids`` = up to 64 dataset
    tokens after the cut. Files are tokenized once, on first draw."""
    if not 0 < min_fraction <= max_fraction < 1:
        raise ValueError(f"need 0 < min_fraction <= max_fraction < 1, got {min_fraction}, {max_fraction}")
    if not files:
        raise ValueError("random_cut_samples needs at least one file")
    rng = random.Random(seed)
    pool = sorted(files, key=lambda f: f.path)
    tokens: dict[str, list[int] | None] = {}
    samples: list[CompletionSample] = []
    while len(samples) < num_samples:
        if len(tokens) == len(pool) and all(v is None for v in tokens.values()):
            raise ValueError(f"no file has >= {min_file_tokens} tokens")
        src = pool[rng.randrange(len(pool))]
        if src.path not in tokens:
            ids = encode(tokenizer, src.text)
            tokens[src.path] = ids if len(ids) >= max(min_file_tokens, 2) else None
        ids = tokens[src.path]
        if ids is None:
            continue
        cut = max(1, min(int(len(ids) * rng.uniform(min_fraction, max_fraction)), len(ids) - 1))
        samples.append(_sample(tokenizer, f"{len(samples)}:{src.path}@{cut}", src, ids, cut, context_cap,
                               RANDOM_CUT_TARGET))
    return samples
