"""Checkpoints behind a URL: ``s3://``, ``gs://``, ``az://`` and ``http(s)://``.

Each checkpoint file (an object) gets a memory file of its size. Its headers are
fetched with ranged GETs into the same offsets (safetensors: the length and the
JSON header; a torch zip: the end of central directory and the central
directory at the end, then each record's local header and the small records,
``data.pkl`` among them), and the C++ core indexes that memory file as it
would the real one. No tensor byte is read then: a load fetches exactly the
runs its plan reads into the memory file, window by window
(fastckpt.load.remote_reads), and the ordinary copy engine copies from there.

A URL ending in ``/`` (or naming no file the formats know) is a folder: the
files a local folder is searched for are looked up under it, an index's shards
beside the index; else a ``.metadata`` makes it a torch.distributed.checkpoint
directory (source.remote_dcp); else ``latest`` or ``*_states.pt`` files in its listing
make it a DeepSpeed ZeRO folder (source.remote_deepspeed), refused by name where the
server cannot list (http).
"""

from __future__ import annotations

import bisect
import json
import os
import struct
import zipfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import PosixPath, PurePosixPath
from typing import TYPE_CHECKING, Any

import fastckpt._core as _core
from fastckpt.errors import CheckpointError
from fastckpt.source.memory_file import MemoryFile
from fastckpt.source.remote_store import Object, Store, each

if TYPE_CHECKING:
    from fastckpt.source.remote_dcp import RemoteDcp
    from fastckpt.source.remote_deepspeed import RemoteZero

__all__ = [
    "RemoteFile", "RemoteOpening", "RemotePath", "open_file", "open_url",
    "read_zip_headers", "remote_side_files",
]  # fmt: skip

_FIRST = 16 << 10  # bytes read first from the start of a file (most safetensors headers)
_TAIL = 64 << 10  # and from the end of a zip (its end records and, mostly, its directory)
_HEADER_GAP = 1 << 10  # header runs closer than this are fetched as one
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")
FOLDER_CANDIDATES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class RemotePath(PosixPath):
    """A URL where a checkpoint's path is kept: ``str()`` gives the URL back whole (a
    ``Path`` would fold ``s3://`` into ``s3:/``); ``.name`` is the object's name."""

    _url = ""

    @classmethod
    def of(cls, url: str) -> RemotePath:
        p = cls(url)
        p._url = url
        return p

    def __str__(self) -> str:
        return self._url or super().__str__()

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"


class RemoteFile(MemoryFile):
    """One remote checkpoint file: the object, and the memory file its bytes land in."""

    def __init__(self, obj: Object):
        super().__init__(obj.size, "fastckpt-remote")
        self.obj = obj
        self.url = obj.url
        self.header_bytes = 0  # fetched to index the file
        self.holder = self  # what fetches for it (load.remote_reads)

    def fetch(self, runs: Sequence[tuple[int, int]]) -> int:
        """Bytes [start, end) of each run (sorted, disjoint) from the object into the memory
        file at the same offsets; returns how many."""
        runs = [(max(0, s), min(self.size, e)) for s, e in runs if e > s]
        if not runs or self.map is None:
            return 0
        self.populate(runs)
        with memoryview(self.map) as whole:
            self.obj.read_into([(s, e, whole[s:e]) for s, e in runs])
        return sum(e - s for s, e in runs)

    def fetch_into(self, pieces: Sequence[tuple[int, int, memoryview]], max_buffered: int) -> int:
        """Bytes [start, end) of the object straight into each piece's buffer, with at most
        ``max_buffered`` bytes of responses held at once; returns how many."""
        self.obj.read_into(pieces, max_buffered)
        return sum(e - s for s, e, _ in pieces)

    def check_unchanged(self) -> None:
        self.obj.check_unchanged()

    def bytes_at(self, start: int, end: int) -> bytes:
        assert self.map is not None
        return self.map[start:end]


def _is_folder(url: str, key: str) -> bool:
    return url.endswith("/") or not key or not key.lower().endswith(_FILE_SUFFIXES)


# The files of a Hugging Face folder besides its weights, looked for by name on an HTTP
# server (which cannot list a folder).
_HF_SIDE_NAMES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "vocab.txt",
    "tokenizer.model", "sentencepiece.bpe.model", "added_tokens.json", "preprocessor_config.json",
)  # fmt: skip
_SIDE_LIMIT = 256 << 20  # a side file larger than this is not a config: not copied


