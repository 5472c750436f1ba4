"""Conversions as strided views: what one assignment's copy reads and writes.

A conversion (``fastckpt.planning.mapping.Assignment``'s ``part``, ``transpose``,
``rope`` and ``into``) never materialises a tensor: the copy reads the source's
storage through a strided view and writes into a view of the destination.

- ``source_view(offset, shape, strides, asg)``: the view of the source's storage
  (in elements) to read, from the source tensor's own (offset, shape, strides).
  A part is an offset and a smaller shape (a stepped part: a larger stride), a
  transpose swaps two strides, the rotary permutation (or an interleave, along
  any dim) splits that dim into (heads, 2, half) or (heads, half, 2) with strides
  that interleave them.
- ``target_view(tensor, asg)``: the destination region as a torch view (select /
  narrow), split like the source view when the rows are permuted, so that
  ``target_view(t, a).copy_(torch.as_strided(src, *source_view(...)[1:], ...))``
  is the copy, element for element in row-major order.
- ``check_parts(target, shape, assignments)``: that the pieces feeding one
  target fit it (every expert once, parts adding up, shapes agreeing) before
  anything is written; errors name the keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fastckpt.errors import CheckpointError
from fastckpt.planning.mapping import Assignment, Rope, Select, Span, regions
from fastckpt.planning.transfers import Region, View

__all__ = [
    "View",
    "check_parts",
    "dense_strides",
    "read_shape",
    "source_view",
    "target_region",
    "target_view",
]

Shape = tuple[int, ...]


def dense_strides(shape: Sequence[int]) -> Shape:
    """Row-major strides of a dense tensor of ``shape``."""
    out, step = [], 1
    for n in reversed(shape):
        out.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(out))


def _where(asg: Assignment) -> str:
    return f"{asg.source} -> {asg.target}" + (f" ({asg.rule})" if asg.rule else "")


def _region(view: View, region: Select | Span, what: str, asg: Assignment) -> View:
    offset, shape, strides = view
    if not 0 <= region.dim < len(shape):
        raise CheckpointError(
            f"{_where(asg)}: {what} {region} names dim {region.dim} of a {len(shape)}-D tensor "
            f"{list(shape)}"
        )
    d, n = region.dim, shape[region.dim]
    if isinstance(region, Select):
        if not 0 <= region.index < n:
            raise CheckpointError(
                f"{_where(asg)}: {what} {region} is out of range: dim {d} has {n} entries"
            )
        return (
            offset + region.index * strides[d],
            shape[:d] + shape[d + 1 :],
            strides[:d] + strides[d + 1 :],
        )
    if region.start < 0 or region.length < 0 or region.step < 1 or region.stop > n:
        raise CheckpointError(
            f"{_where(asg)}: {what} {region} is out of range: dim {d} has {n} entries"
        )
    return (
        offset + region.start * strides[d],
        shape[:d] + (region.length,) + shape[d + 1 :],
        strides[:d] + (strides[d] * region.step,) + strides[d + 1 :],
    )


def _rope_split(shape: Shape, rope: Rope, asg: Assignment) -> tuple[int, int]:
    """(head_dim, half) for the ``rope.dim`` of ``shape`` in ``rope.heads`` heads of pairs."""
    if not 0 <= rope.dim < len(shape):
        raise CheckpointError(
            f"{_where(asg)}: a permutation of dim {rope.dim} of a {len(shape)}-D tensor "
            f"{list(shape)}"
        )
    rows = shape[rope.dim]
    if rope.heads <= 0 or rows % (2 * rope.heads):
        what = "rows" if rope.dim == 0 else f"dim {rope.dim}"
        raise CheckpointError(
            f"{_where(asg)}: the rotary permutation needs {what} divisible by 2 x heads "
            f"({rope.heads} heads), the tensor has {rows}"
        )
    head_dim = rows // rope.heads
    return head_dim, head_dim // 2


def _read(offset: int, shape: Shape, strides: Shape, asg: Assignment) -> View:
    """The source view up to (not including) the rotary split: part, rows, transpose."""
    view: View = (offset, tuple(shape), tuple(strides))
    if asg.rows is not None:
        if asg.rows.index is not None:
            raise CheckpointError(
                f"{_where(asg)}: a rows[@file] index list cannot be combined with a conversion"
            )
        if not view[1]:
            raise CheckpointError(f"{_where(asg)}: rows of a 0-D tensor")
        n = view[1][0]
        if asg.rows.stop is not None and asg.rows.stop > n:
            raise CheckpointError(
                f"{_where(asg)}: rows[{asg.rows.start}:{asg.rows.stop}] is beyond the "
                f"source's {n} rows"
            )
        view = _region(view, Span(0, asg.rows.start, asg.rows.rows(n)), "rows", asg)
    for r in regions(asg.part):
        view = _region(view, r, "part", asg)
    if asg.transpose:
        o, sh, st = view
        if len(sh) != 2:
            raise CheckpointError(
                f"{_where(asg)}: transpose needs a 2-D tensor, the source piece is {list(sh)}"
            )
        view = (o, (sh[1], sh[0]), (st[1], st[0]))
    return view


def read_shape(source_shape: Sequence[int], asg: Assignment) -> Shape:
    """The shape of what ``asg`` reads from a source of ``source_shape`` (rows not split)."""
    shape = tuple(int(n) for n in source_shape)
    _, sh, _ = _read(0, shape, dense_strides(shape), asg)
    if asg.rope is not None:
        _rope_split(sh, asg.rope, asg)
    return sh


def source_view(offset: int, shape: Sequence[int], strides: Sequence[int], asg: Assignment) -> View:
    """The strided view of the source's storage that the copy for ``asg`` reads."""
    o, sh, st = _read(int(offset), tuple(shape), tuple(strides), asg)
    if asg.rope is None:
        return o, sh, st
    head_dim, half = _rope_split(sh, asg.rope, asg)
    d = asg.rope.dim
    s0 = st[d]
    if asg.rope.to_halves:
        # target (h, j, i) <- source row h*head_dim + 2i + j (Meta's interleaved pairs)
        split, split_strides = (asg.rope.heads, 2, half), (head_dim * s0, s0, 2 * s0)
    else:
        # target (h, i, j) <- source row h*head_dim + j*half + i (Hugging Face's halves)
        split, split_strides = (asg.rope.heads, half, 2), (head_dim * s0, s0, half * s0)
    return o, sh[:d] + split + sh[d + 1 :], st[:d] + split_strides + st[d + 1 :]


