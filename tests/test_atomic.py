"""Atomic publication: a process SIGKILLed at every step of a directory swap leaves a complete artifact
that the next call recovers; failed writes, dead writers' temp dirs and concurrent swaps leave no debris."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from greencode.atomic import atomic_path, recover, remove_path, write_json

REPO = Path(__file__).resolve().parents[1]

# Publishes a new version of argv[1] and SIGKILLs itself right after the rename (or the step) named by argv[2].
PUBLISHER = r"""
import os, signal, sys
from pathlib import Path
import greencode.atomic as atomic

dest, kill_at = Path(sys.argv[1]), sys.argv[2]
rename = os.rename

def rename_then_maybe_die(src, dst):
    rename(src, dst)
    name = Path(dst).name
    if ((kill_at == "aside" and name.endswith(".old")) or (kill_at == "in" and Path(dst) == dest)
            or (kill_at == "discard" and ".trash-" in name)):
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = rename_then_maybe_die
with atomic.atomic_path(dest, directory=True) as tmp:
    (tmp / "weights.bin").write_text("new weights")
    (tmp / "config.json").write_text("new config")
    if kill_at == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
"""


def make_version(path: Path, label: str) -> None:
    path.mkdir(parents=True)
    (path / "weights.bin").write_text(f"{label} weights")
    (path / "config.json").write_text(f"{label} config")


def version_of(path: Path) -> str | None:
    """'old'/'new' when ``path`` holds a complete version, else None."""
    if not path.is_dir():
        return None
    files = {p.name: p.read_text() for p in path.iterdir()}
    labels = {text.split()[0] for text in files.values()}
    return labels.pop() if set(files) == {"weights.bin", "config.json"} and len(labels) == 1 else None


def debris(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.glob(f".{name}.*") if not p.name.endswith(".lock"))


# kill point -> the version `dest` holds once recovered
KILL_POINTS = {"writing": "old", "aside": "old", "in": "new", "discard": "new"}


@pytest.mark.parametrize("kill_at", list(KILL_POINTS))
def test_sigkill_at_each_step_of_a_directory_swap_leaves_a_recoverable_artifact(tmp_path, kill_at):
    dest = tmp_path / "model"
    make_version(dest, "old")
    proc = subprocess.run([sys.executable, "-c", PUBLISHER, str(dest), kill_at], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    # At the moment of the kill a complete version existed: under its name, or set aside as .model.old.
    assert version_of(dest) or version_of(tmp_path / ".model.old")
    if kill_at == "aside":
        assert not dest.exists() and version_of(tmp_path / ".model.old") == "old"

    recover(dest)
    assert version_of(dest) == KILL_POINTS[kill_at]
    assert debris(tmp_path, "model") == []  # old version, trash and the dead writer's temp dir are gone

    # and the next publication goes through
    with atomic_path(dest, directory=True) as tmp:
        (tmp / "weights.bin").write_text("newer weights")
        (tmp / "config.json").write_text("newer config")
    assert version_of(dest) == "newer" and debris(tmp_path, "model") == []


def test_a_failed_write_keeps_the_old_directory_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "model"
    make_version(dest, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(dest, directory=True) as tmp:
            (tmp / "weights.bin").write_text("half")
            raise RuntimeError("boom")
    assert version_of(dest) == "old" and debris(tmp_path, "model") == []


def test_temp_files_of_writers_that_died_are_removed_from_inside_a_directory(tmp_path):
    parts = tmp_path / "report" / "parts" / "full"
    parts.mkdir(parents=True)
    writer = r"""
import os, signal, sys
from greencode.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_text('{"half": ')
    os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", writer, str(parts / "b0.json")], cwd=REPO, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with atomic_path(parts / "b1.json") as live:  # a writer still at work keeps its temp file
        assert len(list(parts.glob(".b0.json.tmp-*"))) == 1
        recover(tmp_path / "report")
        assert live.exists() and not list(parts.glob(".b0.json.tmp-*"))
        live.write_text("{}")
    assert sorted(p.name for p in parts.iterdir()) == ["b1.json"]


def test_a_live_writers_temp_dir_is_left_alone(tmp_path):
    dest = tmp_path / "model"
    with atomic_path(dest, directory=True) as tmp:
        recover(dest)  # another caller recovering while this process is still writing
        assert tmp.is_dir()
        make_version(tmp / "v", "new")
    assert (dest / "v").is_dir()


def test_published_dirs_and_files_are_shared_data_not_private(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "model", directory=True) as tmp:
            (tmp / "f").write_text("x")
        write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644


def test_remove_path_also_drops_an_interrupted_swaps_old_version(tmp_path):
    dest = tmp_path / "model"
    make_version(dest, "new")
    make_version(tmp_path / ".model.old", "old")
    remove_path(dest)
    recover(dest)
    assert not dest.exists() and debris(tmp_path, "model") == []
    remove_path(tmp_path / "absent")  # nothing to remove is fine


def test_concurrent_swaps_of_one_directory_end_with_one_complete_version(tmp_path):
    dest = tmp_path / "model"
    errors: list[BaseException] = []

    def publish(label: str) -> None:
        try:
            for _ in range(10):
                with atomic_path(dest, directory=True) as tmp:
                    (tmp / "weights.bin").write_text(f"{label} weights")
                    (tmp / "config.json").write_text(f"{label} config")
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=publish, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert version_of(dest) in {"w0", "w1", "w2", "w3"} and debris(tmp_path, "model") == []
