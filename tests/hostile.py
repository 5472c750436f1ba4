"""Hostile and broken checkpoint files, generated (never checked in as blobs).

Used by tests/test_hostile.py, by ``make test-asan`` (which writes the corpus to
a folder and runs the native scan driver over it) and by ``make fuzz`` (seed
corpora). Command line::

    python -m tests.hostile corpus DIR     # hostile/, truncated/, valid/ under DIR
    python -m tests.hostile seeds DIR      # DIR/<fuzz target>/ seed files
    python -m tests.hostile run FILE...    # one JSON line per file (used in a subprocess)

Every payload that would run code runs ``touch SENTINEL``; a case's sentinel is
``<sentinel dir>/<case name>.ran``. The payloads are checked to be live (they do
create the sentinel under ``pickle.loads`` / ``torch.load(weights_only=False)``)
by the tests, so "no sentinel" means fastckpt did not run them.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import shlex
import struct
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# -- pickle opcodes (protocol 2 unless noted) ---------------------------------------
PROTO2 = b"\x80\x02"
PROTO4 = b"\x80\x04"
STOP = b"."
MARK = b"("
TUPLE = b"t"
TUPLE1 = b"\x85"
TUPLE2 = b"\x86"
EMPTY_TUPLE = b")"
EMPTY_LIST = b"]"
EMPTY_DICT = b"}"
APPEND = b"a"
SETITEM = b"s"
NONE = b"N"
REDUCE = b"R"
BUILD = b"b"
INST = b"i"
OBJ = b"o"
NEWOBJ = b"\x81"
STACK_GLOBAL = b"\x93"  # protocol 4
MEMOIZE = b"\x94"  # protocol 4
BINGET = b"h"
LONG_BINGET = b"j"
LONG_BINPUT = b"r"

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def global_(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def unicode(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def touch_command(sentinel: Path) -> str:
    return f"touch {shlex.quote(str(sentinel))}"


# -- code-execution payloads: each returns a complete pickle -------------------------
def _reduce_os_system(s: Path) -> bytes:
    return PROTO2 + global_("os", "system") + unicode(touch_command(s)) + TUPLE1 + REDUCE + STOP


def _reduce_eval(s: Path) -> bytes:
    code = f"__import__('os').system({touch_command(s)!r})"
    return PROTO2 + global_("builtins", "eval") + unicode(code) + TUPLE1 + REDUCE + STOP


def _reduce_popen(s: Path) -> bytes:
    argv = unicode("touch") + unicode(str(s)) + TUPLE2
    return PROTO2 + global_("subprocess", "Popen") + argv + TUPLE1 + REDUCE + STOP


def _stack_global_os_system(s: Path) -> bytes:
    return (
        PROTO4
        + unicode("os")
        + unicode("system")
        + STACK_GLOBAL
        + unicode(touch_command(s))
        + TUPLE1
        + REDUCE
        + STOP
    )


def _inst_os_system(s: Path) -> bytes:
    return PROTO2 + MARK + unicode(touch_command(s)) + INST + b"os\nsystem\n" + STOP


def _obj_os_system(s: Path) -> bytes:
    return PROTO2 + MARK + global_("os", "system") + unicode(touch_command(s)) + OBJ + STOP


def _newobj_build(callable_global: bytes, state: bytes) -> bytes:
    # NEWOBJ makes a plain object; the first BUILD sets its attribute __setstate__
    # to the callable, the second BUILD calls it with `state` (pickle's load_build).
    return (
        PROTO2
        + global_("argparse", "Namespace")
        + EMPTY_TUPLE
        + NEWOBJ
        + NONE
        + EMPTY_DICT
        + unicode("__setstate__")
        + callable_global
        + SETITEM
        + TUPLE2
        + BUILD
        + state
        + BUILD
        + STOP
    )


def _newobj_build_os_system(s: Path) -> bytes:
    return _newobj_build(global_("os", "system"), unicode(touch_command(s)))


def _newobj_build_eval(s: Path) -> bytes:
    code = f"__import__('os').system({touch_command(s)!r})"
    return _newobj_build(global_("builtins", "eval"), unicode(code))


def _newobj_build_popen(s: Path) -> bytes:
    return _newobj_build(
        global_("subprocess", "Popen"), unicode("touch") + unicode(str(s)) + TUPLE2
    )


PAYLOADS: dict[str, Callable[[Path], bytes]] = {
    "reduce-os-system": _reduce_os_system,
    "reduce-eval": _reduce_eval,
    "reduce-popen": _reduce_popen,
    "stack-global-os-system": _stack_global_os_system,
    "inst-os-system": _inst_os_system,
    "obj-os-system": _obj_os_system,
    "newobj-build-os-system": _newobj_build_os_system,
    "newobj-build-eval": _newobj_build_eval,
    "newobj-build-popen": _newobj_build_popen,
}


# -- resource bombs (no code execution; must be refused without a crash) -------------
DEPTH = 100_000

RESOURCE_PICKLES: dict[str, bytes] = {
    "deep-list": PROTO2 + EMPTY_LIST * DEPTH + APPEND * (DEPTH - 1) + STOP,
    "deep-dict": PROTO2 + (EMPTY_DICT + unicode("k")) * DEPTH + EMPTY_DICT + SETITEM * DEPTH + STOP,
    "deep-mark-tuple": PROTO2 + MARK * DEPTH + TUPLE * DEPTH + STOP,
    # A memo slot at 2^32 - 1 (a VM that sizes a vector by it allocates 32 GiB), then
    # a read of an empty slot so the pickle is invalid whatever the memo's design.
    "memo-huge-put": PROTO2
    + EMPTY_LIST
    + LONG_BINPUT
    + struct.pack("<I", 0xFFFFFFFF)
    + LONG_BINGET
    + struct.pack("<I", 0xFFFFFFFE)
    + STOP,
    "memo-get-unset": PROTO2 + BINGET + b"\x05" + STOP,
    # Three million memo entries, then an opcode no pickle has.
    "memo-flood": PROTO4 + EMPTY_LIST + MEMOIZE * 3_000_000 + b"\xff" + STOP,
    "empty-stack-reduce": PROTO2 + REDUCE + STOP,
    "no-stop": PROTO2 + EMPTY_DICT,
}


class _Evil:
    """Pickled by torch.save beside real tensors: its __reduce__ runs a command on load."""

    def __init__(self, func: Callable[..., object], args: tuple):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _evil_objects(s: Path) -> dict[str, object]:
    import builtins
    import subprocess

    code = f"__import__('os').system({touch_command(s)!r})"
    return {
        "os-system": _Evil(os.system, (touch_command(s),)),
        "eval": _Evil(builtins.eval, (code,)),
        "popen": _Evil(subprocess.Popen, (["touch", str(s)],)),
    }


# -- zip ------------------------------------------------------------------------------
@dataclass
class ZipEntry:
    name: str
    data: bytes
    method: int = 0  # 0 stored, 8 deflate
    csize: int | None = None  # sizes/offset written to the central directory (None: true value)
    usize: int | None = None
    local_offset: int | None = None
    zip64_extra: bytes | None = None  # extra field of the central entry


@dataclass
class ZipLayout:
    entries: list[ZipEntry]
    cd_offset: int | None = None
    cd_size: int | None = None
    n_entries: int | None = None
    comment_len: int | None = None
    zip64: bool = False  # add zip64 end records (as torch.save does)
    zip64_cd_offset: int | None = None
    zip64_locator_offset: int | None = None
    extra_tail: bytes = field(default=b"")


def write_zip(layout: ZipLayout) -> bytes:
    """A zip archive with every field under control (the valid layout loads with torch.load)."""
    out = bytearray()
    offsets = []
    for e in layout.entries:
        offsets.append(len(out))
        payload = e.data if e.method == 0 else _deflate(e.data)
        crc = zlib.crc32(e.data)
        name = e.name.encode()
        out += struct.pack(
            "<IHHHHHIIIHH",
            0x04034B50,
            20,
            0,
            e.method,
            0,
            0,
            crc,
            len(payload),
            len(e.data),
            len(name),
            0,
        )
        out += name + payload
    cd_start = len(out)
    for e, off in zip(layout.entries, offsets, strict=True):
        payload_len = len(e.data) if e.method == 0 else len(_deflate(e.data))
        name = e.name.encode()
        extra = e.zip64_extra or b""
        out += struct.pack(
            "<IHHHHHHIIIHHHHHII",
            0x02014B50,
            20,
            20,
            0,
            e.method,
            0,
            0,
            zlib.crc32(e.data),
            payload_len if e.csize is None else e.csize,
            len(e.data) if e.usize is None else e.usize,
            len(name),
            len(extra),
            0,
            0,
            0,
            0,
            off if e.local_offset is None else e.local_offset,
        )
        out += name + extra
    cd_end = len(out)
    n = len(layout.entries) if layout.n_entries is None else layout.n_entries
    cd_size = cd_end - cd_start if layout.cd_size is None else layout.cd_size
    cd_offset = cd_start if layout.cd_offset is None else layout.cd_offset
    if layout.zip64:
        z64_offset = len(out)
        z64_cd = cd_offset if layout.zip64_cd_offset is None else layout.zip64_cd_offset
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, z64_cd)
        loc = z64_offset if layout.zip64_locator_offset is None else layout.zip64_locator_offset
        out += struct.pack("<IIQI", 0x07064B50, 0, loc, 1)
    out += struct.pack(
        "<IHHHHIIH",
        0x06054B50,
        0,
        0,
        min(n, 0xFFFF),
        min(n, 0xFFFF),
        min(cd_size, 0xFFFFFFFF),
        min(cd_offset, 0xFFFFFFFF),
        layout.comment_len or 0,
    )
    return bytes(out) + layout.extra_tail


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def torch_records(obj: object) -> list[tuple[str, bytes]]:
    """The records torch.save writes for `obj`, in order (names as torch gives them)."""
    import zipfile

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def zip_with_pickle(records: list[tuple[str, bytes]], pkl: bytes) -> bytes:
    return write_zip(
        ZipLayout(
            [ZipEntry(n, pkl if n.endswith("/data.pkl") else d) for n, d in records], zip64=True
        )
    )


# -- legacy ---------------------------------------------------------------------------
def legacy_prefix() -> bytes:
    """Magic number, protocol version and sys_info pickles, as torch writes them."""
    sys_info = {
        "protocol_version": LEGACY_PROTOCOL,
        "little_endian": True,
        "type_sizes": {"short": 2, "int": 4, "long": 4},
    }
    return (
        pickle.dumps(LEGACY_MAGIC, protocol=2)
        + pickle.dumps(LEGACY_PROTOCOL, protocol=2)
        + pickle.dumps(sys_info, protocol=2)
    )


def legacy_with_pickle(pkl: bytes) -> bytes:
    return legacy_prefix() + pkl + pickle.dumps([], protocol=2)


def legacy_storage_start(blob: bytes) -> int:
    """Offset of the first storage (after the five pickles of a legacy file)."""
    f = io.BytesIO(blob)
    for _ in range(5):
        for _op in pickletools.genops(f):
            pass
    return f.tell()


# -- safetensors ------------------------------------------------------------------------
def safetensors_raw(
    header: dict | bytes, data: bytes = b"", header_len: int | None = None
) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(hb) if header_len is None else header_len) + hb + data


def _f32(n: int, begin: int = 0) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}


def safetensors_cases() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, text the error must contain)."""
    big = 100_000_001
    many = b"{" + b",".join(b'"t%d":0' % i for i in range(1_000_002)) + b"}"
    return {
        "st-header-len-2^63": (
            safetensors_raw({}, b"", 2**63),
            "header length 9223372036854775808 exceeds the limit of 100000000 bytes",
        ),
        "st-header-100MB": (
            safetensors_raw(b"{" + b" " * (big - 2) + b"}"),
            "header length 100000001 exceeds the limit of 100000000 bytes",
        ),
        "st-header-len-past-end": (
            safetensors_raw({}, b"", 1000),
            "safetensors header: bytes [8, +1000) lie outside the file",
        ),
        "st-too-small": (b"\x01\x00", "too small to be a safetensors file (2 bytes)"),
        "st-invalid-json": (safetensors_raw(b'{"w": {"dtype": '), "header is not valid JSON"),
        "st-invalid-utf8": (
            safetensors_raw(
                b'{"w\xff\xfe": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4
            ),
            "header is not valid JSON",
        ),
        "st-not-object": (safetensors_raw(b"[1, 2]"), "header is not a JSON object"),
        "st-list-of-objects": (
            safetensors_raw(b'[{"w": {"dtype": "F32"}}, {"shape": [1]}]'),
            "header is not a JSON object",
        ),
        "st-duplicate-name": (
            safetensors_raw(
                b'{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
                b' "w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}}',
                b"\0\0",
            ),
            "tensor 'w' appears twice in the header",
        ),
        "st-nested-shape": (
            safetensors_raw(
                b'{"w": {"dtype": "U8", "shape": [[1]], "data_offsets": [0, 1]}}', b"\0"
            ),
            "shape entry must be a non-negative integer",
        ),
        "st-entry-is-list": (
            safetensors_raw(b'{"w": [{"dtype": "U8"}, 1]}'),
            "tensor 'w': entry is not an object",
        ),
        "st-metadata-nested": (
            safetensors_raw(b'{"__metadata__": {"a": "x", "k": {"n": "y"}}}'),
            "__metadata__ value for 'k' is not a string",
        ),
        "st-deep-nesting": (
            safetensors_raw(b"[" * 100_000 + b"]" * 100_000),
            "nests deeper than 8 levels",
        ),
        "st-too-many-tensors": (
            safetensors_raw(many),
            "lists more than the limit of 1000000 tensors",
        ),
        "st-too-many-dims": (
            safetensors_raw(
                {"w": {"dtype": "U8", "shape": [1] * 65, "data_offsets": [0, 1]}}, b"\0"
            ),
            "more than the limit of 64 dimensions",
        ),
        "st-offsets-past-end": (
            safetensors_raw({"w": _f32(2)}, b"\0" * 4),
            "lie past the end of the data",
        ),
        "st-offsets-huge": (
            safetensors_raw(
                {"w": {"dtype": "U8", "shape": [1], "data_offsets": [2**64 - 2, 2**64 - 1]}}, b"\0"
            ),
            "lie past the end of the data",
        ),
        "st-offsets-reversed": (
            safetensors_raw(
                {"w": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 4
            ),
            "data_offsets end before they begin",
        ),
        "st-offsets-negative": (
            safetensors_raw({"w": {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}}, b"\0"),
            "data_offsets must be a non-negative integer",
        ),
        "st-offsets-float": (
            safetensors_raw(
                {"w": {"dtype": "U8", "shape": [1], "data_offsets": [0.0, 1.0]}}, b"\0"
            ),
            "data_offsets must be a non-negative integer",
        ),
        "st-overlap": (
            safetensors_raw({"a": _f32(2), "b": _f32(2, 4)}, b"\0" * 12),
            "overlaps the tensor before it",
        ),
        "st-hole": (
            safetensors_raw({"a": _f32(1, 4)}, b"\0" * 8),
            "hole in the data before tensor 'a'",
        ),
        "st-not-covering": (
            safetensors_raw({"a": _f32(1)}, b"\0" * 8),
            "data section is 8 bytes but tensors cover 4",
        ),
        "st-shape-overflow": (
            safetensors_raw(
                {"w": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 4]}}, b"\0" * 4
            ),
            "element count overflows 64 bits",
        ),
        "st-bytes-overflow": (
            safetensors_raw(
                {"w": {"dtype": "F64", "shape": [2**62], "data_offsets": [0, 8]}}, b"\0" * 8
            ),
            "byte size overflows 64 bits",
        ),
        # Found while hardening: an empty tensor's strides overflowed int64 (UB).
        "st-empty-stride-overflow": (
            safetensors_raw(
                {"w": {"dtype": "F32", "shape": [0, 2**62, 4], "data_offsets": [0, 0]}}
            ),
            "strides overflow 64 bits",
        ),
        "st-dim-too-large": (
            safetensors_raw({"w": {"dtype": "U8", "shape": [2**63], "data_offsets": [0, 0]}}),
            "dimension too large",
        ),
        "st-size-mismatch": (
            safetensors_raw(
                {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16
            ),
            "data_offsets span 16 bytes but F32 shape needs 8",
        ),
        # A dtype fastckpt does not know is listed, not refused; its bytes must
        # still tile the data section like any tensor's.
        "st-unknown-dtype-gap": (
            safetensors_raw({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [1, 2]}}, b"\0\0"),
            "hole in the data before tensor 'w'",
        ),
        "st-missing-fields": (
            safetensors_raw({"w": {"dtype": "F32"}}),
            "entry needs dtype, shape and data_offsets",
        ),
        "st-metadata-not-strings": (
            safetensors_raw({"__metadata__": {"k": [1]}}),
            "__metadata__ value for 'k' is not a string",
        ),
    }


