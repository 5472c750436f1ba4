"""``load_into``: stream a checkpoint straight into a built model.

``fastckpt.plan`` decides everything first (which source feeds which model
tensor, rows, casts, ties, what is missing) and checks it in full: strict mode
and every refusal happen before anything is written. Then the C++ copy engine
reads each source's bytes from the file into the destination's memory (casting,
selecting rows, staging through a bounded pinned ring for CUDA destinations) on
its own threads with the GIL released.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

import fastckpt._core as _core
from fastckpt.dtypes import DTYPE_NAMES, short_name, to_name, to_torch
from fastckpt.errors import CheckpointError, StrictLoadError, UninitializedWarning
from fastckpt.load import pread_files
from fastckpt.planning.destinations import assign, owners, same_device, state_tensors
from fastckpt.planning.dtensor_plan import agree, fresh_local, has_dtensors, is_dtensor
from fastckpt.planning.hf_model import broken_ties, initialise
from fastckpt.planning.load_plan import LoadPlan, build, meta_message
from fastckpt.planning.transfers import Transfers
from fastckpt.report import LoadReport, SharedReads, format_groups
from fastckpt.source.checkpoint import Checkpoint

if TYPE_CHECKING:
    from fastckpt.load import read_once

# Importable under their earlier names.
_state_tensors = state_tensors
_same_device = same_device


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _default_threads() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def _find_cudart() -> str:
    """Path of the CUDA runtime torch loaded, so the core shares its context."""
    torch.cuda.init()  # type: ignore[no-untyped-call]
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            path = line.rstrip("\n").split(maxsplit=5)[-1]
            base = os.path.basename(path)
            # Wheels may bundle a hash-named copy (libcudart-1a2b3c4d.so.11.0).
            if base.startswith("libcudart") and ".so" in base:
                return path
    import ctypes.util

    found = ctypes.util.find_library("cudart")
    if found is None:
        raise CheckpointError("cannot find the CUDA runtime library (libcudart) torch uses")
    return found


def _strict_message(
    path: str,
    report: LoadReport,
    suggestion_lines: list[str],
    rules_text: str,
    untied: Sequence[tuple[str, str]] = (),
    orientation: Sequence[str] = (),
) -> str:
    lines = [
        (
            f"{path}: checkpoint does not match the model: {len(report.missing)} missing, "
            f"{len(report.unexpected)} unexpected, {len(report.mismatched)} shape mismatches; "
            "nothing was loaded"
        )
    ]
    if report.missing:
        lines.append(f"  missing from the checkpoint ({len(report.missing)}):")
        lines += format_groups(report.missing)
    if untied:
        lines.append(
            f"  declared tied by the model but separate tensors now ({len(untied)}), as "
            "model.to_empty() leaves them: call model.tie_weights() before loading"
        )
        lines += [f"    {name} -> {source}" for name, source in untied]
    if report.unloadable:
        lines.append(
            f"  present in the checkpoint but not loadable ({len(report.unloadable)}):"
        )
        lines += [f"    {name}: {what}" for name, what in report.unloadable]
    if report.unexpected:
        lines.append(f"  unexpected in the checkpoint ({len(report.unexpected)}):")
        lines += format_groups(report.unexpected)
    if report.mismatched:
        lines.append(
            f"  shape mismatches ({len(report.mismatched)}): model name, checkpoint, model"
        )
        width = max(len(m.name) for m in report.mismatched[:10])
        for m in report.mismatched[:10]:
            lines.append(f"    {m.name:<{width}}  {list(m.source_shape)} vs {list(m.target_shape)}")
        if len(report.mismatched) > 10:
            lines.append(f"    ... {len(report.mismatched) - 10} more")
    if report.unused_rules:
        lines.append(f"  rules that matched nothing (a typo?) ({len(report.unused_rules)}):")
        lines += ["    " + r for r in report.unused_rules]
    if rules_text:
        lines.append("  suggested rules (" + "; ".join(suggestion_lines) + "):")
        lines += ["    " + r for r in rules_text.splitlines()]
        lines += orientation  # square weights whose orientation their siblings gave
        lines.append(
            "  pass them as load_into(..., rules=...), or strict=False to load what matches"
        )
    else:
        lines.append("  pass rules=... to rename, or strict=False to load what matches")
    return "\n".join(lines)


def load_into(
    model: nn.Module,
    path: str | os.PathLike[str] | Checkpoint | LoadPlan,
    rules: Any = None,
    *,
    strict: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_host_bytes: int = 256 << 20,
    threads: int | None = None,
    progress: bool = False,
    key: str | Sequence[str] | None = None,
    mmap: bool = False,
    read: str = "own",
    group: Any = None,
) -> LoadReport:
    """Copy the checkpoint at ``path`` into ``model``'s parameters and persistent buffers.

    - ``rules``: a rules object (anything with ``.plan(source_keys, target_keys)``),
      rules text or a rules file; ``None`` matches names exactly.
    - ``strict``: refuse (``StrictLoadError``, nothing modified) when anything is
      missing, unexpected or shape-mismatched; otherwise load what matches and emit
      one ``UninitializedWarning`` naming what stayed as it was.
    - ``device``: where tensors on the meta device (or on another device) are
      allocated and filled, like ``load_state_dict(assign=True)``; the model's
      other tensors, non-persistent buffers included, move there too.
    - ``dtype``: the floating dtype of the loaded model: floating tensors of
      another dtype are replaced by new ones of this dtype (cast on the way).
      A transformers model's non-persistent buffers keep theirs, as with
      ``from_pretrained(dtype=...)``.
    - ``max_host_bytes``: host staging budget beyond the destinations.
    - ``mmap``: tensors fastckpt allocates on the CPU (a meta model with
      ``device="cpu"``) whose bytes in the file need no conversion become views of
      the file's private mapping instead of copies, as ``from_pretrained`` does:
      nothing is read until used, and writes go to private copy-on-write pages,
      never to the file. Prefer copying (the default) for GPU destinations and for
      training that rewrites every weight (each written page is copied then).

    - ``read``: ``"own"`` (the default): each rank reads from storage the bytes it
      needs itself. ``"once"``: the ranks of ``group`` (a ``torch.distributed``
      process group; ``None``: every rank) share the reading: each byte any of them
      needs is read from storage by one of them and sent over the group to the
      others that need it (broadcast or send/recv, on the group's own backend).
      Every rank of the group must call ``load_into`` together; pass each node's
      group (``dist.new_subgroups()``) to read each byte once per node.
      ``report.shared`` says how many bytes this rank read, sent and received.
      ``"pread"``: the runs the plan reads are read with large parallel ``pread``s
      into memory rather than faulted in through a mapping, for network
      filesystems; ``"own"`` switches to it by itself when the checkpoint's files
      lie on NFS, Lustre, CIFS/SMB, FUSE and the like.
    - ``path`` may be a URL (``s3://``, ``gs://``, ``az://``, ``http(s)://``; a folder
      when it ends in ``/``): only the byte runs the plan reads are fetched, with
      ranged GETs, many in flight, window by window within ``max_host_bytes``
      (``report.fetched`` counts them); see fastckpt.source.remote.

    ``path`` may also be a ``LoadPlan`` from ``fastckpt.plan(model, ...)``.
    A load that would leave any tensor on the meta device is refused by name.
    A transformers model's non-persistent buffers (``rotary_emb.inv_freq``,
    ``position_ids``), which no checkpoint holds, get their values from the model's
    own ``_init_weights``, as ``from_pretrained`` gives them: on meta they are
    allocated on ``device``, and after ``model.to_empty()`` their garbage is replaced.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_into needs a torch.nn.Module to load into, not {type(model).__name__}"
        )
    # Planning makes a few small objects per tensor and none of them cyclic; with
    # 30k tensors the collector's passes (over every object torch ever made) cost
    # more than the plan itself. Collection resumes, unchanged, when we return.
    once = _read_mode(read, group, mmap)
    collecting = gc.isenabled()
    gc.disable()
    try:
        # Ranks of a sharded model (or sharing reads) agree before any writes: if
        # one refuses, all do.
        sharded = _distributed() and has_dtensors(model)
        together = sharded or once
        error: BaseException | None = None
        try:
            if isinstance(path, LoadPlan):
                if path._model_ref is not model:
                    raise ValueError("this LoadPlan was made for another model")
                p = path
            else:
                p = build(model, path, rules, key=key, device=device, dtype=dtype, exact=once)
        except (CheckpointError, ValueError, TypeError) as e:
            if not together:
                raise
            error = e
        if together:
            # A sharded model is one over every rank; reads are shared within the group.
            agree(p if error is None else None, error, strict, None if sharded else group)
        if strict and p.problems:
            _refuse(p)
        if p.device is None and (not p._targets.all_cpu or p._global_transfers):
            _refuse_meta_without_device(p)
        if p.left_on_meta:
            raise CheckpointError(meta_message(p))
        planned = time.perf_counter()
        pread = read == "pread" or (read == "own" and not mmap and _on_network_fs(p))
        report = _execute(p, model, max_host_bytes, threads, progress, mmap, once, group, pread)
        report.phases = {"plan": planned - started, **report.phases}
    finally:
        if collecting:
            gc.enable()
    report.seconds = time.perf_counter() - started
    uninitialised = (
        report.missing + [n for n, _ in report.unloadable] + [m.name for m in report.mismatched]
    )
    if uninitialised:
        warnings.warn(
            UninitializedWarning(
                f"{p.path}: {len(uninitialised)} tensors of the model were not loaded and keep "
                "their previous (possibly random) values:\n"
                + "\n".join(format_groups(uninitialised))
            ),
            stacklevel=2,
        )
    return report


