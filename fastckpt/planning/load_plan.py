"""``fastckpt.plan``: which checkpoint tensor feeds which model tensor, decided in one place.

``plan(model, path, rules)`` reads metadata only (the checkpoint's index and the
model's tensors) and decides, for every model tensor, its source, the rule that
matched, the row selection, the cast and its tie group; plus what is missing,
unexpected, ignored or shape-mismatched, which rules matched nothing, and what a
load would leave on the meta device. ``load_into`` executes a plan;
``diff``, ``convert`` and ``resume`` match names through ``match``, the one
place rules are applied to names.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fastckpt._core as _core
from fastckpt.dtypes import DTYPE_NAMES, short_name
from fastckpt.errors import CheckpointError
from fastckpt.planning.destinations import (
    ModelTensors,
    all_plain,
    non_persistent_buffers,
    refusal,
)
from fastckpt.planning.dtensor_plan import (
    any_dtensor,
    dtensors_possible,
    is_dtensor,
    itemsize,
    shard_transfers,
    stored_view,
    whole_source,
)
from fastckpt.planning.hf_model import fillable, is_transformers_model, recomputed
from fastckpt.planning.mapping import MappingPlan, RowSelection, plain_plan
from fastckpt.planning.rules import as_rules
from fastckpt.planning.transfers import Region, Transfer, Transfers, nbytes
from fastckpt.report import Mismatch, format_groups, group_names
from fastckpt.source.checkpoint import Checkpoint, Opening
from fastckpt.source.chunked import contiguous_strides

PathLike = str | os.PathLike[str]


def match(
    source_keys: Sequence[str], target_keys: Sequence[str] | None, rules: Any = None
) -> MappingPlan:
    """Names only: which source key feeds which target key under ``rules``.

    ``target_keys=None`` (no model, as in ``convert``): every source maps, by its
    rule or to itself.
    """
    rules_obj = as_rules(rules)
    if rules_obj is None:
        keys = list(source_keys)
        return plain_plan(keys, keys if target_keys is None else target_keys)
    mapping: MappingPlan = rules_obj.plan(
        list(source_keys), None if target_keys is None else list(target_keys)
    )
    return mapping


@dataclass(frozen=True, slots=True)
class PlanEntry:
    """One model tensor the plan fills (its tie group's other names in ``tied``)."""

    target: str
    source: str
    file: str
    rule: str | None
    rows: RowSelection | None
    source_dtype: torch.dtype
    target_dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int  # bytes read from the file
    tied: tuple[str, ...] = ()


_ChunkedEntry = tuple[int, str, str, int, RowSelection | None, torch.dtype | None, str | None]


@dataclass
class LoadPlan:
    """What a load of ``path`` into a model would do; ``load_into`` executes it.

    Nothing in it has touched the model: it is safe to build, print and drop.
    """

    path: Path
    loaded: list[str] = field(default_factory=list)  # model names written whole (one per tie group)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[Mismatch] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    unused_rules: list[str] = field(default_factory=list)
    tied: list[tuple[str, str]] = field(default_factory=list)  # (alias, name written through)
    left_on_meta: list[str] = field(default_factory=list)  # would stay without values
    # non-persistent buffers of a transformers model that its _init_weights will fill
    # (fastckpt.planning.hf_model), as from_pretrained does
    initialised: list[str] = field(default_factory=list)
    # (model name, what it is): in the checkpoint, but not loadable (a sparse tensor, ...)
    unloadable: list[tuple[str, str]] = field(default_factory=list)
    # Every copy, whole tensors first, then pieces (conversions, chunks, DTensor shards).
    transfers: Transfers = field(default_factory=lambda: Transfers([], [], [], []))
    loaded_by_pieces: list[str] = field(default_factory=list)  # model names pieces fill
    # Whole tensors of a chunked source (DCP, ZeRO) into plain tensors, filled chunk by
    # chunk: (group, model name, checkpoint name, handle, rows, via dtype, rule)
    _chunked: list[_ChunkedEntry] = field(default_factory=list)
    piece_rules: dict[str, str] = field(default_factory=dict)  # model name -> rule, for pieces
    partly_loaded: list[tuple[str, str]] = field(default_factory=list)  # (name, part left)
    # DTensor destinations (fastckpt.planning.dtensor_plan): model names, their sources and tensors'
    # groups; the file bytes of this rank's shards.
    sharded: list[str] = field(default_factory=list)
    sharded_sources: list[str] = field(default_factory=list)
    sharded_groups: list[int] = field(default_factory=list)
    local_bytes: int = 0
    # (source, model name) of renamed tensors that transfers fill (chunked sources)
    piece_renames: list[tuple[str, str]] = field(default_factory=list)
    # DTensor group -> its transfers into the global tensor, before the cut to this rank's
    # shard (bytes per rank are computed from them)
    _global_transfers: dict[int, list[Transfer]] = field(default_factory=dict)
    any_sharded: bool = False  # the model has DTensors: load_into's ranks agree before writing
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    # Execution state (fastckpt.load.execute): the checkpoint, destinations and per-entry details.
    _ckpt: Any = None
    _model: ModelTensors | None = None
    _model_ref: Any = None
    _targets: Any = None  # _core.Targets of the whole-tensor copies' current tensors
    _hidden_buffers: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)

    @property
    def problems(self) -> bool:
        """Strict mode refuses this plan."""
        return bool(self.missing or self.unexpected or self.mismatched or self.unloadable)

    @property
    def pieces(self) -> list[Transfer]:
        """The copies into parts of model tensors (conversions, chunks, DTensor shards)."""
        return self.transfers.pieces()

    @property
    def checkpoint(self) -> Checkpoint:
        ckpt: Checkpoint = self._ckpt
        return ckpt

    def entries(self) -> list[PlanEntry]:
        """One ``PlanEntry`` per tensor copied whole, in model order (then those of a
        chunked source, filled chunk by chunk: their file is the checkpoint's folder)."""
        assert self._model is not None
        ckpt = self._ckpt
        aliases: dict[str, list[str]] = {}
        for alias, via in self.tied:
            aliases.setdefault(via, []).append(alias)
        tr = self.transfers
        rules, rows_of = tr.column("rule"), tr.column("rows")
        whole = [
            (tr.group[k], tr.target[k], tr.source[k], tr.handle[k], rows_of[k], rules[k])
            for k in range(tr.whole)
        ]
        whole += [(g, n, s, h, rows, rule) for g, n, s, h, rows, _, rule in self._chunked]
        out = []
        for group, name, source, handle, rows, rule in whole:
            dtype, shape, _, _ = ckpt._handle_view(handle)
            if rows is not None and shape:
                shape = rows.shape(tuple(shape))
            dst = self._model.tensors[group]
            target_dtype = dst.dtype
            if self.dtype is not None and dst.is_floating_point():
                target_dtype = self.dtype
            numel = 1
            for d in shape:
                numel *= d
            out.append(
                PlanEntry(
                    name,
                    source,
                    ckpt._handle_file(handle),
                    rule,
                    rows,
                    dtype,
                    target_dtype,
                    tuple(shape),
                    numel * dtype.itemsize,
                    tuple(aliases.get(name, ())),
                )
            )
        return out

    def bytes_per_file(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries():
            out[e.file] = out.get(e.file, 0) + e.nbytes
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "entries": [
                {
                    "target": e.target,
                    "source": e.source,
                    "file": e.file,
                    "rule": e.rule,
                    "rows": None
                    if e.rows is None
                    else (
                        list(e.rows.index)
                        if e.rows.index is not None
                        else [e.rows.start, e.rows.stop]
                    ),
                    "source_dtype": short_name(e.source_dtype),
                    "target_dtype": short_name(e.target_dtype),
                    "shape": list(e.shape),
                    "bytes": e.nbytes,
                    "tied": list(e.tied),
                }
                for e in self.entries()
            ],
            "bytes_per_file": self.bytes_per_file(),
            "missing": list(self.missing),
            "unloadable": [list(u) for u in self.unloadable],
            "unexpected": list(self.unexpected),
            "mismatched": [
                {
                    "name": m.name,
                    "source_shape": list(m.source_shape),
                    "target_shape": list(m.target_shape),
                }
                for m in self.mismatched
            ],
            "ignored": list(self.ignored),
            "unused_rules": list(self.unused_rules),
            "left_on_meta": list(self.left_on_meta),
            "initialised": list(self.initialised),
        }

    def explain(self, full: bool = False, width: int | None = None) -> str:
        """The plan as text: loaded tensors grouped by rule, rows and cast (names folded
        into patterns like the strict error's; ``full=True`` lists every tensor), bytes
        per file, then everything that is not loaded."""
        import io

        from rich.console import Console
        from rich.table import Table

        entries = self.entries()
        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        for col in ("model tensors", "count", "from", "rows", "cast", "rule"):
            table.add_column(col, overflow="fold")
        rows_of: dict[tuple[str, str, str, str], list[PlanEntry]] = {}
        for e in entries:
            rows = ""
            if e.rows is not None:
                rows = (
                    f"{len(e.rows.index)} listed"
                    if e.rows.index is not None
                    else f"[{e.rows.start}:{'' if e.rows.stop is None else e.rows.stop}]"
                )
            cast = (
                ""
                if e.source_dtype == e.target_dtype
                else f"{short_name(e.source_dtype)}->{short_name(e.target_dtype)}"
            )
            renamed = "renamed" if e.source != e.target else ""
            key = (e.rule or "", rows, cast, e.source if full else renamed)
            rows_of.setdefault(key, []).append(e)
        for (rule, rows, cast, src), group in rows_of.items():
            if full:
                for e in group:
                    name = e.target + "".join(f"\n  = {a}" for a in e.tied)
                    table.add_row(
                        name, "1", "" if e.source == e.target else e.source, rows, cast, rule
                    )
                continue
            for pattern, count in group_names([e.target for e in group]):
                table.add_row(pattern, str(count), src, rows, cast, rule)
        buf = io.StringIO()
        console = Console(file=buf, width=width or 160, color_system=None, force_terminal=False)
        total = sum(e.nbytes for e in entries)
        console.print(f"LoadPlan {self.path}: {len(entries)} tensors, {total / 1e6:.1f} MB to read")
        console.print(table)
        for f, n in self.bytes_per_file().items():
            console.print(f"  {n / 1e6:10.1f} MB from {f}")
        if self._global_transfers:
            from fastckpt.planning.dtensor_plan import bytes_per_rank

            console.print(
                f"  {len(self._global_transfers)} sharded tensors; this rank reads "
                f"{self.local_bytes / 1e6:.1f} MB of them"
            )
            for rank, n in bytes_per_rank(self).items():
                console.print(f"  {n / 1e6:10.3f} MB read by rank {rank}")
        for label, names in (
            (
                "tied (written once, through the name after '=')",
                [f"{a} = {b}" for a, b in self.tied],
            ),
            ("missing from the checkpoint", self.missing),
            ("present but not loadable", [f"{n} ({w})" for n, w in self.unloadable]),
            ("unexpected in the checkpoint", self.unexpected),
            ("ignored by rules", self.ignored),
            ("rules that matched nothing", self.unused_rules),
            ("left on the meta device", self.left_on_meta),
            ("initialised by the model's _init_weights, as from_pretrained does", self.initialised),
        ):
            if names:
                console.print(f"  {label} ({len(names)}):")
                for line in (
                    ["    " + n for n in names] if full or "=" in label else format_groups(names)
                ):
                    console.print(line)
        if self.mismatched:
            console.print(
                f"  shape mismatches ({len(self.mismatched)}): model name, checkpoint, model"
            )
            for m in self.mismatched:
                console.print(f"    {m.name}  {list(m.source_shape)} vs {list(m.target_shape)}")
        return buf.getvalue().rstrip("\n")

    def __str__(self) -> str:
        return self.explain()


