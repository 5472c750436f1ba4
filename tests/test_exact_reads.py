"""exact_reads: a rank reading its shard fetches only the pages the shard needs.

Strided sources (a column block of a row-major weight, as a Shard(1) rank
reads it) are read run by run with pread instead of gathered through the
mapping, and no readahead pulls in the neighbours' bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastckpt import _core
from fastckpt.bench import evict
from tests.conftest import assert_same_bytes

MB = 1 << 20
NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def open_index(path: Path, exact: bool):
    (index,) = _core.start_open([str(path)], 1, exact).wait()
    return index


def copy(index, name: str, dst: torch.Tensor, exact: bool, rows=None) -> _core.CopyJob:
    task = (index, index.names().index(name), rows, None, dst.data_ptr(), NAMES[dst.dtype],
            tuple(dst.shape), dst.stride(), False, name)  # fmt: skip
    job = _core.CopyJob([task], 2, 16 * MB, exact_reads=exact)
    job.run()
    return job


@pytest.mark.parametrize("exact", [False, True], ids=["mapped", "exact"])
def test_strided_sources_give_the_same_bytes(tmp_path, exact):
    base = torch.randn(300, 500)
    views = {
        "cols": base[:, 128:384],  # 1 KB runs: pread, several per preadv
        "col": base[:, 7],  # single elements: through the mapping
        "turned": base.t(),
        "cube": base.view(30, 10, 500)[:, 2:9, 100:400],  # 2 outer dims
        "wide": base.view(300, 2, 250)[:, :, 10:240],  # runs 920 B, 1080 B apart
    }
    path = tmp_path / "views.pt"
    torch.save(views, path)
    index = open_index(path, exact)
    for name, want in views.items():
        dst = torch.zeros(want.shape)
        copy(index, name, dst, exact)
        assert_same_bytes(dst, want)
    # A row range and a cast compose with the runs.
    dst = torch.zeros(100, 256, dtype=torch.bfloat16)
    copy(index, "cols", dst, exact, rows=(150, 100))
    assert_same_bytes(dst, views["cols"][150:250].to(torch.bfloat16))
    # So does a list of rows (adjacent ones are read as one run).
    rows = [5, 6, 7, 299, 0]
    dst = torch.zeros(len(rows), 256)
    copy(index, "cols", dst, exact, rows=rows)
    assert_same_bytes(dst, views["cols"][rows])


def view_pages(index, name: str, rows: range | None = None) -> int:
    """Pages of the file that the named tensor's elements (rows of dim 0) lie on."""
    view = index.tensor_view(index.names().index(name))
    shape, strides, offset, base = view.shape, view.strides, view.storage_offset, view.file_offset
    item = {"F32": 4}[view.dtype]
    pages: set[int] = set()
    # Row-major runs over the last dim (contiguous in every test here).
    assert strides[-1] == 1
    outer = torch.zeros(shape[:-1], dtype=torch.int64)
    for d, (n, st) in enumerate(zip(shape[:-1], strides[:-1], strict=True)):
        at = torch.arange(n) * st
        outer += at.view([n if k == d else 1 for k in range(len(shape) - 1)])
    if rows is not None:
        outer = outer[rows.start : rows.stop]
    for start in outer.flatten().tolist():
        first = base + (offset + start) * item
        pages.update(range(first // 4096, (first + shape[-1] * item - 1) // 4096 + 1))
    return len(pages)


def cached_pages(path: Path) -> int:
    return _core._testing.cached_pages(str(path), 0, path.stat().st_size)


def pages_fetched(path: Path, name: str, dst: torch.Tensor, exact: bool, rows=None) -> int:
    evict([str(path)])
    assert cached_pages(path) == 0
    copy(open_index(path, exact), name, dst, exact, rows)
    return cached_pages(path)


@pytest.mark.parametrize("block", [0, 3])
def test_cold_column_block_fetches_only_its_pages(tmp_path, block):
    """A quarter of a 32 MB weight's columns (8 KB runs, 24 KB apart), as a
    Shard(1) rank of four reads it: from a cold cache the pages fetched (file
    headers included) stay within 1.2 x the block's pages + 4 MB."""
    path = tmp_path / "w.pt"
    weight = torch.randn(1024, 8192)
    cols = slice(block * 2048, (block + 1) * 2048)
    # "block" is a view of the weight's storage: its source is the column block.
    torch.save({"w": weight, "block": weight[:, cols]}, path)
    if _core._testing.cached_pages(str(path), 0, 1) < 0:
        pytest.skip("this kernel has no cachestat(2)")
    dst = torch.zeros(1024, 2048)
    fetched = pages_fetched(path, "block", dst, exact=True)
    assert_same_bytes(dst, weight[:, cols])
    # Runs are not page aligned in a zip: each 8 KB run lies on 3 pages.
    block_pages = view_pages(open_index(path, False), "block")
    assert 1024 * 2 <= block_pages <= 1024 * 3
    assert block_pages <= fetched <= 1.2 * block_pages + 4 * MB // 4096


def test_cold_row_block_fetches_only_its_pages(tmp_path):
    """Shard(0): a contiguous quarter of the rows (rank 2 of 4), read with no readahead."""
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    weight = torch.randn(4096, 2048)
    save_file({"w": weight}, str(path))
    if _core._testing.cached_pages(str(path), 0, 1) < 0:
        pytest.skip("this kernel has no cachestat(2)")
    dst = torch.zeros(1024, 2048)
    fetched = pages_fetched(path, "w", dst, exact=True, rows=(2048, 1024))
    assert_same_bytes(dst, weight[2048:3072])
    block_pages = view_pages(open_index(path, False), "w", range(2048, 3072))
    assert block_pages <= fetched <= 1.2 * block_pages + 4 * MB // 4096
