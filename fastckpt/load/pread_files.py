"""``read="pread"``: large parallel ``pread``s into memory instead of faulting a mapping.

On a network filesystem (NFS, Lustre, CIFS/SMB, FUSE mounts, ...) a mapping is
filled one page fault at a time, each a round trip. There the runs a load reads
are instead read with ``preadv`` calls of up to 8 MiB on several threads (the GIL
is released while each waits) into a memory file of the checkpoint file's size,
at the same offsets, and the copy engine runs over that memory file with the
checkpoint's own index (``FileIndex.over``), window by window as for a remote
checkpoint (fastckpt.load.remote_reads). ``read="own"`` (the default) picks this
by itself when the checkpoint's files lie on such a filesystem (/proc/self/mountinfo).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastckpt.errors import CheckpointError
from fastckpt.source.memory_file import MemoryFile

PART = 8 << 20
THREADS = 16
# Filesystem types (as /proc/self/mountinfo names them) where pages come over a network.
NETWORK_FS = frozenset({
    "nfs", "nfs4", "lustre", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "gpfs",
    "beegfs", "9p", "afs", "orangefs", "pvfs2", "wekafs", "virtiofs",
})  # fmt: skip


def mounts(text: str | None = None) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of each mount, from /proc/self/mountinfo's format."""
    if text is None:
        try:
            text = Path("/proc/self/mountinfo").read_text(encoding="utf-8")
        except OSError:
            return []
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        point = fields[4].encode().decode("unicode_escape")  # \040 for a space
        out.append((point, right.split()[0]))
    return out


def filesystem_type(
    path: str | os.PathLike[str], table: list[tuple[str, str]] | None = None
) -> str:
    """The type of the filesystem holding ``path`` (the longest mount point above it)."""
    real = os.path.realpath(path)
    best, kind = "", ""
    for point, fstype in mounts() if table is None else table:
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fstype
    return kind


def on_network_fs(path: str | os.PathLike[str], table: list[tuple[str, str]] | None = None) -> bool:
    kind = filesystem_type(path, table)
    return kind in NETWORK_FS or kind == "fuse" or kind.startswith(("fuse.", "fuseblk"))


class _Stamp:
    def __init__(self, st: os.stat_result):
        self.size, self.mtime, self.ino = st.st_size, st.st_mtime_ns, st.st_ino


class PreadFile(MemoryFile):
    """One local checkpoint file read with preads into a memory file of its size (the
    interface of source.remote.RemoteFile that load.remote_reads uses)."""

    def __init__(self, path: str, size: int):
        super().__init__(size, "fastckpt-pread")
        self.holder = self  # what fetches for it (load.remote_reads)
        self.url = path
        self.src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.stamp = _Stamp(os.fstat(self.src))

    def check_unchanged(self) -> None:
        now = _Stamp(os.stat(self.url))
        if (now.size, now.mtime, now.ino) != (self.stamp.size, self.stamp.mtime, self.stamp.ino):
            raise CheckpointError(f"{self.url}: the file changed since it was opened; refused")

    def fetch(self, runs: list[tuple[int, int]]) -> int:
        if self.map is None:
            return 0
        with memoryview(self.map) as whole:
            return self.fetch_into([(s, e, whole[s:e]) for s, e in runs])

    def fetch_into(self, pieces: list[tuple[int, int, memoryview]], max_buffered: int = 0) -> int:
        """Bytes [start, end) of the file into each piece's buffer; returns how many.
        (``max_buffered``, as for remote files: nothing is buffered, preads land in place.)"""
        parts = [
            (at, min(end, at + PART), out[at - start : min(end, at + PART) - start])
            for start, end, out in pieces
            for at in range(start, end, PART)
        ]
        if not parts:
            return 0
        with ThreadPoolExecutor(min(THREADS, len(parts))) as ex:
            for _ in ex.map(lambda p: self._read(*p), parts):
                pass
        return sum(e - s for s, e, _ in parts)

    def _read(self, start: int, end: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self.src, [view[done:]], start + done)
            if n <= 0:
                raise CheckpointError(
                    f"{self.url}: ended at byte {start + done} while reading bytes {start} "
                    f"to {end} (the file shrank?)"
                )
            done += n

    def close(self) -> None:
        super().close()
        if self.src >= 0:
            os.close(self.src)
            self.src = -1
