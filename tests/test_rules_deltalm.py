"""docs/STORIES.md story 1 at small scale: pretrained DeltaLM keys -> fairseq DeltaLM
keys, with the vocabulary cut from 1040 to 1001 rows and a tied output projection.

The plan is checked target by target against the story's table, and applied
to random tensors with plain torch indexing to check the rows it selects.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastckpt import Rules
from fastckpt.planning.mapping import MappingPlan, RowSelection
from fastckpt.suggest.renames import suggest_pairings

HIDDEN, FFN, POSITIONS = 16, 64, 34
VOCAB_FILE, VOCAB_MODEL = 1040, 1001
ENC_LAYERS, DEC_LAYERS = 2, 1

TIED = "decoder.embed_tokens.weight, decoder.output_projection.weight"
RULES_TEXT = f"""\
# pretrained DeltaLM (deltalm-base.pt, "weights") -> fairseq DeltaLM ("model")
src_embedding.embed_tokens.weight -> encoder.embed_tokens.weight rows[:{VOCAB_MODEL}]
src_embedding.embed_positions.weight -> encoder.embed_positions.weight
src_embedding.emb_layer_norm.{{p}} -> encoder.layernorm_embedding.{{p}}
# the output projection is the target embedding again (tied)
tgt_embedding.embed_tokens.weight -> {TIED} rows[:{VOCAB_MODEL}]
tgt_embedding.embed_positions.weight -> decoder.embed_positions.weight
tgt_embedding.emb_layer_norm.{{p}} -> decoder.layernorm_embedding.{{p}}

encoder.layers.{{i}}.ffn.{{fc}}.{{p}} -> encoder.layers.{{i}}.{{fc}}.{{p}}
decoder.layers.{{i}}.ffn_1.{{fc}}.{{p}} -> decoder.layers.{{i}}.{{fc}}.{{p}}
decoder.layers.{{i}}.ffn_2.fc1.{{p}} -> decoder.layers.{{i}}.fc3.{{p}}
decoder.layers.{{i}}.ffn_2.fc2.{{p}} -> decoder.layers.{{i}}.fc4.{{p}}

ignore-target **.version   # buffers, not weights
"""

WB = ("weight", "bias")


def attn(prefix: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out[f"{prefix}.{proj}.weight"] = (HIDDEN, HIDDEN)
        out[f"{prefix}.{proj}.bias"] = (HIDDEN,)
    return out


def norm(prefix: str) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{p}": (HIDDEN,) for p in WB}


def ffn(prefix: str, fc1: str, fc2: str) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.{fc1}.weight": (FFN, HIDDEN),
        f"{prefix}.{fc1}.bias": (FFN,),
        f"{prefix}.{fc2}.weight": (HIDDEN, FFN),
        f"{prefix}.{fc2}.bias": (HIDDEN,),
    }


def embedding(prefix: str, vocab: int, norm_name: str) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.embed_tokens.weight": (vocab, HIDDEN),
        f"{prefix}.embed_positions.weight": (POSITIONS, HIDDEN),
        **norm(f"{prefix}.{norm_name}"),
    }


def pretrained_shapes() -> dict[str, tuple[int, ...]]:
    """The pretrained file's `weights` (story table, left column)."""
    out = {
        **embedding("src_embedding", VOCAB_FILE, "emb_layer_norm"),
        **embedding("tgt_embedding", VOCAB_FILE, "emb_layer_norm"),
    }
    for n in range(ENC_LAYERS):
        p = f"encoder.layers.{n}"
        out |= attn(f"{p}.self_attn") | norm(f"{p}.self_attn_layer_norm")
        out |= ffn(f"{p}.ffn", "fc1", "fc2") | norm(f"{p}.final_layer_norm")
    for n in range(DEC_LAYERS):
        p = f"decoder.layers.{n}"
        out |= attn(f"{p}.self_attn") | norm(f"{p}.self_attn_layer_norm")
        out |= attn(f"{p}.encoder_attn") | norm(f"{p}.encoder_attn_layer_norm")
        out |= ffn(f"{p}.ffn_1", "fc1", "fc2") | norm(f"{p}.ffn_layer_norm")
        out |= ffn(f"{p}.ffn_2", "fc1", "fc2") | norm(f"{p}.final_layer_norm")
    return out


