"""Streaming safetensors writer: the header first, then one tensor at a time.

Peak memory is one tensor (as produced by the caller), never the whole file.
Used by ``convert`` and ``save``; the output reads back with the safetensors library.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastckpt.atomic import atomic_write
from fastckpt.dtypes import to_name


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def write_safetensors(
    path: str | os.PathLike,
    specs: Sequence[TensorSpec],
    produce: Callable[[TensorSpec], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``specs`` in order; ``produce(spec)`` returns each tensor (any device/layout,
    exactly ``spec.dtype`` and ``spec.shape``) when its turn comes. Atomic. Returns bytes written.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for s in specs:
        header[s.name] = {
            "dtype": to_name(s.dtype),
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-aligned, as the safetensors library writes
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            t = produce(s)
            if t.dtype != s.dtype or tuple(t.shape) != s.shape:
                raise ValueError(
                    f"{path}: tensor {s.name!r} came as {t.dtype} {tuple(t.shape)}, "
                    f"expected {s.dtype} {s.shape}"
                )
            if s.nbytes:
                data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                # numpy arrays are buffers; its stubs only say so from Python 3.12 (PEP 688)
                f.write(memoryview(data.numpy()))  # type: ignore[arg-type]
    return 8 + len(blob) + offset
