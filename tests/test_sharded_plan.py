"""Plans for DTensor models, in one process: torch's fake process group stands in
for the other ranks (planning needs metadata only, no communication)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Partial, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import fastckpt
from tests.test_sharding import fake_rank


def two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 8, bias=False))


def test_explain_shows_bytes_per_rank(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(two_layers().state_dict(), str(path))
    with fake_rank(0, 2):
        mesh = init_device_mesh("cpu", (2,))
        model = parallelize_module(
            two_layers(), mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()}
        )
        p = fastckpt.plan(model, path)
        text = p.explain()
    # Each rank: half of 0.weight (6x8), of 0.bias (6) and of 1.weight (8x6): 51 floats.
    assert p.sharded == ["0.weight", "0.bias", "1.weight"]
    assert p.local_bytes == 51 * 4
    lines = [ln.strip() for ln in text.splitlines() if "read by rank" in ln]
    assert lines == ["0.000 MB read by rank 0", "0.000 MB read by rank 1"]
    from fastckpt.planning.dtensor_plan import bytes_per_rank

    assert bytes_per_rank(p) == {0: 204, 1: 204}


def test_partial_placement_is_refused_by_name(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(two_layers().state_dict(), str(path))
    with fake_rank(0, 2):
        mesh = init_device_mesh("cpu", (2,))
        model = two_layers()
        weight = distribute_tensor(torch.zeros(6, 8), mesh, [Partial()], src_data_rank=None)
        model[0].weight = nn.Parameter(weight)
        with pytest.raises(
            fastckpt.CheckpointError, match=r"'0.weight' is a DTensor with placement Partial"
        ):
            fastckpt.load_into(model, path)
