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
from typing import Any

import torch
from torch import nn

import fastckpt._core as _core
from fastckpt.dtypes import DTYPE_NAMES, short_name, to_name, to_torch
from fastckpt.errors import CheckpointError, StrictLoadError, UninitializedWarning
from fastckpt.load import read_once
from fastckpt.planning.destinations import assign, owners, refusal, same_device, state_tensors
from fastckpt.planning.dtensor_plan import agree, fresh_local, has_dtensors, is_dtensor
from fastckpt.planning.hf_model import broken_ties, initialise
from fastckpt.planning.load_plan import LoadPlan, build, meta_message
from fastckpt.report import LoadReport, SharedReads, format_groups
from fastckpt.source.checkpoint import Checkpoint
from fastckpt.suggest.renames import suggest_rules

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
        if p.device is None and (not p._targets.all_cpu or p.sharded):
            _refuse_meta_without_device(p)
        if p.left_on_meta:
            raise CheckpointError(meta_message(p))
        planned = time.perf_counter()
        report = _execute(p, model, max_host_bytes, threads, progress, mmap, once, group)
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
    if read not in ("own", "once"):
        raise ValueError(f"read must be 'own' or 'once', not {read!r}")
    if read == "own":
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
    if p._rules is not None:
        assert p._rows is not None
        for k, (name, src) in enumerate(zip(p.loaded, p.sources, strict=True)):
            if src != name:
                report.renamed.append((src, name))
            if p._rows[k] is not None:
                report.sliced.append(name)
            rule = p._rules[k]
            if rule is not None:
                report.rule_for[name] = rule
    return report


def _refuse_meta_without_device(p: LoadPlan) -> None:
    assert p._model is not None
    for name, g in zip(p.loaded + p.sharded, p._groups + p.sharded_groups, strict=True):
        if p._model.tensors[g].is_meta:
            raise CheckpointError(
                f"{name!r} is on the meta device: pass device= to say where to allocate it"
            )


def _refuse(p: LoadPlan) -> None:
    ckpt = p.checkpoint
    state = p._model.state if p._model is not None else {}
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
        _strict_message(str(p.path), report, sug.lines, sug.rules_text, untied), report, suggested
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
) -> LoadReport:
    """Allocate what the plan allocates, copy every source, then assign new tensors."""
    prepared = time.perf_counter()
    assert p._model is not None
    mt = p._model
    ckpt = p.checkpoint
    want, dtype = p.device, p.dtype
    tensors = mt.tensors
    report = _report_of(p)

    def needs_new(t: torch.Tensor) -> bool:
        return (
            t.is_meta
            or (want is not None and not same_device(t.device, want))
            or (dtype is not None and t.is_floating_point() and t.dtype != dtype)
        )

    # Tasks: one per loaded entry (whole tensors), then one per piece (part of a
    # tensor, or a view of a source). Group g's destination is the model's own
    # tensor, or a fresh one for meta, other-device or other-dtype targets.
    groups = p._groups + [pc.group for pc in p.pieces]
    n_main = len(p._groups)
    names = p.loaded + [pc.target for pc in p.pieces]
    handles = p._handles + [pc.handle for pc in p.pieces]
    fresh: dict[int, torch.Tensor] = {}
    viewed = _file_views(p, fresh, needs_new) if mmap else set()
    report.mapped = [p.loaded[k] for k in sorted(viewed)]
    targets = p._targets
    dsts: list[torch.Tensor] | None = None  # only read off the model when something may differ
    if want is not None or dtype is not None or not targets.all_cpu or p.pieces:
        final: list[torch.Tensor] = []
        for k, g in enumerate(groups):
            t = fresh.get(g, tensors[g])
            if t is tensors[g] and needs_new(t):
                new_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
                if is_dtensor(t):
                    t = fresh[g] = fresh_local(t, new_dtype, want or t.device)
                else:
                    t = fresh[g] = torch.empty(t.shape, dtype=new_dtype, device=want or t.device)
            if t.device.type not in ("cpu", "cuda"):
                raise CheckpointError(
                    f"{names[k]!r} is on {t.device}; fastckpt loads into CPU and CUDA tensors"
                )
            final.append(t)
        dsts = final[:n_main] + [
            final[n_main + i] if pc.dst_view is None else pc.dst_view(final[n_main + i])
            for i, pc in enumerate(p.pieces)
        ]
        # A piece's view must itself be a tensor fastckpt may write (a view of a
        # DTensor, say, is not): checked before anything is written.
        for k in range(n_main, len(dsts)):
            why = refusal(names[k], dsts[k])
            if why is not None:
                raise CheckpointError(f"{p.path}: {why}")
        if fresh or p.pieces:
            targets = _core.Targets(dsts, DTYPE_NAMES)
    devices = {torch.device("cpu")} if dsts is None else {t.device for t in dsts}

    rows: list[Any] | None = None
    via_dtypes: list[str | None] | None = None
    src_names: list[str] | None = None
    views: list[Any] | None = None
    if p._rows is not None or p.pieces:
        selections = (p._rows or [None] * n_main) + [pc.rows for pc in p.pieces]
        dtypes = (p._vias or [None] * n_main) + [pc.via for pc in p.pieces]
        src_names = p.sources + [pc.source for pc in p.pieces]
        rows = []
        for sel, h in zip(selections, handles, strict=True):
            if sel is None:
                rows.append(None)
            elif sel.index is not None:
                rows.append(list(sel.index))
            else:
                rows.append((sel.start, sel.rows(ckpt._handle_shape(h)[0])))
        via_dtypes = [to_name(d) if d is not None else None for d in dtypes]
    if p.pieces:
        views = [None] * n_main + [pc.src_view for pc in p.pieces]

    n_threads = threads if threads is not None else _default_threads()
    if once:
        if dsts is None:
            dsts = [tensors[g] for g in groups]
        shared = _run_once(
            p, dsts, handles, names, src_names or names, rows, via_dtypes, views, group,
            n_threads, max_host_bytes, lambda: _before_writing(p, report),
        )  # fmt: skip
        report.bytes = shared.copied
        report.shared = SharedReads(shared.read, shared.sent, shared.received)
        report.cast = _cast_list(names, shared.casts)
    else:
        _copy_all(
            p, groups, dsts, devices, viewed, targets, handles, names, src_names, rows,
            via_dtypes, views, n_threads, max_host_bytes, progress, report,
        )  # fmt: skip
    spent = time.perf_counter() - prepared
    copied = report.phases.get("copy", spent)  # read="once" reads, sends and copies at once
    report.phases = {"prepare": spent - copied, "copy": copied}

    if want is not None or dtype is not None:
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
    return report


