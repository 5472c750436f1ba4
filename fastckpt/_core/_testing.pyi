"""
test-only entry points of the core
"""
from __future__ import annotations

import typing

__all__: list[str] = ['cached_pages', 'cast', 'cast_kernel_sets', 'cast_kernels', 'float_to_bf16', 'float_to_half']
def cached_pages(path: str, offset: typing.SupportsInt | typing.SupportsIndex, length: typing.SupportsInt | typing.SupportsIndex) -> int:
    """
    Pages of the file's [offset, +length) in the page cache; -1 when the kernel cannot say (cachestat, Linux 6.5+).
    """
def cast(src: bytes, from_dtype: str, to_dtype: str, kernel: str = 'best', streaming: bool = False) -> bytes:
    """
    kernel: 'best' (what loads use), 'avx512', 'avx2' or 'portable' (ValueError where this CPU lacks it); streaming: the non-temporal-store kernel where the set has one.
    """
def cast_kernel_sets() -> list[str]:
    """
    The cast kernel sets this CPU runs, for cast(kernel=...).
    """
def cast_kernels() -> str:
    """
    Which cast kernels loads use: 'avx512', 'avx2+f16c' or 'portable'.
    """
def float_to_bf16(arg0: typing.SupportsFloat | typing.SupportsIndex) -> int:
    ...
def float_to_half(arg0: typing.SupportsFloat | typing.SupportsIndex) -> int:
    ...
