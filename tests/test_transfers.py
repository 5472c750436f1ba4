"""The transfer list's two operations (fastckpt.planning.transfers), against torch views:
``to_boxes`` turns a rotary permutation into transfers into boxes, ``to_shard`` cuts a
transfer into a global tensor to a DTensor's local shard. Copying the pieces must give
what the conversion's torch view gives, shard by shard (shards from dtensor_geometry,
itself checked against torch's DTensor splitting in test_sharding.py)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.tensor import Shard

from fastckpt.planning.dtensor_geometry import narrow, pieces_for
from fastckpt.planning.mapping import Assignment, Rope, RowSelection, Select, Span
from fastckpt.planning.transfers import Transfer, to_boxes, to_shard
from fastckpt.planning.views import dense_strides, source_view, target_region, target_view


def _copy(t: Transfer, source: torch.Tensor, dst: torch.Tensor) -> None:
    """What the engine does for one transfer, in torch: read the view, take rows, write."""
    assert t.src_view is not None
    offset, shape, strides = t.src_view
    piece = torch.as_strided(source.reshape(-1), shape, strides, offset)
    if t.rows is not None and t.rows.index is not None:
        piece = piece[list(t.rows.index)]
    region = t.region.of(dst) if t.region is not None else dst
    region.copy_(piece)


def _transfer(asg: Assignment, source: torch.Tensor, target_shape) -> Transfer:
    view = source_view(0, tuple(source.shape), dense_strides(source.shape), asg)
    return Transfer(0, asg.target, asg.source, 0, view, target_region("t", target_shape, asg))


@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 4), half=st.integers(1, 4), cols=st.integers(1, 3),
       to_halves=st.booleans())  # fmt: skip
def test_rotary_rows_as_boxes_equal_the_permuting_view(heads, half, cols, to_halves):
    rows = heads * 2 * half
    source = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    asg = Assignment("t", "s", rope=Rope(heads, to_halves))
    want = torch.zeros(rows, cols)
    target_view(want, asg).copy_(
        torch.as_strided(source, *source_view(0, (rows, cols), (cols, 1), asg)[1:])
    )
    got = torch.zeros(rows, cols)
    boxed = to_boxes(_transfer(asg, source, (rows, cols)))
    assert all(t.region is not None and t.region.split is None for t in boxed)
    for t in boxed:
        _copy(t, source, got)
    assert torch.equal(got, want)


REGIONS = {
    "whole": lambda n: Assignment("t", "s"),
    "stack[1]": lambda n: Assignment("t", "s", into=Select(0, 1)),
    "cat[dim 1]": lambda n: Assignment("t", "s", into=Span(1, 2, n)),
    "stack[2] cat[3:]": lambda n: Assignment("t", "s", into=(Select(0, 2), Span(0, 3, n))),
    "transposed": lambda n: Assignment("t", "s", transpose=True),
}


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(sorted(REGIONS)), world=st.integers(1, 4), dim=st.integers(0, 2),
       n=st.integers(1, 5))  # fmt: skip
def test_a_transfer_cut_to_every_shard_rebuilds_the_global_copy(kind, world, dim, n):
    asg = REGIONS[kind](n)
    target_shape = {
        "whole": (n, 3, 2), "stack[1]": (3, n, 2), "cat[dim 1]": (2, n + 4, 3),
        "stack[2] cat[3:]": (4, n + 3, 2), "transposed": (3, n),
    }[kind]  # fmt: skip
    source_shape = {
        "whole": (n, 3, 2), "stack[1]": (n, 2), "cat[dim 1]": (2, n, 3),
        "stack[2] cat[3:]": (n, 2), "transposed": (n, 3),
    }[kind]  # fmt: skip
    dim = min(dim, len(target_shape) - 1)
    source = torch.arange(torch.Size(source_shape).numel(), dtype=torch.float32)
    source = source.reshape(source_shape) + 1
    t = _transfer(asg, source, target_shape)
    want = torch.zeros(target_shape)
    _copy(t, source, want)
    for rank in range(world):
        shard = pieces_for("t", target_shape, (world,), (rank,), [Shard(dim)])
        local = torch.zeros(shard.shape)
        stored = (0, tuple(source.shape), dense_strides(source.shape))
        for piece in to_shard(t, shard, stored):
            _copy(piece, source, local)
        expect = torch.zeros(shard.shape)
        for box in shard.boxes:
            narrow(expect, box.local).copy_(narrow(want, box.global_box))
        assert torch.equal(local, expect), (kind, rank)


def test_listed_rows_are_cut_with_the_shard():
    source = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    rows = RowSelection(index=(5, 0, 3, 3))
    t = Transfer(0, "t", "s", 0, None, None, rows)
    stored = (0, (6, 2), (2, 1))
    for rank in range(2):
        shard = pieces_for("t", (4, 2), (2,), (rank,), [Shard(0)])
        local = torch.zeros(shard.shape)
        for piece in to_shard(t, shard, stored):
            _copy(piece, source, local)
        assert torch.equal(local, source[list(rows.index)][2 * rank : 2 * rank + 2])
