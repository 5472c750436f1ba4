"""Lazy checkpoint index: ``fastckpt.open(path)``.

Reads only metadata (through the C++ core); tensor bytes stay in the mapped
file until ``tensor(name)`` or ``load_into`` touches them.

How the state dict is picked from a torch file (unless ``key=`` is given):

1. Tensors anywhere in nested dicts/lists/tuples get dotted names built from
   the container keys (``model.encoder.layers.0.fc1.weight``,
   ``optimizer.state.3.exp_avg``); ``all_keys()`` lists them all.
2. Starting at the top, while the current container holds no tensor directly:
   if exactly one of its children that contain tensors is named like a state
   dict (``state_dict``, ``model``, ``module``, ``weights``, ...; see
   ``STATE_DICT_KEYS``), descend into it; else, at the top only, if exactly one
   child contains tensors at all, descend into it; else stop.
3. ``keys()`` are the names below the container reached, without its prefix.

A tensor saved on its own (``torch.save(tensor)``) has the name ``""``. A
whole pickled ``nn.Module`` names its tensors as ``state_dict()`` would.
Objects of other classes (an ``argparse.Namespace``, ...) are never called:
they appear in ``metadata`` as ``{"__object__": class, "state": ...}``.

safetensors files are flat: no pick is made. ``key="model"`` (or a dotted
path of container keys, or a tuple of them) picks explicitly; ``key=""``
exposes the whole tree.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

import torch

import fastckpt._core as _core
from fastckpt.dtypes import TORCH_DTYPES, to_torch
from fastckpt.errors import CheckpointError
from fastckpt.source.urls import is_url

if TYPE_CHECKING:
    from fastckpt.source.remote import RemoteOpening
    from fastckpt.source.remote_dcp import RemoteDcp
    from fastckpt.source.remote_deepspeed import RemoteZero

STATE_DICT_KEYS = (
    "state_dict",
    "model",
    "module",
    "weights",
    "model_state_dict",
    "model_state",
    "net",
    "network",
    "params",
)

# File names tried, in order, when a folder is opened (Hugging Face layout).
FOLDER_CANDIDATES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

PathLike = str | os.PathLike[str]


class TensorInfo(NamedTuple):
    """Metadata of one tensor, without reading its bytes.

    A named tuple rather than a dataclass: ``info()`` is called once per tensor
    when listing a checkpoint, and building a tuple is several times cheaper.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    strides: tuple[int, ...]
    storage_offset: int  # elements
    file: str
    storage: str  # storage key within the file
    file_offset: int  # byte offset of the storage in the file
    shares_storage_with: tuple[str, ...]  # other tensors viewing the same storage

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for dim, stride in zip(reversed(self.shape), reversed(self.strides), strict=True):
            if dim != 1 and stride != expected:
                return False
            expected *= dim
        return True


class Chunk(NamedTuple):
    """One stored piece of a logical tensor (a DCP chunk): ``handle`` names an ordinary stored
    tensor of shape ``sizes`` that holds the box [offsets, offsets + sizes) of it. With
    ``storage_offset`` (a DeepSpeed flat partition), the box is instead the contiguous run of
    ``handle``'s storage that starts at that element."""

    handle: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    storage_offset: int | None = None


_new_tuple = tuple.__new__


def resolve_files(path: PathLike) -> list[Path]:
    """The checkpoint files behind ``path``: itself, a folder's model file, or an index's shards."""
    p = Path(path)
    if p.is_dir():
        for name in FOLDER_CANDIDATES:
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise CheckpointError(
                f"{p}: folder holds none of {', '.join(FOLDER_CANDIDATES)}"
            )
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such checkpoint file or folder")
    if p.name.endswith(".index.json"):
        return _shards_from_index(p)
    return [p]


def _shards_from_index(index_path: Path) -> list[Path]:
    try:
        doc = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: cannot read shard index: {e}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()
    ):
        raise CheckpointError(f"{index_path}: shard index has no 'weight_map' of file names")
    shards: list[Path] = []
    for name in dict.fromkeys(weight_map.values()):  # first-seen order, no duplicates
        shard = index_path.parent / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{index_path}: shard name {name!r} leaves the folder")
        if not shard.is_file():
            raise CheckpointError(f"{index_path}: shard {name!r} is missing")
        shards.append(shard)
    return shards


