"""Content digests: what a model, a policy file or a shard dir *is*, independent of its path or name.

The pipeline's stage identities, the evaluation's part keys and the report's provenance use these,
so a file replaced under the same name (a retrained policy, a model fine-tuned again, a different
``model.gguf``) is never taken for the old one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(path: str | Path) -> str:
    """``sha256:<hex>`` over a file, or over every file under a dir (relative names, sizes, contents).

    Names starting with '.' (temp files, locks, work markers) are left out; the result is the same on
    every machine.
    """
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [(path.name, path)]
    else:
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for name, f in files:
        h.update(name.encode() + b"\0" + f.stat().st_size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return f"sha256:{h.hexdigest()}"


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of one file's bytes (name left out: the GGUF conversion cache keys on it)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"