def plan(
    model: nn.Module,
    path: PathLike | Checkpoint,
    rules: Any = None,
    *,
    key: str | Sequence[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadPlan:
    """What ``load_into(model, path, rules, key=..., device=..., dtype=...)`` would do.

    Reads metadata only; the model is not modified. Raises ``CheckpointError``
    when the model holds a tensor fastckpt must not write into and the file has a
    source for it (a tensor subclass, a quantized or sparse tensor), or when the
    rules contradict themselves.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_into needs a torch.nn.Module to load into, not {type(model).__name__}"
        )
    return build(model, path, rules, key=key, device=device, dtype=dtype)


def build(
    model: nn.Module,
    path: PathLike | Checkpoint,
    rules: Any,
    *,
    key: str | Sequence[str] | None,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    exact: bool = False,
) -> LoadPlan:
    """The plan, in stages: open the checkpoint while the model is read (``_open``), match
    names through the rules (``_match_rules``), pick a source per model tensor
    (``_candidates``), turn copies into DTensors and from chunked sources into transfers
    (``_whole_transfers``, ``_cut_to_shards``), check the remaining whole-tensor copies
    against their destinations (``_check_targets``), then what is unexpected, tied or
    left on meta."""
    want = torch.device(device) if device is not None else None
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, not {type(dtype).__name__}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(
            f"dtype= sets the floating dtype of the model's tensors; {dtype} is not one"
        )
    ckpt, mt, every_target = _open(model, path, key, exact)
    p = LoadPlan(path=ckpt.path, device=want, dtype=dtype, _ckpt=ckpt, _model=mt, _model_ref=model)
    p.any_sharded = any_dtensor(mt.tensors)
    rules_obj = as_rules(rules)
    if rules_obj is None:
        rules_obj = _transformers_rules(model, mt, ckpt)
    matched = _match_rules(p, mt, ckpt, rules_obj) if rules_obj is not None else None
    pieces = [] if matched is None else matched.pieces
    cand = _candidates(p, mt, ckpt, matched)
    n_cand = len(cand.groups)
    # Whole-tensor copies that are not plain entries: into DTensors (cut to this rank's
    # shard below) and from chunked sources (one transfer per chunk).
    chunked = ckpt._has_chunks()
    split = (
        [
            k
            for k, g in enumerate(cand.groups)
            if (p.any_sharded and is_dtensor(mt.tensors[g]))
            or (chunked and ckpt._chunks(cand.handles[k]) is not None)
        ]
        if p.any_sharded or chunked
        else []
    )
    if split:
        pieces += _whole_transfers(
            p, ckpt, [cand.entry(k) for k in split],
            [None if cand.picks is None else cand.picks[k].rule for k in split],
        )  # fmt: skip
        moved = set(split)
        cand = cand.keep([k for k in range(n_cand) if k not in moved])
    if p.any_sharded:
        pieces = _cut_to_shards(p, mt, pieces)
    _refuse_piece_destinations(p, mt, pieces)
    cand, targets = _check_targets(p, mt, ckpt, cand, every_target)
    # Without rules every candidate uses its own, distinct source: when they cover
    # the whole file, nothing in it is unexpected (no need to look at each key).
    if matched is None and mt.groups is None and n_cand == len(ckpt):
        p.unexpected = []
    else:
        used = set(mt.all_names()) if matched is None else matched.used_sources
        ignored = set() if matched is None else matched.ignored_sources
        p.unexpected = [k for k in ckpt._handles() if k not in used and k not in ignored]
    p._targets = targets
    p.transfers = Transfers.of(cand.transfers(), pieces)
    p.loaded = p.transfers.target[: p.transfers.whole]
    if mt.groups is not None:
        p.tied = _ties(mt.groups, cand)
    _find_meta_leftovers(
        p,
        model,
        mt,
        set(cand.groups) | {t.group for t in pieces} | set(p._global_transfers),
        want,
    )
    return p


def _refuse_piece_destinations(p: LoadPlan, mt: ModelTensors, pieces: list[Transfer]) -> None:
    """A model tensor that pieces write into parts of must be one fastckpt may write
    (a DTensor's pieces write its local tensor, which ``dtensor_shard`` checked)."""
    for g in sorted({t.group for t in pieces}):
        tensor = mt.tensors[g]
        if not is_dtensor(tensor) and (why := refusal(mt.group(g)[0], tensor)) is not None:
            raise CheckpointError(f"{p.path}: {why}")


def _open(
    model: nn.Module, path: PathLike | Checkpoint, key: str | Sequence[str] | None, exact: bool
) -> tuple[Checkpoint, ModelTensors, Any]:
    """The checkpoint, the model's tensors, and ``_core.Targets`` of all of them (None when
    some tensor is not plain: those are read one by one once it is known which are needed).

    The files are indexed on C++ threads while the model is walked and its tensors are
    read here: on a 30k-tensor checkpoint each takes tens of ms. A rank loading its shards
    must fetch only their pages, so its headers are parsed with no readahead. Whether the
    model has DTensors is known only after the walk the parsing overlaps; a process that
    made DTensors has imported their module, so that decides (a plain load there only
    loses readahead while parsing). ``exact``: ranks sharing reads (read="once") fetch
    only the pages they are given."""
    opening = (
        None
        if isinstance(path, Checkpoint)
        else Opening(path, exact_reads=exact or dtensors_possible())
    )
    mt = ModelTensors.of(model)
    every_target: Any = None
    if all_plain(mt.tensors):
        try:
            every_target = _core.Targets(mt.tensors, DTYPE_NAMES)
        except Exception:
            every_target = None
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint(path, key=key, _opening=opening)
    return ckpt, mt, every_target


@dataclass
class _Matched:
    """What the rules decided: one assignment per model name read whole (``picks``), the
    conversion pieces, and the checkpoint names used or ignored."""

    picks: dict[str, Any]
    pieces: list[Transfer]
    used_sources: set[str]
    ignored_sources: set[str]
    ignored_targets: set[str]


def _match_rules(p: LoadPlan, mt: ModelTensors, ckpt: Checkpoint, rules_obj: Any) -> _Matched:
    target_names = mt.all_names()
    target_set = set(target_names)
    entries = ckpt._handles()
    mapping = match(list(entries), target_names, rules_obj)
    p.unused_rules = list(mapping.unused_rules)
    p.ignored = list(mapping.ignored_sources) + list(mapping.ignored_targets)
    plain_assignments, pieces = _add_pieces(p, mt, ckpt, entries, mapping.assignments)
    out = _Matched(
        {}, pieces, {t.source for t in pieces}, set(mapping.ignored_sources),
        set(mapping.ignored_targets),
    )  # fmt: skip
    for a in plain_assignments:
        if a.target not in target_set:
            raise CheckpointError(
                f"{ckpt.path}: rules map {a.source!r} onto {a.target!r}, "
                "which the model does not have"
            )
        if a.source not in entries:
            raise CheckpointError(
                f"{ckpt.path}: rules read {a.source!r}, which the checkpoint lacks"
            )
        if a.target in out.picks:
            raise CheckpointError(
                f"{ckpt.path}: two checkpoint tensors map onto {a.target!r}: "
                f"{out.picks[a.target].source!r} and {a.source!r}"
            )
        out.picks[a.target] = a
        out.used_sources.add(a.source)
    return out


@dataclass
class _Candidates:
    """Model tensors (tie groups) with a whole source, column by column: group, the name
    written through (``via``), the source's handle, the rule's assignment (None without
    rules) and the rows the rule takes (None: all)."""

    vias: list[str | None]  # per group of the model
    groups: list[int]
    handles: list[int]
    picks: list[Any] | None
    dim0: list[int | None] | None

    def keep(self, ks: list[int]) -> _Candidates:
        return _Candidates(
            self.vias,
            [self.groups[k] for k in ks],
            [self.handles[k] for k in ks],
            None if self.picks is None else [self.picks[k] for k in ks],
            None if self.dim0 is None else [self.dim0[k] for k in ks],
        )

    def entry(self, k: int) -> tuple[int, str, str, int, RowSelection | None, torch.dtype | None]:
        """(group, model name, checkpoint name, handle, rows, via dtype) of candidate ``k``."""
        via = self.vias[self.groups[k]]
        assert via is not None
        a = None if self.picks is None else self.picks[k]
        return (
            self.groups[k], via, via if a is None else a.source, self.handles[k],
            None if a is None else a.rows, None if a is None else a.dtype,
        )  # fmt: skip

    def transfers(self) -> Transfers:
        """The whole-tensor copies, as the first columns of the plan's transfer list."""
        targets = [self.vias[g] for g in self.groups]
        if self.picks is None:
            return Transfers(self.groups, self.handles, targets, targets)  # type: ignore[arg-type]
        picks = self.picks
        return Transfers(
            self.groups, self.handles, targets, [a.source for a in picks],  # type: ignore[arg-type]
            [a.rule for a in picks], [a.rows for a in picks], [a.dtype for a in picks],
        )  # fmt: skip


def _candidates(
    p: LoadPlan, mt: ModelTensors, ckpt: Checkpoint, matched: _Matched | None
) -> _Candidates:
    """Per tie group, the name written through and its source; what has none is missing.

    For tied names the last one (state_dict order) with a source, so the result equals
    load_state_dict's, which copies each name in turn. The common case (plain names, no
    ties, every name in the file) stays in C-level loops: this is per-tensor work for
    30k-tensor models."""
    names, groups = mt.names, mt.groups
    vias: list[str | None]
    locs = ckpt._find_all(names) if matched is None and groups is None else None
    # name -> handle (or assignment), looked at only when some name is not in the file
    wanted: Any = None if matched is None else matched.picks
    if locs is not None and None not in locs:
        vias = names  # type: ignore[assignment]
        cand: list[int] = list(range(len(names)))
    else:
        if wanted is None:
            wanted = ckpt._handles()
        if groups is None:
            vias = [n if n in wanted else None for n in names]
        else:
            vias = [next((n for n in reversed(g) if n in wanted), None) for g in groups]
        cand = [g for g, via in enumerate(vias) if via is not None]
        ignored = set() if matched is None else matched.ignored_targets
        for g, via in enumerate(vias):
            if via is None:
                p.missing += [n for n in mt.group(g) if n not in ignored]
    if p.missing and (present := ckpt.unloadable()):
        p.unloadable = [(n, present[n]) for n in p.missing if n in present]
        p.missing = [n for n in p.missing if n not in present]
    if matched is not None and matched.pieces:
        by_pieces = {n for t in matched.pieces for n in mt.group(t.group)}
        p.missing = [n for n in p.missing if n not in by_pieces]
    if matched is None:
        if locs is not None and len(cand) == len(locs):
            handles: list[int] = locs  # type: ignore[assignment]  # every name was found
        else:
            handles = [wanted[vias[g]] for g in cand]
        return _Candidates(vias, cand, handles, None, None)
    entries = ckpt._handles()
    picks = [wanted[vias[g]] for g in cand]
    handles = [entries[a.source] for a in picks]
    dim0 = [
        None if a.rows is None or not (shape := ckpt._handle_shape(h)) else a.rows.rows(shape[0])
        for a, h in zip(picks, handles, strict=True)
    ]
    return _Candidates(vias, cand, handles, picks, dim0)


def _check_targets(
    p: LoadPlan, mt: ModelTensors, ckpt: Checkpoint, cand: _Candidates, every_target: Any
) -> tuple[_Candidates, Any]:
    """The whole-tensor copies whose destination fits: ``_core.Targets`` of them; refuses a
    destination fastckpt must not write, reports shape mismatches."""
    tensors, vias = mt.tensors, cand.vias
    if every_target is None:
        targets = _read_targets(
            ckpt.path, [tensors[g] for g in cand.groups], [vias[g] for g in cand.groups]
        )
    elif len(cand.groups) == len(tensors):
        targets = every_target
    else:
        targets = every_target.subset(cand.groups)
    for k in targets.lazy_views():
        g = cand.groups[k]
        raise CheckpointError(f"{ckpt.path}: {refusal(str(vias[g]), tensors[g])}")
    bad = targets.mismatched(ckpt._core_indexes, cand.handles, cand.dim0)
    if not bad:
        return cand, targets
    for k in bad:
        g, h = cand.groups[k], cand.handles[k]
        p.mismatched.append(Mismatch(str(vias[g]), ckpt._handle_shape(h), tuple(tensors[g].shape)))
    bad_set = set(bad)
    keep = [k for k in range(len(cand.groups)) if k not in bad_set]
    return cand.keep(keep), targets.subset(keep)


def _ties(groups: list[list[str]], cand: _Candidates) -> list[tuple[str, str]]:
    """(alias, name written through) per tied name: loaded groups first, then unloaded ones,
    as the report always listed them."""
    loaded = set(cand.groups)
    vias = cand.vias
    return [
        (n, via) for g in cand.groups if (via := vias[g]) is not None for n in groups[g] if n != via
    ] + [
        (n, groups[g][0])
        for g in range(len(groups))
        if g not in loaded and vias[g] is None
        for n in groups[g][1:]
    ]


def _whole_transfers(
    p: LoadPlan,
    ckpt: Checkpoint,
    entries: list[tuple[int, str, str, int, RowSelection | None, torch.dtype | None]],
    rules: list[str | None],
) -> list[Transfer]:
    """Transfers for whole-tensor copies into DTensors or from chunked sources: (group, model
    name, checkpoint name, handle, rows, via dtype) each. A global shape that differs from
    the source's (after rows) is a mismatch, as for plain tensors. Those into DTensors go
    to ``p._global_transfers``; the others are returned."""
    assert p._model is not None
    out: list[Transfer] = []
    for (group, name, source, handle, rows, via), rule in zip(entries, rules, strict=True):
        dst = p._model.tensors[group]
        view = ckpt._handle_view(handle)
        src_shape = tuple(view[1])
        if rows is not None and src_shape:
            src_shape = rows.shape(src_shape)
        if src_shape != tuple(dst.shape):
            p.mismatched.append(Mismatch(name, src_shape, tuple(dst.shape)))
            continue
        chunks = ckpt._chunks(handle)
        if chunks is None:
            src_view, sub_rows = whole_source(view, rows)
            transfers = [Transfer(group, name, source, handle, src_view, None, sub_rows, via)]
        else:
            transfers = _chunk_transfers(ckpt, group, name, source, handle, chunks, rows, via)
        if is_dtensor(dst):
            p._global_transfers[group] = transfers
            p.sharded.append(name)
            p.sharded_sources.append(source)
            p.sharded_groups.append(group)
        else:
            out += transfers
            p.loaded_by_pieces.append(name)
            if source != name:
                p.piece_renames.append((source, name))
            if chunks is not None:
                p._chunked.append((group, name, source, handle, rows, via, rule))
    return out


def _chunk_transfers(
    ckpt: Checkpoint,
    group: int,
    name: str,
    source: str,
    handle: int,
    chunks: list[Any],
    rows: RowSelection | None,
    via: torch.dtype | None,
) -> list[Transfer]:
    """One transfer per stored chunk of ``source`` (its logical ``handle``) that the copy,
    rows included, reads."""
    if rows is not None and rows.index is not None:
        raise CheckpointError(
            f"{ckpt.path}: rules take listed rows of {source!r}, which is stored in "
            f"{len(chunks)} chunks; a rows[@file] index list needs a tensor stored whole"
        )
    out = []
    for chunk in chunks:
        if chunk.storage_offset is None:  # the chunk is a stored tensor of its own
            _, _, strides, offset = ckpt._handle_view(chunk.handle)
        else:  # a contiguous run of the stored tensor's storage
            strides, offset = contiguous_strides(chunk.sizes), chunk.storage_offset
        box = list(zip(chunk.offsets, chunk.sizes, strict=True))
        skip = 0
        if rows is not None and box:
            start, length = box[0]
            first = rows.start
            stop = first + rows.rows(ckpt._handle_shape(handle)[0])
            lo, hi = max(start, first), min(start + length, stop)
            if lo >= hi:
                continue
            skip = lo - start
            box[0] = (lo - first, hi - lo)
        out.append(
            Transfer(
                group,
                name,
                source,
                chunk.handle,
                (offset + skip * (strides[0] if strides else 0), tuple(n for _, n in box),
                 tuple(strides)),
                Region(tuple(box)),
                None,
                via,
            )
        )
    return out


def _cut_to_shards(p: LoadPlan, mt: ModelTensors, pieces: list[Transfer]) -> list[Transfer]:
    """Transfers into DTensors (conversion pieces here, whole-tensor copies already in
    ``p._global_transfers``) become transfers into this rank's local shard; the global
    ones are kept for bytes per rank. Returns the pieces with those cut."""
    ckpt = p.checkpoint
    out: list[Transfer] = []
    for t in pieces:
        if is_dtensor(mt.tensors[t.group]):
            p._global_transfers.setdefault(t.group, []).append(t)
        else:
            out.append(t)
    for group, transfers in p._global_transfers.items():
        local = shard_transfers(transfers, mt.tensors[group], transfers[0].target, ckpt)
        out += local
        p.local_bytes += sum(
            nbytes(t, stored_view(ckpt, t.handle), itemsize(ckpt, t.handle)) for t in local
        )
    return out


def _transformers_rules(model: nn.Module, mt: ModelTensors, ckpt: Checkpoint) -> Any:
    """transformers' own conversions (fastckpt.planning.hf_conversions) for one of its models whose
    checkpoint names differ from the model's; None otherwise."""
    if "transformers" not in sys.modules:  # not one of its models: spare the import
        return None
    from fastckpt.planning.hf_conversions import rules_for

    if not is_transformers_model(model):
        return None
    handles = ckpt._handles()
    names = mt.all_names()
    if len(handles) == len(names) and all(n in handles for n in names):
        return None  # the model's own names: nothing to convert
    return rules_for(model, lambda k: ckpt._handle_shape(handles[k]))


def _add_pieces(
    p: LoadPlan, mt: ModelTensors, ckpt: Checkpoint, handles: dict[str, int], assignments: list[Any]
) -> tuple[list[Any], list[Transfer]]:
    """Assignments that convert (a region, a transpose, a row permutation, several sources
    for one target) become transfers, checked before anything is written; returns the plain
    whole-tensor assignments and the transfers."""
    from fastckpt.planning.views import check_parts, source_view, target_region

    count: dict[str, int] = {}
    for a in assignments:
        count[a.target] = count.get(a.target, 0) + 1
    converting: dict[str, list[Any]] = {}
    plain = []
    for a in assignments:
        if getattr(a, "converts", False) or count[a.target] > 1:
            converting.setdefault(a.target, []).append(a)
        else:
            plain.append(a)
    pieces: list[Transfer] = []
    if not converting:
        return plain, pieces
    group_of = (
        {n: g for g, n in enumerate(mt.names)}
        if mt.groups is None
        else {n: g for g, names in enumerate(mt.groups) for n in names}
    )
    for target, asgs in converting.items():
        if target not in group_of:
            raise CheckpointError(
                f"{ckpt.path}: rules map {asgs[0].source!r} onto {target!r}, "
                "which the model does not have"
            )
        for a in asgs:
            if a.source not in handles:
                raise CheckpointError(
                    f"{ckpt.path}: rules read {a.source!r}, which the checkpoint lacks"
                )
        g = group_of[target]
        shapes = {a.source: ckpt._handle_shape(handles[a.source]) for a in asgs}
        # One source into the first rows of a larger tensor (a grown vocabulary): the rule
        # places it, the rows after it are reported as not loaded.
        one_prefix = len(asgs) == 1 and _first_rows(asgs[0])
        try:
            left = check_parts(target, tuple(mt.tensors[g].shape), asgs, shapes, partial=one_prefix)
        except CheckpointError as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
        p.partly_loaded += [
            (target, f"{'rows' if s.dim == 0 else f'dim {s.dim}'} {s.start}:{s.stop}") for s in left
        ]
        for a in asgs:
            h = handles[a.source]
            _, shape, strides, offset = ckpt._handle_view(h)
            pieces.append(
                Transfer(
                    g,
                    target,
                    a.source,
                    h,
                    source_view(offset, tuple(shape), tuple(strides), a),
                    target_region(target, tuple(mt.tensors[g].shape), a),
                    None,  # rows are part of the source view
                    a.dtype,
                    a.rule,
                )
            )
        p.loaded_by_pieces.append(target)
        if asgs[0].rule is not None:
            p.piece_rules[target] = asgs[0].rule
    return plain, pieces


def _first_rows(a: Any) -> bool:
    """``cat[0:N]`` alone: a source placed at the start of the target's dim 0."""
    from fastckpt.planning.mapping import Span, regions

    r = regions(a.into)
    return len(r) == 1 and isinstance(r[0], Span) and r[0].dim == 0 and r[0].start == 0


def _find_meta_leftovers(
    p: LoadPlan, model: nn.Module, mt: ModelTensors, loaded: set[int], want: torch.device | None
) -> None:
    """Names that would keep no values: tensors on meta that nothing fills."""
    left = (
        []
        if len(loaded) == len(mt.tensors)  # every tensor gets values
        else [
            name
            for g, t in enumerate(mt.tensors)
            if g not in loaded and t.is_meta
            for name in mt.group(g)
        ]
    )
    # Parameters save_pretrained leaves out for from_pretrained to recompute: filled
    # as the non-persistent buffers are (fastckpt.planning.hf_model), not missing.
    if again := set(recomputed(model, p.missing)):
        p.missing = [n for n in p.missing if n not in again]
        left = [n for n in left if n not in again or want is None]
        p.initialised += [n for n in sorted(again) if n not in left]
    # Non-persistent buffers matter when the model is (partly) on meta or is moved
    # (device=, dtype=), and always for transformers models, whose own initialisation
    # gives them values: finding them walks every module, which for a model of 30k
    # tensors on the CPU, loaded in place, would cost more than the load.
    moving = want is not None or p.dtype is not None
    if moving or left or not p._targets.all_cpu or is_transformers_model(model):
        p._hidden_buffers = non_persistent_buffers(model)
        fill = set(fillable(model, p._hidden_buffers))
        for name, (module, attr) in p._hidden_buffers.items():
            on_meta = module._buffers[attr].is_meta  # type: ignore[union-attr]
            if name in fill and (want is not None or not on_meta):
                p.initialised.append(name)
            elif on_meta:
                left.append(name)
    if want is not None and want.type == "meta":
        left = []
        p.initialised = []
    p.left_on_meta = left


def meta_message(p: LoadPlan) -> str:
    hidden = [n for n in p.left_on_meta if n in p._hidden_buffers]
    other = [n for n in p.left_on_meta if n not in p._hidden_buffers]
    lines = [
        (f"{p.path}: the load would leave {len(p.left_on_meta)} tensors of the model on the meta "
        "device, where they have no values; nothing was loaded")
    ]
    if hidden:
        lines.append(f"  non-persistent buffers, which no checkpoint holds ({len(hidden)}):")
        lines += format_groups(hidden)
    if other:
        lines.append(f"  tensors without a source in the checkpoint ({len(other)}):")
        lines += format_groups(other)
    lines.append(
        "  build the model so that buffers are real tensors (accelerate.init_empty_weights() "
        "puts only parameters on meta), or give those tensors values before loading "
        "(model.to_empty(device=...) and your model's own initialisation)"
    )
    return "\n".join(lines)


def _read_targets(path: Path, tensors: list[torch.Tensor], names: list[Any]) -> Any:
    """``_core.Targets`` of these tensors, or a CheckpointError naming one not to write."""
    for name, t in zip(names, tensors, strict=True):
        why = refusal(name, t)
        if why is not None:
            raise CheckpointError(f"{path}: {why}")
    try:
        return _core.Targets(tensors, DTYPE_NAMES)
    except Exception:
        for name, t in zip(names, tensors, strict=True):
            try:
                _core.Targets([t], DTYPE_NAMES)
            except Exception as e:
                raise CheckpointError(
                    f"{path}: the model's {name!r} cannot be loaded into "
                    f"({type(e).__name__}: {e}); fastckpt writes dense (strided) tensors"
                ) from None
        raise


__all__ = ["LoadPlan", "PlanEntry", "Transfer", "match", "plan"]
