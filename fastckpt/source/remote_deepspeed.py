"""A DeepSpeed ZeRO checkpoint folder at a URL (``s3://bucket/run/``, or its tag folder
``s3://bucket/run/global_step2/``), where the store can list a folder (S3, GCS, Azure).

``latest`` is a small object: fetched and checked as a local one (source.deepspeed.tag_name).
The tag folder's files are found by listing it. Each ``*_states.pt`` file is a torch zip:
one object and one memory file of its size (source.remote.RemoteFile), of which only the
zip records the core reads are fetched (``data.pkl``, the directory, never a storage),
so the core indexes it as a local file. source.deepspeed's ``ZeroLayout`` reads the folder
through this class as through local files: both give the same tensors and refusals. A
load then fetches exactly the runs of the flat partitions its plan reads
(load.remote_reads); the partitions are not fetched before.

An ``http(s)://`` server cannot list a folder: source.remote refuses a DeepSpeed folder
there (the names of the files depend on the ranks and the precision; they are not guessed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import fastckpt._core as _core
from fastckpt.errors import CheckpointError
from fastckpt.source.deepspeed import _MAX_TAG, LATEST, is_states_file, missing_latest, tag_name
from fastckpt.source.remote import RemoteFile, RemotePath, open_file
from fastckpt.source.remote_store import Store, each


class RemoteZero:
    """The ZeRO folder under a store's ``prefix``: the files interface of source.deepspeed's
    ``ZeroLayout``, and the interface loads and ``Checkpoint.tensor()`` use for a remote
    checkpoint (``files``, ``gap``, ``fetch_tensor``)."""

    is_deepspeed = True

    def __init__(self, store: Store, prefix: str, url: str, listed: list[tuple[str, int]]):
        self.store = store
        self.url = store.url(prefix)
        self.path: Path = RemotePath.of(url)
        self.paths: list[Path] = []  # known once ZeroLayout has picked its files
        self.files: list[RemoteFile] = []  # in the order of the layout's indexes
        self._latest_bytes = 0
        self._tag, listed = self._tag_folder(prefix, listed)
        self.folder: Path = RemotePath.of(store.url(self._tag))
        # Objects directly in the tag folder (list_files does not descend).
        self._names = [k[len(self._tag) :] for k, _ in listed if k.startswith(self._tag)]

    def _tag_folder(
        self, prefix: str, listed: list[tuple[str, int]]
    ) -> tuple[str, list[tuple[str, int]]]:
        """The tag folder's prefix and listing: ``prefix`` itself where it holds the states
        files, else the tag its ``latest`` names."""
        if any(is_states_file(k[len(prefix) :]) for k, _ in listed):
            return prefix, listed
        latest = prefix + LATEST
        sizes = dict(listed)
        if latest not in sizes:
            raise CheckpointError(missing_latest(self.store.url(latest)))
        if sizes[latest] > _MAX_TAG:  # not a tag name: refused without fetching it
            raise CheckpointError(
                f"{self.store.url(latest)}: does not name a tag folder ({sizes[latest]} bytes)"
            )
        raw = self.store.get_all(latest)
        self._latest_bytes = len(raw)
        tag = tag_name(raw, self.store.url(latest))
        folder = f"{prefix}{tag}/"
        found = self.store.list_files(folder)
        if not found:
            raise CheckpointError(
                f"{self.store.url(folder)}: missing: {self.store.url(latest)} names the tag {tag!r}"
            )
        return folder, found

    def wait(self) -> list[Any]:
        return []  # DeepSpeedCheckpoint opens the files itself (source.deepspeed)

    # -- ZeroLayout's files -----------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._names)

    def path_of(self, name: str) -> Path:
        return RemotePath.of(self.store.url(self._tag + name))

    def open(self, names: Sequence[str], exact_reads: bool) -> list[_core.FileIndex]:
        files = each([partial(open_file, self.store, self._tag + n) for n in names])  # together
        self.files = files
        self.paths = [RemotePath.of(f.url) for f in files]
        try:
            return list(
                _core.start_open(
                    [f.path for f in files], min(8, os.cpu_count() or 1), exact_reads
                ).wait()
            )
        except CheckpointError as e:
            text = str(e)
            for f in files:
                text = text.replace(f.path, f.url)  # the URL, not the memory file the core read
            raise CheckpointError(text) from None

    # -- what loads and tensor() use ----------------------------------------------------
    @property
    def gap(self) -> int:
        return self.store.settings.gap

    @property
    def header_bytes(self) -> int:
        """Bytes fetched to open the folder: ``latest`` and the files' zip records."""
        return self._latest_bytes + sum(f.header_bytes for f in self.files)

    def fetch_tensor(self, file: int, start: int, end: int) -> bytearray:
        """A copy of bytes [start, end) of one file, for ``tensor()`` and convert."""
        f = self.files[file]
        f.fetch([(start, end)])
        out = bytearray(f.bytes_at(start, end))
        f.drop(start, end)  # nothing kept: the next read fetches what it reads
        return out
