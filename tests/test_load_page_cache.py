"""Large ranges the page cache holds are copied straight out of a shared mapping
(csrc/io/file_view.h); others are read with pread. Both give the same bytes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastckpt
from fastckpt import _core
from fastckpt.bench import evict
from tests.conftest import assert_same_bytes, run_python

MB = 1 << 20


def cachestat_works(path: Path) -> bool:
    return _core._testing.cached_pages(str(path), 0, 1) >= 0


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MB):
            pass


def pages_of(path: Path) -> int:
    return (path.stat().st_size + 4095) // 4096


def shared_mappings_of(path: Path) -> list[str]:
    """Lines of /proc/self/maps mapping `path` shared: a FileView (the index maps it private)."""
    lines = Path("/proc/self/maps").read_text().splitlines()
    return [ln for ln in lines if ln.endswith(str(path)) and ln.split()[1][3] == "s"]


@dataclass
class Reads:
    path: Path
    dst: dict[str, torch.Tensor]
    expect: dict[str, torch.Tensor]
    make: Callable[..., _core.CopyJob]  # make(sink="") -> a job filling dst
    from_view: int  # bytes the view may serve into dense destinations
    strided: int  # and into the strided one (host only)


def jobs(tmp_path: Path) -> Reads:
    """Five kinds of read from one file: plain, row range + cast, cast, index rows, strided dst."""
    src = {
        "plain": torch.randn(1024, 700),  # 2.8 MB
        "emb": torch.randn(3000, 256),  # 3 MB; rows 100..2599 as bf16
        "half": torch.randn(600, 1024),  # 2.4 MB -> fp16
        "pick": torch.randn(2000, 512),  # rows by index: never from the view
        "turn": torch.randn(700, 1024),  # into a transposed (strided) destination
    }
    path = tmp_path / "big.safetensors"
    save_file(src, str(path))
    ckpt = fastckpt.open(path)
    index = ckpt._indexes[0]  # the tasks keep its file open
    at = {k: ckpt._locate(k)[1] for k in src}
    rows = [5, 6, 7, 900, 1999, 0]
    dst = {
        "plain": torch.zeros(1024, 700),
        "emb": torch.zeros(2500, 256, dtype=torch.bfloat16),
        "half": torch.zeros(600, 1024, dtype=torch.float16),
        "pick": torch.zeros(len(rows), 512),
        "turn": torch.zeros(1024, 700).t(),
    }
    expect = {
        "plain": src["plain"],
        "emb": src["emb"][100:2600].to(torch.bfloat16),
        "half": src["half"].to(torch.float16),
        "pick": src["pick"][rows],
        "turn": src["turn"],
    }
    dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    select = {"emb": (100, 2500), "pick": rows}

    def make(sink: str = ""):
        tasks = []
        for k, d in dst.items():
            if sink and k == "turn":
                continue  # device destinations are contiguous
            d.zero_()
            tasks.append(
                (index, at[k], select.get(k), None, d.data_ptr(), dtype[d.dtype],
                 tuple(d.shape), d.stride(), bool(sink), k)
            )  # fmt: skip
        return _core.CopyJob(tasks, 2, 64 * MB, sink)  # 8 MB device slots

    # Bytes the view may serve: every dense range of 1 MiB or more except the index rows.
    from_view = (1024 * 700 + 2500 * 256 + 600 * 1024) * 4
    return Reads(path, dst, expect, make, from_view, 700 * 1024 * 4)


@pytest.mark.parametrize("sink", ["", "host_loopback"])
def test_cached_file_is_copied_from_the_page_cache_bit_for_bit(tmp_path, sink):
    r = jobs(tmp_path)
    path = r.path
    if not cachestat_works(path):
        pytest.skip("this kernel has no cachestat(2): every read goes through pread")
    warm(path)
    assert _core._testing.cached_pages(str(path), 0, path.stat().st_size) == pages_of(path)
    job = r.make(sink)
    job.run()
    for k in r.dst:
        if not (sink and k == "turn"):
            assert_same_bytes(r.dst[k], r.expect[k])
    assert job.bytes_from_cache == r.from_view + (0 if sink else r.strided)
    assert job.bytes_done == job.total_bytes
    assert shared_mappings_of(path) == []  # the view is gone when the job ends


def test_evicted_file_is_read_with_pread_bit_for_bit(tmp_path):
    r = jobs(tmp_path)
    path = r.path
    evict([str(path)])
    cached = _core._testing.cached_pages(str(path), 0, path.stat().st_size)
    if cached < 0:
        pytest.skip("this kernel has no cachestat(2)")
    if cached > pages_of(path) // 2:
        pytest.skip(f"the file system kept the file cached ({cached} pages): cannot make it cold")
    job = r.make()
    job.run()
    for k in r.dst:
        assert_same_bytes(r.dst[k], r.expect[k])
    # The first range read was cold, so pread; readahead may have cached later ones.
    assert job.bytes_from_cache < r.from_view + r.strided


def test_large_file_through_the_view_drops_pages_behind_it(tmp_path):
    """200 MB, past the pages kept mapped behind the copy: the dropped ranges were
    copied already, and what stays mapped when the load ends is nothing."""
    n = 50 * MB // 4
    src = {"a": torch.randn(n), "b": torch.randn(n), "c": torch.randn(n), "d": torch.randn(n)}
    path = tmp_path / "large.safetensors"
    save_file(src, str(path))
    if not cachestat_works(path):
        pytest.skip("this kernel has no cachestat(2)")
    warm(path)
    model = nn.Module()
    for k in src:
        model.register_buffer(k, torch.zeros(n))
    report = fastckpt.load_into(model, path)
    assert report.loaded == sorted(src)
    for k in src:
        assert_same_bytes(getattr(model, k), src[k])
    assert shared_mappings_of(path) == []


SHRINK_DURING_COPY = r"""
import json, os, sys, threading, time
import torch
from torch import nn
import fastckpt
path = sys.argv[1]
content = open(path, "rb").read()
outcomes = []
for i in range(10):
    with open(path, "wb") as f:
        f.write(content)  # cached again: the copy goes through the view
    model = nn.Module()
    model.register_buffer("w", torch.zeros(64 << 18))
    cutter = threading.Timer(0.001 * i, os.truncate, (path, 4096))
    cutter.start()
    try:
        fastckpt.load_into(model, path)
        outcomes.append("ok" if bool((model.w != 0).all()) else "zeros")
    except fastckpt.CheckpointError as e:
        outcomes.append(str(e))
    cutter.join()
print(json.dumps(outcomes))
"""


def test_file_cut_while_copying_from_the_view_gives_checkpoint_error(tmp_path):
    """Whatever the timing: the whole tensor, or a CheckpointError naming the file; never
    SIGBUS and never zeros loaded as weights."""
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.rand(64 << 18) + 1}, str(path))  # 64 MB, no zeros in it
    if not cachestat_works(path):
        pytest.skip("this kernel has no cachestat(2)")
    proc = run_python(SHRINK_DURING_COPY, path)
    assert proc.returncode == 0, proc.stderr[-3000:]  # -7 would be SIGBUS
    outcomes = json.loads(proc.stdout)
    assert all(o == "ok" or o.startswith(f"{path}: ") for o in outcomes), outcomes
    assert any(o != "ok" for o in outcomes), outcomes  # the early cuts land inside the load
