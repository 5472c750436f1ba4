"""transformers' own conversions, loaded without rules: a folder written by
save_pretrained (per-expert tensors, legacy names) loads into the same v5 model
exactly as from_pretrained does, tensor for tensor; an op with no strided view is
refused by name; hand-written conversions (rope, transpose, split) through the
same assignments."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastckpt
from fastckpt import CheckpointError

transformers = pytest.importorskip("transformers")

from transformers.core_model_loading import (  # noqa: E402
    Chunk,
    ConversionOps,
    PermuteForRope,
    Transpose,
    WeightConverter,
)

from fastckpt.planning.hf_conversions import HFConversions, rules_for  # noqa: E402
from tests.conftest import same_bytes  # noqa: E402

TINY = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}


MOE_MODELS = {
    "mixtral": lambda: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**TINY, intermediate_size=8, num_key_value_heads=1,
                                   num_local_experts=3, num_experts_per_tok=2)
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(
        transformers.Qwen2MoeConfig(**TINY, intermediate_size=8, moe_intermediate_size=6,
                                    shared_expert_intermediate_size=8, num_key_value_heads=1,
                                    num_experts=4, num_experts_per_tok=2)
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(
        transformers.Qwen3MoeConfig(**TINY, intermediate_size=8, moe_intermediate_size=6,
                                    num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                                    head_dim=8)
    ),
    "olmoe": lambda: transformers.OlmoeForCausalLM(
        transformers.OlmoeConfig(**TINY, intermediate_size=6, num_key_value_heads=2,
                                 num_experts=4, num_experts_per_tok=2)
    ),
    "deepseek_v3": lambda: transformers.DeepseekV3ForCausalLM(
        transformers.DeepseekV3Config(**TINY, intermediate_size=12, moe_intermediate_size=6,
                                      num_key_value_heads=2, n_routed_experts=4,
                                      num_experts_per_tok=2, n_shared_experts=1,
                                      first_k_dense_replace=1, n_group=1, topk_group=1,
                                      q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4,
                                      qk_nope_head_dim=4, v_head_dim=4)
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MOE_MODELS))
def test_moe_folder_loads_like_from_pretrained(name, tmp_path):
    torch.manual_seed(0)
    model = MOE_MODELS[name]()
    model.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    assert set(on_disk) != set(
        model.state_dict()
    )  # per-expert tensors on disk, stacked in the model
    reference = type(model).from_pretrained(tmp_path)
    torch.manual_seed(1)
    fresh = MOE_MODELS[name]()
    report = fastckpt.load_into(fresh, tmp_path)  # strict, no rules
    assert report.missing == [] and report.unexpected == []
    same_bytes(reference.state_dict(), fresh.state_dict())
    stacked = [k for k in fresh.state_dict() if k.endswith("experts.gate_up_proj")]
    assert stacked and all(k in report.loaded for k in stacked)
    assert report.rule_for[stacked[0]].startswith(f"transformers {model.config.model_type}")


def test_a_sharded_folder_loads_the_same(tmp_path):
    torch.manual_seed(0)
    model = MOE_MODELS["mixtral"]()
    model.save_pretrained(tmp_path, max_shard_size="2KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    reference = type(model).from_pretrained(tmp_path)
    fresh = MOE_MODELS["mixtral"]()
    fastckpt.load_into(fresh, tmp_path)
    same_bytes(reference.state_dict(), fresh.state_dict())


def test_a_missing_expert_is_an_error_naming_it_before_anything_is_written(tmp_path):
    torch.manual_seed(0)
    model = MOE_MODELS["mixtral"]()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    fresh = MOE_MODELS["mixtral"]()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(
        CheckpointError,
        match=r"model.layers.1.mlp.experts.gate_up_proj: the checkpoint's parts do not fit "
        r"together \(3 x .experts.\*.w1.weight, 2 x .experts.\*.w3.weight\)",
    ):
        fastckpt.load_into(fresh, tmp_path)
    same_bytes(before, fresh.state_dict())


def test_not_a_transformers_model_gets_no_conversions():
    assert rules_for(torch.nn.Linear(2, 2), lambda k: (2, 2)) is None


class Cube(ConversionOps):
    """An op fastckpt has no view for."""

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        return {target_patterns[0]: next(iter(input_dict.values()))[0] ** 3}


def llama(**kw):
    cfg = transformers.LlamaConfig(**TINY, intermediate_size=12, num_key_value_heads=2, **kw)
    return transformers.LlamaForCausalLM(cfg)


def test_an_op_without_a_view_is_refused_by_name(tmp_path):
    model = llama()
    state = {k.replace("q_proj", "wq"): v for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "m.safetensors")
    conv = WeightConverter("self_attn.wq.weight", "self_attn.q_proj.weight", operations=[Cube()])
    rules = HFConversions(model, [conv], lambda k: state[k].shape)
    with pytest.raises(
        CheckpointError,
        match=r"transformers conversion Cube for model type 'llama' "
        r"\(\['self_attn.wq.weight'\] -> \['self_attn.q_proj.weight'\]\) cannot be "
        r"loaded by fastckpt: no strided view expresses it",
    ):
        fastckpt.load_into(model, tmp_path / "m.safetensors", rules=rules)


def meta_layout(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face rows back to Meta's interleaved pairs (inverse of the conversion
    script's permute)."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def test_meta_layout_llama_through_permute_for_rope(tmp_path):
    """wq/wk in Meta's rotary layout -> q_proj/k_proj, as transformers' PermuteForRope."""
    torch.manual_seed(0)
    model = llama()
    heads = model.config.num_attention_heads
    state = {}
    for k, v in model.state_dict().items():
        if ".q_proj." in k or ".k_proj." in k:
            k, v = k.replace("q_proj", "wq").replace("k_proj", "wk"), meta_layout(v, heads)
        state[k] = v.contiguous()
    save_file(state, tmp_path / "meta.safetensors")
    convs = [
        WeightConverter(
            f"self_attn.{a}.weight", f"self_attn.{b}.weight", operations=[PermuteForRope()]
        )
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"))
    ]
    fresh = llama()
    fastckpt.load_into(
        fresh,
        tmp_path / "meta.safetensors",
        rules=HFConversions(fresh, convs, lambda k: state[k].shape),
    )
    same_bytes(model.state_dict(), fresh.state_dict())


def test_a_fused_qkv_split_by_chunk_and_a_transposed_weight(tmp_path):
    torch.manual_seed(0)
    model = llama()
    sd = model.state_dict()
    state = {k: v for k, v in sd.items() if ".q_proj." not in k and ".k_proj." not in k}
    for i in range(2):
        p = f"model.layers.{i}.self_attn"
        # q and k have the same shape here: a chunk in two gives them back
        state[f"{p}.qk.weight"] = torch.cat([sd[f"{p}.q_proj.weight"], sd[f"{p}.k_proj.weight"]])
        state[f"{p}.o_proj.weight"] = sd[f"{p}.o_proj.weight"].t().contiguous()
    save_file(state, tmp_path / "fused.safetensors")
    convs = [
        WeightConverter("self_attn.qk.weight",
                        ["self_attn.q_proj.weight", "self_attn.k_proj.weight"],
                        operations=[Chunk(dim=0)]),
        WeightConverter("self_attn.o_proj.weight", "self_attn.o_proj.weight",
                        operations=[Transpose(0, 1)]),
    ]  # fmt: skip
    fresh = llama()
    report = fastckpt.load_into(
        fresh,
        tmp_path / "fused.safetensors",
        rules=HFConversions(fresh, convs, lambda k: state[k].shape),
    )
    assert report.missing == [] and report.unexpected == []
    same_bytes(sd, fresh.state_dict())


def _reverse(op, tensor: torch.Tensor, model) -> torch.Tensor:
    """What save_pretrained writes for ``tensor``: transformers' own reverse op."""
    out = op.reverse_op.convert(
        {"x": [tensor]}, ["x"], ["x"], config=model.config, model=model, full_layer_name="x"
    )
    return next(iter(out.values())).contiguous()


