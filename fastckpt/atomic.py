"""Atomic writes of files and folders, with the permissions a plain ``open()`` /
``mkdir`` would give.

A crash mid-write never leaves a half-written file or folder where a good one was:
everything is written under a hidden temporary name beside the destination, made
durable (fsync), then renamed into place. The temporary names come from
``tempfile``, which creates them 0600 / 0700; they get the process umask's modes
(0644 / 0755 under umask 022) before they are renamed, so a converted model or a
save is readable by whoever could read a file the user wrote with ``open()``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def current_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    # Elsewhere the only way is to set it and set it back (a short window in which
    # another thread creating a file would see 0).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def folder_mode() -> int:
    """The mode ``mkdir`` gives a new folder: 0o777 less the umask."""
    return 0o777 & ~current_umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the entries of ``folder`` (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write to a temporary file beside ``path``; fsync and rename it over ``path`` on success.

    The file gets the mode ``open()`` would give it. On any exception the temporary
    file is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; on success it replaces ``path`` by rename.

    The folder gets the mode ``mkdir`` would give it. An existing ``path`` (other than an
    empty folder, which rename(2) replaces) is first renamed aside into a hidden
    ``.<name>.old-*`` folder and removed once the new one is in place: a crash in
    between leaves the old content there, never a half-written folder at ``path``.
    On any exception the temporary folder is removed and ``path`` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        os.chmod(tmp, folder_mode())
        yield tmp
        fsync_dir(tmp)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, target: Path) -> None:
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)  # an empty folder at target is replaced by rename(2)
    fsync_dir(target.parent)
