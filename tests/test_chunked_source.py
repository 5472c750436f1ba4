"""The planner's side of chunked sources (a DCP tensor stored as chunks in several places):
a logical tensor whose ``Checkpoint._chunks`` lists stored pieces loads as one transfer per
chunk it needs, with renames, row cuts, casts and meta models, byte for byte.

The checkpoint here is a test double over a safetensors file that holds the chunks as
tensors of their own; the DCP reader gives the planner the same three answers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastckpt
from fastckpt.source.checkpoint import Checkpoint, Chunk
from tests.conftest import assert_same_bytes

VIRTUAL = 1 << 20  # a file position no real index has


class ChunkedCheckpoint(Checkpoint):
    """``layout``: logical name -> (global shape, [(stored name, offsets)])."""

    def __new__(cls, path, layout):
        return object.__new__(cls)

    def __init__(self, path, layout):
        super().__init__(path)
        stored = dict(self._handles())
        self._logical = {}
        entries = {}
        for k, (name, (shape, parts)) in enumerate(layout.items()):
            chunks = [
                Chunk(stored[s], tuple(at), tuple(self._handle_shape(stored[s]))) for s, at in parts
            ]
            self._logical[VIRTUAL << 32 | k] = (tuple(shape), chunks, stored[parts[0][0]])
            entries[name] = VIRTUAL << 32 | k
        self._entries_map = entries

    def _has_chunks(self):
        return True

    def _chunks(self, handle):
        return self._logical[handle][1] if handle in self._logical else None

    def _handle_shape(self, handle):
        if handle in self._logical:
            return self._logical[handle][0]
        return super()._handle_shape(handle)

    def _handle_view(self, handle):
        if handle not in self._logical:
            return super()._handle_view(handle)
        shape, _, first = self._logical[handle]
        strides, step = [], 1
        for n in reversed(shape):
            strides.insert(0, step)
            step *= n
        return super()._handle_view(first)[0], shape, tuple(strides), 0

    def _handle_file(self, handle):
        return str(self.path)


def full_values():
    gen = torch.Generator().manual_seed(0)
    return {"weight": torch.randn(8, 6, generator=gen), "bias": torch.randn(8, generator=gen)}


def write_chunks(folder):
    """A weight [8, 6] and a bias [8] stored as chunks that meet no shard's boundary; returns
    the full tensors."""
    full = full_values()
    save_file(
        {
            "weight@0": full["weight"][:3].clone(),
            "weight@1": full["weight"][3:, :4].clone(),
            "weight@2": full["weight"][3:, 4:].clone(),
            "bias@0": full["bias"][:5].clone(),
            "bias@1": full["bias"][5:].clone(),
        },
        folder / "chunks.safetensors",
    )
    return full


def open_chunks(folder):
    layout = {
        "weight": ((8, 6), [("weight@0", (0, 0)), ("weight@1", (3, 0)), ("weight@2", (3, 4))]),
        "bias": ((8,), [("bias@0", (0,)), ("bias@1", (5,))]),
    }
    return ChunkedCheckpoint(folder / "chunks.safetensors", layout)


@pytest.fixture
def chunked(tmp_path):
    full = write_chunks(tmp_path)
    return open_chunks(tmp_path), full


def test_a_chunked_tensor_loads_whole(chunked):
    ckpt, full = chunked
    model = nn.Linear(6, 8)
    report = fastckpt.load_into(model, ckpt)
    assert sorted(report.loaded) == ["bias", "weight"]
    assert report.bytes == (8 * 6 + 8) * 4
    assert_same_bytes(model.weight.detach(), full["weight"])
    assert_same_bytes(model.bias.detach(), full["bias"])


def test_renames_row_cuts_and_casts_apply_chunk_by_chunk(chunked):
    ckpt, full = chunked
    model = nn.Sequential(nn.Linear(6, 4)).to(torch.bfloat16)
    rules = "weight -> 0.weight rows[2:6]\nbias -> 0.bias rows[2:6]"
    report = fastckpt.load_into(model, ckpt, rules)
    assert sorted(report.renamed) == [("bias", "0.bias"), ("weight", "0.weight")]
    assert_same_bytes(model[0].weight.detach(), full["weight"][2:6].to(torch.bfloat16))
    assert_same_bytes(model[0].bias.detach(), full["bias"][2:6].to(torch.bfloat16))
    # rows 2:6 meet every chunk; each is read only where the cut needs it
    assert report.bytes == (4 * 6 + 4) * 4


def test_a_meta_model_is_allocated_and_filled(chunked):
    ckpt, full = chunked
    with torch.device("meta"):
        model = nn.Linear(6, 8)
    fastckpt.load_into(model, ckpt, device="cpu")
    assert_same_bytes(model.weight.detach(), full["weight"])


def test_a_shape_mismatch_is_reported_not_written(chunked):
    ckpt, _ = chunked
    model = nn.Linear(6, 7)
    before = model.weight.detach().clone()
    with pytest.raises(fastckpt.StrictLoadError, match=r"weight\s+\[8, 6\] vs \[7, 6\]"):
        fastckpt.load_into(model, ckpt)
    assert_same_bytes(model.weight.detach(), before)


def test_listed_rows_of_a_chunked_tensor_are_refused_by_name(chunked, tmp_path):
    ckpt, _ = chunked
    (tmp_path / "rows.txt").write_text("0\n5\n")
    rules = f"weight -> weight rows[@{tmp_path / 'rows.txt'}]\nbias -> bias rows[0:2]"
    model = nn.Linear(6, 2)
    before = model.weight.detach().clone()
    with pytest.raises(fastckpt.CheckpointError, match="'weight', which is stored in 3 chunks"):
        fastckpt.load_into(model, ckpt, rules)
    assert_same_bytes(model.weight.detach(), before)
