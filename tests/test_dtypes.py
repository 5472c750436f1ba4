"""Every dtype torch saves, read back exactly; every floating cast equal to Tensor.to().

The cast checks run every input of the 8- and 16-bit formats (all 256 / 65536
bit patterns), and for fp32 / fp64 random bit patterns plus values at and next
to every bf16 / fp16 / fp8 rounding tie, overflow edge and special value,
through every kernel set this CPU runs (AVX-512, AVX2, portable), plain and
streaming, from aligned and misaligned starts. Results must match byte for
byte, NaNs included: fastckpt writes the NaN patterns of torch's vector kernels
(copy/cast.h). A torch running its scalar kernels (ATEN_CPU_CAPABILITY=default)
writes other NaN patterns, so there NaN only has to stay NaN.
"""

from __future__ import annotations

import functools
import json
import struct
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastckpt
from fastckpt import _core
from fastckpt.dtypes import DTYPE_NAMES
from tests.conftest import assert_same_bytes

FP8 = [
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2fnuz,
    torch.float8_e8m0fnu,
]
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64, *FP8]
FLOAT_PAIRS = [(s, d) for s in FLOATS for d in FLOATS if s != d]
KERNEL_SETS = ["avx512", "avx2", "portable"]
TORCH_VECTOR_NANS = torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def _name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


@functools.cache
def cast_inputs(dtype: torch.dtype) -> torch.Tensor:
    """Every bit pattern of an 8/16-bit type; random bits plus rounding edges for fp32/fp64."""
    if dtype.itemsize == 1:
        return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    if dtype.itemsize == 2:
        return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    g = torch.Generator().manual_seed(0)
    if dtype == torch.float32:
        rand = torch.randint(-(2**31), 2**31, (1 << 16,), generator=g, dtype=torch.int64)
        # Every bf16 value with low bits at, below and above each narrower format's
        # half-ulp (bf16: 0x8000, fp16: 0x1000, e4m3: 0x80000, e5m2: 0x100000).
        b = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        b = b.float().view(torch.int32).long()
        offsets = [0, 0x7FFF, 0x8000, 0x8001, 0xFFF, 0x1000, 0x1001, 0x3000]
        offsets += [0x7FFFF, 0x80000, 0x80001, 0xFFFFF, 0x100000, 0x100001, 0x400000]
        edges = torch.cat([b + o for o in offsets])
        bits = torch.cat([rand, edges]).to(torch.int32).view(torch.float32)
        specials = torch.tensor(
            [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 448, 464, 470, 480, 57344,
             61440, 65504, 65520, 65536, 2.0**-127, 2.0**-149, 3e38]
        )
        return torch.cat([bits, specials, -specials])
    f = cast_inputs(torch.float32)[::2].double().view(torch.int64)
    rand = torch.randint(-(2**63), 2**63 - 1, (1 << 16,), generator=g, dtype=torch.int64)
    # fp64 values just off fp32 values and off fp32's own rounding ties (2^28 below an fp32 ulp).
    near = [f, f + 1, f - 1, f + (1 << 28), f + (1 << 28) + 1, f + (1 << 28) - 1]
    return torch.cat([rand, *near]).view(torch.float64)


def fastckpt_cast(
    x: torch.Tensor, dst: torch.dtype, kernel: str = "best", streaming: bool = False
) -> torch.Tensor:
    raw = _core._testing.cast(
        x.view(torch.uint8).numpy().tobytes(), DTYPE_NAMES[x.dtype], DTYPE_NAMES[dst],
        kernel=kernel, streaming=streaming,
    )
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dst)


def cast_mismatches(
    src: torch.dtype,
    dst: torch.dtype,
    kernel: str = "best",
    streaming: bool = False,
    start: int = 0,
) -> int:
    """Elements where fastckpt's kernel and Tensor.to() differ in bytes (in NaN-ness
    only, for NaNs, where torch runs its scalar kernels)."""
    x = cast_inputs(src)[start:]
    # torch converts the last n % 16 elements in a scalar tail that writes some
    # NaNs differently from its vector body (fp16 -> fp32: 0x7fffffff; fp64 ->
    # bf16: 0x7fc0): padded to a multiple of 64, every element is in the body.
    padded = torch.cat([x, x[: -len(x) % 64]])
    expected, got = padded.to(dst)[: len(x)], fastckpt_cast(x, dst, kernel, streaming)
    e_bytes = expected.view(torch.uint8).reshape(len(x), -1)
    g_bytes = got.view(torch.uint8).reshape(len(x), -1)
    differ = (e_bytes != g_bytes).any(1)
    if not TORCH_VECTOR_NANS:
        e_nan, g_nan = torch.isnan(expected.float()), torch.isnan(got.float())
        differ = (differ & ~(e_nan & g_nan)) | (e_nan != g_nan)
    return int(differ.sum())