# -- cases ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    filename: str
    data: bytes
    reader: str  # the reader that must refuse it: safetensors | torch_zip | torch_legacy
    message: str | None = None  # text the error must contain, where fastckpt's wording is fixed


def hostile_cases(sentinel_dir: Path) -> list[Case]:
    import torch

    cases: list[Case] = []
    for name, (blob, msg) in safetensors_cases().items():
        cases.append(Case(name, f"{name}.safetensors", blob, "safetensors", msg))

    records = torch_records({"w": torch.arange(6, dtype=torch.float32)})
    for name, make in PAYLOADS.items():
        pkl = make(sentinel_dir / f"zip-{name}.ran")
        cases.append(
            Case(f"zip-{name}", f"zip-{name}.pt", zip_with_pickle(records, pkl), "torch_zip")
        )
        pkl = make(sentinel_dir / f"legacy-{name}.ran")
        cases.append(
            Case(f"legacy-{name}", f"legacy-{name}.pt", legacy_with_pickle(pkl), "torch_legacy")
        )
    for name, pkl in RESOURCE_PICKLES.items():
        cases.append(
            Case(f"zip-{name}", f"zip-{name}.pt", zip_with_pickle(records, pkl), "torch_zip")
        )
        cases.append(
            Case(f"legacy-{name}", f"legacy-{name}.pt", legacy_with_pickle(pkl), "torch_legacy")
        )
    for kind in ("os-system", "eval", "popen"):
        for fmt, zipped in (("zip", True), ("legacy", False)):
            name = f"{fmt}-torch-save-{kind}-beside-tensors"
            evil = _evil_objects(sentinel_dir / f"{name}.ran")[kind]
            buf = io.BytesIO()
            torch.save(
                {"w": torch.ones(3), "hook": evil}, buf, _use_new_zipfile_serialization=zipped
            )
            cases.append(
                Case(name, f"{name}.pt", buf.getvalue(), "torch_zip" if zipped else "torch_legacy")
            )
    cases += zip_structure_cases()
    cases += legacy_structure_cases()
    cases += dcp_metadata_cases(sentinel_dir)
    return cases


