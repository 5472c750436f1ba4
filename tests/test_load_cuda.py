"""load_into with CUDA destinations (pinned staging ring, async copies through the
CUDA runtime torch loaded). Skipped without a GPU; run them on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastckpt
from fastckpt import _core
from tests.conftest import assert_same_bytes
from tests.test_load import Zoo, randomized_state, tiny_roberta_mlm

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def assert_same_on_cpu(model: nn.Module, state: dict[str, torch.Tensor], dtype=None) -> None:
    for k, v in model.state_dict().items():
        want = state[k] if dtype is None or not state[k].is_floating_point() else state[k].to(dtype)
        assert_same_bytes(v.cpu(), want)


@pytest.mark.parametrize("max_host_bytes", [1 << 20, 256 << 20], ids=["tiny-ring", "default"])
def test_load_into_cuda_model(tmp_path, max_host_bytes):
    state = randomized_state(Zoo())
    save_file(state, str(tmp_path / "z.safetensors"))
    model = Zoo().cuda()
    report = fastckpt.load_into(model, tmp_path / "z.safetensors", max_host_bytes=max_host_bytes)
    assert report.missing == []
    assert all(p.is_cuda for p in model.parameters())
    assert_same_on_cpu(model, state)


def test_large_tensor_cycles_the_ring(tmp_path):
    big = torch.randn(4096, 1024)  # 16 MB through a 1 MB budget: 128 KiB slots reused many times
    save_file({"x": big}, str(tmp_path / "big.safetensors"))

    class One(nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.x = nn.Parameter(torch.zeros(4096, 1024, dtype=dtype, device="cuda"))

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = One(dtype)
        fastckpt.load_into(model, tmp_path / "big.safetensors", max_host_bytes=1 << 20)
        # No torch.cuda.synchronize() here: load_into must itself return only once
        # its copies (on its own non-blocking stream) have finished.
        assert_same_bytes(model.x.detach().cpu(), big.to(dtype))


def test_meta_model_onto_cuda(tmp_path):
    state = {k: v.clone() for k, v in randomized_state(tiny_roberta_mlm(), seed=2).items()}
    save_file(state, str(tmp_path / "r.safetensors"))
    with torch.device("meta"):
        model = tiny_roberta_mlm()
    fastckpt.load_into(model, tmp_path / "r.safetensors", device="cuda")
    ref = tiny_roberta_mlm()
    ref.load_state_dict(state)
    for k, v in model.state_dict().items():
        assert v.is_cuda
        assert_same_bytes(v.cpu(), ref.state_dict()[k])
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight


def test_cpu_model_moved_with_device_argument(tmp_path):
    state = randomized_state(Zoo())
    save_file(state, str(tmp_path / "z.safetensors"))
    model = Zoo()
    fastckpt.load_into(model, tmp_path / "z.safetensors", device="cuda", dtype=torch.bfloat16)
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in model.parameters())
    assert_same_bytes(model.embed.weight.detach().cpu(), state["embed.weight"].to(torch.bfloat16))


def test_non_contiguous_cuda_destination_is_refused(tmp_path):
    save_file({"w": torch.randn(5, 7)}, str(tmp_path / "t.safetensors"))

    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(7, 5, device="cuda").t())

    with pytest.raises(
        fastckpt.CheckpointError, match="the destination on the device is not contiguous"
    ):
        fastckpt.load_into(T(), tmp_path / "t.safetensors")


def test_progress_bar_onto_cuda(tmp_path):
    """progress=True runs the job on another thread (pinned memory allocated there)."""
    state = randomized_state(Zoo())
    save_file(state, str(tmp_path / "z.safetensors"))
    model = Zoo().cuda()
    fastckpt.load_into(model, tmp_path / "z.safetensors", progress=True, max_host_bytes=1 << 20)
    assert_same_on_cpu(model, state)


def test_bad_device_index_is_a_checkpoint_error(tmp_path):
    from fastckpt.load.execute import _find_cudart

    save_file({"x": torch.randn(4, 6)}, str(tmp_path / "x.safetensors"))
    ckpt = fastckpt.open(tmp_path / "x.safetensors")
    fi, xi = ckpt._locate("x")
    dst = torch.zeros(4, 6, device="cuda")
    task = (ckpt._indexes[fi], xi, None, None, dst.data_ptr(), "F32", (4, 6), (6, 1), True, "x")
    before = torch.cuda.current_device()
    bad = torch.cuda.device_count()
    with pytest.raises(fastckpt.CheckpointError, match=f"cudaSetDevice failed on cuda:{bad}"):
        _core.CopyJob([task], 1, 1 << 20, "cuda", _find_cudart(), bad)
    assert torch.cuda.current_device() == before
    # The failed call's error was cleared: torch's next launch check does not report it.
    dst.add_(1)
    torch.cuda.synchronize()


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@two_gpus
def test_second_gpu_leaves_the_current_device_alone(tmp_path):
    state = randomized_state(Zoo())
    save_file(state, str(tmp_path / "z.safetensors"))
    torch.cuda.set_device(0)
    model = Zoo().to("cuda:1")
    fastckpt.load_into(model, tmp_path / "z.safetensors", max_host_bytes=1 << 20)
    assert torch.cuda.current_device() == 0
    assert all(p.device == torch.device("cuda:1") for p in model.parameters())
    assert_same_on_cpu(model, state)


@two_gpus
def test_device_argument_moves_off_gpu_zero(tmp_path):
    state = randomized_state(Zoo())
    save_file(state, str(tmp_path / "z.safetensors"))
    model = Zoo().to("cuda:0")
    with torch.cuda.device(1):
        fastckpt.load_into(model, tmp_path / "z.safetensors", device="cuda:1")
    assert all(p.device == torch.device("cuda:1") for p in model.parameters())
    assert_same_on_cpu(model, state)