def _device_key(d: torch.device) -> tuple[str, int]:
    return ("cuda", d.index or 0) if d.type == "cuda" else ("cpu", 0)


def _job(
    indexes: list[Any], handles: list[int], targets: Any, names: list[str], src_names: Any,
    rows: Any, vias: Any, views: Any, device: tuple[str, int], n_threads: int,
    max_host_bytes: int, exact: bool,
) -> Any:  # fmt: skip
    """The copy engine's job for these tasks, all into tensors on ``device``."""
    kind, dev_index = device
    sink = cudart = ""
    if kind == "cuda":
        torch.cuda.synchronize(dev_index)  # memory torch just handed out may still be in use
        sink, cudart = "cuda", _find_cudart()
    return _core.CopyJob.from_targets(
        indexes, handles, targets, names, src_names, rows, vias, n_threads, max_host_bytes,
        sink, cudart, dev_index, views, exact,
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
    p: LoadPlan, groups: list[int], dsts: list[torch.Tensor] | None, devices: set[torch.device],
    viewed: set[int], targets: Any, handles: list[int], names: list[str], src_names: Any,
    rows: Any, via_dtypes: Any, views: Any, n_threads: int, max_host_bytes: int,
    progress: bool, report: LoadReport,
) -> None:  # fmt: skip
    """Every task read by this rank from the file: one copy job per device."""
    ckpt = p.checkpoint
    by_device: dict[tuple[str, int], list[int]] = {}
    if len(devices) <= 1:
        d = next(iter(devices), torch.device("cpu"))
        by_device[_device_key(d)] = [k for k in range(len(groups)) if k not in viewed]
    else:
        assert dsts is not None  # several devices: read above
        for k, t in enumerate(dsts):
            if k not in viewed:
                by_device.setdefault(_device_key(t.device), []).append(k)
    built: list[tuple[Any, list[int]]] = []
    for device, ks in by_device.items():
        whole = len(ks) == len(groups)

        def part(values: list[Any] | None, ks: list[int] = ks, whole: bool = whole) -> Any:
            return values if values is None or whole else [values[k] for k in ks]

        job = _job(
            ckpt._core_indexes, part(handles), targets if whole else targets.subset(ks),
            part(names), part(src_names), part(rows), part(via_dtypes), part(views), device,
            n_threads, max_host_bytes, bool(p.sharded),
        )  # fmt: skip
        built.append((job, ks))
    report.cast = _cast_list(names, [(ks[i], s, d) for job, ks in built for i, s, d in job.casts()])
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
    p: LoadPlan, dsts: list[torch.Tensor], handles: list[int], names: list[str],
    src_names: list[str], rows: Any, via_dtypes: Any, views: Any, group: Any, n_threads: int,
    max_host_bytes: int, before_writing: Callable[[], None],
) -> read_once.Counts:  # fmt: skip
    """read="once": every task, its bytes read by one rank of the group (load.read_once)."""
    ckpt = p.checkpoint
    indexes = ckpt._core_indexes
    tasks = []
    with torch.no_grad():
        for k, h in enumerate(handles):
            dtype, shape, strides, offset = ckpt._handle_view(h)
            view = views[k] if views is not None and views[k] is not None else None
            if view is None:
                view = (offset, tuple(shape), tuple(strides))
            file, base = ckpt._handle_storage(h)
            tasks.append(read_once.Task(
                k, h, file, view, None if rows is None else rows[k],
                None if via_dtypes is None else via_dtypes[k], dsts[k], base, dtype.itemsize,
            ))  # fmt: skip

    def make_jobs(over: list[Any], part: list[read_once.Task]) -> list[tuple[Any, list[int]]]:
        by_device: dict[tuple[str, int], list[read_once.Task]] = {}
        for t in part:
            by_device.setdefault(_device_key(t.dst.device), []).append(t)
        jobs = []
        for device, ts in by_device.items():
            job = _job(
                over, [t.handle for t in ts], _core.Targets([t.dst for t in ts], DTYPE_NAMES),
                [names[t.pos] for t in ts], [src_names[t.pos] for t in ts],
                [t.rows for t in ts], [t.via for t in ts], [t.view for t in ts], device,
                n_threads, max_host_bytes, False,
            )  # fmt: skip
            jobs.append((job, [t.pos for t in ts]))
        return jobs

    return read_once.run(tasks, indexes, group, max_host_bytes, make_jobs, before_writing)


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
    viewed: set[int] = set()
    for k, g in enumerate(p._groups):
        t = tensors[g]
        if g in fresh or not needs_new(t) or (p.device is None and not t.is_meta):
            continue
        if (p._rows is not None and p._rows[k] is not None) or (
            p._vias is not None and p._vias[k] is not None
        ):
            continue
        new_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        view, in_file = ckpt._handle_tensor(p._handles[k])
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