def target_view(tensor: torch.Tensor, asg: Assignment) -> torch.Tensor:
    """The region of the destination ``asg`` writes, as a view of ``tensor``."""
    out = tensor
    for r in regions(asg.into):
        if not 0 <= r.dim < out.dim():
            raise CheckpointError(
                f"{_where(asg)}: into {r} names dim {r.dim} of a {out.dim()}-D target "
                f"{list(out.shape)}"
            )
        n = out.shape[r.dim]
        if isinstance(r, Select):
            if not 0 <= r.index < n:
                raise CheckpointError(
                    f"{_where(asg)}: into {r} is out of range: dim {r.dim} has {n} entries"
                )
            out = out.select(r.dim, r.index)
        else:
            if r.start < 0 or r.length < 0 or r.step != 1 or r.stop > n:
                raise CheckpointError(
                    f"{_where(asg)}: into {r} is out of range: dim {r.dim} has {n} entries"
                    + (" (a stepped region is read, never written)" if r.step != 1 else "")
                )
            out = out.narrow(r.dim, r.start, r.length)
    if asg.rope is not None:
        _head_dim, half = _rope_split(tuple(out.shape), asg.rope, asg)
        split = (asg.rope.heads, 2, half) if asg.rope.to_halves else (asg.rope.heads, half, 2)
        out = out.unflatten(asg.rope.dim, split)
    return out


Bounds = tuple[tuple[int, int], ...]  # [start, stop) per dim of the target (a Box: (start, length))


