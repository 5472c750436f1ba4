"""Shard geometry (fastckpt.planning.dtensor_geometry) against torch's own DTensor splitting.

Single process: torch's fake process group lets every rank of a mesh be built in
turn, and ``distribute_tensor(..., src_data_rank=None)`` splits locally with no
communication, so its ``to_local()`` is the ground truth each rank must rebuild.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import _StridedShard
from torch.testing._internal.distributed.fake_pg import FakeStore

from fastckpt import CheckpointError
from fastckpt.planning.dtensor_geometry import (
    dtensor_shard,
    narrow,
    pieces_for,
)


@contextlib.contextmanager
def fake_rank(rank: int, world: int) -> Iterator[None]:
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def rebuild(global_tensor: torch.Tensor, shard) -> torch.Tensor:
    out = torch.full(shard.shape, -1, dtype=global_tensor.dtype)
    for piece in shard.boxes:
        narrow(out, piece.local).copy_(narrow(global_tensor, piece.global_box))
    return out


def check_all_ranks(shape, mesh_shape, placements) -> None:
    world = 1
    for n in mesh_shape:
        world *= n
    g = torch.arange(torch.Size(shape).numel()).reshape(shape)
    for rank in range(world):
        with fake_rank(rank, world):
            mesh = init_device_mesh("cpu", mesh_shape)
            want = distribute_tensor(g, mesh, placements, src_data_rank=None)
            shard = dtensor_shard("w", want)
            pieces = shard.boxes
            got = rebuild(g, shard)
            local = want.to_local()
            assert got.shape == local.shape, (rank, pieces)
            assert torch.equal(
                got.reshape(-1).view(torch.uint8), local.reshape(-1).view(torch.uint8)
            )
            if not any(isinstance(p, _StridedShard) for p in placements):
                # Plain Shard/Replicate: one box, at torch's own global offset.
                # (normalized: it does not resolve negative dims itself)
                plain = [Shard(p.dim % g.ndim) if isinstance(p, Shard) else p for p in placements]
                lshape, offset = compute_local_shape_and_global_offset(g.shape, mesh, plain)
                assert tuple(lshape) == tuple(local.shape)
                if local.numel():
                    assert len(pieces) == 1
                    assert tuple(s for s, _ in pieces[0].global_box) == tuple(offset)


CASES = [
    ((8, 6), (4,), [Shard(0)]),
    ((8, 6), (4,), [Shard(1)]),
    ((7, 5), (4,), [Shard(0)]),  # uneven: 2, 2, 2, 1
    ((5, 3), (4,), [Shard(0)]),  # uneven with an empty last shard: 2, 2, 1, 0
    ((2, 3), (4,), [Shard(0)]),  # two empty shards
    ((3, 10), (4,), [Shard(-1)]),
    ((6,), (2,), [Replicate()]),
    ((8, 6), (2, 2), [Shard(0), Shard(1)]),  # dp x tp on different dims
    ((8, 6), (2, 2), [Shard(0), Shard(0)]),  # both on dim 0
    ((8, 6), (2, 2), [Replicate(), Shard(1)]),
    ((8, 6), (2, 2), [Shard(1), Replicate()]),
    ((8, 6), (2, 2), [_StridedShard(0, split_factor=2), Shard(0)]),  # FSDP2 + colwise TP
    ((7, 6), (2, 2), [_StridedShard(0, split_factor=2), Shard(0)]),  # uneven strided
    ((8, 6), (2, 2), [Shard(0), Shard(1)]),  # FSDP2 + rowwise TP
    ((9, 4), (1, 3), [_StridedShard(0, split_factor=3), Shard(0)]),
    ((4, 6, 5), (2, 2), [Shard(2), Shard(1)]),
    ((), (2,), [Replicate()]),  # a scalar
    ((0, 4), (2,), [Shard(0)]),
]


@pytest.mark.parametrize(
    ("shape", "mesh_shape", "placements"),
    CASES,
    ids=[f"{s}-{m}-{'.'.join(map(str, p))}" for s, m, p in CASES],
)
def test_pieces_rebuild_distribute_tensor(shape, mesh_shape, placements):
    check_all_ranks(shape, mesh_shape, placements)


def placement_strategy(ndim: int):
    dims = st.integers(-ndim, ndim - 1)
    return st.one_of(
        st.just(Replicate()),
        dims.map(Shard),
        st.builds(lambda d, sf: _StridedShard(d % ndim, split_factor=sf), dims, st.integers(1, 3)),
    )


@st.composite
def layouts(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=ndim, max_size=ndim)))
    mesh_shape = draw(st.sampled_from([(2,), (3,), (2, 2), (1, 3), (3, 1), (2, 1)]))
    placements = [draw(placement_strategy(ndim)) for _ in mesh_shape]
    return shape, mesh_shape, placements


@settings(max_examples=25, deadline=None)
@given(layouts())
def test_pieces_property(layout):
    check_all_ranks(*layout)


def test_partial_is_refused_by_name():
    with pytest.raises(
        CheckpointError, match=r"'lm_head.weight' is a DTensor with placement .*Partial"
    ):
        pieces_for("lm_head.weight", (4, 4), (2,), (0,), [Partial()])


def test_local_tensor_that_does_not_match_is_refused():
    with fake_rank(0, 2):
        mesh = init_device_mesh("cpu", (2,))
        d = distribute_tensor(torch.zeros(6, 4), mesh, [Shard(0)], src_data_rank=None)
        d._local_tensor = torch.zeros(2, 4)  # three rows expected
        with pytest.raises(CheckpointError, match=r"'w': the local shard has shape \(2, 4\)"):
            dtensor_shard("w", d)