def _read_mode(read: str, group: Any, mmap: bool) -> bool:
    """Whether reads are shared (read="once"); ValueError for what cannot go together."""
    if read not in ("own", "once", "pread"):
        raise ValueError(
            f"read must be 'own' or 'once', or 'pread' for network filesystems, not {read!r}"
        )
    if read == "pread" and (group is not None or mmap):
        raise ValueError(
            "read='pread' reads into memory: it goes with neither group= nor mmap=True"
        )
    if read in ("own", "pread"):
        if group is not None:
            raise ValueError("group= says which ranks share reads; it goes with read='once'")
        return False
    if not _distributed():
        raise ValueError(
            "read='once' shares reads between ranks over torch.distributed: call "
            "init_process_group first"
        )
    if mmap:
        raise ValueError(
            "mmap=True maps the file, read='once' receives bytes from other ranks: choose one"
        )
    import torch.distributed as dist

    if group is not None and dist.get_rank(group) < 0:
        raise ValueError(f"this rank ({dist.get_rank()}) is not in the group= it was given")
    return True


def _on_network_fs(p: LoadPlan) -> bool:
    """Whether the checkpoint's files lie on a network filesystem (read="own" then preads)."""
    ckpt = p.checkpoint
    if ckpt._remote is not None:
        return False
    return any(pread_files.on_network_fs(ix.path) for ix in ckpt._core_indexes)


