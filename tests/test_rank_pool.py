"""The shared rank pools (tests/rank_pool.py) report a scenario's error with its traceback,
and a rank that dies fails the request at once, naming the rank, instead of hanging it.

This module is also the worker its requests name (SCENARIOS, write_checkpoints).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.rank_pool import RankPool, run_ranks


def write_checkpoints(folder: Path) -> None:
    (folder / "written").write_text("once")


def _rank_and_file(folder: Path) -> dict:
    import torch.distributed as dist

    return {"rank": dist.get_rank(), "written": (folder / "written").read_text()}


def _raise(folder: Path) -> dict:
    raise ValueError(f"no such checkpoint in {folder.name}")


def _exit(folder: Path) -> dict:
    os._exit(3)


SCENARIOS = {"rank_and_file": _rank_and_file, "raise": _raise, "exit": _exit}


def test_scenarios_run_after_rank_0_wrote_the_folder_and_errors_come_back(tmp_path):
    got = run_ranks(1, tmp_path, ["raise", "rank_and_file"], "tests.test_rank_pool")[0]
    assert got["raise"]["ok"] is False
    assert got["raise"]["error"] == f"ValueError: no such checkpoint in {tmp_path.name}"
    assert "in _raise" in got["raise"]["trace"]
    assert got["rank_and_file"] == {"ok": True, "rank": 0, "written": "once"}


def test_a_rank_that_dies_fails_the_request_by_name_not_by_timeout(tmp_path):
    pool = RankPool(1)  # its own: the shared one stays up for the other tests
    start = time.monotonic()
    try:
        with pytest.raises(AssertionError, match=r"\['exit'\]: rank 0 exited"):
            pool.run("tests.test_rank_pool", tmp_path, ["exit"], timeout=120)
    finally:
        pool.close()
    assert time.monotonic() - start < 100
    assert pool.procs[0].returncode == 3
