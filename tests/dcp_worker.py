"""One rank of the DCP tests (tests/test_dcp.py starts 2 of them).

Run by tests/rank_pool.py's ranks, as tests/sharded_worker.py: the ``save_*``
scenarios write DCP directories with ``dcp.save`` from an FSDP2 and a
tensor-parallel model (and their Adam state); the ``load_*`` scenarios load
them with fastckpt into another topology and compare every full tensor byte
for byte with the model they were saved from.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.tensor.parallel import parallelize_module

import fastckpt
from tests.sharded_worker import VOCAB, Net, fsdp, reference, same_as, tp_plan, world_mesh


def _trained(model: torch.nn.Module) -> torch.optim.Optimizer:
    """One Adam step with a fixed gradient, so that the optimizer has moments to save."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


def _save(model: torch.nn.Module, folder: Path) -> dict:
    opt = _trained(model)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    state["extra"] = {"step": 3, "tag": "run-1"}
    dcp.save(state, checkpoint_id=folder)
    return {}


def scenario_save_fsdp2(folder: Path) -> dict:
    return _save(fsdp(reference(), world_mesh()), folder / "fsdp2")


def scenario_save_tp(folder: Path) -> dict:
    return _save(parallelize_module(reference(), world_mesh(), tp_plan()), folder / "tp")


def _expect() -> dict[str, torch.Tensor]:
    """The saved model's full tensors: the reference after the same Adam step."""
    model = reference()
    _trained(model)
    return {k: v.detach() for k, v in model.state_dict().items()}


def scenario_load_fsdp2_from_tp(folder: Path) -> dict:
    model = fsdp(Net(), world_mesh())
    fastckpt.load_into(model, folder / "tp")
    return same_as(model, _expect())


def scenario_load_tp_from_fsdp2_meta(folder: Path) -> dict:
    with torch.device("meta"):
        model = Net()
    model = parallelize_module(model, world_mesh(), tp_plan())
    model.scale = torch.arange(5, dtype=torch.float32)
    fastckpt.load_into(model, folder / "fsdp2", device="cpu")
    return same_as(model, _expect())


class Wrapped(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.inner = Net(vocab=vocab)


def scenario_load_tp_rules(folder: Path) -> dict:
    """Other names, a smaller vocabulary and bfloat16: rename, rows[:N] and cast."""
    n = VOCAB - 5
    model = Wrapped(n).to(torch.bfloat16)
    parallelize_module(model.inner, world_mesh(), tp_plan())
    rules = f"embed.weight -> inner.embed.weight rows[:{n}]\n"
    rules += f"head.weight -> inner.head.weight rows[:{n}]\n{{rest*}} -> inner.{{rest*}}\n"
    report = fastckpt.load_into(model, folder / "fsdp2", rules)
    expect = {"inner." + k: v.to(torch.bfloat16) for k, v in _expect().items()}
    expect["inner.embed.weight"] = expect["inner.embed.weight"][:n]
    expect["inner.head.weight"] = expect["inner.head.weight"][:n]
    return same_as(model, expect) | {"renamed": len(report.renamed)}


def write_checkpoints(folder: Path) -> None:
    """Nothing for rank 0 alone: the save_* scenarios write collectively, as dcp.save does."""


SCENARIOS = {
    name[len("scenario_") :]: fn for name, fn in globals().items() if name.startswith("scenario_")
}