# -- torch.distributed.checkpoint .metadata ---------------------------------------------
def dcp_metadata_valid() -> bytes:
    """A .metadata written by dcp.save (one process): a nested state dict with a value."""
    import tempfile
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    state = {
        "model": {"w": torch.arange(12.0).reshape(4, 3), "b": torch.ones(2, dtype=torch.bfloat16)},
        "optim": {"step": 3},
    }
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=d)
        return (Path(d) / ".metadata").read_bytes()


def dcp_metadata_cases(sentinel_dir: Path) -> list[Case]:
    """Metadata records that lie about each other, and pickles that would run code."""
    import builtins
    import collections

    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    good = dcp_metadata_valid()

    def edited(name: str, edit: Callable[..., None], message: str) -> Case:
        meta = pickle.loads(good)
        edit(meta)
        blob = pickle.dumps(meta, protocol=4)
        return Case(name, f"{name}.metadata", blob, "dcp_metadata", message)

    w = "model.w"

    def place(meta, offsets) -> None:  # a storage entry for a chunk at `offsets`
        info = next(v for k, v in meta.storage_data.items() if k.fqn == w)
        meta.storage_data[MetadataIndex(w, offsets)] = info

    def chunks(meta, *boxes) -> None:
        meta.state_dict_metadata[w].chunks = [
            ChunkStorageMetadata(offsets=o, sizes=s) for o, s in boxes
        ]
        for o, _ in boxes:
            place(meta, o)

    def evil(func: Callable[..., object], args: tuple, case: str) -> Callable[..., None]:
        def put(meta) -> None:
            meta.planner_data["payload"] = _Evil(func, args)

        return put

    def escape(meta) -> None:
        for info in meta.storage_data.values():
            info.relative_path = "../../etc/passwd"

    def drop_storage(meta) -> None:
        del meta.storage_data[next(k for k in meta.storage_data if k.fqn == w)]

    touch = touch_command(sentinel_dir / "dcp-os-system.ran")
    code = f"__import__('os').system({touch_command(sentinel_dir / 'dcp-eval.ran')!r})"
    return [
        edited("dcp-os-system", evil(os.system, (touch,), "os"), "system', which only code-exec"),
        edited("dcp-eval", evil(builtins.eval, (code,), "eval"), "'builtins.eval'"),
        edited(
            "dcp-unknown-global",
            lambda m: m.planner_data.__setitem__("x", collections.Counter()),
            "'collections.Counter', which a DCP .metadata file does not hold",
        ),
        edited(
            "dcp-chunk-past-tensor",
            lambda m: chunks(m, ((0, 0), (4, 3)), ((4, 0), (1, 3))),
            "lies outside the tensor's size (4, 3)",
        ),
        edited(
            "dcp-chunk-overlap",
            lambda m: chunks(m, ((0, 0), (3, 3)), ((2, 0), (2, 3))),
            "chunks at offsets (0, 0) and (2, 0) overlap",
        ),
        edited(
            "dcp-chunk-missing",
            lambda m: chunks(m, ((0, 0), (2, 3))),
            "its chunks hold 6 of its 12 elements",
        ),
        edited("dcp-no-storage", drop_storage, "has no storage_data entry"),
        edited("dcp-path-escape", escape, "leaves the checkpoint directory"),
        Case(
            "dcp-not-metadata",
            "dcp-not-metadata.metadata",
            pickle.dumps({"state_dict_metadata": {}}, protocol=4),
            "dcp_metadata",
            "is not a Metadata record",
        ),
    ]


