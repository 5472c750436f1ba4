"""Which part of a global tensor a DTensor's local shard holds, from metadata alone.

A DTensor's local tensor is, along each tensor dimension independently, a list
of global indices: every placement ``Shard(d)`` (or FSDP2's ``_StridedShard(d)``
when it is combined with tensor parallelism) on mesh dimension ``m`` keeps the
rank's chunk of that list, in mesh-dimension order, with ``torch.chunk``'s
rounding (uneven sizes give the last ranks fewer rows, or none). ``Replicate``
keeps it all. Each dimension's list is stored as runs of consecutive global
indices, and the cartesian product of the runs gives ``ShardBox``es: a box of the
local tensor and the box of the global tensor it holds, so that copying every
piece reproduces ``distribute_tensor(global, mesh, placements).to_local()``.

Nothing here communicates: every rank computes its pieces from the global
shape, the mesh shape, its coordinate and the placements.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from fastckpt.errors import CheckpointError

Box = tuple[tuple[int, int], ...]  # (start, length) per dimension


class ShardBox(NamedTuple):
    """``local`` (a box of the rank's local tensor) holds ``global_box`` of the global tensor."""

    local: Box
    global_box: Box


class LocalShard(NamedTuple):
    """A rank's local shard: its shape and the pieces that fill it (none when it is empty)."""

    shape: tuple[int, ...]
    boxes: list[ShardBox]


class _Run(NamedTuple):
    start: int  # first global index
    length: int


def _chunk(n: int, chunks: int, index: int) -> tuple[int, int]:
    """``torch.chunk(range(n), chunks)[index]`` as (start, length); empty past the last chunk."""
    size = -(-n // chunks)
    start = min(index * size, n)
    return start, max(0, min(size, n - start))


def _take(runs: list[_Run], start: int, length: int) -> list[_Run]:
    """Positions [start, +length) of the concatenated runs."""
    out: list[_Run] = []
    pos = 0
    for run in runs:
        lo, hi = max(start, pos), min(start + length, pos + run.length)
        if lo < hi:
            out.append(_Run(run.start + lo - pos, hi - lo))
        pos += run.length
    return out


def _merge(runs: list[_Run]) -> list[_Run]:
    out: list[_Run] = []
    for run in runs:
        if out and out[-1].start + out[-1].length == run.start:
            out[-1] = _Run(out[-1].start, out[-1].length + run.length)
        elif run.length:
            out.append(run)
    return out


def _total(runs: list[_Run]) -> int:
    return sum(r.length for r in runs)


def _placement_kind(placement: Any) -> str:
    """'replicate', 'shard' or 'strided', or '' for a placement this module cannot map."""
    from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

    if isinstance(placement, _StridedShard):
        return "strided"
    if isinstance(placement, Shard):
        return "shard"
    if isinstance(placement, Replicate):
        return "replicate"
    return ""


def pieces_for(
    name: str,
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    coordinate: Sequence[int] | None,
    placements: Sequence[Any],
) -> LocalShard:
    """The local shard at mesh ``coordinate`` (None: a rank outside the mesh
    holds nothing). ``name`` is the tensor's name, for errors."""
    ndim = len(global_shape)
    if len(placements) != len(mesh_shape):
        raise CheckpointError(
            f"{name!r}: {len(placements)} placements for a {len(mesh_shape)}-D device mesh"
        )
    runs = [[_Run(0, int(n))] if n else [] for n in global_shape]
    for mesh_dim, placement in enumerate(placements):
        kind = _placement_kind(placement)
        if not kind:
            raise CheckpointError(
                f"{name!r} is a DTensor with placement {placement!r} on mesh dimension {mesh_dim}, "
                "which fastckpt cannot load into (only Shard, Replicate and FSDP2's strided "
                "sharding have a fixed place in the checkpoint)"
            )
        if kind == "replicate":
            continue
        dim = placement.dim if placement.dim >= 0 else placement.dim + ndim
        if not 0 <= dim < ndim:
            raise CheckpointError(f"{name!r}: {placement} names a dimension of a {ndim}-D tensor")
        if coordinate is None:
            continue
        chunks, index, have = int(mesh_shape[mesh_dim]), int(coordinate[mesh_dim]), runs[dim]
        if kind == "shard":
            runs[dim] = _take(have, *_chunk(_total(have), chunks, index))
            continue
        # _StridedShard: the list is cut into split_factor parts first, each part
        # into `chunks`, and the rank keeps its chunk of every part, in order.
        split = int(placement.split_factor)
        kept: list[_Run] = []
        for part in range(split):
            part_runs = _take(have, *_chunk(_total(have), split, part))
            kept += _take(part_runs, *_chunk(_total(part_runs), chunks, index))
        runs[dim] = kept
    if coordinate is None:
        return LocalShard((0,), [])
    runs = [_merge(r) for r in runs]
    shape = tuple(_total(r) for r in runs)
    if any(not r for r in runs):
        return LocalShard(shape, [])
    # Per dimension: (local start, run) for each run, local starts being running sums.
    placed = [[(sum(r.length for r in rs[:k]), run) for k, run in enumerate(rs)] for rs in runs]
    pieces = []
    for combo in itertools.product(*placed):
        local = tuple((at, run.length) for at, run in combo)
        pieces.append(ShardBox(local, tuple((run.start, run.length) for _, run in combo)))
    return LocalShard(shape, pieces)


def dtensor_shard(name: str, dtensor: Any) -> LocalShard:
    """This rank's local shard of ``dtensor``, checked against its local tensor."""
    local = dtensor._local_tensor
    if type(local) is not torch.Tensor or local.layout != torch.strided:
        raise CheckpointError(
            f"{name!r} is a DTensor whose local tensor is a {type(local).__name__} "
            f"({local.layout}), not a plain strided tensor: fastckpt cannot load into it"
        )
    mesh = dtensor.device_mesh
    if mesh.ndim != len(dtensor.placements):
        raise CheckpointError(f"{name!r}: the DTensor's placements do not match its mesh")
    shard = pieces_for(
        name, tuple(dtensor.shape), tuple(mesh.shape), mesh.get_coordinate(), dtensor.placements
    )
    if tuple(local.shape) != shard.shape and (shard.boxes or local.numel() != 0):
        raise CheckpointError(
            f"{name!r}: the local shard has shape {tuple(local.shape)}, but its placements "
            f"{tuple(dtensor.placements)} on a mesh of shape {tuple(mesh.shape)} give "
            f"{shard.shape} for global shape {tuple(dtensor.shape)}"
        )
    return shard


def narrow(tensor: torch.Tensor, box: Box) -> torch.Tensor:
    """``tensor`` narrowed to ``box`` (a view)."""
    for dim, (start, length) in enumerate(box):
        if start != 0 or length != tensor.shape[dim]:
            tensor = tensor.narrow(dim, start, length)
    return tensor