def target_region(target: str, shape: Shape, asg: Assignment) -> Region:
    """Where ``asg`` writes in a target of ``shape``, as the transfer's ``Region``: the box of
    ``asg.into`` (checked as ``into_box`` checks it), the dims its selects drop, and the rows
    split by a rotary permutation."""
    box, region_shape = into_box(target, shape, asg)
    left = list(range(len(shape)))
    for r in regions(asg.into):
        if isinstance(r, Select):
            del left[r.dim]
    drop = tuple(d for d in range(len(shape)) if d not in left)
    split = None
    if asg.rope is not None:
        if not region_shape:
            raise CheckpointError(f"{_where(asg)}: a rotary permutation of a 0-D target")
        if asg.rope.dim != 0:
            # a de-interleave along another dim is two stepped parts (hf_conversions); this
            # one (an interleave back, or heads) has no transfer
            raise CheckpointError(
                f"{_where(asg)}: a permutation along dim {asg.rope.dim} is not a transfer"
            )
        _head_dim, half = _rope_split(region_shape, asg.rope, asg)
        split = (asg.rope.heads, 2, half) if asg.rope.to_halves else (asg.rope.heads, half, 2)
    return Region(tuple((lo, hi - lo) for lo, hi in box), drop, split)



def into_box(target: str, shape: Shape, asg: Assignment) -> tuple[Bounds, Shape]:
    """Where ``asg.into`` lies in the target, and the shape of that region."""
    box = [(0, n) for n in shape]
    left = list(range(len(shape)))  # the target dims the region still has
    for r in regions(asg.into):
        if not 0 <= r.dim < len(left):
            raise CheckpointError(
                f"{_where(asg)}: into {r} names dim {r.dim} of a {len(left)}-D region "
                f"of the target {list(shape)}"
            )
        d = left[r.dim]
        lo, hi = box[d]
        if isinstance(r, Select):
            if not 0 <= r.index < hi - lo:
                raise CheckpointError(
                    f"{target}: {asg.source} is stacked at index {r.index}, "
                    f"dim {r.dim} has {hi - lo} entries"
                )
            box[d] = (lo + r.index, lo + r.index + 1)
            del left[r.dim]
        else:
            if r.start < 0 or r.length < 0 or r.step != 1 or r.stop > hi - lo:
                raise CheckpointError(
                    f"{target}: {asg.source} fills [{r.start}:{r.stop}] of dim {r.dim}, "
                    f"which has {hi - lo}"
                )
            box[d] = (lo + r.start, lo + r.stop)
    return tuple(box), tuple(box[d][1] - box[d][0] for d in left)


def _volume(box: Bounds) -> int:
    n = 1
    for lo, hi in box:
        n *= hi - lo
    return n


def _overlap(a: Bounds, b: Bounds) -> bool:
    return all(lo1 < hi2 and lo2 < hi1 for (lo1, hi1), (lo2, hi2) in zip(a, b, strict=True))


def _names(asgs: Sequence[Assignment]) -> str:
    return ", ".join(a.source for a in asgs)