@pytest.mark.parametrize("dim", [0, 1])
def test_interleave_along_any_dim_and_a_vocabulary_unpadding(tmp_path, dim):
    """Interleave(dim) then a plain row cut (transformers' vocabulary un-padding): the
    folder transformers' reverse ops write loads back, each op a strided view."""
    from transformers.core_model_loading import Inkling2UnpadVocab, Interleave

    torch.manual_seed(0)
    model = llama()
    model.config.unpadded_vocab_size = model.config.vocab_size  # the lm_head's rows
    padded = model.config.vocab_size + 14
    sd = model.state_dict()
    state = dict(sd)
    for i in range(2):
        k = f"model.layers.{i}.mlp.down_proj.weight"
        state[k.replace("down_proj", "w2")] = _reverse(Interleave(dim=dim), state.pop(k), model)
    model.config.vocab_size = padded  # the padding rows the file holds
    state["lm_head.weight"] = _reverse(Inkling2UnpadVocab(), sd["lm_head.weight"], model)
    assert state["lm_head.weight"].shape[0] == padded
    save_file(state, tmp_path / "m.safetensors")
    convs = [
        WeightConverter("mlp.w2.weight", "mlp.down_proj.weight", operations=[Interleave(dim=dim)]),
        WeightConverter("lm_head.weight", "lm_head.weight", operations=[Inkling2UnpadVocab()]),
    ]
    fresh = llama()
    fresh.config.unpadded_vocab_size = fresh.config.vocab_size
    report = fastckpt.load_into(
        fresh,
        tmp_path / "m.safetensors",
        rules=HFConversions(fresh, convs, lambda k: state[k].shape),
    )
    assert report.missing == [] and report.unexpected == [] and report.partly_loaded == []
    same_bytes(sd, fresh.state_dict())


