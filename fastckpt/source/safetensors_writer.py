"""Streaming safetensors writer: the header first, then the tensors' bytes in order.

The file's layout is sequential, so a tensor may come whole or as pieces of rows (its
first dimension) in order: peak memory is one piece as produced by the caller (``convert``
bounds them by ``max_host_bytes``), never the whole file nor a whole tensor.
Used by ``convert`` and ``save``; the output reads back with the safetensors library.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
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
    produce: Callable[[TensorSpec], torch.Tensor | Iterable[torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``specs`` in order; ``produce(spec)`` returns each tensor (any device/layout,
    exactly ``spec.dtype`` and ``spec.shape``) when its turn comes, or an iterable of its
    pieces: consecutive rows (``spec.dtype``, ``spec.shape[1:]``) that together hold all
    ``spec.shape[0]`` rows. Atomic. Returns bytes written.
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
            produced = produce(s)
            whole = isinstance(produced, torch.Tensor)
            rows = 0
            for t in [produced] if isinstance(produced, torch.Tensor) else produced:
                piece_ok = bool(s.shape) and tuple(t.shape[1:]) == s.shape[1:] and t.dim() > 0
                if t.dtype != s.dtype or not (tuple(t.shape) == s.shape if whole else piece_ok):
                    raise ValueError(
                        f"{path}: tensor {s.name!r} came as {t.dtype} {tuple(t.shape)}, "
                        f"expected {s.dtype} {s.shape}" + ("" if whole else " (rows of it)")
                    )
                rows += t.shape[0] if t.dim() else 1
                if t.numel():
                    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                    # numpy arrays are buffers; its stubs only say so from Python 3.12 (PEP 688)
                    f.write(memoryview(data.numpy()))  # type: ignore[arg-type]
            if not whole and rows != s.shape[0]:
                raise ValueError(
                    f"{path}: tensor {s.name!r} came as {rows} rows, expected {s.shape[0]}"
                )
    return 8 + len(blob) + offset
