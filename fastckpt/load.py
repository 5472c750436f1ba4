"""``load_into``: stream a checkpoint straight into a built model.

The plan (which checkpoint tensor feeds which model tensor) is made and checked
in full before anything is written: strict mode refuses with nothing modified.
Then the C++ copy engine reads each source's bytes from the file into the
destination's memory (casting, selecting rows, staging through a bounded
pinned ring for CUDA destinations) on its own threads with the GIL released.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from fastckpt import _core
from fastckpt.checkpoint import Checkpoint
from fastckpt.checkpoint import open as open_checkpoint
from fastckpt.dtypes import short_name, to_name, to_torch
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
    """Where one model tensor comes from (an Assignment without its target)."""

    source: str
    rule: str | None
    rows: RowSelection | None
    dtype: torch.dtype | None


@dataclass
class _Target:
    """One tensor of the model, possibly under several names (tied)."""

    names: list[str]  # state_dict names, first is the one written through
    tensor: torch.Tensor
    assignment: _Pick | None = None
    via_name: str | None = None  # the name whose assignment is used


# Read same-dtype dense copies through the mapping instead of pread. Only the
# benchmark flips it, to measure the two (see bench/RESULTS_load.md).
_READ_THROUGH_MAPPING = False


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


def _targets(model: nn.Module) -> tuple[dict[str, _Target], list[_Target]]:
    """state_dict names -> targets; tied names (one tensor object) share a target."""
    by_name: dict[str, _Target] = {}
    by_id: dict[int, _Target] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor):
            continue
        target = by_id.get(id(value))
        if target is None:
            target = by_id[id(value)] = _Target([name], value)
        else:
            target.names.append(name)
        by_name[name] = target
    return by_name, list(by_id.values())


def _source_table(ckpt: Checkpoint) -> dict[str, tuple[Any, int, str, tuple[int, ...]]]:
    """checkpoint name -> (file index, tensor index, dtype name, shape); one batch per file."""
    infos = [index.tensor_infos() for index in ckpt._indexes]
    out = {}
    for name, fi, ti in ckpt._locations():
        info = infos[fi][ti]
        out[name] = (ckpt._indexes[fi], ti, info[1], info[2])
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
        return (a.index or torch.cuda.current_device()) == (b.index or torch.cuda.current_device())
    return True


def _find_cudart() -> str:
    """Path of the CUDA runtime torch loaded, so the core shares its context."""
    torch.cuda.init()
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            path = line.rstrip("\n").split(maxsplit=5)[-1]
            if "libcudart.so" in os.path.basename(path):
                return path
    import ctypes.util

    found = ctypes.util.find_library("cudart")
    if found is None:
        raise CheckpointError("cannot find the CUDA runtime library (libcudart) torch uses")
    return found


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
    ckpt = path if isinstance(path, Checkpoint) else open_checkpoint(path, key=key)
    want = torch.device(device) if device is not None else None
    by_name, groups = _targets(model)
    sources = _source_table(ckpt)
    rules_obj = _resolve_rules(rules)
    report = LoadReport()
    ignored_sources: set[str] = set()
    ignored_targets: set[str] = set()
    per_target: dict[str, _Pick] = {}
    if rules_obj is None:
        # Exact names: the same result as mapping.plain_plan, without an object per tensor.
        per_target = {n: _Pick(n, None, None, None) for n in by_name if n in sources}
        used_sources = set(per_target)
    else:
        plan: MappingPlan = rules_obj.plan(list(sources), list(by_name))
        report.unused_rules = list(plan.unused_rules)
        report.ignored = list(plan.ignored_sources) + list(plan.ignored_targets)
        ignored_sources, ignored_targets = set(plan.ignored_sources), set(plan.ignored_targets)
        used_sources = set()
        for a in plan.assignments:
            if a.target not in by_name:
                raise CheckpointError(
                    f"{ckpt.path}: rules map {a.source!r} onto {a.target!r}, "
                    "which the model does not have"
                )
            if a.source not in sources:
                raise CheckpointError(
                    f"{ckpt.path}: rules read {a.source!r}, which the checkpoint lacks"
                )
            if a.target in per_target:
                raise CheckpointError(
                    f"{ckpt.path}: two checkpoint tensors map onto {a.target!r}: "
                    f"{per_target[a.target].source!r} and {a.source!r}"
                )
            per_target[a.target] = _Pick(a.source, a.rule, a.rows, a.dtype)
            used_sources.add(a.source)
    for target in groups:
        # Tied names: the last name (state_dict order) with a source is written, so the
        # result equals load_state_dict's, which copies each name in turn.
        for n in reversed(target.names):
            if n in per_target:
                target.assignment, target.via_name = per_target[n], n
                break

    loadable: list[_Target] = []
    for target in groups:
        a = target.assignment
        if a is None:
            report.missing += [n for n in target.names if n not in ignored_targets]
            continue
        src_shape = shape = sources[a.source][3]
        if a.rows is not None and shape:
            shape = (a.rows.rows(shape[0]), *shape[1:])
        if shape != tuple(target.tensor.shape):
            report.mismatched.append(
                Mismatch(target.via_name, src_shape, tuple(target.tensor.shape))
            )
            continue
        loadable.append(target)
    report.unexpected = [k for k in sources if k not in used_sources and k not in ignored_sources]

    if strict and (report.missing or report.unexpected or report.mismatched):
        sug = suggest_rules(
            {k: v[3] for k, v in sources.items()},
            {n: tuple(t.tensor.shape) for n, t in by_name.items()},
        )
        raise StrictLoadError(
            _strict_message(str(ckpt.path), report, sug.lines, sug.rules_text), report
        )

    # Destinations: the model's own memory, or fresh tensors for meta / other-device targets.
    jobs: dict[tuple[str, int], list[tuple]] = {}
    fresh: list[tuple[_Target, torch.Tensor]] = []
    for target in loadable:
        a = target.assignment
        assert a is not None and target.via_name is not None
        t = target.tensor.detach()
        if t.is_meta or (want is not None and not _same_device(t.device, want)):
            if want is None:
                raise CheckpointError(
                    f"{target.via_name!r} is on the meta device: pass device= "
                    "to say where to allocate it"
                )
            new_dtype = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            t = torch.empty(t.shape, dtype=new_dtype, device=want)
            fresh.append((target, t))
        if t.device.type not in ("cpu", "cuda"):
            raise CheckpointError(
                f"{target.via_name!r} is on {t.device}; fastckpt loads into CPU and CUDA tensors"
            )
        if any(s == 0 and d > 1 for s, d in zip(t.stride(), t.shape, strict=True)):
            raise CheckpointError(
                f"{target.via_name!r} has overlapping memory (an expanded "
                "tensor); it cannot be loaded into"
            )
        index, ti, src_dtype_name, src_shape = sources[a.source]
        rows: Any = None
        if a.rows is not None:
            if a.rows.index is not None:
                rows = list(a.rows.index)
            else:
                rows = (a.rows.start, a.rows.rows(src_shape[0]))
        via = to_name(a.dtype) if a.dtype is not None else None
        on_device = t.device.type == "cuda"
        dev_key = ("cuda", t.device.index or 0) if on_device else ("cpu", 0)
        label = f"{a.source!r} -> {target.via_name!r}"
        jobs.setdefault(dev_key, []).append(
            (
                index,
                ti,
                rows,
                via,
                t.data_ptr(),
                to_name(t.dtype),
                tuple(t.shape),
                tuple(t.stride()),
                on_device,
                label,
            )
        )
        src_dtype = to_torch(src_dtype_name)
        report.loaded.append(target.via_name)
        report.tied += [(n, target.via_name) for n in target.names if n != target.via_name]
        if a.source != target.via_name:
            report.renamed.append((a.source, target.via_name))
        if a.rows is not None:
            report.sliced.append(target.via_name)
        if src_dtype != t.dtype:
            report.cast.append((target.via_name, short_name(src_dtype), short_name(t.dtype)))
        if a.rule is not None:
            report.rule_for[target.via_name] = a.rule
    for target in groups:
        if target.assignment is None and len(target.names) > 1:
            report.tied += [(n, target.names[0]) for n in target.names[1:]]

    n_threads = threads if threads is not None else _default_threads()
    built = []
    for (kind, index), specs in jobs.items():
        if kind == "cuda":
            torch.cuda.synchronize(index)  # memory torch just handed out may still be in use
            built.append(
                _core.CopyJob(specs, n_threads, max_host_bytes, "cuda", _find_cudart(), index)
            )
        else:
            built.append(
                _core.CopyJob(
                    specs, n_threads, max_host_bytes, read_through_mapping=_READ_THROUGH_MAPPING
                )
            )
    # Everything is checked: from here on the model is written.
    for job in built:
        report.bytes += job.total_bytes
    _run_jobs(built, progress, str(ckpt.path))

    owners = _owners(model) if want is not None else {}
    for target, t in fresh:
        _assign(target, t, owners)
    if want is not None:
        for target in groups:
            old = target.tensor
            if target.assignment is None and not old.is_meta and not _same_device(old.device, want):
                _assign(target, old.detach().to(want), owners)

    report.seconds = time.perf_counter() - started
    uninitialised = report.missing + [m.name for m in report.mismatched]
    if uninitialised:
        warnings.warn(
            UninitializedWarning(
                f"{ckpt.path}: {len(uninitialised)} tensors of the model were not loaded and keep "
                "their previous (possibly random) values:\n"
                + "\n".join(format_groups(uninitialised))
            ),
            stacklevel=2,
        )
    return report


def _assign(
    target: _Target, tensor: torch.Tensor, owners: dict[str, tuple[nn.Module, str, bool]]
) -> None:
    """Put a new tensor under every name of a (possibly tied) target, like assign=True."""
    old = target.tensor
    value: torch.Tensor
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        value = tensor
    for name in target.names:
        module, attr, is_param = owners[name]
        if is_param:
            module._parameters[attr] = value  # type: ignore[assignment]
        else:
            module._buffers[attr] = value
    target.tensor = value


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
            while worker.is_alive():
                worker.join(0.1)
                bar.update(task, completed=done + job.bytes_done)
            if errors:
                raise errors[0]
            done += job.total_bytes
        bar.update(task, completed=total)
