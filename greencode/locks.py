"""Advisory locks on files (``fcntl.flock``): one writer per artifact swap, one pipeline per run dir.

``flock`` locks belong to the open file: the kernel drops them when the holder exits, however it
exits (SIGKILL included), so a lock left by a dead process is never in the way; the run-dir lock
also keeps its holder's pid and host in the file to name it in errors and to say when it takes over
from a dead one. Python opens files non-inheritable, so the Ray processes a pipeline starts do not
hold its lock. Works on local disks and on NFSv4/Lustre mounts that support ``flock``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class LockTimeout(TimeoutError):
    """A lock stayed held by someone else for longer than the caller agreed to wait."""


class RunDirBusy(RuntimeError):
    """Another live process holds the run-dir lock."""


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


class FileLock:
    """Exclusive lock on ``path``; ``with FileLock(p):`` waits for it (up to ``timeout`` seconds)."""

    def __init__(self, path: str | Path, timeout: float | None = None, poll_s: float = 0.05) -> None:
        self.path, self.timeout, self.poll_s = Path(path), timeout, poll_s
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = _open(self.path)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while not _try_flock(fd):
            if deadline is not None and time.monotonic() > deadline:
                os.close(fd)
                raise LockTimeout(f"{self.path} is still locked by another process after {self.timeout:g} s")
            time.sleep(self.poll_s)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunDirLock:
    """One pipeline per run dir: fails at once, naming the holder, when another process has it.

    The lock file (``run_dir/pipeline.lock``) holds the owner's host, pid and start time while
    it is held and is emptied on release; a non-empty file that can be locked was left by a
    process that died holding it, and is taken over with a warning.
    """

    FILE = "pipeline.lock"

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / self.FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = _open(self.path)
        if not _try_flock(fd):
            holder = self._describe(self._read(fd))
            os.close(fd)
            raise RunDirBusy(
                f"run dir {self.path.parent} is in use by another pipeline ({holder}); wait for it to finish or "
                f"stop it, or choose another run_dir. Lock file: {self.path}"
            )
        previous = self._read(fd)
        if previous:
            log.warning("taking over the lock of %s, which ended without releasing it", self._describe(previous))
        owner = {"host": socket.gethostname(), "pid": os.getpid(),
                 "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        raw = os.pread(fd, 4096, 0)
        if not raw.strip():
            return None
        try:
            owner = json.loads(raw)
        except ValueError:
            return {"unreadable": raw[:80].decode(errors="replace")}
        return owner if isinstance(owner, dict) else {"unreadable": str(owner)[:80]}

    @staticmethod
    def _describe(owner: dict[str, Any] | None) -> str:
        if not owner:
            return "owner unknown"
        if "unreadable" in owner:
            return f"owner unreadable: {owner['unreadable']!r}"
        where = "this host" if owner.get("host") == socket.gethostname() else f"host {owner.get('host')}"
        return f"pid {owner.get('pid')} on {where}, since {owner.get('since')}"
