"""The default benchmark checkpoints: written once into a cache folder, reused afterwards.

- ``bert-large``: a BERT-large-shaped fp32 state dict (24 layers x 1024 hidden,
  50k vocab: 1.4 GB, 391 tensors);
- ``many-small``: 30,720 fp32 tensors of 64x32 (40 layers x 256 experts x 3, 250 MB).

``--size small`` scales both down to tens of MB so tests and ``make demo`` stay fast.
Each is written as ``model.safetensors`` and as a torch zip ``model.pt`` (same tensors).

``--memory`` loads one 5.4 GB file (``MEMORY_SIZES``) with fastckpt alone.

``--casts`` adds loads whose file dtype differs from the model's (``CAST_SIZES``):
40 tensors of 1024x1024 (10 of 512x512 at ``small``) saved as bf16, fp16, fp32
and fp8 (e4m3fn, e5m2), loaded into fp32 / bf16 models, next to the same-dtype loads
of the same destination bytes. These are written as safetensors only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fastckpt.atomic import atomic_write
from fastckpt.source.safetensors_writer import TensorSpec, write_safetensors

Layout = list[tuple[str, tuple[int, ...]]]


def bert_layout(
    layers: int, hidden: int, vocab: int, intermediate: int, positions: int = 512
) -> Layout:
    """Names and shapes of a Hugging Face ``BertModel`` state dict."""
    h, i = hidden, intermediate
    out: Layout = [
        ("embeddings.word_embeddings.weight", (vocab, h)),
        ("embeddings.position_embeddings.weight", (positions, h)),
        ("embeddings.token_type_embeddings.weight", (2, h)),
        ("embeddings.LayerNorm.weight", (h,)),
        ("embeddings.LayerNorm.bias", (h,)),
    ]
    for n in range(layers):
        p = f"encoder.layer.{n}."
        for proj in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ):
            out += [(p + proj + ".weight", (h, h)), (p + proj + ".bias", (h,))]
        out += [
            (p + "attention.output.LayerNorm.weight", (h,)),
            (p + "attention.output.LayerNorm.bias", (h,)),
            (p + "intermediate.dense.weight", (i, h)),
            (p + "intermediate.dense.bias", (i,)),
            (p + "output.dense.weight", (h, i)),
            (p + "output.dense.bias", (h,)),
            (p + "output.LayerNorm.weight", (h,)),
            (p + "output.LayerNorm.bias", (h,)),
        ]
    out += [("pooler.dense.weight", (h, h)), ("pooler.dense.bias", (h,))]
    return out


def many_small_layout(layers: int, experts: int, shape: tuple[int, int] = (64, 32)) -> Layout:
    return [
        (f"layers.{n}.experts.{e}.{w}.weight", shape)
        for n in range(layers)
        for e in range(experts)
        for w in ("w1", "w2", "w3")
    ]


def bert_config(layers: int, hidden: int, vocab: int, intermediate: int) -> dict[str, object]:
    """The config.json of a ``BertModel`` with ``bert_layout``'s names and shapes, so the
    workload's folder is one ``transformers`` can load with ``from_pretrained``."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "intermediate_size": intermediate,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "torch_dtype": "float32",
    }


@dataclass(frozen=True)
class Workload:
    name: str
    layout: Layout
    file_dtype: str = "float32"  # torch dtype name the tensors are saved as
    model_dtype: str | None = None  # the model's dtype when it differs: a cast load
    formats: tuple[str, ...] = ("safetensors", "torch")
    hf_config: dict[str, object] | None = None  # written as config.json beside the files
    fastckpt_only: bool = False  # a memory run: no peer, no ceiling

    @property
    def nbytes(self) -> int:
        itemsize = getattr(torch, self.file_dtype).itemsize
        return sum(itemsize * _numel(s) for _, s in self.layout)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


SIZES: dict[str, list[Workload]] = {
    "full": [
        Workload(
            "bert-large",
            bert_layout(24, 1024, 50_000, 4096),
            hf_config=bert_config(24, 1024, 50_000, 4096),
        ),
        Workload("many-small", many_small_layout(40, 256)),
    ],
    "small": [
        Workload(
            "bert-small",
            bert_layout(4, 256, 8_000, 1024),
            hf_config=bert_config(4, 256, 8_000, 1024),
        ),
        Workload("many-small", many_small_layout(4, 48)),
    ],
}


def _cast_workloads(count: int, side: int) -> list[Workload]:
    layout: Layout = [(f"layers.{n}.weight", (side, side)) for n in range(count)]
    casts = [
        ("cast-bf16-to-fp32", "bfloat16", "float32"),
        ("cast-fp16-to-fp32", "float16", "float32"),
        ("cast-fp32-to-bf16", "float32", "bfloat16"),
        ("cast-fp8-to-bf16", "float8_e4m3fn", "bfloat16"),
        ("cast-fp8e5m2-to-bf16", "float8_e5m2", "bfloat16"),
        ("same-fp32", "float32", None),  # the destination bytes of the fp32 models
        ("same-bf16", "bfloat16", None),  # ... and of the bf16 ones
    ]
    return [Workload(n, layout, f, m, ("safetensors",)) for n, f, m in casts]


CAST_SIZES: dict[str, list[Workload]] = {
    "full": _cast_workloads(40, 1024),
    "small": _cast_workloads(10, 512),
}


# ``--memory``: one file larger than the staging budget many times over, loaded by
# fastckpt alone, to show that its private memory stays flat in the file's size
# (full: 1,280 x 1024 x 1024 fp32, 5.4 GB; small: 64 x 256 x 1024, 67 MB).
MEMORY_SIZES: dict[str, list[Workload]] = {
    size: [
        Workload(
            name,
            [(f"layers.{n}.weight", (rows, 1024)) for n in range(count)],
            formats=("safetensors",),
            fastckpt_only=True,
        )
    ]
    for size, name, count, rows in (("full", "big-5g", 1280, 1024), ("small", "big-small", 64, 256))
}


def default_cache_dir() -> Path:
    if env := os.environ.get("FASTCKPT_BENCH_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastckpt" / "bench"


def _values(layout: Layout, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    for name, shape in layout:
        yield name, torch.randn(shape, generator=g).to(dtype)


def ensure_files(workload: Workload, cache: Path, size: str) -> dict[str, Path]:
    """``{"safetensors": path, "torch": path}`` for the workload (the formats it has),
    writing them if missing."""
    folder = cache / size / workload.name
    folder.mkdir(parents=True, exist_ok=True)
    st, pt = folder / "model.safetensors", folder / "model.pt"
    dtype = getattr(torch, workload.file_dtype)
    config = folder / "config.json"
    if workload.hf_config is not None and not config.is_file():
        with atomic_write(config) as f:
            f.write(json.dumps(workload.hf_config, indent=2).encode())
    if not st.is_file():
        values = _values(workload.layout, dtype)
        specs = [TensorSpec(n, dtype, s) for n, s in workload.layout]
        write_safetensors(st, specs, lambda spec: next(values)[1], {"format": "pt"})
    if "torch" not in workload.formats:
        return {"safetensors": st}
    if not pt.is_file():
        from safetensors.torch import load_file

        state = load_file(str(st))  # once per cache: generation may hold the whole dict
        with atomic_write(pt) as f:
            torch.save(state, f)
    return {"safetensors": st, "torch": pt}
