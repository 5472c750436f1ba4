"""The CUDA sink (csrc/copy/cuda_sink.cpp) against a stand-in CUDA runtime.

tests/fake_cudart.cpp implements the runtime entry points the sink resolves over
host memory, with copies that run late on a stream thread, calls that can be
made to fail, and counters of what is alive. This runs the sink's real code
(dlopen, symbol lookup, device switching, events, the staging ring, error paths
and clean-up) on machines without a GPU; tests/test_load_cuda.py covers real
hardware when there is some.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess
import threading
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import save_file

import fastckpt
from fastckpt import _core
from tests.conftest import assert_same_bytes

SOURCE = Path(__file__).with_name("fake_cudart.cpp")


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> tuple[str, ctypes.CDLL]:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("needs a C++ compiler to build the stand-in CUDA runtime")
    lib = tmp_path_factory.mktemp("fake_cudart") / "libcudart_fake.so"
    subprocess.run(
        [compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o"]
        + [str(lib)],
        check=True,
    )
    handle = ctypes.CDLL(str(lib))  # the sink's dlopen(RTLD_NOLOAD) finds this copy
    return str(lib), handle


def stats(handle: ctypes.CDLL) -> dict[str, int]:
    out = (ctypes.c_int * 3)()
    handle.fake_stats(out)
    return {"streams": out[0], "events": out[1], "pinned": out[2]}


def current_device(handle: ctypes.CDLL) -> int:
    d = ctypes.c_int(-1)
    assert handle.cudaGetDevice(ctypes.byref(d)) == 0
    return d.value


@pytest.fixture()
def setup(tmp_path):
    """Four copy tasks from a file of three tensors into CPU tensors standing in for the device."""
    src = torch.randn(1000, 700)  # 2.8 MB through 128 KiB slots: the ring cycles many times
    y = torch.randn(10, 700, dtype=torch.float64)
    small = torch.arange(5, dtype=torch.int32)
    save_file({"x": src, "y": y, "s": small}, str(tmp_path / "r.safetensors"))
    ckpt = fastckpt.open(tmp_path / "r.safetensors")
    index = ckpt._indexes[0]
    xi, yi, si = (ckpt._locate(n)[1] for n in ("x", "y", "s"))
    dst = {
        "x": torch.zeros(1000, 700),
        "x2": torch.zeros(400, 700, dtype=torch.bfloat16),
        "y": torch.zeros(10, 700, dtype=torch.float16),
        "s": torch.zeros(5, dtype=torch.int32),
    }

    def task(ti: int, rows, name: str, dtype: str) -> tuple:
        t = dst[name]
        return (index, ti, rows, None, t.data_ptr(), dtype, tuple(t.shape), t.stride(), True, name)

    tasks = [
        task(xi, None, "x", "F32"),
        task(xi, (100, 400), "x2", "BF16"),  # rows 100..499, cast on the way
        task(yi, None, "y", "F16"),
        task(si, None, "s", "I32"),
    ]
    want = {
        "x": src,
        "x2": src[100:500].to(torch.bfloat16),
        "y": y.to(torch.float16),
        "s": small,
    }
    return tasks, dst, want


class Outcome(NamedTuple):
    error: str | None  # the CheckpointError's text
    last_error: int  # the calling thread's sticky CUDA error afterwards
    device: int  # the calling thread's current device afterwards (it was 1)


def run_job(tasks, handle: ctypes.CDLL, path: str, device: int = 0) -> Outcome:
    """Builds and runs a job through the sink on a fresh thread whose device is 1.

    A thread: a hang fails the test instead of stalling the suite, and the
    runtime's per-thread state (current device, sticky error) can be read where
    the job was built. No reference to the job survives (an exception's
    traceback would keep one), so the sink is gone before the caller counts.
    """
    out: list[Outcome] = []

    def target() -> None:
        assert handle.cudaSetDevice(1) == 0
        error = None
        try:
            job = _core.CopyJob(tasks, 2, 1 << 20, "cuda", path, device)
            try:
                job.run()
                assert job.bytes_done == job.total_bytes
            finally:
                del job
        except fastckpt.CheckpointError as e:
            error = str(e)
        out.append(Outcome(error, handle.fake_peek_last_error(), current_device(handle)))

    t = threading.Thread(target=target)
    t.start()
    t.join(60.0)
    assert not t.is_alive(), "the copy job hangs"
    assert out, "the job raised something other than a CheckpointError"
    return out[0]


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_copies_through_the_sink_arrive_intact_and_nothing_leaks(fake, setup, threads):
    path, handle = fake
    tasks, dst, want = setup
    assert handle.cudaSetDevice(1) == 0  # the caller is on another device
    job = _core.CopyJob(tasks, threads, 1 << 20, "cuda", path, 0)
    job.run()
    assert job.bytes_done == job.total_bytes
    for name, tensor in dst.items():
        assert_same_bytes(tensor, want[name])
    del job
    assert stats(handle)["streams"] == 0 and stats(handle)["events"] == 0
    assert stats(handle)["pinned"] == 0
    assert current_device(handle) == 1  # given back
    assert handle.cudaSetDevice(0) == 0


# (call made to fail, on which of its calls): every one must end in a CheckpointError
# that names the call and the device, with no hang, nothing left alive and the
# caller's sticky CUDA error cleared.
FAILURES = [
    ("cudaStreamCreateWithFlags", 1),
    ("cudaEventCreateWithFlags", 3),
    ("cudaHostAlloc", 1),
    ("cudaHostAlloc", 3),
    ("cudaMemcpyAsync", 1),
    ("cudaMemcpyAsync", 7),
    ("cudaEventRecord", 5),
    ("cudaEventSynchronize", 4),
    ("cudaStreamSynchronize", 1),
]


@pytest.mark.parametrize(("call", "nth"), FAILURES, ids=[f"{c}#{n}" for c, n in FAILURES])
def test_a_failing_runtime_call_is_reported_and_cleaned_up(fake, setup, call, nth):
    path, handle = fake
    tasks, _, _ = setup
    handle.fake_fail(call.encode(), nth)
    try:
        got = run_job(tasks, handle, path)
    finally:
        handle.fake_fail(b"", 0)
    assert got.error is not None, "the failure went unnoticed"
    assert got.error.startswith(f"{path}: {call} failed on cuda:0: fake failure"), got.error
    assert stats(handle)["streams"] == 0 and stats(handle)["events"] == 0
    assert stats(handle)["pinned"] == 0
    assert got.last_error == 0  # torch would report a sticky error as its own
    assert got.device == 1  # the caller's device, given back

def test_a_device_the_runtime_lacks_is_refused(fake, setup):
    path, handle = fake
    tasks, _, _ = setup
    got = run_job(tasks, handle, path, device=5)
    assert got.error == f"{path}: cudaSetDevice failed on cuda:5: invalid device ordinal"
    assert stats(handle)["streams"] == 0 and got.last_error == 0 and got.device == 1

def test_a_library_that_is_not_the_cuda_runtime_is_refused(tmp_path, setup):
    tasks, _, _ = setup
    libc = ctypes.util.find_library("c")
    assert libc is not None
    with pytest.raises(fastckpt.CheckpointError, match="CUDA runtime has no symbol cudaGetDevice"):
        _core.CopyJob(tasks, 1, 1 << 20, "cuda", libc, 0)
    missing = str(tmp_path / "libcudart.so.99")
    with pytest.raises(
        fastckpt.CheckpointError, match=f"^{missing}: cannot load the CUDA runtime: "
    ):
        _core.CopyJob(tasks, 1, 1 << 20, "cuda", missing, 0)