def model_shapes() -> dict[str, tuple[int, ...]]:
    """The fairseq model's state dict (story table, right column)."""
    out = embedding("encoder", VOCAB_MODEL, "layernorm_embedding")
    for n in range(ENC_LAYERS):
        p = f"encoder.layers.{n}"
        out |= attn(f"{p}.self_attn") | norm(f"{p}.self_attn_layer_norm")
        out |= ffn(p, "fc1", "fc2") | norm(f"{p}.final_layer_norm")
    out["encoder.version"] = (1,)
    out |= embedding("decoder", VOCAB_MODEL, "layernorm_embedding")
    for n in range(DEC_LAYERS):
        p = f"decoder.layers.{n}"
        out |= attn(f"{p}.self_attn") | norm(f"{p}.self_attn_layer_norm")
        out |= attn(f"{p}.encoder_attn") | norm(f"{p}.encoder_attn_layer_norm")
        out |= ffn(p, "fc1", "fc2") | norm(f"{p}.ffn_layer_norm")
        out |= ffn(p, "fc3", "fc4") | norm(f"{p}.final_layer_norm")
    out["decoder.output_projection.weight"] = (VOCAB_MODEL, HIDDEN)
    out["decoder.version"] = (1,)
    return out


def expected_source(target: str) -> tuple[str, bool] | None:
    """The story table read right to left: (source key, vocab rows cut?)."""
    if target.endswith(".version"):
        return None
    if target == "decoder.output_projection.weight":
        return "tgt_embedding.embed_tokens.weight", True
    side, rest = target.split(".", 1)
    if rest.startswith(("embed_", "layernorm_embedding")):
        emb = "src_embedding" if side == "encoder" else "tgt_embedding"
        return f"{emb}.{rest.replace('layernorm_embedding', 'emb_layer_norm')}", rest.startswith(
            "embed_tokens"
        )
    _, n, module, param = rest.split(".", 3)
    layer = f"{side}.layers.{n}"
    renames = {
        "encoder": {"fc1": "ffn.fc1", "fc2": "ffn.fc2"},
        "decoder": {"fc1": "ffn_1.fc1", "fc2": "ffn_1.fc2", "fc3": "ffn_2.fc1", "fc4": "ffn_2.fc2"},
    }[side]
    return f"{layer}.{renames.get(module, module)}.{param}", False


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    p = tmp_path / "deltalm.rules"
    p.write_text(RULES_TEXT)
    return p


@pytest.fixture
def plan(rules_file: Path) -> MappingPlan:
    return Rules.from_file(rules_file).plan(list(pretrained_shapes()), list(model_shapes()))


def test_sizes_follow_the_story():
    src, dst = pretrained_shapes(), model_shapes()
    assert sum(k.startswith("encoder.layers.0.") for k in src) == 16
    assert sum(k.startswith("decoder.layers.0.") for k in src) == 32
    assert len(src) == 8 + 16 * ENC_LAYERS + 32 * DEC_LAYERS
    assert len(dst) == len(src) + 1 + 2  # output projection, two version buffers


def test_every_target_gets_the_right_source_and_rows(plan: MappingPlan):
    by_target = {a.target: a for a in plan.assignments}
    assert len(by_target) == len(plan.assignments)
    for target in model_shapes():
        exp = expected_source(target)
        if exp is None:
            assert target not in by_target
            continue
        a = by_target.pop(target)
        assert a.source == exp[0], target
        assert a.rows == (RowSelection(0, VOCAB_MODEL) if exp[1] else None), target
        assert a.dtype is None
        assert (a.rule is None) == (a.source == a.target), target
    assert by_target == {}


def test_versions_are_ignored_not_missing(plan: MappingPlan):
    assert plan.ignored_targets == ["encoder.version", "decoder.version"]
    assert plan.ignored_sources == []
    assert plan.unused_rules == []


def test_tied_output_projection_comes_from_the_target_embedding(plan: MappingPlan):
    (a,) = [a for a in plan.assignments if a.target == "decoder.output_projection.weight"]
    assert a.rule == (
        "tgt_embedding.embed_tokens.weight -> decoder.embed_tokens.weight, "
        f"decoder.output_projection.weight rows[:{VOCAB_MODEL}]"
    )