def _valid_zip_layout() -> ZipLayout:
    import torch

    return ZipLayout(
        [ZipEntry(n, d) for n, d in torch_records({"w": torch.arange(6.0)})], zip64=True
    )


def zip_structure_cases() -> list[Case]:
    def mutated(name: str, edit: Callable[[ZipLayout], None]) -> Case:
        layout = _valid_zip_layout()
        edit(layout)
        return Case(f"zip-{name}", f"zip-{name}.pt", write_zip(layout), "torch_zip")

    def entry(layout: ZipLayout, suffix: str) -> ZipEntry:
        return next(e for e in layout.entries if e.name.endswith(suffix))

    def overlap(layout: ZipLayout) -> None:  # data/0's central entry points at data.pkl's bytes
        entry(layout, "/data/0").local_offset = 0

    def overlap_size(layout: ZipLayout) -> None:  # data.pkl's size runs over the next entries
        e = entry(layout, "/data.pkl")
        e.csize = e.usize = len(e.data) + 200

    def compressed_data(layout: ZipLayout) -> None:
        entry(layout, "/data/0").method = 8

    def compressed_pkl(layout: ZipLayout) -> None:
        entry(layout, "/data.pkl").method = 8

    def size_past_end(layout: ZipLayout) -> None:
        e = entry(layout, "/data/0")
        e.csize = e.usize = 0x7FFFFFFF

    def local_past_end(layout: ZipLayout) -> None:
        entry(layout, "/data/0").local_offset = 0x7FFFFFF0

    def cd_outside(layout: ZipLayout) -> None:
        layout.cd_offset = layout.zip64_cd_offset = 0x7FFFFFF0

    def cd_size_lie(layout: ZipLayout) -> None:
        layout.cd_size = 0x7FFFFFF0

    def count_lie(layout: ZipLayout) -> None:
        layout.n_entries = 0xFFFF

    def zip64_cd_lie(layout: ZipLayout) -> None:
        layout.zip64_cd_offset = 2**63

    def zip64_locator_lie(layout: ZipLayout) -> None:
        layout.zip64_locator_offset = 2**62

    def zip64_extra_lie(layout: ZipLayout) -> None:
        e = entry(layout, "/data/0")
        e.csize = e.usize = 0xFFFFFFFF
        e.zip64_extra = struct.pack("<HHQQ", 1, 16, 2**64 - 1, 2**64 - 1)

    def zip64_extra_short(layout: ZipLayout) -> None:
        e = entry(layout, "/data/0")
        e.csize = e.usize = 0xFFFFFFFF
        e.zip64_extra = struct.pack("<HH", 1, 16)  # claims 16 bytes, has none

    def comment_lie(layout: ZipLayout) -> None:
        layout.comment_len = 0xFFFF

    def no_pkl(layout: ZipLayout) -> None:
        layout.entries = [e for e in layout.entries if not e.name.endswith("/data.pkl")]

    def no_storage(layout: ZipLayout) -> None:
        layout.entries = [e for e in layout.entries if not e.name.endswith("/data/0")]

    def duplicate_pkl(layout: ZipLayout) -> None:
        layout.entries.append(ZipEntry(entry(layout, "/data.pkl").name, b"\x80\x02}."))

    cases = [
        mutated(n, f)
        for n, f in [
            ("overlapping-entries", overlap),
            ("overlapping-sizes", overlap_size),
            ("deflated-storage", compressed_data),
            ("deflated-pickle", compressed_pkl),
            ("entry-size-past-end", size_past_end),
            ("local-header-past-end", local_past_end),
            ("central-directory-outside", cd_outside),
            ("central-directory-size-lie", cd_size_lie),
            ("entry-count-lie", count_lie),
            ("zip64-cd-offset-lie", zip64_cd_lie),
            ("zip64-locator-lie", zip64_locator_lie),
            ("zip64-extra-sizes-lie", zip64_extra_lie),
            ("zip64-extra-short", zip64_extra_short),
            ("comment-length-lie", comment_lie),
            ("missing-data-pkl", no_pkl),
            ("missing-storage-record", no_storage),
            ("duplicate-data-pkl", duplicate_pkl),
        ]
    ]
    cases.append(
        Case("zip-no-end-record", "zip-no-end-record.pt", b"PK\x03\x04" + b"\0" * 100, "torch_zip")
    )
    return cases


