"""torch.distributed.checkpoint directories at URLs (s3:// and http://), against real
servers on 127.0.0.1 (tests/remote_servers.py).

Directories are written by ``dcp.save`` (one process here; 2 gloo ranks from an FSDP2
model through tests/dcp_worker.py) and uploaded; everything read from the URL is compared
byte for byte with the same call on the local directory, and the bytes each server sent
are held to what the plan reads (x1.1) plus the headers the opening fetched.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

import fastckpt
from fastckpt.errors import CheckpointError

pytest.importorskip("obstore", reason="the 'remote' extra (obstore) is not installed")
pytest.importorskip("moto", reason="moto[server] (the test extra) is not installed")

from tests.conftest import same_bytes
from tests.remote_fixtures import BUCKET, rank_env, tensor_bytes, upload

STEP = 11


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(512, 128)
        self.fc1 = nn.Linear(128, 256)
        self.fc2 = nn.Linear(256, 128).to(torch.bfloat16)
        self.norm = nn.LayerNorm(128)


def fresh() -> Net:
    torch.manual_seed(1)
    return Net()


def same(a: nn.Module, b: nn.Module) -> None:
    same_bytes(a.state_dict(), b.state_dict())


def nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("remote_dcp") / "ckpt"
    torch.manual_seed(0)
    with warnings.catch_warnings():  # one process, no process group: on purpose
        warnings.simplefilter("ignore")
        dcp.save({"model": Net().state_dict(), "step": STEP}, checkpoint_id=folder)
    return folder


@pytest.fixture(params=["s3", "http"])
def served(request, saved):
    """(server, URL) of the saved directory, on S3 and on a plain HTTP Range server."""
    server = request.getfixturevalue("s3" if request.param == "s3" else "http_server")
    return server, upload(server, f"dcp-{request.param}", saved)


def test_open_lists_what_the_local_open_lists(served, saved):
    server, url = served
    with fastckpt.open(url) as remote, fastckpt.open(saved) as local:
        assert remote.format == "dcp" and str(remote.path) == url
        assert remote.keys() == local.keys()
        for name in local.keys():
            a, b = remote.info(name), local.info(name)
            assert (a.shape, a.dtype) == (b.shape, b.dtype), name
        assert [str(f) for f in remote.files] == [url + f.name for f in local.files]
        assert remote.value("step") == local.value("step") == STEP
        t = remote.tensor("fc2.weight")
        assert torch.equal(t.view(torch.uint8), local.tensor("fc2.weight").view(torch.uint8))
    # Opening fetched the headers: .metadata and each archive's zip records, no tensor.
    assert server.counters.body_bytes < nbytes(Net()) // 4


def test_load_into_matches_local_and_fetches_only_what_it_reads(served, saved):
    server, url = served
    local, remote = fresh(), fresh()
    fastckpt.load_into(local, saved)
    server.counters.reset()
    plan = fastckpt.plan(remote, url)
    header = plan.checkpoint._remote.header_bytes  # type: ignore[union-attr]
    report = fastckpt.load_into(remote, plan)
    same(local, remote)
    # Each tensor is one chunk, read whole; small ones share requests with their
    # neighbours, and the zip records between archives come along (less than 10%).
    assert nbytes(local) <= report.fetched <= 1.1 * nbytes(local)
    assert header < 64 << 10
    assert server.counters.body_bytes <= 1.1 * report.fetched + header


def test_load_into_a_meta_model_on_cpu(served, saved):
    _, url = served
    local = fresh()
    fastckpt.load_into(local, saved)
    with torch.device("meta"):
        model = Net()
    fastckpt.load_into(model, url, device="cpu")
    same(local, model)


def test_rows_rule_fetches_only_those_rows(s3, saved):
    url = upload(s3, "dcp-rows", saved)

    class Smaller(Net):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 128)

    rules = "emb.weight -> emb.weight rows[:100]"
    local, remote = Smaller(), Smaller()
    fastckpt.load_into(local, saved, rules)
    plan = fastckpt.plan(remote, url, rules)
    header = plan.checkpoint._remote.header_bytes  # type: ignore[union-attr]
    report = fastckpt.load_into(remote, plan)
    same(local, remote)
    assert nbytes(local) <= report.fetched <= 1.1 * nbytes(local)  # not the 412 other rows
    assert s3.counters.body_bytes <= 1.1 * report.fetched + header


def test_diff_against_the_local_directory(served, saved):
    _, url = served
    report = fastckpt.diff(url, saved, values=True)
    assert report.equal, report
    assert len(report.unchanged) == len(fastckpt.open(saved).keys())


def test_convert_from_a_url_writes_what_the_local_convert_writes(served, saved, tmp_path):
    from fastckpt.tools.convert import convert

    _, url = served
    convert(saved, tmp_path / "local")
    convert(url, tmp_path / "remote")
    a, b = tensor_bytes(tmp_path / "local"), tensor_bytes(tmp_path / "remote")
    assert a.keys() == b.keys() and len(a) == len(fastckpt.open(saved).keys())
    assert a == b
    assert sorted(p.name for p in (tmp_path / "remote").iterdir()) == sorted(
        p.name for p in (tmp_path / "local").iterdir()
    )


def test_convert_in_small_pieces_fetches_each_byte_once(s3, saved, tmp_path):
    """A piece of rows fetches those rows, not its whole chunk again."""
    from fastckpt.tools.convert import convert

    url = upload(s3, "dcp-pieces", saved)
    header = fastckpt.open(url)._remote.header_bytes  # type: ignore[union-attr]
    s3.counters.reset()
    convert(url, tmp_path / "remote", max_host_bytes=16 << 10)
    convert(saved, tmp_path / "local")
    assert tensor_bytes(tmp_path / "remote") == tensor_bytes(tmp_path / "local")
    assert s3.counters.body_bytes <= 1.1 * nbytes(Net()) + header


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(512, 512))
        self.b = nn.Parameter(torch.randn(1024, 512).to(torch.bfloat16))
        self.c = nn.Parameter(torch.randn(700, 300))


def test_load_in_many_small_windows(s3, tmp_path):
    """Windows of 512 KiB over 3 MiB: the archives share their object's memory file, and
    the pages one gives back never hold bytes another still needs."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": Wide().state_dict()}, checkpoint_id=tmp_path / "wide")
    url = upload(s3, "dcp-windows", tmp_path / "wide")
    # float64 parameters: every byte is cast, so it goes through the memory files (an
    # fp32 chunk into an fp32 parameter is fetched straight into it).
    torch.manual_seed(1)
    local = Wide().double()
    torch.manual_seed(2)
    remote = Wide().double()
    fastckpt.load_into(local, tmp_path / "wide")
    report = fastckpt.load_into(remote, url, max_host_bytes=1 << 20)
    same(local, remote)
    assert report.fetched == nbytes(local) // 2 - 1024 * 512 * 2  # float32 and bfloat16 read


