"""Remote checkpoints (s3:// and http://) against real servers on 127.0.0.1.

Values are compared byte for byte with a load of the same file from local disk;
the bytes each server sent are counted at the server and held to the bytes the
plan reads (x1.1) plus the headers.
"""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file
from torch import nn

import fastckpt
from fastckpt.errors import CheckpointError

pytest.importorskip("obstore", reason="the 'remote' extra (obstore) is not installed")
pytest.importorskip("moto", reason="moto[server] (the test extra) is not installed")

from tests.remote_fixtures import BUCKET, SECRET, rank_env


class Net(nn.Module):
    def __init__(self, vocab: int = 1024) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 256)
        self.fc1 = nn.Linear(256, 512)
        self.fc2 = nn.Linear(512, 256)
        self.norm = nn.LayerNorm(256)


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in Net().state_dict().items()}


def assert_same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)), k


def fresh(vocab: int = 1024) -> Net:
    torch.manual_seed(1)
    return Net(vocab)


def st_header_bytes(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def put(server, key: str, path: Path) -> str:
    server.client.put_object(Bucket=BUCKET, Key=key, Body=path.read_bytes())
    server.counters.reset()
    return f"s3://{BUCKET}/{key}"


@pytest.fixture
def st_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(state(), str(path))
    return path


def test_s3_safetensors_matches_local_and_fetches_only_what_it_reads(s3, st_file):
    url = put(s3, "one/model.safetensors", st_file)
    local, remote = fresh(), fresh()
    fastckpt.load_into(local, st_file)
    report = fastckpt.load_into(remote, url)
    assert_same(local, remote)
    data = st_file.read_bytes()
    needed = sum(t.numel() * t.element_size() for t in state().values())
    assert report.fetched == needed
    assert s3.counters.body_bytes <= 1.1 * needed + st_header_bytes(data) + (16 << 10)


def test_s3_rows_rule_fetches_only_the_rows(s3, st_file):
    url = put(s3, "rows/model.safetensors", st_file)
    local, remote = fresh(vocab=100), fresh(vocab=100)
    rules = "emb.weight -> emb.weight rows[:100]"
    fastckpt.load_into(local, st_file, rules)
    report = fastckpt.load_into(remote, url, rules)
    assert_same(local, remote)
    needed = sum(t.numel() * t.element_size() for k, t in state().items() if k != "emb.weight")
    needed += 100 * 256 * 4
    assert report.fetched == needed
    header = st_header_bytes(st_file.read_bytes())
    assert s3.counters.body_bytes <= 1.1 * needed + header + (16 << 10)


def test_s3_plan_and_open(s3, st_file):
    url = put(s3, "open/model.safetensors", st_file)
    with fastckpt.open(url) as ckpt:
        assert str(ckpt.path) == url
        assert sorted(ckpt.keys()) == sorted(state())
        assert torch.equal(ckpt.tensor("fc1.weight"), state()["fc1.weight"])
    model = fresh()
    plan = fastckpt.plan(model, url)
    fastckpt.load_into(model, plan)
    local = fresh()
    fastckpt.load_into(local, st_file)
    assert_same(local, model)


def test_s3_sharded_folder(s3, tmp_path):
    sd = state()
    names = sorted(sd)
    folder = tmp_path / "hf"
    folder.mkdir()
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for f in folder.iterdir():
        put(s3, f"hf/{f.name}", f)
    local, remote = fresh(), fresh()
    fastckpt.load_into(local, folder)
    fastckpt.load_into(remote, f"s3://{BUCKET}/hf/")
    assert_same(local, remote)


def test_s3_torch_zip(s3, tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(state(), path)
    url = put(s3, "zip/pytorch_model.bin", path)
    local, remote = fresh(), fresh()
    fastckpt.load_into(local, path)
    report = fastckpt.load_into(remote, url)
    assert_same(local, remote)
    needed = sum(t.numel() * t.element_size() for t in state().values())
    assert needed <= report.fetched <= 1.1 * needed  # with the records' headers between
    # Headers: the zip's directory and records (at most a few tail/head blocks here).
    assert s3.counters.body_bytes <= 1.1 * needed + (128 << 10)


def test_missing_object_and_bucket_read_as_a_missing_path(s3):
    url = f"s3://{BUCKET}/nope/model.safetensors"
    with pytest.raises(FileNotFoundError, match="s3://ckpts/nope/model.safetensors"):
        fastckpt.open(url)
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket/m.safetensors"):
        fastckpt.open("s3://no-such-bucket/m.safetensors")
    with pytest.raises(FileNotFoundError, match="s3://ckpts/empty-prefix/"):
        fastckpt.open(f"s3://{BUCKET}/empty-prefix/")


def test_deepspeed_folders_and_dcp_directories_at_urls_open(s3, tmp_path):
    """A DeepSpeed folder and a DCP directory in a bucket open for what they are
    (tests/test_remote_deepspeed.py and tests/test_remote_dcp.py load them)."""
    import torch.distributed.checkpoint as dcp

    w = torch.randn(4, 4)
    dcp.save({"w": w}, checkpoint_id=str(tmp_path / "dcp"))
    for f in (tmp_path / "dcp").iterdir():
        put(s3, f"train/dcp/{f.name}", f)
    zero = Path(__file__).parent / "data" / "deepspeed" / "zero2"
    for f in zero.rglob("*"):
        if f.is_file():
            put(s3, f"train/zero2/{f.relative_to(zero)}", f)
    with fastckpt.open(f"s3://{BUCKET}/train/dcp/") as ckpt:
        assert ckpt.format == "dcp" and ckpt.keys() == ["w"]
        assert torch.equal(ckpt.tensor("w").view(torch.uint8), w.view(torch.uint8))
    with fastckpt.open(f"s3://{BUCKET}/train/zero2") as ckpt, fastckpt.open(zero) as local:
        assert ckpt.format == "deepspeed" and ckpt.keys() == local.keys()


def test_403_names_the_url_not_the_credentials(s3, st_file):
    url = put(s3, "deny/model.safetensors", st_file)
    s3.fault = ("status", 403, -1)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="s3://ckpts/deny/model.safetensors") as e:
        fastckpt.open(url)
    assert time.monotonic() - started < 20
    assert SECRET not in str(e.value) and "testing" not in str(e.value)


def test_closed_port_fails_in_bounded_time(s3, monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="s3://ckpts/x/model.safetensors"):
        fastckpt.open(f"s3://{BUCKET}/x/model.safetensors")
    assert time.monotonic() - started < 20


def test_5xx_is_retried(s3, st_file):
    url = put(s3, "retry/model.safetensors", st_file)
    s3.fault = ("status", 503, 2)
    model = fresh()
    fastckpt.load_into(model, url)
    local = fresh()
    fastckpt.load_into(local, st_file)
    assert_same(local, model)


def test_stalled_server_times_out(s3, st_file, monkeypatch):
    url = put(s3, "stall/model.safetensors", st_file)
    monkeypatch.setenv("FASTCKPT_REMOTE_TIMEOUT", "1")
    monkeypatch.setenv("FASTCKPT_REMOTE_RETRIES", "1")
    monkeypatch.setenv("FASTCKPT_REMOTE_RETRY_SECONDS", "2")
    s3.fault = ("stall", 4)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="s3://ckpts/stall/model.safetensors"):
        fastckpt.open(url)
    assert time.monotonic() - started < 15


