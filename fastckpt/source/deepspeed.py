"""DeepSpeed ZeRO checkpoint folders as a source: the fp32 weights ``zero_to_fp32`` makes.

A folder saved by ``engine.save_checkpoint(DIR)``: ``DIR/latest`` names the tag
(``global_step<N>``); ``DIR/<tag>/`` holds ``mp_rank_00_model_states.pt`` (stage 1/2) or
``zero_pp_rank_<r>_mp_rank_00_model_states.pt`` per rank (stage 3), and
``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank. Either ``DIR`` or
``DIR/<tag>`` may be opened. All of them are ordinary ``torch.save`` files, read by the
core's torch zip reader and its restricted pickle VM: DeepSpeed's own objects in them
(``ZeroStageEnum``, ``LossScaler``, ``fragment_address``) become inert placeholders, and
nothing is imported or run.

What the tensors are, as DeepSpeed's ``zero_to_fp32`` (0.19) reconstructs them:

- trainable parameters live in the fp32 flat partitions of the optimizer files
  (``optimizer_state_dict.single_partition_of_fp32_groups`` for stage 1/2,
  ``optimizer_state_dict.fp32_flat_groups`` for stage 3), named and shaped by
  ``param_shapes`` (one ordered dict per param group) in the model states file;
- stage 1/2: each group's partitions, concatenated in rank order, hold that group's
  parameters one after the other in ``param_shapes`` order, then padding (both totals
  agree once rounded up to 2 * world size);
- stage 3: every parameter is split over the ranks in pieces of ceil(numel / world)
  elements (the last padded); a rank's groups, concatenated, hold its pieces of all
  parameters in ``param_shapes`` order (groups merged), and pieces * world must equal
  the partitions' total;
- frozen parameters: ``frozen_param_fragments`` of the model states file (stage 1/2,
  whole), or of each rank's model states file (stage 3, pieces as above);
- buffers: ``module.<name>`` of the (first) model states file for each of
  ``buffer_names``, stored whole. Their stored dtype is kept (``zero_to_fp32`` makes
  floating buffers fp32: ``convert --dtype float32`` or a fp32 model gives the same);
- tied parameters: ``shared_params`` maps a name to the parameter it shares, which
  then appears under both names.

A parameter is therefore a list of runs of flat partition records, never copied into
a whole state dict: each run is a box (or a few boxes) of the parameter, so the plan
sees a chunked source exactly like a DCP directory (``Checkpoint._chunks``): each
chunk is a contiguous range of a stored flat tensor (``Chunk.storage_offset``), and a
DTensor rank reads only the runs its shard needs.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch

import fastckpt._core as _core
from fastckpt.dtypes import TORCH_DTYPES
from fastckpt.errors import CheckpointError
from fastckpt.source.checkpoint import Chunk, TensorInfo
from fastckpt.source.chunked import LOGICAL, ChunkedCheckpoint, contiguous_strides

LATEST = "latest"
_MAX_TAG = 4096  # bytes of `latest` read: a tag is a folder name
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MODEL_Z3 = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_MODEL = "mp_rank_00_model_states.pt"


def is_deepspeed_dir(path: str | Path) -> bool:
    """A folder with ``latest``, with ``*_model_states.pt`` files, or with tag folders
    holding them (then refused for the missing ``latest`` when opened)."""
    p = Path(path)
    if not p.is_dir():
        return False
    return (
        (p / LATEST).is_file()
        or any(p.glob("*_model_states.pt"))
        or any(p.glob("*/*_model_states.pt"))
    )


def tag_folder(path: Path) -> Path:
    """The folder holding the ``*_states.pt`` files: ``path`` itself, or the tag that
    ``path/latest`` names."""
    if any(path.glob("*_model_states.pt")) or any(path.glob("*_optim_states.pt")):
        return path
    latest = path / LATEST
    if not latest.is_file():
        raise CheckpointError(missing_latest(str(latest)))
    with latest.open("rb") as f:
        raw = f.read(_MAX_TAG + 1)
    tag = tag_name(raw, str(latest))
    folder = path / tag
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: missing: {latest} names the tag {tag!r}")
    return folder


def missing_latest(latest: str) -> str:
    return (
        f"{latest}: missing: a DeepSpeed checkpoint folder names its tag (global_step<N>) "
        "in it; open the tag folder itself to pick one"
    )


def tag_name(raw: bytes, latest: str) -> str:
    """The tag ``latest`` (its first ``_MAX_TAG + 1`` bytes: ``raw``) names: a plain folder
    name, never a path that leaves the checkpoint folder."""
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        tag = ""
    if not tag or len(raw) > _MAX_TAG or "/" in tag or "\\" in tag or tag in (".", ".."):
        raise CheckpointError(f"{latest}: does not name a tag folder ({raw[:80]!r})")
    return tag


def is_states_file(name: str) -> bool:
    return name.endswith(("_model_states.pt", "_optim_states.pt"))


class ZeroFiles(Protocol):
    """How ``ZeroLayout`` reads a tag folder: local files (``LocalZeroFiles``) or objects
    under a URL (source.remote_deepspeed.RemoteZero)."""

    folder: Path  # the tag folder (named in messages; its name is the tag)

    def names(self) -> list[str]:
        """The names of the files directly in the tag folder."""
        ...

    def path_of(self, name: str) -> Path: ...

    def open(self, names: Sequence[str], exact_reads: bool) -> list[_core.FileIndex]:
        """The core's index of each file, in order."""
        ...


