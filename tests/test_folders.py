"""Sharded checkpoints and Hugging Face model folders opened as folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastckpt
from fastckpt import _core
from fastckpt.errors import CheckpointError
from tests.conftest import assert_same_bytes, tiny_hf_config


def write_sharded_bin(
    folder: Path, shards: list[dict[str, torch.Tensor]], legacy: bool = False
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, folder / name, _use_new_zipfile_serialization=not legacy)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_sharded_pytorch_model_bin_folder(tmp_path, legacy):
    shards = [
        {"embed.weight": torch.randn(10, 4), "layers.0.w": torch.randn(4, 4)},
        {"layers.1.w": torch.randn(4, 4).t(), "head.bias": torch.arange(3, dtype=torch.int64)},
    ]
    folder = write_sharded_bin(tmp_path / "model", shards, legacy)
    with fastckpt.open(folder) as ckpt:
        assert len(ckpt.files) == 2
        expected = {k: v for shard in shards for k, v in shard.items()}
        assert sorted(ckpt.keys()) == sorted(expected)
        for name, ref in expected.items():
            assert_same_bytes(ckpt.tensor(name), ref)
            assert ckpt.info(name).file.endswith(
                "00001-of-00002.bin" if name in shards[0] else "00002-of-00002.bin"
            )
    # The index file itself opens the same way.
    with fastckpt.open(folder / "pytorch_model.bin.index.json") as ckpt:
        assert sorted(ckpt.keys()) == sorted(expected)


def test_sharded_folder_with_a_tensor_in_two_shards(tmp_path):
    folder = write_sharded_bin(
        tmp_path / "m", [{"w": torch.ones(2), "a": torch.ones(1)}, {"w": torch.zeros(2)}]
    )
    with pytest.raises(CheckpointError) as e:
        fastckpt.open(folder)
    assert str(e.value) == f"{folder}: tensor 'w' appears in more than one file"


def test_shards_are_indexed_in_parallel_and_errors_come_in_file_order(tmp_path):
    """Shards are read on several threads; the error reported is the first bad file's."""
    shards = [{f"layers.{i}.w": torch.full((3,), float(i))} for i in range(6)]
    folder = write_sharded_bin(tmp_path / "m", shards)
    files = sorted(str(f) for f in folder.glob("*.bin"))
    indexes = _core.start_open(files, 4).wait()
    assert [i.path for i in indexes] == files
    assert [i.names() for i in indexes] == [[f"layers.{i}.w"] for i in range(6)]
    for bad in (files[2], files[4]):
        Path(bad).write_bytes(b"PK\x03\x04 not a zip")
    pending = _core.start_open(files, 4)
    for _ in range(2):  # waiting again gives the same answer
        with pytest.raises(CheckpointError, match="^" + files[2]):
            pending.wait()
    with pytest.raises(CheckpointError, match="^" + files[2]):
        fastckpt.open(folder)
    # Nothing waited for: the threads are joined when the object goes.
    del pending
    _core.start_open(files, 2)


def test_folder_prefers_safetensors_then_bin(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save({"w": torch.ones(3)}, folder / "pytorch_model.bin")
    with fastckpt.open(folder) as ckpt:
        assert ckpt.format == "torch_zip"
    save_file({"w": torch.zeros(3)}, str(folder / "model.safetensors"))
    with fastckpt.open(folder) as ckpt:
        assert ckpt.format == "safetensors"
        assert_same_bytes(ckpt.tensor("w"), torch.zeros(3))


# -- transformers save_pretrained ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = tiny_hf_config(vocab_size=99, intermediate_size=24, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def save_pretrained_bin(model: torch.nn.Module, folder: Path, max_shard_size: str | None) -> None:
    """What ``save_pretrained(..., safe_serialization=False)`` wrote before transformers 5
    (which only writes safetensors): ``pytorch_model.bin``, or shards planned by
    huggingface_hub plus ``pytorch_model.bin.index.json``."""
    from huggingface_hub import split_torch_state_dict_into_shards

    folder.mkdir(parents=True)
    sd = model.state_dict()
    plan = split_torch_state_dict_into_shards(
        sd, filename_pattern="pytorch_model{suffix}.bin", max_shard_size=max_shard_size or "5GB"
    )
    for filename, names in plan.filename_to_tensors.items():
        torch.save({n: sd[n] for n in names}, folder / filename)
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("safe", "shard_size"),
    [(True, None), (False, None), (True, "20KB"), (False, "20KB")],
    ids=["safetensors", "bin", "safetensors-sharded", "bin-sharded"],
)
def test_save_pretrained_folder_matches_state_dict(tmp_path, tiny_bert, safe, shard_size):
    folder = tmp_path / "bert"
    if safe:
        kwargs = {"max_shard_size": shard_size} if shard_size else {}
        tiny_bert.save_pretrained(folder, **kwargs)
    else:
        save_pretrained_bin(tiny_bert, folder, shard_size)
    sd = tiny_bert.state_dict()
    with fastckpt.open(folder) as ckpt:
        assert ckpt.format == ("safetensors" if safe else "torch_zip")
        assert (len(ckpt.files) > 1) == (shard_size is not None)
        assert set(ckpt.keys()) == set(sd)
        for name, ref in sd.items():
            assert_same_bytes(ckpt.tensor(name), ref)


def test_names_are_found_in_the_index_without_listing_the_checkpoint(tmp_path):
    """load_into matches a model's names in the C++ index; the checkpoint's name dict
    is built only when something needs it, and agrees with the index."""
    shards = [
        {"embed.weight": torch.randn(10, 4), "layers.0.w": torch.randn(4, 4)},
        {"layers.1.w": torch.randn(4, 4), "": torch.ones(1)},
    ]
    folder = write_sharded_bin(tmp_path / "m", shards)
    files = sorted(str(f) for f in folder.glob("*.bin"))
    indexes = _core.start_open(files, 2).wait()
    asked = ["layers.1.w", "nope", "embed.weight", "", "layers.0.w", "layers.0", "\ud800"]
    assert _core.locate(indexes, asked) == [1 << 32, None, 0, (1 << 32) | 1, 1, None, None]
    with pytest.raises(TypeError, match="names must be strings"):
        _core.locate(indexes, ["embed.weight", 3])
    with fastckpt.open(folder) as ckpt:  # shards: the dict is built to refuse duplicates
        assert ckpt._find_all(asked) == [ckpt._entries.get(n) for n in asked]

    path = tmp_path / "one.safetensors"
    save_file({"a.w": torch.randn(3), "b": torch.randn(2, 2)}, str(path))
    ckpt = fastckpt.open(path)
    model = torch.nn.Module()
    model.register_buffer("b", torch.zeros(2, 2))
    model.a = torch.nn.Module()
    model.a.register_buffer("w", torch.zeros(3))
    report = fastckpt.load_into(model, ckpt)
    assert report.loaded == ["b", "a.w"] and report.unexpected == []
    assert ckpt._entries_map is None  # matched, counted and loaded without it
    assert len(ckpt) == 2 and ckpt._entries_map is None
    assert_same_bytes(model.a.w, ckpt.tensor("a.w"))  # tensor() builds it, as before
    assert ckpt._find_all(["a.w", "x"]) == [0, None]
