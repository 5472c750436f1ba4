"""load_into on safetensors files: bit-identical to load_state_dict, casts, strict mode,
tied and meta parameters, row selections, GIL release, truncated files."""

from __future__ import annotations

import json
import math
import os
import threading
import time
import warnings
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastckpt
import fastckpt.load.execute as load_module
from fastckpt import _core
from fastckpt.planning.mapping import Assignment, MappingPlan, RowSelection
from tests.conftest import assert_same_bytes, empty_weights, tf_names, tiny_hf_config


class Zoo(nn.Module):
    """Parameters, persistent and non-persistent buffers, an int64 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)


def randomized_state(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            out[k] = torch.randn(v.shape, generator=g).to(v.dtype)
        else:
            out[k] = torch.randint(0, 1000, v.shape, generator=g).to(v.dtype)
    return out


def assert_models_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert_same_bytes(sa[k], sb[k])


# Odd sizes (99, 37) so no two tensors share a shape by accident.
_ODD = {"vocab_size": 99, "hidden_size": 32, "intermediate_size": 37, "max_position_embeddings": 64}


def tiny_bert():
    from transformers import BertModel

    torch.manual_seed(0)
    return BertModel(tiny_hf_config("BertConfig", **_ODD))


def tiny_roberta_mlm():
    from transformers import RobertaForMaskedLM

    torch.manual_seed(0)
    return RobertaForMaskedLM(tiny_hf_config("RobertaConfig", **_ODD))


# -- plain loads, bit for bit against load_state_dict ---------------------------------------


def test_module_zoo_matches_load_state_dict(tmp_path):
    state = randomized_state(Zoo())
    path = tmp_path / "zoo.safetensors"
    save_file(state, str(path))
    ours, ref = Zoo(), Zoo()
    report = fastckpt.load_into(ours, path)
    ref.load_state_dict(state)
    assert_models_equal(ours, ref)
    assert sorted(report.loaded) == sorted(state)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.bytes == sum(t.numel() * t.element_size() for t in state.values())
    assert report.missing_keys == report.missing and report.unexpected_keys == report.unexpected


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_bert_model_matches_load_state_dict(tmp_path, threads):
    state = randomized_state(tiny_bert(), seed=3)
    path = tmp_path / "bert.safetensors"
    save_file(state, str(path))
    ours, ref = tiny_bert(), tiny_bert()
    fastckpt.load_into(ours, path, threads=threads, max_host_bytes=1 << 20)
    ref.load_state_dict(state)
    assert_models_equal(ours, ref)


def test_roberta_tied_head_written_once_and_not_unexpected(tmp_path):
    model = tiny_roberta_mlm()
    state = {k: v.clone() for k, v in randomized_state(model, seed=4).items()}
    # The file holds both tied names (as torch.save would), with the same values.
    state["lm_head.decoder.weight"] = state["roberta.embeddings.word_embeddings.weight"].clone()
    state["lm_head.decoder.bias"] = state["lm_head.bias"].clone()
    path = tmp_path / "roberta.safetensors"
    save_file(state, str(path))
    ours, ref = tiny_roberta_mlm(), tiny_roberta_mlm()
    report = fastckpt.load_into(ours, path)
    ref.load_state_dict(state)
    assert_models_equal(ours, ref)
    assert ours.lm_head.decoder.weight is ours.roberta.embeddings.word_embeddings.weight
    assert report.unexpected == []
    assert ("roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight") in report.tied
    assert ("lm_head.bias", "lm_head.decoder.bias") in report.tied
    assert "roberta.embeddings.word_embeddings.weight" not in report.loaded


def test_ties_are_found_by_identity():
    ts = [torch.zeros(2) for _ in range(1000)]  # equal values, distinct tensors
    assert _core.all_distinct(ts) and _core.all_distinct([])
    assert not _core.all_distinct(ts + [ts[0]])
    assert not _core.all_distinct([ts[500], *ts[:501]])


def test_tied_alias_alone_fills_the_tensor(tmp_path):
    model = tiny_roberta_mlm()
    state = randomized_state(model, seed=5)
    del state["roberta.embeddings.word_embeddings.weight"]
    path = tmp_path / "alias.safetensors"
    save_file(state, str(path))
    report = fastckpt.load_into(model, path)
    assert report.missing == []
    assert_same_bytes(
        model.roberta.embeddings.word_embeddings.weight.detach(), state["lm_head.decoder.weight"]
    )


def test_sharded_checkpoint(tmp_path):
    state = randomized_state(Zoo(), seed=6)
    names = list(state)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    save_file({k: state[k] for k in first}, str(tmp_path / "a.safetensors"))
    save_file({k: state[k] for k in second}, str(tmp_path / "b.safetensors"))
    weight_map = dict.fromkeys(first, "a.safetensors") | dict.fromkeys(second, "b.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ours, ref = Zoo(), Zoo()
    fastckpt.load_into(ours, tmp_path)
    ref.load_state_dict(state)
    assert_models_equal(ours, ref)


# -- casts, bit for bit against Tensor.to ---------------------------------------------------


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """Random values plus NaN, infinities, signed zeros, subnormals, overflow and rounding ties."""
    g = torch.Generator().manual_seed(7)
    rand = torch.randn(4096, generator=g, dtype=torch.float64) * torch.logspace(
        -12, 6, 4096, dtype=torch.float64
    )
    f32_bits = (
        torch.tensor(
            [
                0x3F808000,
                0x3F818000,
                0x3F807FFF,
                0x3F808001,  # bf16 ties and near-ties
                0x3F801000,
                0x3F803000,
                0x3F800FFF,  # fp16 ties around 1.0
                0x00000001,
                0x00400000,
                0x807FFFFF,  # fp32 subnormals
                0x33800000,
                0x33C00000,
                0x38800000,
                0x387FC000,
                0x387FE000,  # fp16 subnormal range
                0x477FEFFF,
                0x477FF000,
                0x47800000,
                0x7F7FFFFF,
            ],  # fp16 overflow edge, fp32 max
            dtype=torch.int64,
        )
        .to(torch.int32)
        .view(torch.float32)
    )
    specials = torch.tensor(
        [0.0, -0.0, math.inf, -math.inf, 65504.0, 65520.0, 1e-45, 3.0e38], dtype=torch.float64
    )
    values = torch.cat([rand, f32_bits.double(), specials])
    return values.to(dtype)


FLOAT_PAIRS = [
    (s, d)
    for s in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    if s != d
]
INT_PAIRS = [
    (torch.int8, torch.int64),
    (torch.int16, torch.int32),
    (torch.int32, torch.int64),
    (torch.uint8, torch.int64),
    (torch.uint8, torch.int16),
]


class OneTensor(nn.Module):
    def __init__(self, shape, dtype):
        super().__init__()
        self.register_buffer("x", torch.zeros(shape, dtype=dtype))


def _name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


@pytest.mark.parametrize("src,dst", FLOAT_PAIRS, ids=lambda d: _name(d))
def test_float_casts_match_torch_bit_for_bit(tmp_path, src, dst):
    values = special_values(src)
    path = tmp_path / "v.safetensors"
    save_file({"x": values}, str(path))
    model = OneTensor(values.shape, dst)
    report = fastckpt.load_into(model, path, max_host_bytes=1 << 20)
    expected = values.to(dst)
    got = model.x
    assert report.cast == [("x", _name(src), _name(dst))]
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    assert_same_bytes(got[~nan], expected[~nan])


@pytest.mark.parametrize(
    "src,dst",
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.float64, torch.bfloat16),
    ],
    ids=lambda d: _name(d),
)
def test_nan_stays_nan(tmp_path, src, dst):
    nans = (
        torch.tensor(
            [0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0x7FA00000], dtype=torch.int64
        )
        .to(torch.int32)
        .view(torch.float32)
        .to(src)
    )
    save_file({"x": nans}, str(tmp_path / "n.safetensors"))
    model = OneTensor(nans.shape, dst)
    fastckpt.load_into(model, tmp_path / "n.safetensors")
    assert torch.isnan(model.x.float()).all()


@pytest.mark.parametrize("src,dst", INT_PAIRS, ids=lambda d: _name(d))
def test_integer_widening_matches_torch(tmp_path, src, dst):
    info = torch.iinfo(src)
    values = torch.cat(
        [
            torch.tensor([info.min, info.max, 0, -1 if info.min < 0 else 1]),
            torch.randint(info.min, info.max, (1000,)),
        ]
    ).to(src)
    save_file({"x": values}, str(tmp_path / "i.safetensors"))
    model = OneTensor(values.shape, dst)
    fastckpt.load_into(model, tmp_path / "i.safetensors")
    assert_same_bytes(model.x, values.to(dst))


def test_unsupported_cast_is_refused_before_writing(tmp_path):
    save_file({"x": torch.ones(4, dtype=torch.complex64)}, str(tmp_path / "c.safetensors"))
    model = OneTensor((4,), torch.float32)
    path = tmp_path / "c.safetensors"
    with pytest.raises(fastckpt.CheckpointError) as err:
        fastckpt.load_into(model, path)
    assert str(err.value) == (
        f"{path}: 'x' -> 'x': cannot cast C64 to F32 (supported: every floating type (F64, F32, "
        "F16, BF16, F8_*) to every other, complex widths among each other and widening integer "
        "casts)"
    )
    assert torch.equal(model.x, torch.zeros(4))


# -- strict mode: docs/STORIES.md story 2 -------------------------------------------------------


class MiniBert(nn.Module):
    """BERT's parameter names at a small size: bert.embeddings.*, bert.encoder.layer.N.*."""

    def __init__(self, layers: int = 2, hidden: int = 8) -> None:
        super().__init__()
        self.bert = nn.Module()
        self.bert.embeddings = nn.Module()
        self.bert.embeddings.word_embeddings = nn.Embedding(20, hidden)
        self.bert.embeddings.LayerNorm = nn.LayerNorm(hidden)
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.attention = nn.Linear(hidden, hidden)
            layer.LayerNorm = nn.LayerNorm(hidden)
            self.bert.encoder.layer.append(layer)