def legacy_structure_cases() -> list[Case]:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.arange(6.0)}, buf, _use_new_zipfile_serialization=False)
    good = buf.getvalue()
    start = legacy_storage_start(good)
    bad_magic = (
        pickle.dumps(LEGACY_MAGIC + 1, protocol=2)
        + good[len(pickle.dumps(LEGACY_MAGIC, protocol=2)) :]
    )
    proto_at = len(pickle.dumps(LEGACY_MAGIC, protocol=2))
    bad_proto = (
        good[:proto_at]
        + pickle.dumps(999, protocol=2)
        + good[proto_at + len(pickle.dumps(LEGACY_PROTOCOL, protocol=2)) :]
    )
    huge_count = good[:start] + struct.pack("<q", 2**62) + good[start + 8 :]
    negative_count = good[:start] + struct.pack("<q", -1) + good[start + 8 :]
    return [
        Case("legacy-bad-magic", "legacy-bad-magic.pt", bad_magic, "torch_legacy"),
        Case("legacy-bad-protocol", "legacy-bad-protocol.pt", bad_proto, "torch_legacy"),
        Case("legacy-truncated-storage", "legacy-truncated-storage.pt", good[:-5], "torch_legacy"),
        Case("legacy-storages-missing", "legacy-storages-missing.pt", good[:start], "torch_legacy"),
        Case(
            "legacy-storage-count-huge", "legacy-storage-count-huge.pt", huge_count, "torch_legacy"
        ),
        Case(
            "legacy-storage-count-negative",
            "legacy-storage-count-negative.pt",
            negative_count,
            "torch_legacy",
        ),
        Case("legacy-magic-only", "legacy-magic-only.pt", good[:proto_at], "torch_legacy"),
    ]


