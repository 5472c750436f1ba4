"""save / resume by parameter name; story 4 (docs/STORIES.md): the parameter list changed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import fastckpt
from fastckpt.training import remap_optimizer_state, saving
from tests.conftest import assert_same_bytes

transformers = pytest.importorskip("transformers")
from transformers import RobertaConfig, RobertaForMaskedLM  # noqa: E402
from transformers.trainer_pt_utils import get_parameter_names  # noqa: E402

VOCAB = 50


def build_roberta(tie: bool, seed: int = 0) -> RobertaForMaskedLM:
    """Untied: every name its own parameter. tie=True ties lm_head.decoder.weight to the word
    embeddings after construction, as the story's resumed run did (one named parameter fewer)."""
    torch.manual_seed(seed)
    cfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        tie_word_embeddings=False,
        hidden_dropout_prob=0.0,  # deterministic steps: resumed and original runs can be compared
        attention_probs_dropout_prob=0.0,
    )
    model = RobertaForMaskedLM(cfg)
    if tie:
        model.lm_head.decoder.weight = model.roberta.embeddings.word_embeddings.weight
    return model


def trainer_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """Two groups exactly as transformers.Trainer.create_optimizer builds them."""
    no_decay = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = get_parameter_names(model, [nn.LayerNorm], no_decay)
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if n in decay and p.requires_grad],
            "weight_decay": 0.01,
        },
        {
            "params": [
                p for n, p in model.named_parameters() if n not in decay and p.requires_grad
            ],
            "weight_decay": 0.0,
        },
    ]
    return torch.optim.AdamW(groups, lr=1e-3)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 8), generator=g)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def named_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An untied RoBERTa (44 named parameters) trained 3 steps, saved both ways."""
    root = tmp_path_factory.mktemp("story4")
    model = build_roberta(tie=False)
    opt = trainer_optimizer(model)
    for s in range(3):
        train_step(model, opt, s)
    fc = fastckpt.save(root / "fc", model, opt, extra={"global_step": 3, "note": "x"})
    hf = root / "hf"
    model.save_pretrained(hf)  # model.safetensors, as the Trainer writes it
    torch.save(opt.state_dict(), hf / "optimizer.pt")
    return {"fc": fc, "hf": hf, "model": model, "opt": opt, "state": named_state(model, opt)}


def test_save_layout_is_json_and_safetensors(trained):
    folder = trained["fc"]
    assert sorted(os.listdir(folder)) == [
        "extra.json",
        "fastckpt.json",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
    ]
    tensors = load_file(folder / "optimizer.safetensors")
    exp = trained["state"]["roberta.embeddings.word_embeddings.weight"]["exp_avg"]
    assert_same_bytes(tensors["state.roberta.embeddings.word_embeddings.weight.exp_avg"], exp)
    model_sd = load_file(folder / "model.safetensors")
    for name, t in trained["model"].state_dict().items():
        assert_same_bytes(model_sd[name], t)


def test_resume_round_trip_continues_identically(trained):
    model = build_roberta(tie=False, seed=1)
    opt = trainer_optimizer(model)
    report = fastckpt.resume(trained["fc"], model, opt)
    assert report.problems == []
    assert report.extra == {"global_step": 3, "note": "x"}
    assert len(report.restored) == len(trained["state"])
    # One more identical step on the original and the resumed copy gives identical weights.
    ref_model = build_roberta(tie=False, seed=2)
    ref_opt = trainer_optimizer(ref_model)
    ref_model.load_state_dict(trained["model"].state_dict())
    ref_opt.load_state_dict(trained["opt"].state_dict())
    train_step(model, opt, 99)
    train_step(ref_model, ref_opt, 99)
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values(), strict=True):
        assert_same_bytes(a, b)


@pytest.mark.parametrize("source", ["fc", "hf"], ids=["fastckpt-save", "trainer-optimizer.pt"])
@pytest.mark.parametrize("tie", [True, False], ids=["now-tied-203", "untied-204"])
def test_story4_every_parameter_gets_its_own_moments(trained, source, tie):
    model = build_roberta(tie=tie, seed=5)
    opt = trainer_optimizer(model)
    if tie:
        with pytest.raises(fastckpt.CheckpointError) as err:
            fastckpt.resume(trained[source], model, opt)
        assert str(err.value) == (
            f"{trained[source]}: resume is not exact (strict=True):\n"
            "  saved optimizer state dropped because the parameter is now tied: "
            "lm_head.decoder.weight (now tied to roberta.embeddings.word_embeddings.weight)\n"
            "pass strict=False to resume anyway; these are then listed in the report"
        )
        assert opt.state == {}  # strict refusal changed nothing
    report = fastckpt.resume(trained[source], model, opt, strict=not tie)
    expected_dropped = [("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight")]
    assert report.dropped_tied == (expected_dropped if tie else [])
    assert report.new == [] and report.dropped == []
    saved = trained["state"]
    got = named_state(model, opt)
    assert sorted(got) == sorted(n for n in saved if not (tie and n == "lm_head.decoder.weight"))
    for name, entry in got.items():
        for key, value in entry.items():
            assert_same_bytes(value, saved[name][key])
    for name, t in model.state_dict().items():
        src = (
            "roberta.embeddings.word_embeddings.weight"
            if tie and "decoder.weight" in name
            else name
        )
        assert_same_bytes(t, trained["model"].state_dict()[src])
    train_step(model, opt, 7)  # continues without error


def test_saved_tied_resumed_untied_reports_new_parameter(tmp_path):
    model = build_roberta(tie=True)
    opt = trainer_optimizer(model)
    train_step(model, opt, 0)
    fastckpt.save(tmp_path / "tied", model, opt)
    untied = build_roberta(tie=False, seed=3)
    opt2 = trainer_optimizer(untied)
    with pytest.raises(
        fastckpt.CheckpointError,
        match="parameters with no saved optimizer state "
        r"\(would start fresh\): lm_head.decoder.weight",
    ):
        fastckpt.resume(tmp_path / "tied", untied, opt2)
    report = fastckpt.resume(tmp_path / "tied", untied, opt2, strict=False)
    assert report.new == ["lm_head.decoder.weight"]
    # The alias recorded at save fills the now separate head with the embedding.
    assert_same_bytes(
        untied.lm_head.decoder.weight.detach(),
        model.roberta.embeddings.word_embeddings.weight.detach(),
    )
    train_step(untied, opt2, 1)


def test_trainer_folder_of_tied_hf_model(tmp_path):
    """transformers' own tying (decoder weight and bias both aliases: 42 of 44 names)."""
    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
    )
    model = RobertaForMaskedLM(cfg)
    opt = trainer_optimizer(model)
    train_step(model, opt, 0)
    model.save_pretrained(tmp_path)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    model2 = RobertaForMaskedLM(cfg)
    opt2 = trainer_optimizer(model2)
    report = fastckpt.resume(tmp_path, model2, opt2)
    assert report.problems == []
    saved = named_state(model, opt)
    got = named_state(model2, opt2)
    assert sorted(got) == sorted(saved)
    for name in got:
        assert_same_bytes(got[name]["exp_avg"], saved[name]["exp_avg"])
    train_step(model2, opt2, 1)