def remote_side_files(url: str, is_weight: Callable[[str], bool]) -> list[tuple[str, bytes]]:
    """(name, bytes) of the files directly in the folder a URL names that are not weights
    (``is_weight(name)``): a Hugging Face folder's config and tokenizer files, which
    ``convert`` copies beside the weights. A URL naming a file has none."""
    store = Store(url)
    key = store.key_of_path
    if not _is_folder(url, key):
        return []
    base = key.rstrip("/")
    prefix = f"{base}/" if base else ""
    if url.startswith(("http://", "https://")):
        found = []
        for name in _HF_SIDE_NAMES:
            try:
                found.append((prefix + name, store.head(prefix + name).size))
            except FileNotFoundError:
                continue
    else:
        found = store.list_files(prefix)
    out = []
    for k, size in sorted(found):
        name = k[len(prefix) :]
        if not name or "/" in name or name.startswith(".") or is_weight(name):
            continue
        if size > _SIDE_LIMIT:
            continue
        out.append((name, store.get_all(k)))
    return out


def _resolve(url: str) -> tuple[Store, list[str], str]:
    """The store, the keys of the checkpoint files behind ``url``, and the URL it names;
    no keys for a folder that holds none of ``FOLDER_CANDIDATES`` (open_url looks further)."""
    store = Store(url)
    key = store.key_of_path
    if _is_folder(url, key):
        prefix = _prefix(key)
        for name in FOLDER_CANDIDATES:
            try:
                store.head(prefix + name)
            except FileNotFoundError:
                continue
            key = prefix + name
            break
        else:
            return store, [], url
    if key.endswith(".index.json"):
        return store, _shards(store, key), store.url(key)
    return store, [key], store.url(key)


def _prefix(key: str) -> str:
    base = key.rstrip("/")
    return f"{base}/" if base else ""


def open_url(url: str, exact_reads: bool = True) -> RemoteOpening | RemoteDcp | RemoteZero:
    """The checkpoint behind a URL, its headers fetched: files (safetensors, torch zip, a
    folder's model files or shard index), a torch.distributed.checkpoint directory
    (source.remote_dcp) or a DeepSpeed ZeRO folder (source.remote_deepspeed). A folder's
    model files win over a training state beside them (a Trainer's checkpoint-N/)."""
    store, keys, named = _resolve(url)
    if keys:
        return RemoteOpening(url, exact_reads, (store, keys, named))
    prefix = _prefix(store.key_of_path)
    try:
        store.head(prefix + DCP_METADATA)
    except FileNotFoundError:
        pass
    else:
        from fastckpt.source.remote_dcp import RemoteDcp  # with the first DCP URL only

        return RemoteDcp(store, prefix, url)
    if url.startswith(("http://", "https://")):
        _refuse_unlisted_deepspeed(store, url, prefix)
    else:
        listed = store.list_files(prefix)
        names = [k[len(prefix) :] for k, _ in listed]
        if _DS_LATEST in names or any(n.endswith(_DS_STATES) for n in names):
            from fastckpt.source.remote_deepspeed import RemoteZero  # with the first one only

            return RemoteZero(store, prefix, url, listed)
        if any(n.endswith(".distcp") for n in names):
            raise CheckpointError(
                f"{store.url(prefix + DCP_METADATA)}: missing: a torch.distributed.checkpoint "
                "directory needs its .metadata file beside its .distcp files (was the save "
                "interrupted before rank 0 finished?)"
            )
    # A missing prefix reads as a missing local folder would.
    raise FileNotFoundError(
        f"{url}: no such checkpoint file or folder (looked for "
        f"{', '.join(FOLDER_CANDIDATES)} and {DCP_METADATA} under it)"
    )


