"""Suggestions that cannot load wrong values: a property over checkpoints derived from a
model by known transformations, and GPT-2's Conv1D layout into an nn.Linear GPT."""

from __future__ import annotations

import random
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from fastckpt.errors import StrictLoadError, UninitializedWarning
from fastckpt.load.execute import load_into
from fastckpt.suggest.renames import suggest_rules
from tests.conftest import assert_same_bytes

# ---------------------------------------------------------------- by shapes alone

GPT2_CONV1D = {  # what GPT-2's save_pretrained writes: Conv1D weights [in, out]
    "transformer.h.0.attn.c_attn.weight": (8, 24),
    "transformer.h.0.attn.c_proj.weight": (8, 8),
    "transformer.h.0.mlp.c_fc.weight": (8, 32),
    "transformer.h.0.mlp.c_proj.weight": (32, 8),
    "transformer.h.0.ln_1.weight": (8,),
}
GPT_LINEAR = {  # the same names written with nn.Linear: [out, in]
    "transformer.h.0.attn.c_attn.weight": (24, 8),
    "transformer.h.0.attn.c_proj.weight": (8, 8),
    "transformer.h.0.mlp.c_fc.weight": (32, 8),
    "transformer.h.0.mlp.c_proj.weight": (8, 32),
    "transformer.h.0.ln_1.weight": (8,),
}


def test_a_key_the_model_has_is_transposed_in_place_never_renamed_onto_another():
    s = suggest_rules(GPT2_CONV1D, GPT_LINEAR)
    rules = s.rules_text.splitlines()
    # c_fc [8, 32] fits c_proj's [8, 32]: a shape that fits is no reason to rename
    assert not any(
        a.split(" -> ")[0].split(".")[-2] != a.split(" -> ")[1].split(".")[-2].split(" ")[0]
        for a in rules
    ), rules
    assert "transformer.h.{i}.mlp.c_fc.weight -> transformer.h.{i}.mlp.c_fc.weight transpose" in (
        rules
    )
    # the square attn.c_proj follows its three non-square siblings
    assert s.orientation.transposed == {
        "transformer.h.0.attn.c_proj.weight": "transformer.h.0.attn.c_proj.weight"
    }
    assert s.orientation.siblings == 3
    text = "\n".join(s.orientation_lines())
    assert "orientation taken from 3 sibling weights" in text
    assert "attn.c_proj.weight" in text


def test_squares_whose_siblings_disagree_are_left_out_and_listed():
    src = dict(GPT_LINEAR) | {"transformer.h.0.mlp.c_fc.weight": (8, 32)}  # only c_fc flipped
    s = suggest_rules(src, GPT_LINEAR)
    assert s.rules_text.splitlines() == [
        "ignore transformer.h.*.attn.c_proj.weight",
        "transformer.h.{i}.mlp.c_fc.weight -> transformer.h.{i}.mlp.c_fc.weight transpose",
    ]
    assert s.orientation.transposed == {}
    assert s.orientation.unknown == ["transformer.h.0.attn.c_proj.weight"]
    assert "orientation unknown, not loaded" in "\n".join(s.orientation_lines())


def test_a_chain_of_renames_the_names_support_may_use_a_model_name():
    # every key one level deeper: the checkpoint's m.a is the model's m.m.a, and the
    # model's m.a is fed by the checkpoint's a
    src = {"a": (1,), "b": (2,), "m.a": (3,)}
    dst = {"m.a": (1,), "m.b": (2,), "m.m.a": (3,)}
    assert suggest_rules(src, dst).rules_text == "{rest*} -> m.{rest*}\n"
    # ... but a renaming that takes m.a from its own model key, which nothing else
    # feeds, is not one, however many keys it fits
    src = {"b": (2,), "c": (5,), "m.a": (3,)}
    dst = {"m.a": (3,), "m.b": (2,), "m.c": (5,), "m.m.a": (3,)}
    s = suggest_rules(src, dst)
    assert "m.a ->" not in s.rules_text and "{rest*}" not in s.rules_text
    assert s.notes == ["# no source found for m.m.a [3]"]


# ---------------------------------------------------------------- the property


