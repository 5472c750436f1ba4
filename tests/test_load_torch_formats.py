"""load_into from torch.save files (zip and legacy), against load_state_dict(torch.load(...))."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastckpt
from tests.test_load import (
    Transposed,
    Zoo,
    assert_models_equal,
    randomized_state,
    tiny_bert,
    tiny_roberta_mlm,
)

FORMATS = {
    "zip": {},
    "legacy": {"_use_new_zipfile_serialization": False},
}


def save(obj, path, fmt):
    torch.save(obj, path, **FORMATS[fmt])


@pytest.fixture(params=list(FORMATS))
def fmt(request):
    return request.param


def test_zoo(tmp_path, fmt):
    state = randomized_state(Zoo())
    save(state, tmp_path / "zoo.pt", fmt)
    ours, ref = Zoo(), Zoo()
    fastckpt.load_into(ours, tmp_path / "zoo.pt")
    ref.load_state_dict(torch.load(tmp_path / "zoo.pt", weights_only=True))
    assert_models_equal(ours, ref)


def test_bert_nested_under_model_key(tmp_path, fmt):
    model = tiny_bert()
    state = randomized_state(model, seed=1)
    save({"model": state, "epoch": 3}, tmp_path / "bert.pt", fmt)
    ours, ref = tiny_bert(), tiny_bert()
    report = fastckpt.load_into(ours, tmp_path / "bert.pt")
    ref.load_state_dict(torch.load(tmp_path / "bert.pt", weights_only=True)["model"])
    assert_models_equal(ours, ref)
    assert report.unexpected == []


def test_roberta_tied_storage_shared_in_file(tmp_path, fmt):
    """torch.save of a tied model stores one storage under both names."""
    model = tiny_roberta_mlm()
    for p in model.parameters():
        nn.init.normal_(p)
    save(model.state_dict(), tmp_path / "r.pt", fmt)
    ours, ref = tiny_roberta_mlm(), tiny_roberta_mlm()
    report = fastckpt.load_into(ours, tmp_path / "r.pt")
    ref.load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True))
    assert_models_equal(ours, ref)
    assert report.unexpected == []
    assert ("roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight") in report.tied


def test_strided_and_offset_views_in_the_file(tmp_path, fmt):
    """Views saved by torch.save (transposed, sliced, offset into a shared storage) are
    read through their strides by the core."""
    base = torch.randn(12, 10)
    state = {
        "w": base.t()[:5, :7],  # (5, 7), strides (1, 10)
        "b": base[2:6, 1::3],  # (4, 3), offset, column stride 3
    }
    save(state, tmp_path / "v.pt", fmt)
    ours, ref = Transposed(), Transposed()
    fastckpt.load_into(ours, tmp_path / "v.pt")
    ref.load_state_dict(torch.load(tmp_path / "v.pt", weights_only=True))
    assert_models_equal(ours, ref)


@pytest.mark.parametrize("dst", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_strided_source_with_cast(tmp_path, fmt, dst):
    base = torch.randn(9, 8)
    save({"x": base.t()}, tmp_path / "c.pt", fmt)

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.x = nn.Parameter(torch.zeros(8, 9, dtype=dst))

    model = One()
    fastckpt.load_into(model, tmp_path / "c.pt")
    assert torch.equal(model.x.detach().view(torch.int16), base.t().to(dst).view(torch.int16))


def test_sharded_torch_bin(tmp_path):
    import json

    state = randomized_state(Zoo(), seed=4)
    names = list(state)
    half = len(names) // 2
    torch.save({k: state[k] for k in names[:half]}, tmp_path / "pytorch_model-1.bin")
    torch.save({k: state[k] for k in names[half:]}, tmp_path / "pytorch_model-2.bin")
    weight_map = {
        k: ("pytorch_model-1.bin" if i < half else "pytorch_model-2.bin")
        for i, k in enumerate(names)
    }
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ours, ref = Zoo(), Zoo()
    fastckpt.load_into(ours, tmp_path)
    ref.load_state_dict(state)
    assert_models_equal(ours, ref)