def test_cli_inspect_a_dcp_url(s3, saved):
    from typer.testing import CliRunner

    from fastckpt.cli.app import app

    url = upload(s3, "dcp-cli", saved)
    result = CliRunner().invoke(app, ["inspect", url, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    local = json.loads(CliRunner().invoke(app, ["inspect", str(saved), "--json"]).output)
    assert sorted(t["name"] for t in doc["tensors"]) == sorted(t["name"] for t in local["tensors"])


# -- broken directories ------------------------------------------------------------------


def test_distcp_files_without_metadata_are_refused(s3, saved):
    url = upload(s3, "dcp-nometa", saved, skip=(".metadata",))
    with pytest.raises(CheckpointError, match=r"s3://ckpts/dcp-nometa/\.metadata: missing"):
        fastckpt.open(url)


def test_a_missing_distcp_file_is_named(served, saved):
    server, _ = served
    name = next(saved.glob("*.distcp")).name
    url = upload(server, "dcp-lost", saved, skip=(name,))
    with pytest.raises(CheckpointError, match=rf"{url}{name}: missing: \.metadata stores"):
        fastckpt.open(url)
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=name):
        fastckpt.load_into(model, url)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing written


@pytest.mark.parametrize("body", [b"", b"\x80\x04garbage", None], ids=["empty", "garbage", "cut"])
def test_broken_metadata_is_refused_by_url(s3, saved, body):
    url = upload(s3, "dcp-badmeta", saved)
    if body is None:
        body = (saved / ".metadata").read_bytes()[:-40]
    s3.client.put_object(Bucket=BUCKET, Key="dcp-badmeta/.metadata", Body=body)
    with pytest.raises(CheckpointError, match=r"s3://ckpts/dcp-badmeta/\.metadata"):
        fastckpt.open(url)


def test_a_file_name_that_leaves_the_directory_is_refused(s3, saved):
    meta = pickle.loads((saved / ".metadata").read_bytes())
    for info in meta.storage_data.values():
        info.relative_path = "../elsewhere/" + info.relative_path
    url = upload(s3, "dcp-escape", saved)
    s3.client.put_object(
        Bucket=BUCKET, Key="dcp-escape/.metadata", Body=pickle.dumps(meta, protocol=4)
    )
    with pytest.raises(CheckpointError, match=r"s3://ckpts/dcp-escape/\.metadata: .* leaves the"):
        fastckpt.open(url)


# -- 2 FSDP2 ranks, each fetching its shard ---------------------------------------------------


@pytest.mark.slow
def test_two_fsdp2_ranks_each_fetch_their_shard(s3, tmp_path, monkeypatch):
    from tests.rank_pool import run_ranks

    for r in run_ranks(2, tmp_path, ["save_big"], worker="tests.remote_dcp_worker"):
        assert r["save_big"]["ok"], r
    url = upload(s3, "dcp-fsdp2", tmp_path / "big")
    rank_env(tmp_path, url, monkeypatch)  # bytes per rank = its shard
    results = run_ranks(2, tmp_path, ["remote_dcp_fsdp2"], worker="tests.remote_dcp_worker")
    total = sum(f.stat().st_size for f in (tmp_path / "big").iterdir())
    for rank, r in enumerate(results):
        res = r["remote_dcp_fsdp2"]
        assert res["ok"], res
        assert res["wrong"] == [] and res["unlike_local"] == [] and res["sharded"] > 0, res
        assert 0 < res["fetched"] <= res["local_bytes"]  # its shard, no more
        assert res["header"] < 0.1 * res["local_bytes"]  # zip records, not tensors
        sent = s3.counters.by_key[f"rank{rank}"]
        assert sent <= 1.1 * res["fetched"] + res["header"], (rank, sent, res)
        assert sent < 0.6 * total  # not the whole directory
        print(f"rank {rank}: sent {sent} B: plan {res['fetched']}, headers {res['header']}")


def test_small_chunks_share_requests(http_server, tmp_path):
    """Forty 4 KiB chunks, each in an archive of its own: fetched one request each (as
    straight-in reads of their parameters were), a load would be forty round trips; the
    memory file's window takes them, and the zip records between them, together."""
    folder = tmp_path / "small"
    torch.manual_seed(0)
    model = nn.ParameterDict({f"p{i}": nn.Parameter(torch.randn(32, 32)) for i in range(40)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(model.state_dict(), checkpoint_id=folder)
    url = upload(http_server, "small", folder)
    got = nn.ParameterDict({f"p{i}": nn.Parameter(torch.empty(32, 32)) for i in range(40)})
    plan = fastckpt.plan(got, url)
    http_server.counters.reset()
    report = fastckpt.load_into(got, plan)
    same(model, got)
    assert http_server.counters.gets == 1
    assert nbytes(model) <= report.fetched <= 1.5 * nbytes(model)  # + the records between