def _report_of(p: LoadPlan) -> LoadReport:
    report = LoadReport()
    report.loaded = list(p.loaded)
    report.missing = list(p.missing)
    report.unexpected = list(p.unexpected)
    report.mismatched = list(p.mismatched)
    report.ignored = list(p.ignored)
    report.unused_rules = list(p.unused_rules)
    report.tied = list(p.tied)
    report.unloadable = list(p.unloadable)
    report.loaded += p.loaded_by_pieces
    report.rule_for.update(p.piece_rules)
    report.partly_loaded = list(p.partly_loaded)
    report.loaded += p.sharded
    report.renamed += [(s, n) for n, s in zip(p.sharded, p.sharded_sources, strict=True) if s != n]
    report.renamed += p.piece_renames
    for _, name, _, _, cut, _, rule in p._chunked:  # the renames are in piece_renames
        if cut is not None:
            report.sliced.append(name)
        if rule is not None:
            report.rule_for[name] = rule
    tr = p.transfers
    if tr.rule is not None or tr.rows is not None:
        rules, rows = tr.column("rule"), tr.column("rows")
        for k in range(tr.whole):
            name, src = tr.target[k], tr.source[k]
            if src != name:
                report.renamed.append((src, name))
            if rows[k] is not None:
                report.sliced.append(name)
            if rules[k] is not None:
                report.rule_for[name] = rules[k]
    return report


def _refuse_meta_without_device(p: LoadPlan) -> None:
    assert p._model is not None
    whole = p.transfers.group[: p.transfers.whole]
    for name, g in zip(p.loaded + p.sharded, whole + p.sharded_groups, strict=True):
        if p._model.tensors[g].is_meta:
            raise CheckpointError(
                f"{name!r} is on the meta device: pass device= to say where to allocate it"
            )


