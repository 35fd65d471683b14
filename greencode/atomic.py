"""Atomic artifact writes: a temp path beside the target, renamed over it only when complete.

Every stage's artifacts go through here so a killed run never leaves half a file (or half
a model dir) that a later stage would trust.

A file is replaced by one ``rename``. A directory cannot be renamed over a non-empty one, so
it is swapped in three renames, each of which leaves a complete artifact on disk:

1. ``dest`` -> ``.dest.old``   (the old artifact, still complete, under a name that says so)
2. ``tmp``  -> ``dest``        (the new one is live)
3. ``.dest.old`` -> ``.dest.trash-*``, then deleted (never deleted under a name that could be trusted)

A kill between 1 and 2 leaves only ``.dest.old``: :func:`recover` (run before every swap, and by
the pipeline before it looks at a stage's outputs) renames it back. A kill after 2 leaves both: the
old one is deleted. Temp files and dirs carry their writer's host and pid
(``.dest.tmp-<host>-<pid>-*``), so those of writers that died are found and removed. Swaps of one
``dest`` are serialised by a lock file ``.dest.lock`` beside it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from greencode.locks import FileLock, pid_alive

log = logging.getLogger(__name__)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())


def _temp_prefix(dest: Path) -> str:
    return f".{dest.name}.tmp-{_host()}-{os.getpid()}-"


_TEMP = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[^/]*$")


def _dead_writers_temp(path: Path) -> bool:
    """Whether ``path`` is a temp file/dir of a writer on this host that is no longer running."""
    m = _TEMP.match(path.name)
    return bool(m) and m["host"] == _host() and not pid_alive(int(m["pid"]))


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _side(dest: Path, kind: str) -> Path:
    return dest.parent / f".{dest.name}.{kind}"


def _fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (a no-op where the OS cannot open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _discard(path: Path, dest: Path) -> None:
    """Delete ``path`` (``dest`` or a side dir of it) after renaming it to a trash name of ``dest``,
    so a kill mid-delete never leaves part of it under a name that is trusted or restored."""
    trash = _side(dest, f"trash-{uuid.uuid4().hex[:8]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _recover(dest: Path) -> None:
    """The part of :func:`recover` beside ``dest``; the caller holds the swap lock."""
    old = _side(dest, "old")
    if old.exists():
        if dest.exists():
            log.info("%s: removing the previous version left by an interrupted swap", dest)
            _discard(old, dest)
        else:
            log.warning("%s: restoring the previous version (a swap was interrupted before the new one was in)", dest)
            os.rename(old, dest)
        _fsync_dir(dest.parent)
    for leftover in dest.parent.glob(f".{glob.escape(dest.name)}.*"):
        if leftover.name.startswith(f".{dest.name}.trash-") or _dead_writers_temp(leftover):
            log.info("%s: removing %s, left by a writer that died", dest, leftover.name)
            _delete(leftover)


def recover(path: str | Path) -> Path:
    """Finish or undo an interrupted swap of ``path``, and remove temp files and dirs that writers
    which died left beside it or (for a directory) anywhere inside it."""
    path = Path(path)
    if path.parent.is_dir() and any(p.name != _side(path, "lock").name
                                    for p in path.parent.glob(f".{glob.escape(path.name)}.*")):
        with FileLock(_side(path, "lock")):
            _recover(path)
    if path.is_dir():
        for leftover in sorted(path.rglob(".*.tmp-*")):
            if leftover.exists() and _dead_writers_temp(leftover):
                log.info("%s: removing %s, left by a writer that died", path, leftover.relative_to(path))
                _delete(leftover)
    return path


def _swap_in(tmp: Path, dest: Path) -> None:
    with FileLock(_side(dest, "lock")):
        _recover(dest)
        old = _side(dest, "old")
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
        if old.exists():
            _discard(old, dest)


@contextmanager
def atomic_path(dest: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temp file (or dir) in ``dest``'s folder; it becomes ``dest`` if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        recover(dest)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=_temp_prefix(dest)))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; artifacts are shared data
    else:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=_temp_prefix(dest), suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield tmp
        if directory:
            _swap_in(tmp, dest)
        else:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def remove_path(path: str | Path) -> None:
    """Delete an artifact (file or dir) and any interrupted swap's old version of it, so that no
    kill leaves part of it under its own name and :func:`recover` cannot bring an old one back."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    with FileLock(_side(path, "lock")):
        old = _side(path, "old")
        if old.exists():
            _discard(old, path)
        if path.is_dir():
            _discard(path, path)
        elif path.exists():
            path.unlink()
        _recover(path)


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | Path, payload: Any) -> Path:
    return write_atomic(path, json.dumps(payload, indent=2, default=str))
