"""``fastckpt.diff(a, b)``: what differs between two models / checkpoints.

Names only on one side, shape and dtype differences, and (``values=True``) a
per-tensor value comparison that is streamed: each pair is compared in chunks
of at most ``CHUNK_ELEMENTS`` elements, taken from zero-copy views of the
mapped files, so neither file is ever held in private memory beyond one chunk
(plus its float64 copy for the arithmetic).

Value comparison, per pair of tensors:

- ``bit_equal``: the bytes are identical (only possible with equal dtypes).
- ``max_abs_diff``: max ``|a - b|`` in float64 (complex: modulus). Positions
  where both are NaN, or both the same infinity, count as 0; NaN against a
  number counts as ``inf``.
- ``max_rel_diff``: max ``|a - b| / max(|a|, |b|)`` (0 where both are 0):
  symmetric, in ``[0, 2]`` for finite values.

A pair counts as equal when it is bit-equal, or when ``atol > 0`` and
``max_abs_diff <= atol``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import torch
from torch import nn

from fastckpt.dtypes import short_name
from fastckpt.planning.load_plan import match
from fastckpt.planning.mapping import Assignment, RowSelection
from fastckpt.source.checkpoint import Checkpoint
from fastckpt.source.urls import is_url
from fastckpt.tools.listing import Listing, collapse, split_numbers

# Elements per comparison chunk: 1 Mi elements is 8 MB as float64 per side; the
# arithmetic holds about ten such temporaries (~80 MB), whatever the file size.
CHUNK_ELEMENTS = 1 << 20

Side: TypeAlias = nn.Module | Checkpoint | Mapping[str, torch.Tensor] | str | os.PathLike


@dataclass(frozen=True, slots=True)
class TensorDiff:
    """One compared pair: ``a`` (source name) against ``b`` (target name)."""

    a: str
    b: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    a_dtype: torch.dtype
    b_dtype: torch.dtype
    bit_equal: bool | None = None  # None: values not compared
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    within_atol: bool | None = None

    @property
    def status(self) -> str:
        if self.a_shape != self.b_shape:
            return "shape differs"
        if self.a_dtype != self.b_dtype:
            return "dtype differs"
        if self.bit_equal:
            return "equal"
        if self.within_atol:
            return "close"
        if self.max_abs_diff is None:
            return "not compared"
        return "changed"

    def detail(self) -> str:
        if self.a_shape != self.b_shape:
            return f"{list(self.a_shape)} vs {list(self.b_shape)}"
        parts = []
        if self.a_dtype != self.b_dtype:
            parts.append(f"{short_name(self.a_dtype)} vs {short_name(self.b_dtype)}")
        if self.max_abs_diff is not None and not self.bit_equal:
            parts.append(f"max abs {self.max_abs_diff:.3g}, max rel {self.max_rel_diff:.3g}")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "status": self.status,
            "a_shape": list(self.a_shape),
            "b_shape": list(self.b_shape),
            "a_dtype": short_name(self.a_dtype),
            "b_dtype": short_name(self.b_dtype),
            "bit_equal": self.bit_equal,
            "max_abs_diff": _json_float(self.max_abs_diff),
            "max_rel_diff": _json_float(self.max_rel_diff),
        }


def _json_float(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return str(x)  # JSON has no inf / nan


@dataclass(slots=True)
class DiffReport:
    a_name: str
    b_name: str
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    shape_mismatch: list[TensorDiff] = field(default_factory=list)
    dtype_mismatch: list[TensorDiff] = field(default_factory=list)
    # Every pair with equal shapes (values compared when ``values`` is set).
    compared: list[TensorDiff] = field(default_factory=list)
    values: bool = False
    atol: float = 0.0

    @property
    def changed(self) -> list[TensorDiff]:
        """Same shape and dtype, values compared and not equal."""
        return [
            d
            for d in self.compared
            if self.values and d.a_dtype == d.b_dtype and not (d.bit_equal or d.within_atol)
        ]

    @property
    def unchanged(self) -> list[TensorDiff]:
        return [d for d in self.compared if d.bit_equal or d.within_atol]

    @property
    def equal(self) -> bool:
        """Same names, shapes and dtypes, and (with ``values``) every tensor equal."""
        return not (
            self.only_in_a
            or self.only_in_b
            or self.shape_mismatch
            or self.dtype_mismatch
            or self.changed
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a_name,
            "b": self.b_name,
            "equal": self.equal,
            "values_compared": self.values,
            "atol": self.atol,
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "shape_mismatch": [d.to_dict() for d in self.shape_mismatch],
            "dtype_mismatch": [d.to_dict() for d in self.dtype_mismatch],
            "tensors": [d.to_dict() for d in self.compared],
        }

    # -- presentation ---------------------------------------------------------
    def grouped_rows(self) -> list[tuple[str, str, str]]:
        """(name pattern, status, detail) rows, numeric segments collapsed into ranges."""
        entries: list[tuple[str, str, str, float | None, float | None]] = []
        entries += [(n, "only in a", "", None, None) for n in self.only_in_a]
        entries += [(n, "only in b", "", None, None) for n in self.only_in_b]
        for d in self.shape_mismatch:
            entries.append((_pair_name(d), "shape differs", d.detail(), None, None))
        for d in self.compared:
            status = d.status
            if status == "not compared" or (status == "equal" and not self.values):
                status = "same shape/dtype"
            detail = d.detail() if d.a_dtype != d.b_dtype else ""
            entries.append((_pair_name(d), status, detail, d.max_abs_diff, d.max_rel_diff))
        return _group(entries)

    def summary_line(self) -> str:
        n_common = len(self.compared) + len(self.shape_mismatch)
        parts = [
            f"{n_common} in both",
            f"{len(self.only_in_a)} only in a",
            f"{len(self.only_in_b)} only in b",
            f"{len(self.shape_mismatch)} shape",
            f"{len(self.dtype_mismatch)} dtype differences",
        ]
        if self.values:
            parts.append(f"{len(self.changed)} changed, {len(self.unchanged)} equal")
        verdict = "EQUAL" if self.equal else "DIFFERENT"
        return f"{verdict}: " + ", ".join(parts)

    def listing(self) -> Listing:
        """The grouped rows as a name listing (full names; plain text when piped)."""
        return Listing(
            columns=("name", "status", "detail"),
            rows=self.grouped_rows(),
            title=f"a = {self.a_name}\nb = {self.b_name}",
        )

    def select(self, keep_name: Callable[[str], bool]) -> DiffReport:
        """The report restricted to pairs and names for which ``keep_name`` holds."""

        def keep(d: TensorDiff) -> bool:
            return keep_name(d.a) or keep_name(d.b)

        return DiffReport(
            a_name=self.a_name,
            b_name=self.b_name,
            only_in_a=[n for n in self.only_in_a if keep_name(n)],
            only_in_b=[n for n in self.only_in_b if keep_name(n)],
            shape_mismatch=[d for d in self.shape_mismatch if keep(d)],
            dtype_mismatch=[d for d in self.dtype_mismatch if keep(d)],
            compared=[d for d in self.compared if keep(d)],
            values=self.values,
            atol=self.atol,
        )

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        return Group(self.listing(), Text(self.summary_line()))

    def __str__(self) -> str:
        # Plain text: every name whole, whatever its length.
        return "\n".join(self.listing().plain_lines() + [self.summary_line()])


def _pair_name(d: TensorDiff) -> str:
    return d.b if d.a == d.b else f"{d.a} -> {d.b}"


# -- grouping ---------------------------------------------------------------------
def _group(
    entries: list[tuple[str, str, str, float | None, float | None]],
) -> list[tuple[str, str, str]]:
    groups: dict[tuple[tuple[str | None, ...], str, str], list[tuple[int, ...]]] = {}
    worst: dict[tuple[tuple[str | None, ...], str, str], tuple[float, float]] = {}
    for name, status, detail, abs_d, rel_d in entries:
        template, numbers = split_numbers(name)
        key = (template, status, detail)
        groups.setdefault(key, []).append(numbers)
        if abs_d is not None and status in ("changed", "close"):
            a0, r0 = worst.get(key, (0.0, 0.0))
            worst[key] = (max(a0, abs_d), max(r0, rel_d or 0.0))
    rows: list[tuple[str, str, str]] = []
    for key, tuples in groups.items():
        template, status, detail = key
        if key in worst:
            a, r = worst[key]
            detail = "; ".join(p for p in (detail, f"max abs {a:.3g}, max rel {r:.3g}") if p)
        rows.extend((name, status, detail) for name, _ in collapse(template, tuples))
    order = {"only in a": 0, "only in b": 1, "shape differs": 2, "dtype differs": 3, "changed": 4}
    rows.sort(key=lambda r: order.get(r[1], 9))  # stable: keeps name order within a status
    return rows


# -- sides ------------------------------------------------------------------------
class _Side:
    """Uniform access to a model, a state dict or a checkpoint (opened lazily, closed after)."""

    def __init__(self, obj: Side):
        self._ckpt: Checkpoint | None = None
        self._owned = False
        self._tensors: Mapping[str, torch.Tensor] | None = None
        if isinstance(obj, nn.Module):
            self.name = type(obj).__name__
            self._tensors = {k: v.detach() for k, v in obj.state_dict(keep_vars=True).items()}
        elif isinstance(obj, Checkpoint):
            self.name = str(obj.path)
            self._ckpt = obj
        elif isinstance(obj, Mapping):
            self.name = "state dict"
            self._tensors = obj
        elif isinstance(obj, (str, os.PathLike)):
            from fastckpt.source.checkpoint import open as open_checkpoint

            self.name = str(obj)
            # A URL stays a string: Path() would fold s3:// into s3:/.
            self._ckpt = open_checkpoint(obj if is_url(obj) else Path(obj))
            self._owned = True
        else:
            raise TypeError(
                f"diff compares models, state dicts and checkpoint paths, not {type(obj).__name__}"
            )

    def keys(self) -> list[str]:
        return self._ckpt.keys() if self._ckpt is not None else list(self._tensors or {})

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if self._ckpt is not None:
            info = self._ckpt.info(name)
            return tuple(info.shape), info.dtype
        assert self._tensors is not None
        t = self._tensors[name]
        return tuple(t.shape), t.dtype

    def tensor(self, name: str) -> torch.Tensor:
        if self._ckpt is not None:
            return self._ckpt.tensor(name)  # zero-copy view; chunks touch only their pages
        assert self._tensors is not None
        return self._tensors[name]

    def close(self) -> None:
        if self._owned and self._ckpt is not None:
            self._ckpt.close()


def _selected_shape(shape: tuple[int, ...], rows: RowSelection | None) -> tuple[int, ...]:
    if rows is None or not shape:
        return shape
    return rows.shape(shape)


def _select(t: torch.Tensor, rows: RowSelection | None) -> torch.Tensor:
    if rows is None or t.dim() == 0:
        return t
    if rows.index is not None:
        return _IndexedRows(t, rows.index)  # type: ignore[return-value]
    return t[rows.start : rows.stop]


class _IndexedRows:
    """Rows of ``t`` picked by an index list, gathered lazily chunk by chunk."""

    def __init__(self, t: torch.Tensor, index: tuple[int, ...]):
        self.t, self.index = t, index
        self.shape = (len(index),) + tuple(t.shape[1:])
        self.dtype = t.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.t[list(self.index[start:stop])]


def _chunks(a: Any, b: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Matching flat chunks of ``a`` and ``b`` (same shape), about CHUNK_ELEMENTS each at most."""
    shape = tuple(b.shape)
    if math.prod(shape) == 0:
        return
    if isinstance(a, _IndexedRows) or (len(shape) > 1 and math.prod(shape[1:]) <= CHUNK_ELEMENTS):
        step = max(1, CHUNK_ELEMENTS // math.prod(shape[1:]))
        for s in range(0, shape[0], step):
            ra = a.rows(s, s + step) if isinstance(a, _IndexedRows) else a[s : s + step]
            yield ra.reshape(-1), b[s : s + step].reshape(-1)
    elif len(shape) == 0:
        yield a.reshape(1), b.reshape(1)
    elif len(shape) == 1:
        for s in range(0, shape[0], CHUNK_ELEMENTS):
            yield a[s : s + CHUNK_ELEMENTS], b[s : s + CHUNK_ELEMENTS]
    else:  # one row alone is larger than a chunk: go into the rows
        for i in range(shape[0]):
            yield from _chunks(a[i], b[i])


def compare_values(
    a: Any, b: torch.Tensor, cast: torch.dtype | None = None
) -> tuple[bool, float, float]:
    """(bit_equal, max_abs_diff, max_rel_diff) of two same-shape tensors, chunk by chunk."""
    bit_equal = (cast or a.dtype) == b.dtype
    max_abs = 0.0
    max_rel = 0.0
    for ca, cb in _chunks(a, b):
        ca = ca.to("cpu")
        cb = cb.to("cpu")
        if cast is not None:
            ca = ca.to(cast)
        if bit_equal:
            bit_equal = torch.equal(
                ca.contiguous().view(torch.uint8), cb.contiguous().view(torch.uint8)
            )
        wide = torch.complex128 if (ca.is_complex() or cb.is_complex()) else torch.float64
        fa, fb = ca.to(wide), cb.to(wide)
        diff = (fa - fb).abs()
        same = (fa == fb) | (fa.isnan() & fb.isnan())
        diff = torch.where(same, torch.zeros((), dtype=diff.dtype), diff)
        diff = torch.where(diff.isnan(), torch.full((), math.inf, dtype=diff.dtype), diff)
        scale = torch.maximum(fa.abs(), fb.abs())
        rel = torch.where(diff == 0, torch.zeros((), dtype=diff.dtype), diff / scale)
        rel = torch.where(rel.isnan(), torch.full((), math.inf, dtype=rel.dtype), rel)
        if diff.numel():
            max_abs = max(max_abs, float(diff.max()))
            max_rel = max(max_rel, float(rel.max()))
    return bit_equal, max_abs, max_rel


def diff(
    a: Side,
    b: Side,
    *,
    rules: Any = None,
    values: bool = False,
    atol: float = 0.0,
) -> DiffReport:
    """Compare ``a`` with ``b`` (each a model, a state dict, a ``Checkpoint`` or a checkpoint path).

    ``rules`` (a rules object, file or text) maps ``a``'s names onto ``b``'s, as when
    loading ``a`` into ``b``; rows and dtype casts of the rules apply before comparing.
    """
    sa, sb = _Side(a), _Side(b)
    try:
        a_keys, b_keys = sa.keys(), sb.keys()
        plan = match(a_keys, b_keys, rules)
        report = DiffReport(a_name=sa.name, b_name=sb.name, values=values, atol=atol)
        used_a = set(plan.ignored_sources)
        used_b = set(plan.ignored_targets)
        b_set = set(b_keys)
        for asg in plan.assignments:
            if asg.target not in b_set:
                continue
            used_a.add(asg.source)
            used_b.add(asg.target)
            report_pair(report, sa, sb, asg, values, atol)
        report.only_in_a = [k for k in a_keys if k not in used_a]
        report.only_in_b = [k for k in b_keys if k not in used_b]
        return report
    finally:
        sa.close()
        sb.close()


def report_pair(
    report: DiffReport, sa: _Side, sb: _Side, asg: Assignment, values: bool, atol: float
) -> None:
    a_shape, a_dtype = sa.meta(asg.source)
    b_shape, b_dtype = sb.meta(asg.target)
    a_shape = _selected_shape(a_shape, asg.rows)
    if asg.dtype is not None:
        a_dtype = asg.dtype
    d = TensorDiff(asg.source, asg.target, a_shape, b_shape, a_dtype, b_dtype)
    if a_shape != b_shape:
        report.shape_mismatch.append(d)
        return
    if a_dtype != b_dtype:
        report.dtype_mismatch.append(d)
    if values:
        ta = _select(sa.tensor(asg.source), asg.rows)
        bit, mabs, mrel = compare_values(ta, sb.tensor(asg.target), cast=asg.dtype)
        within = (not bit) and atol > 0 and mabs <= atol
        d = TensorDiff(
            asg.source, asg.target, a_shape, b_shape, a_dtype, b_dtype, bit, mabs, mrel, within
        )
        if a_dtype != b_dtype:
            report.dtype_mismatch[-1] = d
    report.compared.append(d)
