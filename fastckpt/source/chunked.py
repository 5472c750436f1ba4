"""Checkpoints whose tensors may be stored in pieces: a DCP directory (chunks, one per
saving rank's box) and a DeepSpeed ZeRO folder (runs of flat partitions).

Such a tensor has a logical handle, ``LOGICAL + k``, above every stored tensor's
``file << 32 | tensor``; ``_chunks(handle)`` lists its pieces (the contract in
checkpoint.py). The loader sees it through the same handle methods as a stored tensor:
its dtype and global shape, row-major; its bytes are only ever read piece by piece.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastckpt.errors import CheckpointError
from fastckpt.source.checkpoint import Checkpoint, Opening
from fastckpt.source.urls import is_url

LOGICAL = 1 << 62


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides = []
    step = 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


class ChunkedCheckpoint(Checkpoint):
    """The handle methods for logical tensors; a source says what they are."""

    def _opening_of(self, path: Any, opening: Any, mark: str, what: str) -> tuple[Path, Any, Any]:
        """The path, the opening and the remote source (None: a local one) of the
        checkpoint being opened: at a URL, the opening Checkpoint.__new__ made (or a new
        one), refused where it holds another kind of checkpoint than ``what`` (its source
        sets ``mark``)."""
        made = self.__dict__.pop("_made_opening", None)  # by Checkpoint.__new__, for a URL
        opening = opening or made
        if opening is None and is_url(path):
            opening = Opening(path)
        remote = getattr(opening, "remote", None)
        if remote is not None and not getattr(remote, mark, False):
            raise CheckpointError(f"{path}: not {what}")
        return (remote.path if remote is not None else Path(path)), opening, remote

    _pieces = "chunks"  # what a logical tensor is stored as, for the refusal below

    def _logical_meta(self, handle: int) -> tuple[torch.dtype, tuple[int, ...]]:
        """Dtype and global shape of the logical tensor ``handle``."""
        raise NotImplementedError

    def _logical_file(self) -> str:
        """What a logical tensor's file is named as (its pieces lie in several files)."""
        return str(self.path)

    def _has_chunks(self) -> bool:
        return True

    def _handle_shape(self, handle: int) -> tuple[int, ...]:
        if handle >= LOGICAL:
            return self._logical_meta(handle)[1]
        return super()._handle_shape(handle)

    def _handle_view(
        self, handle: int
    ) -> tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int]:
        if handle >= LOGICAL:
            dtype, shape = self._logical_meta(handle)
            return dtype, shape, contiguous_strides(shape), 0
        return super()._handle_view(handle)

    def _handle_file(self, handle: int) -> str:
        return self._logical_file() if handle >= LOGICAL else super()._handle_file(handle)

    def _handle_storage(self, handle: int) -> tuple[int, int]:
        if handle >= LOGICAL:
            raise CheckpointError(
                f"{self.path}: a {self.format} tensor is stored as {self._pieces}; read them "
                "(_chunks), not it"
            )
        return super()._handle_storage(handle)
