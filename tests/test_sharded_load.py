"""Sharded models (FSDP2, tensor parallel, 2-D) load with each rank reading its own shard.

2 and 4 gloo CPU ranks (the session's shared pools, tests/rank_pool.py) run the
scenarios of tests/sharded_worker.py; each compares every parameter's ``full_tensor()``
byte for byte with a plain load of the same file. A rank that hangs fails the test by
timeout.
"""

from __future__ import annotations

import pytest

from tests.rank_pool import run_ranks

SCENARIOS = [
    "fsdp2",
    "tp",
    "dp_tp",
    "meta_to_empty",
    "meta_device",
    "rules_rows",
    "tied",
    "strict_refusal",
    "other_file",
    "pages",
]
# Four ranks on two cores are slow to start: there, the scenarios whose geometry
# changes with the rank count (2-D needs four) and the collective ones.
FOUR_RANKS = ["fsdp2", "tp", "dp_tp", "meta_device", "strict_refusal", "other_file", "pages"]


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"sharded{request.param}")
    scenarios = SCENARIOS if request.param == 2 else FOUR_RANKS
    return request.param, run_ranks(request.param, folder, scenarios)


def results(ranks, scenario: str) -> list[dict]:
    world, per_rank = ranks
    if scenario not in per_rank[0]:
        pytest.skip(f"{scenario} runs on 2 ranks only")
    out = [r[scenario] for r in per_rank]
    for rank, r in enumerate(out):
        assert r["ok"], f"rank {rank} of {world}: {r.get('error')}\n{r.get('trace', '')}"
    return out


@pytest.mark.parametrize("scenario", ["fsdp2", "tp", "dp_tp", "meta_to_empty", "meta_device",
                                      "rules_rows", "tied"])  # fmt: skip
def test_full_tensors_equal_a_plain_load(ranks, scenario):
    for rank, r in enumerate(results(ranks, scenario)):
        assert r["wrong"] == [], (rank, r)
        assert r["sharded"] > 0 and r["checked"] > 0


def test_fsdp2_ranks_read_their_share(ranks):
    world, _ = ranks
    got = results(ranks, "fsdp2")
    # Together the ranks read every sharded parameter's bytes exactly once, and
    # the plain buffer (not sharded by FSDP2) once each.
    r0 = got[0]
    expect = r0["file_bytes"] + (world - 1) * r0["buffer_bytes"]
    assert sum(r["bytes"] for r in got) == expect


def test_two_d_mesh_uses_strided_sharding(ranks):
    world, _ = ranks
    if world < 4:
        pytest.skip("a 2 x 2 mesh needs 4 ranks")
    got = results(ranks, "dp_tp")
    assert any("_StridedShard" in p or "_S(" in p for p in got[0]["placements"]), got[0]


def test_rules_rename_and_cut_rows(ranks):
    for r in results(ranks, "rules_rows"):
        assert r["renamed"] > 0


def test_tied_embeddings_stay_tied(ranks):
    for r in results(ranks, "tied"):
        assert r["tied"]


def test_strict_refusal_on_one_rank_refuses_on_all_with_nothing_written(ranks):
    world, _ = ranks
    got = results(ranks, "strict_refusal")
    for rank, r in enumerate(got):
        assert r["untouched"], rank
        if rank == world - 1:
            assert r["raised"].startswith("StrictLoadError"), r["raised"]
        else:
            assert (
                f"rank {world - 1} (the checkpoint does not fit its shard) refused" in r["raised"]
            )


def test_a_rank_with_another_file_is_an_error_not_a_hang(ranks):
    world, _ = ranks
    for rank, r in enumerate(results(ranks, "other_file")):
        assert r["untouched"], rank
        assert f"rank(s) [{world - 1}] opened differs from rank 0's" in r["raised"], r["raised"]


def test_cold_ranks_fetch_only_their_shards_pages(ranks):
    world, _ = ranks
    for rank, r in enumerate(results(ranks, "pages")):
        assert r["wrong"] == []
        assert r["before"] == 0
        limit = 1.2 * r["shard_pages"] + 1024  # + 4 MB
        assert r["shard_pages"] <= r["fetched"] <= limit, (rank, r)
        assert r["local_bytes"] * world == (4096 * 512 + 2048 * 1024) * 4