def _refuse(p: LoadPlan) -> None:
    ckpt = p.checkpoint
    state = p._model.state if p._model is not None else {}
    # Imported here: only a refused load needs the suggestion engine (import time).
    from fastckpt.suggest.renames import suggest_rules

    sug = suggest_rules(
        {k: ckpt._handle_shape(h) for k, h in ckpt._handles().items()},
        {n: tuple(t.shape) for n, t in state.items()},
    )
    suggested = None
    if sug.rules_text:
        from fastckpt.planning.rules import Rules

        suggested = Rules.parse(sug.rules_text)
    report = _report_of(p)
    untied = broken_ties(p._model_ref, report.missing)
    raise StrictLoadError(
        _strict_message(
            str(p.path), report, sug.lines, sug.rules_text, untied, sug.orientation_lines()
        ),
        report,
        suggested,
    )


def _execute(
    p: LoadPlan,
    model: nn.Module,
    max_host_bytes: int,
    threads: int | None,
    progress: bool,
    mmap: bool = False,
    once: bool = False,
    group: Any = None,
    pread: bool = False,
) -> LoadReport:
    """Allocate what the plan allocates, copy every transfer, then assign new tensors."""
    prepared = time.perf_counter()
    ckpt = p.checkpoint
    if ckpt._remote is not None and (mmap or once):
        raise ValueError(
            f"{ckpt.path}: a remote checkpoint is fetched by each rank into memory: "
            f"{'mmap=True' if mmap else 'read=' + repr('once')} is for local files"
        )
    report = _report_of(p)
    needs_new = _needs_new(p.device, p.dtype)
    fresh: dict[int, torch.Tensor] = {}
    viewed = _file_views(p, fresh, needs_new) if mmap else set()
    report.mapped = [p.loaded[k] for k in sorted(viewed)]
    dsts, targets = _destinations(p, fresh, needs_new)
    devices = {torch.device("cpu")} if dsts is None else {t.device for t in dsts}
    columns = EngineColumns.of(p.transfers, ckpt)
    n_threads = threads if threads is not None else _default_threads()
    _populate_fresh(fresh, {p.transfers.group[k] for k in viewed}, n_threads)
    remote = ckpt._remote  # a URL's checkpoint: its bytes are fetched, window by window
    if once or remote is not None or pread:
        if dsts is None:
            dsts = [p._model.tensors[g] for g in p.transfers.group]  # type: ignore[union-attr]
        shared = _run_once(
            p, dsts, columns, group, n_threads, max_host_bytes,
            lambda: _before_writing(p, report), remote, pread,
        )  # fmt: skip
        report.bytes = shared.copied
        if once:
            report.shared = SharedReads(shared.read, shared.sent, shared.received)
        else:
            report.fetched = shared.read
        report.cast = _cast_list(columns.names, shared.casts)
    else:
        _copy_all(
            p, dsts, devices, viewed, targets, columns, n_threads, max_host_bytes, progress,
            report,
        )  # fmt: skip
    spent = time.perf_counter() - prepared
    copied = report.phases.get("copy", spent)  # read="once" reads, sends and copies at once
    report.phases = {"prepare": spent - copied, "copy": copied}
    if p.device is not None or p.dtype is not None:
        _assign_new(p, model, fresh, needs_new)
    return report


def _populate_fresh(fresh: dict[int, torch.Tensor], mapped: set[int], threads: int) -> None:
    """New CPU destinations' pages faulted in ahead of the copies, on the load's threads
    (copy/populate.h: cheaper than the same faults among the copies' reads). Not the
    groups ``mapped`` to the file by mmap=True: populating those for writing would copy
    them."""
    # A DTensor's own storage is not its memory: its local tensor's is.
    local: list[torch.Tensor] = [
        t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]
        for g, t in fresh.items()
        if g not in mapped
    ]
    storages = [t.untyped_storage() for t in local if t.device.type == "cpu"]
    ranges = [(s.data_ptr(), s.nbytes()) for s in storages]
    if ranges:
        _core.populate_for_writing(ranges, threads)


def _needs_new(
    want: torch.device | None, dtype: torch.dtype | None
) -> Callable[[torch.Tensor], bool]:
    """Whether a model tensor is replaced by a new one: on meta, elsewhere than ``want``, or
    floating in another dtype than ``dtype``."""

    def needs_new(t: torch.Tensor) -> bool:
        return (
            t.is_meta
            or (want is not None and not same_device(t.device, want))
            or (dtype is not None and t.is_floating_point() and t.dtype != dtype)
        )

    return needs_new


