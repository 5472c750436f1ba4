"""``load_into``: stream a checkpoint straight into a built model.

The plan (which checkpoint tensor feeds which model tensor) is made and checked
in full before anything is written: strict mode refuses with nothing modified.
Then the C++ copy engine reads each source's bytes from the file into the
destination's memory (casting, selecting rows, staging through a bounded
pinned ring for CUDA destinations) on its own threads with the GIL released.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from torch import nn

from fastckpt import _core
from fastckpt.checkpoint import Checkpoint, Opening
from fastckpt.dtypes import DTYPE_NAMES, short_name, to_name, to_torch
from fastckpt.errors import CheckpointError
from fastckpt.mapping import MappingPlan, RowSelection
from fastckpt.report import LoadReport, Mismatch, format_groups
from fastckpt.suggest import suggest_rules


class StrictLoadError(CheckpointError):
    """The checkpoint does not fit the model (strict=True); nothing was modified.

    ``report`` holds what a non-strict load would have done.
    """

    def __init__(self, message: str, report: LoadReport):
        super().__init__(message)
        self.report = report


StrictLoadError.__module__ = "fastckpt"


class UninitializedWarning(UserWarning):
    """A non-strict load left some of the model's tensors as they were."""


UninitializedWarning.__module__ = "fastckpt"


class _Pick(NamedTuple):
    """Where one model tensor comes from under rules (an Assignment without its target)."""

    source: str
    rule: str | None
    rows: RowSelection | None
    dtype: torch.dtype | None


_LOW = 0xFFFFFFFF  # Checkpoint._entries values: file index << 32 | tensor index


