"""fastckpt.open on safetensors files, byte for byte against the safetensors library."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import fastckpt
from tests.conftest import ALL_DTYPES, assert_same_bytes, random_tensor


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype_matches_safetensors(tmp_path, dtype):
    tensors = {
        "matrix": random_tensor((5, 7), dtype, 1),
        "scalar": random_tensor((), dtype, 2),
        "empty": random_tensor((0, 3), dtype, 3),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with fastckpt.open(path) as ckpt, safe_open(str(path), "pt") as ref:
        assert sorted(ckpt.keys()) == sorted(ref.keys())
        assert ckpt.metadata == {"format": "pt"}
        for name in ref.keys():
            expected = ref.get_tensor(name)
            info = ckpt.info(name)
            assert info.shape == tuple(expected.shape)
            assert info.dtype == expected.dtype
            assert info.nbytes == expected.numel() * expected.element_size()
            assert_same_bytes(ckpt.tensor(name), expected)


def test_open_is_lazy_and_keys_behave_like_a_mapping(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.ones(2, 2), "b.bias": torch.zeros(3)}, str(path))
    with fastckpt.open(path) as ckpt:
        assert len(ckpt) == 2
        assert "a.weight" in ckpt and "nope" not in ckpt
        assert set(ckpt) == {"a.weight", "b.bias"}
        with pytest.raises(KeyError, match="no tensor named 'nope'"):
            ckpt.info("nope")


def test_tensor_outlives_checkpoint(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(10, dtype=torch.float32)}, str(path))
    ckpt = fastckpt.open(path)
    t = ckpt.tensor("w")
    ckpt.close()
    del ckpt
    assert torch.equal(t, torch.arange(10, dtype=torch.float32))


def _write_raw(path, header: dict | bytes, data: bytes = b"", header_len: int | None = None):
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + hb + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "header_len", "message"),
    [
        ({}, b"", 2**63, "header length 9223372036854775808 exceeds the limit"),
        ({}, b"", 1000, "safetensors header: bytes [8, +1000) lie outside the file"),
        (b"{not json", b"", None, "safetensors header is not valid JSON"),
        (b"[" * 100 + b"]" * 100, b"", None, "nests deeper than 8 levels"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16, None,
         "data_offsets span 16 bytes but F32 shape needs 8"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None,
         "lie past the end of the data"),
        ({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, b"\0" * 8, None,
         "element count overflows 64 bits"),
        ({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, None,
         "data section is 8 bytes but tensors cover 4"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None,
         "overlaps the tensor before it"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None,
         "hole in the data before tensor 'a'"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, None,
         "data section is 8 bytes but tensors cover 4"),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__ value for 'k' is not a string"),
    ],
    ids=["huge-len", "len-past-end", "bad-json", "deep-json", "size-mismatch", "past-end",
         "numel-overflow", "short-unknown", "overlap", "hole", "not-covering", "bad-metadata"],
)
def test_hostile_headers_raise_checkpoint_error(tmp_path, header, data, header_len, message):
    path = _write_raw(tmp_path / "bad.safetensors", header, data, header_len)
    with pytest.raises(fastckpt.CheckpointError) as exc:
        fastckpt.open(path)
    assert str(path) in str(exc.value)
    assert message in str(exc.value)


def test_truncation_at_every_cut_point(tmp_path):
    src = tmp_path / "good.safetensors"
    save_file({"a": torch.randn(4, 4), "b": torch.arange(6)}, str(src))
    blob = src.read_bytes()
    for cut in range(0, len(blob), 7):
        path = tmp_path / "cut.safetensors"
        path.write_bytes(blob[:cut])
        with pytest.raises(fastckpt.CheckpointError):
            fastckpt.open(path)


names = st.text(alphabet="abcdefghij._0123456789", min_size=1, max_size=12)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(names, st.tuples(shapes, st.sampled_from(ALL_DTYPES)), min_size=1, max_size=6)
)
def test_random_files_match_safetensors(tmp_path_factory, spec):
    path = tmp_path_factory.mktemp("h") / "r.safetensors"
    tensors = {n: random_tensor(s, d, i) for i, (n, (s, d)) in enumerate(spec.items())}
    save_file(tensors, str(path))
    with fastckpt.open(path) as ckpt:
        assert set(ckpt.keys()) == set(tensors)
        for n, t in tensors.items():
            assert_same_bytes(ckpt.tensor(n), t)