def test_strict_ddp_module_prefix_message(tmp_path):
    model = MiniBert()
    state = {"module." + k: v for k, v in randomized_state(model).items()}
    path = tmp_path / "ddp.safetensors"
    save_file(state, str(path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fastckpt.StrictLoadError) as err:
        fastckpt.load_into(model, path)
    assert (
        str(err.value)
        == f"""\
{path}: checkpoint does not match the model: 11 missing, 11 unexpected, 0 shape mismatches; nothing was loaded
  missing from the checkpoint (11):
    bert.embeddings.word_embeddings.weight          1
    bert.embeddings.LayerNorm.weight                1
    bert.embeddings.LayerNorm.bias                  1
    bert.encoder.layer.{{0..1}}.attention.weight      2
    bert.encoder.layer.{{0..1}}.attention.bias        2
    bert.encoder.layer.{{0..1}}.LayerNorm.weight      2
    bert.encoder.layer.{{0..1}}.LayerNorm.bias        2
  unexpected in the checkpoint (11):
    module.bert.embeddings.LayerNorm.bias                  1
    module.bert.embeddings.LayerNorm.weight                1
    module.bert.embeddings.word_embeddings.weight          1
    module.bert.encoder.layer.{{0..1}}.LayerNorm.bias        2
    module.bert.encoder.layer.{{0..1}}.LayerNorm.weight      2
    module.bert.encoder.layer.{{0..1}}.attention.bias        2
    module.bert.encoder.layer.{{0..1}}.attention.weight      2
  suggested rules (strip prefix 'module.': matches 11/11 keys):
    module.{{rest*}} -> {{rest*}}
  pass them as load_into(..., rules=...), or strict=False to load what matches"""  # noqa: E501
    )
    assert isinstance(err.value, fastckpt.CheckpointError)
    assert sorted(err.value.report.missing) == sorted(model.state_dict())
    for k, v in model.state_dict().items():
        assert_same_bytes(v, before[k])


def test_strict_tf_gamma_beta_message(tmp_path):
    model = MiniBert(layers=1)
    state = tf_names(randomized_state(model))
    path = tmp_path / "tf.safetensors"
    save_file(state, str(path))
    with pytest.raises(fastckpt.StrictLoadError) as err:
        fastckpt.load_into(model, path)
    assert (
        str(err.value)
        == f"""\
{path}: checkpoint does not match the model: 4 missing, 4 unexpected, 0 shape mismatches; nothing was loaded
  missing from the checkpoint (4):
    bert.embeddings.LayerNorm.weight           1
    bert.embeddings.LayerNorm.bias             1
    bert.encoder.layer.0.LayerNorm.weight      1
    bert.encoder.layer.0.LayerNorm.bias        1
  unexpected in the checkpoint (4):
    bert.embeddings.LayerNorm.beta            1
    bert.embeddings.LayerNorm.gamma           1
    bert.encoder.layer.0.LayerNorm.beta       1
    bert.encoder.layer.0.LayerNorm.gamma      1
  suggested rules (rename 'gamma' -> 'weight', 'beta' -> 'bias': matches 7/7 keys):
    {{p*}}.gamma -> {{p*}}.weight
    {{p*}}.beta -> {{p*}}.bias
  pass them as load_into(..., rules=...), or strict=False to load what matches"""  # noqa: E501
    )


def test_strict_ddp_and_gamma_beta_together_suggests_both(tmp_path):
    model = MiniBert(layers=1)
    state = tf_names(randomized_state(model), prefix="module.")
    save_file(state, str(tmp_path / "both.safetensors"))
    with pytest.raises(fastckpt.StrictLoadError) as err:
        fastckpt.load_into(model, tmp_path / "both.safetensors")
    text = str(err.value)
    assert (
        "  suggested rules (strip prefix 'module.' and rename 'gamma' -> 'weight', "
        "'beta' -> 'bias': matches 7/7 keys):\n"
        "    module.{p*}.gamma -> {p*}.weight\n"
        "    module.{p*}.beta -> {p*}.bias\n"
        "    module.{rest*} -> {rest*}\n"
    ) in text


def test_strict_message_stays_short_for_a_real_bert(tmp_path):
    model = tiny_bert()
    state = {"module." + k: v for k, v in randomized_state(model).items()}
    save_file(state, str(tmp_path / "ddp.safetensors"))
    with pytest.raises(fastckpt.StrictLoadError) as err:
        fastckpt.load_into(model, tmp_path / "ddp.safetensors")
    text = str(err.value)
    n = len(state)
    assert f"strip prefix 'module.': matches {n}/{n} keys" in text
    assert len(text.splitlines()) <= 30


def test_strict_refuses_shape_mismatch_before_modifying_anything(tmp_path):
    model = Zoo()
    state = randomized_state(model)
    state["embed.weight"] = torch.randn(12, 6)  # one row too many
    path = tmp_path / "mm.safetensors"
    save_file(state, str(path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fastckpt.StrictLoadError) as err:
        fastckpt.load_into(model, path)
    assert (
        "  shape mismatches (1): model name, checkpoint, model\n"
        "    embed.weight  [12, 6] vs [11, 6]"
        in str(err.value)
    )
    for k, v in model.state_dict().items():
        assert_same_bytes(v, before[k])


def test_non_strict_loads_matches_and_warns_once(tmp_path):
    model = Zoo()
    state = randomized_state(model)
    del state["body.2.weight"]
    del state["body.2.bias"]
    state["extra.weight"] = torch.ones(2)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fastckpt.load_into(model, path, strict=False)
    assert [type(w.message) for w in caught] == [fastckpt.UninitializedWarning]
    assert issubclass(fastckpt.UninitializedWarning, UserWarning)
    assert str(caught[0].message) == (
        f"{path}: 2 tensors of the model were not loaded and keep their previous (possibly random) "
        "values:\n    body.2.weight      1\n    body.2.bias        1"
    )
    assert report.missing == ["body.2.weight", "body.2.bias"]
    assert report.unexpected == ["extra.weight"]
    assert_same_bytes(model.embed.weight.detach(), state["embed.weight"])


def test_report_renders_and_serialises(tmp_path):
    model = Zoo()
    save_file(randomized_state(model), str(tmp_path / "z.safetensors"))
    report = fastckpt.load_into(model, tmp_path / "z.safetensors")
    text = str(report)
    assert text.startswith("LoadReport: 10 tensors, ")
    assert "loaded" in text
    d = report.to_dict()
    json.dumps(d)
    assert d["bytes"] == report.bytes and d["missing"] == [] and len(d["loaded"]) == 10


# -- destinations: non-contiguous, meta, device= ---------------------------------------------


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(7, 5).t())  # non-contiguous (5, 7) view
        self.b = nn.Parameter(torch.zeros(4, 6)[:, ::2])  # strided columns


@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16], ids=_name)
def test_non_contiguous_destination(tmp_path, src_dtype):
    state = {"w": torch.randn(5, 7).to(src_dtype), "b": torch.randn(4, 3).to(src_dtype)}
    save_file(state, str(tmp_path / "t.safetensors"))
    ours, ref = Transposed(), Transposed()
    assert not ours.w.is_contiguous() and not ours.b.is_contiguous()
    fastckpt.load_into(ours, tmp_path / "t.safetensors", max_host_bytes=1 << 20)
    ref.load_state_dict(state)
    assert_models_equal(ours, ref)
    assert not ours.w.is_contiguous()