DCP_METADATA = ".metadata"  # what marks a torch.distributed.checkpoint directory
_DS_LATEST = "latest"  # what marks a DeepSpeed ZeRO folder (source.deepspeed), or
_DS_STATES = ("_model_states.pt", "_optim_states.pt")  # its tag folder's files
# Names a ZeRO tag folder always holds, looked for on a server that cannot list.
_DS_PROBES = (_DS_LATEST, "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _refuse_unlisted_deepspeed(store: Store, url: str, prefix: str) -> None:
    """A DeepSpeed folder on an HTTP server is refused by name: its files (one per rank,
    named by rank and precision) are found by listing, which an HTTP server cannot do."""
    for name in _DS_PROBES:
        try:
            store.head(prefix + name)
        except FileNotFoundError:
            continue
        raise CheckpointError(
            f"{url}: a DeepSpeed checkpoint folder (it holds {name}): its files are found by "
            "listing the folder, which an http(s):// server cannot do; put it in a bucket "
            "(s3://, gs://, az://) or download it and load that"
        )


def _shards(store: Store, index_key: str) -> list[str]:
    url = store.url(index_key)
    try:
        doc = json.loads(store.get_all(index_key).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{url}: cannot read shard index: {e}") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{url}: shard index has no 'weight_map' of file names")
    parent = index_key.rsplit("/", 1)[0] + "/" if "/" in index_key else ""
    out = []
    for name in dict.fromkeys(weight_map.values()):
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts or "\\" in name:
            raise CheckpointError(f"{url}: shard name {name!r} leaves the folder")
        out.append(parent + name)
    return out


def open_file(store: Store, key: str) -> RemoteFile:
    """One checkpoint file of a store (a HEAD: its size and ETag) with what the core reads
    to index it fetched."""
    f = RemoteFile(Object(store, key))
    _read_headers(f)
    return f


def _read_headers(f: RemoteFile) -> None:
    """Fetches what the core reads to index the file, and nothing of its tensors."""
    if f.size == 0:
        raise CheckpointError(f"{f.url}: the object is empty (0 bytes): not a checkpoint")
    first = min(f.size, _FIRST)
    f.header_bytes += f.fetch([(0, first)])
    head = f.bytes_at(0, first)
    if head[:4] == b"PK\x03\x04":
        read_zip_headers(f, [(0, f.size)], [(0, first)])
        return
    if len(head) >= 8:
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n <= f.size and n < (1 << 31):
            if 8 + n > first:
                f.header_bytes += f.fetch([(first, 8 + n)])
            return
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{f.url}: a legacy (non-zip) torch file: read remotely only as safetensors or a "
            "torch zip file (torch.save's default since 1.6); download it to load it"
        )
    # Not a format known here: the core names what is wrong with the bytes read.


