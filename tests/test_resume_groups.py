"""resume of position-keyed optimizer states (torch.optim / Trainer's optimizer.pt) whatever
the param groups: custom no-decay lists, reordered groups, more groups; onto the same
model, one with a parameter added, one whose head became tied. Ambiguity is refused,
naming the parameters; a parameter never gets another's moments."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import fastckpt
from fastckpt.training import remap_optimizer_state
from tests.conftest import assert_same_bytes

V, H = 20, 8


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(H, H)
        self.norm = nn.LayerNorm(H)
        self.ff = nn.Linear(H, 2 * H)
        self.ff2 = nn.Linear(2 * H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x + self.attn(x))
        return x + self.ff2(torch.relu(self.ff(x)))


class Tiny(nn.Module):
    def __init__(self, seed: int, added: bool = False, tied: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(V, H)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.final_norm = nn.LayerNorm(H)
        self.head = nn.Linear(H, V)
        if added:  # one parameter more, in the middle of named_parameters()
            self.blocks[1].gate = nn.Parameter(torch.ones(H))
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i == 1 and hasattr(b, "gate"):
                x = x * b.gate
        return self.head(self.final_norm(x))


def _split(model: nn.Module, no_decay: tuple[str, ...]) -> tuple[list, list]:
    named = list(model.named_parameters())
    decay = [p for n, p in named if not any(nd in n for nd in no_decay)]
    rest = [p for n, p in named if any(nd in n for nd in no_decay)]
    return decay, rest


def custom(model: nn.Module) -> torch.optim.Optimizer:
    """`no_decay = ["bias", "norm"]`, as many training scripts write it."""
    decay, rest = _split(model, ("bias", "norm"))
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=1e-2
    )


def reordered(model: nn.Module) -> torch.optim.Optimizer:
    decay, rest = _split(model, ("bias", "norm"))
    return torch.optim.AdamW(
        [{"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.01}], lr=1e-2
    )


def three(model: nn.Module) -> torch.optim.Optimizer:
    """Embedding and head at their own learning rate, then the body's no-decay and decay."""
    outer = ("embed.", "head.")
    named = [(n, p) for n, p in model.named_parameters()]
    io = [p for n, p in named if n.startswith(outer)]
    body = [(n, p) for n, p in named if not n.startswith(outer)]
    rest = [p for n, p in body if any(nd in n for nd in ("bias", "norm"))]
    decay = [p for n, p in body if not any(nd in n for nd in ("bias", "norm"))]
    return torch.optim.AdamW(
        [
            {"params": io, "lr": 3e-2, "weight_decay": 0.0},
            {"params": rest, "weight_decay": 0.0},
            {"params": decay, "weight_decay": 0.05},
        ],
        lr=1e-2,
    )


GROUPINGS = {"no-decay-list": custom, "reordered": reordered, "three-groups": three}


def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (3, 5), generator=g)
    model(ids).logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()


def named_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def trainer_folder(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> Path:
    """What a Trainer-style run leaves: model.safetensors + a position-keyed optimizer.pt."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    return folder


@pytest.fixture(scope="module", params=sorted(GROUPINGS))
def trained(request, tmp_path_factory):
    make = GROUPINGS[request.param]
    model = Tiny(seed=0)
    opt = make(model)
    for s in range(3):
        step(model, opt, s)
    folder = trainer_folder(tmp_path_factory.mktemp(request.param), model, opt)
    return {
        "make": make,
        "model": model,
        "opt": opt,
        "folder": folder,
        "state": named_state(model, opt),
    }


def weight_decay_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("target", ["same", "added", "tied"])
def test_moments_restored_bit_for_bit_by_name(trained, target):
    model = Tiny(seed=9, added=target == "added", tied=target == "tied")
    opt = trained["make"](model)
    if target != "same":
        with pytest.raises(fastckpt.CheckpointError, match="resume is not exact"):
            fastckpt.resume(trained["folder"], model, opt)
        assert opt.state == {}
    report = fastckpt.resume(trained["folder"], model, opt, strict=target == "same")
    saved = trained["state"]
    expected = set(saved) - ({"head.weight"} if target == "tied" else set())
    got = named_state(model, opt)
    assert set(got) == expected and set(report.restored) == expected
    for name, entry in got.items():
        assert set(entry) == set(saved[name])
        for key, value in entry.items():
            assert_same_bytes(value, saved[name][key])
    assert report.new == (["blocks.1.gate"] if target == "added" else [])
    assert report.dropped_tied == ([("head.weight", "embed.weight")] if target == "tied" else [])
    # each group's hyper-parameters are its saved group's, whatever the group order
    want = weight_decay_by_name(trained["model"], trained["opt"])
    have = weight_decay_by_name(model, opt)
    assert all(have[n] == want[n] for n in expected)
    step(model, opt, 7)  # continues


def test_same_model_continues_exactly_as_torch_load_state_dict(trained):
    model = Tiny(seed=4)
    opt = trained["make"](model)
    fastckpt.resume(trained["folder"], model, opt)
    ref = Tiny(seed=5)
    ref_opt = trained["make"](ref)
    ref.load_state_dict(trained["model"].state_dict())
    ref_opt.load_state_dict(trained["opt"].state_dict())
    step(model, opt, 11)
    step(ref, ref_opt, 11)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        assert_same_bytes(a, b)


def test_bert_original_no_decay_list_on_a_transformers_model(tmp_path):
    """The original BERT code's `["bias", "LayerNorm.weight"]` on a RoBERTa, head tied later."""
    from tests.test_resume import build_roberta, train_step

    def bert_groups(model):
        decay, rest = _split(model, ("bias", "LayerNorm.weight"))
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
        )

    model = build_roberta(tie=False)
    opt = bert_groups(model)
    for s in range(2):
        train_step(model, opt, s)
    saved = named_state(model, opt)
    folder = trainer_folder(tmp_path / "ckpt", model, opt)
    for tie in (False, True):
        model2 = build_roberta(tie=tie, seed=3)
        opt2 = bert_groups(model2)
        report = fastckpt.resume(folder, model2, opt2, strict=not tie)
        got = named_state(model2, opt2)
        assert set(got) == set(saved) - ({"lm_head.decoder.weight"} if tie else set())
        for name, entry in got.items():
            for key, value in entry.items():
                assert_same_bytes(value, saved[name][key])
        assert report.new == []


