"""fastckpt compiled core (private): readers, rules, copy engine.

Type stub for the pybind11 module: generated with pybind11-stubgen, then edited
(the exception classes). Regenerate after changing csrc/bindings/;
tests/test_core_stub.py checks it against the module (mypy's stubtest).
"""

from __future__ import annotations

import collections.abc
import typing

from . import _testing as _testing

class CheckpointError(ValueError): ...
class LimitError(CheckpointError): ...

__all__: list[str] = ['CheckpointError', 'CopyJob', 'DcpChunk', 'DcpItem', 'DcpMetadata', 'DcpStorage', 'FileBuffer', 'FileIndex', 'LimitError', 'PendingIndexes', 'RuleSet', 'Targets', 'TensorView', 'all_distinct', 'locate', 'match_pattern', 'open_archives', 'open_file', 'parse_rules', 'populate_for_writing', 'read_dcp_metadata', 'read_pickled_value', 'start_open', 'state_tensors']
class DcpChunk:
    @property
    def offsets(self) -> tuple:
        ...
    @property
    def sizes(self) -> tuple:
        ...
    @property
    def storage(self) -> int:
        """
        index into DcpMetadata.storage
        """
class DcpItem:
    @property
    def chunks(self) -> list[DcpChunk]:
        ...
    @property
    def dtype(self) -> str:
        """
        fastckpt's dtype name; empty when unknown
        """
    @property
    def fqn(self) -> str:
        """
        the flattened key
        """
    @property
    def is_bytes(self) -> bool:
        ...
    @property
    def layout(self) -> str:
        ...
    @property
    def path(self) -> tuple:
        """
        the key's path in the saved state dict (planner_data)
        """
    @property
    def size(self) -> tuple:
        ...
    @property
    def storage(self) -> int:
        """
        bytes values: index into DcpMetadata.storage
        """
    @property
    def torch_dtype(self) -> str:
        ...
class DcpMetadata:
    @property
    def items(self) -> list[DcpItem]:
        ...
    @property
    def storage(self) -> list[DcpStorage]:
        ...
    @property
    def version(self) -> str:
        ...
class DcpStorage:
    @property
    def length(self) -> int:
        ...
    @property
    def offset(self) -> int:
        ...
    @property
    def relative_path(self) -> str:
        ...
    @property
    def transforms(self) -> list[str]:
        ...
class FileBuffer:
    @property
    def size(self) -> int:
        ...
class TensorView:
    @property
    def dtype(self) -> str:
        ...
    @property
    def file_offset(self) -> int:
        """
        byte offset of the storage in the file
        """
    @property
    def shape(self) -> tuple:
        ...
    @property
    def storage(self) -> int:
        """
        storage index in the file
        """
    @property
    def storage_key(self) -> str:
        ...
    @property
    def storage_nbytes(self) -> int:
        ...
    @property
    def storage_offset(self) -> int:
        """
        elements
        """
    @property
    def strides(self) -> tuple:
        ...
class FileIndex:
    def __len__(self) -> int:
        ...
    def buffer(self) -> FileBuffer:
        ...
    def drop_from_page_cache(self) -> None:
        ...
    def max_path_length(self) -> int:
        ...
    def names(self) -> list:
        ...
    def over(self, path: str) -> FileIndex:
        """
        The same tensors over another file of the same size (one holding their bytes).
        """
    def paths(self) -> list:
        ...
    def shapes(self) -> list:
        ...
    def tensor_storages(self) -> list:
        ...
    def tensor_view(self, tensor: typing.SupportsInt | typing.SupportsIndex) -> TensorView:
        """
        The tensor's dtype, shape, strides and storage offset, and its storage's place in the file.
        """
    def unloadable(self) -> list:
        ...
    @property
    def file_size(self) -> int:
        ...
    @property
    def format(self) -> str:
        ...
    @property
    def metadata_json(self) -> str:
        ...
    @property
    def num_storages(self) -> int:
        ...
    @property
    def path(self) -> str:
        ...
class PendingIndexes:
    def wait(self) -> list[FileIndex]:
        """
        The files' indexes, in order, once all are read; or the first file's error.
        """