def test_object_changed_after_open_is_refused(s3, st_file, tmp_path):
    url = put(s3, "change/model.safetensors", st_file)
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = fastckpt.plan(model, url)
    other = {k: v + 1 for k, v in state().items()}
    changed = tmp_path / "changed.safetensors"
    save_file(other, str(changed))
    put(s3, "change/model.safetensors", changed)  # same size, other bytes: a new ETag
    with pytest.raises(CheckpointError, match="changed"):
        fastckpt.load_into(model, plan)
    for k, v in model.state_dict().items():  # refused before anything was written
        assert torch.equal(v, before[k]), k


def test_http_safetensors_and_zip_match_local(http_server, st_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCKPT_REMOTE_TIMEOUT", "5")
    zpath = tmp_path / "pytorch_model.bin"
    torch.save(state(), zpath)
    http_server.files["/m/model.safetensors"] = st_file.read_bytes()
    http_server.files["/z/pytorch_model.bin"] = zpath.read_bytes()
    local = fresh()
    fastckpt.load_into(local, st_file)
    for url in (f"{http_server.url}/m/model.safetensors", f"{http_server.url}/z/"):
        http_server.counters.reset()
        remote = fresh()
        report = fastckpt.load_into(remote, url)
        assert_same(local, remote)
        assert http_server.counters.body_bytes <= 1.1 * report.fetched + (128 << 10)
        assert http_server.counters.gets > 1  # ranged reads, not one download


def test_http_object_changed_during_load_is_refused(http_server, st_file, monkeypatch):
    data = st_file.read_bytes()
    http_server.files["/m/model.safetensors"] = data
    model = fresh()
    plan = fastckpt.plan(model, f"{http_server.url}/m/model.safetensors")
    http_server.files["/m/model.safetensors"] = data[:-4] + b"\0\0\0\1"
    with pytest.raises(CheckpointError, match="changed"):
        fastckpt.load_into(model, plan)


def test_http_dropped_connections_are_retried(http_server, st_file, monkeypatch):
    """Connections closed halfway through a body (the header's read and the tensors'):
    each such request is asked again, and the load ends with the file's values."""
    monkeypatch.setenv("FASTCKPT_REMOTE_TIMEOUT", "5")
    http_server.files["/m/model.safetensors"] = st_file.read_bytes()
    local = fresh()
    fastckpt.load_into(local, st_file)
    http_server.fault = ("cut", 3)
    remote = fresh()
    fastckpt.load_into(remote, f"{http_server.url}/m/model.safetensors")
    assert http_server.fault == ("cut", 0)  # all three were cut
    assert_same(local, remote)


def test_http_connections_dropped_every_time_fail_naming_the_url(http_server, st_file, monkeypatch):
    monkeypatch.setenv("FASTCKPT_REMOTE_TIMEOUT", "5")
    monkeypatch.setenv("FASTCKPT_REMOTE_RETRIES", "2")
    url = f"{http_server.url}/m/model.safetensors"
    http_server.files["/m/model.safetensors"] = st_file.read_bytes()
    model = fresh()
    plan = fastckpt.plan(model, url)
    http_server.fault = ("cut", -1)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=re.escape(url) + ".*connection was closed"):
        fastckpt.load_into(model, plan)
    assert time.monotonic() - started < 20


