"""The one record the plan hands the engine: a ``Transfer`` reads a strided view of one
stored tensor and writes it into one region of one model tensor.

Every copy of a load is one: a whole tensor, a ``rows[...]`` cut, a piece of a
conversion (stack, concatenation, split, transpose, rotary permutation), a chunk of
a chunked source (DCP), and each of those cut to a DTensor's local shard. Two
operations compose them, from metadata alone:

- ``to_boxes``: a rotary permutation's destination (rows split as heads x 2 x half)
  becomes one transfer per run of destination rows, so every destination is a box;
- ``to_shard``: a transfer into a global tensor becomes the transfers into this
  rank's local shard: its box intersected with each box the shard holds
  (``dtensor_geometry``), the source view cut to match. The rank reads exactly the
  source bytes that feed its shard.

Boxes are ``(start, length)`` per dimension, everywhere in the package.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from fastckpt.planning.dtensor_geometry import Box, LocalShard, narrow
from fastckpt.planning.mapping import RowSelection

View = tuple[int, tuple[int, ...], tuple[int, ...]]  # storage offset, shape, strides (elements)


@dataclass(frozen=True, slots=True)
class Region:
    """Where a transfer writes: ``box`` of the destination tensor (of its local tensor for a
    DTensor), the box's dims of length 1 that are selected away (``drop``: a stacked expert),
    and the first remaining dim unflattened to ``split`` (a rotary permutation) or not."""

    box: Box
    drop: tuple[int, ...] = ()
    split: tuple[int, ...] | None = None

    def shape(self) -> tuple[int, ...]:
        """The shape of what is written: the source view's shape."""
        kept = tuple(n for d, (_, n) in enumerate(self.box) if d not in self.drop)
        if self.split is None:
            return kept
        return self.split + kept[1:]

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The region as a view of ``tensor`` (a DTensor's local tensor for a DTensor)."""
        if hasattr(tensor, "to_local"):
            tensor = tensor.to_local()
        tensor = narrow(tensor, self.box)
        for dim in sorted(self.drop, reverse=True):
            tensor = tensor.select(dim, 0)
        if self.split is not None:
            tensor = tensor.unflatten(0, self.split)
        return tensor


@dataclass(frozen=True, slots=True)
class Transfer:
    """One copy: ``src_view`` of the stored tensor ``handle`` (None: its own view) into
    ``region`` of model tensor ``group`` (None: all of it), with a row selection
    (``rows``: a range, or an index list: destination row i <- source row rows.index[i])
    and a cast through ``via``."""

    group: int  # the model tensor (ModelTensors index)
    target: str  # the model name (labels, report)
    source: str  # the checkpoint name
    handle: int  # Checkpoint's handle of the stored tensor read
    src_view: View | None = None
    region: Region | None = None
    rows: RowSelection | None = None
    via: torch.dtype | None = None
    rule: str | None = None  # the rule's text; None for an exact name match


def whole_box(shape: Sequence[int]) -> Box:
    return tuple((0, int(n)) for n in shape)


def volume(box: Box) -> int:
    n = 1
    for _, length in box:
        n *= length
    return n


def to_boxes(t: Transfer) -> list[Transfer]:
    """``t`` with a split destination (rotary rows) as transfers into boxes: the split's
    leading dims are fixed one combination at a time; its last dim is consecutive rows."""
    region = t.region
    if region is None or region.split is None:
        return [t]
    assert t.src_view is not None  # a permutation is always read through a view
    offset, shape, strides = t.src_view
    split = region.split
    inner = len(split) - 1  # source dims that enumerate the fixed combinations
    kept = [d for d in range(len(region.box)) if d not in region.drop]
    row_dim = kept[0]
    start0 = region.box[row_dim][0]
    out: list[Transfer] = []
    combos: list[tuple[int, ...]] = [()]
    for n in split[:inner]:
        combos = [c + (i,) for c in combos for i in range(n)]
    for combo in combos:
        row, step = 0, 1
        for n, i in zip(reversed(split), reversed((*combo, 0)), strict=True):
            row += i * step
            step *= n
        box = list(region.box)
        box[row_dim] = (start0 + row, split[-1])
        src = (
            offset + sum(i * s for i, s in zip(combo, strides[:inner], strict=True)),
            shape[inner:],
            strides[inner:],
        )
        out.append(replace(t, src_view=src, region=Region(tuple(box), region.drop)))
    return out


def to_shard(
    t: Transfer, shard: LocalShard, stored_view: View
) -> list[Transfer]:
    """``t`` (into a global tensor, ``region`` None or a box) cut to the local shard: one
    transfer per box of the shard it meets, writing the local tensor. ``stored_view`` is the
    stored tensor's own view, read when ``t.src_view`` is None."""
    src = t.src_view if t.src_view is not None else stored_view
    global_shape = None
    region = t.region
    if region is None:
        global_shape = src[1]
        if t.rows is not None and t.rows.index is not None:
            global_shape = (len(t.rows.index), *global_shape[1:])
        region = Region(whole_box(global_shape))
    assert region.split is None, "to_boxes first"
    kept = [d for d in range(len(region.box)) if d not in region.drop]
    out = []
    for piece in shard.boxes:
        meet = []
        for (a, n), (b, m) in zip(region.box, piece.global_box, strict=True):
            lo, hi = max(a, b), min(a + n, b + m)
            if lo >= hi:
                break
            meet.append((lo, hi - lo))
        else:
            # The source view is indexed by the kept dims of the region, in order.
            offset, _, strides = src
            rows = t.rows
            for k, d in enumerate(kept):
                skip = meet[d][0] - region.box[d][0]
                if k == 0 and rows is not None and rows.index is not None:
                    # An index list: the view keeps every source row; the cut picks
                    # its entries of the list.
                    rows = RowSelection(index=rows.index[skip : skip + meet[d][1]])
                else:
                    offset += skip * strides[k]
            shape = tuple(meet[d][1] for d in kept)
            if rows is not None and rows.index is not None:
                shape = (src[1][0], *shape[1:])
            local = tuple(
                (start - g0 + l0, length)
                for (start, length), (g0, _), (l0, _) in zip(
                    meet, piece.global_box, piece.local, strict=True
                )
            )
            out.append(
                replace(t, src_view=(offset, shape, strides), region=Region(local, region.drop),
                        rows=rows)
            )
    return out


def nbytes(t: Transfer, stored_view: View, itemsize: int) -> int:
    """Bytes of the stored tensor ``t`` reads."""
    shape = (t.src_view if t.src_view is not None else stored_view)[1]
    if t.rows is not None and t.rows.index is not None:
        shape = (len(t.rows.index), *shape[1:])
    n = itemsize
    for d in shape:
        n *= d
    return n


@dataclass
class Transfers:
    """Every copy of a load, column by column (a struct of arrays): copy ``k`` is
    ``self[k]``. The first ``whole`` copy whole stored tensors into whole model tensors
    that are not DTensors (a 30k-tensor load is mostly these: their columns are the lists
    the plan made, and a column that holds nothing but None is stored as None); the rest
    are pieces (conversion pieces, chunks, DTensor shards).
    """

    group: list[int]
    handle: list[int]
    target: list[str]
    source: list[str]
    rule: list[str | None] | None = None
    rows: list[RowSelection | None] | None = None
    via: list[torch.dtype | None] | None = None
    src_view: list[View | None] | None = None
    region: list[Region | None] | None = None
    whole: int = 0

    @classmethod
    def of(
        cls,
        whole: Transfers,
        pieces: Sequence[Transfer],
    ) -> Transfers:
        """The whole-tensor copies (columns), then ``pieces``."""
        if not pieces:
            whole.whole = len(whole.group)
            return whole
        n = len(whole.group)

        def col(mine: list | None, attr: str) -> list | None:
            theirs = [getattr(t, attr) for t in pieces]
            if mine is None and all(v is None for v in theirs):
                return None
            return (mine if mine is not None else [None] * n) + theirs

        return cls(
            whole.group + [t.group for t in pieces],
            whole.handle + [t.handle for t in pieces],
            whole.target + [t.target for t in pieces],
            whole.source + [t.source for t in pieces],
            col(whole.rule, "rule"),
            col(whole.rows, "rows"),
            col(whole.via, "via"),
            col(whole.src_view, "src_view"),
            col(whole.region, "region"),
            n,
        )

    def __len__(self) -> int:
        return len(self.group)

    def column(self, name: str) -> list:
        """A column as a list (None entries for a column stored as None)."""
        values = getattr(self, name)
        return values if values is not None else [None] * len(self.group)

    def __getitem__(self, k: int) -> Transfer:
        def at(values: list | None) -> object:
            return None if values is None else values[k]

        return Transfer(
            self.group[k], self.target[k], self.source[k], self.handle[k],
            at(self.src_view), at(self.region), at(self.rows), at(self.via),  # type: ignore[arg-type]
            at(self.rule),  # type: ignore[arg-type]
        )  # fmt: skip

    def pieces(self) -> list[Transfer]:
        return [self[k] for k in range(self.whole, len(self.group))]
