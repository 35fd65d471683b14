"""The layout rules hold file by file: imports point inward, nothing refers outside the repository,
and docs/architecture.md names every module that exists (and only those)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("greencode", "workflows", "serve_app")
FORBIDDEN = {  # package -> top-level modules it must never import (at any depth of the file)
    "greencode": {"ray", "workflows", "serve_app"},
    "serve_app": {"workflows"},
}
# a relative path that climbs out of its directory: ../x, a/../../x (not inside "runs/.../lite")
CLIMBING = re.compile(r"(?<![\w.~/-])(?:\.?/|[\w-]+/)*\.\./[\w./-]*")
# top-level dirs where a clone may legitimately live next to system paths that docs mention
SYSTEM_ROOTS = {"home", "usr", "opt", "mnt", "tmp", "etc", "var", "srv", "root", "data", "sys", "proc", "dev"}


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_inward(package):
    bad = {f"{p.relative_to(ROOT)} imports {sorted(imported_top_levels(p) & FORBIDDEN[package])}"
           for p in modules(package) if imported_top_levels(p) & FORBIDDEN[package]}
    assert not bad, "; ".join(sorted(bad))


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        paths = [ROOT / n for n in names.splitlines()]
    except (OSError, subprocess.CalledProcessError):  # an exported tree without git: every file but build output
        skip = {".git", ".venv", "runs", "reports", "__pycache__", ".pytest_cache"}
        paths = [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    out = []
    for p in paths:
        try:
            p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        out.append(p)
    return out


def outside_references(text: str, directory: Path) -> list[str]:
    """Paths in ``text`` (a file in ``directory``) that lead out of the repository."""
    found = []
    for match in CLIMBING.finditer(text):
        target = (directory / match.group(0)).resolve()
        if not target.is_relative_to(ROOT):
            found.append(match.group(0))
    top = ROOT.parts[1] if len(ROOT.parts) > 1 else ""
    if top and top not in SYSTEM_ROOTS:  # a checkout in a workspace dir: no file may point into that workspace
        found += re.findall(rf"(?<![\w.~-])/{re.escape(top)}/[\w./-]+", text)
    return found


def test_no_tracked_file_refers_outside_the_repository():
    files = tracked_text_files()
    assert len(files) > 50  # the check really looked at the repository
    bad = {f"{p.relative_to(ROOT)}: {ref}" for p in files
           for ref in outside_references(p.read_text(encoding="utf-8"), p.parent)}
    assert not bad, "references outside the repository: " + "; ".join(sorted(bad))


def test_the_outside_reference_check_catches_what_it_should():
    up = ".." + "/"  # spelled apart so this file does not trip the check it tests
    outside = f"{up}{up}shared/METHOD.md"
    text = f"see [the method]({outside}), runs/.../lite, {up}README.md and a/{up}b.md\n"
    assert outside_references(text, ROOT / "docs") == [outside]
    assert outside_references(f"[up]({up}x.md)", ROOT) == [f"{up}x.md"]


def test_architecture_doc_names_every_module_and_only_real_ones():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"\b((?:greencode|workflows|serve_app)/[\w/]+\.py)\b", doc))
    real = {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in modules(pkg) if p.name != "__init__.py"}
    assert not named - real, f"docs/architecture.md names modules that do not exist: {sorted(named - real)}"
    assert not real - named, f"docs/architecture.md does not mention: {sorted(real - named)}"
