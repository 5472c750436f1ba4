"""Loading DTensor models: each rank plans and copies only its own shard.

``planning.build`` hands the DTensor destinations here. Each becomes one
``Piece`` per box of its local shard (fastckpt.planning.dtensor_geometry): the destination is a
narrow of ``to_local()``, the source the matching box of the checkpoint tensor's
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
from fastckpt.planning.dtensor_geometry import Piece as ShardPiece
from fastckpt.planning.dtensor_geometry import box_view, dtensor_shard, narrow
from fastckpt.planning.mapping import RowSelection
from fastckpt.report import Mismatch


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


def _local_view(box: tuple[tuple[int, int], ...]) -> Any:
    def view(t: torch.Tensor) -> torch.Tensor:
        local = t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]
        return narrow(local, box)

    return view


def source_piece(
    view: tuple[Any, tuple[int, ...], tuple[int, ...], int],
    rows: RowSelection | None,
    piece: ShardPiece,
) -> tuple[tuple[int, tuple[int, ...], tuple[int, ...]], RowSelection | None]:
    """The source view (and rows) of ``piece``'s global box, given the checkpoint tensor's
    view (dtype, shape, strides, storage offset) and the rule's row selection."""
    _, shape, strides, offset = view
    box = piece.global_box
    if rows is None or not shape:
        return box_view(offset, shape, strides, box), None
    (start, length), rest = box[0], box[1:]
    if rows.index is None:
        # A range: the box's rows are rows start + box start onward of the source.
        return box_view(offset, shape, strides, ((rows.start + start, length), *rest)), None
    # An index list: the view keeps every source row; the box picks its entries of the list.
    sub = RowSelection(index=tuple(rows.index[start : start + length]))
    return box_view(offset, shape, strides, ((0, shape[0]), *rest)), sub


def plan_shards(
    p: Any,
    ckpt: Any,
    entries: list[tuple[int, str, str, int, RowSelection | None, torch.dtype | None]],
) -> None:
    """Adds to plan ``p`` the pieces of every sharded destination.

    ``entries``: (group, model name, checkpoint name, handle, rows, via dtype) per
    DTensor with a source. A global shape that differs from the source's (after
    rows) is a mismatch, as for plain tensors.
    """
    from fastckpt.planning.load_plan import Piece

    assert p._model is not None
    for group, name, source, handle, rows, via in entries:
        dt = p._model.tensors[group]
        view = ckpt._handle_view(handle)
        src_shape = tuple(view[1])
        if rows is not None and src_shape:
            src_shape = rows.shape(src_shape)
        if src_shape != tuple(dt.shape):
            p.mismatched.append(Mismatch(name, src_shape, tuple(dt.shape)))
            continue
        shard = dtensor_shard(name, dt)
        for piece in shard.pieces:
            src_view, sub_rows = source_piece(view, rows, piece)
            p.pieces.append(
                Piece(
                    group, name, source, handle, src_view, _local_view(piece.local), sub_rows, via
                )
            )
        p.sharded.append(name)
        p.sharded_sources.append(source)
        p.sharded_groups.append(group)
        p.local_bytes += sum(_numel(pc.global_box) * view[0].itemsize for pc in shard.pieces)


def bytes_per_rank(p: Any) -> dict[int, int]:
    """Bytes each global rank reads from the file under this plan, from metadata alone:
    every rank's shards of the sharded tensors (their pieces at each mesh coordinate)
    plus the plain tensors, which every rank reads whole."""
    from fastckpt.planning.dtensor_geometry import pieces_for

    assert p._model is not None
    plain = sum(e.nbytes for e in p.entries())
    out: dict[int, int] = {}
    for name, source, group in zip(p.sharded, p.sharded_sources, p.sharded_groups, strict=True):
        dt = p._model.tensors[group]
        mesh = dt.device_mesh
        itemsize = p.checkpoint._handle_view(p.checkpoint._handles()[source])[0].itemsize
        ranks = mesh.mesh
        for coordinate in itertools.product(*(range(n) for n in ranks.shape)):
            shard = pieces_for(name, tuple(dt.shape), tuple(ranks.shape), coordinate, dt.placements)
            rank = int(ranks[coordinate])
            out[rank] = (
                out.get(rank, 0) + sum(_numel(pc.global_box) for pc in shard.pieces) * itemsize
            )
    return {rank: n + plain for rank, n in sorted(out.items())}


def _numel(box: tuple[tuple[int, int], ...]) -> int:
    n = 1
    for _, length in box:
        n *= length
    return n


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
