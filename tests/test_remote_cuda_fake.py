"""A remote load into CUDA destinations goes through the CUDA sink's pinned ring.

There is no GPU here: the stand-in runtime (tests/fake_cudart.cpp, as in
tests/test_cuda_sink_fake.py) takes the place of libcudart, and CPU tensors stand in
for device memory ("device" pointers are host pointers there). The engine stages each
fetched window's bytes into page-locked slots (cudaHostAlloc) and queues their copies
on a stream (cudaMemcpyAsync + an event per slot), the copies running late on the
stream's thread: a slot refilled before its copy ended would show as wrong bytes.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastckpt
from fastckpt.errors import CheckpointError
from fastckpt.load import execute
from tests.test_cuda_sink_fake import SOURCE, stats

pytest.importorskip("obstore", reason="the 'remote' extra (obstore) is not installed")


@pytest.fixture(scope="module")
def fake_cudart(tmp_path_factory) -> tuple[str, ctypes.CDLL]:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("needs a C++ compiler to build the stand-in CUDA runtime")
    lib = tmp_path_factory.mktemp("fake_cudart_remote") / "libcudart_fake.so"
    subprocess.run(
        [compiler, "-std=c++17", "-O1", "-shared", "-fPIC", "-pthread", str(SOURCE), "-o"]
        + [str(lib)],
        check=True,
    )
    return str(lib), ctypes.CDLL(str(lib))


@pytest.fixture
def as_cuda(fake_cudart, monkeypatch):
    """Every destination is treated as on cuda:0, through the stand-in runtime."""
    path, handle = fake_cudart
    monkeypatch.setattr(execute, "_device_key", lambda d: ("cuda", 0))
    monkeypatch.setattr(execute, "_find_cudart", lambda: path)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return handle


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(4096, 128)
        self.fc = nn.Linear(128, 256)
        self.half = nn.Linear(64, 64).to(torch.bfloat16)


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in Net().state_dict().items()}
    sd["half.weight"] = sd["half.weight"].float()  # cast to bf16 on the way
    return sd


@pytest.fixture
def served(tmp_path, monkeypatch):
    from tests.remote_servers import RangeServer

    path = tmp_path / "model.safetensors"
    save_file(state(), str(path))
    server = RangeServer()
    server.files["/m/model.safetensors"] = path.read_bytes()
    monkeypatch.setenv("FASTCKPT_REMOTE_TIMEOUT", "5")
    yield f"{server.url}/m/model.safetensors", path
    server.stop()


def test_remote_load_into_cuda_goes_through_the_pinned_ring(as_cuda, served):
    url, path = served
    local = Net()
    fastckpt.load_into(local, path)
    model = Net()
    torch.manual_seed(5)
    for p in model.parameters():
        p.data.normal_()
    # A small budget: 2.3 MB in windows of 512 KiB, each staged through 4 slots of 128 KiB.
    report = fastckpt.load_into(model, url, max_host_bytes=1 << 20)
    assert report.fetched > 0
    for k, v in local.state_dict().items():
        got = model.state_dict()[k]
        assert torch.equal(got.view(torch.uint8), v.view(torch.uint8)), k
    assert stats(as_cuda) == {"streams": 0, "events": 0, "pinned": 0}  # all given back


def test_a_failing_device_copy_mid_load_is_reported_and_cleaned_up(as_cuda, served):
    url, _ = served
    as_cuda.fake_fail(b"cudaMemcpyAsync", 3)
    try:
        with pytest.raises(CheckpointError, match="cudaMemcpyAsync failed on cuda:0"):
            fastckpt.load_into(Net(), url, max_host_bytes=1 << 20)
    finally:
        as_cuda.fake_fail(b"", 0)
    assert stats(as_cuda) == {"streams": 0, "events": 0, "pinned": 0}