def check_parts(
    target: str,
    shape: Sequence[int],
    assignments: Sequence[Assignment],
    source_shapes: Mapping[str, Sequence[int]] | None = None,
    *,
    partial: bool = False,
) -> list[Span]:
    """Check that ``assignments`` (all feeding ``target`` of ``shape``) fit it.

    Stacked pieces (``into=Select``) must use one dim and give every index once;
    concatenated pieces (``into=Span``) one dim, without overlaps, adding up to
    the dim's size; pieces with several regions (an expert's gate rows) must not
    overlap and must fill the target. With ``source_shapes``, each piece's shape
    must equal its region's. ``partial=True`` accepts single-region pieces that
    leave part of the target unfilled (a larger target) and returns the regions
    left, as spans; otherwise those are an error too. Raises ``CheckpointError``
    naming the keys.
    """
    tshape = tuple(int(n) for n in shape)
    asgs = list(assignments)
    if not asgs:
        return [Span(0, 0, tshape[0])] if partial and tshape else []
    whole = [a for a in asgs if not regions(a.into)]
    if whole and len(asgs) > 1:
        raise CheckpointError(
            f"{target}: several sources for one target ({_names(asgs)}); "
            "a stack or concatenation names each source's region"
        )
    boxes = {id(a): into_box(target, tshape, a) for a in asgs}
    if source_shapes is not None:
        for a in asgs:
            if a.source not in source_shapes:
                raise CheckpointError(f"{target}: source {a.source} is not in the checkpoint")
            got = read_shape(source_shapes[a.source], a)
            want = boxes[id(a)][1]
            if got != want:
                raise CheckpointError(
                    f"{_where(a)}: the source piece is {list(got)}, its place in the "
                    f"target {list(tshape)} is {list(want)}"
                )
    if whole:
        return []
    if any(len(regions(a.into)) > 1 for a in asgs):
        return _check_boxes(target, tshape, asgs, {k: b for k, (b, _) in boxes.items()})
    firsts = [regions(a.into)[0] for a in asgs]
    kinds = {type(r) for r in firsts}
    dims = {r.dim for r in firsts}
    if len(kinds) > 1 or len(dims) > 1:
        raise CheckpointError(
            f"{target}: its sources ({_names(asgs)}) mix stacking and concatenation "
            "or name different dims"
        )
    (d,) = dims
    size = tshape[d]
    if kinds == {Select}:
        by_index: dict[int, Assignment] = {}
        for a in sorted(asgs, key=lambda a: (regions(a.into)[0].index, a.source)):  # type: ignore[union-attr]
            i = regions(a.into)[0].index  # type: ignore[union-attr]
            if i in by_index:
                raise CheckpointError(
                    f"{target}: index {i} is given twice, by {by_index[i].source} and {a.source}"
                )
            by_index[i] = a
        missing = [i for i in range(size) if i not in by_index]
        if missing and not partial:
            raise CheckpointError(
                f"{target}: no source for index {_ranges(missing)} of dim {d} "
                f"({len(by_index)} of {size} stacked: {_names(list(by_index.values()))})"
            )
        return [Span(d, i, 1) for i in missing]
    spans = sorted(asgs, key=lambda a: (regions(a.into)[0].start, a.source))  # type: ignore[union-attr]
    left: list[Span] = []
    at, prev = 0, None
    for a in spans:
        r = regions(a.into)[0]
        assert isinstance(r, Span)
        if r.start < at:
            assert prev is not None
            raise CheckpointError(
                f"{target}: {prev.source} and {a.source} overlap at {r.start} along dim {d}"
            )
        if r.start > at:
            left.append(Span(d, at, r.start - at))
        at, prev = r.stop, a
    if at < size:
        left.append(Span(d, at, size - at))
    if left and not partial:
        covered = sum(regions(a.into)[0].length for a in spans)  # type: ignore[union-attr,misc]
        raise CheckpointError(
            f"{target}: its parts ({_names(spans)}) add up to {covered} along dim {d}, "
            f"the target has {size}"
        )
    return left


def _check_boxes(
    target: str, shape: Shape, asgs: Sequence[Assignment], boxes: Mapping[int, Bounds]
) -> list[Span]:
    """Pieces with nested regions: pairwise disjoint, and together the whole target."""
    ordered = sorted(asgs, key=lambda a: (boxes[id(a)], a.source))
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if boxes[id(b)][0][0] >= boxes[id(a)][0][1]:
                break  # sorted by the first dim's start: nothing further can overlap a
            if _overlap(boxes[id(a)], boxes[id(b)]):
                same = boxes[id(a)] == boxes[id(b)]
                raise CheckpointError(
                    f"{target}: {a.source} and {b.source} "
                    + ("fill the same region" if same else "overlap")
                    + " ("
                    + " ".join(str(r) for r in regions(a.into))
                    + ")"
                )
    total = _volume(tuple((0, n) for n in shape))
    covered = sum(_volume(boxes[id(a)]) for a in asgs)
    if covered != total:
        raise CheckpointError(
            f"{target}: its parts ({_names(ordered)}) fill {covered} of its {total} elements "
            f"{list(shape)}"
        )
    return []


def _ranges(idx: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    out, start = [], None
    for n, i in enumerate(idx):
        if start is None:
            start = i
        if n + 1 == len(idx) or idx[n + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(out)