class LocalZeroFiles:
    """A ZeRO checkpoint folder on a filesystem (``path``: the folder or its tag folder)."""

    def __init__(self, path: Path):
        self.folder = tag_folder(path)

    def names(self) -> list[str]:
        return [f.name for f in self.folder.iterdir() if f.is_file()]

    def path_of(self, name: str) -> Path:
        return self.folder / name

    def open(self, names: Sequence[str], exact_reads: bool) -> list[_core.FileIndex]:
        paths = [str(self.folder / n) for n in names]
        return list(_core.start_open(paths, min(8, os.cpu_count() or 1), exact_reads).wait())


class Run(NamedTuple):
    """``length`` elements of a stored 1-d tensor (``handle``), from element ``start`` of it."""

    handle: int
    start: int
    length: int


class FlatParam(NamedTuple):
    """A parameter stored as runs of flat partitions, in order."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    runs: tuple[Run, ...]


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _int(v: Any) -> Any:
    """An int, or DeepSpeed's ZeroStageEnum (a placeholder with its value as argument)."""
    if isinstance(v, dict) and isinstance(v.get("args"), list) and len(v["args"]) == 1:
        v = v["args"][0]
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _shape(v: Any) -> tuple[int, ...] | None:
    if isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                   for d in v):  # fmt: skip
        return tuple(v)
    return None


