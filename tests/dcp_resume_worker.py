"""One rank of the FSDP2 resume tests (tests/test_resume_dcp.py runs 2 of them).

Run by tests/rank_pool.py's ranks: ``save`` writes a DCP directory of
``get_model_state_dict`` + ``get_optimizer_state_dict`` (AdamW, two param groups, one
step) from an FSDP2 model; ``unchanged`` resumes it with fastckpt and with torch's own
``dcp.load`` + ``set_*_state_dict`` and compares every local shard byte for byte, before
and after one more step; ``changed`` resumes a model with a parameter added, one dropped
and one renamed by a rule, and compares what was restored with torch's reading.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

import fastckpt
from tests.sharded_worker import DIM, VOCAB, Block, fsdp, reference, world_mesh

RENAME = "head.weight -> out.weight"


class Changed(nn.Module):
    """tests.sharded_worker.Net with ``extra`` added, ``norm`` dropped, ``head`` renamed."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.out = nn.Linear(DIM, VOCAB, bias=False)
        self.extra = nn.Linear(DIM, 3)
        self.register_buffer("scale", torch.arange(5, dtype=torch.float32))


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


def _step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    """Gradients of distinct values per element, the same full tensor on every rank."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        full = torch.randn(p.shape, generator=gen)
        p.grad = distribute_tensor(full, p.device_mesh, p.placements)
    opt.step()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = _local(a), _local(b)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def _torch_resumed(folder: Path) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = fsdp(reference(seed=2), world_mesh())
    opt = _optimizer(model, 0.5)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    return model, opt


def _by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: opt.state[p] for g in opt.param_groups for p in g["params"]}


def scenario_save(folder: Path) -> dict:
    model = fsdp(reference(), world_mesh())
    opt = _optimizer(model, 0.01)
    _step(model, opt, 100)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=folder / "ckpt")
    return {}


def scenario_unchanged(folder: Path) -> dict:
    model = fsdp(reference(seed=1), world_mesh())
    opt = _optimizer(model, 0.5)
    report = fastckpt.resume(folder / "ckpt", model, opt)
    ref, ref_opt = _torch_resumed(folder / "ckpt")
    wrong = [n for (n, a), (_, b) in zip(
        model.state_dict().items(), ref.state_dict().items(), strict=True) if not _same(a, b)]
    mine, theirs = _by_name(model, opt), _by_name(ref, ref_opt)
    checked = sharded = 0
    for name, entry in mine.items():
        for key, v in entry.items():
            checked += 1
            sharded += isinstance(v, DTensor)
            if not _same(v, theirs[name][key]):
                wrong.append(f"{name}.{key}")
    if opt.state_dict()["param_groups"] != ref_opt.state_dict()["param_groups"]:
        wrong.append("param_groups")
    _step(model, opt, 7)
    _step(ref, ref_opt, 7)
    after = [n for (n, a), (_, b) in zip(
        model.named_parameters(), ref.named_parameters(), strict=True) if not _same(a, b)]
    total = sum(2 * p.numel() * p.element_size() + 4 for p in model.parameters())
    return {
        "wrong": wrong, "checked": checked, "moments_sharded": sharded,
        "after_step_wrong": after, "optimizer_bytes": report.optimizer_bytes,
        "moment_bytes_total": total,
    }  # fmt: skip


def scenario_changed(folder: Path) -> dict:
    model = fsdp(Changed(), world_mesh())
    opt = _optimizer(model, 0.5)
    report = fastckpt.resume(folder / "ckpt", model, opt, RENAME, strict=False)
    ref, ref_opt = _torch_resumed(folder / "ckpt")
    mine, theirs = _by_name(model, opt), _by_name(ref, ref_opt)
    wrong, checked = [], 0
    for name in report.restored:  # the same list on every rank: collectives stay in step
        want = theirs["head.weight" if name == "out.weight" else name]
        for key, v in mine[name].items():
            checked += 1
            got, exp = v, want[key]
            if isinstance(got, DTensor):
                got, exp = got.full_tensor(), exp.full_tensor()
            if not _same(got, exp):
                wrong.append(f"{name}.{key}")
    if not _same(model.out.weight.full_tensor(), ref.head.weight.full_tensor()):
        wrong.append("out.weight")
    return {
        "new": report.new, "dropped": report.dropped, "restored": report.restored,
        "wrong": wrong, "checked": checked,
    }  # fmt: skip


def write_checkpoints(folder: Path) -> None:
    """Nothing for rank 0 alone: the save scenario writes collectively, as dcp.save does."""


SCENARIOS = {
    name[len("scenario_") :]: fn for name, fn in globals().items() if name.startswith("scenario_")
}
