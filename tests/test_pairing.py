"""Rule suggestions from names and shapes: pairing by shape and name
(fastckpt.suggest.pairing), through the one engine, fastckpt.suggest.renames.suggest_rules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastckpt import Rules
from fastckpt.suggest.renames import suggest_pairings, suggest_rules, suggested_rules
from tests.conftest import tiny_hf_config


def sources_by_target(lines: list[str], src: dict, dst: dict) -> dict[str, str]:
    plan = Rules(lines).plan(list(src), list(dst))
    return {a.target: a.source for a in plan.assignments}


def test_identical_key_sets_need_no_rules():
    shapes = {"a.weight": (2, 3), "a.bias": (2,)}
    assert suggest_pairings(shapes, shapes) == []


def test_ddp_prefix():
    dst = {"enc.weight": (4, 4), "enc.bias": (4,), "head.weight": (2, 4)}
    src = {"module." + k: v for k, v in dst.items()}
    assert suggest_pairings(src, dst) == ["module.{rest*} -> {rest*}"]


def test_added_prefix():
    src = {"embeddings.weight": (10, 4), "encoder.layer.0.weight": (4, 4)}
    dst = {"roberta." + k: v for k, v in src.items()}
    assert suggest_pairings(src, dst) == ["{rest*} -> roberta.{rest*}"]


def test_ambiguous_shapes_are_not_guessed():
    src = {"x.a": (4,), "x.b": (4,)}
    dst = {"y.c": (4,)}
    lines = suggest_pairings(src, dst)
    assert lines == ["# no source found for y.c [4]"]
    assert Rules(lines).plan(list(src), list(dst)).assignments == []


def test_story2_via_suggestions():
    transformers = pytest.importorskip("transformers")
    config = tiny_hf_config()
    saved = {}
    for k, v in transformers.BertForPreTraining(config).state_dict().items():
        k = k.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(
            ".LayerNorm.bias", ".LayerNorm.beta"
        )
        saved["module." + k] = tuple(v.shape)
    plain = {k: tuple(v.shape) for k, v in transformers.BertModel(config).state_dict().items()}
    lines = suggest_pairings(saved, plain)
    assert lines == [
        "ignore module.cls.**",
        "module.bert.{p*}.gamma -> {p*}.weight",
        "module.bert.{p*}.beta -> {p*}.bias",
        "module.bert.{rest*} -> {rest*}",
    ]
    got = sources_by_target(lines, saved, plain)
    assert set(got) == set(plain)
    for t, s in got.items():
        assert (
            s.removeprefix("module.bert.").replace("gamma", "weight").replace("beta", "bias") == t
        )
        assert saved[s] == plain[t]


def test_a_pattern_is_only_collapsed_when_it_holds_for_every_layer():
    src = {
        "l.0.ffn.w": (3, 2),
        "l.1.ffn.w": (3, 2),
        "l.0.x": (5,),
        "l.1.x": (5,),
    }
    # Layer 1's ffn weight keeps another name in the target: no {i} rule for it.
    dst = {"l.0.w": (3, 2), "l.1.other": (3, 2), "l.0.x": (5,), "l.1.x": (5,)}
    lines = suggest_pairings(src, dst)
    # Each layer has one (3, 2) tensor on each side: paired per layer, written out.
    assert lines == ["l.0.ffn.{p} -> l.0.{p}", "l.1.ffn.w -> l.1.other"]
    assert sources_by_target(lines, src, dst) == {
        "l.0.w": "l.0.ffn.w",
        "l.1.other": "l.1.ffn.w",
        "l.0.x": "l.0.x",
        "l.1.x": "l.1.x",
    }


def test_pretraining_heads_next_to_a_stripped_prefix_are_ignored():
    src = {"bert.emb.weight": (10, 4), "bert.enc.weight": (4, 4), "cls.dense.weight": (4, 4)}
    dst = {"emb.weight": (10, 4), "enc.weight": (4, 4)}
    lines = suggest_pairings(src, dst)
    assert lines == ["ignore cls.**", "bert.{rest*} -> {rest*}"]
    plan = Rules(lines).plan(list(src), list(dst))
    assert plan.ignored_sources == ["cls.dense.weight"]
    assert {a.target: a.source for a in plan.assignments} == {
        "emb.weight": "bert.emb.weight",
        "enc.weight": "bert.enc.weight",
    }


# -- never a wrong value -------------------------------------------------------


def vit_like_shapes(layers: int = 2, hidden: int = 16, inner: int = 32) -> tuple[dict, dict]:
    """A transformers ViT folder (legacy names) and the v5 model's names, by shape."""
    src: dict[str, tuple[int, ...]] = {"embeddings.cls_token": (1, 1, hidden)}
    dst: dict[str, tuple[int, ...]] = {"embeddings.cls_token": (1, 1, hidden)}
    for i in range(layers):
        s, t = f"encoder.layer.{i}", f"layers.{i}"
        for old, new in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            src |= {f"{s}.attention.attention.{old}.weight": (hidden, hidden)}
            src |= {f"{s}.attention.attention.{old}.bias": (hidden,)}
            dst |= {f"{t}.attention.{new}.weight": (hidden, hidden)}
            dst |= {f"{t}.attention.{new}.bias": (hidden,)}
        src |= {f"{s}.attention.output.dense.weight": (hidden, hidden)}
        src |= {f"{s}.attention.output.dense.bias": (hidden,)}
        dst |= {f"{t}.attention.o_proj.weight": (hidden, hidden)}
        dst |= {f"{t}.attention.o_proj.bias": (hidden,)}
        src |= {f"{s}.intermediate.dense.weight": (inner, hidden)}
        src |= {f"{s}.intermediate.dense.bias": (inner,)}
        src |= {f"{s}.output.dense.weight": (hidden, inner), f"{s}.output.dense.bias": (hidden,)}
        dst |= {f"{t}.mlp.fc1.weight": (inner, hidden), f"{t}.mlp.fc1.bias": (inner,)}
        dst |= {f"{t}.mlp.fc2.weight": (hidden, inner), f"{t}.mlp.fc2.bias": (hidden,)}
        for ln in ("layernorm_before", "layernorm_after"):
            for p in ("weight", "bias"):
                src[f"{s}.{ln}.{p}"] = dst[f"{t}.{ln}.{p}"] = (hidden,)
    return src, dst


