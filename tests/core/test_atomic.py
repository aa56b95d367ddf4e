"""Tests for the one atomic-write helper: temporaries, permissions, stale leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from napari_revolver.core.atomic import (
    atomic_directory,
    atomic_write,
    remove_stale_temporaries,
    temporary_sibling,
)


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temporary_of(target: Path, pid: int) -> Path:
    name = temporary_sibling(target).name
    head, _, rest = name.rpartition("-")
    return target.with_name(f"{head}-{pid}.{rest.split('.', 1)[1]}")


def test_atomic_write_writes_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    assert atomic_write(target, lambda fh: fh.write("héllo\n"), binary=False) == target
    assert target.read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_write_refuses_to_overwrite_in_the_apis_words(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write(target, lambda fh: fh.write(b"1"))
    with pytest.raises(FileExistsError, match="pass overwrite=True") as info:
        atomic_write(target, lambda fh: fh.write(b"2"))
    assert "--" not in str(info.value)
    atomic_write(target, lambda fh: fh.write(b"2"), overwrite=True)
    assert target.read_bytes() == b"2"


def test_atomic_write_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write(tmp_path / "missing" / "a.bin", lambda fh: fh.write(b""))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write(tmp_path, lambda fh: fh.write(b""), overwrite=True)


def test_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write(target, lambda fh: fh.write(b"old"))

    def fail(fh) -> None:
        fh.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail, overwrite=True)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_permissions_follow_the_umask_or_the_replaced_file(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        target = atomic_write(tmp_path / "a.bin", lambda fh: fh.write(b"x"))
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o640
    target.chmod(0o600)
    atomic_write(target, lambda fh: fh.write(b"y"), overwrite=True)
    assert target.stat().st_mode & 0o777 == 0o600


def test_temporary_names_are_recognisable_and_carry_the_pid(tmp_path: Path) -> None:
    tmp = temporary_sibling(tmp_path / "out.tif")
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(".out.tif.") and tmp.name.endswith(".part")
    assert f"-{os.getpid()}." in tmp.name
    assert temporary_sibling(tmp_path / "out.tif") != tmp


def test_stale_temporaries_of_dead_processes_are_removed_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "out.tif"
    dead = _dead_pid()
    stale_file = _temporary_of(target, dead)
    stale_file.write_bytes(b"half")
    stale_dir = _temporary_of(target, dead).with_name(stale_file.name.replace(".part", "0.part"))
    stale_dir.mkdir()
    (stale_dir / "chunk").write_bytes(b"x")
    live = temporary_sibling(target)  # this process's: alive
    live.write_bytes(b"busy")
    other = tmp_path / f".other.tif.{stale_file.name.split('.')[-3]}.part"
    other.write_bytes(b"not for out.tif")
    foreign = tmp_path / ".out.tif.part"  # not one of our names
    foreign.write_bytes(b"someone else's")
    with caplog.at_level("WARNING", logger="napari_revolver.core.atomic"):
        atomic_write(target, lambda fh: fh.write(b"done"))
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other.exists() and foreign.exists()
    assert f"process {dead}" in caplog.text and str(stale_file) in caplog.text


def test_temporary_of_a_live_process_is_never_removed(tmp_path: Path) -> None:
    target = tmp_path / "out.tif"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        busy = _temporary_of(target, sleeper.pid)
        busy.write_bytes(b"busy")
        assert remove_stale_temporaries(target) == []
        assert busy.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_stale_temporaries(target) == [busy]


def test_temporary_of_another_machine_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "out.tif"
    name = _temporary_of(target, _dead_pid()).name
    host_and_pid = name.split(".")[-3]
    elsewhere = tmp_path / name.replace(host_and_pid, f"elsewhere-{host_and_pid.rsplit('-', 1)[1]}")
    elsewhere.write_bytes(b"theirs")
    assert remove_stale_temporaries(target) == []
    assert elsewhere.exists()


def test_atomic_directory_builds_renames_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "out.zarr"

    def build(value: bytes):
        def fill(tmp: Path) -> None:
            assert tmp.parent == tmp_path and tmp.name.endswith(".part")
            (tmp / "sub").mkdir()
            (tmp / "sub" / "a").write_bytes(value)

        return fill

    assert atomic_directory(target, build(b"1")) == target
    assert (target / "sub" / "a").read_bytes() == b"1"
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        atomic_directory(target, build(b"2"))
    atomic_directory(target, build(b"2"), overwrite=True)
    assert (target / "sub" / "a").read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_failed_directory_build_leaves_the_previous_one(tmp_path: Path) -> None:
    target = tmp_path / "out.zarr"
    atomic_directory(target, lambda tmp: (tmp / "a").write_bytes(b"old"))

    def fail(tmp: Path) -> None:
        (tmp / "a").write_bytes(b"half")
        raise ValueError("page 3 has shape (2, 2)")

    with pytest.raises(ValueError, match="page 3"):
        atomic_directory(target, fail, overwrite=True)
    assert (target / "a").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
