"""torch.distributed.checkpoint (DCP) directories as a source.

The default ``FileSystemWriter`` layout: ``.metadata`` (a pickle of DCP's
``Metadata``) and ``__<rank>_<n>.distcp`` files. ``.metadata`` is read by the
C++ core's restricted pickle VM (``_core.read_dcp_metadata``), which admits only
DCP's own records and runs nothing; it also checks that every tensor's chunks
tile it exactly and that each chunk has a storage entry.

Each tensor chunk is stored as a whole ``torch.save`` archive (uncompressed zip)
at (offset, length) of a ``.distcp`` file; the core reads that archive in place
(``_core.open_archives``), so a chunk is an ordinary stored tensor of this
source: its handle is ``archive << 32 | 0``, as a tensor of a file. A logical
tensor's handle is ``LOGICAL + k``; ``Checkpoint._chunks`` lists its chunks
(see the contract in checkpoint.py). Non-tensor values (step counters, param
groups, bytes) are small ``torch.save`` archives too (an ``io.BytesIO`` value is
a pickled ``BytesIO``, read as its bytes); they are read through the same
restricted VM (``_core.read_pickled_value``) when asked for.

Names: the flattened keys of ``.metadata`` join a path with dots while FQNs
contain dots, so names and the state-dict pick come from ``planner_data``'s
paths, never from splitting a flattened key.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

import fastckpt._core as _core
from fastckpt.dtypes import TORCH_DTYPES
from fastckpt.errors import CheckpointError

METADATA = ".metadata"
_ZIP_MAGIC = b"PK\x03\x04"


def is_dcp_dir(path: str | Path) -> bool:
    """A directory with a ``.metadata`` file, or with ``.distcp`` files (then refused for
    the missing ``.metadata`` when opened)."""
    p = Path(path)
    return p.is_dir() and ((p / METADATA).is_file() or any(p.glob("*.distcp")))


class LogicalTensor(NamedTuple):
    path: tuple[str, ...]  # in the saved state dict (planner_data)
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[tuple[int, tuple[int, ...], tuple[int, ...]], ...]  # (archive, offsets, sizes)


class Value(NamedTuple):
    path: tuple[str, ...]
    file: str  # relative to the directory
    offset: int
    length: int


class DcpFiles(Protocol):
    """How a layout reads the directory's files, named relative to it: local files
    (``LocalFiles``) or objects under a URL (source.remote_dcp.RemoteDcp)."""

    def name(self, relative: str) -> str: ...
    def path_of(self, relative: str) -> Path: ...
    def read_metadata(self) -> Any: ...
    def sizes(self, relatives: Sequence[str]) -> dict[str, int | None]: ...
    def open_archives(
        self, ranges: dict[str, list[tuple[int, int]]], exact_reads: bool
    ) -> dict[str, list[Any]]: ...
    def read(self, relative: str, offset: int, length: int) -> bytes: ...
    def pickled_value(self, relative: str, offset: int, length: int) -> Any: ...


class LocalFiles:
    """A DCP directory on a filesystem."""

    def __init__(self, directory: Path):
        self.directory = directory

    def name(self, relative: str) -> str:
        return str(self.directory / relative)

    def path_of(self, relative: str) -> Path:
        return self.directory / relative

    def read_metadata(self) -> Any:
        meta_path = self.directory / METADATA
        if not meta_path.is_file():
            raise CheckpointError(
                f"{meta_path}: missing: a torch.distributed.checkpoint directory needs its "
                ".metadata file (was the save interrupted before rank 0 finished?)"
            )
        return _core.read_dcp_metadata(str(meta_path))

    def sizes(self, relatives: Sequence[str]) -> dict[str, int | None]:
        files = {r: self.directory / r for r in relatives}
        return {r: f.stat().st_size if f.is_file() else None for r, f in files.items()}

    def open_archives(
        self, ranges: dict[str, list[tuple[int, int]]], exact_reads: bool
    ) -> dict[str, list[Any]]:
        return {
            rel: list(_core.open_archives(self.name(rel), rs, exact_reads))
            for rel, rs in ranges.items()
        }

    def read(self, relative: str, offset: int, length: int) -> bytes:
        with open(self.directory / relative, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def pickled_value(self, relative: str, offset: int, length: int) -> Any:
        return _core.read_pickled_value(self.name(relative), offset, length)


class DcpLayout:
    """What ``.metadata`` says, with the archive of every tensor chunk opened."""

    def __init__(
        self, directory: Path, exact_reads: bool = False, files: DcpFiles | None = None
    ):
        self.directory = directory
        self.files: DcpFiles = files if files is not None else LocalFiles(directory)
        meta = self.files.read_metadata()
        self.version: str = meta.version
        storage = meta.storage
        self.tensors: list[LogicalTensor] = []
        self.values: list[Value] = []
        self.unloadable: dict[tuple[str, ...], str] = {}
        # Every file .metadata names, asked for at once (at a URL: one HEAD each, together).
        entries = storage.values() if isinstance(storage, dict) else storage
        self.file_sizes = self.files.sizes(list(dict.fromkeys(e.relative_path for e in entries)))
        ranges: dict[str, list[tuple[int, int]]] = {}  # by file, relative to the directory
        pending: list[tuple[Any, list[tuple[str, int]]]] = []
        for item in meta.items:
            path = tuple(item.path)
            if item.is_bytes:
                place, offset, length = self._place(storage[item.storage], item.fqn)
                self.values.append(Value(path, place, offset, length))
                continue
            if item.layout != "torch.strided":
                self.unloadable[path] = f"a tensor of layout {item.layout or 'unknown'}"
                continue
            if not item.dtype:
                self.unloadable[path] = (
                    f"a tensor of dtype {item.torch_dtype}, which fastckpt does not know"
                )
                continue
            where: list[tuple[str, int]] = []
            for chunk in item.chunks:
                place, offset, length = self._place(storage[chunk.storage], item.fqn)
                file_ranges = ranges.setdefault(place, [])
                where.append((place, len(file_ranges)))
                file_ranges.append((offset, length))
            pending.append((item, where))
        # One mapping per .distcp file, its chunks' archives read in place.
        self.archives: list[_core.FileIndex] = []
        self.archive_files: list[str] = []  # each archive's file, by its name (path or URL)
        self.archive_relative: list[str] = []
        first: dict[str, int] = {}
        for rel, opened in self.files.open_archives(ranges, exact_reads).items():
            first[rel] = len(self.archives)
            self.archives.extend(opened)
            self.archive_files.extend([self.files.name(rel)] * len(opened))
            self.archive_relative.extend([rel] * len(opened))
        for item, where in pending:
            chunks = []
            for chunk, (rel, k) in zip(item.chunks, where, strict=True):
                archive = first[rel] + k
                self._check_chunk(archive, item, chunk.offsets, chunk.sizes)
                chunks.append((archive, chunk.offsets, chunk.sizes))
            self.tensors.append(
                LogicalTensor(tuple(item.path), TORCH_DTYPES[item.dtype], item.size, tuple(chunks))
            )

    def _place(self, s: Any, fqn: str) -> tuple[str, int, int]:
        """The file (relative), offset and length of one stored blob, checked against it."""
        rel = s.relative_path
        file = self.files.name(rel)
        if s.transforms:
            raise CheckpointError(
                f"{file}: {fqn!r} is stored through the transform(s) "
                f"{', '.join(s.transforms)}, which fastckpt does not read"
            )
        size = self.file_sizes.get(rel)
        if size is None:
            raise CheckpointError(f"{file}: missing: .metadata stores {fqn!r} in it")
        if s.offset + s.length > size:
            raise CheckpointError(
                f"{file}: {fqn!r} is stored at bytes {s.offset}..{s.offset + s.length}, "
                f"past the end of the file ({size} bytes; truncated?)"
            )
        return rel, s.offset, s.length

    def _check_chunk(
        self, archive: int, item: Any, offsets: tuple[int, ...], sizes: tuple[int, ...]
    ) -> None:
        index = self.archives[archive]
        where = f"{self.archive_files[archive]} (archive of {item.fqn!r} at offsets {offsets})"
        if len(index) != 1:
            raise CheckpointError(f"{where}: holds {len(index)} tensors, not one chunk")
        view = index.tensor_view(0)
        if view.dtype != item.dtype or tuple(view.shape) != tuple(sizes):
            raise CheckpointError(
                f"{where}: holds a {view.dtype} tensor of shape {tuple(view.shape)}, but "
                f".metadata declares {item.dtype} of shape {tuple(sizes)}"
            )

    def read_value(self, v: Value) -> Any:
        """A non-tensor value: plain data as the restricted pickle VM reads it (an
        ``io.BytesIO`` as its bytes); raw bytes where a planner stored them raw."""
        if self.files.read(v.file, v.offset, min(v.length, 4)) != _ZIP_MAGIC:
            return self.files.read(v.file, v.offset, v.length)
        return self.files.pickled_value(v.file, v.offset, v.length)


def assemble(
    t: LogicalTensor,
    chunk_tensor: Any,
    chunk_bytes: Any,
    rows: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A logical tensor built from its chunks (``rows``: only rows [start, stop) of it, from
    the chunks that hold them): ``chunk_bytes(archive, first, last)`` gives the bytes of rows
    [first, last) of a stored chunk as a uint8 tensor when they are contiguous in the file
    (else None), ``chunk_tensor(archive)``
    the chunk as a tensor. ``out``: where to build it (contiguous, of its shape and dtype).

    Bytes are copied into a uint8 view of the output: a chunk's archive sits at any
    offset of its .distcp file, so viewing it as its dtype would often need an
    aligned copy first (one more allocation per chunk)."""
    start, stop = rows if rows is not None else (0, t.shape[0] if t.shape else 0)
    shape = ((stop - start,) + t.shape[1:]) if t.shape else ()
    if out is None:
        out = torch.empty(shape, dtype=t.dtype)
    for archive, offsets, sizes in t.chunks:
        if math.prod(sizes) == 0:
            continue
        if not sizes:  # 0-d: one chunk, the whole tensor
            out.copy_(chunk_tensor(archive))
            continue
        lo, hi = max(start, offsets[0]), min(stop, offsets[0] + sizes[0])
        if lo >= hi:
            continue
        region = out.narrow(0, lo - start, hi - lo)
        for dim, (o, s) in enumerate(zip(offsets[1:], sizes[1:], strict=True), start=1):
            region = region.narrow(dim, o, s)
        raw = chunk_bytes(archive, lo - offsets[0], hi - offsets[0])
        if raw is None:
            region.copy_(chunk_tensor(archive).narrow(0, lo - offsets[0], hi - lo))
            continue
        # The output is contiguous: a box of it keeps its last dim dense, so it has a uint8
        # view; the chunk's rows lo..hi are one run of its bytes.
        src = raw.view(hi - lo, *sizes[1:], t.dtype.itemsize)
        dst = region.view(torch.uint8)
        dst.copy_(src.reshape(dst.shape))
    return out