def valid_fixtures() -> dict[str, bytes]:
    """Small valid files of every format (file name -> bytes): fuzz seeds and truncation sources."""
    import torch
    from safetensors.torch import save

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "a.weight": base,
        "a.t": base.t(),
        "a.row": base[1],
        "b.bias": torch.ones(3, dtype=torch.float16),
        "b.idx": torch.arange(5),
        "scalar": torch.tensor(2.5),
    }
    nested = {"model": state, "step": 7, "args": {"lr": 0.1}}
    out = {}
    for name, obj in (("state", state), ("nested", nested)):
        for zipped, ext in ((True, "zip.pt"), (False, "legacy.pt")):
            buf = io.BytesIO()
            torch.save(obj, buf, _use_new_zipfile_serialization=zipped)
            out[f"{name}.{ext}"] = buf.getvalue()
    flat = {k: v.contiguous().clone() for k, v in state.items()}
    out["state.safetensors"] = save(flat, metadata={"format": "pt"})
    out["empty.safetensors"] = save({"e": torch.empty(0, 3)})
    out["writer.zip.pt"] = write_zip(_valid_zip_layout())
    out["dcp.metadata"] = dcp_metadata_valid()
    out.update(_dtype_fixtures())
    return out


def _dtype_fixtures() -> dict[str, bytes]:
    """Every dtype torch saves, and tensors fastckpt lists but cannot load (quantized,
    sparse, nested, numpy, a dtype it does not know), in each format."""
    import warnings

    import torch
    from safetensors.torch import save

    raw = torch.arange(16, dtype=torch.int32).to(torch.uint8).reshape(2, 8)
    names = (
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
        "float4_e2m1fn_x2", "complex32", "bits8", "bits16", "uint16", "uint32", "uint64",
    )
    dtypes = {n: raw.clone().view(getattr(torch, n)) for n in names}
    out = {}
    with warnings.catch_warnings():  # complex32 is experimental, quantized deprecated
        warnings.simplefilter("ignore")
        odd = {
            "q": torch.quantize_per_tensor(torch.randn(4), 0.1, 3, torch.quint8),
            "qc": torch.quantize_per_channel(
                torch.randn(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([1, 2]), 0, torch.qint8
            ),
            "coo": torch.randn(3, 3).to_sparse(),
            "nested": torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
            "array": torch.arange(3.0).numpy(),
            "w": torch.ones(2),
        }
        for zipped, ext in ((True, "zip.pt"), (False, "legacy.pt")):
            for name, obj in (("dtypes", dtypes), ("unloadable", odd)):
                buf = io.BytesIO()
                torch.save(obj, buf, _use_new_zipfile_serialization=zipped)
                out[f"{name}.{ext}"] = buf.getvalue()
    out["dtypes.safetensors"] = save({n: dtypes[n] for n in names[:6]})
    out["unknown-dtype.safetensors"] = safetensors_raw(
        {"a": _f32(1), "s": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [4, 7]}},
        b"\0" * 7,
    )
    return out