class ZeroLayout:
    """What a ZeRO tag folder holds: every tensor of the fp32 state dict as runs of its
    files' stored tensors (see the module docstring)."""

    def __init__(
        self, path: Path, exact_reads: bool = False, files: ZeroFiles | None = None
    ) -> None:
        self._files: ZeroFiles = files if files is not None else LocalZeroFiles(path)
        self.folder = self._files.folder
        names = self._files.names()
        optim_names = sorted((n for n in names if n.endswith("_optim_states.pt")), key=_natural)
        optim = [self._files.path_of(n) for n in optim_names]
        if not optim:
            raise CheckpointError(f"{self.folder}: holds no *_optim_states.pt file")
        for f in optim:
            m = _OPTIM.match(f.name)
            if m is None or int(m.group(2)) != 0:
                raise CheckpointError(
                    f"{f}: not a data-parallel ZeRO optimizer file (model-parallel ranks "
                    "mp_rank_01.. and pipeline stages are not read)"
                )
        ranks = [int(_OPTIM.match(f.name).group(1)) for f in optim]  # type: ignore[union-attr]
        if ranks != list(range(len(optim))):
            raise CheckpointError(
                f"{self.folder}: optimizer files of ranks {ranks}, not 0..{len(optim) - 1}"
            )
        model_names = sorted((n for n in names if n.endswith("_model_states.pt")), key=_natural)
        model_files = [self._files.path_of(n) for n in model_names]
        if not model_files:
            raise CheckpointError(
                f"{self._files.path_of(_MODEL)}: missing: a ZeRO checkpoint keeps the parameter "
                "names and shapes in its model states file"
            )
        for f in model_files:
            if f.name != _MODEL and _MODEL_Z3.match(f.name) is None:
                raise CheckpointError(f"{f}: not a data-parallel DeepSpeed model states file")
        self.files = model_files + optim
        self.indexes: list[_core.FileIndex] = self._files.open(
            model_names + optim_names, exact_reads
        )
        self.world = len(optim)
        self.model_files = model_files
        first_optim = len(model_files)
        self.meta: list[dict[str, Any]] = []
        for f, index in zip(self.files, self.indexes, strict=True):
            m = json.loads(index.metadata_json)
            if not isinstance(m, dict):
                raise CheckpointError(f"{f}: holds a {type(m).__name__}, not a dict of states")
            self.meta.append(m)
        self._names = [dict(zip(ix.names(), range(len(ix)), strict=True)) for ix in self.indexes]
        model = self.meta[0]
        osd = self._dict(first_optim, "optimizer_state_dict")
        self.stage = _int(osd.get("zero_stage"))
        if self.stage not in (1, 2, 3):
            raise CheckpointError(
                f"{optim[0]}: 'zero_stage' is {osd.get('zero_stage')!r}, not a ZeRO stage 1-3"
            )
        count = osd.get("partition_count")
        counts = count if isinstance(count, list) else [count]
        world = max((c for c in map(_int, counts) if c is not None), default=None)
        if world != self.world:
            raise CheckpointError(
                f"{self.folder}: {optim[0].name} says {count!r} partitions but the folder "
                f"holds {self.world} *_optim_states.pt file(s) (a rank's file missing?)"
            )
        # Which model states files the stage reads (as zero_to_fp32): stage 1/2 one,
        # stage 3 one per rank, in rank order (frozen fragments are per rank).
        want = (
            [_MODEL] if self.stage <= 2
            else [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(self.world)]
        )  # fmt: skip
        if [f.name for f in model_files] != want:
            raise CheckpointError(
                f"{self.folder}: a ZeRO-{self.stage} checkpoint of {self.world} ranks holds "
                f"{', '.join(want)}; found {', '.join(f.name for f in model_files)}"
            )
        self.ds_version = model.get("ds_version")
        key = "single_partition_of_fp32_groups" if self.stage <= 2 else "fp32_flat_groups"
        groups = [self._flat_groups(first_optim + r, key) for r in range(self.world)]
        if len({len(g) for g in groups}) != 1:
            raise CheckpointError(
                f"{self.folder}: the ranks' optimizer files hold different numbers of "
                f"param groups ({[len(g) for g in groups]})"
            )
        shapes = model.get("param_shapes")
        if not isinstance(shapes, list) or not all(isinstance(s, dict) for s in shapes):
            raise CheckpointError(f"{model_files[0]}: no 'param_shapes' list of param groups")
        self.tensors: dict[str, FlatParam | int] = {}  # a FlatParam, or a stored tensor's handle
        self._buffers(model)
        self._frozen()
        if self.stage <= 2:
            self._zero12(shapes, groups, optim[0])
        else:
            self._zero3(shapes, groups, optim[0])
        shared = model.get("shared_params") or {}
        if not isinstance(shared, dict):
            raise CheckpointError(f"{model_files[0]}: 'shared_params' is not a dict")
        for alias, source in shared.items():
            if isinstance(source, str) and source in self.tensors:
                self.tensors[str(alias)] = self.tensors[source]

    # -- reading the states -----------------------------------------------------------
    def _dict(self, fi: int, key: str) -> dict[str, Any]:
        v = self.meta[fi].get(key)
        if not isinstance(v, dict):
            raise CheckpointError(f"{self.files[fi]}: no {key!r} dict")
        return v

    def _stored(self, fi: int, ref: Any, what: str) -> int:
        """The handle of a tensor a state names ({"__tensor__": name})."""
        name = ref.get("__tensor__") if isinstance(ref, dict) else None
        ti = self._names[fi].get(name) if isinstance(name, str) else None
        if ti is None:
            raise CheckpointError(f"{self.files[fi]}: {what} is not a tensor ({ref!r:.80})")
        return fi << 32 | ti

    def _flat(self, handle: int, what: str) -> tuple[torch.dtype, int]:
        """(dtype, numel) of a stored tensor read as one flat run; refuses other layouts."""
        v = self.indexes[handle >> 32].tensor_view(handle & 0xFFFFFFFF)
        n = math.prod(v.shape)
        if n > 1 and v.strides != contiguous_strides(v.shape):
            raise CheckpointError(f"{self.files[handle >> 32]}: {what} is not contiguous")
        return TORCH_DTYPES[v.dtype], n

    def _flat_groups(self, fi: int, key: str) -> list[tuple[int, int]]:
        """(handle, numel) of each param group's flat fp32 partition of one rank."""
        osd = self._dict(fi, "optimizer_state_dict")
        refs = osd.get(key)
        if not isinstance(refs, list):
            raise CheckpointError(f"{self.files[fi]}: no {key!r} list of flat partitions")
        out = []
        for g, ref in enumerate(refs):
            h = self._stored(fi, ref, f"{key}[{g}]")
            dtype, n = self._flat(h, f"{key}[{g}]")
            if not dtype.is_floating_point:
                raise CheckpointError(f"{self.files[fi]}: {key}[{g}] holds {dtype}, not floats")
            out.append((h, n))
        return out

    def _buffers(self, model: dict[str, Any]) -> None:
        names = model.get("buffer_names")
        if not isinstance(names, list):
            raise CheckpointError(
                f"{self.model_files[0]}: no 'buffer_names': not a DeepSpeed model states file"
            )
        module = model.get("module")
        if not isinstance(module, dict):
            raise CheckpointError(f"{self.model_files[0]}: no 'module' state dict")
        wanted = set(map(str, names))
        for name, ref in module.items():
            if name in wanted:
                self.tensors[name] = self._stored(0, ref, f"buffer {name!r}")

    def _frozen(self) -> None:
        shapes = self.meta[0].get("frozen_param_shapes")
        if not shapes:
            return
        if not isinstance(shapes, dict):
            raise CheckpointError(f"{self.model_files[0]}: 'frozen_param_shapes' is not a dict")
        n_files = len(self.model_files) if self.stage == 3 else 1
        frags = []
        for fi in range(n_files):
            f = self.meta[fi].get("frozen_param_fragments")
            if not isinstance(f, dict):
                raise CheckpointError(f"{self.files[fi]}: no 'frozen_param_fragments' dict")
            frags.append(f)
        for name, raw in shapes.items():
            shape = self._checked_shape(name, raw, self.model_files[0], "frozen_param_shapes")
            numel = math.prod(shape)
            if self.stage <= 2:
                h = self._stored(0, frags[0].get(name), f"frozen fragment {name!r}")
                dtype, n = self._flat(h, f"frozen fragment {name!r}")
                if n != numel:
                    raise CheckpointError(
                        f"{self.files[0]}: frozen fragment {name!r} holds {n} elements, "
                        f"its shape {shape} needs {numel}"
                    )
                runs: tuple[Run, ...] = (Run(h, 0, n),)
            else:
                piece = -(-numel // self.world)
                run_list, dtypes = [], set()
                for r in range(self.world):
                    h = self._stored(r, frags[r].get(name), f"frozen fragment {name!r}")
                    dtype, n = self._flat(h, f"frozen fragment {name!r}")
                    dtypes.add(dtype)
                    want = max(0, min(piece, numel - r * piece))
                    if n < want:
                        raise CheckpointError(
                            f"{self.files[r]}: frozen fragment {name!r} holds {n} elements, "
                            f"rank {r}'s piece of {shape} needs {want}"
                        )
                    if want:
                        run_list.append(Run(h, 0, want))
                if len(dtypes) != 1:
                    raise CheckpointError(
                        f"{self.folder}: the ranks store frozen {name!r} in different dtypes"
                    )
                runs, dtype = tuple(run_list), dtypes.pop()
            self.tensors[name] = FlatParam(name, shape, dtype, runs)

    def _checked_shape(self, name: Any, raw: Any, file: Path, what: str) -> tuple[int, ...]:
        shape = _shape(raw)
        if not isinstance(name, str) or shape is None:
            raise CheckpointError(f"{file}: {what}: {name!r} has no shape ({raw!r:.80})")
        return shape

    def _zero12(
        self, shapes: list[dict[str, Any]], groups: list[list[tuple[int, int]]], optim0: Path
    ) -> None:
        if len(shapes) != len(groups[0]):
            raise CheckpointError(
                f"{self.model_files[0]}: 'param_shapes' has {len(shapes)} param groups, "
                f"{optim0.name} has {len(groups[0])} flat partitions"
            )
        align = 2 * self.world
        for g, group_shapes in enumerate(shapes):
            # The group's partitions in rank order: one flat vector.
            parts = [groups[r][g] for r in range(self.world)]
            avail = sum(n for _, n in parts)
            dtype = self._group_dtype(parts, g)
            offset = 0
            for name, raw in group_shapes.items():
                shape = self._checked_shape(name, raw, self.model_files[0], "param_shapes")
                numel = math.prod(shape)
                if offset + numel > avail:
                    raise CheckpointError(
                        f"{optim0}: param group {g}: {name!r} {shape} ends at element "
                        f"{offset + numel}, past the {avail} its partitions hold"
                    )
                self.tensors[name] = FlatParam(name, shape, dtype, _take(parts, offset, numel))
                offset += numel
            if -(-offset // align) != -(-avail // align):
                raise CheckpointError(
                    f"{optim0}: param group {g}: the parameters take {offset} elements but "
                    f"the partitions hold {avail} (more than the alignment padding)"
                )

    def _zero3(
        self, shapes: list[dict[str, Any]], groups: list[list[tuple[int, int]]], optim0: Path
    ) -> None:
        totals = [sum(n for _, n in rank_groups) for rank_groups in groups]
        if len(set(totals)) != 1:
            raise CheckpointError(
                f"{self.folder}: the ranks' flat partitions differ in size ({totals})"
            )
        dtype = self._group_dtype([p for rank_groups in groups for p in rank_groups], 0)
        offset = 0
        for group_shapes in shapes:
            for name, raw in group_shapes.items():
                shape = self._checked_shape(name, raw, self.model_files[0], "param_shapes")
                numel = math.prod(shape)
                piece = -(-numel // self.world)
                if offset + piece > totals[0]:
                    raise CheckpointError(
                        f"{optim0}: {name!r} {shape} ends at element {offset + piece} of each "
                        f"rank's partition, past the {totals[0]} it holds"
                    )
                runs: list[Run] = []
                for r in range(self.world):
                    want = max(0, min(piece, numel - r * piece))
                    if want:
                        runs += _take(groups[r], offset, want)
                self.tensors[name] = FlatParam(name, shape, dtype, tuple(runs))
                offset += piece
        if offset != totals[0]:
            raise CheckpointError(
                f"{optim0}: the parameters' pieces take {offset} elements of each rank's "
                f"partition, which holds {totals[0]}"
            )

    def _group_dtype(self, parts: list[tuple[int, int]], g: int) -> torch.dtype:
        dtypes = {self._flat(h, "a flat partition")[0] for h, _ in parts}
        if len(dtypes) != 1:
            raise CheckpointError(
                f"{self.folder}: param group {g}'s partitions differ in dtype ({dtypes})"
            )
        return dtypes.pop()


def _take(parts: Sequence[tuple[int, int]], offset: int, count: int) -> tuple[Run, ...]:
    """Elements [offset, offset + count) of the concatenation of ``parts`` ((handle, numel)
    each) as runs of them."""
    runs = []
    base = 0
    for handle, n in parts:
        lo, hi = max(offset, base), min(offset + count, base + n)
        if lo < hi:
            runs.append(Run(handle, lo - base, hi - lo))
        base += n
    return tuple(runs)


Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def boxes(shape: Sequence[int], start: int, stop: int) -> list[Box]:
    """Elements [start, stop) of a contiguous tensor of ``shape`` as boxes (offsets, sizes),
    in order: each is one contiguous run of the flat elements."""
    if start >= stop:
        return []
    if len(shape) <= 1:
        return [((start,), (stop - start,))] if shape else [((), ())]
    row = math.prod(shape[1:])
    first, last = start // row, stop // row  # rows [first, last) whole when aligned
    out: list[Box] = []
    if first == last:  # inside one row
        return [((first, *o), (1, *s)) for o, s in boxes(shape[1:], start % row, stop % row)]
    if start % row:
        out += [((first, *o), (1, *s)) for o, s in boxes(shape[1:], start % row, row)]
        first += 1
    if first < last:
        out.append(((first,) + (0,) * (len(shape) - 1), (last - first, *shape[1:])))
    if stop % row:
        out += [((last, *o), (1, *s)) for o, s in boxes(shape[1:], 0, stop % row)]
    return out


class DeepSpeedCheckpoint(ChunkedCheckpoint):
    """A ZeRO checkpoint folder opened for reading: the names ``zero_to_fp32`` gives, each
    tensor either stored whole (buffers, stage 1/2 frozen parameters) or as runs of flat
    partitions (``_chunks``). ``tensor(name)`` assembles one (for inspection: it allocates
    the whole tensor unless one run holds it); ``tensor_rows`` only the rows asked for."""

    def __init__(
        self, path: Any, *, key: str | Sequence[str] | None = None, _opening: Any = None
    ) -> None:
        if key not in (None, "", ()):
            raise CheckpointError(
                f"{path}: a DeepSpeed ZeRO folder holds one state dict; key={key!r} picks none"
            )
        # At a URL (source.remote_deepspeed) the tag folder's objects are listed, their zip
        # records fetched, and ``_remote`` fetches what loads and tensor() read.
        self.path, _opening, remote = self._opening_of(
            path, _opening, "is_deepspeed", "a DeepSpeed ZeRO checkpoint folder"
        )
        layout = ZeroLayout(self.path, bool(getattr(_opening, "exact_reads", False)), remote)
        self._layout = layout
        self._remote = remote
        self.format = "deepspeed"
        self._indexes = layout.indexes
        self.files = list(layout.files)
        self._file_names = [str(f) for f in layout.files]
        self._buffers: dict[int, torch.Tensor] = {}
        self.prefix = ()
        self._params: list[FlatParam] = []
        handles: dict[str, int] = {}
        seen: dict[int, int] = {}
        for name, t in layout.tensors.items():
            if isinstance(t, int):
                handles[name] = t
                continue
            k = seen.setdefault(id(t), len(self._params))
            if k == len(self._params):
                self._params.append(t)
            handles[name] = LOGICAL + k
        self._all_map = handles
        self._entries_map = handles
        self._shared = None
        self._shape_lists = None
        self._unloadable = {}

    def _param(self, handle: int) -> FlatParam:
        return self._params[handle - LOGICAL]

    # -- the loader's view ---------------------------------------------------------
    _pieces = "runs of flat partitions"

    def _logical_meta(self, handle: int) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._param(handle)
        return t.dtype, t.shape

    def _logical_file(self) -> str:
        return str(self._layout.folder)

    def _chunks(self, handle: int) -> list[Chunk] | None:
        if handle < LOGICAL:
            return None
        t = self._param(handle)
        out = []
        strides = contiguous_strides(t.shape)
        done = 0  # elements of the parameter before this run
        for run in t.runs:
            base = self._indexes[run.handle >> 32].tensor_view(run.handle & 0xFFFFFFFF)
            at = base.storage_offset + run.start - done  # where element 0 would be
            for offsets, sizes in boxes(t.shape, done, done + run.length):
                first = sum(o * s for o, s in zip(offsets, strides, strict=True))
                out.append(Chunk(run.handle, offsets, sizes, at + first))
            done += run.length
        return out

    def _handle_tensor(self, handle: int) -> tuple[torch.Tensor, bool]:
        if handle >= LOGICAL:
            return self._flat_rows(self._param(handle), 0, None, None)
        return super()._handle_tensor(handle)

    def _flat_rows(
        self, t: FlatParam, start: int, stop: int | None, out: Any
    ) -> tuple[torch.Tensor, bool]:
        """Rows [start, stop) of a parameter (all of a 0-d one): a view of the mapped file
        when one run holds them and it is aligned, else assembled in a new tensor or in
        ``out(shape, dtype)``'s. Also whether it views the file."""
        row = math.prod(t.shape[1:]) if t.shape else 1
        rows = t.shape[0] if t.shape else 1
        stop = rows if stop is None else stop
        shape = ((stop - start, *t.shape[1:])) if t.shape else ()
        lo, hi = start * row, stop * row
        done = 0
        pieces = []
        for run in t.runs:
            a, b = max(lo, done), min(hi, done + run.length)
            if a < b:
                pieces.append((run, a - done + run.start, b - a))
            done += run.length
        if len(pieces) == 1:
            run, first, count = pieces[0]
            flat, in_file = self._handle_flat(run.handle)
            if in_file:
                return flat.narrow(0, first, count).view(shape), True
        into = torch.empty(shape, dtype=t.dtype) if out is None else out(shape, t.dtype)
        dst = into.view(-1)
        at = 0
        for run, first, count in pieces:
            dst.narrow(0, at, count).copy_(self._handle_flat(run.handle)[0].narrow(0, first, count))
            at += count
        return into, False

    def _handle_flat(self, handle: int) -> tuple[torch.Tensor, bool]:
        t, in_file = super()._handle_tensor(handle)
        return t.reshape(-1), in_file

    # -- the user's view -------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        try:
            h = self._entries[name]
        except KeyError:
            self._missing(name)
        dtype, shape, strides, offset = self._handle_view(h)
        tied = tuple(n for n, o in self._entries.items() if o == h and n != name)
        if h >= LOGICAL:
            return TensorInfo(name, shape, dtype, strides, 0, str(self._layout.folder), "", 0, tied)
        view = self._indexes[h >> 32].tensor_view(h & 0xFFFFFFFF)
        return TensorInfo(name, shape, dtype, strides, offset, self._file_names[h >> 32],
                          view.storage_key, view.file_offset, tied)  # fmt: skip

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor: a zero-copy view of the mapped file when it is stored whole or in one
        run, else assembled from its runs into a new tensor."""
        try:
            h = self._entries[name]
        except KeyError:
            self._missing(name)
        return self._handle_tensor(h)[0]

    def tensor_rows(self, name: str, start: int, stop: int, out: Any = None) -> torch.Tensor:
        """Rows [start, stop) of a tensor (``convert`` streams a tensor in such pieces): a
        view of the mapped file when one run holds them, else assembled from the runs
        that hold them, in a new tensor or in ``out(shape, dtype)``'s."""
        try:
            h = self._entries[name]
        except KeyError:
            self._missing(name)
        if h < LOGICAL:
            return self._handle_tensor(h)[0][start:stop]
        return self._flat_rows(self._param(h), start, stop, out)[0]

    def row_breaks(self, name: str) -> list[int]:
        """Rows where a run starts or ends on a row boundary (and the row count): pieces cut
        there are read in place."""
        try:
            h = self._entries[name]
        except KeyError:
            self._missing(name)
        shape = self._handle_shape(h)
        if not shape:
            return []
        if h < LOGICAL:
            return [0, shape[0]]
        row = math.prod(shape[1:]) or 1
        breaks, done = {0, shape[0]}, 0
        for run in self._param(h).runs:
            done += run.length
            if done % row == 0:
                breaks.add(done // row)
        return sorted(breaks)

    def runs(self, name: str) -> list[tuple[str, int, int]]:
        """(file, first element, element count) of each stored run of a tensor, in order."""
        try:
            h = self._entries[name]
        except KeyError:
            self._missing(name)
        if h < LOGICAL:
            return [(self._file_names[h >> 32], 0, math.prod(self._handle_shape(h)))]
        return [(self._file_names[r.handle >> 32], r.start, r.length) for r in self._param(h).runs]

    def unloadable(self) -> dict[str, str]:
        return {}

    @property
    def zero_stage(self) -> int:
        return int(self._layout.stage)  # type: ignore[arg-type]

    @property
    def world_size(self) -> int:
        return self._layout.world

    @property
    def metadata(self) -> dict[str, Any]:
        """The ZeRO stage, world size and tag, and the model states file's plain values
        (DeepSpeed's objects as ``{"__object__": ...}`` placeholders)."""
        layout = self._layout
        states = {k: v for k, v in layout.meta[0].items() if k != "module"}
        return {
            "zero_stage": layout.stage,
            "world_size": layout.world,
            "tag": layout.folder.name,
            "ds_version": layout.ds_version,
            "model_states": states,
        }

    def __repr__(self) -> str:
        return (
            f"<fastckpt.Checkpoint {str(self.path)!r} deepspeed ZeRO-{self._layout.stage} "
            f"x{self._layout.world}, {len(self)} tensors>"
        )
