"""Locks against real processes: a held run dir is refused at once naming its holder; the lock of a
process that was SIGKILLed is taken over; a file lock waits, then times out with the path."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from greencode.locks import FileLock, LockTimeout, RunDirBusy, RunDirLock

REPO = Path(__file__).resolve().parents[1]

HOLDER = r"""
import sys, time
from greencode.locks import FileLock, RunDirLock
lock = RunDirLock(sys.argv[1]) if sys.argv[2] == "run_dir" else FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def hold(path: Path, kind: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), kind], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_of_a_run_dir_fails_at_once_then_takes_over_after_a_sigkill(tmp_path, caplog):
    holder = hold(tmp_path, "run_dir")
    try:
        started = time.monotonic()
        with pytest.raises(RunDirBusy, match=rf"in use by another pipeline \(pid {holder.pid} on this host") as err:
            RunDirLock(tmp_path).acquire()
        assert time.monotonic() - started < 1.0
        assert "pipeline.lock" in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="greencode.locks"), RunDirLock(tmp_path):
        pass
    assert f"taking over the lock of pid {holder.pid}" in caplog.text
    caplog.clear()
    # released cleanly: no warning; and one holder at a time, in-process too
    with caplog.at_level(logging.WARNING, logger="greencode.locks"), RunDirLock(tmp_path):
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
            RunDirLock(tmp_path).acquire()
    assert "taking over" not in caplog.text


def test_file_lock_waits_for_its_holder_then_times_out_naming_the_file(tmp_path):
    path = tmp_path / ".model.lock"
    holder = hold(path, "file")
    try:
        started = time.monotonic()
        with pytest.raises(LockTimeout, match=r"\.model\.lock is still locked"):
            FileLock(path, timeout=0.3).acquire()
        assert 0.3 <= time.monotonic() - started < 2
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FileLock(path, timeout=1):  # the kernel dropped the dead holder's lock
        pass
