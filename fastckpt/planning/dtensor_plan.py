"""Loading DTensor models: each rank plans and copies only its own shard.

``planning.build`` hands the transfers into DTensors here (whole tensors, ``rows``
cuts, conversion pieces, chunks alike). Each becomes one transfer per box of its
local shard it meets (fastckpt.planning.dtensor_geometry, transfers.to_shard): the
destination is a box of ``to_local()``, the source the matching cut of the source
view, so the copy engine reads exactly those bytes (``exact_reads``: no
readahead). Every rank computes its plan from metadata alone.

Before anything is written the ranks agree (``agree``, one small all_gather):
if any rank would refuse (strict problems, an error while planning, or a
checkpoint that differs from rank 0's), every rank refuses and none writes.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fastckpt.errors import CheckpointError
from fastckpt.planning.dtensor_geometry import dtensor_shard
from fastckpt.planning.mapping import RowSelection
from fastckpt.planning.transfers import Transfer, View, nbytes, to_boxes, to_shard


def _dtensor_class() -> type | None:
    # Without torch.distributed.tensor imported no DTensor exists; importing it
    # here would cost every plain load a second or more.
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def dtensors_possible() -> bool:
    return _dtensor_class() is not None


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def any_dtensor(tensors: Iterable[Any]) -> bool:
    """Whether any of the tensors is a DTensor; one check per distinct type (30k tensors)."""
    cls = _dtensor_class()
    return cls is not None and any(issubclass(k, cls) for k in set(map(type, tensors)))


def has_dtensors(model: nn.Module) -> bool:
    return any_dtensor(model.parameters()) or any_dtensor(model.buffers())


def shard_transfers(
    transfers: list[Transfer], tensor: Any, name: str, ckpt: Any
) -> list[Transfer]:
    """Transfers into the global DTensor ``tensor`` as transfers into this rank's local
    shard (fastckpt.planning.transfers.to_shard), reading the stored views of ``ckpt``."""
    shard = dtensor_shard(name, tensor)
    return [
        local
        for t in transfers
        for boxed in to_boxes(t)
        for local in to_shard(boxed, shard, stored_view(ckpt, boxed.handle))
    ]


def whole_source(
    view: tuple[Any, tuple[int, ...], tuple[int, ...], int], rows: RowSelection | None
) -> tuple[View | None, RowSelection | None]:
    """The source view of a whole-tensor copy with ``rows``: a range is part of the view, an
    index list stays a row selection."""
    _, shape, strides, offset = view
    if rows is None or not shape or rows.index is not None:
        return None, rows
    n = rows.rows(shape[0])
    return (offset + rows.start * strides[0], (n, *shape[1:]), tuple(strides)), None


def bytes_per_rank(p: Any) -> dict[int, int]:
    """Bytes each global rank reads from the file under this plan, from metadata alone:
    every rank's cut of the transfers into DTensors (at each mesh coordinate) plus the
    plain tensors, which every rank reads whole."""
    from fastckpt.planning.dtensor_geometry import pieces_for

    assert p._model is not None
    ckpt = p.checkpoint
    plain = sum(e.nbytes for e in p.entries()) + sum(
        nbytes(t, stored_view(ckpt, t.handle), itemsize(ckpt, t.handle))
        for t in p.pieces
        if not is_dtensor(p._model.tensors[t.group])
    )
    out: dict[int, int] = {}
    for group, transfers in p._global_transfers.items():
        dt = p._model.tensors[group]
        ranks = dt.device_mesh.mesh
        for coordinate in itertools.product(*(range(n) for n in ranks.shape)):
            shard = pieces_for("", tuple(dt.shape), tuple(ranks.shape), coordinate, dt.placements)
            rank = int(ranks[coordinate])
            out[rank] = out.get(rank, 0) + sum(
                nbytes(local, stored_view(ckpt, local.handle), itemsize(ckpt, local.handle))
                for t in transfers
                for boxed in to_boxes(t)
                for local in to_shard(boxed, shard, stored_view(ckpt, boxed.handle))
            )
    return {rank: n + plain for rank, n in sorted(out.items())}


def itemsize(ckpt: Any, handle: int) -> int:
    return int(ckpt._handle_view(handle)[0].itemsize)


def stored_view(ckpt: Any, handle: int) -> View:
    """(storage offset, shape, strides) of the stored tensor ``handle`` names."""
    _, shape, strides, offset = ckpt._handle_view(handle)
    return offset, tuple(shape), tuple(strides)


def fresh_local(t: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """A new DTensor like ``t`` (mesh, placements, global shape) with empty local storage."""
    from torch.distributed.tensor import DTensor

    local = torch.empty(t.to_local().shape, dtype=dtype, device=device)
    return DTensor.from_local(
        local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
    )


# -- agreement ---------------------------------------------------------------------------
_OK, _STRICT, _ERROR = 0, 1, 2


def fingerprint(ckpt: Any) -> int:
    """Sizes, names, dtypes and shapes of the checkpoint's files, hashed to 63 bits."""
    h = hashlib.blake2b(digest_size=8)
    for index in ckpt._core_indexes:
        h.update(f"{index.file_size}\0{len(index)}\0".encode())
        for name, shape in zip(index.names(), index.shapes(), strict=True):
            h.update(f"{name}\0{shape}\0".encode())
    return int.from_bytes(h.digest(), "little") >> 1


def agree(p: Any, error: BaseException | None, strict: bool, group: Any = None) -> None:
    """Every rank of ``group`` (None: the world) calls this once before writing; it
    returns on every rank or raises on every rank. Raises this rank's own error (or
    StrictLoadError) where it has one."""
    import torch.distributed as dist

    status = _ERROR if error is not None else _STRICT if strict and p.problems else _OK
    mark = fingerprint(p.checkpoint) if error is None else -1
    device = "cpu"
    if dist.get_backend(group) == "nccl":
        device = f"cuda:{torch.cuda.current_device()}"
    mine = torch.tensor([status, mark], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    ranks = dist.get_process_group_ranks(group) if group is not None else range(len(every))
    table = {r: tuple(int(v) for v in t.tolist()) for r, t in zip(ranks, every, strict=True)}
    rank = dist.get_rank()
    if error is not None:
        raise error
    refusing = [r for r, (s, _) in table.items() if s != _OK]
    if status == _STRICT:
        return  # load_into raises this rank's StrictLoadError with its report
    if refusing:
        reasons = {_STRICT: "the checkpoint does not fit its shard", _ERROR: "an error"}
        listed = ", ".join(f"rank {r} ({reasons[table[r][0]]})" for r in refusing)
        raise CheckpointError(
            f"{p.path}: {listed} refused the load, so every rank refuses; nothing was loaded "
            f"on any rank (this is rank {rank})"
        )
    first = next(iter(table))
    different = [r for r, (_, m) in table.items() if m != table[first][1]]
    if different:
        raise CheckpointError(
            f"{p.path}: the checkpoint that rank(s) {different} opened differs from rank "
            f"{first}'s "
            "(file sizes, tensor names or shapes); every rank must load the same checkpoint; "
            f"nothing was loaded on any rank (this is rank {rank})"
        )
