"""Which source tensor feeds which target, and how: the contract between the
rules engine (``fastckpt.planning.rules``) and the loader (``fastckpt.load.execute``).

``plain_plan`` matches names exactly; a rules object's ``plan`` does renames,
row selections, casts and ignores. The loader turns a plan into copy tasks.

Conversions beyond renames are optional fields of an ``Assignment`` saying how
one source feeds (part of) one target, applied in this order: ``part`` (the
region of the source read: an expert of a stacked tensor, a range of rows of a
fused one), ``transpose`` (2-D), ``rope`` (a per-head row permutation), then
written into ``into`` (the region of the target: expert ``e`` of a stack, a
range of a concatenation). Several assignments may feed one target (stack,
concatenate) and one source may feed several (unstack, split);
``fastckpt.planning.views`` turns the fields into strided views and checks that the
parts of a target fit it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class RowSelection:
    """Rows taken from the source's first dimension.

    Either a range (``start:stop``, ``stop=None`` meaning the end) or an index
    list: target row ``i`` comes from source row ``index[i]``.
    """

    start: int = 0
    stop: int | None = None
    index: tuple[int, ...] | None = None

    def rows(self, source_rows: int) -> int:
        if self.index is not None:
            return len(self.index)
        stop = source_rows if self.stop is None else min(self.stop, source_rows)
        return max(0, stop - self.start)

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The selected tensor's shape (rows are the first dimension)."""
        return (self.rows(source_shape[0]),) + tuple(source_shape[1:])


@dataclass(frozen=True, slots=True)
class Select:
    """Index ``index`` along ``dim``; the dimension goes (one expert of a stack)."""

    dim: int
    index: int

    def __str__(self) -> str:
        return f"[{self.index}]" if self.dim == 0 else f"[dim {self.dim}: {self.index}]"


@dataclass(frozen=True, slots=True)
class Span:
    """``[start, start + length)`` along ``dim`` (one part of a concatenation).

    ``step`` > 1 (a part read, never a region written): every ``step``-th entry from
    ``start``, ``length`` of them (one half of an interleaved dimension)."""

    dim: int
    start: int
    length: int
    step: int = 1

    @property
    def stop(self) -> int:
        """One past the last entry covered."""
        return self.start + (self.length - 1) * self.step + 1 if self.length else self.start

    def __str__(self) -> str:
        where = f"{self.start}:{self.stop}" + (f":{self.step}" if self.step != 1 else "")
        return f"[{where}]" if self.dim == 0 else f"[dim {self.dim}: {where}]"


Region = Select | Span
# One region, or several applied in turn (expert e, then its gate rows:
# (Select(0, e), Span(0, 0, I))).
Regions = Region | tuple[Region, ...]


def regions(r: Regions | None) -> tuple[Region, ...]:
    """``into`` / ``part`` as a tuple of regions applied in turn (empty: the whole tensor)."""
    if r is None:
        return ()
    return r if isinstance(r, tuple) else (r,)


@dataclass(frozen=True, slots=True)
class Rope:
    """The per-head row permutation between rotary layouts (Llama ``wq``/``wk``).

    ``to_halves=True`` reads Meta's interleaved pairs (rows ``2i, 2i+1`` of each
    head) into Hugging Face's halves (rows ``i`` and ``i + head_dim/2``), the
    ``permute`` of transformers' Llama conversion script; ``False`` is the inverse.
    ``heads``: the number of heads of the tensor (key/value heads for ``wk``).
    ``dim``: the dimension permuted (rows: 0). With one head this is transformers'
    ``Interleave`` along any dimension: ``to_halves`` de-interleaves (even entries,
    then odd ones), ``False`` interleaves the two halves back.
    """

    heads: int
    to_halves: bool = True
    dim: int = 0


@dataclass(frozen=True, slots=True)
class Assignment:
    target: str  # destination name (a model state_dict key)
    source: str  # checkpoint key
    rule: str | None = None  # text of the rule that produced it; None for an exact name match
    rows: RowSelection | None = None
    dtype: torch.dtype | None = None  # cast through this dtype; None: the destination's dtype
    into: Regions | None = None  # the region of the target this source fills; None: all of it
    part: Regions | None = None  # the region of the source read; None: all of it
    transpose: bool = False  # 2-D: read the source transposed (Conv1D <-> Linear)
    rope: Rope | None = None  # per-head row permutation, after part and transpose

    @property
    def converts(self) -> bool:
        """Whether the copy needs a view (a region, a transpose or a permutation)."""
        return (
            self.into is not None
            or self.part is not None
            or self.transpose
            or self.rope is not None
        )


@dataclass(slots=True)
class MappingPlan:
    assignments: list[Assignment] = field(default_factory=list)
    ignored_sources: list[str] = field(default_factory=list)  # source keys a rule says to skip
    ignored_targets: list[str] = field(default_factory=list)  # targets a rule says need no source
    unused_rules: list[str] = field(default_factory=list)  # rules that matched nothing


def plain_plan(source_keys: Sequence[str], target_keys: Sequence[str]) -> MappingPlan:
    """Exact name matching, no rules."""
    sources = set(source_keys)
    return MappingPlan(assignments=[Assignment(t, t) for t in target_keys if t in sources])
