"""tests/test_remote_dcp.py's FSDP2 ranks, run by the shared pool of 2 gloo ranks
(tests/rank_pool.py): ``save_big`` writes FOLDER/big with ``dcp.save`` from an FSDP2 model
large enough that a rank's shard outweighs the archives' headers; the test uploads it and
writes the S3 server's environment to FOLDER/env.json; ``remote_dcp_fsdp2`` loads it from
the URL. Each rank signs with its own access key (``rank<N>``), so that the server counts
the bytes it sent to each rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

import fastckpt
from tests.sharded_worker import fsdp, same_as, world_mesh


class Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1001, 256)  # uneven over 2 ranks
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256)) for _ in range(2)]
        )
        self.norm = nn.LayerNorm(256)


def reference() -> Big:
    torch.manual_seed(0)
    return Big()


def write_checkpoints(folder: Path) -> None:
    """The ranks save together (scenario save_big)."""


def scenario_save_big(folder: Path) -> dict:
    model = fsdp(reference(), world_mesh())
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=folder / "big")
    return {}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def shards_from_url(folder: Path, make: Callable[[], nn.Module], want: nn.Module,
                    local_path: Path) -> dict:  # fmt: skip
    """This rank's FSDP2 shards of ``make()`` loaded from the URL of FOLDER/env.json (signed
    as ``rank<N>``), compared with ``want``'s values and with a load of ``local_path``; the
    bytes fetched, the headers' and the shard's. (tests/remote_deepspeed_worker too.)"""
    env = json.loads((folder / "env.json").read_text())
    env["AWS_ACCESS_KEY_ID"] = f"rank{dist.get_rank()}"
    torch.manual_seed(1)
    with mock.patch.dict(os.environ, env):
        model = fsdp(make(), world_mesh())
        plan = fastckpt.plan(model, env["FASTCKPT_TEST_URL"])
        header = plan.checkpoint._remote.header_bytes
        report = fastckpt.load_into(model, plan)
    torch.manual_seed(2)
    local = fsdp(make(), world_mesh())
    fastckpt.load_into(local, local_path)
    unlike, shard_bytes = [], 0
    other = local.state_dict()
    for name, t in model.state_dict().items():
        a, b = _local(t), _local(other[name])
        shard_bytes += a.numel() * a.element_size()
        if a.shape != b.shape or not torch.equal(
            a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
        ):
            unlike.append(name)  # this rank's shard differs from the local load's
    expect = {k: v.detach() for k, v in want.state_dict().items()}
    return same_as(model, expect) | {
        "unlike_local": unlike, "fetched": report.fetched, "header": header,
        "local_bytes": shard_bytes,
    }  # fmt: skip


def scenario_remote_dcp_fsdp2(folder: Path) -> dict:
    return shards_from_url(folder, Big, reference(), folder / "big")


SCENARIOS = {
    name[len("scenario_") :]: fn for name, fn in globals().items() if name.startswith("scenario_")
}
