"""The streaming safetensors writer and atomic writes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fastckpt.source.safetensors_writer import TensorSpec, write_safetensors
from tests.conftest import ALL_DTYPES, assert_same_bytes, random_tensor


def test_round_trip_every_dtype_and_layout(tmp_path):
    tensors = {f"t{i}": random_tensor((3, 4), d, i) for i, d in enumerate(ALL_DTYPES)}
    tensors["transposed"] = torch.randn(4, 6).t()
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.bfloat16)
    tensors["empty"] = torch.zeros(0, 5)
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    path = tmp_path / "out.safetensors"
    write_safetensors(path, specs, lambda s: tensors[s.name], metadata={"source": "test"})
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert_same_bytes(back[k], v)


def test_failure_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"the good checkpoint")
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))]

    def produce(spec):
        if spec.name == "b":
            raise RuntimeError("disk on fire")
        return torch.ones(2)

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_safetensors(path, specs, produce)
    assert path.read_bytes() == b"the good checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_wrong_shape_from_producer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="expected torch.float32 \\(3,\\)"):
        write_safetensors(
            tmp_path / "x.safetensors",
            [TensorSpec("a", torch.float32, (3,))],
            lambda s: torch.ones(2),
        )
