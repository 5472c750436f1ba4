"""Fresh destinations faulted in ahead of the copies (copy/populate.h): the pages are
resident after the call, so writing them takes no page faults, and their contents
are what they were."""

from __future__ import annotations

import resource

import pytest
import torch

from fastckpt import _core

MB = 1 << 20


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.parametrize("threads", [1, 3])
def test_populated_pages_take_no_faults_when_written(threads):
    t = torch.empty(64 * MB, dtype=torch.uint8)
    s = t.untyped_storage()
    done = _core.populate_for_writing([(s.data_ptr(), s.nbytes())], threads)
    if done == 0:
        pytest.skip("this kernel refuses MADV_POPULATE_WRITE (before Linux 5.14)")
    # Whole pages only: at most a page short at each end.
    assert 64 * MB - 2 * resource.getpagesize() <= done <= 64 * MB
    before = _faults()
    t.fill_(1)
    assert _faults() - before < 64  # against 16,384 for 64 MB of untouched 4 KB pages


def test_contents_are_kept_and_odd_ranges_cover_whole_pages_only():
    t = torch.arange(3 * MB, dtype=torch.uint8)
    expected = t.clone()
    base = t.data_ptr()
    ranges = [(base + 1, 4096), (base + 100, 10), (base + MB + 7, MB)]
    done = _core.populate_for_writing(ranges, 2)
    page = resource.getpagesize()
    whole = sum(
        max(0, (a + n) // page * page - (a + page - 1) // page * page) for a, n in ranges
    )
    assert done in (0, whole)  # 0: the kernel refuses the advice
    assert torch.equal(t, expected)
    assert _core.populate_for_writing([], 2) == 0
