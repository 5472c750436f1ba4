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
from collections.abc import Callable, Sequence
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
from fastckpt.planning.dtensor_plan import any_dtensor, dtensors_possible, is_dtensor, plan_shards
from fastckpt.planning.mapping import MappingPlan, RowSelection, plain_plan
from fastckpt.planning.rules import as_rules
from fastckpt.report import Mismatch, format_groups, group_names
from fastckpt.source.checkpoint import Checkpoint, Opening

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


SourceView = tuple[
    int, tuple[int, ...], tuple[int, ...]
]  # storage offset, shape, strides (elements)


@dataclass(frozen=True, slots=True)
class Piece:
    """One copy into (part of) a model tensor that is not a plain whole-tensor entry:
    a shard, a stacked expert, a transposed or concatenated source.

    ``dst_view`` maps the destination tensor (the model's own, or the one fastckpt
    allocated) to the torch view that is written; ``src_view`` replaces the source
    tensor's own view of its storage (the core checks it stays inside).
    """

    group: int  # the model tensor (ModelTensors index)
    target: str  # the model name (labels, report)
    source: str  # the checkpoint name
    handle: int  # Checkpoint's handle for the source
    src_view: SourceView | None = None
    dst_view: Callable[[torch.Tensor], torch.Tensor] | None = None
    rows: RowSelection | None = None
    via: torch.dtype | None = None


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


