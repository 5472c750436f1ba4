"""fastckpt.plan and the loads built on it: the plan, its refusals, and the meta-device recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastckpt
from tests.conftest import (
    assert_same_bytes,
    empty_weights,
    hf_folder,
    hf_logits,
    tiny_hf_config,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 6)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied


def _state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
        if k != "head.weight"
    }


def test_plan_describes_the_load_and_writes_nothing(tmp_path):
    path = tmp_path / "n.safetensors"
    state = _state(Net())
    save_file(state, str(path))
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = fastckpt.plan(model, path)
    assert p.loaded == ["embed.weight", "proj.weight", "proj.bias"] or set(p.loaded) == {
        "embed.weight",
        "proj.weight",
        "proj.bias",
    }
    assert p.tied == [("head.weight", "embed.weight")]
    assert not p.problems and p.missing == [] and p.unexpected == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # planning wrote nothing
    entries = {e.target: e for e in p.entries()}
    assert entries["proj.weight"].nbytes == 6 * 4 * 4
    assert entries["embed.weight"].tied == ("head.weight",)
    assert sum(p.bytes_per_file().values()) == sum(v.numel() * 4 for v in state.values())
    text = p.explain()
    assert "head.weight = embed.weight" in text and str(path) in text
    assert "embed.weight" in p.explain(full=True).split("tied")[0]
    doc = json.loads(json.dumps(p.to_dict()))
    assert {e["target"] for e in doc["entries"]} == set(state)
    report = fastckpt.load_into(model, p)  # executes the plan as it is
    assert sorted(report.loaded) == sorted(state)
    for k, v in state.items():
        assert_same_bytes(model.state_dict()[k], v)


def test_plan_explains_rules_rows_casts_and_problems(tmp_path):
    path = tmp_path / "n.safetensors"
    state = {f"module.{k}": v for k, v in _state(Net()).items()}
    state["module.embed.weight"] = torch.randn(12, 4)  # two extra vocabulary rows
    state["extra"] = torch.ones(3)
    save_file(state, str(path))
    model = Net().to(torch.bfloat16)
    p = fastckpt.plan(
        model, path, "module.embed.weight -> embed.weight rows[:10]\nmodule.{rest*} -> {rest*}"
    )
    assert p.unexpected == ["extra"]
    text = p.explain(full=True)
    for piece in ("module.embed.weight", "[0:10]", "float32->bfloat16", "extra"):
        assert piece in text
    e = {x.target: x for x in p.entries()}["embed.weight"]
    assert e.rows is not None and e.shape == (10, 4) and e.nbytes == 10 * 4 * 4


def test_plan_rejects_a_model_that_is_not_a_module(tmp_path):
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        fastckpt.plan({"a": torch.ones(1)}, tmp_path / "x")  # type: ignore[arg-type]


def test_load_into_refuses_a_plan_made_for_another_model(tmp_path):
    path = tmp_path / "n.safetensors"
    save_file(_state(Net()), str(path))
    p = fastckpt.plan(Net(), path)
    with pytest.raises(ValueError, match="another model"):
        fastckpt.load_into(Net(), p)


# -- as torch users expect -------------------------------------------------------------------


def test_strict_error_is_a_runtime_error_with_usable_suggested_rules(tmp_path):
    path = tmp_path / "ddp.safetensors"
    state = _state(Net())
    save_file({f"module.{k}": v for k, v in state.items()}, str(path))
    model = Net()
    try:
        fastckpt.load_into(model, path)
    except RuntimeError as e:  # what code written for load_state_dict catches
        assert isinstance(e, fastckpt.StrictLoadError) and isinstance(e, fastckpt.CheckpointError)
        assert isinstance(e.suggested_rules, fastckpt.Rules)
        report = fastckpt.load_into(model, path, rules=e.suggested_rules)
    else:
        pytest.fail("a DDP-prefixed checkpoint loaded without rules")
    missing, unexpected = report  # unpacks like _IncompatibleKeys
    assert missing == [] and unexpected == []
    for k, v in state.items():
        assert_same_bytes(model.state_dict()[k], v)


def test_strict_error_without_a_suggestion_has_none(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"unrelated": torch.ones(7, 7, 7)}, str(path))
    with pytest.raises(fastckpt.StrictLoadError) as info:
        fastckpt.load_into(Net(), path)
    assert info.value.suggested_rules is None


def test_dtype_applies_to_a_model_that_is_not_on_meta(tmp_path):
    path = tmp_path / "n.safetensors"
    state = _state(Net())
    save_file(state, str(path))
    model = Net()
    report = fastckpt.load_into(model, path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.head.weight is model.embed.weight  # the tie survives the new tensors
    assert isinstance(model.embed.weight, nn.Parameter)
    for k, v in state.items():
        assert_same_bytes(model.state_dict()[k], v.to(torch.bfloat16))
    assert {c[0] for c in report.cast} == set(state)


def test_dtype_must_be_a_floating_dtype(tmp_path):
    path = tmp_path / "n.safetensors"
    save_file(_state(Net()), str(path))
    with pytest.raises(ValueError, match="int8 is not one"):
        fastckpt.load_into(Net(), path, dtype=torch.int8)


# -- destinations fastckpt must not write through ------------------------------------------


class Wrapper(torch.Tensor):
    """A wrapper subclass: its data_ptr is not where its values live."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

    def __init__(self, inner: torch.Tensor) -> None:
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        def unwrap(t):
            return t.inner if isinstance(t, Wrapper) else t

        def wrap(t):
            return Wrapper(t) if isinstance(t, torch.Tensor) else t

        return tree_map(wrap, func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {})))


