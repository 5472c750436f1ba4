"""One rank of tests/test_deepspeed.py's FSDP2 loads (tests/rank_pool.py runs 2 of them).

Each scenario builds the fixtures' ``Net`` as an FSDP2 model on the 2 gloo ranks, loads a
committed ZeRO folder into it with fastckpt, and compares every full tensor byte for byte
with DeepSpeed's ``zero_to_fp32`` reference beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard

import fastckpt
from tests.fixtures.make_deepspeed import Net
from tests.sharded_worker import same_as, world_mesh

DATA = Path(__file__).resolve().parent / "data" / "deepspeed"


def _fsdp_net(meta: bool = False) -> torch.nn.Module:
    torch.manual_seed(1)  # other values than the checkpoint's
    if meta:
        with torch.device("meta"):
            model = Net()
    else:
        model = Net()
    mesh = world_mesh()
    for layer in (model.up, model.down, model.frozen):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _load(run: str, meta: bool = False) -> dict:
    model = _fsdp_net(meta)
    report = fastckpt.load_into(model, DATA / run, device="cpu" if meta else None)
    expect = torch.load(DATA / run / "reference.pt", weights_only=True)
    state = model.state_dict()
    # the model's dtypes (zero_to_fp32 makes floating buffers fp32; the model decides)
    expect = {k: v.to(state[k].dtype) for k, v in expect.items()}
    out = same_as(model, expect)
    out["bytes"] = report.bytes  # this rank's: its shards, not the whole tensors
    out["total"] = sum(v.nbytes for k, v in expect.items() if k != "head.weight")  # tied
    out["missing"] = report.missing
    return out


def scenario_fsdp2_zero2(folder: Path) -> dict:
    return _load("zero2")


def scenario_fsdp2_zero3(folder: Path) -> dict:
    return _load("zero3")


def scenario_fsdp2_zero3_bf16_meta(folder: Path) -> dict:
    return _load("zero3_bf16", meta=True)


def scenario_read_once_zero3(folder: Path) -> dict:
    """Plain models on both ranks, each byte of the partitions read by one rank and sent."""
    torch.manual_seed(1)
    model = Net()
    report = fastckpt.load_into(model, DATA / "zero3", read="once")
    expect = torch.load(DATA / "zero3" / "reference.pt", weights_only=True)
    out = same_as(model, expect)
    out.update(bytes=report.bytes, total=1, missing=report.missing, sharded=1)
    return out


def write_checkpoints(folder: Path) -> None:
    """Nothing: the fixtures are committed (tests/data/deepspeed)."""


SCENARIOS = {
    name[len("scenario_") :]: fn for name, fn in globals().items() if name.startswith("scenario_")
}
