"""Bytes of one checkpoint file at their own offsets, in an anonymous memory file (memfd)
the size of the file. The core indexes it (``/proc/self/fd/N``) or copies from it
(``FileIndex.over``) as from the file itself, and pages are given back as the copies that
need them finish. Remote objects (source.remote), preads on network filesystems
(load.pread_files) and reads shared between ranks (load.read_once) land their bytes here.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

PAGE = mmap.PAGESIZE
_MADV_POPULATE_WRITE = 23  # Linux 5.14; not named by Python 3.11's mmap


class MemoryFile:
    def __init__(self, size: int, label: str):
        self.size = size
        self.fd = os.memfd_create(label, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map: mmap.mmap | None = mmap.mmap(self.fd, size) if size else None
        self.freed = 0  # the pages below are released

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def populate(self, runs: Sequence[tuple[int, int]]) -> None:
        """Allocates the pages of ``runs`` in one call each (MADV_POPULATE_WRITE) before the
        bytes arrive, instead of a fault per 4 KiB page taken by the thread that copies
        the responses in."""
        if self.map is None:
            return
        for s, e in runs:
            lo = s // PAGE * PAGE
            try:
                self.map.madvise(_MADV_POPULATE_WRITE, lo, min(self.size, e) - lo)
            except OSError:  # kernels before 5.14: the pages fault in as they are written
                return

    def release(self, upto: int) -> None:
        """Gives the pages below ``upto`` back (they read as zeros if read again)."""
        end = min(self.size, upto) // PAGE * PAGE
        if self.map is not None and end > self.freed:
            self.map.madvise(mmap.MADV_REMOVE, self.freed, end - self.freed)
            self.freed = end

    def drop(self, start: int, end: int) -> None:
        """Gives back the whole pages inside [start, end) (the pages it shares with bytes
        around it are kept); ``freed`` is left as it is."""
        lo, hi = -(-start // PAGE) * PAGE, min(self.size, end) // PAGE * PAGE
        if self.map is not None and hi > lo:
            self.map.madvise(mmap.MADV_REMOVE, lo, hi - lo)

    def release_all(self) -> None:
        self.freed = 0
        self.release(self.size)
        self.freed = 0

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