def _destinations(
    p: LoadPlan, fresh: dict[int, torch.Tensor], needs_new: Callable[[torch.Tensor], bool]
) -> tuple[list[torch.Tensor] | None, Any]:
    """Each transfer's destination view and their ``_core.Targets``: group g's destination
    is the model's own tensor, or a fresh one (``fresh``) for meta, other-device or
    other-dtype targets; a region of it for a piece. None (and the plan's Targets) when
    every copy goes whole into the model's own CPU tensors."""
    assert p._model is not None
    tensors, want, dtype = p._model.tensors, p.device, p.dtype
    tr = p.transfers
    pieces = len(tr) > tr.whole
    if want is None and dtype is None and p._targets.all_cpu and not pieces:
        return None, p._targets
    dsts = []
    regions = tr.column("region")
    for k, g in enumerate(tr.group):
        t = fresh.get(g, tensors[g])
        if t is tensors[g] and needs_new(t):
            new_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            if is_dtensor(t):
                t = fresh[g] = fresh_local(t, new_dtype, want or t.device)
            else:
                t = fresh[g] = torch.empty(t.shape, dtype=new_dtype, device=want or t.device)
        if t.device.type not in ("cpu", "cuda"):
            raise CheckpointError(
                f"{tr.target[k]!r} is on {t.device}; fastckpt loads into CPU and CUDA tensors"
            )
        region = regions[k]
        dsts.append(t if region is None else region.of(t))
    if fresh or pieces:
        return dsts, _core.Targets(dsts, DTYPE_NAMES)
    return dsts, p._targets


def _assign_new(
    p: LoadPlan,
    model: nn.Module,
    fresh: dict[int, torch.Tensor],
    needs_new: Callable[[torch.Tensor], bool],
) -> None:
    """The new tensors take the place of the model's (ties kept); other tensors and
    non-persistent buffers move to ``device`` / ``dtype``."""
    assert p._model is not None
    mt, want, dtype = p._model, p.device, p.dtype
    tensors = mt.tensors
    where = owners(model)
    for g, t in fresh.items():
        assign(mt.group(g), tensors[g], t, where)
    for g, old in enumerate(tensors):
        if g not in fresh and not old.is_meta and needs_new(old):
            assign(mt.group(g), old, _moved(old, want, dtype), where)
    own_dtype = set(p.initialised)
    for name, (module, attr) in p._hidden_buffers.items():
        buf = module._buffers[attr]
        if buf is not None and not buf.is_meta and needs_new(buf):
            module._buffers[attr] = _moved(buf, want, None if name in own_dtype else dtype)


def _device_key(d: torch.device) -> tuple[str, int]:
    return ("cuda", d.index or 0) if d.type == "cuda" else ("cpu", 0)


def _on_host(t: torch.Tensor) -> bool:
    return _device_key(t.device)[0] == "cpu"


class EngineColumns(NamedTuple):
    """The transfer list as the copy engine takes it: per task the source handle, the model
    and checkpoint names (errors), rows as ``(start, count)`` or an index list, the cast's
    dtype name and the source view; a column of Nones is None."""

    handles: list[int]
    names: list[str]
    sources: list[str] | None
    rows: list[Any] | None
    vias: list[str | None] | None
    views: list[Any] | None

    @classmethod
    def of(cls, tr: Transfers, ckpt: Any) -> EngineColumns:
        rows: list[Any] | None = None
        if tr.rows is not None:
            rows = [
                None if sel is None
                else list(sel.index) if sel.index is not None
                else (sel.start, sel.rows(ckpt._handle_shape(h)[0]))
                for sel, h in zip(tr.rows, tr.handle, strict=True)
            ]  # fmt: skip
        vias = None if tr.via is None else [None if d is None else to_name(d) for d in tr.via]
        return cls(tr.handle, tr.target, tr.source, rows, vias, tr.src_view)

    def subset(self, ks: list[int]) -> EngineColumns:
        if len(ks) == len(self.handles):
            return self

        def part(c: list[Any] | None) -> Any:
            return None if c is None else [c[k] for k in ks]

        return EngineColumns(
            part(self.handles), part(self.names), part(self.sources), part(self.rows),
            part(self.vias), part(self.views),
        )  # fmt: skip


