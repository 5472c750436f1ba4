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

safetensors files are flat: no pick is made. ``key="model"`` (or a dotted
path of container keys, or a tuple of them) picks explicitly; ``key=""``
exposes the whole tree.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastckpt import _core
from fastckpt.dtypes import to_torch
from fastckpt.errors import CheckpointError

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

PathLike = str | os.PathLike


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Metadata of one tensor, without reading its bytes."""

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
        for dim, stride in zip(reversed(self.shape), reversed(self.strides)):
            if dim != 1 and stride != expected:
                return False
            expected *= dim
        return True


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


class Checkpoint:
    """A checkpoint opened for reading. Use as a context manager or call ``close()``."""

    def __init__(self, path: PathLike, *, key: str | Sequence[str] | None = None):
        self.path = Path(path)
        self.files: list[Path] = resolve_files(path)
        self._indexes = [_core.open_file(str(f)) for f in self.files]
        self._buffers: dict[int, torch.Tensor] = {}
        self.format = self._indexes[0].format
        # (file index, tensor index, path) of every tensor in the tree.
        entries: list[tuple[int, int, tuple[str, ...]]] = []
        for fi, index in enumerate(self._indexes):
            entries.extend((fi, ti, p) for ti, p in enumerate(index.paths()))
        if key is not None:
            self.prefix = _split_key(key)
        elif self.format == "safetensors":
            self.prefix = ()
        else:
            self.prefix = pick_state_dict([e[2] for e in entries])
        n = len(self.prefix)
        self._all: dict[str, tuple[int, int]] = {}
        self._entries: dict[str, tuple[int, int]] = {}
        for fi, ti, p in entries:
            full = ".".join(p)
            if full in self._all:
                raise CheckpointError(f"{self.path}: tensor {full!r} appears in more than one file")
            self._all[full] = (fi, ti)
            if p[:n] == self.prefix and len(p) > n:
                self._entries[".".join(p[n:])] = (fi, ti)
        if n and not self._entries:
            raise CheckpointError(f"{self.path}: no tensors under key {'.'.join(self.prefix)!r}")
        self._sharing: dict[tuple[int, int], list[str]] | None = None

    # -- mapping-like surface -------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._entries)

    def all_keys(self) -> list[str]:
        """Every tensor in the file tree, with full dotted names (no pick)."""
        return list(self._all)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __repr__(self) -> str:
        picked = f", key={'.'.join(self.prefix)!r}" if self.prefix else ""
        return f"<fastckpt.Checkpoint {str(self.path)!r} {self.format}, {len(self)} tensors{picked}>"

    # -- metadata ---------------------------------------------------------------
    @property
    def metadata(self) -> dict:
        """safetensors ``__metadata__`` (merged over shards), or the plain values of a torch file."""
        merged: dict = {}
        for index in self._indexes:
            merged.update(json.loads(index.metadata_json))
        return merged

    @property
    def nbytes(self) -> int:
        return sum(self.info(k).nbytes for k in self._entries)

    def _locate(self, name: str) -> tuple[int, int]:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _sharing_map(self) -> dict[tuple[int, int], list[str]]:
        if self._sharing is None:
            sharing: dict[tuple[int, int], list[str]] = {}
            for name, (fi, ti) in self._entries.items():
                sidx = self._indexes[fi].tensor_info(ti)[5]
                sharing.setdefault((fi, sidx), []).append(name)
            self._sharing = sharing
        return self._sharing

    def info(self, name: str) -> TensorInfo:
        fi, ti = self._locate(name)
        index = self._indexes[fi]
        _, dtype, shape, strides, soff, sidx = index.tensor_info(ti)
        skey, foff, _, _ = index.storage_info(sidx)
        if self.format == "safetensors":
            shared: tuple[str, ...] = ()
        else:
            shared = tuple(n for n in self._sharing_map()[(fi, sidx)] if n != name)
        return TensorInfo(
            name=name,
            shape=shape,
            dtype=to_torch(dtype),
            strides=strides,
            storage_offset=soff,
            file=str(self.files[fi]),
            storage=skey,
            file_offset=foff,
            shares_storage_with=shared,
        )

    def tensor(self, name: str) -> torch.Tensor:
        """A CPU tensor: a zero-copy view of the mapped file where the alignment allows, else a copy.

        The mapping is private: writing to the returned tensor never changes the file.
        """
        fi, ti = self._locate(name)
        index = self._indexes[fi]
        _, dtype_name, shape, strides, soff, sidx = index.tensor_info(ti)
        _, foff, nbytes, _ = index.storage_info(sidx)
        dtype = to_torch(dtype_name)
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=dtype)
        raw = self._file_bytes(fi)[foff : foff + nbytes]
        if foff % dtype.itemsize != 0:
            raw = raw.clone()  # unaligned storage: torch cannot view it as `dtype`
        typed = raw.view(dtype)
        # as_strided offsets count from the start of the underlying (whole-file) storage.
        return typed.as_strided(shape, strides, typed.storage_offset() + soff)

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


def open(path: PathLike, *, key: str | Sequence[str] | None = None) -> Checkpoint:  # noqa: A001
    """Open a checkpoint file, shard index or model folder; reads metadata only."""
    return Checkpoint(path, key=key)

