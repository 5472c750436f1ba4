"""load_into with CUDA destinations (pinned staging ring, async copies through the
CUDA runtime torch loaded). Skipped without a GPU; run them on a GPU machine."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastckpt
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
        torch.cuda.synchronize()
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