class ThreeNames(nn.Module):
    """x, y, z: y and z are both aliases of x now; which one was tied when saved is unknowable."""

    def __init__(self):
        super().__init__()
        self.x = nn.Parameter(torch.randn(4))
        self.y = self.x
        self.z = self.x


def test_ambiguous_alignment_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {"x": torch.randn(4), "y": torch.randn(4), "z": torch.randn(4)},
        tmp_path / "model.safetensors",
    )
    state = {
        "state": {
            0: {"step": torch.tensor(1.0), "exp_avg": torch.ones(4), "exp_avg_sq": torch.ones(4)},
            1: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.ones(4)},
        },
        "param_groups": [{"lr": 0.1, "params": [0, 1]}],
    }
    model = ThreeNames()
    with pytest.raises(fastckpt.CheckpointError) as err:
        remap_optimizer_state(state, tmp_path, model)
    assert str(err.value) == (
        f"{tmp_path}: ambiguous optimizer state: one group (y tied when saved) and one group "
        "(z tied when saved) both fit the group sizes and state shapes but name positions "
        "differently (position 1: z or y); refusing to guess"
    )


def test_misaligned_shapes_are_refused(tmp_path):
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors"
    )
    # Positions 0 and 1 swapped relative to the model's order.
    state = {
        "state": {0: {"exp_avg": torch.zeros(4)}, 1: {"exp_avg": torch.zeros(4, 3)}},
        "param_groups": [{"lr": 0.1, "params": [0, 1, 2, 3]}],
    }
    with pytest.raises(fastckpt.CheckpointError) as err:
        remap_optimizer_state(state, tmp_path, model)
    assert "0.weight: exp_avg has shape [4], parameter has [4, 3]" in str(err.value)
    # Three groups: only 0.bias fits the [4] state and 0.weight the [4, 3] one; the
    # stateless third group takes the rest, in model order. One assignment: used.
    state["param_groups"] = [{"params": [0]}, {"params": [1]}, {"params": [2, 3]}]
    named, _ = remap_optimizer_state(state, tmp_path, model)
    assert [g["params"] for g in named["param_groups"]] == [
        ["0.bias"], ["0.weight"], ["1.weight", "1.bias"]
    ]
    assert named["state"]["0.weight"]["exp_avg"].shape == (4, 3)