def test_http_responses_held_at_once_stay_within_max_host_bytes(http_server, monkeypatch):
    """Each part's body is held whole before it is copied: parts are cut to the budget and
    no more of them are in flight than it allows (each request stalled 0.1 s, so those
    the client lets go together are answered together)."""
    torch.manual_seed(0)
    sd = {f"w{i}": torch.randn(1024, 1024) for i in range(4)}  # 4 MiB each
    http_server.files["/b/model.safetensors"] = save(sd)
    monkeypatch.setenv("FASTCKPT_REMOTE_PART_BYTES", str(4 << 20))
    url = f"{http_server.url}/b/model.safetensors"
    http_server.fault = ("stall", 0.1)
    seen = {}
    for budget in (256 << 20, 2 << 20):
        model = nn.Module()
        for k, v in sd.items():
            model.register_parameter(k, nn.Parameter(torch.empty_like(v)))
        plan = fastckpt.plan(model, url)
        http_server.counters.reset()
        fastckpt.load_into(model, plan, max_host_bytes=budget)
        for k, v in sd.items():
            assert torch.equal(getattr(model, k).detach().view(torch.uint8), v.view(torch.uint8))
        spans = [re.fullmatch(r"bytes=(\d+)-(\d+)", r) for r in http_server.counters.ranges]
        largest = max(int(m[2]) - int(m[1]) + 1 for m in spans if m)
        seen[budget] = (largest, http_server.counters.most_in_flight)
    assert seen[256 << 20] == (4 << 20, 4)  # four 4 MiB parts, all in flight
    largest, most = seen[2 << 20]
    assert most * largest <= 2 << 20


def test_http_server_without_range_requests_is_refused_by_name(http_server, st_file):
    url = f"{http_server.url}/m/model.safetensors"
    http_server.files["/m/model.safetensors"] = st_file.read_bytes()
    http_server.fault = ("no-range",)
    with pytest.raises(CheckpointError, match=re.escape(url) + ".*does not answer range requests"):
        fastckpt.open(url)


def test_http_load_from_inside_a_running_event_loop(http_server, st_file):
    """As from a notebook cell or an async server's handler: the remote reads run on a
    thread of their own instead of failing on the running loop."""
    import asyncio

    http_server.files["/m/model.safetensors"] = st_file.read_bytes()
    local = fresh()
    fastckpt.load_into(local, st_file)

    async def handler() -> Net:
        remote = fresh()
        fastckpt.load_into(remote, f"{http_server.url}/m/model.safetensors")
        return remote

    assert_same(local, asyncio.run(handler()))


def _runs(draw_list: list[tuple[int, int]]) -> list[tuple[int, int]]:
    from fastckpt.source.remote import _merge

    return _merge([(a, a + n) for a, n in draw_list])