def kernel_set(name: str) -> str:
    if name not in _core._testing.cast_kernel_sets():
        pytest.skip(f"this CPU cannot run the {name} cast kernels")
    return name


@pytest.mark.parametrize("kernel", KERNEL_SETS)
@pytest.mark.parametrize("src,dst", FLOAT_PAIRS, ids=_name)
def test_cast_kernel_matches_tensor_to(src, dst, kernel):
    kernel = kernel_set(kernel)
    assert cast_mismatches(src, dst, kernel) == 0
    assert cast_mismatches(src, dst, kernel, streaming=True) == 0
    # An odd count: the kernels' scalar tails run.
    assert cast_mismatches(src, dst, kernel, streaming=True, start=49) == 0


def test_unknown_or_missing_kernel_sets_are_refused():
    with pytest.raises(ValueError, match="unknown cast kernel set 'sse9'"):
        _core._testing.cast(b"\0\0\0\0", "F32", "BF16", kernel="sse9")
    for name in set(KERNEL_SETS) - set(_core._testing.cast_kernel_sets()):
        with pytest.raises(ValueError, match=f"cannot run the '{name}' cast kernels"):
            _core._testing.cast(b"\0\0\0\0", "F32", "BF16", kernel=name)


def test_loads_use_the_best_kernel_set():
    sets = _core._testing.cast_kernel_sets()
    assert sets[-1] == "portable"
    best = {"avx512": "avx512", "avx2": "avx2+f16c", "portable": "portable"}[sets[0]]
    assert _core._testing.cast_kernels() == best


def test_fp8_outputs_match_torch_including_nan_codes():
    # fp8 has one or two NaN codes and torch's are deterministic: all bytes must match.
    for src in (torch.float32, torch.bfloat16, torch.float16):
        x = cast_inputs(src)
        for dst in FP8:
            assert_same_bytes(fastckpt_cast(x, dst), x.to(dst))


def test_kernel_sets_can_be_capped():
    # A way out should a vector kernel misbehave on some CPU: the environment
    # variable, read once per process.
    code = "from fastckpt import _core; print(_core._testing.cast_kernels())"
    sets = _core._testing.cast_kernel_sets()
    avx2 = "avx2+f16c" if "avx2" in sets else "portable"
    for cap, expected in [("portable", "portable"), ("avx2", avx2)]:
        env = {"FASTCKPT_CAST_KERNELS": cap, "PATH": "/usr/bin:/bin"}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected


@pytest.mark.parametrize(
    "src,dst",
    [(a, b) for a in (torch.complex32, torch.complex64, torch.complex128)
     for b in (torch.complex32, torch.complex64, torch.complex128) if a != b],
    ids=_name,
)
def test_complex_casts_match_tensor_to(src, dst):
    half = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    parts = {
        torch.complex32: half,
        torch.complex64: cast_inputs(torch.float32)[: 1 << 16],
        torch.complex128: cast_inputs(torch.float64)[: 1 << 16],
    }[src]
    with warnings.catch_warnings():  # "ComplexHalf support is experimental"
        warnings.simplefilter("ignore")
        x = torch.complex(parts, parts.flip(0))
        expected = torch.view_as_real(x.to(dst)).flatten()
    got = fastckpt_cast(x, dst)
    got = got.view(expected.dtype)
    nan = torch.isnan(expected.float())
    assert torch.equal(torch.isnan(got.float()), nan)
    assert_same_bytes(got[~nan], expected[~nan])


# -- files of every dtype ---------------------------------------------------------------