def vit_truth(source: str) -> str:
    """The target the ViT legacy key really is (transformers' own rename table)."""
    t = source.replace("encoder.layer.", "layers.")
    for old, new in (
        ("attention.attention.query", "attention.q_proj"),
        ("attention.attention.key", "attention.k_proj"),
        ("attention.attention.value", "attention.v_proj"),
        ("attention.output.dense", "attention.o_proj"),
        ("intermediate.dense", "mlp.fc1"),
        ("output.dense", "mlp.fc2"),
    ):
        t = t.replace(old, new)
    return t


def test_vit_qkv_are_paired_by_name_not_by_order():
    """Checkpoint order lists key before query: pairing by position put key on q_proj."""
    src, dst = vit_like_shapes()
    s = suggest_rules(src, dst)
    assert (s.matches, s.total) == (len(dst), len(dst))
    got = sources_by_target(s.rules_text.splitlines(), src, dst)
    assert got == {vit_truth(k): k for k in src}


def test_vit_folder_from_save_pretrained_loads_the_same_values():
    """The real folder: every pair the suggestion makes carries the model's own tensor."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    config = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        image_size=8, patch_size=4,
    )  # fmt: skip
    model = transformers.ViTModel(config)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        saved = load_file(f"{d}/model.safetensors")
    state = model.state_dict()
    assert set(saved) != set(state)  # legacy names on disk, v5 names in the model
    rules = suggested_rules({k: v.shape for k, v in saved.items()}, state_shapes(state))
    assert rules is not None
    plan = rules.plan(list(saved), list(state))
    assert {a.target for a in plan.assignments} == set(state)
    for a in plan.assignments:
        assert torch.equal(saved[a.source].view(torch.uint8), state[a.target].view(torch.uint8)), a


def state_shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@settings(max_examples=30, deadline=None)
@given(st.randoms(use_true_random=False))
def test_the_suggestion_does_not_depend_on_key_order(rnd):
    src, dst = vit_like_shapes(layers=3)
    # an extra model tensor and two same-shaped sources no name tells apart
    src |= {"extra.a.weight": (7, 3), "extra.b.weight": (7, 3)}
    dst |= {"head.x.weight": (7, 3), "head.y.weight": (7, 3)}
    first = suggest_rules(src, dst)
    s_keys, d_keys = list(src), list(dst)
    rnd.shuffle(s_keys)
    rnd.shuffle(d_keys)
    again = suggest_rules({k: src[k] for k in s_keys}, {k: dst[k] for k in d_keys})
    assert again == first
    got = sources_by_target(again.rules_text.splitlines(), src, dst)
    assert got == {vit_truth(k): k for k in src if not k.startswith("extra.")}


def test_same_shaped_keys_without_telling_names_stay_unexplained():
    src = {"blk.0.mix_a.weight": (4, 4), "blk.0.mix_b.weight": (4, 4), "blk.0.n.weight": (4,)}
    dst = {"blk.0.left.weight": (4, 4), "blk.0.right.weight": (4, 4), "blk.0.n.weight": (4,)}
    s = suggest_rules(src, dst)
    assert not s
    assert s.notes == [
        "# no source found for blk.0.left.weight [4, 4]",
        "# no source found for blk.0.right.weight [4, 4]",
    ]


def test_one_source_one_target_of_a_shape_pair_whatever_their_names():
    src = {"blk.0.mix.weight": (4, 4), "blk.0.n.weight": (4,)}
    dst = {"blk.0.left.weight": (4, 4), "blk.0.n.weight": (4,)}
    lines = suggest_pairings(src, dst)
    assert lines == ["blk.0.mix.{rest*} -> blk.0.left.{rest*}"]
    assert sources_by_target(lines, src, dst) == {
        "blk.0.left.weight": "blk.0.mix.weight",
        "blk.0.n.weight": "blk.0.n.weight",
    }


def normed_model() -> torch.nn.Module:
    from torch.nn.utils.parametrizations import weight_norm

    return torch.nn.Sequential(
        weight_norm(torch.nn.Linear(6, 4)), weight_norm(torch.nn.Conv1d(4, 4, 3))
    )


def test_a_plain_weight_is_never_suggested_for_a_weight_norm_parametrization():
    """weight = g * v / |v|: loading a plain weight into original1 (v) gives other values."""
    plain = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Conv1d(4, 4, 3))
    normed = normed_model()
    s = suggest_rules(state_shapes(plain.state_dict()), state_shapes(normed.state_dict()))
    assert "original" not in s.rules_text
    assert sorted(n.split()[5] for n in s.notes) == [
        "0.parametrizations.weight.original0",
        "0.parametrizations.weight.original1",
        "1.parametrizations.weight.original0",
        "1.parametrizations.weight.original1",
    ]


def test_legacy_weight_norm_names_map_onto_the_parametrization():
    """torch.nn.utils.weight_norm's weight_g / weight_v are original0 / original1."""
    old = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Conv1d(4, 4, 3))
    for m in old:
        with pytest.warns(FutureWarning):
            torch.nn.utils.weight_norm(m)  # the deprecated form: weight_g, weight_v
    new = normed_model()
    saved, state = old.state_dict(), new.state_dict()
    rules = suggested_rules(state_shapes(saved), state_shapes(state))
    assert rules is not None
    assert str(rules) == (
        "{p*}.weight_g -> {p*}.parametrizations.weight.original0\n"
        "{p*}.weight_v -> {p*}.parametrizations.weight.original1\n"
    )
    plan = rules.plan(list(saved), list(state))
    assert {a.target for a in plan.assignments} == set(state)
    # the same pairing torch's own compatibility hook makes on load_state_dict
    reference = normed_model()
    reference.load_state_dict(saved)
    ref = reference.state_dict()
    for a in plan.assignments:
        assert torch.equal(saved[a.source], ref[a.target]), a


def test_the_suggestion_as_a_rules_object():
    dst = {"enc.weight": (4, 4), "enc.bias": (4,)}
    src = {"module." + k: v for k, v in dst.items()}
    s = suggest_rules(src, dst)
    assert s.as_rules() == Rules.parse(s.rules_text)
    assert suggested_rules(src, dst) == Rules(["module.{rest*} -> {rest*}"])
    assert suggested_rules(dst, dst) is None