def truncation_cut_points(n: int, count: int = 40) -> list[int]:
    """Every byte near both ends (headers, end records) and `count` points in between."""
    cuts = set(range(min(n, 24))) | set(range(max(0, n - 24), n))
    cuts |= {n * i // count for i in range(count)}
    return sorted(c for c in cuts if c < n)


def reader_of(filename: str) -> str:
    if filename.endswith(".metadata"):
        return "dcp_metadata"
    if filename.endswith(".safetensors"):
        return "safetensors"
    return "torch_legacy" if "legacy" in filename else "torch_zip"


# -- writing corpora --------------------------------------------------------------------
def write_corpus(root: Path, sentinel_dir: Path) -> dict[str, list[Path]]:
    """hostile/, truncated/ and valid/ under root; returns the files of each."""
    written: dict[str, list[Path]] = {"hostile": [], "truncated": [], "valid": []}
    for sub in written:
        (root / sub).mkdir(parents=True, exist_ok=True)
    for case in hostile_cases(sentinel_dir):
        p = root / "hostile" / case.filename
        p.write_bytes(case.data)
        written["hostile"].append(p)
    for name, blob in valid_fixtures().items():
        p = root / "valid" / name
        p.write_bytes(blob)
        written["valid"].append(p)
        for cut in truncation_cut_points(len(blob)):
            stem, _, ext = name.partition(".")
            q = root / "truncated" / f"{stem}-cut{cut:06d}.{ext}"
            q.write_bytes(blob[:cut])
            written["truncated"].append(q)
    return written


RULES_SEEDS = {
    "strip-prefix.rules": "module.{rest*} -> {rest*}\n",
    "add-prefix.rules": "{rest*} -> bert.{rest*}\n",
    "rename-anywhere.rules": "{p*}.gamma -> {p*}.weight\n{p*}.beta -> {p*}.bias\n",
    "deltalm.rules": (
        "# fairseq DeltaLM -> HF\n"
        "encoder.layers.{i}.ffn.{w}.{p} -> encoder.layers.{i}.{w}.{p}\n"
        "src_embedding.embed_tokens.weight -> encoder.embed_tokens.weight rows[:250001]\n"
        "tgt_embedding.embed_tokens.weight -> decoder.embed_tokens.weight, "
        "decoder.output_projection.weight rows[:250001] dtype=bf16\n"
        "ignore cls.**\nignore-target **.version\nfreeze encoder.*\nunfreeze encoder.layers.11.*\n"
        "a.* -> b.*\nx.** -> y.{rest*}\n"
    ),
}


def write_seeds(root: Path) -> None:
    """Seed corpora per fuzz target: the valid fixtures of its format plus small hostile files."""
    fixtures = valid_fixtures()
    for target in ("safetensors", "torch_zip", "torch_legacy", "rules", "dcp_metadata"):
        (root / target).mkdir(parents=True, exist_ok=True)
    for name, text in RULES_SEEDS.items():
        (root / "rules" / name).write_text(text)
    for name, blob in fixtures.items():
        (root / reader_of(name) / name).write_bytes(blob)
    for case in hostile_cases(root / "sentinels"):
        if len(case.data) <= 64 * 1024:  # libFuzzer's default max_len is far below the bombs
            (root / case.reader / case.filename).write_bytes(case.data)


# -- the subprocess runner --------------------------------------------------------------
def run_files(files: list[str]) -> None:
    """Opens each file; prints one JSON line per file, flushed, so a crash names its file."""
    import torch

    import fastckpt

    for f in files:
        result: dict[str, object] = {"file": f}
        try:
            if f.endswith(".metadata"):  # a DCP directory's metadata, on its own
                meta = fastckpt._core.read_dcp_metadata(f)
                result.update(outcome="ok", tensors=len(meta.items), byte_sum=0)
                print(json.dumps(result), flush=True)
                continue
            with fastckpt.open(f) as ckpt:
                # Touch every byte of every tensor: an index that lies would fault here.
                total = sum(
                    int(ckpt.tensor(k).reshape(-1).view(torch.uint8).sum())
                    for k in ckpt.keys()
                    if ckpt.info(k).nbytes
                )
                result.update(outcome="ok", tensors=len(ckpt), byte_sum=total)
        except fastckpt.CheckpointError as e:
            result.update(outcome="CheckpointError", type=type(e).__name__, message=str(e))
        except BaseException as e:
            result.update(outcome="other", type=type(e).__name__, message=str(e)[:2000])
        print(json.dumps(result), flush=True)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "corpus":
        root = Path(argv[1])
        written = write_corpus(root, root / "sentinels")
        print(" ".join(f"{k}={len(v)}" for k, v in written.items()))
        return 0
    if len(argv) >= 2 and argv[0] == "seeds":
        write_seeds(Path(argv[1]))
        return 0
    if argv and argv[0] == "run":
        run_files(argv[1:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