def test_an_interleave_then_a_chunk_reads_every_other_column(tmp_path):
    """Interleave(dim=1) then Chunk(dim=1), as transformers declares for a fused w13: q
    and k are the even and odd columns of the file's tensor (a stepped part each)."""
    from transformers.core_model_loading import Interleave

    torch.manual_seed(0)
    model = llama()
    sd = model.state_dict()
    state = {k: v for k, v in sd.items() if ".q_proj." not in k and ".k_proj." not in k}
    for i in range(2):
        p = f"model.layers.{i}.self_attn"
        qk = torch.cat([sd[f"{p}.q_proj.weight"], sd[f"{p}.k_proj.weight"]], dim=1)
        state[f"{p}.wqk"] = _reverse(Interleave(dim=1), qk, model)
    save_file(state, tmp_path / "m.safetensors")
    convs = [
        WeightConverter("self_attn.wqk", ["self_attn.q_proj.weight", "self_attn.k_proj.weight"],
                        operations=[Interleave(dim=1), Chunk(dim=1)]),
    ]  # fmt: skip
    fresh = llama()
    report = fastckpt.load_into(
        fresh, tmp_path / "m.safetensors",
        rules=HFConversions(fresh, convs, lambda k: state[k].shape),
    )  # fmt: skip
    assert report.missing == [] and report.unexpected == []
    same_bytes(sd, fresh.state_dict())
    # transformers' own ops give the same from the file's tensor
    wqk = {"x": [state["model.layers.0.self_attn.wqk"]]}
    got = Chunk(dim=1).convert(Interleave(dim=1).convert(wqk, ["x"], ["x"]), ["x"], ["q", "k"])
    assert torch.equal(got["q"], fresh.model.layers[0].self_attn.q_proj.weight.detach())


def test_a_split_across_the_pairs_of_an_interleave_is_refused_by_name(tmp_path):
    from transformers.core_model_loading import Interleave

    model = llama()
    sd = model.state_dict()
    state = {k: v for k, v in sd.items() if ".q_proj." not in k and ".k_proj." not in k}
    for i in range(2):
        p = f"model.layers.{i}.self_attn"
        state[f"{p}.wqk"] = torch.cat([sd[f"{p}.q_proj.weight"], sd[f"{p}.k_proj.weight"]], 1)
    save_file(state, tmp_path / "m.safetensors")
    convs = [  # interleaving back, then a split: each part takes from both halves
        WeightConverter("self_attn.wqk", ["self_attn.q_proj.weight", "self_attn.k_proj.weight"],
                        operations=[Interleave(dim=1, inverse=True), Chunk(dim=1)]),
    ]  # fmt: skip
    with pytest.raises(CheckpointError, match=r"Chunk .* a split across the pairs of an interl"):
        fastckpt.load_into(
            model, tmp_path / "m.safetensors",
            rules=HFConversions(model, convs, lambda k: state[k].shape),
        )  # fmt: skip


MARIAN = {"vocab_size": 40, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
          "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 8,
          "decoder_ffn_dim": 8, "max_position_embeddings": 12, "pad_token_id": 39,
          "decoder_start_token_id": 39}  # fmt: skip


def test_parameters_transformers_recomputes_are_initialised_even_on_meta(tmp_path):
    """Marian's sinusoidal tables: save_pretrained leaves them out, from_pretrained
    recomputes them; fastckpt fills them with the model's _init_weights and says so."""
    config = transformers.MarianConfig(**MARIAN)
    torch.manual_seed(0)
    transformers.MarianMTModel(config).save_pretrained(tmp_path)
    tables = ["model.decoder.embed_positions.weight", "model.encoder.embed_positions.weight"]
    assert not set(tables) & set(load_file(tmp_path / "model.safetensors"))
    reference = transformers.MarianMTModel.from_pretrained(tmp_path)
    torch.manual_seed(1)
    built = transformers.MarianMTModel(config)
    report = fastckpt.load_into(built, tmp_path)  # strict: nothing missing
    assert report.missing == [] and set(tables) <= set(report.initialised)
    same_bytes(reference.state_dict(), built.state_dict())
    with torch.device("meta"):
        on_meta = transformers.MarianMTModel(config).eval()
    report = fastckpt.load_into(on_meta, tmp_path, device="cpu")
    assert report.missing == [] and set(tables) <= set(report.initialised)
    assert not any(t.is_meta for t in on_meta.state_dict().values())
    same_bytes(reference.state_dict(), on_meta.state_dict())
    assert isinstance(on_meta.model.encoder.embed_positions.weight, torch.nn.Parameter)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        want = reference(input_ids=ids, decoder_input_ids=ids).logits
        got = on_meta(input_ids=ids, decoder_input_ids=ids).logits
    assert torch.equal(want.view(torch.uint8), got.view(torch.uint8))