def every_dtype_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (6, 8), generator=g, dtype=torch.int32).to(torch.uint8)
    out = {}
    for dtype in (
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.bfloat16,
        torch.float32, torch.float64, torch.complex64, torch.complex128, *FP8,
        torch.float4_e2m1fn_x2, torch.complex32, torch.bits8, torch.bits16,
        torch.bits1x8, torch.bits2x4, torch.bits4x2,
    ):
        if dtype == torch.bool:
            out[_name(dtype)] = raw > 127
        else:
            # Each its own storage: torch.save refuses one storage viewed as two types.
            own = raw.clone() if dtype.itemsize <= 8 else raw.repeat(1, 2)
            out[_name(dtype)] = own.view(dtype)
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_files_of_every_dtype_read_exactly(tmp_path, fmt):
    state = every_dtype_state()
    path = tmp_path / "all.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(state, path, _use_new_zipfile_serialization=fmt == "zip")
        # torch 2.13's own torch.load cannot read the legacy file back (its
        # UntypedStorage records have no dtype); the zip one it can.
        loaded = torch.load(path) if fmt == "zip" else state
    ckpt = fastckpt.open(path)
    assert sorted(ckpt.keys()) == sorted(state)
    assert ckpt.unloadable() == {}
    for name, ref in loaded.items():
        got = ckpt.tensor(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert torch.equal(_bytes(got), _bytes(ref)), name


def test_complex32_is_complex32_not_float16(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = torch.randn(5).half(), torch.randn(5).half()
        c = torch.complex(a, b)
        torch.save({"c": c}, tmp_path / "c.pt")
    got = fastckpt.open(tmp_path / "c.pt").tensor("c")
    assert got.dtype == torch.complex32 and got.shape == (5,)
    parts = torch.view_as_real(got).view(torch.int16)
    assert torch.equal(parts, torch.stack([a, b], 1).view(torch.int16))


def test_safetensors_files_of_the_new_dtypes_read_exactly(tmp_path):
    state = {k: v for k, v in every_dtype_state().items() if k in {
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
        "float4_e2m1fn_x2", "uint16", "float16"}}
    save_file(state, str(tmp_path / "m.safetensors"))
    ckpt = fastckpt.open(tmp_path / "m.safetensors")
    for name, ref in state.items():
        got = ckpt.tensor(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert torch.equal(_bytes(got), _bytes(ref)), name
    header = json.loads((tmp_path / "m.safetensors").read_bytes()[8:][: struct.unpack(
        "<Q", (tmp_path / "m.safetensors").read_bytes()[:8])[0]])
    # safetensors counts F4 values, not their pairs: the header's shape is twice torch's.
    assert header["float4_e2m1fn_x2"]["dtype"] == "F4"
    assert header["float4_e2m1fn_x2"]["shape"] == [6, 16]


# -- one tensor fastckpt cannot represent never hides the rest ---------------------------


def _raw_safetensors(path, entries: dict, data: bytes):
    hb = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def test_safetensors_with_a_dtype_fastckpt_does_not_know_stays_readable(tmp_path):
    good = torch.arange(4, dtype=torch.float32)
    path = tmp_path / "m.safetensors"
    _raw_safetensors(
        path,
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "s": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [16, 19]},
            "odd": {"dtype": "F4", "shape": [3], "data_offsets": [19, 21]},
        },
        good.numpy().tobytes() + b"\x01\x02\x03\x04\x05",
    )
    ckpt = fastckpt.open(path)
    assert ckpt.keys() == ["a"]
    assert torch.equal(ckpt.tensor("a"), good)
    assert ckpt.unloadable() == {
        "s": "a tensor of dtype 'F6_E2M3', which fastckpt does not know",
        "odd": "an F4 tensor whose last dimension is odd (torch packs F4 values in pairs)",
    }
    with pytest.raises(fastckpt.CheckpointError) as err:
        ckpt.tensor("s")
    assert str(err.value) == (
        f"{path}: tensor 's' is present but not loadable: a tensor of dtype 'F6_E2M3', "
        "which fastckpt does not know"
    )
    with pytest.raises(fastckpt.CheckpointError, match="'odd' is present but not loadable"):
        ckpt.info("odd")
    with pytest.raises(KeyError):
        ckpt.tensor("nothing")


def unloadable_objects() -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "q": torch.quantize_per_tensor(torch.randn(4), 0.1, 3, torch.quint8),
            "qc": torch.quantize_per_channel(
                torch.randn(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([1, 2]), 0, torch.qint8
            ),
            "coo": torch.randn(3, 3).to_sparse(),
            "csr": torch.randn(3, 3).to_sparse_csr(),
            "nested": torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
            "array": torch.randn(3).numpy(),
        }


UNLOADABLE_WHAT = {
    "q": "a quint8 quantized tensor (per_tensor_affine)",
    "qc": "a qint8 quantized tensor (per_channel_affine)",
    "coo": "a sparse COO tensor",
    "csr": "a sparse CSR tensor",
    "nested": "a nested tensor",
    "array": "a numpy array",
}


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_file_with_unloadable_tensors_keeps_the_rest(tmp_path, fmt):
    w = torch.randn(3, 4)
    state = {"model": {"w": w, **unloadable_objects()}, "step": 3}
    path = tmp_path / "m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(state, path, _use_new_zipfile_serialization=fmt == "zip")
    ckpt = fastckpt.open(path)
    assert ckpt.keys() == ["w"]  # the pick still finds "model"
    assert_same_bytes(ckpt.tensor("w"), w)
    assert ckpt.unloadable() == UNLOADABLE_WHAT
    assert fastckpt.open(path, key="").unloadable() == {
        f"model.{k}": v for k, v in UNLOADABLE_WHAT.items()
    }
    for name, what in UNLOADABLE_WHAT.items():
        with pytest.raises(fastckpt.CheckpointError) as err:
            ckpt.tensor(name)
        assert str(err.value) == f"{path}: tensor {name!r} is present but not loadable: {what}"
    assert ckpt.metadata["step"] == 3

    model = nn.Module()
    model.register_buffer("w", torch.zeros(3, 4))
    fastckpt.load_into(model, path, strict=False)
    assert_same_bytes(model.w, w)


# -- loads with casts -----------------------------------------------------------------------


class One(nn.Module):
    def __init__(self, shape, dtype):
        super().__init__()
        self.register_buffer("x", torch.zeros(shape, dtype=dtype))


@pytest.mark.parametrize(
    "src,dst",
    [(f, d) for f in FP8 for d in (torch.bfloat16, torch.float32, torch.float16)]
    + [(d, f) for f in FP8[:2] for d in (torch.float32, torch.bfloat16)],
    ids=_name,
)
def test_fp8_checkpoints_load_into_wider_models_and_back(tmp_path, src, dst):
    values = cast_inputs(src) if src.itemsize == 1 else cast_inputs(src)[: 1 << 14]
    values = values.repeat(5000 // len(values) + 1) if len(values) < 5000 else values
    save_file({"x": values}, str(tmp_path / "f.safetensors"))
    model = One(values.shape, dst)
    report = fastckpt.load_into(model, tmp_path / "f.safetensors")
    assert report.cast == [("x", _name(src), _name(dst))]
    expected = values.to(dst)
    nan = torch.isnan(expected.float())
    assert torch.equal(torch.isnan(model.x.float()), nan)
    assert_same_bytes(model.x[~nan], expected[~nan])


def test_rule_dtype_fp8_e4m3_casts_as_documented(tmp_path):
    w = torch.randn(64, 64) * 100
    save_file({"w": w}, str(tmp_path / "w.safetensors"))
    model = One((64, 64), torch.float32)
    fastckpt.load_into(model, tmp_path / "w.safetensors", rules="w -> x dtype=fp8_e4m3")
    assert_same_bytes(model.x, w.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize(
    "src,dst",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
     (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
     (torch.float8_e4m3fn, torch.bfloat16), (torch.float8_e5m2fnuz, torch.bfloat16),
     (torch.float8_e8m0fnu, torch.float32)],
    ids=_name,
)
@pytest.mark.parametrize("offset", [0, 3])
def test_large_casts_into_aligned_and_unaligned_destinations(tmp_path, src, dst, offset):
    # Destinations of 1 MiB and more are written with non-temporal stores, which
    # need 32-byte alignment: a destination starting `offset` elements into a
    # buffer exercises the scalar head before the aligned part.
    values = cast_inputs(src)[: 1 << 16].repeat(10 if src.itemsize > 1 else 4000)
    save_file({"x": values}, str(tmp_path / "big.safetensors"))
    model = nn.Module()
    backing = torch.zeros(len(values) + offset, dtype=dst)
    model.register_buffer("x", backing[offset:])
    fastckpt.load_into(model, tmp_path / "big.safetensors")
    expected = values.to(dst)
    nan = torch.isnan(expected.float())
    assert torch.equal(torch.isnan(model.x.float()), nan)
    assert_same_bytes(model.x[~nan], expected[~nan])
    assert not backing[:offset].any()