def _split_key(key: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(key, str):
        return tuple(key.split(".")) if key else ()
    return tuple(key)


def pick_state_dict(paths: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    """The container path the state dict lives at (see the module docstring)."""
    prefix: tuple[str, ...] = ()
    live = list(paths)
    for depth in range(8):
        if not live or any(len(p) == depth + 1 for p in live):
            break
        children = list(dict.fromkeys(p[depth] for p in live))
        known = [c for c in children if c in STATE_DICT_KEYS]
        if len(known) == 1:
            chosen = known[0]
        elif len(children) == 1 and depth == 0:
            chosen = children[0]
        else:
            break
        prefix += (chosen,)
        live = [p for p in live if p[depth] == chosen]
    return prefix


class Opening:
    """A checkpoint whose files are being indexed on C++ threads, without the GIL.

    ``Checkpoint(path, _opening=...)`` waits for them; until then the caller is
    free to do other Python work (load_into walks the model meanwhile).
    """

    def __init__(self, path: PathLike, *, exact_reads: bool = False):
        # exact_reads: parse with no readahead, so a rank reading its shard
        # fetches the headers' pages and nothing around them.
        self.remote: RemoteOpening | RemoteDcp | RemoteZero | None = None
        self.exact_reads = exact_reads
        if is_url(path):  # s3://, gs://, az://, http(s)://: headers fetched, then indexed
            from fastckpt.source.remote import open_url  # with the first URL only

            self.remote = open_url(str(path))
            self.path: Path = self.remote.path
            self.files: list[Path] = list(self.remote.paths)
            return
        self.path = Path(path)
        if _training_source(self.path) is not None:  # opened when the Checkpoint is made
            self.files = []
            self._pending = None
            return
        self.files = resolve_files(path)
        self._pending = _core.start_open(
            [str(f) for f in self.files], min(8, os.cpu_count() or 1), exact_reads
        )

    def wait(self) -> list[_core.FileIndex]:
        if self.remote is not None:
            return self.remote.wait()
        return [] if self._pending is None else self._pending.wait()


def _training_source(path: Path) -> type[Checkpoint] | None:
    """The Checkpoint class of a training checkpoint folder: a torch.distributed.checkpoint
    directory (source/dcp.py) or a DeepSpeed ZeRO folder (source/deepspeed.py); else None."""
    if not path.is_dir():  # a file: spare the imports on every plain load
        return None
    # Both modules import this one: imported when asked.
    from fastckpt.source import dcp, deepspeed

    if dcp.is_dcp_dir(path):
        return dcp.DcpCheckpoint
    # A Hugging Face Trainer's checkpoint-N/ holds its model files beside DeepSpeed's
    # latest + global_stepN/: the model files win there, as before; the tag folder
    # (checkpoint-N/global_stepN) opens the ZeRO state.
    if deepspeed.is_deepspeed_dir(path) and not any(
        (path / name).is_file() for name in FOLDER_CANDIDATES
    ):
        return deepspeed.DeepSpeedCheckpoint
    return None


class Checkpoint:
    """A checkpoint opened for reading. Use as a context manager or call ``close()``.

    ``Checkpoint(path)`` of a torch.distributed.checkpoint directory is a
    ``source.dcp.DcpCheckpoint``, of a DeepSpeed ZeRO folder a
    ``source.deepspeed.DeepSpeedCheckpoint``: their tensors are stored as chunks (``_chunks``).
    """

    def __new__(
        cls,
        path: PathLike,
        *,
        key: str | Sequence[str] | None = None,
        _opening: Opening | None = None,
    ) -> Checkpoint:
        if cls is Checkpoint and is_url(path):
            # What a URL holds is known once it is opened: the opening goes to __init__.
            opening = _opening if _opening is not None else Opening(path)
            if getattr(opening.remote, "is_dcp", False):
                from fastckpt.source.dcp import DcpCheckpoint

                made: Checkpoint = object.__new__(DcpCheckpoint)
            elif getattr(opening.remote, "is_deepspeed", False):
                from fastckpt.source.deepspeed import DeepSpeedCheckpoint

                made = object.__new__(DeepSpeedCheckpoint)
            else:
                made = object.__new__(cls)
            made._made_opening = opening
            return made
        if cls is Checkpoint:
            source = _training_source(Path(path))
            if source is not None:
                return object.__new__(source)
        return object.__new__(cls)

    # set for a URL's checkpoint (source.remote, source.remote_dcp, source.remote_deepspeed)
    _remote: RemoteOpening | RemoteDcp | RemoteZero | None = None
    _made_opening: Opening | None = None  # by __new__, for __init__

    def __init__(
        self,
        path: PathLike,
        *,
        key: str | Sequence[str] | None = None,
        _opening: Opening | None = None,
    ):
        made = self.__dict__.pop("_made_opening", None)
        opening = _opening or made or Opening(path)
        self.path = opening.path
        self.files: list[Path] = opening.files
        self._indexes = opening.wait()
        # A remote checkpoint's indexes are over memory files holding only the bytes
        # fetched so far: loads and tensor() fetch what they read (source.remote).
        self._remote = opening.remote
        self._buffers: dict[int, torch.Tensor] = {}
        self.format = self._indexes[0].format
        self._file_names = [str(f) for f in self.files]
        flat = all(index.max_path_length() <= 1 for index in self._indexes)
        paths: list[list[tuple[str, ...]]] = []
        if key is not None:
            self.prefix = _split_key(key)
        elif self.format == "safetensors" or flat:
            self.prefix = ()  # nothing nested: nothing to pick
        else:
            paths = [index.paths() for index in self._indexes]
            self.prefix = pick_state_dict([p for file_paths in paths for p in file_paths])
        # name -> file index << 32 | tensor index, built when first needed: with
        # nothing picked, load_into matches a model's names in the C++ index
        # (_find_all) and a 30k-tensor listing is never made. Names must be unique
        # across shards and a pick must not be empty: both are checked now.
        self._all_map: dict[str, int] | None = None
        self._entries_map: dict[str, int] | None = None
        if len(self._indexes) > 1:
            self._all_map = self._index_all()
        if self.prefix:
            self._entries_map = self._picked(paths or [index.paths() for index in self._indexes])
        self._shared: list[dict[int, list[str]]] | None = None
        self._shape_lists: list[list[tuple[int, ...]]] | None = None
        self._unloadable: dict[str, str] | None = None

    @property
    def _all(self) -> dict[str, int]:
        if self._all_map is None:
            self._all_map = self._index_all()
        return self._all_map

    @property
    def _entries(self) -> dict[str, int]:
        if self._entries_map is None:
            self._entries_map = self._all  # nothing picked (else built in __init__)
        return self._entries_map

    def _index_all(self) -> dict[str, int]:
        # Plain ints and C-level zips: a listing of 30k tensors should cost
        # milliseconds and leave the cyclic garbage collector nothing to scan.
        names = [index.names() for index in self._indexes]
        out: dict[str, int] = {}
        for fi, file_names in enumerate(names):
            before = len(out)
            start = fi << 32
            out.update(zip(file_names, range(start, start + len(file_names)), strict=True))
            if len(out) != before + len(file_names):
                self._raise_duplicate(names, fi)
        return out

    def _picked(self, paths: list[list[tuple[str, ...]]]) -> dict[str, int]:
        n = len(self.prefix)
        out: dict[str, int] = {}
        for fi, file_paths in enumerate(paths):
            for ti, p in enumerate(file_paths):
                if p[:n] == self.prefix and len(p) > n:
                    out[".".join(p[n:])] = fi << 32 | ti
        if not out:
            raise CheckpointError(f"{self.path}: no tensors under key {'.'.join(self.prefix)!r}")
        return out

    def _find_all(self, names: list[str]) -> list[int | None]:
        """Where each picked name is (file index << 32 | tensor index), or None."""
        if self._entries_map is None:  # nothing picked: the C++ maps answer
            return _core.locate(self._indexes, names)
        return list(map(self._entries_map.get, names))

    # -- the loader's view (fastckpt.plan): opaque source handles ------------------
    # A handle stands for one tensor of one file; only this class and the core read it.

    def _handles(self) -> dict[str, int]:
        """Picked name -> source handle."""
        return self._entries

    def _has_chunks(self) -> bool:
        """Whether any tensor is stored in chunks (``_chunks``); asked once per plan."""
        return False

    def _chunks(self, handle: int) -> list[Chunk] | None:
        """The stored chunks of a logical tensor; None for a tensor stored whole (every
        tensor of the formats read here)."""
        return None

    def _handle_shape(self, handle: int) -> tuple[int, ...]:
        if self._shape_lists is None:  # only rules, mismatches and refusals need them
            self._shape_lists = [index.shapes() for index in self._indexes]
        return self._shape_lists[handle >> 32][handle & 0xFFFFFFFF]

    def _handle_view(
        self, handle: int
    ) -> tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int]:
        """(dtype, shape, strides, storage offset in elements) of the tensor a handle names."""
        v = self._indexes[handle >> 32].tensor_view(handle & 0xFFFFFFFF)
        return TORCH_DTYPES[v.dtype], v.shape, v.strides, v.storage_offset

    def _handle_file(self, handle: int) -> str:
        return self._file_names[handle >> 32]

    def _handle_storage(self, handle: int) -> tuple[int, int]:
        """(position of its file in ``_core_indexes``, its storage's offset in that file)."""
        file = handle >> 32
        return file, self._indexes[file].tensor_view(handle & 0xFFFFFFFF).file_offset

    @property
    def _core_indexes(self) -> list[_core.FileIndex]:
        return self._indexes

    def _raise_duplicate(self, names: list[list[str]], upto: int) -> None:
        seen: set[str] = set()
        for file_names in names[: upto + 1]:
            for name in file_names:
                if name in seen:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} appears in more than one file"
                    )
                seen.add(name)

    # -- mapping-like surface -------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._entries)

    def all_keys(self) -> list[str]:
        """Every tensor in the file tree, with full dotted names (no pick)."""
        return list(self._all)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        if self._entries_map is None:
            return sum(map(len, self._indexes))
        return len(self._entries_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __repr__(self) -> str:
        picked = f", key={'.'.join(self.prefix)!r}" if self.prefix else ""
        where = f"{str(self.path)!r} {self.format}"
        return f"<fastckpt.Checkpoint {where}, {len(self)} tensors{picked}>"

    # -- metadata ---------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """safetensors ``__metadata__`` (merged over shards), or a torch file's plain values."""
        merged: dict[str, Any] = {}
        for index in self._indexes:
            merged.update(json.loads(index.metadata_json))
        return merged

    @property
    def nbytes(self) -> int:
        return sum(self.info(k).nbytes for k in self._entries)

    def _locations(self) -> Iterator[tuple[str, int, int]]:
        """(name, file index, tensor index) of every picked tensor."""
        for name, v in self._entries.items():
            yield name, v >> 32, v & 0xFFFFFFFF

    def _locate(self, name: str) -> tuple[int, int]:
        """(file index, tensor index) of a picked tensor."""
        try:
            v = self._entries[name]
        except KeyError:
            self._missing(name)
        return v >> 32, v & 0xFFFFFFFF

    def unloadable(self) -> dict[str, str]:
        """Tensors the file holds but fastckpt cannot represent, by picked name: what each is.

        ``{"emb.weight": "a sparse COO tensor"}``. They are not in ``keys()``;
        asking for one (``tensor()``, ``info()``) raises a CheckpointError naming it.
        """
        if self._unloadable is None:
            n = len(self.prefix)
            out: dict[str, str] = {}
            for index in self._indexes:
                for name, path, what in index.unloadable():
                    if not n:
                        out[name] = what
                    elif path[:n] == self.prefix and len(path) > n:
                        out[".".join(path[n:])] = what
            self._unloadable = out
        return self._unloadable

    def _missing(self, name: str) -> NoReturn:
        what = self.unloadable().get(name)
        if what is not None:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is present but not loadable: {what}"
            ) from None
        raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _shared_users(self) -> list[dict[int, list[str]]]:
        """Per file: storage index -> the picked tensors viewing it, for storages with several."""
        if self._shared is None:
            shared: list[dict[int, list[str]]] = [{} for _ in self._indexes]
            if self.format != "safetensors":  # safetensors tensors never share bytes
                storages = [index.tensor_storages() for index in self._indexes]
                # (file << 32 | storage) of every picked tensor: one int key per storage.
                counts = Counter(
                    storages[v >> 32][v & 0xFFFFFFFF] | (v >> 32) << 32
                    for v in self._entries.values()
                )
                several = {s for s, c in counts.items() if c > 1}
                if several:
                    for name, v in self._entries.items():
                        s = storages[v >> 32][v & 0xFFFFFFFF] | (v >> 32) << 32
                        if s in several:
                            shared[v >> 32].setdefault(s & 0xFFFFFFFF, []).append(name)
            self._shared = shared
        return self._shared

    def info(self, name: str) -> TensorInfo:
        try:
            v = self._entries[name]
        except KeyError:
            self._missing(name)
        fi = v >> 32
        index = self._indexes[fi]
        view = index.tensor_view(v & 0xFFFFFFFF)
        users = (self._shared or self._shared_users())[fi].get(view.storage)
        # tuple.__new__ directly: the generated NamedTuple.__new__ is a Python-level call.
        return _new_tuple(
            TensorInfo,
            (
                name,
                view.shape,
                TORCH_DTYPES[view.dtype],
                view.strides,
                view.storage_offset,
                self._file_names[fi],
                view.storage_key,
                view.file_offset,
                tuple(u for u in users if u != name) if users else (),
            ),
        )

    def tensor(self, name: str) -> torch.Tensor:
        """A CPU tensor: a zero-copy view of the mapped file where alignment allows, else a copy.

        The mapping is private: writing to the returned tensor never changes the file.
        """
        fi, ti = self._locate(name)
        return self._tensor_at(fi, ti)[0]

    def _handle_tensor(self, handle: int) -> tuple[torch.Tensor, bool]:
        """``tensor()`` of the tensor a handle names, and whether it views the file."""
        return self._tensor_at(handle >> 32, handle & 0xFFFFFFFF)

    def _tensor_at(self, fi: int, ti: int) -> tuple[torch.Tensor, bool]:
        view = self._indexes[fi].tensor_view(ti)
        shape, foff, nbytes = view.shape, view.file_offset, view.storage_nbytes
        dtype = to_torch(view.dtype)
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=dtype), False
        if self._remote is not None:
            # A copy: the memory file's pages are reused and released by loads.
            raw = torch.frombuffer(self._remote.fetch_tensor(fi, foff, foff + nbytes),
                                   dtype=torch.uint8)  # fmt: skip
            typed = raw.view(dtype)
            return typed.as_strided(shape, view.strides, view.storage_offset), False
        raw = self._file_bytes(fi)[foff : foff + nbytes]
        aligned = foff % dtype.itemsize == 0
        if not aligned:
            raw = raw.clone()  # unaligned storage: torch cannot view it as `dtype`
        typed = raw.view(dtype)
        # as_strided offsets count from the start of the underlying (whole-file) storage.
        offset = typed.storage_offset() + view.storage_offset
        return typed.as_strided(shape, view.strides, offset), aligned

    def _file_bytes(self, fi: int) -> torch.Tensor:
        if fi not in self._buffers:
            self._buffers[fi] = torch.frombuffer(self._indexes[fi].buffer(), dtype=torch.uint8)
        return self._buffers[fi]

    # -- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        """Drops the index; tensors already returned keep their mapping alive."""
        self._buffers.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(path: PathLike, *, key: str | Sequence[str] | None = None) -> Checkpoint:
    """Open a checkpoint file, shard index or model folder; reads metadata only.

    ``path`` may be a URL (``s3://bucket/key``, ``gs://``, ``az://``, ``https://``, a
    folder when it ends in ``/``): its headers are fetched with ranged reads."""
    return Checkpoint(path, key=key)