def test_recomputed_parameters_on_meta_without_device_are_refused(tmp_path):
    config = transformers.MarianConfig(**MARIAN)
    transformers.MarianMTModel(config).save_pretrained(tmp_path)
    with torch.device("meta"):
        on_meta = transformers.MarianMTModel(config).eval()
    with pytest.raises(CheckpointError, match=r"embed_positions|device="):
        fastckpt.load_into(on_meta, tmp_path)


def test_recomputed_parameters_take_the_loads_dtype(tmp_path):
    config = transformers.MarianConfig(**MARIAN)
    transformers.MarianMTModel(config).save_pretrained(tmp_path)
    reference = transformers.MarianMTModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    with torch.device("meta"):
        on_meta = transformers.MarianMTModel(config)
    fastckpt.load_into(on_meta, tmp_path, device="cpu", dtype=torch.bfloat16)
    same_bytes(reference.state_dict(), on_meta.state_dict())


@pytest.mark.parametrize("inverse", [False, True])
def test_an_interleave_along_dim_1_is_a_strided_view(inverse):
    from transformers.core_model_loading import Interleave

    from fastckpt.planning.mapping import Assignment, Rope, Span
    from fastckpt.planning.views import dense_strides, source_view, target_view

    x = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    a = Assignment("t", "s", rope=Rope(1, to_halves=not inverse, dim=1))
    offset, shape, strides = source_view(0, x.shape, dense_strides(x.shape), a)
    out = torch.empty_like(x)
    target_view(out, a).copy_(torch.as_strided(x, shape, strides, offset))
    want = Interleave(dim=1, inverse=inverse).convert({"x": [x]}, ["x"], ["x"])["x"]
    assert torch.equal(out.view(torch.uint8), want.view(torch.uint8))
    stepped = Assignment("t", "s", part=Span(1, 1, 3, step=2))
    offset, shape, strides = source_view(0, x.shape, dense_strides(x.shape), stepped)
    assert torch.equal(torch.as_strided(x, shape, strides, offset), x[:, 1::2])


FIRST_PLAN_SCRIPT = """
import json, sys, torch, transformers
import fastckpt
from transformers import conversion_mapping
from fastckpt.planning.hf_mapping_table import LazyPattern
from tests.test_hf_conversions import MOE_MODELS
folder = sys.argv[1]
assert conversion_mapping._checkpoint_conversion_mapping_cache is None
fresh = MOE_MODELS["mixtral"]()
fastckpt.load_into(fresh, folder)
table = conversion_mapping._checkpoint_conversion_mapping_cache
patterns = [t.compiled_sources for ts in table.values() for t in ts]
compiled = [p for p in patterns if p._compiled is not None]
# from_pretrained, after fastckpt built the table, reads it as its own
reference = type(fresh).from_pretrained(folder)
same = all(torch.equal(v.view(torch.uint8), reference.state_dict()[k].view(torch.uint8))
           for k, v in fresh.state_dict().items())
print(json.dumps({"lazy": all(isinstance(p, LazyPattern) for p in patterns),
                  "total": len(patterns), "compiled": len(compiled), "same": same}))
"""


def test_the_first_plan_compiles_only_the_patterns_it_uses(tmp_path):
    # transformers' table holds every model type's transforms; a fresh process's
    # first MoE load compiles a few of them, and from_pretrained still loads the same.
    from tests.conftest import run_python

    torch.manual_seed(0)
    MOE_MODELS["mixtral"]().save_pretrained(tmp_path)  # builds the table: here, not there
    r = run_python(FIRST_PLAN_SCRIPT, tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["lazy"] and out["same"]
    assert out["total"] > 500 and 0 < out["compiled"] < out["total"] // 20


def test_a_lazy_pattern_is_the_compiled_pattern():
    import copy
    import re

    from fastckpt.planning.hf_mapping_table import LazyPattern

    lazy = LazyPattern(r"(?P<g0>experts\.(\d+)\.w1)")
    assert lazy._compiled is None
    assert copy.deepcopy([lazy])[0] is lazy  # shared, as re.Pattern is, and still lazy
    assert lazy._compiled is None
    key = "model.layers.0.experts.7.w1.weight"
    assert lazy.search(key).span() == re.search(lazy.pattern, key).span()
    assert lazy.groupindex == {"g0": 1}
    assert lazy.compiled is lazy._compiled is re.compile(lazy.pattern)
