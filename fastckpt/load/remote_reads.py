"""A load from a remote checkpoint (fastckpt.source.remote): only the bytes the plan reads.

The copy tasks are those of ``read="once"`` (fastckpt.load.read_once): each cut
so that it spans at most a window, and each listing the exact byte runs it
reads. Every task is checked (the copy engine's jobs are built over the
checkpoint's indexes and dropped) before anything is fetched or written.
A task whose bytes are exactly its destination's memory (same dtype, one run, a
contiguous host tensor, bytes no other task reads) has them fetched straight into
the destination. For the others, per file, the runs are merged (holes of up to
``FASTCKPT_REMOTE_GAP_BYTES`` fetched rather than split), cut into windows of half
``max_host_bytes`` (at most 64 MiB), and fetched with many ranged GETs in flight into
the file's memory file at their offsets; while one window is fetched the one before is
copied by the ordinary engine, and pages no pending task reads are given back after
each window.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import torch

from fastckpt.errors import CheckpointError
from fastckpt.load import read_once
from fastckpt.load.read_once import Counts, Segment, Task
from fastckpt.source.remote_store import OBJECTS_AT_ONCE, each

_WINDOW = 64 << 20
_I = TypeVar("_I")
# Smaller tensors go through the memory file, where neighbouring runs are one request:
# fetched straight in, each was a request of its own (a DCP file of 300 chunks of 64 KiB
# took 300 GETs).
_DIRECT_MIN = 1 << 20


def _coalesce(runs: torch.Tensor, gap: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in runs.tolist():
        if out and s - out[-1][1] <= gap:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _segments(need: dict[int, torch.Tensor], gap: int, window: int) -> list[Segment]:
    out: list[Segment] = []
    for f in sorted(need):
        for s, e in _coalesce(need[f], gap):
            for at in range(s, e, window):
                out.append(Segment(f, at, min(e, at + window), (0,), 0))
    return out


def _direct(
    cut: list[Task], runs: list[torch.Tensor], cast: set[int],
    on_host: Callable[[torch.Tensor], bool],
) -> set[int]:  # fmt: skip
    """The tasks whose bytes are fetched straight into their destination: one run of the
    file that is byte for byte the destination's memory (same dtype, no conversion, a
    contiguous CPU destination of that many bytes), read by no other task. Each saves
    the memory file's pages and a copy of its bytes."""
    out = set()
    for i, t in enumerate(cut):
        d = t.dst
        if (
            t.via is None
            and t.pos not in cast
            and _dense(t)
            and len(runs[i]) == 1
            and on_host(d)
            and d.is_contiguous()
            and list(d.shape) == t.shape()
            and d.element_size() == t.itemsize
            and int(runs[i][0, 1] - runs[i][0, 0]) == d.numel() * t.itemsize
            and d.numel() * t.itemsize >= _DIRECT_MIN
        ):
            out.add(i)
    # Bytes another task reads too are fetched once, into the memory file: every task of
    # a group of overlapping hulls (tied weights saved as one storage) is left out.
    group: list[int] = []
    file, reach = -1, 0
    for f, lo, hi, i in sorted((t.file, *t.hull(), i) for i, t in enumerate(cut)):
        if f != file or lo >= reach:
            if len(group) > 1:
                out.difference_update(group)
            group, file, reach = [], f, hi
        group.append(i)
        reach = max(reach, hi)
    if len(group) > 1:
        out.difference_update(group)
    return out


def _dense(t: Task) -> bool:
    """The task's source elements lie in the file in the destination's order: a row-major
    view, of which a range of rows may be taken. (Its runs alone do not say so: past
    ``_MAX_RUNS`` a transposed view's runs are given as its hull, one run of the right size.)"""
    if t.rows is not None and not isinstance(t.rows, tuple):
        return False
    _, shape, strides = t.view
    step = 1
    for n, st in zip(reversed(shape), reversed(strides), strict=True):
        if n != 1 and st != step:
            return False
        step *= n
    return True