@pytest.mark.parametrize("rank", [0, 1, 4, 5, 7])
def test_strided_views_of_any_rank_in_and_out(tmp_path, rank):
    # Shapes and strides up to 4 dims are kept in place in a copy task, more on
    # the heap: a permuted (non-contiguous) view in a torch file, loaded into a
    # permuted destination, lands as load_state_dict puts it, with a cast.
    shape = tuple(range(2, 2 + rank))
    perm = tuple(reversed(range(rank)))
    src = torch.randn(shape).permute(perm)
    torch.save({"x": src}, tmp_path / "v.pt")
    ours, ref = (OneTensor(shape, torch.bfloat16) for _ in range(2))
    for m in (ours, ref):
        m.x = torch.zeros(shape, dtype=torch.bfloat16).permute(perm)
    assert rank < 2 or not ours.x.is_contiguous()
    fastckpt.load_into(ours, tmp_path / "v.pt")
    ref.load_state_dict({"x": src})
    assert_models_equal(ours, ref)


def test_meta_model_is_allocated_on_device(tmp_path):
    state = randomized_state(tiny_roberta_mlm(), seed=9)
    state = {k: v.clone() for k, v in state.items()}
    path = tmp_path / "r.safetensors"
    save_file(state, str(path))
    with empty_weights():  # non-persistent buffers (position_ids) stay real
        model = tiny_roberta_mlm()
    model.lm_head.decoder.weight.requires_grad_(False)
    report = fastckpt.load_into(model, path, device="cpu")
    ref = tiny_roberta_mlm()
    ref.load_state_dict(state)
    assert_models_equal(model, ref)
    assert not any(p.is_meta for p in model.parameters())
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight
    assert isinstance(model.lm_head.decoder.weight, nn.Parameter)
    assert not model.roberta.embeddings.word_embeddings.weight.requires_grad
    assert report.missing == []