_spans = st.lists(st.tuples(st.integers(0, 300), st.integers(1, 40)), max_size=12)


@given(_spans, _spans)
def test_header_runs_missing_and_inside_agree_with_sets_of_bytes(runs, have):
    """The sweep that finds which header bytes are still to fetch (thousands of runs for a
    DCP file's archives), against sets of byte offsets."""
    from fastckpt.source.remote import _inside, _missing

    runs, have = _runs(runs), _runs(have)
    held = {x for s, e in have for x in range(s, e)}
    got = [x for s, e in _missing(runs, have) for x in range(s, e)]
    assert sorted(got) == sorted({x for s, e in runs for x in range(s, e)} - held)
    for s, e in runs:
        assert _inside((s, e), have) == any(hs <= s and e <= he for hs, he in have)


def test_http_shards_are_read_together(http_server, monkeypatch):
    """A sharded folder's headers, and then its tensors, are requested for all shards at
    once (each request stalled 0.1 s: those sent together are answered together)."""
    import json as json_

    monkeypatch.setenv("FASTCKPT_REMOTE_TIMEOUT", "5")
    torch.manual_seed(0)
    sd = {f"w{i}": torch.randn(512, 512) for i in range(4)}  # 1 MiB each: fetched straight in
    index = {"weight_map": {k: f"model-{i}.safetensors" for i, k in enumerate(sd)}}
    for i, (k, v) in enumerate(sd.items()):
        http_server.files[f"/s/model-{i}.safetensors"] = save({k: v})
    http_server.files["/s/model.safetensors.index.json"] = json_.dumps(index).encode()
    model = nn.ParameterDict({k: nn.Parameter(torch.empty_like(v)) for k, v in sd.items()})
    http_server.fault = ("stall", 0.1)
    plan = fastckpt.plan(model, f"{http_server.url}/s/")
    assert http_server.counters.most_in_flight == 4  # the four shards' headers
    http_server.counters.reset()
    fastckpt.load_into(model, plan)
    assert http_server.counters.most_in_flight == 4  # and their tensors
    for k, v in sd.items():
        assert torch.equal(model[k].detach().view(torch.uint8), v.view(torch.uint8))