# The Checkpoint of a DCP directory. Imported here rather than at the top:
# checkpoint.py's Checkpoint() and Opening() hand DCP directories to this module.
from fastckpt.source.checkpoint import (  # noqa: E402
    Chunk,
    TensorInfo,
    _split_key,
    pick_state_dict,
)
from fastckpt.source.chunked import LOGICAL, ChunkedCheckpoint, contiguous_strides  # noqa: E402


class DcpCheckpoint(ChunkedCheckpoint):
    """A DCP directory opened for reading: logical tensors by FQN, each stored as chunks.

    ``Checkpoint(path)`` and ``fastckpt.open(path)`` return one for a directory
    holding ``.metadata``. ``keys()`` are the picked state dict's FQNs;
    ``_chunks(handle)`` gives each logical tensor's chunks; ``tensor(name)``
    assembles one (for inspection: it allocates the whole tensor); ``values()``
    and ``metadata`` give the non-tensor entries.

    At a URL (``s3://bucket/run/step-100/``) the directory is read through
    source.remote_dcp: ``_remote`` fetches what loads and ``tensor()`` read.
    """

    def __init__(
        self, path: Any, *, key: str | Sequence[str] | None = None, _opening: Any = None
    ) -> None:
        self.path, _opening, remote = self._opening_of(
            path, _opening, "is_dcp", "a torch.distributed.checkpoint directory"
        )
        # Opening(exact_reads=True) (a rank reading its shard, as load_into opens it): no
        # readahead around the chunks' zip records while they are indexed.
        layout = DcpLayout(
            self.path, bool(getattr(_opening, "exact_reads", False)), remote
        )
        self._layout = layout
        self._remote = remote
        self.format = "dcp"
        self._indexes = layout.archives
        self._file_names = layout.archive_files
        self.files = [layout.files.path_of(r) for r in dict.fromkeys(layout.archive_relative)]
        self._buffers: dict[int, torch.Tensor] = {}
        tensor_paths = [t.path for t in layout.tensors]
        if key is not None:
            self.prefix = _split_key(key)
        else:
            self.prefix = pick_state_dict(tensor_paths)
        self._all_map = self._names(tensor_paths, ())
        self._entries_map = self._names(tensor_paths, self.prefix)
        if self.prefix and not self._entries_map:
            raise CheckpointError(f"{self.path}: no tensors under key {'.'.join(self.prefix)!r}")
        self._shared = [{} for _ in self._indexes]  # chunks never share storage
        self._shape_lists = None
        n = len(self.prefix)
        self._unloadable = {
            ".".join(p[n:]): what
            for p, what in layout.unloadable.items()
            if p[:n] == self.prefix and len(p) > n
        }

    def _names(self, paths: list[tuple[str, ...]], prefix: tuple[str, ...]) -> dict[str, int]:
        n = len(prefix)
        out: dict[str, int] = {}
        for k, p in enumerate(paths):
            if p[:n] == prefix and len(p) > n:
                name = ".".join(p[n:])
                if name in out:
                    raise CheckpointError(
                        f"{self.path}: the paths {paths[out[name] - LOGICAL]} and {p} "
                        f"both give the name {name!r}"
                    )
                out[name] = LOGICAL + k
        return out

    def _logical(self, handle: int) -> LogicalTensor:
        return self._layout.tensors[handle - LOGICAL]

    # -- the loader's view ---------------------------------------------------------
    def _logical_meta(self, handle: int) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._logical(handle)
        return t.dtype, t.shape

    def _chunks(self, handle: int) -> list[Chunk] | None:
        if handle < LOGICAL:
            return None
        return [Chunk(a << 32, o, s) for a, o, s in self._logical(handle).chunks]

    def _handle_tensor(self, handle: int) -> tuple[torch.Tensor, bool]:
        if handle >= LOGICAL:
            return self._assemble(self._logical(handle)), False
        return super()._handle_tensor(handle)

    def _assemble(self, t: LogicalTensor) -> torch.Tensor:
        if len(t.chunks) == 1:  # stored whole: a view of the mapped file, as for other formats
            return self._tensor_at(t.chunks[0][0], 0)[0]
        return assemble(t, lambda archive: self._tensor_at(archive, 0)[0], self._chunk_bytes)

    def _chunk_bytes(
        self, archive: int, first: int = 0, last: int | None = None
    ) -> torch.Tensor | None:
        """Rows [first, last) of a chunk (all by default) as bytes of the mapped file when
        they are contiguous there, else None; at a URL a copy of those rows' bytes only,
        fetched (convert asks for a tensor piece by piece)."""
        view = self._indexes[archive].tensor_view(0)
        if view.strides != contiguous_strides(view.shape):
            return None
        itemsize = TORCH_DTYPES[view.dtype].itemsize
        row = math.prod(view.shape[1:]) * itemsize
        last = (view.shape[0] if view.shape else 1) if last is None else last
        start = view.file_offset + view.storage_offset * itemsize + first * row
        end = start + (last - first) * row
        if self._remote is not None:
            fetched = self._remote.fetch_tensor(archive, start, end)
            return torch.frombuffer(fetched, dtype=torch.uint8) if fetched else torch.empty(
                0, dtype=torch.uint8
            )
        return self._file_bytes(archive)[start:end]

    # -- the user's view -------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            t = self._logical(self._entries[name])
        except KeyError:
            self._missing(name)
        return TensorInfo(
            name, t.shape, t.dtype, contiguous_strides(t.shape), 0, str(self.path), "", 0, ()
        )

    def tensor(self, name: str) -> torch.Tensor:
        """The logical tensor: a zero-copy view of the mapped file when it is stored in one
        chunk, else assembled from its chunks into a new tensor of its whole size."""
        try:
            t = self._logical(self._entries[name])
        except KeyError:
            self._missing(name)
        return self._assemble(t)

    def tensor_rows(
        self, name: str, start: int, stop: int, out: Any = None
    ) -> torch.Tensor:
        """Rows [start, stop) of a tensor (``convert`` streams a tensor in such pieces): a
        zero-copy view of the mapped file when one chunk holds them whole and its bytes are
        aligned for the dtype, else those rows assembled from the chunks that hold them, in
        a new tensor or in ``out(shape, dtype)``'s."""
        try:
            t = self._logical(self._entries[name])
        except KeyError:
            self._missing(name)
        for archive, offsets, sizes in t.chunks:
            if (
                sizes
                and offsets[0] <= start
                and stop <= offsets[0] + sizes[0]
                and tuple(sizes[1:]) == t.shape[1:]
            ):
                raw = self._chunk_bytes(archive, start - offsets[0], stop - offsets[0])
                if raw is not None and raw.data_ptr() % t.dtype.itemsize == 0:
                    return raw.view(t.dtype).view(stop - start, *sizes[1:])
                break
        into = None if out is None else out((stop - start, *t.shape[1:]), t.dtype)
        return assemble(
            t, lambda archive: self._tensor_at(archive, 0)[0], self._chunk_bytes, (start, stop),
            into,
        )  # fmt: skip

    def row_breaks(self, name: str) -> list[int]:
        """The rows where a tensor's chunks start (and its row count): pieces cut there can
        be read in place."""
        try:
            t = self._logical(self._entries[name])
        except KeyError:
            self._missing(name)
        if not t.shape:
            return []
        return sorted({b for _, o, s in t.chunks if s for b in (o[0], o[0] + s[0])})

    def chunks(self, name: str) -> list[tuple[tuple[int, ...], tuple[int, ...], str]]:
        """(offsets, sizes, .distcp file) of each stored chunk of a tensor."""
        try:
            t = self._logical(self._entries[name])
        except KeyError:
            self._missing(name)
        return [(o, s, self._file_names[a]) for a, o, s in t.chunks]

    def unloadable(self) -> dict[str, str]:
        return dict(self._unloadable or {})

    def tensor_paths(self) -> list[tuple[str, ...]]:
        """The saved state dict path (``planner_data``) of every tensor, whatever the pick;
        list indices as strings."""
        return [t.path for t in self._layout.tensors]

    def value_paths(self) -> list[tuple[str, ...]]:
        """The saved state dict path of every non-tensor entry."""
        return [v.path for v in self._layout.values]

    def value_at(self, path: Sequence[str]) -> Any:
        """One non-tensor entry by its path (``("optim", "param_groups", "0", "params")``):
        unlike a dotted name, a path cannot confuse an FQN's dots with the nesting."""
        for v in self._layout.values:
            if v.path == tuple(path):
                return self._layout.read_value(v)
        raise KeyError(f"{self.path}: no value at {tuple(path)}")

    def value_keys(self) -> list[str]:
        """Dotted paths of the non-tensor entries (step counters, param groups, bytes)."""
        return [".".join(v.path) for v in self._layout.values]

    def value(self, name: str) -> Any:
        """One non-tensor entry by its dotted path (``"optim.param_groups.0.lr"``): plain
        data as the restricted pickle VM reads it (objects of other classes as
        ``{"__object__": ...}`` placeholders), or ``bytes`` for an ``io.BytesIO`` value."""
        for v in self._layout.values:
            if ".".join(v.path) == name:
                return self._layout.read_value(v)
        raise KeyError(f"{self.path}: no value named {name!r}")

    @property
    def metadata(self) -> dict[str, Any]:
        """Every non-tensor entry, nested by its path in the saved state dict."""
        out: dict[str, Any] = {}
        for v in self._layout.values:
            node = out
            for part in v.path[:-1]:
                node = node.setdefault(part, {})
            node[v.path[-1]] = self._layout.read_value(v)
        return out

    def __repr__(self) -> str:
        picked = f", key={'.'.join(self.prefix)!r}" if self.prefix else ""
        return f"<fastckpt.Checkpoint {str(self.path)!r} dcp, {len(self)} tensors{picked}>"