def _small_save(tmp_path: Path, scale: float) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(scale)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt


def test_save_is_atomic_when_the_writer_fails(tmp_path, monkeypatch):
    good_model, good_opt = _small_save(tmp_path, 1.0)
    fastckpt.save(tmp_path / "ckpt", good_model, good_opt)
    bad_model, bad_opt = _small_save(tmp_path, 2.0)
    real = saving.write_safetensors

    def failing_writer(path, specs, produce, metadata=None):
        def produce_then_fail(spec):
            if spec.name.endswith("exp_avg_sq"):
                raise RuntimeError("disk full")
            return produce(spec)

        return real(path, specs, produce_then_fail, metadata)

    monkeypatch.setattr(saving, "write_safetensors", failing_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        fastckpt.save(tmp_path / "ckpt", bad_model, bad_opt)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folder left behind
    model, opt = _small_save(tmp_path, 0.0)
    fastckpt.resume(tmp_path / "ckpt", model, opt)
    for a, b in zip(model.parameters(), good_model.parameters(), strict=True):
        assert_same_bytes(a.detach(), b.detach())
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_save_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    model, opt = _small_save(tmp_path, 1.0)
    with pytest.raises(FileExistsError, match="exists and is not a fastckpt save"):
        fastckpt.save(tmp_path / "mine", model, opt)


def test_vanished_parameter_and_shape_checks(tmp_path):
    model, opt = _small_save(tmp_path, 1.0)
    fastckpt.save(tmp_path / "ckpt", model, opt)
    smaller = nn.Sequential(nn.Linear(3, 4))
    opt2 = torch.optim.AdamW(smaller.parameters())
    report = fastckpt.resume(tmp_path / "ckpt", smaller, opt2, strict=False)
    assert report.dropped == ["2.weight", "2.bias"]
    assert report.model_unexpected == ["2.weight", "2.bias"]
    assert report.restored == ["0.weight", "0.bias"]
    wider = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(4, 2))
    opt3 = torch.optim.AdamW(wider.parameters())
    with pytest.raises(fastckpt.CheckpointError) as err:
        fastckpt.resume(tmp_path / "ckpt", wider, opt3)
    assert (
        "model tensors whose shape differs from the checkpoint: 0.weight (file [4, 3], "
        "model [5, 3]), 0.bias (file [4], model [5])" in str(err.value)
    )
    assert "0.weight (exp_avg has shape [4, 3], parameter has [5, 3])" in str(err.value)


def test_trainer_bin_holding_both_tied_names_resumes_through_load_into(tmp_path):
    """A torch.save'd state dict of a tied model holds the tensor under both names:
    neither is unexpected, the model gets the values once, and the report is clean."""
    model = build_roberta(tie=True, seed=7)
    opt = trainer_optimizer(model)
    train_step(model, opt, 0)
    state = model.state_dict()
    assert "lm_head.decoder.weight" in state  # both names in the file
    torch.save(state, tmp_path / "pytorch_model.bin")
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    model2 = build_roberta(tie=True, seed=8)
    opt2 = trainer_optimizer(model2)
    report = fastckpt.resume(tmp_path, model2, opt2)
    assert report.problems == []
    assert report.model_unexpected == [] and report.model_missing == []
    assert report.model_loaded == len(state) - 1  # the tied alias is written through its owner
    for name, t in model2.state_dict().items():
        assert_same_bytes(t, state[name])
    assert model2.lm_head.decoder.weight is model2.roberta.embeddings.word_embeddings.weight
    train_step(model2, opt2, 1)


def test_resume_from_a_url_is_refused_by_name():
    """Not a mangled path ("s3:/bucket/...") reported missing: what resume reads, named."""
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(fastckpt.CheckpointError, match=r"step-10/: resume reads local"):
        fastckpt.resume("s3://bucket/run/step-10/", model, opt)
