"""load_into(..., read="once"): each byte a group of ranks needs is read from storage by one
of them and sent to the others.

The distributed scenarios run as gloo CPU ranks (tests/read_once_worker.py): each
compares every local tensor byte for byte with an ordinary load and with the
file's values. Groups of 2 ranks stand for nodes: each rank has its own copy
of the file, evicted, so the pages it fetched are the pages it read.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import fastckpt
from fastckpt.load.read_once import PAGE, Task, merge, segments
from tests.rank_pool import run_ranks

TWO = ["fsdp2", "tp", "replicated", "tied", "cast", "rows_rules", "small_window", "other_file"]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return run_ranks(2, tmp_path_factory.mktemp("once2"), TWO, "tests.read_once_worker")


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    folder = tmp_path_factory.mktemp("once4")
    return run_ranks(4, folder, ["nodes", "dp_tp"], "tests.read_once_worker")


def ok(per_rank: list[dict], scenario: str) -> list[dict]:
    out = [r[scenario] for r in per_rank]
    for rank, r in enumerate(out):
        assert r["ok"], f"rank {rank}: {r.get('error')}\n{r.get('trace', '')}"
    return out


@pytest.mark.parametrize("scenario", ["fsdp2", "tp", "replicated", "tied", "cast", "rows_rules"])
def test_same_bytes_as_an_ordinary_load(two, scenario):
    got = ok(two, scenario)
    for rank, r in enumerate(got):
        assert r["wrong"] == [] and r["differ_from_own"] == [], (rank, r)
        assert r["checked"] == 25
    # Together the ranks read from storage exactly what they copy, less what they share.
    sent = sum(r["sent"] for r in got)
    assert sum(r["read"] for r in got) + sent == sum(r["bytes"] for r in got)
    assert sum(r["received"] for r in got) == sent


def test_replicated_bytes_are_read_once_and_spread(two):
    got = ok(two, "replicated")
    total = got[0]["bytes"]
    assert all(r["bytes"] == total for r in got)
    assert sum(r["read"] for r in got) == total
    assert all(r["read"] > 0 and r["read"] + r["received"] == total for r in got)


def test_fsdp2_shards_are_read_by_their_own_rank(two):
    got = ok(two, "fsdp2")
    # Only the plain (replicated) 20-byte buffer travels.
    assert sum(r["sent"] for r in got) == 5 * 4


def test_tied_embeddings_stay_tied(two):
    assert all(r["tied"] for r in ok(two, "tied"))


def test_casts_and_renames_are_reported(two):
    assert all(r["cast"] == 25 for r in ok(two, "cast"))
    assert all(r["renamed"] > 0 for r in ok(two, "rows_rules"))


def test_a_host_budget_below_the_tensors(two):
    got = ok(two, "small_window")
    for r in got:
        assert r["wrong"] == []
    assert sum(r["read"] for r in got) == (512 * 4096 + 2048 * 1024) * 4


def test_a_rank_with_another_file_refuses_everywhere(two):
    for rank, r in enumerate(ok(two, "other_file")):
        assert r["untouched"], rank
        assert "rank(s) [1] opened differs from rank 0's" in r["raised"], r["raised"]


def test_each_node_reads_each_page_once(four):
    got = ok(four, "nodes")
    for r in got:
        assert r["wrong"] == [] and r["before"] == 0
        # An ordinary load: every rank fetches the whole file.
        assert r["fetched_own"] == r["file_pages"]
    for node in (0, 1):
        ranks = [r for r in got if r["node"] == node]
        # Each data byte read by exactly one rank of the node...
        assert sum(r["read"] for r in ranks) == ranks[0]["data_bytes"]
        assert all(r["read"] + r["received"] == r["data_bytes"] for r in ranks)
        # ...and each page fetched by one: the header's page (every rank parses it) and
        # a page where two ranks' parts meet may be fetched twice.
        pages = sum(r["fetched_once"] for r in ranks)
        assert r["file_pages"] <= pages <= r["file_pages"] + 2 * len(ranks)
        # The work is spread: each rank fetched about half.
        assert all(abs(r["fetched_once"] - r["file_pages"] / 2) <= 8 for r in ranks)


def test_shards_two_of_four_ranks_hold_travel_point_to_point(four):
    got = ok(four, "dp_tp")
    for rank, r in enumerate(got):
        assert r["wrong"] == [] and r["differ_from_own"] == [], (rank, r)
    sent = sum(r["sent"] for r in got)
    assert sent > 0 and sum(r["received"] for r in got) == sent
    assert sum(r["read"] for r in got) + sent == sum(r["bytes"] for r in got)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank (two)")
def test_nccl_stages_through_the_gpus(tmp_path):
    got = ok(run_ranks(2, tmp_path, ["nccl"], "tests.read_once_worker"), "nccl")
    for r in got:
        assert r["wrong"] == [] and r["checked"] == 25
    assert sum(r["received"] for r in got) > 0


# -- in one process: the byte runs, the segments, the API's refusals ----------------------


def brute_bytes(t: Task) -> set[int]:
    """Every byte of the file the task's elements lie on, element by element."""
    offset, _, strides = t.view
    shape = t.shape()
    rows = None
    if t.rows is not None:
        rows = (list(range(t.rows[0], t.rows[0] + t.rows[1])) if isinstance(t.rows, tuple)
                else list(t.rows))  # fmt: skip
    out: set[int] = set()
    for idx in itertools.product(*(range(n) for n in shape)):
        idx = list(idx)
        if rows is not None:
            idx[0] = rows[idx[0]]
        at = t.base + (offset + sum(i * s for i, s in zip(idx, strides, strict=True))) * 4
        out.update(range(at, at + 4))
    return out


