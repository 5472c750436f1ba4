"""suggest_rules: prefixes and segment renames, scored by how many model keys they fill."""

from __future__ import annotations

from fastckpt.suggest import suggest_rules

MODEL = {
    "bert.embeddings.word_embeddings.weight": (20, 8),
    "bert.embeddings.LayerNorm.weight": (8,),
    "bert.embeddings.LayerNorm.bias": (8,),
    "bert.encoder.layer.0.attention.weight": (8, 8),
    "bert.encoder.layer.0.attention.bias": (8,),
}


def test_strip_ddp_prefix():
    s = suggest_rules({"module." + k: v for k, v in MODEL.items()}, MODEL)
    assert s.rules_text == "module.{rest*} -> {rest*}\n"
    assert s.lines == ["strip prefix 'module.': matches 5/5 keys"]
    assert (s.matches, s.total) == (5, 5)


def test_add_prefix():
    bare = {k.removeprefix("bert."): v for k, v in MODEL.items()}
    s = suggest_rules(bare, MODEL)
    assert s.rules_text == "{rest*} -> bert.{rest*}\n"
    assert s.lines == ["add prefix 'bert.': matches 5/5 keys"]


def test_strip_model_prefix_and_ignore_unused_heads():
    """BertForPreTraining into BertModel: 'bert.' goes, 'cls.*' is not needed."""
    model = {k.removeprefix("bert."): v for k, v in MODEL.items()}
    ckpt = dict(MODEL) | {"cls.predictions.bias": (20,), "cls.seq_relationship.weight": (2, 8)}
    s = suggest_rules(ckpt, model)
    assert s.rules_text == "ignore cls.**\nbert.{rest*} -> {rest*}\n"
    assert s.lines == [
        "strip prefix 'bert.': matches 5/5 keys",
        "ignore cls.**: skips 2 checkpoint keys nothing uses",
    ]


def test_replace_prefix():
    ckpt = {"roberta." + k.removeprefix("bert."): v for k, v in MODEL.items()}
    s = suggest_rules(ckpt, MODEL)
    assert s.rules_text == "roberta.{rest*} -> bert.{rest*}\n"


def test_gamma_beta_with_prefix_in_first_match_order():
    ckpt = {
        "module."
        + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in MODEL.items()
    }
    s = suggest_rules(ckpt, MODEL)
    # The specific renames come before the general prefix rule: first match wins.
    assert s.rules_text == (
        "module.{p*}.gamma -> {p*}.weight\n"
        "module.{p*}.beta -> {p*}.bias\n"
        "module.{rest*} -> {rest*}\n"
    )
    assert s.lines == [
        "strip prefix 'module.' and rename 'gamma' -> 'weight', 'beta' -> 'bias': matches 5/5 keys"
    ]


def test_shapes_must_agree():
    ckpt = {"module." + k: (1,) for k in MODEL}
    assert not suggest_rules(ckpt, MODEL)


def test_nothing_to_suggest_when_names_already_match():
    s = suggest_rules(MODEL, MODEL)
    assert not s and s.rules_text == "" and s.lines == []