def test_meta_model_with_dtype(tmp_path):
    state = randomized_state(Zoo(), seed=2)
    save_file(state, str(tmp_path / "z.safetensors"))
    with empty_weights():
        model = Zoo()
    fastckpt.load_into(model, tmp_path / "z.safetensors", device="cpu", dtype=torch.bfloat16)
    assert model.body[0].weight.dtype == torch.bfloat16
    assert model.norm.num_batches_tracked.dtype == torch.int64
    assert_same_bytes(model.body[0].weight.detach(), state["body.0.weight"].to(torch.bfloat16))


def test_meta_model_without_device_is_refused(tmp_path):
    save_file(randomized_state(Zoo()), str(tmp_path / "z.safetensors"))
    with torch.device("meta"):
        model = Zoo()
    with pytest.raises(
        fastckpt.CheckpointError, match="'embed.weight' is on the meta device: pass device="
    ):
        fastckpt.load_into(model, tmp_path / "z.safetensors")


# -- row selection through a rules object -----------------------------------------------------


class RowRules:
    """Test double for a rules object: one renamed tensor with a row selection."""

    def __init__(self, rows: RowSelection, dtype: torch.dtype | None = None) -> None:
        self.rows = rows
        self.dtype = dtype

    def plan(self, source_keys, target_keys):
        return MappingPlan(
            assignments=[
                Assignment(
                    "emb.weight",
                    "big.weight",
                    "big.weight -> emb.weight rows[...]",
                    self.rows,
                    self.dtype,
                )
            ],
            ignored_sources=[k for k in source_keys if k != "big.weight"],
        )


