"""One rank of the read="once" tests (tests/test_read_once.py starts 2 or 4 of them).

``python -m tests.read_once_worker RANK WORLD PORT FOLDER SCENARIO...``: joins a
gloo process group, runs each scenario and writes ``FOLDER/rank{RANK}.json``, as
tests/sharded_worker.py does. Each scenario loads with ``read="once"`` and
compares every local tensor byte for byte with an ordinary load (``read="own"``)
of the same model and with the file's values as torch reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module

import fastckpt
from fastckpt import _core
from fastckpt.bench import evict
from tests.sharded_worker import (
    VOCAB,
    Net,
    fsdp,
    reference,
    same_as,
    serve,
    tp_plan,
    world_mesh,
)


def write_checkpoints(folder: Path) -> None:
    state = reference().state_dict()
    save_file(state, folder / "net.safetensors")
    save_file({k: v.half() for k, v in state.items()}, folder / "net16.safetensors")
    big = reference(vocab=VOCAB + 9).state_dict()
    # Renamed, the head stored transposed (a rule reads it back), torch's zip format.
    renamed = {"model." + k: v for k, v in big.items()}
    renamed["model.head.weight"] = big["head.weight"].t().contiguous()
    torch.save(renamed, folder / "renamed.pt")
    save_file({**state, "extra": torch.zeros(3)}, folder / "extra.safetensors")
    torch.save(reference(tied=True).state_dict(), folder / "tied.pt")
    torch.manual_seed(1)
    save_file(
        {"a.weight": torch.randn(512, 4096), "b.weight": torch.randn(2048, 1024)},
        folder / "wide.safetensors",
    )


def local_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in model.state_dict().items():
        local = t.to_local() if isinstance(t, DTensor) else t
        out[name] = local.detach().contiguous().view(torch.uint8).clone()
    return out


def compare(build: Callable[[], nn.Module], path: Path, expect: dict, **kw) -> dict:
    """Loads a fresh model twice, read="own" and read="once": their local bytes must be
    equal, and the once-loaded model's full tensors equal to ``expect``."""
    own = build()
    fastckpt.load_into(own, path, **kw)
    once = build()
    report = fastckpt.load_into(once, path, read="once", **kw)
    mine, theirs = local_bytes(once), local_bytes(own)
    differ = [n for n in theirs if not torch.equal(mine[n], theirs[n])]
    assert report.shared is not None
    return same_as(once, expect) | {
        "differ_from_own": differ,
        "read": report.shared.read,
        "sent": report.shared.sent,
        "received": report.shared.received,
        "bytes": report.bytes,
        "cast": len(report.cast),
        "renamed": len(report.renamed),
    }


def scenario_fsdp2(folder: Path) -> dict:
    path = folder / "net.safetensors"
    return compare(lambda: fsdp(Net(), world_mesh()), path, load_file(path))


def scenario_tp(folder: Path) -> dict:
    path = folder / "net.safetensors"
    return compare(lambda: parallelize_module(Net(), world_mesh(), tp_plan()), path,
                   load_file(path))  # fmt: skip


def scenario_replicated(folder: Path) -> dict:
    """A plain model on every rank (as under DDP): every byte is shared."""
    path = folder / "net.safetensors"
    return compare(Net, path, load_file(path))


def scenario_tied(folder: Path) -> dict:
    """Tied embeddings under FSDP2, from a torch zip file: written once, still tied."""
    path = folder / "tied.pt"
    out = compare(lambda: fsdp(Net(tied=True), world_mesh()), path, torch.load(path))
    model = fsdp(Net(tied=True), world_mesh())
    fastckpt.load_into(model, path, read="once")
    return out | {"tied": model.head.weight is model.embed.weight}


def scenario_cast(folder: Path) -> dict:
    """fp16 file into fp32 tensor-parallel shards."""
    path = folder / "net16.safetensors"
    expect = {k: v.float() for k, v in load_file(path).items()}
    return compare(lambda: parallelize_module(Net(), world_mesh(), tp_plan()), path, expect)


