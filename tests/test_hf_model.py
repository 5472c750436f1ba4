"""transformers models after the large-model recipes: to_empty(), dtype=, FSDP2 on meta.

Their non-persistent buffers come from the model's own _init_weights, as
from_pretrained gives them; a broken tie is named with its fix; a model whose
initialisation does not fill a buffer, or writes anything else, is refused.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastckpt
from tests.conftest import (
    assert_same_bytes,
    hf_folder,
    hf_logits,
    tiny_hf_config,
)
from tests.rank_pool import run_ranks

transformers = pytest.importorskip("transformers")
hf_init = pytest.importorskip("transformers.initialization")

def test_to_empty_llama_gets_its_rotary_buffers_back(tmp_path):
    """to_empty() leaves inv_freq as whatever the allocator had: before this, the model
    ran, with logits off by 2e-4."""
    cfg = tiny_hf_config("LlamaConfig", num_key_value_heads=2)
    folder = hf_folder(tmp_path, "LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2)
    ref = transformers.LlamaForCausalLM.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    rotary = model.model.rotary_emb
    rotary.inv_freq.fill_(float("nan"))  # the garbage made visible
    rotary.original_inv_freq.fill_(float("nan"))
    report = fastckpt.load_into(model, folder)
    assert sorted(report.initialised) == [
        "model.rotary_emb.inv_freq",
        "model.rotary_emb.original_inv_freq",
    ]
    assert_same_bytes(rotary.inv_freq, ref.model.rotary_emb.inv_freq)
    assert_same_bytes(hf_logits(model), hf_logits(ref))


def test_to_empty_bert_names_the_broken_ties_then_loads_after_tie_weights(tmp_path):
    cfg = tiny_hf_config("BertConfig")
    folder = hf_folder(tmp_path, "BertForPreTraining", "BertConfig")
    ref = transformers.BertForPreTraining.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.BertForPreTraining(cfg)
    model.to_empty(device="cpu")
    with pytest.raises(fastckpt.StrictLoadError) as info:
        fastckpt.load_into(model, folder)
    msg = str(info.value)
    assert "call model.tie_weights() before loading" in msg, msg
    assert "cls.predictions.decoder.weight -> bert.embeddings.word_embeddings.weight" in msg
    model.tie_weights()
    report = fastckpt.load_into(model, folder)
    assert report.missing == []
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert_same_bytes(model.bert.embeddings.position_ids, ref.bert.embeddings.position_ids)
    assert_same_bytes(hf_logits(model), hf_logits(ref))


def test_dtype_keeps_the_buffers_dtype_as_from_pretrained_does(tmp_path):
    cfg = tiny_hf_config("LlamaConfig", num_key_value_heads=2)
    folder = hf_folder(tmp_path, "LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2)
    ref = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    fastckpt.load_into(model, folder, device="cpu", dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert_same_bytes(model.model.rotary_emb.inv_freq, ref.model.rotary_emb.inv_freq)
    assert_same_bytes(hf_logits(model), hf_logits(ref))


# -- models whose _init_weights does not do what from_pretrained relies on ---------------


class _Config(transformers.PretrainedConfig):
    model_type = "fastckpt-tiny"


class _Tiny(transformers.PreTrainedModel):
    config_class = _Config

    def __init__(self, config: _Config) -> None:
        super().__init__(config)
        self.proj = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self:
            hf_init.constant_(self.scale, 2.0)


class _Forgets(_Tiny):
    def _init_weights(self, module: nn.Module) -> None:
        pass


class _Clobbers(_Tiny):
    def _init_weights(self, module: nn.Module) -> None:
        if module is self:
            self.scale.fill_(2.0)
            self.proj.weight.mul_(0.0)  # not through transformers' guarded init


@pytest.fixture
def tiny_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {
        "proj.weight": torch.randn(4, 4, generator=g),
        "proj.bias": torch.randn(4, generator=g),
    }
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    return path, state


def test_a_model_whose_init_fills_the_buffer_loads_with_other_tensors_guarded(tiny_file):
    path, state = tiny_file
    with torch.device("meta"):
        model = _Tiny(_Config())
    report = fastckpt.load_into(model, path, device="cpu")
    assert report.initialised == ["scale"]
    assert torch.equal(model.scale, torch.full((4,), 2.0))
    assert_same_bytes(model.proj.weight, state["proj.weight"])
    # the guard flags fastckpt set are gone again
    assert not hasattr(model.proj.weight, "_is_hf_initialized")


def test_a_model_whose_init_leaves_a_buffer_unfilled_is_refused(tiny_file):
    path, _ = tiny_file
    with torch.device("meta"):
        model = _Forgets(_Config())
    with pytest.raises(fastckpt.CheckpointError) as info:
        fastckpt.load_into(model, path, device="cpu")
    msg = str(info.value)
    assert "_init_weights gives no values" in msg and "scale" in msg and "nothing was loaded" in msg
    assert str(path) in msg
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def test_an_init_that_writes_other_tensors_writes_only_stand_ins(tiny_file):
    """An init that ignores transformers' guard (a plain in-place op on another tensor)
    runs with every other tensor swapped for a meta stand-in: the model keeps the file's
    values, as from_pretrained's (which initialises before it loads) does."""
    path, state = tiny_file
    model = _Clobbers(_Config())
    report = fastckpt.load_into(model, path)
    assert report.initialised == ["scale"]
    assert torch.equal(model.scale, torch.full((4,), 2.0))
    assert_same_bytes(model.proj.weight, state["proj.weight"])
    assert not model.proj.weight.is_meta


def test_fsdp2_llama_built_on_meta_and_to_empty_runs_like_from_pretrained(tmp_path):
    # Two ranks of the shared pool (tests/rank_pool.py) run tests/fsdp_worker.py's scenario.
    hf_folder(tmp_path, "LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2)
    got = run_ranks(2, tmp_path, ["llama_meta_to_empty"], "tests.fsdp_worker")
    for rank, r in enumerate(got):
        r = r["llama_meta_to_empty"]
        assert r["ok"], f"rank {rank}: {r.get('error')}\n{r.get('trace', '')}"
        assert r["initialised"] == 2 and r["same"] is True, (rank, r)