def _default_threads() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def _owners(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    out: dict[str, tuple[nn.Module, str, bool]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for name, p in module._parameters.items():
            if p is not None:
                out[dot + name] = (module, name, True)
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                out[dot + name] = (module, name, False)
    return out


def _resolve_rules(rules: Any) -> Any:
    if rules is None or hasattr(rules, "plan"):
        return rules
    from fastckpt.rules import as_rules  # the rules engine is optional until used

    return as_rules(rules)


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        # Index 0 is an index: only a missing one means the current device.
        here = torch.cuda.current_device()
        return (here if a.index is None else a.index) == (here if b.index is None else b.index)
    return True


def _find_cudart() -> str:
    """Path of the CUDA runtime torch loaded, so the core shares its context."""
    torch.cuda.init()
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


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model.state_dict(keep_vars=True)``, built without its call chain.

    The fast walk (in C, ``_core.state_tensors``) reads ``_parameters`` and
    persistent ``_buffers`` directly, in state_dict's order (a module's own
    tensors, then its children depth first, shared submodules visited each
    time). It is only taken when no module could make state_dict differ: a
    custom ``_save_to_state_dict``, extra state or a state_dict hook sends the
    whole model through ``state_dict()`` instead (and its non-tensor entries,
    such as extra state, are dropped). A tree of 41k modules on the 2-core dev VM:
    130-200 ms through ``state_dict()``, ~42 ms as a Python loop, 30-40 ms in C
    (bound by memory latency: every module's dicts are read once).
    """
    walked = _core.state_tensors(model, _BASE_SAVE, _BASE_EXTRA_STATE)
    if walked is not None:
        return walked
    full = model.state_dict(keep_vars=True)
    return {k: v for k, v in full.items() if isinstance(v, torch.Tensor)}


_BASE_SAVE = nn.Module._save_to_state_dict
_BASE_EXTRA_STATE = nn.Module.get_extra_state


def _strict_message(
    path: str, report: LoadReport, suggestion_lines: list[str], rules_text: str
) -> str:
    lines = [
        f"{path}: checkpoint does not match the model: {len(report.missing)} missing, "
        f"{len(report.unexpected)} unexpected, {len(report.mismatched)} shape mismatches; "
        "nothing was loaded"
    ]
    if report.missing:
        lines.append(f"  missing from the checkpoint ({len(report.missing)}):")
        lines += format_groups(report.missing)
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
    path: str | os.PathLike | Checkpoint,
    rules: Any = None,
    *,
    strict: bool = True,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    max_host_bytes: int = 256 << 20,
    threads: int | None = None,
    progress: bool = False,
    key: str | Sequence[str] | None = None,
) -> LoadReport:
    """Copy the checkpoint at ``path`` into ``model``'s parameters and persistent buffers.

    - ``rules``: a rules object (anything with ``.plan(source_keys, target_keys)``),
      rules text or a rules file; ``None`` matches names exactly.
    - ``strict``: refuse (``StrictLoadError``, nothing modified) when anything is
      missing, unexpected or shape-mismatched; otherwise load what matches and emit
      one ``UninitializedWarning`` naming what stayed as it was.
    - ``device``: where tensors on the meta device (or on another device) are
      allocated and filled, like ``load_state_dict(assign=True)``; ``dtype`` is the
      floating dtype of such newly allocated tensors (default: the model's).
    - ``max_host_bytes``: host staging budget beyond the destinations.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"load_into needs a torch.nn.Module to load into, not {type(model).__name__}"
        )
    # Planning makes a few small objects per tensor and none of them cyclic; with
    # 30k tensors the collector's passes (over every object torch ever made) cost
    # more than the plan itself. Collection resumes, unchanged, when we return.
    collecting = gc.isenabled()
    gc.disable()
    try:
        report, ckpt_path = _load(
            model, path, rules, strict, device, dtype, max_host_bytes, threads, progress, key
        )
    finally:
        if collecting:
            gc.enable()
    report.seconds = time.perf_counter() - started
    uninitialised = report.missing + [m.name for m in report.mismatched]
    if uninitialised:
        warnings.warn(
            UninitializedWarning(
                f"{ckpt_path}: {len(uninitialised)} tensors of the model were not loaded and keep "
                "their previous (possibly random) values:\n"
                + "\n".join(format_groups(uninitialised))
            ),
            stacklevel=2,
        )
    return report


def _load(
    model: nn.Module,
    path: str | os.PathLike | Checkpoint,
    rules: Any,
    strict: bool,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    max_host_bytes: int,
    threads: int | None,
    progress: bool,
    key: str | Sequence[str] | None,
) -> tuple[LoadReport, Path]:
    want = torch.device(device) if device is not None else None
    # The files are indexed on C++ threads while the model is walked and its
    # tensors are read here: on a 30k-tensor checkpoint each takes tens of ms.
    opening = None if isinstance(path, Checkpoint) else Opening(path)
    # The model's tensors by state_dict name. Tied names (one tensor object) form
    # a group; groups[g] lists its names when any tie exists, else None (g = name).
    state = _state_tensors(model)
    names = list(state)
    tensors = list(state.values())
    groups: list[list[str]] | None = None
    if not _core.all_distinct(tensors):
        first: dict[int, int] = {}
        groups = []
        unique: list[torch.Tensor] = []
        for n, v in zip(names, tensors, strict=True):
            g = first.setdefault(id(v), len(unique))
            if g == len(unique):
                groups.append([n])
                unique.append(v)
            else:
                groups[g].append(n)
        tensors = unique
    # Every destination is read now, before the index is waited for; usually all
    # of them have a source. A tensor torch cannot describe (sparse, say) fails
    # only if it is needed: it is read again, alone with the others needed, below.
    try:
        every_target: Any = _core.Targets(tensors, DTYPE_NAMES)
    except Exception:  # noqa: BLE001 - raised again below if it matters
        every_target = None
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint(path, key=key, _opening=opening)
    shape_lists: list[list[tuple[int, ...]]] = []

    def shape_of(loc: int) -> tuple[int, ...]:
        """The shape of the checkpoint tensor at loc (file index << 32 | tensor index)."""
        if not shape_lists:  # only rules, mismatches and refusals need them
            shape_lists.extend(index.shapes() for index in ckpt._indexes)
        return shape_lists[loc >> 32][loc & _LOW]

    rules_obj = _resolve_rules(rules)
    report = LoadReport()
    ignored_sources: set[str] = set()
    ignored_targets: set[str] = set()
    picks: dict[str, _Pick] | None = None  # rules only; exact names need no pick objects
    if rules_obj is None:
        wanted: Any = None  # ckpt._entries, looked at only when some name is not in the file
        # A target name present in the file uses that source (built only if needed).
        used_sources: Any = None
    else:
        target_names = names if groups is None else [n for g in groups for n in g]
        target_set = set(target_names)
        entries = ckpt._entries  # checkpoint name -> file index << 32 | tensor index
        plan: MappingPlan = rules_obj.plan(list(entries), target_names)
        report.unused_rules = list(plan.unused_rules)
        report.ignored = list(plan.ignored_sources) + list(plan.ignored_targets)
        ignored_sources, ignored_targets = set(plan.ignored_sources), set(plan.ignored_targets)
        picks = {}
        used_sources = set()
        for a in plan.assignments:
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
            picks[a.target] = _Pick(a.source, a.rule, a.rows, a.dtype)
            used_sources.add(a.source)
        wanted = picks

    # Per group, the name written through: for tied names the last one (state_dict
    # order) with a source, so the result equals load_state_dict's, which copies
    # each name in turn.
    # Candidates: groups with a source. Their tensors are read once, in C++
    # (address, shape, strides, dtype, device), for the shape check and the tasks.
    # The common case (plain names, no ties, every name in the file) stays in
    # C-level loops: this is per-tensor work for models of 30k tensors.
    vias: list[str | None]
    locs = ckpt._find_all(names) if picks is None and groups is None else None
    if locs is not None and None not in locs:
        vias = names  # type: ignore[assignment]
        cand: list[int] = list(range(len(names)))
    else:
        if wanted is None:
            wanted = ckpt._entries
        if groups is None:
            vias = [n if n in wanted else None for n in names]
        else:
            vias = [next((n for n in reversed(g) if n in wanted), None) for g in groups]
        cand = [g for g, via in enumerate(vias) if via is not None]
        for g, via in enumerate(vias):
            if via is None:
                group = [names[g]] if groups is None else groups[g]
                report.missing += [n for n in group if n not in ignored_targets]
    if picks is None:
        if locs is not None and len(cand) == len(locs):
            cand_sources = cast(list[int], locs)  # no None: every name was found
        else:
            cand_sources = [wanted[vias[g]] for g in cand]
        dim0 = None
    else:
        cand_picks = [picks[vias[g]] for g in cand]  # type: ignore[index]
        cand_sources = [ckpt._entries[p.source] for p in cand_picks]
        dim0 = [
            None
            if p.rows is None or not (shape := shape_of(loc))
            else p.rows.rows(shape[0])
            for p, loc in zip(cand_picks, cand_sources, strict=True)
        ]
    if every_target is None:
        targets = _read_targets(ckpt.path, [tensors[g] for g in cand], [vias[g] for g in cand])
    else:
        targets = every_target if len(cand) == len(tensors) else every_target.subset(cand)
    bad = targets.mismatched(ckpt._indexes, cand_sources, dim0)
    if bad:
        for k in bad:
            g, loc = cand[k], cand_sources[k]
            report.mismatched.append(Mismatch(vias[g], shape_of(loc), tuple(tensors[g].shape)))  # type: ignore[arg-type]
        bad_set = set(bad)
        keep = [k for k in range(len(cand)) if k not in bad_set]
        targets = targets.subset(keep)
        loadable = [cand[k] for k in keep]
        sources = [cand_sources[k] for k in keep]
    else:
        loadable, sources = cand, cand_sources
    # Without rules every candidate uses its own, distinct source: when they cover
    # the whole file, nothing in it is unexpected (no need to look at each key).
    if picks is None and groups is None and len(cand) == len(ckpt):
        report.unexpected = []
    else:
        if used_sources is None:
            used_sources = set(names if groups is None else [n for g in groups for n in g])
        report.unexpected = [
            k for k in ckpt._entries if k not in used_sources and k not in ignored_sources
        ]

    if strict and (report.missing or report.unexpected or report.mismatched):
        sug = suggest_rules(
            {k: shape_of(v) for k, v in ckpt._entries.items()},
            {n: tuple(state[n].shape) for n in state if isinstance(state[n], torch.Tensor)},
        )
        raise StrictLoadError(
            _strict_message(str(ckpt.path), report, sug.lines, sug.rules_text), report
        )

    via_names: list[str] = [vias[g] for g in loadable]  # type: ignore[misc]
    # Destinations: the model's own memory, or fresh tensors for meta / other-device targets.
    fresh: list[tuple[int, torch.Tensor]] = []  # (group, new tensor)
    dsts: list[torch.Tensor] | None = None  # only read off the model when not all on the CPU
    devices = {torch.device("cpu")}
    if want is not None or not targets.all_cpu:
        dsts = [tensors[g] for g in loadable]
        for k, g in enumerate(loadable):
            t = dsts[k]
            if t.is_meta or (want is not None and not _same_device(t.device, want)):
                if want is None:
                    raise CheckpointError(
                        f"{via_names[k]!r} is on the meta device: pass device= "
                        "to say where to allocate it"
                    )
                new_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
                t = dsts[k] = torch.empty(t.shape, dtype=new_dtype, device=want)
                fresh.append((g, t))
            if t.device.type not in ("cpu", "cuda"):
                raise CheckpointError(
                    f"{via_names[k]!r} is on {t.device}; fastckpt loads into CPU and CUDA tensors"
                )
        devices = {t.device for t in dsts}
        if fresh:
            targets = _core.Targets(dsts, DTYPE_NAMES)

    rows: list[Any] | None = None
    via_dtypes: list[str | None] | None = None
    src_names: list[str] = via_names
    if picks is not None:
        chosen = [picks[n] for n in via_names]
        src_names = [p.source for p in chosen]
        rows = []
        for p, loc in zip(chosen, sources, strict=True):
            if p.rows is None:
                rows.append(None)
            elif p.rows.index is not None:
                rows.append(list(p.rows.index))
            else:
                rows.append((p.rows.start, p.rows.rows(shape_of(loc)[0])))
        via_dtypes = [to_name(p.dtype) if p.dtype is not None else None for p in chosen]

    # One copy job per device; positions keep the report in model order.
    by_device: dict[tuple[str, int], list[int]] = {}
    if len(devices) <= 1:
        d = next(iter(devices), torch.device("cpu"))
        by_device[(d.type, (d.index or 0) if d.type == "cuda" else 0)] = list(range(len(loadable)))
    else:
        assert dsts is not None  # several devices: read above
        for k, t in enumerate(dsts):
            on_cuda = t.device.type == "cuda"
            dev_key = ("cuda", t.device.index or 0) if on_cuda else ("cpu", 0)
            by_device.setdefault(dev_key, []).append(k)
    n_threads = threads if threads is not None else _default_threads()
    built: list[tuple[Any, list[int]]] = []
    for (kind, dev_index), ks in by_device.items():
        whole = len(ks) == len(loadable)

        def part(values: list[Any] | None, ks: list[int] = ks, whole: bool = whole) -> Any:
            return values if values is None or whole else [values[k] for k in ks]

        sink = ""
        cudart = ""
        if kind == "cuda":
            torch.cuda.synchronize(dev_index)  # memory torch just handed out may still be in use
            sink, cudart = "cuda", _find_cudart()
        job = _core.CopyJob.from_targets(
            ckpt._indexes,
            part(sources),
            targets if whole else targets.subset(ks),
            part(via_names),
            None if picks is None else part(src_names),
            part(rows),
            part(via_dtypes),
            n_threads,
            max_host_bytes,
            sink,
            cudart,
            dev_index,
        )
        built.append((job, ks))

    report.loaded = via_names
    casts: list[tuple[int, str, str, str]] = []
    for job, ks in built:
        for i, src_dtype, dst_dtype in job.casts():
            k = ks[i]
            casts.append(
                (k, via_names[k], short_name(to_torch(src_dtype)), short_name(to_torch(dst_dtype)))
            )
    report.cast = [c[1:] for c in sorted(casts)]
    if groups is not None:
        # Loaded groups first, then unloaded ones, as the report always listed them.
        loaded_set = set(loadable)
        report.tied = [
            (n, via)
            for g in loadable
            if (via := vias[g]) is not None  # always set for loadable groups
            for n in groups[g]
            if n != via
        ] + [
            (n, groups[g][0])
            for g in range(len(groups))
            if g not in loaded_set and vias[g] is None
            for n in groups[g][1:]
        ]
    if picks is not None:
        for name, src, p in zip(via_names, src_names, chosen, strict=True):
            if src != name:
                report.renamed.append((src, name))
            if p.rows is not None:
                report.sliced.append(name)
            if p.rule is not None:
                report.rule_for[name] = p.rule

    # Everything is checked: from here on the model is written.
    for job, _ in built:
        report.bytes += job.total_bytes
    _run_jobs([job for job, _ in built], progress, str(ckpt.path))

    if want is not None:
        owners = _owners(model)
        for g, t in fresh:
            _assign([names[g]] if groups is None else groups[g], tensors[g], t, owners)
        for g, via in enumerate(vias):
            old = tensors[g]
            if via is None and not old.is_meta and not _same_device(old.device, want):
                _assign(
                    [names[g]] if groups is None else groups[g], old, old.detach().to(want), owners
                )
    return report, ckpt.path


def _read_targets(path: Path, tensors: list[torch.Tensor], names: list[Any]) -> Any:
    """``_core.Targets`` of these tensors, or a CheckpointError naming one torch cannot read."""
    try:
        return _core.Targets(tensors, DTYPE_NAMES)
    except Exception:
        for name, t in zip(names, tensors, strict=True):
            try:
                _core.Targets([t], DTYPE_NAMES)
            except Exception as e:  # noqa: BLE001 - becomes the message
                layout = "" if t.layout == torch.strided else f" is a {t.layout} tensor and"
                raise CheckpointError(
                    f"{path}: the model's {name!r}{layout} cannot be loaded into "
                    f"({type(e).__name__}: {e}); fastckpt writes dense (strided) tensors"
                ) from None
        raise


def _assign(
    names: list[str],
    old: torch.Tensor,
    tensor: torch.Tensor,
    owners: dict[str, tuple[nn.Module, str, bool]],
) -> None:
    """Put a new tensor under every name of a (possibly tied) target, like assign=True."""
    value: torch.Tensor
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        value = tensor
    for name in names:
        module, attr, is_param = owners[name]
        if is_param:
            module._parameters[attr] = value  # type: ignore[assignment]
        else:
            module._buffers[attr] = value


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