class _Reader:
    """A seekable file for ``zipfile`` over the zip at [base, base + size) of the object:
    reads fetch what is not yet here, in whole ``block``s (clipped to the zip)."""

    def __init__(
        self, f: RemoteFile, have: list[tuple[int, int]], base: int, size: int, block: int
    ):
        self.f = f
        self.pos = 0
        self.have = have
        self.base, self.size, self.block = base, size, block

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        at = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, at + offset)
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        start = self.pos
        self.pos = max(start, end)
        if end <= start:
            return b""
        lo, hi = self.base + start, self.base + end
        if not _inside((lo, hi), self.have):
            # Whole blocks: the directory is read in many small reads.
            b = self.block
            run = (max(self.base, lo // b * b), min(self.base + self.size, -(-hi // b) * b))
            _fetch_missing(self.f, self.have, [run])
        return self.f.bytes_at(lo, hi)


def _missing(runs: list[tuple[int, int]], have: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``runs`` (sorted, disjoint) outside ``have`` (sorted, disjoint): one
    sweep, as a DCP file's archives bring thousands of both."""
    out = []
    for s, e in runs:
        i = max(0, bisect.bisect_right(have, (s, s)) - 1)
        at = s
        while at < e and i < len(have):
            hs, he = have[i]
            if hs >= e:
                break
            if he > at:
                if hs > at:
                    out.append((at, hs))
                at = he
            i += 1
        if at < e:
            out.append((at, e))
    return out


def _fetch_missing(
    f: RemoteFile, have: list[tuple[int, int]], runs: list[tuple[int, int]], gap: int = 0
) -> None:
    """Fetches the parts of ``runs`` not in ``have`` (header bytes), in one batch of
    concurrent requests (runs less than ``gap`` apart in one), and adds them to ``have``
    (kept merged)."""
    have[:] = _merge(have)
    need = _merge(_missing(_merge([r for r in runs if r[1] > r[0]]), have), gap)
    f.header_bytes += f.fetch(need)
    have[:] = _merge(have + need)


def read_zip_headers(
    f: RemoteFile,
    zips: Sequence[tuple[int, int]],
    have: list[tuple[int, int]],
    tail: int = _TAIL,
    block: int = _FIRST,
    head: int = 0,
) -> None:
    """Fetches what the core reads to index each torch zip archive at (offset, length) of
    the object (the whole file; or, in a DCP ``.distcp`` file, each chunk's archive): its
    end records and central directory (the last ``tail`` bytes, more if the directory is
    longer), each record's local header, and the small records (``data.pkl`` and the
    like), never a storage. ``have``: the runs already here. Each kind of record is fetched
    for every archive at once: one batch of concurrent requests, not one per archive."""
    # With each end, its first ``head`` bytes (the first records: data.pkl, byteorder): in
    # a .distcp file one archive's end and the next one's start are then one request.
    ends = [(max(b, b + n - tail), b + n) for b, n in zips]
    _fetch_missing(f, have, ends + [(b, b + min(n, head)) for b, n in zips])
    found = []
    for base, n in zips:
        try:
            infos = zipfile.ZipFile(_Reader(f, have, base, n, block)).infolist()  # type: ignore[arg-type]
        except (zipfile.BadZipFile, ValueError, OSError, EOFError):
            continue  # the core reports what is wrong with the zip (it reads the same bytes)
        heads = [
            (base + i.header_offset, base + i.header_offset + 30 + len(i.orig_filename.encode()))
            for i in infos
        ]
        found.append((base + n, infos, heads))
    # A torch zip's first records (data.pkl, .format_version, byteorder) lie a few hundred
    # bytes apart: one request for them, not one each.
    _fetch_missing(
        f, have, [(s, min(e, end)) for end, _, heads in found for s, e in heads], _HEADER_GAP
    )
    small = []
    for end, infos, heads in found:
        for info, (start, _) in zip(infos, heads, strict=True):
            if "/data/" in info.orig_filename or start + 30 > end:
                continue  # a storage: its bytes are read by the load
            name_len, extra_len = struct.unpack("<HH", f.bytes_at(start + 26, start + 30))
            data = start + 30 + name_len + extra_len
            small.append((data, min(end, data + info.compress_size)))
    _fetch_missing(f, have, small, _HEADER_GAP)


def _inside(run: tuple[int, int], have: list[tuple[int, int]]) -> bool:
    """``run`` lies in one run of ``have`` (sorted, merged)."""
    i = bisect.bisect_right(have, (run[0], float("inf"))) - 1
    return i >= 0 and have[i][0] <= run[0] and run[1] <= have[i][1]


def _merge(runs: list[tuple[int, int]], gap: int = 0) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(runs):
        if out and s <= out[-1][1] + gap:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


class RemoteOpening:
    """The files behind a URL, their headers fetched, indexed by the core."""

    def __init__(
        self,
        url: str,
        exact_reads: bool = True,
        resolved: tuple[Store, list[str], str] | None = None,
    ):
        store, keys, named = resolved or _resolve(url)
        if not keys:
            raise FileNotFoundError(f"{url}: no such checkpoint file or folder")
        self.url = named if len(keys) > 1 else store.url(keys[0])
        self.path = RemotePath.of(url)
        self.files = each([partial(open_file, store, k) for k in keys])  # together
        self.paths = [RemotePath.of(f.url) for f in self.files]
        self._pending = _core.start_open(
            [f.path for f in self.files], min(8, os.cpu_count() or 1), exact_reads
        )

    def wait(self) -> list[Any]:
        try:
            return list(self._pending.wait())
        except CheckpointError as e:
            text = str(e)
            for f in self.files:
                text = text.replace(f.path, f.url)
            raise CheckpointError(text) from None

    @property
    def gap(self) -> int:
        return self.files[0].obj.store.settings.gap if self.files else 0

    @property
    def header_bytes(self) -> int:
        return sum(f.header_bytes for f in self.files)

    def fetch_tensor(self, file: int, start: int, end: int) -> bytearray:
        """A copy of the bytes of one storage, for ``Checkpoint.tensor()``."""
        f = self.files[file]
        f.fetch([(start, end)])
        out = bytearray(f.bytes_at(start, end))
        f.freed = 0
        f.release(f.size)  # nothing kept: the next load fetches what it reads
        f.freed = 0
        return out