class Emb(nn.Module):
    def __init__(self, rows: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.emb = nn.Embedding(rows, 16, dtype=dtype)


@pytest.mark.parametrize(
    "rows,expected_index",
    [
        (RowSelection(0, 40), list(range(40))),
        (RowSelection(7, 27), list(range(7, 27))),
        (
            RowSelection(index=(3, 4, 5, 0, 49, 10, 11, 12, 13, 2)),
            [3, 4, 5, 0, 49, 10, 11, 12, 13, 2],
        ),
    ],
    ids=["range-head", "range-middle", "index-list"],
)
@pytest.mark.parametrize("dst_dtype", [torch.float32, torch.bfloat16], ids=_name)
def test_row_selection(tmp_path, rows, expected_index, dst_dtype):
    big = torch.randn(50, 16)
    save_file({"big.weight": big, "other": torch.ones(1)}, str(tmp_path / "big.safetensors"))
    model = Emb(len(expected_index), dst_dtype)
    report = fastckpt.load_into(model, tmp_path / "big.safetensors", RowRules(rows))
    assert_same_bytes(model.emb.weight.detach(), big[expected_index].to(dst_dtype))
    assert report.sliced == ["emb.weight"]
    assert report.renamed == [("big.weight", "emb.weight")]
    assert report.rule_for == {"emb.weight": "big.weight -> emb.weight rows[...]"}
    assert report.ignored == ["other"]
    assert report.bytes == len(expected_index) * 16 * 4  # only the selected rows are read


def test_cast_through_a_rule_dtype(tmp_path):
    big = torch.randn(50, 16)
    save_file({"big.weight": big}, str(tmp_path / "big.safetensors"))
    model = Emb(50)
    fastckpt.load_into(
        model, tmp_path / "big.safetensors", RowRules(RowSelection(), torch.bfloat16)
    )
    assert_same_bytes(model.emb.weight.detach(), big.to(torch.bfloat16).float())


def test_row_index_out_of_range_is_refused(tmp_path):
    save_file({"big.weight": torch.randn(50, 16)}, str(tmp_path / "big.safetensors"))
    model = Emb(2)
    with pytest.raises(
        fastckpt.CheckpointError, match="row index 50 lies outside the source's 50 rows"
    ):
        fastckpt.load_into(
            model, tmp_path / "big.safetensors", RowRules(RowSelection(index=(1, 50)))
        )


# -- engine behaviour -----------------------------------------------------------------------


@pytest.mark.slow
def test_gil_is_released_while_copying(tmp_path, monkeypatch):
    n = 64 << 20  # 256 MB of fp32, cast to bf16 on one thread: long enough to observe
    save_file({"x": torch.ones(n)}, str(tmp_path / "big.safetensors"))
    model = OneTensor((n,), torch.bfloat16)
    window: list[float] = []
    original = load_module._run_jobs

    def timed(jobs, progress, label):
        window.append(time.perf_counter())
        original(jobs, progress, label)
        window.append(time.perf_counter())

    monkeypatch.setattr(load_module, "_run_jobs", timed)
    ticks: list[float] = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        fastckpt.load_into(model, tmp_path / "big.safetensors", threads=1)
    finally:
        stop.set()
        thread.join()
    start, end = window
    inside = [t for t in ticks if start < t < end]
    assert end - start > 0.02
    assert len(inside) >= 5, (len(inside), end - start)
    assert torch.equal(model.x, torch.ones(n, dtype=torch.bfloat16))


def test_destination_of_a_dtype_fastckpt_cannot_write_is_refused_by_name(tmp_path):
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, str(tmp_path / "m.safetensors"))
    model = nn.Module()
    model.register_buffer("a", torch.zeros(2))
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors
        warnings.simplefilter("ignore")
        model.register_buffer("b", torch.quantize_per_tensor(torch.zeros(2), 0.5, 0, torch.quint8))
    with pytest.raises(
        fastckpt.CheckpointError,
        match=r"^'b' has dtype torch.quint8, which fastckpt cannot load into$",
    ):
        fastckpt.load_into(model, tmp_path / "m.safetensors")
    assert torch.equal(model.a, torch.zeros(2))  # refused before anything was written