def test_cli_inspect_a_url(s3, st_file):
    from typer.testing import CliRunner

    from fastckpt.cli.app import app

    url = put(s3, "cli/model.safetensors", st_file)
    result = CliRunner().invoke(app, ["inspect", url, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["files"] == [url]
    assert sorted(t["name"] for t in doc["tensors"]) == sorted(state())


@pytest.mark.slow
def test_two_fsdp2_ranks_each_fetch_their_shard(s3, tmp_path, monkeypatch):
    from tests.rank_pool import run_ranks
    from tests.sharded_worker import write_checkpoints

    write_checkpoints(tmp_path)
    url = put(s3, "fsdp/net.safetensors", tmp_path / "net.safetensors")
    rank_env(tmp_path, url, monkeypatch)  # bytes per rank = its shard
    results = run_ranks(2, tmp_path, ["remote_fsdp2"], worker="tests.remote_worker")
    for r in results:
        res = r["remote_fsdp2"]
        assert res["ok"], res
        assert res["wrong"] == [] and res["sharded"] > 0
        assert 0 < res["fetched"] <= res["local_bytes"]  # its shard (padding aside), no more
    total = sum(r["remote_fsdp2"]["fetched"] for r in results)
    state_bytes = sum(
        t.numel() * t.element_size() for t in load_file(tmp_path / "net.safetensors").values()
    )
    assert total < 1.1 * state_bytes  # the ranks did not each read the whole file


def test_empty_and_garbage_objects_are_refused_by_url(s3, tmp_path):
    for key, body in (("bad/empty.safetensors", b""), ("bad/junk.safetensors", b"\xff" * 4096)):
        s3.client.put_object(Bucket=BUCKET, Key=key, Body=body)
        with pytest.raises(CheckpointError, match=f"s3://{BUCKET}/{key}"):
            fastckpt.open(f"s3://{BUCKET}/{key}")


# -- diff, convert and bench take URLs ------------------------------------------------
def _cli(*args: str):
    from typer.testing import CliRunner

    from fastckpt.cli.app import app

    return CliRunner().invoke(app, list(args))


def test_diff_a_url_against_a_local_file(s3, st_file, tmp_path):
    url = put(s3, "diff/model.safetensors", st_file)
    report = fastckpt.diff(url, st_file, values=True)
    assert report.equal and report.a_name == url
    assert len(report.unchanged) == len(state())
    changed = {k: v.clone() for k, v in state().items()}
    changed["fc2.bias"][3] += 1
    other = tmp_path / "other.safetensors"
    save_file(changed, str(other))
    result = _cli("diff", url, str(other), "--values", "--json")
    assert result.exit_code == 1, result.output
    doc = json.loads(result.output)
    assert doc["a"] == url
    assert [t["a"] for t in doc["tensors"] if t["status"] == "changed"] == ["fc2.bias"]
    assert _cli("diff", str(st_file), url).exit_code == 0


def test_diff_over_http(http_server, st_file):
    http_server.files["/d/model.safetensors"] = st_file.read_bytes()
    assert fastckpt.diff(f"{http_server.url}/d/model.safetensors", st_file, values=True).equal


def _tensor_bytes(path: Path) -> bytes:
    """A safetensors file's bytes after its header (the tensors, in order)."""
    data = path.read_bytes()
    return data[st_header_bytes(data) :]


def _metadata(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    return json.loads(data[8 : st_header_bytes(data)])["__metadata__"]


def test_convert_a_torch_zip_url_like_the_local_file(s3, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(state(), path)
    url = put(s3, "conv/model.pt", path)
    result = _cli("convert", url, str(tmp_path / "remote_out"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["source"] == url
    from fastckpt.tools.convert import convert

    convert(path, tmp_path / "local_out")
    remote_file = tmp_path / "remote_out" / "model.safetensors"
    local_file = tmp_path / "local_out" / "model.safetensors"
    # Byte for byte, apart from the source the metadata names.
    assert _tensor_bytes(remote_file) == _tensor_bytes(local_file)
    meta_r, meta_l = _metadata(remote_file), _metadata(local_file)
    assert meta_r.pop("fastckpt_source") == url
    meta_l.pop("fastckpt_source")
    assert meta_r == meta_l
    assert load_file(remote_file).keys() == state().keys()


def test_convert_a_remote_hf_folder_copies_its_config(s3, st_file, tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "net"}')
    put(s3, "hfconv/model.safetensors", st_file)
    put(s3, "hfconv/config.json", config)
    from fastckpt.tools.convert import convert

    report = convert(f"s3://{BUCKET}/hfconv/", tmp_path / "out", dtype="bf16")
    assert report.copied == ["config.json"]
    assert (tmp_path / "out" / "config.json").read_bytes() == config.read_bytes()
    local = convert(st_file, tmp_path / "local", dtype="bf16")
    assert local.tensors == report.tensors
    assert _tensor_bytes(tmp_path / "out" / "model.safetensors") == _tensor_bytes(
        tmp_path / "local" / "model.safetensors"
    )


def test_convert_over_http_and_a_missing_url(http_server, st_file, tmp_path):
    http_server.files["/c/model.safetensors"] = st_file.read_bytes()
    http_server.files["/c/config.json"] = b"{}"
    from fastckpt.tools.convert import convert

    report = convert(f"{http_server.url}/c/", tmp_path / "out")
    assert report.copied == ["config.json"]
    assert _tensor_bytes(tmp_path / "out" / "model.safetensors") == _tensor_bytes(st_file)
    result = _cli("convert", f"{http_server.url}/nope/model.safetensors", str(tmp_path / "x"))
    assert result.exit_code == 2
    assert f"{http_server.url}/nope/model.safetensors" in result.output
    assert not (tmp_path / "x").exists()


def test_cli_bench_a_url(s3, st_file):
    url = put(s3, "bench/model.safetensors", st_file)
    result = _cli("bench", url, "--repeat", "1", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    rows = {r["contender"]: r for r in doc["rows"]}
    assert set(rows) - {"runai"} == {"ceiling", "fastckpt", "download+load"}
    assert all(r["seconds"] > 0 for r in rows.values())
    assert doc["fetched"] == sum(t.numel() * t.element_size() for t in state().values())
    # Run:ai is a row, or its absence is said
    assert "runai" in rows or [n for n in doc["notes"] if n.startswith("runai: ")]


def test_bench_a_url_beside_runai(s3, st_file, monkeypatch):
    """Run:ai's streamer at the same endpoint (when installed: `make bench-deps`); the
    bench itself checks in its warm-up round that its values equal fastckpt's."""
    pytest.importorskip("runai_model_streamer", reason="runai-model-streamer is not installed")
    pytest.importorskip("runai_model_streamer_s3", reason="its S3 backend is not installed")
    from fastckpt.bench.remote import run_remote_bench

    monkeypatch.setenv("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "0")  # path-style, as moto
    url = put(s3, "runai/model.safetensors", st_file)
    doc = run_remote_bench(url, repeat=1)
    assert doc["notes"] == []
    assert {r["contender"] for r in doc["rows"]} == {
        "ceiling",
        "fastckpt",
        "download+load",
        "runai",
    }


def test_bench_of_a_http_url_says_why_runai_is_not_a_row(http_server, st_file):
    from fastckpt.bench.remote import run_remote_bench

    http_server.files["/m/model.safetensors"] = st_file.read_bytes()
    doc = run_remote_bench(f"{http_server.url}/m/model.safetensors", repeat=1)
    assert {r["contender"] for r in doc["rows"]} == {"ceiling", "fastckpt", "download+load"}
    assert doc["notes"] == ["runai: s3://, gs:// and az:// only"]


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(256, 256)
        self.b = nn.Linear(256, 256)  # the file stores a.weight's storage for it too
        self.h = nn.Linear(256, 128).to(torch.bfloat16)  # cast on the way
        self.emb = nn.Embedding(100, 64)  # rows[:100] of a 300-row table


def test_http_bytes_go_straight_into_the_model_where_they_are_its_memory(
    http_server, tmp_path, monkeypatch
):
    from fastckpt.load import remote_reads
    from fastckpt.source import remote

    monkeypatch.setattr(remote_reads, "_DIRECT_MIN", 0)  # these are small tensors
    monkeypatch.setenv("FASTCKPT_REMOTE_TIMEOUT", "5")
    torch.manual_seed(3)
    shared = torch.randn(256, 256)
    sd = {
        "a.weight": shared, "a.bias": torch.randn(256), "b.weight": shared,
        "b.bias": torch.randn(256), "h.weight": torch.randn(128, 256), "h.bias": torch.randn(128),
        "emb.weight": torch.randn(300, 64),
    }  # fmt: skip
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    http_server.files["/t/pytorch_model.bin"] = path.read_bytes()
    rules = "emb.weight -> emb.weight rows[:100]"
    direct: list[int] = []
    real = remote.RemoteFile.fetch_into

    def spy(self, pieces, max_buffered):
        direct.extend(e - s for s, e, _ in pieces)
        return real(self, pieces, max_buffered)

    monkeypatch.setattr(remote.RemoteFile, "fetch_into", spy)
    local, got = Mixed(), Mixed()
    fastckpt.load_into(local, path, rules)
    report = fastckpt.load_into(got, f"{http_server.url}/t/pytorch_model.bin", rules)
    assert_same(local, got)
    assert torch.equal(got.h.weight, sd["h.weight"].to(torch.bfloat16))
    assert torch.equal(got.emb.weight, sd["emb.weight"][:100])
    # Straight in: a.bias, b.bias and the embedding's rows; not h's cast tensors, nor the
    # storage two parameters read (fetched once, into the memory file).
    assert sorted(direct) == [256 * 4, 256 * 4, 100 * 64 * 4]
    needed = 256 * 256 * 4 + (128 * 256 + 128) * 4 + sum(direct)
    assert needed <= report.fetched <= needed + (16 << 10)  # + small holes between runs


def test_http_a_transposed_view_is_not_taken_for_its_storage(http_server, tmp_path, monkeypatch):
    # torch.save of w.t() stores w's storage with transposed strides: 120,000 runs of one
    # element, given as their hull (one run of exactly the tensor's bytes). Fetched straight
    # into the parameter, the values would land transposed.
    from fastckpt.load import remote_reads

    monkeypatch.setattr(remote_reads, "_DIRECT_MIN", 0)  # 480 KB: would go by the window
    monkeypatch.setenv("FASTCKPT_REMOTE_TIMEOUT", "5")
    torch.manual_seed(4)
    w = torch.randn(300, 400)
    path = tmp_path / "t.pt"
    torch.save({"lin.weight": w.t()}, path)
    http_server.files["/v/t.pt"] = path.read_bytes()
    model = nn.Module()
    model.lin = nn.Linear(300, 400, bias=False)
    fastckpt.load_into(model, f"{http_server.url}/v/t.pt")
    assert torch.equal(model.lin.weight.view(torch.uint8), w.t().contiguous().view(torch.uint8))
