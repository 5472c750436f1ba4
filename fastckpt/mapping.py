"""Which source tensor feeds which target, and how: the contract between the
rules engine (``fastckpt.rules``) and the loader (``fastckpt.load``).

``plain_plan`` matches names exactly; a rules object's ``plan`` does renames,
row selections, casts and ignores. The loader turns a plan into copy tasks.
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
class Assignment:
    target: str  # destination name (a model state_dict key)
    source: str  # checkpoint key
    rule: str | None = None  # text of the rule that produced it; None for an exact name match
    rows: RowSelection | None = None
    dtype: torch.dtype | None = None  # cast through this dtype; None: the destination's dtype


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
