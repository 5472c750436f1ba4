"""DeepSpeed ZeRO folders at URLs (s3:// on moto; http:// refused: it cannot list), against
real servers on 127.0.0.1 (tests/remote_servers.py).

The committed DeepSpeed 0.19 fixtures (tests/data/deepspeed) are uploaded and everything
read from the URL is compared byte for byte with the same call on the local folder. They
are a few KiB, less than the zip records an open fetches, so the bytes a load leaves
unfetched are measured on a larger ZeRO-2 folder (tests/remote_deepspeed_worker.py), whose
local read is first checked against the parameters it was written from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import fastckpt
from fastckpt.errors import CheckpointError
from tests.fixtures.make_deepspeed import Net

pytest.importorskip("obstore", reason="the 'remote' extra (obstore) is not installed")
pytest.importorskip("moto", reason="moto[server] (the test extra) is not installed")

from tests.conftest import same_bytes
from tests.remote_deepspeed_worker import Big, reference, write_zero2
from tests.remote_fixtures import BUCKET, rank_env, tensor_bytes, upload

DATA = Path(__file__).resolve().parent / "data" / "deepspeed"
# The servers of the DCP tests: moto's S3 (one per module) and a Range server.
RUNS = ["zero2", "zero3", "zero3_bf16"]


def same(a: nn.Module, b: nn.Module) -> None:
    same_bytes(a.state_dict(), b.state_dict())


def fresh_net() -> Net:
    torch.manual_seed(1)  # other values than the checkpoint's
    return Net()


@pytest.fixture(params=[(r, t) for r in RUNS for t in ("top", "tag")],
                ids=lambda p: f"{p[0]}-{p[1]}")  # fmt: skip
def served(request, s3):
    """(run, local folder, URL): the folder via ``latest``, or its tag folder itself."""
    run, form = request.param
    url = upload(s3, f"ds-{run}", DATA / run)
    if form == "tag":
        return run, DATA / run / "global_step2", url + "global_step2/"
    return run, DATA / run, url


def test_open_lists_what_the_local_open_lists(served):
    _, folder, url = served
    with fastckpt.open(url) as remote, fastckpt.open(folder) as local:
        assert remote.format == "deepspeed" and str(remote.path) == url
        assert remote.keys() == local.keys()
        for name in local.keys():
            a, b = remote.info(name), local.info(name)
            assert (a.shape, a.dtype) == (b.shape, b.dtype), name
            x, y = remote.tensor(name), local.tensor(name)
            assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name
        assert (remote.zero_stage, remote.world_size) == (local.zero_stage, local.world_size)
        assert remote.metadata["tag"] == "global_step2"
        assert [Path(str(f)).name for f in remote.files] == [f.name for f in local.files]
        assert all(str(f).startswith(f"s3://{BUCKET}/") for f in remote.files)


def test_load_into_matches_local(served):
    _, folder, url = served
    local, remote = fresh_net(), fresh_net()
    fastckpt.load_into(local, folder)
    report = fastckpt.load_into(remote, url)
    same(local, remote)
    assert report.fetched > 0


def test_load_into_a_meta_model_on_cpu(served):
    _, folder, url = served
    local = fresh_net()
    fastckpt.load_into(local, folder)
    with torch.device("meta"):
        model = Net()
    fastckpt.load_into(model, url, device="cpu")
    same(local, model)


def test_diff_against_the_local_folder(served):
    _, folder, url = served
    report = fastckpt.diff(url, folder, values=True)
    assert report.equal, report
    assert len(report.unchanged) == len(fastckpt.open(folder).keys())


def test_convert_from_a_url_writes_what_the_local_convert_writes(s3, tmp_path):
    from fastckpt.tools.convert import convert

    url = upload(s3, "ds-convert", DATA / "zero3_bf16")
    convert(DATA / "zero3_bf16", tmp_path / "local")
    convert(url, tmp_path / "remote", max_host_bytes=1 << 10)  # in pieces of rows
    a, b = tensor_bytes(tmp_path / "local"), tensor_bytes(tmp_path / "remote")
    assert a.keys() == b.keys() and len(a) > 0
    assert a == b


def test_cli_inspect_a_deepspeed_url(s3):
    from typer.testing import CliRunner

    from fastckpt.cli.app import app

    url = upload(s3, "ds-cli", DATA / "zero2")
    result = CliRunner().invoke(app, ["inspect", url, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    local = json.loads(CliRunner().invoke(app, ["inspect", str(DATA / "zero2"), "--json"]).output)
    assert sorted((t["name"], t["shape"], t["dtype"]) for t in doc["tensors"]) == sorted(
        (t["name"], t["shape"], t["dtype"]) for t in local["tensors"]
    )


def test_hf_trainer_folder_at_a_url_opens_its_model_file(s3, tmp_path):
    """A Trainer's checkpoint-N/ holds model.safetensors beside latest + global_stepN/: the
    model file wins, as locally; the tag folder opens the ZeRO state."""
    from safetensors.torch import save_file

    save_file({"only.weight": torch.ones(2)}, tmp_path / "model.safetensors")
    url = upload(s3, "ds-trainer", DATA / "zero2")
    s3.client.put_object(Bucket=BUCKET, Key="ds-trainer/model.safetensors",
                         Body=(tmp_path / "model.safetensors").read_bytes())  # fmt: skip
    with fastckpt.open(url) as ckpt:
        assert ckpt.format == "safetensors" and ckpt.keys() == ["only.weight"]
    with fastckpt.open(url + "global_step2/") as ckpt:
        assert ckpt.format == "deepspeed" and "up.weight" in ckpt.keys()


# -- a larger folder: what a load fetches -------------------------------------------------


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    folder = write_zero2(tmp_path_factory.mktemp("remote_ds") / "zero2", reference())
    # The local read gives the parameters it was written from (the layout is right).
    model = Big()
    fastckpt.load_into(model, folder)
    same(model, reference())
    return folder


def _optim_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*_optim_states.pt"))


def _nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_load_fetches_only_the_runs_it_reads(s3, big):
    url = upload(s3, "ds-big", big)
    local, remote = Big(), Big()
    fastckpt.load_into(local, big)
    plan = fastckpt.plan(remote, url)
    header = plan.checkpoint._remote.header_bytes  # type: ignore[union-attr]
    report = fastckpt.load_into(remote, plan)
    same(local, remote)
    assert report.fetched == _nbytes(local)  # the partitions' runs and the buffer, once
    # Per file its first 16 KiB and last 64 KiB (most zips' records), not the partitions.
    assert header < 0.05 * sum(f.stat().st_size for f in big.rglob("*.pt"))
    sent = s3.counters.body_bytes
    assert sent <= 1.1 * report.fetched + header
    # Adam's moments beside the partitions are never fetched: the optimizer files are
    # about 3x what the parameters take.
    assert sent < 0.5 * _optim_bytes(big)
    print(f"sent {sent} B: plan {report.fetched}, headers {header}, optim {_optim_bytes(big)}")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_rows_rule_and_a_part_of_the_model_fetch_less(s3, big):
    url = upload(s3, "ds-rows", big)

    class Part(nn.Module):  # the embedding's first 100 rows and the norm only
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(100, 256)
            self.norm = nn.LayerNorm(256)

    rules = "embed.weight -> embed.weight rows[:100]"
    local, remote = Part(), Part()
    fastckpt.load_into(local, big, rules, strict=False)
    plan = fastckpt.plan(remote, url, rules)
    header = plan.checkpoint._remote.header_bytes  # type: ignore[union-attr]
    report = fastckpt.load_into(remote, plan, strict=False)  # the blocks are not read
    same(local, remote)
    assert report.fetched == _nbytes(local)
    sent = s3.counters.body_bytes
    assert sent <= 1.1 * report.fetched + header
    assert sent < 0.1 * _optim_bytes(big)
    print(f"sent {sent} B: plan {report.fetched}, headers {header}, optim {_optim_bytes(big)}")


# -- refusals -----------------------------------------------------------------------------


def test_http_cannot_list_a_deepspeed_folder(http_server):
    url = upload(http_server, "ds-http", DATA / "zero2")
    for u in (url, url + "global_step2/"):
        with pytest.raises(CheckpointError, match=r"DeepSpeed checkpoint folder .*listing") as e:
            fastckpt.open(u)
        assert u in str(e.value)


def test_latest_naming_a_missing_tag_is_named(s3):
    url = upload(s3, "ds-notag", DATA / "zero2")
    s3.client.put_object(Bucket=BUCKET, Key="ds-notag/latest", Body=b"global_step9")
    with pytest.raises(CheckpointError, match=rf"{url}global_step9/: missing: .*latest"):
        fastckpt.open(url)


def test_latest_leaving_the_folder_is_refused(s3):
    url = upload(s3, "ds-escape", DATA / "zero2")
    s3.client.put_object(Bucket=BUCKET, Key="ds-escape/latest", Body=b"../../etc")
    with pytest.raises(CheckpointError, match=rf"{url}latest: does not name a tag folder"):
        fastckpt.open(url)


def test_a_missing_rank_file_is_named_and_nothing_written(s3):
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    url = upload(s3, "ds-lost", DATA / "zero2", skip=(f"global_step2/{name}",))
    model = fresh_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"holds 1 \*_optim_states.pt file") as e:
        fastckpt.load_into(model, url)
    assert f"{url}global_step2" in str(e.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- 2 FSDP2 ranks, each fetching its shard ---------------------------------------------------


@pytest.mark.slow
def test_two_fsdp2_ranks_each_fetch_their_shard(s3, big, tmp_path, monkeypatch):
    import shutil

    from tests.rank_pool import run_ranks

    shutil.copytree(big, tmp_path / "zero2")  # the ranks' local load reads it there
    url = upload(s3, "ds-fsdp2", big)
    rank_env(tmp_path, url, monkeypatch)  # bytes per rank = its shard
    results = run_ranks(2, tmp_path, ["remote_deepspeed_fsdp2"],
                        worker="tests.remote_deepspeed_worker")  # fmt: skip
    for rank, r in enumerate(results):
        res = r["remote_deepspeed_fsdp2"]
        assert res["ok"], res
        assert res["wrong"] == [] and res["unlike_local"] == [] and res["sharded"] > 0, res
        assert 0 < res["fetched"] <= res["local_bytes"]  # its shard, no more
        sent = s3.counters.by_key[f"rank{rank}"]
        assert sent <= 1.1 * res["fetched"] + res["header"], (rank, sent, res)
        assert sent < 0.3 * _optim_bytes(big)
        print(f"rank {rank}: sent {sent} B: plan {res['fetched']}, headers {res['header']}")