def _job(
    indexes: list[Any], columns: EngineColumns, targets: Any, device: tuple[str, int],
    n_threads: int, max_host_bytes: int, exact: bool,
) -> Any:  # fmt: skip
    """The copy engine's job for these tasks, all into tensors on ``device``."""
    kind, dev_index = device
    sink = cudart = ""
    if kind == "cuda":
        torch.cuda.synchronize(dev_index)  # memory torch just handed out may still be in use
        sink, cudart = "cuda", _find_cudart()
    c = columns
    return _core.CopyJob.from_targets(
        indexes, c.handles, targets, c.names, c.sources, c.rows, c.vias, n_threads,
        max_host_bytes, sink, cudart, dev_index, c.views, exact,
    )  # fmt: skip


def _cast_list(names: list[str], casts: list[tuple[int, str, str]]) -> list[tuple[str, str, str]]:
    """(model name, from, to) per model tensor, in task order, from the jobs' (task, from, to)."""
    seen: dict[str, tuple[int, str, str, str]] = {}
    for k, src_dtype, dst_dtype in casts:
        seen.setdefault(
            names[k],
            (k, names[k], short_name(to_torch(src_dtype)), short_name(to_torch(dst_dtype))),
        )
    return [c[1:] for c in sorted(seen.values())]


def _copy_all(
    p: LoadPlan, dsts: list[torch.Tensor] | None, devices: set[torch.device], viewed: set[int],
    targets: Any, columns: EngineColumns, n_threads: int, max_host_bytes: int, progress: bool,
    report: LoadReport,
) -> None:  # fmt: skip
    """Every task read by this rank from the file: one copy job per device."""
    ckpt = p.checkpoint
    n = len(columns.handles)
    by_device: dict[tuple[str, int], list[int]] = {}
    if len(devices) <= 1:
        d = next(iter(devices), torch.device("cpu"))
        by_device[_device_key(d)] = [k for k in range(n) if k not in viewed]
    else:
        assert dsts is not None  # several devices: read above
        for k, t in enumerate(dsts):
            if k not in viewed:
                by_device.setdefault(_device_key(t.device), []).append(k)
    built: list[tuple[Any, list[int]]] = []
    for device, ks in by_device.items():
        job = _job(
            ckpt._core_indexes, columns.subset(ks), targets if len(ks) == n else targets.subset(ks),
            device, n_threads, max_host_bytes, bool(p._global_transfers),
        )  # fmt: skip
        built.append((job, ks))
    report.cast = _cast_list(
        columns.names, [(ks[i], s, d) for job, ks in built for i, s, d in job.casts()]
    )
    _before_writing(p, report)
    # Everything is checked: from here on the model is written.
    for job, _ in built:
        report.bytes += job.total_bytes
    copying = time.perf_counter()
    _run_jobs([job for job, _ in built], progress, str(ckpt.path))
    report.phases["copy"] = time.perf_counter() - copying


def _before_writing(p: LoadPlan, report: LoadReport) -> None:
    """What happens once everything is checked, before the first copy: a transformers
    model's non-persistent buffers get their values (fastckpt.planning.hf_model)."""
    if p.initialised:
        initialise(
            p._model_ref, p.initialised, p._hidden_buffers, p.device, p.checkpoint.path, p.dtype
        )
        report.initialised = list(p.initialised)