def scenario_rows_rules(folder: Path) -> dict:
    """Renames, rows[:VOCAB] of a bigger vocabulary and a transposed source, into TP shards."""
    rules = (
        f"model.embed.weight -> embed.weight rows[:{VOCAB}]\n"
        f"model.head.weight -> head.weight split[:,0:{VOCAB}] transpose\n"
        "model.{rest*} -> {rest*}\n"
    )
    big = torch.load(folder / "renamed.pt")
    expect = {k[len("model.") :]: v for k, v in big.items()}
    expect["embed.weight"] = expect["embed.weight"][:VOCAB]
    expect["head.weight"] = expect["head.weight"].t()[:VOCAB]

    def build() -> nn.Module:  # the head (not in the TP plan) stays a plain tensor
        return parallelize_module(Net(), world_mesh(), tp_plan())

    return compare(build, folder / "renamed.pt", expect, rules=rules)


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4096, 512, bias=False)
        self.b = nn.Linear(1024, 2048, bias=False)


def _cached(path: Path) -> int:
    return _core._testing.cached_pages(str(path), 0, path.stat().st_size)


def scenario_nodes(folder: Path) -> dict:
    """Groups of 2 ranks stand for nodes. Each rank loads a replicated model from its
    own copy of the file, evicted first, so the pages it fetched are what it read:
    first with read="own", then with read="once" within its node's group."""
    own = folder / f"wide{dist.get_rank()}.safetensors"
    own.write_bytes((folder / "wide.safetensors").read_bytes())
    node, _ = dist.new_subgroups(2)
    fetched, before = {}, {}
    for mode in ("own", "once"):
        model = Wide()
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # resident before the load: only the file's pages are counted
        evict([str(own)])
        before[mode] = _cached(own)
        dist.barrier()
        report = fastckpt.load_into(model, own, read=mode, group=node if mode == "once" else None)
        fetched[mode] = _cached(own)
        dist.barrier()
    expect = load_file(folder / "wide.safetensors")
    assert report.shared is not None
    return same_as(model, expect) | {
        "node": dist.get_rank() // 2,
        "before": sum(before.values()),
        "fetched_own": fetched["own"],
        "fetched_once": fetched["once"],
        "file_pages": (own.stat().st_size + 4095) // 4096,
        "read": report.shared.read,
        "received": report.shared.received,
        "data_bytes": sum(t.numel() * t.element_size() for t in expect.values()),
    }


def scenario_small_window(folder: Path) -> dict:
    """A host budget far below the tensors: tasks are cut, windows released as they go."""
    path = folder / "wide.safetensors"
    model = parallelize_module(
        Wide(), world_mesh(), {"a": tp_plan()["blocks.0.o"], "b": tp_plan()["blocks.0.q"]}
    )
    report = fastckpt.load_into(model, path, read="once", max_host_bytes=1 << 20)
    assert report.shared is not None
    return same_as(model, load_file(path)) | {"read": report.shared.read}


def scenario_dp_tp(folder: Path) -> dict:
    """Tensor parallel on a 2 x 2 mesh's "tp" dimension, replicated over "dp", all four
    ranks one group: each shard is needed by two ranks of four, so its runs (strided
    for Shard(1)) are packed and sent point to point."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    path = folder / "net.safetensors"
    return compare(lambda: parallelize_module(Net(), mesh["tp"], tp_plan()), path,
                   load_file(path))  # fmt: skip


def scenario_other_file(folder: Path) -> dict:
    """The last rank opens another checkpoint: every rank refuses, none hangs or writes."""
    model = Net()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    last = dist.get_rank() == dist.get_world_size() - 1
    path = folder / ("extra.safetensors" if last else "net.safetensors")
    try:
        fastckpt.load_into(model, path, strict=False, read="once")
        raised = ""
    except fastckpt.CheckpointError as e:
        raised = f"{type(e).__name__}: {e}"
    untouched = all(bool((p == 7.0).all()) for p in model.parameters())
    return {"raised": raised, "untouched": untouched}


def scenario_nccl(folder: Path) -> dict:
    """NCCL, one GPU per rank: a replicated CUDA model and TP shards on CUDA, sharing reads
    over an NCCL group (the bytes staged through the GPU)."""
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    group = dist.new_group(backend="nccl")
    path = folder / "net.safetensors"
    model = Net().cuda()
    report = fastckpt.load_into(model, path, read="once", group=group)
    expect = load_file(path)
    wrong = [
        n
        for n, t in model.state_dict().items()
        if not torch.equal(t.cpu().view(torch.uint8), expect[n].view(torch.uint8))
    ]
    assert report.shared is not None
    return {"wrong": wrong, "checked": len(expect), "received": report.shared.received}


SCENARIOS: dict[str, Callable[[Path], dict]] = {
    name[len("scenario_") :]: fn for name, fn in globals().items() if name.startswith("scenario_")
}


if __name__ == "__main__":
    serve(SCENARIOS, write_checkpoints)