class RuleSet:
    def __len__(self) -> int:
        ...
    def match_sources(self, arg0: typing.Any) -> tuple[bytes, bytes, list]:
        ...
    def match_targets(self, arg0: typing.Any) -> bytes:
        ...
    def plan(self, arg0: typing.Any, arg1: typing.Any) -> tuple[list, bytes, bytes, bytes, bytes, bytes]:
        ...
    def rules(self) -> list:
        ...
    @property
    def source_name(self) -> str:
        ...
class Targets:
    def __init__(self, tensors: list, dtype_names: dict) -> None:
        """
        Read every destination tensor's address, shape, strides, dtype and device once.
        """
    def __len__(self) -> int:
        ...
    def lazy_views(self) -> list[int]:
        ...
    def mismatched(self, indexes: list, sources: list, dim0: typing.Any = None) -> list:
        ...
    def subset(self, keep: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex]) -> Targets:
        """
        The targets at these positions, in this order.
        """
    @property
    def all_cpu(self) -> bool:
        ...
class CopyJob:
    @staticmethod
    def from_targets(indexes: list, sources: list, targets: Targets, names: list, source_names: typing.Any, rows: typing.Any, vias: typing.Any, threads: typing.SupportsInt | typing.SupportsIndex, max_host_bytes: typing.SupportsInt | typing.SupportsIndex, device_sink: str = '', cudart_path: str = '', device_index: typing.SupportsInt | typing.SupportsIndex = 0, views: typing.Any = None, exact_reads: bool = False) -> CopyJob:
        """
        Tasks straight from destination tensors read into Targets (see tasks_from_targets).
        """
    def __init__(self, tasks: list, threads: typing.SupportsInt | typing.SupportsIndex, max_host_bytes: typing.SupportsInt | typing.SupportsIndex, device_sink: str = '', cudart_path: str = '', device_index: typing.SupportsInt | typing.SupportsIndex = 0, exact_reads: bool = False) -> None:
        ...
    def casts(self) -> list:
        ...
    def run(self) -> None:
        """
        Copy everything; returns when all bytes are in place.
        """
    @property
    def bytes_done(self) -> int:
        ...
    @property
    def bytes_from_cache(self) -> int:
        """
        Source bytes copied straight out of the page cache, not read().
        """
    @property
    def total_bytes(self) -> int:
        ...
def all_distinct(items: list) -> bool:
    """
    True when no object appears twice in the list (compared by identity).
    """
def locate(indexes: collections.abc.Sequence[FileIndex], names: list) -> list:
    """
    Per name, file_index << 32 | tensor_index of the first file holding it, or None.
    """
def match_pattern(pattern: str, names: typing.Any) -> list[bool]:
    """
    For each name: does the pattern match it.
    """
def open_archives(path: str, ranges: collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex]], exact_reads: bool = False) -> list[FileIndex]:
    """
    The torch.save archives at (offset, length) of one file, sharing one mapping of it.
    """
def open_file(path: str) -> FileIndex:
    """
    Read one checkpoint file's index (safetensors, torch zip or legacy torch).
    """
def parse_rules(text: str, source_name: str) -> RuleSet:
    """
    Parse and compile a rules text.
    """
def populate_for_writing(ranges: collections.abc.Sequence[tuple[typing.SupportsInt | typing.SupportsIndex, typing.SupportsInt | typing.SupportsIndex]], threads: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    Faults in the whole pages of each (address, bytes) range of fresh anonymous memory (MADV_POPULATE_WRITE) over `threads` threads; the bytes populated (0 where the kernel refuses).
    """
def read_dcp_metadata(path: str) -> DcpMetadata:
    """
    Read and check a torch.distributed.checkpoint .metadata file (nothing is imported or run).
    """
def read_pickled_value(path: str, offset: typing.SupportsInt | typing.SupportsIndex, length: typing.SupportsInt | typing.SupportsIndex) -> typing.Any:
    """
    The torch.save'd value at (offset, length) of a file as plain Python data (nothing is run).
    """
def start_open(paths: collections.abc.Sequence[str], threads: typing.SupportsInt | typing.SupportsIndex, exact_reads: bool = False) -> PendingIndexes:
    """
    Start reading the files' indexes on background threads (no GIL needed); wait() for them.
    """
def state_tensors(model: typing.Any, base_save: typing.Any, base_extra_state: typing.Any) -> typing.Any:
    """
    model.state_dict(keep_vars=True)'s tensors by a walk over the module tree's dicts; None when a module customises state_dict (its class or a hook).
    """