def _by_holder(files: list[Any], items: list[tuple[int, _I]]) -> list[tuple[Any, list[_I]]]:
    """``items`` (file, item) gathered by the object that fetches for each file (its
    ``holder``): a DCP .distcp file's archives are files of their own here, and one batch
    of requests per archive ran them one after another."""
    out: dict[int, tuple[Any, list[_I]]] = {}
    for f, item in items:
        holder = files[f].holder
        out.setdefault(id(holder), (holder, []))[1].append(item)
    return list(out.values())


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor, writable."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def run(
    tasks: list[Task],
    files: list[Any],
    indexes: list[Any],
    gap: int,
    max_host_bytes: int,
    make_jobs: Callable[[list[Any], list[Task]], list[tuple[Any, list[int]]]],
    before_writing: Callable[[], None],
    on_host: Callable[[torch.Tensor], bool],
) -> Counts:
    """Copies every task, fetching exactly the runs they read into ``files`` (one per
    checkpoint file: source.remote.RemoteFile or load.pread_files.PreadFile, or per chunk
    archive of a remote DCP directory: source.remote_dcp; each ``holder`` fetches for
    those in the same object), which ``indexes`` index. ``on_host(dst)``: the
    destination is in host memory (as the copy jobs place it), so its bytes can be
    fetched straight into it."""
    # At most _WINDOW even when the budget allows more: the copy of one window overlaps
    # the fetch of the next only when an object spans several (a 128 MiB object in one
    # window was fetched whole, then copied: 1.2 s against 0.6-0.7 s in 64 MiB windows).
    window = max(read_once.PAGE, min(max_host_bytes // 2, _WINDOW))
    cut: list[Task] = []
    for t in tasks:
        if not t.empty():
            cut += t.split(window)
    counts = Counts()
    for job, positions in make_jobs(list(indexes), cut):
        counts.casts += [(positions[i], src, dst) for i, src, dst in job.casts()]
    runs = [t.runs() for t in cut]
    direct = _direct(cut, runs, {pos for pos, _, _ in counts.casts}, on_host)
    mine: dict[int, list[torch.Tensor]] = {}
    for i, t in enumerate(cut):
        if i not in direct:
            mine.setdefault(t.file, []).append(runs[i])
    need = {f: read_once.merge(torch.cat(rs)) for f, rs in mine.items()}
    segs = _segments(need, gap, window)
    each([f.check_unchanged for f in files])  # later reads: checked by If-Match and size
    before_writing()
    # Everything is checked: from here on the model is written.
    pieces = []
    for i in sorted(direct):
        lo, hi = (int(v) for v in runs[i][0].tolist())
        pieces.append((cut[i].file, (lo, hi, _bytes_of(cut[i].dst))))
    by_holder = _by_holder(files, pieces)
    # Objects fetched together share the budget (the windows come after these).
    share = max_host_bytes // min(OBJECTS_AT_ONCE, max(1, len(by_holder)))
    got = sum(each([partial(h.fetch_into, p, share) for h, p in by_holder]))
    counts.read += got
    counts.copied += got
    cut = [t for i, t in enumerate(cut) if i not in direct]
    cut.sort(key=lambda t: (t.file, t.hull()[1]))
    hulls = [t.hull() for t in cut]
    lows = read_once._suffix_lows(cut, hulls)
    firsts: dict[int, int] = {}
    for i, t in enumerate(cut):
        firsts.setdefault(t.file, i)
    for f in files:
        f.freed = 0
    held = dict(enumerate(files))
    parts = read_once._windows(segs, window)
    next_task = 0
    fetcher: tuple[threading.Thread, list[BaseException]] | None = None

    def fetch(part: list[Segment], errors: list[BaseException]) -> None:
        try:
            by_holder = _by_holder(files, [(seg.file, (seg.start, seg.end)) for seg in part])
            # Runs of different files of one object (a DCP file's archives) close
            # together are one request too, as those of one file are (_segments).
            counts.read += sum(each([
                partial(h.fetch, _coalesce(torch.tensor(sorted(r)), gap)) for h, r in by_holder
            ]))  # fmt: skip
        except BaseException as e:  # re-raised on the loading thread
            errors.append(e)

    def start(k: int) -> tuple[threading.Thread, list[BaseException]] | None:
        if k >= len(parts):
            return None
        errors: list[BaseException] = []
        th = threading.Thread(target=fetch, args=(parts[k], errors), name="fastckpt-fetch")
        th.start()
        return th, errors

    try:
        fetcher = start(0)
        for k, part in enumerate(parts):
            assert fetcher is not None
            th, errors = fetcher
            th.join()
            if errors:
                raise errors[0]
            fetcher = start(k + 1)  # the next window travels while this one is copied
            last = part[-1]
            ready = next_task
            while ready < len(cut) and (cut[ready].file, hulls[ready][1]) <= (last.file, last.end):
                ready += 1
            if ready > next_task:
                for job, _ in make_jobs(list(indexes), cut[next_task:ready]):
                    counts.copied += job.total_bytes
                    job.run()
                next_task = ready
            read_once._release(held, cut, lows, firsts, next_task, last)
        if next_task < len(cut):
            raise CheckpointError(
                f"{files[cut[next_task].file].url}: no window held the bytes of a copy into "
                f"{tuple(cut[next_task].dst.shape)} (a bug in fastckpt)"
            )
    finally:
        if fetcher is not None:
            fetcher[0].join()
        for f in files:
            f.release_all()
    return counts
