"""Convert any readable checkpoint to safetensors: ``fastckpt convert``.

The conversion streams each tensor in pieces of rows (its first dimension): a piece
is a zero-copy view of the mapped source (``Checkpoint.tensor``), or for a chunked
source (a DCP directory) assembled from the chunks holding those rows only
(``tensor_rows``), cut to its selected rows and cast if asked, then written by
``write_safetensors`` (header first, then the bytes in file order). Pieces are sized
so that what they allocate (assembled, gathered and cast rows) stays within
``max_host_bytes``: peak private memory is bounded by it, whatever a tensor's size
(a single row larger than the budget is still one piece). Sources whose ``tensor()``
is a copy (an unaligned tensor, a remote file) still copy that tensor whole.

Output layout:

- ``DST`` ending in ``.safetensors``: one file, written atomically
  (``fastckpt.atomic``). A ``max_shard_size`` that would split it is refused.
- any other ``DST``: a folder holding ``model.safetensors``, or
  ``model-00001-of-0000N.safetensors`` shards plus a standard
  ``model.safetensors.index.json`` when ``max_shard_size`` splits the tensors.
  When the source is a Hugging Face folder its other files (``config.json``,
  tokenizer files, ...) are copied too, so ``from_pretrained(DST)`` works.
  The folder is built under a temporary name beside ``DST`` (``.DST.*.partial``)
  and renamed into place at the end: all shards and the index appear together
  or not at all. An interrupted run leaves only that hidden temporary folder.

Tied or shared tensors (one storage under two names) are written once per name:
safetensors forbids shared storage, and writing each name keeps the file a
complete state dict for ``load_state_dict(strict=True)``; the cost is the
duplicate bytes. (transformers re-ties on load, so it accepts both layouts.)

``--dtype`` casts floating-point tensors of 2 bytes or more (fp16, bf16, fp32,
fp64); integer, bool and fp8 tensors keep their dtype. A rule's own ``dtype=``
wins over ``--dtype``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastckpt.atomic import atomic_folder, atomic_write
from fastckpt.errors import CheckpointError
from fastckpt.planning.load_plan import as_rules, match
from fastckpt.planning.mapping import Assignment, MappingPlan
from fastckpt.source.checkpoint import Checkpoint, PathLike
from fastckpt.source.checkpoint import open as open_checkpoint
from fastckpt.source.remote import remote_side_files
from fastckpt.source.safetensors_writer import TensorSpec, write_safetensors
from fastckpt.source.urls import is_url
from fastckpt.version import __version__

DTYPE_CHOICES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}
_CASTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files of a Hugging Face folder that are weights (not copied) rather than config/tokenizer.
_WEIGHT_SUFFIXES = (
    ".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".distcp",
)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2*10**9, '500MiB' -> 500*2**20, '1024' -> 1024 (as transformers reads them)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"cannot read size {text!r} (examples: 2GB, 500MB, 1GiB, 1048576)")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    binary = "i" in unit
    letter = unit[:1] if unit not in ("b", "") else ""
    scale = 1024 ** " kmgt".index(letter) if binary else _UNITS[letter]
    size = int(number * scale)
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


@dataclass
class ConvertReport:
    source: str
    destination: str
    files: list[str]  # written weight files (and index), relative to destination folder
    tensors: int
    total_bytes: int  # tensor bytes written
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (source, target)
    sliced: list[str] = field(default_factory=list)  # targets with a row selection
    cast: list[str] = field(default_factory=list)  # targets whose dtype changed
    ignored: list[str] = field(default_factory=list)  # source keys the rules skipped
    copied: list[str] = field(default_factory=list)  # non-weight files copied from a HF folder
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["renamed"] = [list(p) for p in self.renamed]
        return d


def rules_digest(rules: object, plan: MappingPlan) -> str:
    """sha256 of the rules text (file bytes, or the string), else of the resulting mapping."""
    if rules is None:
        return ""
    h = hashlib.sha256()
    if isinstance(rules, os.PathLike) or (isinstance(rules, str) and "\n" not in rules):
        p = Path(rules)  # type: ignore[arg-type]
        if p.is_file():
            h.update(p.read_bytes())
            return h.hexdigest()
    if isinstance(rules, str):
        h.update(rules.encode())
        return h.hexdigest()
    for a in plan.assignments:
        h.update(repr((a.target, a.source, a.rows, str(a.dtype))).encode())
    return h.hexdigest()


_rules_object = as_rules  # the one coercion of rules (fastckpt.planning.load_plan)


def build_plan(ckpt: Checkpoint, rules: object) -> MappingPlan:
    """Identity without rules; otherwise the rules' plan over the checkpoint's keys.

    There is no target model: every source a rule maps (or identity for the rest)
    becomes a target.
    """
    plan = match(ckpt.keys(), None, _rules_object(rules))
    seen: dict[str, str] = {}
    for a in plan.assignments:
        if a.target in seen:
            raise CheckpointError(
                f"{ckpt.path}: target {a.target!r} would come from both "
                f"{seen[a.target]!r} and {a.source!r}"
            )
        seen[a.target] = a.source
    return plan


def _spec(ckpt: Checkpoint, a: Assignment, cast_to: torch.dtype | None) -> TensorSpec:
    info = ckpt.info(a.source)
    shape = info.shape
    if a.rows is not None:
        if not shape:
            raise CheckpointError(f"{ckpt.path}: rows selected from 0-d tensor {a.source!r}")
        if a.rows.index is not None:
            bad = [i for i in a.rows.index if not 0 <= i < shape[0]]
            if bad:
                raise CheckpointError(
                    f"{ckpt.path}: row index {bad[0]} out of range for {a.source!r} "
                    f"with {shape[0]} rows"
                )
        shape = a.rows.shape(shape)
    dtype = info.dtype
    if a.dtype is not None:
        dtype = a.dtype
    elif cast_to is not None and info.dtype in _CASTABLE:
        dtype = cast_to
    return TensorSpec(a.target, dtype, tuple(shape))


class Scratch:
    """Memory reused by the pieces of every tensor: the writer has written a piece before it
    asks for the next, so one buffer serves them all. (A fresh tensor per piece is freed
    too, but glibc's heap, its mmap threshold raised by the first such free, keeps them:
    +1.4 GB of RssAnon over a 2 GB conversion.)"""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.uint8)

    def __call__(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape) * dtype.itemsize
        if self.buf.numel() < n:
            self.buf = torch.empty(0, dtype=torch.uint8)  # dropped before the larger one
            self.buf = torch.empty(n, dtype=torch.uint8)
        return self.buf[:n].view(dtype).view(tuple(shape))


def _rows_of(
    ckpt: Checkpoint, name: str, scratch: Scratch | None
) -> Callable[[int, int], torch.Tensor]:
    """Source rows [i, j) of a tensor, each time they are asked for (assembled rows in
    ``scratch``: valid until the next call)."""
    if ckpt._has_chunks():  # assemble only the rows asked for from the chunks holding them
        return lambda i, j: ckpt.tensor_rows(name, i, j, scratch)  # type: ignore[attr-defined]
    whole = ckpt.tensor(name)  # a view of the mapped file: slicing it allocates nothing
    return lambda i, j: whole[i:j]


def read_tensor(
    ckpt: Checkpoint,
    a: Assignment,
    spec: TensorSpec,
    max_host_bytes: int = 256 << 20,
    scratch: tuple[Scratch, Scratch] | None = None,
) -> torch.Tensor | Iterator[torch.Tensor]:
    """The target tensor of one assignment: a 0-d tensor whole, any other in consecutive
    pieces of rows, each taking at most ``max_host_bytes`` (the source rows, gathered
    for a row index, and the cast; in ``scratch``: (source rows, cast), reused)."""
    if not spec.shape:
        t = ckpt.tensor(a.source)
        return t if t.dtype == spec.dtype else t.to(spec.dtype)
    return _pieces(ckpt, a, spec, max_host_bytes, scratch or (Scratch(), Scratch()))


def _pieces(
    ckpt: Checkpoint,
    a: Assignment,
    spec: TensorSpec,
    max_host_bytes: int,
    scratch: tuple[Scratch, Scratch],
) -> Iterator[torch.Tensor]:
    src_dtype = ckpt.info(a.source).dtype
    row = math.prod(spec.shape[1:])
    need = row * src_dtype.itemsize * (2 if a.rows is not None and a.rows.index else 1)
    if spec.dtype != src_dtype:
        need += row * spec.dtype.itemsize
    step = max(1, max_host_bytes // max(need, 1))
    gather = a.rows is not None and a.rows.index is not None
    # Runs gathered for a row index are alive together: each its own tensor.
    rows_of = _rows_of(ckpt, a.source, None if gather else scratch[0])
    first = a.rows.start if a.rows is not None and a.rows.index is None else 0
    n = spec.shape[0]
    cuts = set(range(0, n, step))
    if ckpt._has_chunks() and (a.rows is None or a.rows.index is None):
        # Cut where the chunks start too: a piece inside one chunk is read in place.
        breaks = ckpt.row_breaks(a.source)  # type: ignore[attr-defined]
        cuts |= {b - first for b in breaks if 0 < b - first < n}
    bounds = sorted(cuts) + [n]
    for lo, hi in itertools.pairwise(bounds):
        if gather:
            assert a.rows is not None and a.rows.index is not None
            runs = _runs(a.rows.index[lo:hi])
            parts = [rows_of(i, j) for i, j in runs]
            t = parts[0] if len(parts) == 1 else torch.cat(parts)
        else:
            t = rows_of(first + lo, first + hi)
        yield t if t.dtype == spec.dtype else scratch[1](t.shape, spec.dtype).copy_(t)


def _runs(index: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive row indexes as [start, stop) runs, in order."""
    runs: list[tuple[int, int]] = []
    for i in index:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int | None) -> list[list[TensorSpec]]:
    """Greedy in order, as transformers shards; a tensor over the limit gets a shard of its own."""
    if max_shard_size is None:
        return [list(specs)]
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for s in specs:
        if current and size + s.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(s)
        size += s.nbytes
    if current or not shards:
        shards.append(current)
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _is_weight(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json")


def _hf_side_files(src: Path) -> list[Path]:
    if not src.is_dir():
        return []
    return sorted(
        p
        for p in src.iterdir()
        if p.is_file() and not p.name.startswith(".") and not _is_weight(p.name)
    )


def convert(
    src: PathLike,
    dst: PathLike,
    rules: object = None,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int | None = None,
    key: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    max_host_bytes: str | int = 256 << 20,
) -> ConvertReport:
    """Write the checkpoint at ``src`` as safetensors at ``dst`` (see the module docstring);
    ``max_host_bytes`` bounds the memory a piece of a tensor allocates."""
    start = time.perf_counter()
    remote = is_url(src)  # a URL stays a string: Path() would fold s3:// into s3:/
    src_p: PathLike = src if remote else Path(src)
    dst_p = Path(dst)
    if isinstance(dtype, str) and dtype not in DTYPE_CHOICES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, not {dtype!r}")
    cast_to = DTYPE_CHOICES[dtype] if isinstance(dtype, str) else dtype
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    budget = parse_size(max_host_bytes)
    single_file = dst_p.name.endswith(".safetensors")
    if dst_p.exists() and not overwrite:
        if not (dst_p.is_dir() and not any(dst_p.iterdir())):
            raise ValueError(f"{dst_p}: already exists (pass --overwrite to replace it)")
    if single_file and dst_p.is_dir():
        raise ValueError(f"{dst_p}: is a folder, not a .safetensors file")

    with open_checkpoint(src_p, key=key) as ckpt:
        plan = build_plan(ckpt, rules)
        specs = [_spec(ckpt, a, cast_to) for a in plan.assignments]
        by_target = {a.target: a for a in plan.assignments}
        shards = plan_shards(specs, limit)
        if single_file and len(shards) > 1:
            raise ValueError(
                f"{dst_p}: --max-shard-size splits the output into {len(shards)} shards; "
                "give a folder as destination for sharded output"
            )
        metadata = {
            "format": "pt",
            "fastckpt_source": str(src) if remote else str(Path(src).resolve()),
            "fastckpt_version": __version__,
            "fastckpt_rules_sha256": rules_digest(rules, plan),
        }
        if cast_to is not None:
            metadata["fastckpt_dtype"] = str(cast_to).removeprefix("torch.")
        if ckpt.format == "safetensors":
            for k, v in ckpt.metadata.items():
                metadata.setdefault(str(k), str(v))

        total = sum(s.nbytes for s in specs)
        bar = _progress_bar(progress, total)

        scratch = (Scratch(), Scratch())

        def produce(spec: TensorSpec) -> torch.Tensor | Iterator[torch.Tensor]:
            t = read_tensor(ckpt, by_target[spec.name], spec, budget, scratch)
            if isinstance(t, torch.Tensor):
                if bar is not None:
                    bar[0].advance(bar[1], spec.nbytes)
                return t
            return _counted(t)

        def _counted(pieces: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
            for t in pieces:
                if bar is not None:
                    bar[0].advance(bar[1], t.numel() * t.element_size())
                yield t

        with bar[0] if bar is not None else contextlib.nullcontext():
            if single_file:
                write_safetensors(dst_p, specs, produce, metadata)
                files = [dst_p.name]
                copied: list[str] = []
            else:
                side: list[Path] | list[tuple[str, bytes]] = (
                    remote_side_files(str(src), _is_weight) if remote else _hf_side_files(Path(src))
                )
                if ckpt.format == "deepspeed":  # a ZeRO folder's files (latest) are no HF files
                    side = []
                files, copied = _write_folder(dst_p, shards, produce, metadata, total, side)
        source_dtypes = {a.target: ckpt.info(a.source).dtype for a in plan.assignments}

    report = ConvertReport(
        source=str(src),
        destination=str(dst_p),
        files=files,
        tensors=len(specs),
        total_bytes=total,
        renamed=[(a.source, a.target) for a in plan.assignments if a.source != a.target],
        sliced=[a.target for a in plan.assignments if a.rows is not None],
        cast=[s.name for s in specs if s.dtype != source_dtypes[s.name]],
        ignored=list(plan.ignored_sources),
        copied=copied,
    )
    report.seconds = time.perf_counter() - start
    return report


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(
        "converting",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    return bar, bar.add_task("convert", total=total)


def _write_folder(
    dst: Path,
    shards: list[list[TensorSpec]],
    produce,
    metadata: dict[str, str],
    total: int,
    side: list[Path] | list[tuple[str, bytes]],
) -> tuple[list[str], list[str]]:
    """``side``: the folder's other files, local paths or (name, bytes) of a remote one."""
    with atomic_folder(dst) as tmp:
        files: list[str] = []
        weight_map: dict[str, str] = {}
        n = len(shards)
        for i, shard in enumerate(shards):
            name = SINGLE_FILE if n == 1 else shard_name(i, n)
            write_safetensors(tmp / name, shard, produce, metadata)
            files.append(name)
            weight_map.update((s.name, name) for s in shard)
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with atomic_write(tmp / INDEX_FILE) as f:
                f.write(json.dumps(index, indent=2).encode() + b"\n")
            files.append(INDEX_FILE)
        copied: list[str] = []
        for item in side:
            if isinstance(item, Path):
                # copyfile, not copy2: the copy gets the umask's mode, as every file written here
                shutil.copyfile(item, tmp / item.name)
                copied.append(item.name)
            else:
                (tmp / item[0]).write_bytes(item[1])
                copied.append(item[0])
    return files, copied