def test_a_dispatch_subclass_parameter_is_refused_by_name_before_writing(tmp_path):
    path = tmp_path / "n.safetensors"
    save_file({"a.weight": torch.ones(3, 2), "b.weight": torch.ones(2, 2)}, str(path))
    model = nn.Module()
    model.a = nn.Linear(2, 3, bias=False)
    model.b = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(model.a.weight)
    model.b.weight = nn.Parameter(Wrapper(torch.zeros(2, 2)), requires_grad=False)
    with pytest.raises(fastckpt.CheckpointError) as info:
        fastckpt.load_into(model, path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: the model's 'b.weight' is a ")
    assert "Wrapper (a tensor subclass" in msg
    assert torch.equal(model.a.weight.detach(), torch.zeros(3, 2))  # nothing written


def test_a_subclass_that_conversion_pieces_would_fill_is_refused_while_planning(tmp_path):
    path = tmp_path / "e.safetensors"
    save_file({"e.0": torch.ones(2, 2), "e.1": torch.ones(2, 2)}, str(path))
    model = nn.Module()
    model.experts = nn.Parameter(Wrapper(torch.zeros(2, 2, 2)), requires_grad=False)
    with pytest.raises(fastckpt.CheckpointError, match="the model's 'experts' is a .*Wrapper"):
        fastckpt.plan(model, path, "e.{e} -> experts stack[e]")


def test_a_conjugate_view_destination_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    save_file({"c": torch.ones(3, dtype=torch.complex64)}, str(path))
    model = nn.Module()
    model.register_buffer("c", torch.zeros(3, dtype=torch.complex64).conj())
    with pytest.raises(fastckpt.CheckpointError, match="'c' is a conjugate or negated view"):
        fastckpt.load_into(model, path)


def test_a_lazy_parameter_is_refused_by_name(tmp_path):
    path = tmp_path / "l.safetensors"
    save_file({"weight": torch.ones(3, 2), "bias": torch.ones(3)}, str(path))
    with pytest.raises(fastckpt.CheckpointError, match="uninitialised lazy parameter"):
        fastckpt.load_into(nn.LazyLinear(3), path)


@pytest.fixture(scope="module")
def fsdp_one_rank(tmp_path_factory) -> dict:
    """The four FSDP2 cases, in one request to the shared 1-rank pool (tests/fsdp_worker.py)."""
    from tests.fsdp_worker import SCENARIOS
    from tests.rank_pool import run_ranks

    names = [n for n in SCENARIOS if n.startswith("refused_or_loaded_")]
    return run_ranks(1, tmp_path_factory.mktemp("fsdp1"), names, "tests.fsdp_worker")[0]


@pytest.mark.parametrize("file_dtype", ["float32", "float16"])
@pytest.mark.parametrize("init", ["cpu", "meta"])
def test_fsdp2_model_is_refused_by_name_or_loaded_exactly_never_crashes(
    fsdp_one_rank, file_dtype, init
):
    r = fsdp_one_rank[f"refused_or_loaded_{file_dtype}_{init}"]
    assert r["ok"], f"{r.get('error')}\n{r.get('trace', '')}"
    if "refused" in r:
        assert "the model's '0.weight' is a torch.distributed.tensor.DTensor" in r["refused"], r
        assert r["untouched"], r
    else:
        assert r["loaded"] is True, r


# -- the large-model recipe: meta device, then device= ---------------------------------------


HF_CASES = [
    (
        "BertForPreTraining",
        "BertConfig",
        {},
        ["bert.embeddings.position_ids", "bert.embeddings.token_type_ids"],
    ),
    (
        "LlamaForCausalLM",
        "LlamaConfig",
        {"num_key_value_heads": 2},
        ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"],
    ),
]


@pytest.mark.parametrize(
    ("cls_name", "config_name", "config", "buffers"), HF_CASES, ids=[c[0] for c in HF_CASES]
)
def test_meta_transformers_model_loads_to_from_pretrained_outputs(
    tmp_path, cls_name, config_name, config, buffers
):
    """Everything on meta, buffers included: the non-persistent buffers are allocated on
    device= and filled by the model's own _init_weights, as from_pretrained does."""
    import transformers

    folder = hf_folder(tmp_path, cls_name, config_name, **config)
    ref = getattr(transformers, cls_name).from_pretrained(folder).eval()
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(tiny_hf_config(config_name, **config))
    plan = fastckpt.plan(model, folder, device="cpu")
    assert sorted(plan.initialised) == sorted(buffers)
    assert "as from_pretrained does" in plan.explain()
    report = fastckpt.load_into(model, folder, device="cpu")
    assert sorted(report.initialised) == sorted(buffers)
    model.eval()
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    for name in buffers:
        assert_same_bytes(model.get_buffer(name), ref.get_buffer(name))
    assert_same_bytes(hf_logits(model), hf_logits(ref))


def test_a_plain_module_with_a_buffer_on_meta_is_refused_naming_it(tmp_path):
    class Rope(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.register_buffer("inv_freq", torch.arange(2.0), persistent=False)

    path = tmp_path / "r.safetensors"
    save_file({k: v.contiguous() for k, v in Rope().state_dict().items()}, str(path))
    with torch.device("meta"):
        model = Rope()
    with pytest.raises(fastckpt.CheckpointError) as info:
        fastckpt.load_into(model, path, device="cpu")
    msg = str(info.value)
    assert "would leave" in msg and "inv_freq" in msg and "nothing was loaded" in msg
    assert "init_empty_weights" in msg
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


@pytest.mark.parametrize(
    ("cls_name", "config_name", "config", "buffers"), HF_CASES, ids=[c[0] for c in HF_CASES]
)
def test_params_on_meta_model_loads_to_from_pretrained_outputs(
    tmp_path, cls_name, config_name, config, buffers
):
    import transformers

    folder = hf_folder(tmp_path, cls_name, config_name, **config)
    ref = getattr(transformers, cls_name).from_pretrained(folder).eval()
    with empty_weights():
        model = getattr(transformers, cls_name)(tiny_hf_config(config_name, **config))
    report = fastckpt.load_into(model, folder, device="cpu")
    model.eval()
    assert report.missing == [] and report.unexpected == []
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert_same_bytes(hf_logits(model), hf_logits(ref))


def test_a_tensor_present_but_not_loadable_is_named_as_such(tmp_path):
    path = tmp_path / "sparse.pt"
    torch.save({"w": torch.ones(2, 3), "s": torch.eye(3).to_sparse()}, path)
    model = nn.Module()
    model.register_buffer("w", torch.zeros(2, 3))
    model.register_buffer("s", torch.zeros(3, 3))
    with pytest.raises(fastckpt.StrictLoadError) as info:
        fastckpt.load_into(model, path)
    msg = str(info.value)
    assert "present in the checkpoint but not loadable (1):\n    s: a sparse COO tensor" in msg
    assert "missing from the checkpoint" not in msg
    assert torch.equal(model.w, torch.zeros(2, 3))  # nothing written
    with pytest.warns(fastckpt.UninitializedWarning, match="1 tensors of the model"):
        report = fastckpt.load_into(model, path, strict=False)
    assert report.missing == [] and report.unloadable == [("s", "a sparse COO tensor")]
    assert torch.equal(model.w, torch.ones(2, 3))


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_mmap_views_the_file_and_writes_never_reach_it(tmp_path, fmt):
    import hashlib

    import transformers

    torch.manual_seed(0)
    ref = transformers.BertForPreTraining(tiny_hf_config()).eval()
    path = tmp_path / f"bert.{fmt}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if fmt == "pt":
        torch.save(state, path)
    else:
        tied = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
        save_file({k: v for k, v in state.items() if k not in tied}, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with empty_weights():
        model = transformers.BertForPreTraining(tiny_hf_config())
    report = fastckpt.load_into(model, path, device="cpu", mmap=True, strict=False)
    model.eval()
    assert report.mapped and set(report.mapped) <= set(report.loaded)
    word = model.bert.embeddings.word_embeddings.weight
    maps = Path("/proc/self/maps").read_text()
    line = next(x for x in maps.splitlines() if str(path) in x and " rw-p " in x)
    lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
    assert lo <= word.data_ptr() < hi  # a view of the file's private mapping, not a copy
    ids = torch.tensor([[1, 5, 7, 3, 2]])
    with torch.no_grad():
        assert_same_bytes(model(input_ids=ids).prediction_logits,
                          ref(input_ids=ids).prediction_logits)
        word.add_(1.0)  # writes go to private pages
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert_same_bytes(fastckpt.open(path).tensor("bert.embeddings.word_embeddings.weight"),
                      state["bert.embeddings.word_embeddings.weight"])


def test_mmap_copies_what_needs_a_cast(tmp_path):
    path = tmp_path / "n.safetensors"
    state = _state(Net())
    save_file(state, str(path))
    with empty_weights():
        model = Net()
    report = fastckpt.load_into(model, path, device="cpu", dtype=torch.bfloat16, mmap=True)
    assert report.mapped == []
    for k, v in state.items():
        assert_same_bytes(model.state_dict()[k], v.to(torch.bfloat16))
