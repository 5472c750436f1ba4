"""Mapping between the core's dtype names (safetensors spelling) and torch dtypes."""

from __future__ import annotations

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    "C128": torch.complex128,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C32": torch.complex32,
    "BITS8": torch.bits8,
    "BITS16": torch.bits16,
    "BITS1x8": torch.bits1x8,
    "BITS2x4": torch.bits2x4,
    "BITS4x2": torch.bits4x2,
}
# Newer than the oldest torch fastckpt supports (2.4): named where torch has them.
for _name, _attr in (("F8_E8M0", "float8_e8m0fnu"), ("F4_X2", "float4_e2m1fn_x2")):
    if hasattr(torch, _attr):
        TORCH_DTYPES[_name] = getattr(torch, _attr)

DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def to_torch(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def to_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"fastckpt has no name for dtype {dtype}") from None


def short_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: what tables print."""
    return str(dtype).removeprefix("torch.")