def _module(shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """A module whose state_dict has exactly ``shapes``, every value zero."""
    root = nn.Module()
    for name, shape in shapes.items():
        *path, leaf = name.split(".")
        m = root
        for seg in path:
            if not hasattr(m, seg):
                m.add_module(seg, nn.Module())
            m = getattr(m, seg)
        m.register_parameter(leaf, nn.Parameter(torch.zeros(shape), requires_grad=False))
    return root


TRANSFORMS = ("prefix", "tf_names", "rename_family", "layout", "extra", "missing", "swap")


@st.composite
def scenarios(draw):
    d = draw(st.sampled_from([4, 6]))
    f = draw(st.sampled_from([10, 14]))
    layers = draw(st.integers(1, 3))
    experts = draw(st.sampled_from([0, 2, 3]))
    qkv = draw(st.sampled_from(["separate", "fused", "split"]))  # split: fused model, q/k/v file
    layout = draw(st.sampled_from(["as_is", "conv1d", "one_family"]))
    chosen = draw(st.sets(st.sampled_from(TRANSFORMS)))
    if layout == "as_is":
        chosen.discard("layout")
    if qkv != "separate":
        chosen.discard("swap")  # swaps q and k: the model must have them apart
    order_seed = draw(st.integers(0, 2**16))
    return d, f, layers, experts, qkv, layout, frozenset(chosen), order_seed


def _model_and_checkpoint(d, f, layers, experts, qkv, layout, chosen):
    """(model shapes, model values, checkpoint tensors, model keys the checkpoint
    cannot fill with certainty) for one scenario."""
    g = torch.Generator().manual_seed(0)
    model: dict[str, tuple[int, ...]] = {"emb.weight": (22, d), "pos.weight": (9, d)}
    for i in range(layers):
        b = f"blk.{i}."
        model[b + "ln.weight"] = model[b + "ln.bias"] = (d,)
        if qkv == "separate":
            model |= {b + f"attn.{n}.weight": (d, d) for n in "qkv"}
        else:
            model[b + "attn.qkv.weight"] = (3 * d, d)
        model[b + "attn.o.weight"] = (d, d)
        model |= {b + "mlp.up.weight": (f, d), b + "mlp.up.bias": (f,)}
        model[b + "mlp.down.weight"] = (d, f)
        if experts:
            model[b + "moe.gate_up_proj"] = (experts, 2 * f, d)
            model[b + "moe.down_proj"] = (experts, d, f)
    model["head.weight"] = (22, d)
    values = {k: torch.randn(*s, generator=g) for k, s in model.items()}

    ckpt: dict[str, torch.Tensor] = {}
    unknowable: set[str] = set()
    for k, v in values.items():
        parts = k.split(".")
        if k.endswith("attn.qkv.weight") and qkv == "split":
            for n, piece in zip("qkv", v.chunk(3), strict=True):
                ckpt[k.replace("qkv", n)] = piece.clone()
            continue
        if k.endswith("moe.gate_up_proj"):
            for e in range(experts):
                gate, up = v[e].chunk(2)
                ckpt[k.replace("gate_up_proj", f"experts.{e}.w1.weight")] = gate.clone()
                ckpt[k.replace("gate_up_proj", f"experts.{e}.w3.weight")] = up.clone()
            continue
        if k.endswith("moe.down_proj"):
            for e in range(experts):
                ckpt[k.replace("down_proj", f"experts.{e}.w2.weight")] = v[e].clone()
            continue
        stored = v
        if "layout" in chosen and parts[0] == "blk" and v.dim() == 2:
            # conv1d: every 2-D weight of the blocks [in, out]; one_family: mlp.up only
            if layout == "conv1d" or k.endswith("mlp.up.weight"):
                stored = v.t()
        if "rename_family" in chosen:
            k = k.replace("mlp.up.", "mlp.c_fc.")
        if "tf_names" in chosen:
            k = k.replace("ln.weight", "ln.gamma").replace("ln.bias", "ln.beta")
        ckpt[k] = stored.contiguous().clone()
    if "swap" in chosen:  # q and k under names that do not say which is which
        for i in range(layers):
            b = f"blk.{i}.attn."
            q, k = ckpt.pop(b + "q.weight"), ckpt.pop(b + "k.weight")
            ckpt[b + "mix_a.weight"], ckpt[b + "mix_b.weight"] = k, q
            unknowable |= {b + "q.weight", b + "k.weight"}
    if "missing" in chosen:
        # (with mlp.up alone transposed, down is the witness that the squares are not:
        # without it the file is the Conv1D layout's, square weights aside)
        # (and with mlp.up renamed, a missing down leaves c_fc [d, f] either up
        # transposed or down renamed: nothing in the file tells)
        plain = layout != "one_family" and "rename_family" not in chosen
        gone = "blk.0.mlp.down.weight" if plain else "pos.weight"
        for k in ("head.weight", gone):
            ckpt.pop(k)
            unknowable.add(k)
    if "extra" in chosen:  # shapes no model tensor has
        ckpt["aux.table"] = torch.randn(5, 7, generator=g)
        ckpt["blk.0.aux.scale"] = torch.randn(3, generator=g)
    if "prefix" in chosen:
        ckpt = {"module." + k: v for k, v in ckpt.items()}
    return model, values, ckpt, unknowable


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(scenarios())
def test_suggested_rules_load_the_model_exactly_or_nothing_is_suggested(case):
    *shape_args, order_seed = case
    model_shapes, values, ckpt, unknowable = _model_and_checkpoint(*shape_args)
    ckpt_shapes = {k: tuple(v.shape) for k, v in ckpt.items()}
    sug = suggest_rules(ckpt_shapes, model_shapes)

    # the order of the keys on either side changes nothing
    rnd = random.Random(order_seed)
    s_keys, t_keys = list(ckpt_shapes), list(model_shapes)
    rnd.shuffle(s_keys)
    rnd.shuffle(t_keys)
    assert sug == suggest_rules(
        {k: ckpt_shapes[k] for k in s_keys}, {k: model_shapes[k] for k in t_keys}
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.safetensors"
        # and neither does the order of the tensors in the file
        save_file({k: ckpt[k] for k in s_keys}, path)
        model = _module(model_shapes)
        if not sug:
            try:  # nothing suggested: it loads as it is, exactly, or not at all
                load_into(model, path)
            except StrictLoadError:
                assert not any(t.any() for t in model.state_dict().values())
                return
            for name, want in values.items():
                assert_same_bytes(model.state_dict()[name], want)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UninitializedWarning)  # the missing keys
            report = load_into(model, path, rules=sug.as_rules(), strict=False)
    state = model.state_dict()
    for name, want in values.items():
        got = state[name]
        if name in report.missing:
            assert not got.any(), name  # left as it was
        else:
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
    # Not vacuous: what the transformations keep knowable is all loaded; square
    # weights of unknown orientation are left out only where a transformation
    # blurred it (siblings stored both ways, a sibling missing or unplaceable).
    announced = set(sug.orientation.unknown)
    layout, chosen = shape_args[5], shape_args[6]
    if not chosen & {"missing", "swap"}:  # (those make whole renamings a guess)
        assert set(report.missing) <= unknowable | announced, (report.missing, sug.rules_text)
        if layout != "one_family":
            assert not announced, sug.rules_text


# ---------------------------------------------------------------- GPT-2 save_pretrained


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(d, 3 * d)
        self.attn.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(d, 4 * d)
        self.mlp.c_proj = nn.Linear(4 * d, d)


class _LinearGPT(nn.Module):
    """GPT-2 written with nn.Linear ([out, in]) under GPT-2's own names."""

    def __init__(self, vocab: int, positions: int, d: int, layers: int) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(vocab, d)
        self.transformer.wpe = nn.Embedding(positions, d)
        self.transformer.h = nn.ModuleList(_Block(d) for _ in range(layers))
        self.transformer.ln_f = nn.LayerNorm(d)


def test_gpt2_save_pretrained_into_an_nn_linear_gpt_loads_exactly(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    config = transformers.GPT2Config(
        vocab_size=50, n_positions=24, n_embd=16, n_layer=2, n_head=2
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    stored = load_file(tmp_path / "gpt2" / "model.safetensors")
    model = _LinearGPT(50, 24, 16, 2)
    with pytest.raises(StrictLoadError) as info:
        load_into(model, tmp_path / "gpt2" / "model.safetensors")
    message = str(info.value)
    assert "orientation taken from 6 sibling weights" in message  # 2 layers x 3
    assert "c_fc.weight -> transformer.h.{i}.mlp.c_proj" not in message
    report = load_into(
        model, tmp_path / "gpt2" / "model.safetensors", rules=info.value.suggested_rules
    )
    assert report.missing == []
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    state = model.state_dict()
    assert set(state) <= set(stored)
    for name, got in state.items():
        want = stored[name]
        assert_same_bytes(got, want.t().contiguous() if name.endswith(conv1d) else want)
