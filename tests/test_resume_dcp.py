"""``fastckpt.resume`` from torch.distributed.checkpoint directories (training/dcp_optimizer.py).

The directories are written by ``dcp.save`` of ``get_model_state_dict`` +
``get_optimizer_state_dict`` (FQN-keyed), in this process for a plain model and by 2
gloo ranks for an FSDP2 model (tests/dcp_resume_worker.py). The reference is torch's
own: ``dcp.load`` + ``set_model_state_dict`` / ``set_optimizer_state_dict``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import fastckpt
from tests.rank_pool import run_ranks


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 4, bias=False)


class Changed(nn.Module):
    """Net with ``extra`` added, ``norm`` dropped and ``head`` renamed ``out``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = nn.Linear(6, 6)
        self.out = nn.Linear(6, 4, bias=False)
        self.extra = nn.Linear(6, 2)


RENAME = "head.weight -> out.weight"


def make(cls: type[nn.Module], seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = cls()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return model, torch.optim.AdamW(groups, lr=0.01 * (seed + 1))


def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    """One optimizer step with gradients of distinct values per element (a moment in the
    wrong place shows)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


def quiet(fn, *args, **kwargs):
    # "torch.distributed is ... uninitialized": one process, on purpose.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for pos, entry in sa["state"].items():
        assert entry.keys() == sb["state"][pos].keys()
        for key, v in entry.items():
            assert same_bytes(v, sb["state"][pos][key]), (pos, key)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resume_dcp") / "step-1"
    model, opt = make(Net, 0)
    step(model, opt, 100)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    quiet(dcp.save, state, checkpoint_id=folder)
    return folder


def torch_resumed(folder: Path, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt = make(Net, seed)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    quiet(dcp.load, state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    return model, opt


def test_unchanged_model_equals_torchs_resume_and_trains_identically(saved):
    model, opt = make(Net, 1)
    report = fastckpt.resume(saved, model, opt)
    assert report.layout == "dcp" and not report.problems
    assert sorted(report.restored) == sorted(n for n, _ in model.named_parameters())
    ref, ref_opt = torch_resumed(saved, 2)
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert same_bytes(p, q), n
    same_optimizer(opt, ref_opt)
    step(model, opt, 7)
    step(ref, ref_opt, 7)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert same_bytes(p.detach(), q.detach()), n


def test_changed_model_added_dropped_renamed(saved):
    model, opt = make(Changed, 3)
    fresh = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = fastckpt.resume(saved, model, opt, RENAME, strict=False)
    assert report.new == ["extra.weight", "extra.bias"]
    assert report.dropped == ["norm.weight", "norm.bias"]
    assert sorted(report.restored) == ["body.bias", "body.weight", "embed.weight", "out.weight"]
    assert any("out.weight restored from head.weight" in n for n in report.notes)
    assert report.model_missing == ["extra.weight", "extra.bias"]
    assert sorted(report.model_unexpected) == ["norm.bias", "norm.weight"]
    ref, ref_opt = torch_resumed(saved, 4)
    ref_state = ref_opt.state_dict()["state"]
    ref_pos = {n: i for i, (n, _) in enumerate(named_in_optimizer(ref, ref_opt))}
    state = opt.state_dict()["state"]
    for pos, (name, p) in enumerate(named_in_optimizer(model, opt)):
        if name.startswith("extra."):
            assert pos not in state  # starts fresh
            assert same_bytes(p.detach(), fresh[name])
            continue
        want = ref_state[ref_pos["head.weight" if name == "out.weight" else name]]
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert same_bytes(state[pos][key], want[key]), (name, key)
    assert same_bytes(model.out.weight.detach(), ref.head.weight.detach())
    # Hyperparameters come back group by group (the saved lr is 0.01, the new one 0.04).
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    step(model, opt, 8)  # and it trains
    assert int(opt.state[model.extra.weight]["step"]) == 1


def named_in_optimizer(
    model: nn.Module, opt: torch.optim.Optimizer
) -> list[tuple[str, nn.Parameter]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for g in opt.param_groups for p in g["params"]]


def test_strict_refuses_the_changed_model_and_changes_nothing(saved):
    model, opt = make(Changed, 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(fastckpt.CheckpointError) as e:
        fastckpt.resume(saved, model, opt, RENAME)
    text = str(e.value)
    assert "parameters with no saved optimizer state (would start fresh): extra.weight" in text
    assert "saved optimizer state of parameters the model no longer has: norm.weight" in text
    assert not opt.state
    for n, p in model.named_parameters():
        assert same_bytes(p.detach(), before[n]), n


def test_a_rule_that_cuts_rows_leaves_the_moments_behind(saved):
    model, opt = make(Net, 5)
    report = fastckpt.resume(saved, model, opt, "embed.weight -> embed.weight rows[:11]")
    assert any("cuts or converts its weight" in n for n in report.notes)
    assert "embed.weight" in report.restored  # same shape: the state still fits


def test_a_dcp_directory_without_optimizer_state(tmp_path):
    model, opt = make(Net, 0)
    quiet(dcp.save, {"model": get_model_state_dict(model)}, checkpoint_id=tmp_path / "m")
    with pytest.raises(fastckpt.CheckpointError, match="no optimizer state"):
        fastckpt.resume(tmp_path / "m", model, opt)
    report = fastckpt.resume(tmp_path / "m", model)  # the model alone
    assert report.model_loaded == 6


def test_rules_rename_a_save_folders_state_the_same_way(tmp_path):
    model, opt = make(Net, 0)
    step(model, opt, 100)
    fastckpt.save(tmp_path / "run", model, opt)
    changed, changed_opt = make(Changed, 3)
    report = fastckpt.resume(tmp_path / "run", changed, changed_opt, RENAME, strict=False)
    assert report.layout == "fastckpt" and "out.weight" in report.restored
    assert report.new == ["extra.weight", "extra.bias"]
    assert report.dropped == ["norm.weight", "norm.bias"]
    for key in ("exp_avg", "exp_avg_sq", "step"):
        got, want = changed_opt.state[changed.out.weight][key], opt.state[model.head.weight][key]
        assert same_bytes(got, want), key


def test_rules_are_refused_for_a_position_keyed_state(tmp_path):
    model, opt = make(Net, 0)
    step(model, opt, 100)
    (tmp_path / "trainer").mkdir()
    torch.save(model.state_dict(), tmp_path / "trainer" / "pytorch_model.bin")
    torch.save(opt.state_dict(), tmp_path / "trainer" / "optimizer.pt")
    with pytest.raises(ValueError, match="keyed by position"):
        fastckpt.resume(tmp_path / "trainer", model, opt, RENAME)


# -- FSDP2 on 2 gloo ranks -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp2_results(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("resume_dcp_fsdp2")
    scenarios = ["save", "unchanged", "changed"]
    per_rank = run_ranks(2, folder, scenarios, worker="tests.dcp_resume_worker")
    for rank, r in enumerate(per_rank):
        for name, got in r.items():
            assert got["ok"], f"rank {rank} {name}: {got.get('error')}\n{got.get('trace')}"
    return per_rank


def test_fsdp2_unchanged_equals_torchs_resume(fsdp2_results):
    for r in fsdp2_results:
        got = r["unchanged"]
        assert got["wrong"] == [] and got["checked"] > 0
        assert got["moments_sharded"] > 0
        assert got["after_step_wrong"] == []
        # Each rank read its half of the moments (and the 0-d steps), not all of them.
        assert got["optimizer_bytes"] < 0.6 * got["moment_bytes_total"]


def test_fsdp2_changed_reports_and_restores_by_name(fsdp2_results):
    for r in fsdp2_results:
        got = r["changed"]
        assert got["new"] == ["extra.weight", "extra.bias"]
        assert got["dropped"] == ["norm.weight", "norm.bias"]
        assert "head.weight" not in got["restored"] and "out.weight" in got["restored"]
        assert got["wrong"] == [] and got["checked"] > 0
