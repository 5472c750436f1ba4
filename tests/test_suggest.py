"""suggest_rules: prefixes and segment renames, scored by how many model keys they fill."""

from __future__ import annotations

from fastckpt.suggest import suggest_rules
from tests.conftest import tf_names

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
    ckpt = tf_names(MODEL, prefix="module.")
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


def test_nested_heads_next_to_a_stripped_prefix_are_ignored():
    """DDP-wrapped BertForPreTraining: 'module.bert.' goes, 'module.cls.*' is not needed."""
    model = {k.removeprefix("bert."): v for k, v in MODEL.items()}
    ckpt = {"module." + k: v for k, v in MODEL.items()} | {"module.cls.bias": (20,)}
    s = suggest_rules(ckpt, model)
    assert s.rules_text == "ignore module.cls.**\nmodule.bert.{rest*} -> {rest*}\n"


def test_pairs_by_position_after_the_prefix_with_a_vocabulary_cut():
    """What no prefix or rename explains is paired by shape and layer position."""
    ckpt = {"module." + k: v for k, v in MODEL.items()}
    ckpt["module.bert.embeddings.word_embeddings.weight"] = (24, 8)  # 4 rows more than the model
    ckpt["module.bert.encoder.layer.0.ffn.attention.weight"] = ckpt.pop(
        "module.bert.encoder.layer.0.attention.weight"
    )
    model = dict(MODEL) | {"bert.pooler.weight": (8, 8)}
    s = suggest_rules(ckpt, model)
    assert s.rules_text == (
        "module.bert.embeddings.word_embeddings.{p} -> bert.embeddings.word_embeddings.{p}"
        " rows[:20]\n"
        "module.bert.encoder.layer.{i}.ffn.attention.{p} -> bert.encoder.layer.{i}.attention.{p}\n"
        "module.{rest*} -> {rest*}\n"
    )
    assert s.lines == [
        "strip prefix 'module.': matches 3/6 keys",
        "pair 2 more keys by shape and name (1 with a vocabulary cut): matches 5/6 keys",
    ]
    assert (s.matches, s.total) == (5, 6)
    assert s.notes == ["# no source found for bert.pooler.weight [8, 8]"]
    assert s.as_file("port") == (
        "# port\n# " + "\n# ".join(s.lines) + "\n" + s.rules_text + s.notes[0] + "\n"
    )


def test_a_prefix_that_fits_by_chance_is_not_suggested():
    """tgt_embedding.positions happens to fit encoder.positions; the rest of the prefix does not."""
    ckpt = {"tgt.pos.weight": (6, 4), "tgt.tok.weight": (30, 4), "tgt.norm.weight": (4,)}
    model = {"enc.pos.weight": (6, 4), "enc.tok.weight": (20, 4), "enc.ln.weight": (5,)}
    s = suggest_rules(ckpt, model)
    assert "tgt.{rest*} -> enc.{rest*}" not in s.rules_text