def test_bad_file_or_bad_model_fails_before_anything_is_written(tmp_path):
    # The file is indexed on a C++ thread while the model is walked: a bad file
    # still raises its CheckpointError, and nothing in the model changes.
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    model = OneTensor((2,), torch.float32)
    before = model.x.clone()
    with pytest.raises(fastckpt.CheckpointError, match="^" + str(path)):
        fastckpt.load_into(model, path)
    assert torch.equal(model.x, before)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        fastckpt.load_into(model, tmp_path / "absent.safetensors")
    save_file({"x": torch.ones(2)}, str(tmp_path / "ok.safetensors"))
    refusal = "load_into needs a torch.nn.Module to load into, not dict"
    with pytest.raises(TypeError, match=f"^{refusal}$"):
        not_a_module: Any = {"x": torch.zeros(2)}
        fastckpt.load_into(not_a_module, tmp_path / "ok.safetensors")


def test_file_truncated_after_open_gives_checkpoint_error(tmp_path):
    state = {"a": torch.randn(256, 256), "b": torch.randn(256, 256)}
    path = tmp_path / "t.safetensors"
    save_file(state, str(path))
    ckpt = fastckpt.open(path)
    os.truncate(path, os.path.getsize(path) - 4096)
    model = OneTensor((256, 256), torch.float32)
    model.register_buffer("a", torch.zeros(256, 256))
    model.register_buffer("b", torch.zeros(256, 256))
    del model._buffers["x"]
    with pytest.raises(
        fastckpt.CheckpointError,
        match=r"file ended at offset \d+ while reading; was it "
        r"truncated or rewritten during the load\? \(while copying 'b' -> 'b'\)",
    ):
        fastckpt.load_into(model, ckpt)


