"""A torch.distributed.checkpoint (DCP) directory at a URL (``s3://bucket/run/step-100/``).

``.metadata`` is small: it is fetched whole into a memory file and read by the core's
restricted pickle VM, as a local one is. Each ``.distcp`` file it names is one object
and one memory file of its size (source.remote.RemoteFile); for every chunk's
``torch.save`` archive inside it only the zip records the core reads to index that
archive are fetched (source.remote.read_zip_headers), all archives of a file at once.
source.dcp's ``DcpLayout`` reads the directory through this class as through local
files, so both give the same tensors, chunks and refusals.

A load then fetches exactly the runs its plan reads (load.remote_reads): it sees one
file per chunk archive (``files``), an ``_Archive`` over the object that holds it, since
the copy tasks name archives, and the pages each releases stay inside its archive.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import fastckpt._core as _core
from fastckpt.errors import CheckpointError
from fastckpt.source.memory_file import MemoryFile
from fastckpt.source.remote import DCP_METADATA, RemoteFile, RemotePath, read_zip_headers
from fastckpt.source.remote_store import Object, Store, each

_ARCHIVE_TAIL = 1 << 10  # a chunk archive's end records and directory: under 1 KiB;
# its first records (data.pkl, byteorder) too
_ARCHIVE_BLOCK = 512  # further reads of a directory longer than that


class _Archive:
    """One chunk's archive in a ``.distcp`` object, as load.remote_reads sees a file:
    bytes land in the object's memory file at their offsets; ``release`` gives back
    only whole pages inside the archive, so the archives around it keep theirs."""

    def __init__(self, f: RemoteFile, start: int, end: int, checks: bool):
        self.f = f
        self.start, self.end = start, end
        self.size = f.size
        self.url = f.url
        self.freed = 0
        self.checks = checks  # the first archive of its object checks it (one HEAD per file)
        self.holder = f  # its object fetches for all its archives at once (load.remote_reads)

    def fetch(self, runs: Sequence[tuple[int, int]]) -> int:
        return self.f.fetch(runs)

    def fetch_into(self, pieces: Sequence[tuple[int, int, Any]], max_buffered: int) -> int:
        return self.f.fetch_into(pieces, max_buffered)

    def check_unchanged(self) -> None:
        if self.checks:
            self.f.check_unchanged()

    def release(self, upto: int) -> None:
        lo, hi = max(self.start, self.freed), min(self.end, upto)
        if hi > lo:
            self.f.drop(lo, hi)
            self.freed = hi

    def release_all(self) -> None:
        self.f.drop(self.start, self.end)
        self.freed = 0


class RemoteDcp:
    """The DCP directory under a store's ``prefix``: the files interface of source.dcp's
    ``DcpLayout`` (names relative to the directory), and the interface loads and
    ``Checkpoint.tensor()`` use for a remote checkpoint (``files``, ``gap``,
    ``fetch_tensor``)."""

    is_dcp = True

    def __init__(self, store: Store, prefix: str, url: str):
        self.store, self.prefix = store, prefix
        self.url = store.url(prefix)
        self.path: Path = RemotePath.of(url)
        self.paths: list[Path] = []  # the .distcp files are known once .metadata is read
        self.files: list[_Archive] = []  # one per archive, in the order they were opened
        self._objects: dict[str, RemoteFile] = {}
        self._have: dict[str, list[tuple[int, int]]] = {}
        self._meta_bytes = 0

    def wait(self) -> list[Any]:
        return []  # DcpCheckpoint opens the archives itself (source.dcp)

    # -- DcpLayout's files ------------------------------------------------------------
    def name(self, relative: str) -> str:
        return self.store.url(self._key(relative))

    def path_of(self, relative: str) -> Path:
        return RemotePath.of(self.name(relative))

    def read_metadata(self) -> Any:
        url = self.store.url(self.prefix + DCP_METADATA)
        data = self.store.get_all(self.prefix + DCP_METADATA)
        self._meta_bytes = len(data)
        if not data:
            raise CheckpointError(f"{url}: the object is empty (0 bytes): not a DCP .metadata")
        meta = MemoryFile(len(data), "fastckpt-dcp-metadata")
        try:
            assert meta.map is not None
            meta.map[:] = data
            return _named(lambda: _core.read_dcp_metadata(meta.path), meta.path, url)
        finally:
            meta.close()

    def sizes(self, relatives: Sequence[str]) -> dict[str, int | None]:
        """Each file's size (one HEAD each, together), None where it is missing."""
        found = each([partial(self._object, r) for r in relatives])
        return {r: None if f is None else f.size for r, f in zip(relatives, found, strict=True)}

    def open_archives(
        self, ranges: dict[str, list[tuple[int, int]]], exact_reads: bool
    ) -> dict[str, list[Any]]:
        """The core's index of each chunk archive, by file; the zip records the core reads
        fetched first, for every file together."""
        objects: dict[str, RemoteFile] = {}
        for rel in ranges:
            found = self._object(rel)
            assert found is not None  # DcpLayout found its size first
            objects[rel] = found
        each([
            partial(read_zip_headers, f, rs, self._have.setdefault(rel, []), _ARCHIVE_TAIL,
                    _ARCHIVE_BLOCK, _ARCHIVE_TAIL)
            for (rel, rs), f in zip(ranges.items(), objects.values(), strict=True)
        ])  # fmt: skip
        out = {}
        for rel, rs in ranges.items():
            f = objects[rel]
            out[rel] = _named(partial(_core.open_archives, f.path, rs, exact_reads), f.path, f.url)
            first = not any(a.f is f for a in self.files)
            for k, (offset, length) in enumerate(rs):
                self.files.append(_Archive(f, offset, offset + length, first and k == 0))
        return out

    def read(self, relative: str, offset: int, length: int) -> bytes:
        f = self._object(relative)
        assert f is not None
        f.fetch([(offset, offset + length)])
        out = f.bytes_at(offset, offset + length)
        f.drop(offset, offset + length)
        return out

    def pickled_value(self, relative: str, offset: int, length: int) -> Any:
        f = self._object(relative)
        assert f is not None
        f.fetch([(offset, offset + length)])
        try:
            return _named(lambda: _core.read_pickled_value(f.path, offset, length), f.path, f.url)
        finally:
            f.drop(offset, offset + length)

    def _key(self, relative: str) -> str:
        p = PurePosixPath(relative)
        if not relative or p.is_absolute() or ".." in p.parts or "\\" in relative:
            raise CheckpointError(
                f"{self.store.url(self.prefix + DCP_METADATA)}: names the file {relative!r}, "
                "which leaves the directory"
            )
        return self.prefix + relative

    def _object(self, relative: str) -> RemoteFile | None:
        """The ``.distcp`` object (HEAD once), or None where it is missing."""
        if relative not in self._objects:
            try:
                obj = Object(self.store, self._key(relative))
            except FileNotFoundError:
                return None
            self._objects[relative] = RemoteFile(obj)
        return self._objects[relative]

    # -- what loads and tensor() use ----------------------------------------------------
    @property
    def gap(self) -> int:
        return self.store.settings.gap

    @property
    def header_bytes(self) -> int:
        """Bytes fetched to open the directory: .metadata and the archives' zip records."""
        return self._meta_bytes + sum(f.header_bytes for f in self._objects.values())

    def fetch_tensor(self, archive: int, start: int, end: int) -> bytearray:
        """A copy of bytes [start, end) of a chunk's file, for ``tensor()`` and convert."""
        a = self.files[archive]
        a.f.fetch([(start, end)])
        out = bytearray(a.f.bytes_at(start, end))
        a.f.drop(start, end)  # nothing kept: the next read fetches what it reads
        return out


def _named(read: Any, path: str, url: str) -> Any:
    """``read()``, its errors naming the URL instead of the memory file the core read."""
    try:
        return read()
    except CheckpointError as e:
        raise type(e)(str(e).replace(path, url)) from None