def _run_once(
    p: LoadPlan, dsts: list[torch.Tensor], columns: EngineColumns, group: Any, n_threads: int,
    max_host_bytes: int, before_writing: Callable[[], None], remote: Any = None,
    pread: bool = False,
) -> read_once.Counts:  # fmt: skip
    """read="once": every task, its bytes read by one rank of the group (load.read_once);
    or, from a remote checkpoint, fetched by this rank (load.remote_reads)."""
    # Imported by these loads only: `import fastckpt` builds no class a plain load never uses.
    from fastckpt.load import read_once, remote_reads

    ckpt = p.checkpoint
    indexes = ckpt._core_indexes
    views, rows = columns.views, columns.rows
    vias = columns.vias
    tasks = []
    with torch.no_grad():
        for k, h in enumerate(columns.handles):
            dtype, shape, strides, offset = ckpt._handle_view(h)
            view = views[k] if views is not None and views[k] is not None else None
            if view is None:
                view = (offset, tuple(shape), tuple(strides))
            file, base = ckpt._handle_storage(h)
            tasks.append(read_once.Task(
                k, h, file, view, None if rows is None else rows[k],
                None if vias is None else vias[k], dsts[k], base, dtype.itemsize,
            ))  # fmt: skip

    def make_jobs(over: list[Any], part: list[read_once.Task]) -> list[tuple[Any, list[int]]]:
        by_device: dict[tuple[str, int], list[read_once.Task]] = {}
        for t in part:
            by_device.setdefault(_device_key(t.dst.device), []).append(t)
        jobs = []
        for device, ts in by_device.items():
            ks = [t.pos for t in ts]
            # the tasks' views are their own (a window's cut of them), not the plan's
            cols = columns.subset(ks)._replace(
                handles=[t.handle for t in ts], rows=[t.rows for t in ts],
                vias=[t.via for t in ts], views=[t.view for t in ts],
            )  # fmt: skip
            job = _job(
                over, cols, _core.Targets([t.dst for t in ts], DTYPE_NAMES), device, n_threads,
                max_host_bytes, False,
            )  # fmt: skip
            jobs.append((job, ks))
        return jobs

    if remote is not None:
        return remote_reads.run(
            tasks, remote.files, indexes, remote.gap, max_host_bytes, make_jobs, before_writing,
            _on_host,
        )  # fmt: skip
    if pread:
        return _run_pread(tasks, ckpt, max_host_bytes, make_jobs, before_writing)
    return read_once.run(tasks, indexes, group, max_host_bytes, make_jobs, before_writing)


def _run_pread(
    tasks: list[read_once.Task], ckpt: Checkpoint, max_host_bytes: int, make_jobs: Any,
    before_writing: Callable[[], None],
) -> read_once.Counts:  # fmt: skip
    """read="pread": the runs the tasks read, pread into memory files (load.pread_files)."""
    from fastckpt.load import remote_reads

    indexes = ckpt._core_indexes
    files = [pread_files.PreadFile(ix.path, ix.file_size) for ix in indexes]
    try:
        over = [ix.over(f.path) for ix, f in zip(indexes, files, strict=True)]
        return remote_reads.run(
            tasks, files, over, 0, max_host_bytes, make_jobs, before_writing, _on_host
        )
    finally:
        for f in files:
            f.close()


def _file_views(
    p: LoadPlan, fresh: dict[int, torch.Tensor], needs_new: Any
) -> set[int]:
    """``mmap=True``: entries that need a new CPU tensor whose file bytes are exactly that
    tensor (same dtype, no rows, contiguous, aligned) get a view of the checkpoint's
    private mapping instead of a copy; returns their positions. Writes to such a
    tensor go to private copy-on-write pages, never to the file."""
    assert p._model is not None
    if p.device is not None and p.device.type != "cpu":
        return set()
    tensors, ckpt, dtype = p._model.tensors, p.checkpoint, p.dtype
    tr = p.transfers
    rows, vias = tr.column("rows"), tr.column("via")
    viewed: set[int] = set()
    for k in range(tr.whole):
        g = tr.group[k]
        t = tensors[g]
        if g in fresh or not needs_new(t) or (p.device is None and not t.is_meta):
            continue
        if rows[k] is not None or vias[k] is not None:
            continue
        new_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        view, in_file = ckpt._handle_tensor(tr.handle[k])
        if in_file and view.dtype == new_dtype and view.is_contiguous():
            fresh[g] = view
            viewed.add(k)
    return viewed


def _moved(t: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` on ``device`` and, if floating, in ``dtype`` (as ``model.to`` would)."""
    to_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    return t.detach().to(device=device or t.device, dtype=to_dtype)


def _run_jobs(jobs: list[Any], progress: bool, label: str) -> None:
    if not progress:
        for job in jobs:
            job.run()
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    total = sum(j.total_bytes for j in jobs)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
    ) as bar:
        task = bar.add_task(f"loading {Path(label).name}", total=total)
        done = 0
        for job in jobs:
            errors: list[BaseException] = []

            def run(job: Any = job, errors: list[BaseException] = errors) -> None:
                try:
                    job.run()
                except BaseException as e:  # re-raised on the calling thread
                    errors.append(e)

            worker = threading.Thread(target=run, name="fastckpt-load")
            worker.start()
            try:
                while worker.is_alive():
                    worker.join(0.1)
                    bar.update(task, completed=done + job.bytes_done)
            finally:
                # A KeyboardInterrupt here must not return while the job still
                # writes into tensors the caller may free.
                worker.join()
            if errors:
                raise errors[0]
            done += job.total_bytes
        bar.update(task, completed=total)