class Ambiguous(nn.Module):
    """Linear(4, 4) then LayerNorm(4) with `no_decay = ["bias"]`: 0.bias, 1.weight and
    1.bias all have shape [4], and either group has a [4] place for each of them."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))

    def forward(self, x):
        return self.net(x)


def bias_only_groups(model, decay_wd=0.01):
    decay, rest = _split(model, ("bias",))
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": decay_wd}, {"params": rest, "weight_decay": 0.0}]
    )


def test_ambiguous_groups_refused_naming_the_parameters_or_placed_by_hyperparameters(tmp_path):
    model = Ambiguous(0)
    opt = bias_only_groups(model)
    model(torch.randn(2, 4)).pow(2).sum().backward()
    opt.step()
    saved = named_state(model, opt)
    folder = trainer_folder(tmp_path / "ckpt", model, opt)
    raw = torch.load(folder / "optimizer.pt", weights_only=True)
    with pytest.raises(fastckpt.CheckpointError) as err:
        remap_optimizer_state(raw, folder, Ambiguous(1))
    assert str(err.value) == (
        f"{folder}: ambiguous optimizer state: with 2 groups, each in model order (no extra "
        "ties), more than one assignment of parameters to the saved groups of [2, 2] fits "
        "the group sizes, the model's order and the state shapes; the ambiguous parameters: "
        "net.0.bias (group 0 or 1), net.1.weight (group 0 or 1), net.1.bias (group 0 or 1); "
        "refusing to guess"
    )
    # The current optimizer's groups, same hyper-parameters as saved: each parameter's
    # group is the one with its weight decay; one assignment left.
    model2 = Ambiguous(2)
    opt2 = bias_only_groups(model2)
    report = fastckpt.resume(folder, model2, opt2)
    assert any("net.0.bias" in n and "hyper-parameters" in n for n in report.notes)
    got = named_state(model2, opt2)
    assert set(got) == set(saved)
    for name, entry in got.items():
        for key, value in entry.items():
            assert_same_bytes(value, saved[name][key])
    # Groups whose hyper-parameters do not tell them apart: still refused, nothing changed.
    model3 = Ambiguous(3)
    opt3 = bias_only_groups(model3, decay_wd=0.0)
    with pytest.raises(fastckpt.CheckpointError, match=r"ambiguous parameters: net\.0\.bias"):
        fastckpt.resume(folder, model3, opt3)
    assert opt3.state == {}


SHAPES = [(2,), (3,), (2, 2)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    n=st.integers(1, 7),
    k=st.integers(1, 3),
)
def test_never_another_parameters_moments(data, n, k):
    """Random parameter shapes from a small pool, random groups (each in model order,
    groups in any order), some places without state: remap either refuses or names
    every state exactly as it was saved."""
    shapes = data.draw(st.lists(st.sampled_from(SHAPES), min_size=n, max_size=n))
    group_of = data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    stateless = data.draw(st.sets(st.integers(0, n - 1)))
    model = nn.Module()
    for i, s in enumerate(shapes):
        model.register_parameter(f"p{i}", nn.Parameter(torch.zeros(s)))
    members = [[i for i in range(n) if group_of[i] == g] for g in range(k)]
    members = [m for m in members if m]
    order = data.draw(st.permutations(range(len(members))))
    members = [members[j] for j in order]
    positions = [i for m in members for i in m]  # saved position -> parameter index
    state, groups, pos = {}, [], 0
    for m in members:
        groups.append({"lr": 0.1, "params": list(range(pos, pos + len(m)))})
        pos += len(m)
    for p, i in enumerate(positions):
        if i not in stateless:
            state[p] = {"exp_avg": torch.full(shapes[i], float(i)), "step": torch.tensor(1.0)}
    with tempfile.TemporaryDirectory() as d:
        save_file({f"p{i}": torch.zeros(s) for i, s in enumerate(shapes)}, f"{d}/model.safetensors")
        try:
            named, _ = remap_optimizer_state(
                {"state": state, "param_groups": groups}, d, model
            )
        except fastckpt.CheckpointError as e:
            assert "ambiguous" in str(e)  # the true assignment always fits: never "cannot"
            return
    for name, entry in named["state"].items():
        assert entry["exp_avg"].shape == shapes[int(name[1:])]
        assert bool((entry["exp_avg"] == int(name[1:])).all())
    assert [g["params"] for g in named["param_groups"]] == [[f"p{i}" for i in m] for m in members]


def test_nothing_to_align_and_counts_that_cannot_fit(tmp_path):
    save_file({"b": torch.zeros(2)}, tmp_path / "model.safetensors")
    model = nn.Module()
    model.register_buffer("b", torch.zeros(2))
    named, _ = remap_optimizer_state(
        {"state": {}, "param_groups": [{"lr": 0.1, "params": []}]}, tmp_path, model
    )
    assert named == {"state": {}, "param_groups": [{"lr": 0.1, "params": []}]}
    with pytest.raises(fastckpt.CheckpointError, match="0 parameters for 1 saved positions"):
        remap_optimizer_state(
            {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, tmp_path, model
        )
