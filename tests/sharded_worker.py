"""One rank of the sharded-load tests (tests/test_sharded_load.py starts 2 or 4 of them).

``python -m tests.sharded_worker RANK WORLD PORT FOLDER SCENARIO...``: joins a
gloo process group, runs each scenario (a function below) and writes
``FOLDER/rank{RANK}.json``: per scenario, "ok" or the error's type and text, and
the numbers the test checks. Rank 0 writes the checkpoints first.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

import fastckpt
from fastckpt import _core
from fastckpt.bench import evict

VOCAB, DIM, FF = 37, 12, 22  # uneven over 2 and 4 ranks


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(DIM, DIM)
        self.o = nn.Linear(DIM, DIM)
        self.up = nn.Linear(DIM, FF)
        self.down = nn.Linear(FF, DIM)
        self.norm = nn.LayerNorm(DIM)


class Net(nn.Module):
    def __init__(self, tied: bool = False, vocab: int = VOCAB) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.arange(5, dtype=torch.float32))


def reference(seed: int = 0, tied: bool = False, vocab: int = VOCAB) -> Net:
    torch.manual_seed(seed)
    model = Net(tied, vocab)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def write_checkpoints(folder: Path) -> None:
    state = reference().state_dict()
    save_file(state, folder / "net.safetensors")
    torch.save(reference(tied=True).state_dict(), folder / "tied.pt")
    # A bigger vocabulary under other names: rules rename and cut rows[:VOCAB].
    big = reference(vocab=VOCAB + 9).state_dict()
    save_file({"model." + k: v for k, v in big.items()}, folder / "renamed.safetensors")
    # Rank-specific copies for the refusal scenarios.
    short = dict(state)
    del short["blocks.1.up.bias"]
    save_file(short, folder / "short.safetensors")
    save_file({**state, "extra": torch.zeros(3)}, folder / "extra.safetensors")
    # Page counts: wide rows, so that each rank's runs are long.
    torch.manual_seed(1)
    save_file(
        {"a.weight": torch.randn(512, 4096), "b.weight": torch.randn(2048, 1024)},
        folder / "wide.safetensors",
    )


def tp_plan() -> dict:
    plan = {"embed": RowwiseParallel(input_layouts=Replicate()), "norm": SequenceParallel()}
    for i in range(2):
        plan |= {
            f"blocks.{i}.q": ColwiseParallel(),
            f"blocks.{i}.o": RowwiseParallel(),
            f"blocks.{i}.up": ColwiseParallel(),
            f"blocks.{i}.down": RowwiseParallel(),
            f"blocks.{i}.norm": SequenceParallel(),
        }
    return plan


def fsdp(model: nn.Module, mesh) -> nn.Module:
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def same_as(model: nn.Module, expect: dict[str, torch.Tensor]) -> dict:
    """Every state tensor's full value against the plain load, byte for byte."""
    wrong, sharded = [], 0
    for name, t in model.state_dict().items():
        if isinstance(t, DTensor):
            sharded += 1
            t = t.full_tensor()
        want = expect[name]
        if t.shape != want.shape or not torch.equal(
            t.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
        ):
            wrong.append(name)
    return {"wrong": wrong, "sharded": sharded, "checked": len(expect)}


def world_mesh():
    return init_device_mesh("cpu", (dist.get_world_size(),))


def scenario_fsdp2(folder: Path) -> dict:
    model = fsdp(Net(), world_mesh())
    report = fastckpt.load_into(model, folder / "net.safetensors")
    state = load_file(folder / "net.safetensors")
    return same_as(model, state) | {
        "bytes": report.bytes,
        "file_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "buffer_bytes": state["scale"].numel() * 4,  # a plain buffer: every rank reads it
    }


def scenario_tp(folder: Path) -> dict:
    model = parallelize_module(Net(), world_mesh(), tp_plan())
    fastckpt.load_into(model, folder / "net.safetensors")
    return same_as(model, load_file(folder / "net.safetensors"))


def scenario_dp_tp(folder: Path) -> dict:
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    model = parallelize_module(Net(), mesh["tp"], tp_plan())
    fsdp(model, mesh["dp"])
    placements = {str(p.placements) for p in model.parameters()}
    fastckpt.load_into(model, folder / "net.safetensors")
    return same_as(model, load_file(folder / "net.safetensors")) | {
        "placements": sorted(placements)
    }


def scenario_meta_to_empty(folder: Path) -> dict:
    with torch.device("meta"):
        model = Net()
    fsdp(model, world_mesh())
    model.to_empty(device="cpu")
    fastckpt.load_into(model, folder / "net.safetensors")
    return same_as(model, load_file(folder / "net.safetensors"))


