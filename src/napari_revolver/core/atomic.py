"""Atomic writes: build the result under a temporary sibling name, fsync, rename over the target.

A reader never sees a half-written file or folder under the final name: it sees the previous
content or the complete new one. Every atomic write of the package goes through
:func:`atomic_write` (one file) or :func:`atomic_directory` (a folder such as a zarr store).

Temporary names are ``.{name}.{host}-{pid}.{random}.part`` beside the target, so they are
recognisably ours and tell which process made them. A process killed outright (SIGKILL, power
loss) cannot clean up after itself; the next atomic write to the same target removes the
temporaries whose process is gone, and never those of a live process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_directory",
    "atomic_write",
    "current_umask",
    "remove_stale_temporaries",
    "temporary_sibling",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

_SUFFIX = ".part"


def _host_tag() -> str:
    """Return the host name reduced to ``[A-Za-z0-9-]`` (at most 32 characters)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def temporary_sibling(target: PathLike) -> Path:
    """Name a fresh temporary sibling of ``target`` owned by this process.

    Parameters
    ----------
    target : str or os.PathLike
        The final path.

    Returns
    -------
    pathlib.Path
        ``<parent>/.{name}.{host}-{pid}.{random}.part``; nothing is created.
    """
    target = Path(target)
    token = secrets.token_hex(4)
    return target.with_name(f".{target.name}.{_host_tag()}-{os.getpid()}.{token}{_SUFFIX}")


def _owner_pid(target: Path, candidate: str) -> tuple[str, int] | None:
    """``(host, pid)`` of a temporary sibling name of ``target``, or None if not one of ours."""
    pattern = rf"\.{re.escape(target.name)}\.([A-Za-z0-9-]+)-(\d+)\.[0-9a-f]+{re.escape(_SUFFIX)}"
    m = re.fullmatch(pattern, candidate)
    return (m.group(1), int(m.group(2))) if m else None


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a zombie counts as gone)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            # Field 3, after the parenthesised command name, is the state; Z is a zombie.
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def remove_stale_temporaries(target: PathLike) -> list[Path]:
    """Remove temporary siblings of ``target`` left by processes that no longer run.

    Only names made by :func:`temporary_sibling` on this machine are considered; those of a
    live process (or of another machine sharing the folder) are left alone.

    Parameters
    ----------
    target : str or os.PathLike
        The final path whose temporaries to look for.

    Returns
    -------
    list of pathlib.Path
        The files and folders removed (each is also logged as a warning).
    """
    target = Path(target)
    host = _host_tag()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        owner = _owner_pid(target, entry.name)
        if owner is None or owner[0] != host or _process_alive(owner[1]):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # another run removed it first
            continue
        except OSError as exc:
            logger.warning("could not remove stale temporary %s: %s", path, exc)
            continue
        logger.warning(
            "removed %s, a temporary left by process %d (no longer running) writing %s",
            path,
            owner[1],
            target,
        )
        removed.append(path)
    return removed


def current_umask() -> int:
    """Return the process umask without changing it where possible.

    Returns
    -------
    int
        The umask, e.g. ``0o022``.
    """
    # os.umask can only be read by setting it, which briefly affects files
    # created concurrently by other threads; /proc avoids that on Linux.
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def _check_target(target: Path, overwrite: bool) -> bool:
    """Validate the parent and an existing target; return whether the target exists."""
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"parent directory {target.parent} of {target} does not exist; create it first"
        )
    exists = target.exists() or target.is_symlink()
    if exists and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    return exists


def _fsync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(
    path: PathLike,
    write: Callable[[IO[Any]], None],
    *,
    binary: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write one file through a temporary sibling renamed over ``path`` when complete.

    Parameters
    ----------
    path : str or os.PathLike
        Target file. Its parent directory must exist.
    write : callable
        ``write(fh)`` writes the whole content to the open file object ``fh``.
    binary : bool
        Open ``fh`` in binary mode; otherwise in text mode, UTF-8, without newline
        translation.
    overwrite : bool
        Replace an existing file at ``path``.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    FileNotFoundError
        If the parent directory of ``path`` does not exist.
    IsADirectoryError
        If ``path`` is a directory.

    Notes
    -----
    The result gets the permissions a plain ``open()`` would give it (or keeps those of the
    file it replaces). Any exception, Ctrl-C included, removes the temporary file; the
    temporaries of a killed process are removed by the next write to the same ``path``.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {target}: it is a directory")
    exists = _check_target(target, overwrite)
    remove_stale_temporaries(target)
    mode = (target.stat().st_mode & 0o7777) if exists else (0o666 & ~current_umask())
    tmp = temporary_sibling(target)
    open_kwargs: dict[str, Any] = {} if binary else {"newline": "", "encoding": "utf-8"}
    try:
        with open(tmp, "xb" if binary else "x", **open_kwargs) as fh:
            write(fh)
            fh.flush()
            # Without fsync a power loss after the rename can leave an empty
            # target on some filesystems, defeating the point of the rename.
            os.fsync(fh.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        # BaseException so Ctrl-C (KeyboardInterrupt) also cleans up.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(target.parent)
    return target


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (and ``root`` itself) to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_directory(Path(folder))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def atomic_directory(
    path: PathLike,
    build: Callable[[Path], None],
    *,
    overwrite: bool = False,
) -> Path:
    """Build a folder (a zarr store, say) in a temporary sibling renamed to ``path`` when complete.

    Parameters
    ----------
    path : str or os.PathLike
        Target folder. Its parent directory must exist.
    build : callable
        ``build(tmp)`` fills the empty folder ``tmp`` (a :class:`pathlib.Path`) with the
        whole content.
    overwrite : bool
        Replace an existing file or folder at ``path``.

    Returns
    -------
    pathlib.Path
        ``path``, complete.

    Raises
    ------
    FileExistsError, FileNotFoundError
        As for :func:`atomic_write`.

    Notes
    -----
    A folder cannot be renamed over a non-empty one, so an existing target is first renamed
    aside under a temporary name and removed after the new folder is in place: a process
    killed in between leaves no folder at ``path``, never a partial one, and the next write
    removes what it left.
    """
    target = Path(path)
    exists = _check_target(target, overwrite)
    remove_stale_temporaries(target)
    tmp = temporary_sibling(target)
    tmp.mkdir()
    try:
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o777 & ~current_umask())
        build(tmp)
        _fsync_tree(tmp)
        if exists:
            aside = temporary_sibling(target)
            os.replace(target, aside)
            os.replace(tmp, target)
            _remove(aside)
        else:
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            _remove(tmp)
        raise
    _fsync_directory(target.parent)
    return target
