"""
test-only entry points of the core
"""
from __future__ import annotations

import typing

__all__: list[str] = ['cached_pages', 'cast', 'cast_kernels', 'float_to_bf16', 'float_to_half']
def cached_pages(path: str, offset: typing.SupportsInt | typing.SupportsIndex, length: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    Pages of the file's [offset, +length) in the page cache; -1 when the kernel cannot say (cachestat, Linux 6.5+).
    """
def cast(src: bytes, from_dtype: str, to_dtype: str) -> bytes:
    ...
def cast_kernels() -> str:
    """
    Which cast kernels run: 'avx2+f16c' or 'portable'.
    """
def float_to_bf16(arg0: typing.SupportsFloat | typing.SupportsIndex) -> int:
    ...
def float_to_half(arg0: typing.SupportsFloat | typing.SupportsIndex) -> int:
    ...
