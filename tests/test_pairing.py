"""Rule suggestions from names and shapes: pairing by shape and position
(fastckpt.pairing), through the one engine, fastckpt.suggest.suggest_rules."""

from __future__ import annotations

import pytest

from fastckpt import Rules
from fastckpt.pairing import suggest_pairings
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
    # 'l.0.ffn.' -> 'l.0.' is a prefix change that fits; layer 1 is paired by position.
    assert lines == ["l.1.ffn.w -> l.1.other", "l.0.ffn.{rest*} -> l.0.{rest*}"]
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