def run_bytes(runs: torch.Tensor) -> set[int]:
    return {b for lo, hi in runs.tolist() for b in range(lo, hi)}


CASES = [
    ((3, (4, 6), (6, 1)), None),  # contiguous
    ((1, (4, 3), (6, 1)), None),  # a column block: runs of 3
    ((0, (6, 4), (1, 6)), None),  # transposed: single elements
    ((0, (5, 6), (6, 1)), (1, 3)),  # a row range
    ((0, (5, 2, 3), (6, 3, 1)), [4, 0, 2]),  # a row list
    ((2, (), ()), None),  # a scalar
]


@pytest.mark.parametrize("view,rows", CASES)
def test_runs_hull_and_parts_cover_exactly_the_elements(view, rows):
    dst = torch.empty(Task(0, 0, 0, view, rows, None, torch.empty(0), 100, 4).shape())
    t = Task(0, 0, 0, view, rows, None, dst, 100, 4)
    want = brute_bytes(t)
    assert run_bytes(t.runs()) == want
    lo, hi = t.hull()
    assert lo == min(want) and hi == max(want) + 1
    parts = t.split(8)
    assert set().union(*(brute_bytes(p) for p in parts)) == want
    assert sum(p.dst.numel() for p in parts) == dst.numel()
    if dst.numel() > 1:
        assert len(parts) > 1


def test_merge_joins_overlapping_and_touching_runs():
    runs = torch.tensor([[10, 20], [0, 5], [5, 8], [15, 30], [40, 41]])
    assert merge(runs).tolist() == [[0, 8], [10, 30], [40, 41]]


def test_segments_give_each_byte_one_reader_among_those_needing_it():
    big = 10 * PAGE
    needs = [
        {0: torch.tensor([[0, big], [big + 100, big + 200]])},
        {0: torch.tensor([[0, big]]), 1: torch.tensor([[0, 50]])},
        {0: torch.tensor([[big // 2, big + 150]])},
    ]
    segs = segments(needs, 3, window=1 << 20)
    covered: dict[tuple[int, int], tuple[int, ...]] = {}
    for s in segs:
        assert s.owner in s.needers
        for b in range(s.start, s.end):
            assert (s.file, b) not in covered  # each byte in one segment
            covered[(s.file, b)] = s.needers
    for g, need in enumerate(needs):
        for f, runs in need.items():
            for lo, hi in runs.tolist():
                assert all(g in covered[(f, b)] for b in range(lo, hi))
    assert set(covered) == {(f, b) for need in needs for f, runs in need.items()
                            for b in run_bytes(runs)}  # fmt: skip
    # The range all three share is read in parts by all three.
    shared = [s for s in segs if s.needers == (0, 1, 2)]
    assert {s.owner for s in shared} == {0, 1, 2}


def test_read_modes_refuse_what_cannot_go_together(tmp_path):
    from safetensors.torch import save_file

    model = nn.Linear(2, 2)
    path = tmp_path / "m.safetensors"
    save_file(dict(model.state_dict()), str(path))
    with pytest.raises(ValueError, match="read must be 'own' or 'once'"):
        fastckpt.load_into(model, path, read="twice")
    with pytest.raises(ValueError, match="goes with read='once'"):
        fastckpt.load_into(model, path, group=object())
    with pytest.raises(ValueError, match="init_process_group first"):
        fastckpt.load_into(model, path, read="once")


def test_bench_refuses_an_unknown_read_mode():
    from typer.testing import CliRunner

    from fastckpt.cli.app import app

    result = CliRunner().invoke(app, ["bench", "--ranks", "2", "--read", "twice"])
    assert result.exit_code == 2
    assert "--read must be 'own' or 'once'" in result.output