def scenario_meta_device(folder: Path) -> dict:
    with torch.device("meta"):
        model = Net()
    fsdp(model, world_mesh())
    model.scale = torch.arange(5, dtype=torch.float32)  # buffers get values of their own
    fastckpt.load_into(model, folder / "net.safetensors", device="cpu")
    return same_as(model, load_file(folder / "net.safetensors"))


def scenario_rules_rows(folder: Path) -> dict:
    model = parallelize_module(Net(), world_mesh(), tp_plan())
    rules = f"model.embed.weight -> embed.weight rows[:{VOCAB}]\n"
    rules += f"model.head.weight -> head.weight rows[:{VOCAB}]\nmodel.{{rest*}} -> {{rest*}}\n"
    report = fastckpt.load_into(model, folder / "renamed.safetensors", rules)
    big = load_file(folder / "renamed.safetensors")
    expect = {k[len("model.") :]: v for k, v in big.items()}
    expect["embed.weight"] = expect["embed.weight"][:VOCAB]
    expect["head.weight"] = expect["head.weight"][:VOCAB]
    return same_as(model, expect) | {"renamed": len(report.renamed)}


def scenario_tied(folder: Path) -> dict:
    model = fsdp(Net(tied=True), world_mesh())
    fastckpt.load_into(model, folder / "tied.pt")
    tied = model.head.weight is model.embed.weight
    return same_as(model, torch.load(folder / "tied.pt")) | {"tied": tied}


def _refusal(folder: Path, odd_file: str, strict: bool) -> dict:
    model = fsdp(Net(), world_mesh())
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().fill_(7.0)
    last = dist.get_rank() == dist.get_world_size() - 1
    path = folder / (odd_file if last else "net.safetensors")
    try:
        fastckpt.load_into(model, path, strict=strict)
        raised = ""
    except fastckpt.CheckpointError as e:
        raised = f"{type(e).__name__}: {e}"
    untouched = all(bool((p.to_local() == 7.0).all()) for p in model.parameters())
    return {"raised": raised, "untouched": untouched}


def scenario_strict_refusal(folder: Path) -> dict:
    return _refusal(folder, "short.safetensors", strict=True)


def scenario_other_file(folder: Path) -> dict:
    return _refusal(folder, "extra.safetensors", strict=False)


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4096, 512, bias=False)  # rowwise: Shard(1), runs of 4096*4/world B
        self.b = nn.Linear(1024, 2048, bias=False)  # colwise: Shard(0), one contiguous range


def scenario_pages(folder: Path) -> dict:
    """Each rank loads its own copy, evicted first; pages it fetched vs its shard's pages."""
    own = folder / f"wide{dist.get_rank()}.safetensors"
    own.write_bytes((folder / "wide.safetensors").read_bytes())
    model = parallelize_module(
        Wide(), world_mesh(), {"a": RowwiseParallel(), "b": ColwiseParallel()}
    )
    evict([str(own)])
    before = _core._testing.cached_pages(str(own), 0, own.stat().st_size)
    p = fastckpt.plan(model, own)
    shard_pages = set()
    for piece in p.pieces:
        index = p.checkpoint._core_indexes[0]
        base = index.tensor_view(index.names().index(piece.source)).file_offset
        offset, shape, strides = piece.src_view
        rows = torch.arange(shape[0]) * strides[0]
        for start in rows.tolist():
            first = base + (offset + start) * 4
            last = first + shape[1] * 4 - 1
            shard_pages.update(range(first // 4096, last // 4096 + 1))
    report = fastckpt.load_into(model, p)
    fetched = _core._testing.cached_pages(str(own), 0, own.stat().st_size)
    full = dict(load_file(folder / "wide.safetensors").items())
    ok = same_as(model, full)
    return ok | {
        "before": before,
        "fetched": fetched,
        "shard_pages": len(shard_pages),
        "local_bytes": report.bytes,
        "file_pages": (own.stat().st_size + 4095) // 4096,
    }


SCENARIOS: dict[str, Callable[[Path], dict]] = {
    name[len("scenario_") :]: fn for name, fn in globals().items() if name.startswith("scenario_")
}


def serve(scenarios: dict[str, Callable[[Path], dict]], write: Callable[[Path], None]) -> None:
    """Join the gloo group named by argv, let rank 0 write the checkpoints, run the
    scenarios named by argv in order, and write this rank's results as JSON."""
    rank, world, port, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    if rank == 0:
        write(folder)
    dist.barrier()
    results = {}
    for name in sys.argv[5:]:
        try:
            results[name] = {"ok": True} | scenarios[name](folder)
        except Exception as e:
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                             "trace": traceback.format_exc()}  # fmt: skip
        dist.barrier()
    (folder / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    serve(SCENARIOS, write_checkpoints)
