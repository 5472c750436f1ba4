"""``load_into(..., read="once")``: each byte a group of ranks needs is read from storage once.

Every rank builds its plan as usual, from metadata alone. Its copy tasks (whole
tensors, pieces of shards, views) are cut so that none spans more than a window
of the file, and the byte runs each task reads are gathered over the group (one
``all_gather_object``). Where the runs of several ranks meet, they are cut into
segments, each with the set of ranks that need it, and each segment gets one
reader: the rank that needs it alone, else the one of its ranks that has read
the fewest bytes so far (a big shared segment is first cut into one part per
rank, at page boundaries). Every rank computes the same segments and readers.

Window by window (at most a quarter of ``max_host_bytes`` of the file; one
window's messages in flight while the next is read and the one before copied),
readers ``pread`` their segments with no readahead; segments every rank of the
group needs are broadcast, the others are sent point to point to the ranks that
need them. A rank keeps the bytes it needs in a memory file the size of the
checkpoint file, at the same offsets, and runs the ordinary copy engine with the
checkpoint's index over that memory file (``FileIndex.over``): casts, rows,
views and ties are those of a plain load, byte for byte. After each window the
pages no pending task needs are released.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from fastckpt.errors import CheckpointError
from fastckpt.source.memory_file import MemoryFile

PAGE = mmap.PAGESIZE
_MAX_RUNS = 1 << 16  # runs listed for one task; past that its hull stands for them
View = tuple[int, tuple[int, ...], tuple[int, ...]]  # storage offset, shape, strides (elements)


@dataclass
class Task:
    """One copy from a source view (and rows of its dim 0) into a destination tensor."""

    pos: int  # position in load's task table: its names, for labels and the report
    handle: int  # the source, as fastckpt.source.checkpoint names it (opaque here)
    file: int  # its file's position in the checkpoint's indexes
    view: View
    rows: Any  # None | (start, count) | list of indices into the view's dim 0
    via: str | None
    dst: torch.Tensor
    base: int  # the storage's file offset, bytes
    itemsize: int

    def shape(self) -> list[int]:
        """The source's shape after the row selection: the destination's."""
        shape = list(self.view[1])
        if self.rows is not None and shape:
            shape[0] = self.rows[1] if isinstance(self.rows, tuple) else len(self.rows)
        return shape

    def empty(self) -> bool:
        return any(n == 0 for n in self.shape())

    def _row_ends(self) -> tuple[int, int]:
        """First and last selected row of the view's dim 0."""
        if isinstance(self.rows, tuple):
            return self.rows[0], self.rows[0] + self.rows[1] - 1
        return min(self.rows), max(self.rows)

    def hull(self) -> tuple[int, int]:
        """[first byte, past the last byte) in the file of everything the task reads."""
        offset, _, strides = self.view
        lo = hi = offset
        for d, (n, st) in enumerate(zip(self.shape(), strides, strict=True)):
            first, last = self._row_ends() if d == 0 and self.rows is not None else (0, n - 1)
            lo += min(first * st, last * st)
            hi += max(first * st, last * st)
        return self.base + lo * self.itemsize, self.base + (hi + 1) * self.itemsize

    def runs(self) -> torch.Tensor:
        """The byte ranges [start, end) of the file the task reads, sorted and merged."""
        offset, _, strides = self.view
        shape = self.shape()
        lead = 0 if self.rows is None else 1  # selected rows are listed one by one
        run, k = 1, len(shape)
        while k > lead and (shape[k - 1] == 1 or strides[k - 1] == run):
            run *= shape[k - 1]
            k -= 1
        count = 1
        for n in shape[:k]:
            count *= n
        if count > _MAX_RUNS:
            lo, hi = self.hull()
            return torch.tensor([[lo, hi]], dtype=torch.int64)
        offs = torch.zeros(1, dtype=torch.int64)
        if lead:
            if isinstance(self.rows, tuple):
                rows = torch.arange(self.rows[0], self.rows[0] + self.rows[1], dtype=torch.int64)
            else:
                rows = torch.tensor(self.rows, dtype=torch.int64)
            offs = rows * strides[0]
        for d in range(lead, k):
            step = torch.arange(shape[d], dtype=torch.int64) * strides[d]
            offs = (offs[:, None] + step[None, :]).flatten()
        starts = self.base + (offset + offs) * self.itemsize
        return merge(torch.stack([starts, starts + run * self.itemsize], 1))

    def split(self, limit: int) -> list[Task]:
        """This task cut along its first dimension longer than 1 until each part's hull
        spans at most ``limit`` bytes (a single element stays whole)."""
        lo, hi = self.hull()
        shape = self.shape()
        dim = next((d for d, n in enumerate(shape) if n > 1), None)
        if hi - lo <= limit or dim is None:
            return [self]
        parts = min(shape[dim], -(-(hi - lo) // limit))
        size = -(-shape[dim] // parts)
        out: list[Task] = []
        for start in range(0, shape[dim], size):
            out += self._part(dim, start, min(size, shape[dim] - start)).split(limit)
        return out

    def _part(self, dim: int, start: int, length: int) -> Task:
        offset, vshape, strides = self.view
        rows = self.rows
        if dim == 0 and rows is not None:
            if isinstance(rows, tuple):
                rows = (rows[0] + start, length)
            else:
                rows = rows[start : start + length]
            view = self.view
        else:
            new_shape = list(vshape)
            new_shape[dim] = length
            view = (offset + start * strides[dim], tuple(new_shape), strides)
        return Task(self.pos, self.handle, self.file, view, rows, self.via,
                    self.dst.narrow(dim, start, length), self.base, self.itemsize)  # fmt: skip


def merge(runs: torch.Tensor) -> torch.Tensor:
    """[N, 2] byte ranges sorted by start, overlapping and touching ones merged."""
    if len(runs) <= 1:
        return runs
    runs = runs[runs[:, 0].argsort()]
    reach = torch.cummax(runs[:, 1], 0).values
    new = torch.ones(len(runs), dtype=torch.bool)
    new[1:] = runs[1:, 0] > reach[:-1]
    which = new.cumsum(0) - 1
    ends = torch.zeros(int(new.sum()), dtype=torch.int64)
    ends.scatter_reduce_(0, which, runs[:, 1], "amax", include_self=False)
    return torch.stack([runs[new, 0], ends], 1)


@dataclass
class Segment:
    file: int
    start: int
    end: int
    needers: tuple[int, ...]  # group ranks that need these bytes
    owner: int = -1  # the group rank that reads them

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def segments(needs: list[dict[int, torch.Tensor]], size: int, window: int) -> list[Segment]:
    """Per file, the byte ranges any rank needs, cut where the set of ranks needing them
    changes, shared ones cut into one part per rank; each with its reader."""
    out: list[Segment] = []
    files = sorted({f for need in needs for f in need})
    for f in files:
        per_rank = [need.get(f, torch.zeros(0, 2, dtype=torch.int64)) for need in needs]
        bounds = torch.unique(torch.cat([r.flatten() for r in per_rank]))
        if len(bounds) < 2:
            continue
        cover = torch.zeros(len(bounds) - 1, size, dtype=torch.bool)
        for g, r in enumerate(per_rank):
            if not len(r):
                continue
            # +1 where a run starts, -1 where it ends: the running sum is how many cover.
            one = torch.ones(len(r), dtype=torch.int64)
            diff = torch.zeros(len(bounds), dtype=torch.int64)
            diff.index_add_(0, torch.searchsorted(bounds, r[:, 0].contiguous()), one)
            diff.index_add_(0, torch.searchsorted(bounds, r[:, 1].contiguous()), -one)
            cover[:, g] = diff.cumsum(0)[:-1] > 0
        used = cover.any(1)
        # A segment starts where the set of ranks changes (or after a gap) and runs
        # until the next change or gap.
        change = torch.ones(len(cover), dtype=torch.bool)
        change[1:] = (cover[1:] != cover[:-1]).any(1) | ~used[:-1]
        first = (change & used).nonzero().flatten()
        stop_at = (change | ~used).nonzero().flatten().tolist() + [len(cover)]
        # Sets of ranks as tuples once per distinct set, not once per segment.
        sets, which = torch.unique(cover[first], dim=0, return_inverse=True)
        named = [tuple(row.nonzero().flatten().tolist()) for row in sets]
        b = bounds.tolist()
        j = 0
        for s, w in zip(first.tolist(), which.tolist(), strict=True):
            while stop_at[j] <= s:
                j += 1
            out += _cut(Segment(f, b[s], b[stop_at[j]], named[w]), window)
    loads = [0] * size
    for seg in out:
        seg.owner = min(seg.needers, key=lambda g: (loads[g], g))
        loads[seg.owner] += seg.nbytes
    return out


def _cut(seg: Segment, window: int) -> list[Segment]:
    """A shared segment in one part per rank that needs it (at page boundaries), every
    segment in parts of at most ``window`` bytes."""
    part = window
    if len(seg.needers) > 1:
        part = min(window, max(PAGE, -(-seg.nbytes // len(seg.needers))))
    out, at = [], seg.start
    while at < seg.end:
        nxt = at + part
        if nxt < seg.end and nxt // PAGE * PAGE > at:
            nxt = nxt // PAGE * PAGE
        nxt = min(nxt, seg.end)
        out.append(Segment(seg.file, at, nxt, seg.needers))
        at = nxt
    return out


class SharedFile(MemoryFile):
    """The bytes of one checkpoint file this rank needs, at their offsets, in a memory file
    whose bytes are also a uint8 tensor: the buffers broadcast and send/recv move."""

    def __init__(self, size: int):
        super().__init__(size, "fastckpt-read-once")
        self.bytes = (
            torch.frombuffer(self.map, dtype=torch.uint8)
            if self.map is not None
            else torch.empty(0, dtype=torch.uint8)
        )

    def span(self, start: int, end: int) -> torch.Tensor:
        return self.bytes[start:end]


@dataclass
class Counts:
    read: int = 0  # bytes this rank read from storage
    sent: int = 0
    received: int = 0
    copied: int = 0  # bytes the copy engine copied (as report.bytes)
    casts: list[tuple[int, str, str]] = field(default_factory=list)  # (task pos, from, to)


def _comm_device(group: Any) -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _read(path: str, fd: int, into: SharedFile, start: int, end: int) -> None:
    """Bytes [start, end) of the checkpoint file into the same place of ``into``."""
    assert into.map is not None  # a file with bytes to read has a mapping
    with memoryview(into.map) as whole:
        view = whole[start:end]
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], start + done)
            if n <= 0:
                raise CheckpointError(
                    f"{path}: ended at byte {start + done} while reading bytes {start} to {end} "
                    "(the file shrank?)"
                )
            done += n
        view.release()


def run(
    tasks: list[Task],
    indexes: list[Any],
    group: Any,
    max_host_bytes: int,
    make_jobs: Any,
    before_writing: Any,
) -> Counts:
    """Copies every task, each byte the group needs read from storage by one of its ranks.

    ``make_jobs(indexes, tasks)`` builds the copy engine's jobs for a list of tasks
    over the given file indexes; ``before_writing()`` runs once every task is checked,
    before the first is copied."""
    import torch.distributed as dist

    window = max(PAGE, max_host_bytes // 4)
    ranks = (
        dist.get_process_group_ranks(group)
        if group is not None
        else list(range(dist.get_world_size()))
    )
    me = dist.get_rank(group)
    size = len(ranks)
    cut: list[Task] = []
    for t in tasks:
        if not t.empty():
            cut += t.split(window)
    mine: dict[int, list[torch.Tensor]] = {}
    for t in cut:
        mine.setdefault(t.file, []).append(t.runs())
    # Every task checked (shapes, casts, views inside their storages) before anything
    # is read or written: jobs over the checkpoint's own files, built and dropped.
    counts = Counts()
    for job, positions in make_jobs(list(indexes), cut):
        counts.casts += [(positions[i], src, dst) for i, src, dst in job.casts()]
    need = {f: merge(torch.cat(rs)) for f, rs in mine.items()}
    every: list[Any] = [None] * size
    dist.all_gather_object(every, need, group=group)
    segs = segments(every, size, window)
    before_writing()
    files: dict[int, SharedFile] = {}
    sources: dict[int, int] = {}  # file index -> descriptor of the checkpoint file
    comm = _comm_device(group)
    # Tasks by where their bytes end: each runs once the window holding its last byte is in.
    cut.sort(key=lambda t: (t.file, t.hull()[1]))
    hulls = [t.hull() for t in cut]
    lows = _suffix_lows(cut, hulls)
    firsts: dict[int, int] = {}
    for i, t in enumerate(cut):
        firsts.setdefault(t.file, i)
    next_task = 0
    over = list(indexes)
    # One window's messages travel while the next is read and the one before is copied.
    in_flight: tuple[list[Segment], Any] | None = None
    try:
        for part in [*_windows(segs, window), None]:
            started = None
            if part is not None:
                for seg in part:
                    if me in seg.needers and seg.file not in files:
                        files[seg.file] = SharedFile(indexes[seg.file].file_size)
                        over[seg.file] = indexes[seg.file].over(files[seg.file].path)
                    if seg.owner == me:
                        path = indexes[seg.file].path
                        if seg.file not in sources:
                            sources[seg.file] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                            # Only the pages asked for: no readahead into other readers' bytes.
                            os.posix_fadvise(sources[seg.file], 0, 0, os.POSIX_FADV_RANDOM)
                        _read(path, sources[seg.file], files[seg.file], seg.start, seg.end)
                        counts.read += seg.nbytes
                started = (part, _exchange(part, files, me, ranks, group, comm, counts))
            if in_flight is not None:
                done, finish = in_flight
                finish()
                last = done[-1]
                ready = next_task
                while ready < len(cut) and (cut[ready].file, hulls[ready][1]) <= (
                    last.file,
                    last.end,
                ):
                    ready += 1
                if ready > next_task:
                    counts.copied += _copy(make_jobs(over, cut[next_task:ready]))
                    next_task = ready
                _release(files, cut, lows, firsts, next_task, last)
            in_flight = started
        if next_task < len(cut):
            raise CheckpointError(
                f"{indexes[cut[next_task].file].path}: read='once' found no window holding the "
                f"bytes of a copy into {tuple(cut[next_task].dst.shape)} (a bug in fastckpt)"
            )
    finally:
        for fd in sources.values():
            os.close(fd)
        for mf in files.values():
            # the fd only: tensors may still view the mapping, which goes with them
            os.close(mf.fd)
            mf.fd = -1
    return counts


def _copy(jobs: list[tuple[Any, list[int]]]) -> int:
    total = 0
    for job, _ in jobs:
        total += job.total_bytes
        job.run()
    return total


def _windows(segs: list[Segment], window: int) -> list[list[Segment]]:
    out: list[list[Segment]] = []
    size = 0
    for seg in segs:
        if not out or size + seg.nbytes > window:
            out.append([])
            size = 0
        out[-1].append(seg)
        size += seg.nbytes
    return out


def _suffix_lows(cut: list[Task], hulls: list[tuple[int, int]]) -> list[int]:
    """For each task of ``cut`` (sorted by file), the lowest byte that it or any later
    task of the same file reads: computed once, so each window's release is cheap."""
    out = [0] * len(cut)
    for i in range(len(cut) - 1, -1, -1):
        out[i] = hulls[i][0]
        if i + 1 < len(cut) and cut[i + 1].file == cut[i].file:
            out[i] = min(out[i], out[i + 1])
    return out


def _release(
    files: dict[int, SharedFile],
    cut: list[Task],
    lows: list[int],
    firsts: dict[int, int],
    next_task: int,
    last: Segment,
) -> None:
    """Releases the pages of each memory file below everything still to be copied."""
    low: dict[int, int] = {}
    if next_task < len(cut):
        here = cut[next_task].file
        low[here] = lows[next_task]
        low.update({f: lows[i] for f, i in firsts.items() if f > here})
    for f, mf in files.items():
        if f > last.file:
            continue
        upto = low.get(f, mf.size)
        if f == last.file:
            upto = min(upto, last.end)
        mf.release(upto)


def _exchange(
    part: list[Segment],
    files: dict[int, SharedFile],
    me: int,
    ranks: list[int],
    group: Any,
    comm: torch.device,
    counts: Counts,
) -> Any:
    """Starts sending each shared segment of the window from its reader to the ranks that
    need it: one message per (reader, set of ranks), broadcast when that set is the whole
    group. Returns what to call to wait for them and land what was received."""
    import torch.distributed as dist

    messages: dict[tuple[int, tuple[int, ...]], list[Segment]] = {}
    for seg in part:
        if len(seg.needers) > 1:
            messages.setdefault((seg.owner, seg.needers), []).append(seg)
    everyone = tuple(range(len(ranks)))
    received: list[tuple[list[Segment], torch.Tensor]] = []
    ops = []
    pending = []  # broadcasts in flight: every reader's at once, not one after another
    for (owner, needers), segs in sorted(messages.items()):
        if me not in needers:
            continue
        buf = _buffer(segs, files, comm, fill=me == owner)
        nbytes = sum(s.nbytes for s in segs)
        if needers == everyone:
            pending.append(dist.broadcast(buf, src=ranks[owner], group=group, async_op=True))
        elif me == owner:
            ops += [dist.P2POp(dist.isend, buf, ranks[r], group) for r in needers if r != me]
        else:
            ops.append(dist.P2POp(dist.irecv, buf, ranks[owner], group))
        if me == owner:
            counts.sent += nbytes * (len(needers) - 1)
        else:
            counts.received += nbytes
            received.append((segs, buf))
    if ops:
        pending += dist.batch_isend_irecv(ops)

    def finish() -> None:
        for req in pending:
            req.wait()
        for segs, buf in received:
            _unpack(segs, buf, files)

    return finish


def _buffer(segs: list[Segment], files: dict[int, SharedFile], comm: torch.device,
            fill: bool) -> torch.Tensor:  # fmt: skip
    """The message's bytes: the memory file's own when it is one segment on the CPU, else a
    packed copy (on ``comm``, the device the backend sends from), filled by the reader."""
    if len(segs) == 1 and comm.type == "cpu":
        s = segs[0]
        return files[s.file].span(s.start, s.end)
    buf = torch.empty(sum(s.nbytes for s in segs), dtype=torch.uint8, device=comm)
    if fill:
        at = 0
        for s in segs:
            buf[at : at + s.nbytes].copy_(files[s.file].span(s.start, s.end))
            at += s.nbytes
    return buf


def _unpack(segs: list[Segment], buf: torch.Tensor, files: dict[int, SharedFile]) -> None:
    if len(segs) == 1 and buf.device.type == "cpu":
        return  # received in place
    host = buf.cpu()
    at = 0
    for s in segs:
        files[s.file].span(s.start, s.end).copy_(host[at : at + s.nbytes])
        at += s.nbytes