class Flat(nn.Module):
    """One buffer per name, any shapes and dtypes."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        super().__init__()
        for name, (shape, dtype) in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("writer", ["safetensors", "torch_zip", "torch_legacy"])
def test_runs_of_small_tensors_match_load_state_dict(tmp_path, writer):
    # Small tensors close together in the file are read in runs (one preadv for up
    # to 1024 iovecs or 4 MiB; the zip headers or legacy size fields between them
    # read into scratch): runs must break at casts, non-contiguous destinations,
    # empty tensors, views of one storage and the caps, and every byte still land
    # where load_state_dict puts it.
    g = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float16]
    state, shapes = {}, {}
    for i in range(2600):
        n = int(torch.randint(0, 700, (1,), generator=g))
        dtype = dtypes[i % 5] if i % 97 else torch.float32
        if i == 1500:
            n = 1 << 20  # one tensor bigger than a run's byte cap
        shape = (4, 50) if i == 777 else (n,)
        state[f"t{i:04d}"] = torch.randint(0, 100, shape, generator=g).to(dtype)
        cast = i % 211 == 0 and dtype.is_floating_point
        shapes[f"t{i:04d}"] = (shape, torch.bfloat16 if cast else dtype)
    if writer == "safetensors":
        path = tmp_path / "many.safetensors"
        save_file(state, str(path))
    else:
        # Views into one storage (torch files only): their bytes overlap a neighbour's.
        state["t0123_tail"] = state["t0123"][1:]
        shapes["t0123_tail"] = (tuple(state["t0123_tail"].shape), state["t0123"].dtype)
        state["t0124_same"] = state["t0124"]
        shapes["t0124_same"] = shapes["t0124"]
        path = tmp_path / "many.pt"
        torch.save(state, path, _use_new_zipfile_serialization=writer == "torch_zip")
    model = Flat(shapes)
    # A transposed (non-contiguous) destination in the middle of a run.
    model.t0777 = torch.zeros(50, 4, dtype=shapes["t0777"][1]).t()
    assert not model.t0777.is_contiguous()
    twin = Flat(shapes)
    fastckpt.load_into(model, path)
    twin.load_state_dict({k: v.to(shapes[k][1]) for k, v in state.items()})
    assert_models_equal(model, twin)


def test_large_reads_into_unaligned_destinations(tmp_path):
    # Reads of 1 MiB or more go through a bounce buffer and non-temporal stores:
    # odd sizes and destinations that do not start on a 16-byte boundary must
    # still get every byte, as must 8 MiB pieces of a bigger tensor.
    g = torch.Generator().manual_seed(5)
    state = {
        "odd": torch.randint(0, 256, ((1 << 20) + 13,), generator=g, dtype=torch.uint8),
        "big": torch.randn(5 << 20, generator=g),  # 20 MiB: three pieces
    }
    path = tmp_path / "large.safetensors"
    save_file(state, str(path))
    backing = torch.zeros((1 << 20) + 16 + 3, dtype=torch.uint8)
    model = nn.Module()
    model.register_buffer("odd", backing[3 : 3 + (1 << 20) + 13])  # 3 bytes off alignment
    model.register_buffer("big", torch.zeros(5 << 20))
    assert model.odd.data_ptr() % 16 != 0
    fastckpt.load_into(model, path)
    assert_same_bytes(model.odd, state["odd"])
    assert_same_bytes(model.big, state["big"])
    assert not backing[:3].any() and not backing[3 + (1 << 20) + 13 :].any()


def test_large_read_of_a_truncated_file_gives_checkpoint_error(tmp_path):
    state = {"w": torch.randn(1 << 20)}  # 4 MiB: a streamed read
    path = tmp_path / "t.safetensors"
    save_file(state, str(path))
    ckpt = fastckpt.open(path)
    os.truncate(path, os.path.getsize(path) - (1 << 20))
    model = nn.Module()
    model.register_buffer("w", torch.zeros(1 << 20))
    with pytest.raises(fastckpt.CheckpointError, match=r"file ended at offset \d+ .*'w' -> 'w'"):
        fastckpt.load_into(model, ckpt)


def test_staging_ring_through_the_device_path(tmp_path):
    """The device path (pinned ring + async copies) with host memory standing in for the device."""
    src = torch.randn(1000, 700)
    save_file(
        {"x": src, "y": src[:10].to(torch.float64).contiguous()}, str(tmp_path / "r.safetensors")
    )
    ckpt = fastckpt.open(tmp_path / "r.safetensors")
    fi, xi = ckpt._locate("x")
    _, yi = ckpt._locate("y")
    index = ckpt._indexes[fi]
    dst_same = torch.zeros(1000, 700)
    dst_cast = torch.zeros(400, 700, dtype=torch.bfloat16)
    dst_y = torch.zeros(10, 700, dtype=torch.float16)
    tasks = [
        (index, xi, None, None, dst_same.data_ptr(), "F32", (1000, 700), (700, 1), True, "x"),
        (
            index,
            xi,
            (100, 400),
            None,
            dst_cast.data_ptr(),
            "BF16",
            (400, 700),
            (700, 1),
            True,
            "x2",
        ),
        (index, yi, None, None, dst_y.data_ptr(), "F16", (10, 700), (700, 1), True, "y"),
    ]
    job = _core.CopyJob(tasks, 2, 1 << 20, "host_loopback")  # 128 KiB slots: the ring cycles
    job.run()
    assert job.bytes_done == job.total_bytes == src.numel() * 4 + 400 * 700 * 4 + 10 * 700 * 8
    assert_same_bytes(dst_same, src)
    assert_same_bytes(dst_cast, src[100:500].to(torch.bfloat16))
    assert_same_bytes(dst_y, src[:10].double().to(torch.float16))


def test_device_destination_must_be_contiguous(tmp_path):
    save_file({"x": torch.randn(4, 6)}, str(tmp_path / "r.safetensors"))
    ckpt = fastckpt.open(tmp_path / "r.safetensors")
    dst = torch.zeros(6, 4).t()
    task = (
        ckpt._indexes[0],
        0,
        None,
        None,
        dst.data_ptr(),
        "F32",
        (4, 6),
        (1, 4),
        True,
        "'x' -> 'x'",
    )
    with pytest.raises(
        fastckpt.CheckpointError, match="the destination on the device is not contiguous"
    ):
        _core.CopyJob([task], 1, 1 << 20, "host_loopback")


def test_progress_bar(tmp_path, capsys):
    state = randomized_state(Zoo())
    save_file(state, str(tmp_path / "z.safetensors"))
    model = Zoo()
    fastckpt.load_into(model, tmp_path / "z.safetensors", progress=True)
    assert_same_bytes(model.embed.weight.detach(), state["embed.weight"])


def test_same_device_reads_index_zero_as_an_index(monkeypatch):
    """cuda:0 is not "the current device" when the current device is 1 (no GPU needed)."""
    from fastckpt.load.execute import _same_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    cuda = torch.device
    assert not _same_device(cuda("cuda:0"), cuda("cuda:1"))
    assert _same_device(cuda("cuda"), cuda("cuda:1"))
    assert not _same_device(cuda("cuda"), cuda("cuda:0"))
    assert _same_device(cuda("cuda:0"), cuda("cuda:0"))
    assert not _same_device(cuda("cpu"), cuda("cuda:0"))


def test_vectored_read_across_zip_records_of_a_truncated_file(tmp_path):
    # A run over many zip records fails as a whole; read again record by record,
    # the error names the first tensor whose bytes are gone.
    state = {f"t{i:03d}": torch.full((256,), float(i)) for i in range(200)}
    path = tmp_path / "t.pt"
    torch.save(state, path)
    ckpt = fastckpt.open(path)
    cut = ckpt.info("t150").file_offset + 100
    os.truncate(path, cut)
    model = Flat(dict.fromkeys(state, ((256,), torch.float32)))
    with pytest.raises(
        fastckpt.CheckpointError,
        match=r"file ended at offset \d+ while reading; .*\(while copying 't150' -> 't150'\)",
    ):
        fastckpt.load_into(model, ckpt)
    assert_same_bytes(model.t149, state["t149"])  # the runs before the cut were read


class DenseAndSparse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, 2))
        sparse = torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,), check_invariants=True)
        self.register_buffer("s", sparse)


def test_sparse_tensor_the_file_lacks_does_not_stop_the_load(tmp_path):
    # Destinations are read before the index is ready; one torch cannot describe
    # (no data pointer) matters only when the file has a source for it.
    path = tmp_path / "w.safetensors"
    w = torch.randn(3, 2)
    save_file({"w": w}, str(path))
    model = DenseAndSparse()
    with pytest.warns(fastckpt.UninitializedWarning, match="1 tensors of the model"):
        report = fastckpt.load_into(model, path, strict=False)
    assert report.missing == ["s"] and report.loaded == ["w"]
    assert_same_bytes(model.w.detach(), w)
    assert model.s.is_sparse


def test_sparse_destination_with_a_source_is_refused_by_name(tmp_path):
    path = tmp_path / "ws.safetensors"
    save_file({"w": torch.randn(3, 2), "s": torch.ones(4)}, str(path))
    model = DenseAndSparse()
    with pytest.raises(fastckpt.CheckpointError) as info:
        fastckpt.load_into(model, path)
    assert str(info.value).startswith(
        f"{path}: the model's 's' is a torch.sparse_coo tensor and cannot be loaded into ("
    )
    assert str(info.value).endswith("); fastckpt writes dense (strided) tensors")
    assert torch.equal(model.w.detach(), torch.zeros(3, 2))  # nothing written
