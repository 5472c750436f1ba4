"""suggest_rules: prefixes and segment renames, scored by how many model keys they fill."""

from __future__ import annotations

from fastckpt.suggest.renames import suggest_rules
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


# -- conversions: stack, concatenate, transpose --------------------------------

MOE_SRC = {
    f"l.{i}.experts.{e}.{w}.weight": shape
    for i in range(2)
    for e in range(3)
    for w, shape in (("w1", (8, 5)), ("w3", (8, 5)), ("w2", (5, 8)))
}
MOE_DST = {f"l.{i}.gate_up": (3, 16, 5) for i in range(2)} | {
    f"l.{i}.down": (3, 5, 8) for i in range(2)
}


def test_per_expert_tensors_are_suggested_as_a_stack_and_concatenation():
    s = suggest_rules(MOE_SRC, MOE_DST)
    assert s.rules_text == (
        "l.{i}.experts.{e}.w2.weight -> l.{i}.down stack[e]\n"
        "l.{i}.experts.{e}.w1.weight -> l.{i}.gate_up stack[e] cat[0:8]\n"
        "l.{i}.experts.{e}.w3.weight -> l.{i}.gate_up stack[e] cat[8:16]\n"
    )
    assert (s.matches, s.total) == (4, 4)


def test_the_conversion_suggestion_does_not_depend_on_key_order():
    import random

    keys = list(MOE_SRC)
    random.Random(3).shuffle(keys)
    assert suggest_rules({k: MOE_SRC[k] for k in keys}, MOE_DST) == suggest_rules(MOE_SRC, MOE_DST)


def test_a_stack_with_a_missing_expert_is_not_suggested():
    src = {k: v for k, v in MOE_SRC.items() if k != "l.1.experts.1.w2.weight"}
    s = suggest_rules(src, MOE_DST)
    assert "l.1.down" not in s.rules_text and "l.{i}.down" not in s.rules_text
    assert "# no source found for l.1.down [3, 5, 8]" in s.notes


def test_families_the_target_name_does_not_order_are_not_concatenated():
    src = {k.replace(".w1.", ".a.").replace(".w3.", ".b."): v for k, v in MOE_SRC.items()}
    dst = {k.replace("gate_up", "fused"): v for k, v in MOE_DST.items()}
    s = suggest_rules(src, dst)
    assert "cat[" not in s.rules_text
    assert "l.{i}.experts.{e}.w2.weight -> l.{i}.down stack[e]\n" in s.rules_text


def test_qkv_concatenated_in_the_order_the_name_gives():
    src = {f"b.{i}.attn.{p}.weight": (16 if p == "q" else 8, 16) for i in range(2) for p in "vkq"}
    dst = {f"b.{i}.attn.qkv_proj.weight": (32, 16) for i in range(2)}
    s = suggest_rules(src, dst)
    assert s.rules_text == (
        "b.{i}.attn.q.weight -> b.{i}.attn.qkv_proj.weight cat[0:16]\n"
        "b.{i}.attn.k.weight -> b.{i}.attn.qkv_proj.weight cat[16:24]\n"
        "b.{i}.attn.v.weight -> b.{i}.attn.qkv_proj.weight cat[24:32]\n"
    )


def test_an_exact_transpose_of_shape():
    src = {"h.0.c_fc.weight": (6, 24), "h.0.ln.weight": (6,)}
    dst = {"h.0.fc.weight": (24, 6), "h.0.ln.weight": (6,)}
    assert suggest_rules(src, dst).rules_text == "h.{i}.c_fc.weight -> h.{i}.fc.weight transpose\n"
    # a square tensor's transpose has its own shape: nothing shows it is transposed
    square = suggest_rules({"h.0.c_fc.weight": (6, 6)}, {"h.0.fc.weight": (6, 6)})
    assert square.rules_text == "h.0.c_fc.{rest*} -> h.0.fc.{rest*}\n"


def test_the_strict_error_suggests_rules_that_load_exactly(tmp_path):
    import pytest
    import torch
    from safetensors.torch import save_file
    from torch import nn

    import fastckpt

    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(*v, generator=g) for k, v in MOE_SRC.items()}
    save_file(state, tmp_path / "experts.safetensors")
    model = nn.Module()
    model.l = nn.ModuleList(nn.Module() for _ in range(2))
    for m in model.l:
        m.gate_up = nn.Parameter(torch.zeros(3, 16, 5))
        m.down = nn.Parameter(torch.zeros(3, 5, 8))
    with pytest.raises(fastckpt.StrictLoadError) as info:
        fastckpt.load_into(model, tmp_path / "experts.safetensors")
    assert "stack[e] cat[0:8]" in str(info.value)
    report = fastckpt.load_into(
        model, tmp_path / "experts.safetensors", rules=info.value.suggested_rules
    )
    assert report.missing == [] and report.unexpected == []
    for i, m in enumerate(model.l):
        w = {
            n: torch.stack([state[f"l.{i}.experts.{e}.{n}.weight"] for e in range(3)])
            for n in ("w1", "w2", "w3")
        }
        assert torch.equal(m.gate_up.detach(), torch.cat([w["w1"], w["w3"]], dim=1))
        assert torch.equal(m.down.detach(), w["w2"])