def test_plan_applied_to_tensors_fills_the_model_with_the_right_values(plan: MappingPlan):
    g = torch.Generator().manual_seed(0)
    src = {k: torch.randn(s, generator=g) for k, s in pretrained_shapes().items()}
    got = {}
    for a in plan.assignments:
        t = src[a.source]
        if a.rows is not None:
            t = t[a.rows.start : a.rows.stop]
        got[a.target] = t
    shapes = model_shapes()
    assert {k: tuple(v.shape) for k, v in got.items()} == {
        k: s for k, s in shapes.items() if not k.endswith(".version")
    }
    tgt_emb = src["tgt_embedding.embed_tokens.weight"]
    assert torch.equal(got["decoder.output_projection.weight"], tgt_emb[:VOCAB_MODEL])
    assert torch.equal(got["decoder.embed_tokens.weight"], tgt_emb[:VOCAB_MODEL])
    assert torch.equal(
        got["encoder.embed_tokens.weight"], src["src_embedding.embed_tokens.weight"][:VOCAB_MODEL]
    )
    assert torch.equal(got["decoder.layers.0.fc3.weight"], src["decoder.layers.0.ffn_2.fc1.weight"])
    assert torch.equal(got["decoder.layers.0.fc4.bias"], src["decoder.layers.0.ffn_2.fc2.bias"])
    assert torch.equal(got["encoder.layers.1.fc2.weight"], src["encoder.layers.1.ffn.fc2.weight"])
    assert torch.equal(
        got["decoder.layernorm_embedding.bias"], src["tgt_embedding.emb_layer_norm.bias"]
    )


def test_the_same_rules_built_from_python_plan_the_same(plan: MappingPlan):
    cut = slice(None, VOCAB_MODEL)
    built = (
        Rules()
        .rename("src_embedding.embed_tokens.weight", "encoder.embed_tokens.weight", rows=cut)
        .rename("src_embedding.embed_positions.weight", "encoder.embed_positions.weight")
        .rename("src_embedding.emb_layer_norm.{p}", "encoder.layernorm_embedding.{p}")
        .rename(
            "tgt_embedding.embed_tokens.weight",
            ["decoder.embed_tokens.weight", "decoder.output_projection.weight"],
            rows=cut,
        )
        .rename("tgt_embedding.embed_positions.weight", "decoder.embed_positions.weight")
        .rename("tgt_embedding.emb_layer_norm.{p}", "decoder.layernorm_embedding.{p}")
        .rename("encoder.layers.{i}.ffn.{fc}.{p}", "encoder.layers.{i}.{fc}.{p}")
        .rename("decoder.layers.{i}.ffn_1.{fc}.{p}", "decoder.layers.{i}.{fc}.{p}")
        .rename("decoder.layers.{i}.ffn_2.fc1.{p}", "decoder.layers.{i}.fc3.{p}")
        .rename("decoder.layers.{i}.ffn_2.fc2.{p}", "decoder.layers.{i}.fc4.{p}")
        .ignore_target("**.version")
    )
    assert built == Rules.parse(RULES_TEXT)
    assert built.plan(list(pretrained_shapes()), list(model_shapes())) == plan


def test_a_typo_in_the_rules_shows_as_an_unused_rule_and_a_missing_target(rules_file: Path):
    text = rules_file.read_text().replace("ffn_2.fc2.{p} ->", "ffn2.fc2.{p} ->")
    plan = Rules.parse(text).plan(list(pretrained_shapes()), list(model_shapes()))
    assert plan.unused_rules == ["decoder.layers.{i}.ffn2.fc2.{p} -> decoder.layers.{i}.fc4.{p}"]
    assigned = {a.target for a in plan.assignments}
    assert {t for t in model_shapes() if t not in assigned and not t.endswith(".version")} == {
        "decoder.layers.0.fc4.weight",
        "decoder.layers.0.fc4.bias",
    }


def test_story1_via_suggestions_pairs_what_names_and_shapes_prove():
    """The decoder's two feed-forward blocks (ffn_1.fc1 / ffn_2.fc1 -> fc1 / fc3) have
    the same shapes and no name that tells them apart: only the story's table does,
    so the suggestion leaves them to a hand-written rule rather than guess by order."""
    src, dst = pretrained_shapes(), model_shapes()
    lines = suggest_pairings(src, dst)
    # Layer numbers collapse into {i} because the pattern holds for every layer.
    assert "encoder.layers.{i}.ffn.fc1.{p} -> encoder.layers.{i}.fc1.{p}" in lines
    assert "src_embedding.embed_tokens.{p} -> encoder.embed_tokens.{p} rows[:1001]" in lines
    assert not any("ffn_1" in line or "ffn_2" in line for line in lines)
    undecided = {f"decoder.layers.0.fc{n}.{p}" for n in (1, 2, 3, 4) for p in ("weight", "bias")}
    notes = [line for line in lines if line.startswith("#")]
    assert {n.split()[5] for n in notes if ".fc" in n} == undecided
    plan = Rules(lines).plan(list(src), list(dst))
    got = {a.target: a for a in plan.assignments}
    for t in dst:
        exp = expected_source(t)
        if exp is None or t == "decoder.output_projection.weight" or t in undecided:
            assert t not in got
            continue
        assert got[t].source == exp[0], t
        assert (got[t].rows is not None) == exp[1], t
    assert plan.unused_rules == []