@dataclass
class LoadPlan:
    """What a load of ``path`` into a model would do; ``load_into`` executes it.

    Nothing in it has touched the model: it is safe to build, print and drop.
    """

    path: Path
    loaded: list[str] = field(default_factory=list)  # model names written (one per tie group)
    sources: list[str] = field(default_factory=list)  # the checkpoint name feeding each
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
    pieces: list[Piece] = field(default_factory=list)  # copies into parts of model tensors
    loaded_by_pieces: list[str] = field(default_factory=list)  # model names pieces fill
    piece_rules: dict[str, str] = field(default_factory=dict)  # model name -> rule, for pieces
    partly_loaded: list[tuple[str, str]] = field(default_factory=list)  # (name, part left)
    # DTensor destinations (fastckpt.planning.dtensor_plan): model names, their sources and tensors'
    # groups; the file bytes of this rank's shards.
    sharded: list[str] = field(default_factory=list)
    sharded_sources: list[str] = field(default_factory=list)
    sharded_groups: list[int] = field(default_factory=list)
    local_bytes: int = 0
    any_sharded: bool = False  # the model has DTensors: load_into's ranks agree before writing
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    # Execution state (fastckpt.load.execute): the checkpoint, destinations and per-entry details.
    _ckpt: Any = None
    _model: ModelTensors | None = None
    _model_ref: Any = None
    _groups: list[int] = field(default_factory=list)  # group index per loaded entry
    _handles: list[int] = field(default_factory=list)  # source handle per loaded entry
    _targets: Any = None  # _core.Targets of the loaded entries' current tensors
    _rules: list[str | None] | None = None
    _rows: list[RowSelection | None] | None = None
    _vias: list[torch.dtype | None] | None = None
    _hidden_buffers: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)

    @property
    def problems(self) -> bool:
        """Strict mode refuses this plan."""
        return bool(self.missing or self.unexpected or self.mismatched or self.unloadable)

    @property
    def checkpoint(self) -> Checkpoint:
        ckpt: Checkpoint = self._ckpt
        return ckpt

    def entries(self) -> list[PlanEntry]:
        """One ``PlanEntry`` per loaded tensor, in model order."""
        assert self._model is not None
        ckpt = self._ckpt
        aliases: dict[str, list[str]] = {}
        for alias, via in self.tied:
            aliases.setdefault(via, []).append(alias)
        out = []
        for k, name in enumerate(self.loaded):
            handle = self._handles[k]
            dtype, shape, _, _ = ckpt._handle_view(handle)
            rows = self._rows[k] if self._rows is not None else None
            if rows is not None and shape:
                shape = rows.shape(tuple(shape))
            dst = self._model.tensors[self._groups[k]]
            target_dtype = dst.dtype
            if self.dtype is not None and dst.is_floating_point():
                target_dtype = self.dtype
            numel = 1
            for d in shape:
                numel *= d
            out.append(
                PlanEntry(
                    name,
                    self.sources[k],
                    ckpt._handle_file(handle),
                    self._rules[k] if self._rules is not None else None,
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
        if self.sharded:
            from fastckpt.planning.dtensor_plan import bytes_per_rank

            console.print(
                f"  {len(self.sharded)} sharded tensors; this rank reads "
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
    want = torch.device(device) if device is not None else None
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, not {type(dtype).__name__}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(
            f"dtype= sets the floating dtype of the model's tensors; {dtype} is not one"
        )
    # The files are indexed on C++ threads while the model is walked and its
    # tensors are read here: on a 30k-tensor checkpoint each takes tens of ms.
    # A rank loading its shards must fetch only their pages, so its headers are
    # parsed with no readahead. Whether the model has DTensors is known only after
    # the walk the parsing overlaps; a process that made DTensors has imported
    # their module, so that decides (a plain load there only loses readahead while parsing).
    # ``exact``: ranks sharing reads (read="once") fetch only the pages they are given.
    opening = (
        None
        if isinstance(path, Checkpoint)
        else Opening(path, exact_reads=exact or dtensors_possible())
    )
    mt = ModelTensors.of(model)
    any_sharded = any_dtensor(mt.tensors)
    names, tensors, groups = mt.names, mt.tensors, mt.groups
    plain = all_plain(tensors)
    # Every destination is read now, before the index is waited for; usually all
    # of them have a source. A tensor fastckpt cannot describe fails only if it is
    # needed: it is read again, alone with the others needed, below.
    every_target: Any = None
    if plain:
        try:
            every_target = _core.Targets(tensors, DTYPE_NAMES)
        except Exception:
            every_target = None
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint(path, key=key, _opening=opening)
    p = LoadPlan(path=ckpt.path, device=want, dtype=dtype, _ckpt=ckpt, _model=mt, _model_ref=model)
    p.any_sharded = any_sharded

    rules_obj = as_rules(rules)
    if rules_obj is None:
        rules_obj = _transformers_rules(model, mt, ckpt)
    ignored_sources: set[str] = set()
    ignored_targets: set[str] = set()
    picks: dict[str, Any] | None = None  # rules only; exact names need no pick objects
    used_sources: Any = None
    wanted: Any = None  # name -> handle, looked at only when some name is not in the file
    if rules_obj is not None:
        target_names = mt.all_names()
        target_set = set(target_names)
        entries = ckpt._handles()
        mapping = match(list(entries), target_names, rules_obj)
        p.unused_rules = list(mapping.unused_rules)
        p.ignored = list(mapping.ignored_sources) + list(mapping.ignored_targets)
        ignored_sources, ignored_targets = (
            set(mapping.ignored_sources),
            set(mapping.ignored_targets),
        )
        picks = {}
        used_sources = set()
        plain_assignments = _add_pieces(p, mt, ckpt, entries, mapping.assignments)
        used_sources.update(pc.source for pc in p.pieces)
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
            if a.target in picks:
                raise CheckpointError(
                    f"{ckpt.path}: two checkpoint tensors map onto {a.target!r}: "
                    f"{picks[a.target].source!r} and {a.source!r}"
                )
            picks[a.target] = a
            used_sources.add(a.source)
        wanted = picks

    # Per group, the name written through: for tied names the last one (state_dict
    # order) with a source, so the result equals load_state_dict's, which copies
    # each name in turn. The common case (plain names, no ties, every name in the
    # file) stays in C-level loops: this is per-tensor work for 30k-tensor models.
    vias: list[str | None]
    locs = ckpt._find_all(names) if picks is None and groups is None else None
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
        for g, via in enumerate(vias):
            if via is None:
                p.missing += [n for n in mt.group(g) if n not in ignored_targets]
    if p.missing and (present := ckpt.unloadable()):
        p.unloadable = [(n, present[n]) for n in p.missing if n in present]
        p.missing = [n for n in p.missing if n not in present]
    if p.loaded_by_pieces:
        by_pieces = {n for pc in p.pieces for n in mt.group(pc.group)}
        p.missing = [n for n in p.missing if n not in by_pieces]
    cand_picks: list[Any] | None = None
    if picks is None:
        if locs is not None and len(cand) == len(locs):
            cand_sources: list[int] = locs  # type: ignore[assignment]  # every name was found
        else:
            cand_sources = [wanted[vias[g]] for g in cand]
        dim0 = None
    else:
        cand_picks = [picks[vias[g]] for g in cand]  # type: ignore[index]
        cand_sources = [entries[a.source] for a in cand_picks]
        dim0 = [
            None
            if a.rows is None or not (shape := ckpt._handle_shape(h))
            else a.rows.rows(shape[0])
            for a, h in zip(cand_picks, cand_sources, strict=True)
        ]
    n_cand = len(cand)
    if any_sharded:
        # DTensors are copied shard by shard (pieces); the rest as whole tensors.
        split = [k for k, g in enumerate(cand) if is_dtensor(tensors[g])]
        plan_shards(
            p,
            ckpt,
            [
                (
                    cand[k],
                    vias[cand[k]],  # type: ignore[misc]
                    vias[cand[k]] if cand_picks is None else cand_picks[k].source,
                    cand_sources[k],
                    None if cand_picks is None else cand_picks[k].rows,
                    None if cand_picks is None else cand_picks[k].dtype,
                )
                for k in split
            ],
        )
        keep_plain = [k for k in range(len(cand)) if not is_dtensor(tensors[cand[k]])]
        cand = [cand[k] for k in keep_plain]
        cand_sources = [cand_sources[k] for k in keep_plain]
        if cand_picks is not None:
            cand_picks = [cand_picks[k] for k in keep_plain]
        if dim0 is not None:
            dim0 = [dim0[k] for k in keep_plain]
    if every_target is None:
        targets = _read_targets(ckpt.path, [tensors[g] for g in cand], [vias[g] for g in cand])
    else:
        targets = every_target if len(cand) == len(tensors) else every_target.subset(cand)
    for k in targets.lazy_views():
        g = cand[k]
        raise CheckpointError(f"{ckpt.path}: {refusal(str(vias[g]), tensors[g])}")
    bad = targets.mismatched(ckpt._core_indexes, cand_sources, dim0)
    if bad:
        for k in bad:
            g, h = cand[k], cand_sources[k]
            p.mismatched.append(
                Mismatch(str(vias[g]), ckpt._handle_shape(h), tuple(tensors[g].shape))
            )
        bad_set = set(bad)
        keep = [k for k in range(len(cand)) if k not in bad_set]
        targets = targets.subset(keep)
        loadable = [cand[k] for k in keep]
        sources = [cand_sources[k] for k in keep]
        if cand_picks is not None:
            cand_picks = [cand_picks[k] for k in keep]
    else:
        loadable, sources = cand, cand_sources
    # Without rules every candidate uses its own, distinct source: when they cover
    # the whole file, nothing in it is unexpected (no need to look at each key).
    if picks is None and groups is None and n_cand == len(ckpt):
        p.unexpected = []
    else:
        if used_sources is None:
            used_sources = set(mt.all_names())
        p.unexpected = [
            k for k in ckpt._handles() if k not in used_sources and k not in ignored_sources
        ]

    p._groups = loadable
    p._handles = sources
    p._targets = targets
    p.loaded = [vias[g] for g in loadable]  # type: ignore[misc]
    if cand_picks is None:
        p.sources = p.loaded
    else:
        p.sources = [a.source for a in cand_picks]
        p._rules = [a.rule for a in cand_picks]
        p._rows = [a.rows for a in cand_picks]
        p._vias = [a.dtype for a in cand_picks]
    if groups is not None:
        # Loaded groups first, then unloaded ones, as the report always listed them.
        loaded_set = set(loadable)
        p.tied = [
            (n, via)
            for g in loadable
            if (via := vias[g]) is not None
            for n in groups[g]
            if n != via
        ] + [
            (n, groups[g][0])
            for g in range(len(groups))
            if g not in loaded_set and vias[g] is None
            for n in groups[g][1:]
        ]
    _find_meta_leftovers(
        p, model, mt, set(loadable) | {pc.group for pc in p.pieces} | set(p.sharded_groups), want
    )
    return p


def _transformers_rules(model: nn.Module, mt: ModelTensors, ckpt: Checkpoint) -> Any:
    """transformers' own conversions (fastckpt.planning.hf_conversions) for one of its models whose
    checkpoint names differ from the model's; None otherwise."""
    if "transformers" not in sys.modules:  # not one of its models: spare the import
        return None
    from fastckpt.planning.hf_conversions import is_transformers_model, rules_for

    if not is_transformers_model(model):
        return None
    handles = ckpt._handles()
    names = mt.all_names()
    if len(handles) == len(names) and all(n in handles for n in names):
        return None  # the model's own names: nothing to convert
    return rules_for(model, lambda k: ckpt._handle_shape(handles[k]))


def _add_pieces(
    p: LoadPlan, mt: ModelTensors, ckpt: Checkpoint, handles: dict[str, int], assignments: list[Any]
) -> list[Any]:
    """Assignments that convert (a region, a transpose, a row permutation, several sources
    for one target) become ``p.pieces``, checked before anything is written; the plain
    whole-tensor ones are returned."""
    from fastckpt.planning.views import check_parts, source_view, target_view

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
    if not converting:
        return plain
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
            p.pieces.append(
                Piece(
                    g,
                    target,
                    a.source,
                    h,
                    source_view(offset, tuple(shape), tuple(strides), a),
                    lambda t, a=a: target_view(t, a),  # type: ignore[misc]
                    None,  # rows are part of the source view
                    a.dtype,
                )
            )
        p.loaded_by_pieces.append(target)
        if asgs[0].rule is not None:
            p.piece_rules[target] = asgs[0].rule
    return plain


def _first_rows(a: Any) -> bool:
    """``cat[0:N]`` alone: a source placed at the start of the target's dim 0."""
    from fastckpt.planning.mapping import Span, regions

    r = regions(a.into)
    return len(r) == 1 and isinstance(r[0], Span) and r[0].dim == 0 and r[0].start == 0


def _find_meta_leftovers(
    p: LoadPlan, model: nn.Module, mt: ModelTensors, loaded: set[int], want: torch.device | None
) -> None:
    """Names that would keep no values: tensors on meta that nothing fills."""
    from fastckpt.planning.hf_conversions import is_transformers_model
    from fastckpt.planning.hf_model import fillable, recomputed

    left = [
        name
        for g, t in enumerate(mt.tensors)
        if g not in loaded and t.is_meta
        for name in mt.group(g)
    ]
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


__all__ = ["LoadPlan", "Piece", "PlanEntry", "match", "plan"]
