"""The benchmark harness: workloads, layouts, eviction, summaries, the worker protocol."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastckpt.bench import (
    ContenderResult,
    TargetResult,
    _summarize,
    contenders_for,
    evict,
    read_layout,
    resident_bytes,
    warm,
)
from fastckpt.bench.worker import FlatModel, serve
from fastckpt.bench.workloads import SIZES, bert_layout, ensure_files, many_small_layout
from tests.conftest import assert_same_bytes, tiny_hf_config


def test_full_workloads_have_the_promised_shapes():
    bert, small = SIZES["full"]
    assert len(bert.layout) == 5 + 24 * 16 + 2
    assert 1.35e9 < bert.nbytes < 1.45e9
    assert len(small.layout) == 30_720
    assert all(shape == (64, 32) for _, shape in small.layout)
    assert small.nbytes == 30_720 * 64 * 32 * 4
    assert sum(w.nbytes for w in SIZES["small"]) < 50e6


def test_bert_layout_matches_transformers_bert():
    from transformers import BertModel

    config = tiny_hf_config(intermediate_size=24)
    expected = {
        k: tuple(v.shape)
        for k, v in BertModel(config).state_dict().items()
        if not k.endswith("position_ids") and "token_type_ids" not in k
    }
    assert dict(bert_layout(2, 16, 50, 24, positions=20)) == expected


def test_many_small_names():
    layout = many_small_layout(2, 2)
    assert [n for n, _ in layout[:4]] == [
        "layers.0.experts.0.w1.weight",
        "layers.0.experts.0.w2.weight",
        "layers.0.experts.0.w3.weight",
        "layers.0.experts.1.w1.weight",
    ]


def test_ensure_files_writes_both_formats_once(tmp_path):
    workload = SIZES["small"][1]
    files = ensure_files(workload, tmp_path, "small")
    st = load_file(str(files["safetensors"]))
    pt = torch.load(files["torch"], weights_only=True)
    assert list(st) == [n for n, _ in workload.layout] or set(st) == {n for n, _ in workload.layout}
    for k in st:
        assert_same_bytes(st[k], pt[k])
    stamps = {p: p.stat().st_mtime_ns for p in files.values()}
    assert ensure_files(workload, tmp_path, "small") == files
    assert {p: p.stat().st_mtime_ns for p in files.values()} == stamps


def test_read_layout_safetensors_and_nested_torch(tmp_path):
    st = tmp_path / "a.safetensors"
    save_file({"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}, str(st))
    info = read_layout(st)
    assert info["format"] == "safetensors" and info["prefix"] == []
    assert sorted(info["layout"]) == [("b", [3], "bfloat16"), ("w", [2, 3], "float32")]
    pt = tmp_path / "a.pt"
    torch.save({"model": {"w": torch.zeros(2, 3)}, "optimizer": {"state": {0: torch.ones(1)}}}, pt)
    info = read_layout(pt)
    assert info["format"] == "torch" and info["prefix"] == ["model"]
    assert info["layout"] == [("w", [2, 3], "float32")]


def test_contenders_by_format_and_mode():
    names, _ = contenders_for("torch", "cpu", cold=True)
    assert names == [
        "fastckpt",
        "torch.load(mmap)+load_state_dict",
        "ceiling:memcpy",
        "ceiling:read",
    ]
    names, notes = contenders_for("safetensors", "cuda", cold=False)
    assert names[:3] == ["fastckpt", "safetensors.load_file+load_state_dict", "safe_open+copy_"]
    assert names[-1] == "ceiling:h2d"
    for n in notes:  # optional packages, and the peers that need a Hugging Face folder
        assert n.endswith(("not installed, not run", "not a whole Hugging Face folder, not run"))


def test_summary_ratios():
    t = TargetResult("w", "safetensors", "p", ["p"], nbytes=2_000_000_000, tensors=1)
    t.results = [
        ContenderResult("fastckpt", times=[1.0, 1.2, 0.8]),
        ContenderResult("safe_open+copy_", times=[3.0, 3.0, 3.0]),
        ContenderResult("ceiling:memcpy", times=[0.5, 0.5, 0.5]),
        ContenderResult("ceiling:read", times=[0.9, 0.9, 0.9]),
        ContenderResult("fastsafetensors", status="skipped", note="x"),
    ]
    _summarize(t)
    ours, peer, _, read, skipped = t.results
    assert t.ceiling == "ceiling:read"  # the slowest ceiling bounds the load
    assert ours.median == 1.0 and ours.gbps == pytest.approx(2.0)
    assert ours.spread == pytest.approx(0.4)
    assert ours.x_ceiling == pytest.approx(0.9)
    assert peer.x_fastckpt == pytest.approx(3.0)
    assert read.x_fastckpt is None and skipped.median is None


def test_summary_ratios_are_paired_by_round():
    # The machine slows down in round 2 for everyone: per-round ratios stay 2.0,
    # where the ratio of medians (3.0 / 1.2) would say 2.5.
    t = TargetResult("w", "safetensors", "p", ["p"], nbytes=1_000_000, tensors=1)
    t.results = [
        ContenderResult("fastckpt", times=[1.0, 3.0, 1.2]),
        ContenderResult("safe_open+copy_", times=[2.0, 6.0, 2.4]),
        ContenderResult("ceiling:memcpy", times=[0.5, 1.5, 0.6]),
        ContenderResult("torch.load+load_state_dict", times=[5.0, 5.0]),  # missed a round
    ]
    _summarize(t)
    ours, peer, _, partial = t.results
    assert peer.x_fastckpt == pytest.approx(2.0)
    assert ours.x_ceiling == pytest.approx(0.5)
    assert partial.x_fastckpt == pytest.approx(5.0 / 1.2)  # unpaired: ratio of medians


def test_evict_leaves_the_file_out_of_the_page_cache(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(b"\1" * (8 << 20))
    warm([str(f)])
    before = resident_bytes([str(f)])
    if before is None:
        pytest.skip("fincore is not installed")
    assert before == 8 << 20
    evict([str(f)])
    assert resident_bytes([str(f)]) == 0


def test_flat_model_has_the_checkpoint_names():
    layout = [
        ("a.b.weight", (2, 3), torch.float32),
        ("a.c", (4,), torch.int64),
        ("top", (), torch.bfloat16),
    ]
    model = FlatModel(layout)
    model.materialize("cpu")
    assert {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()} == {
        n: (s, d) for n, s, d in layout
    }
    model.release()
    assert all(p.numel() == 0 for p in model.parameters())


def _spec(contender: str, path, nbytes: int, layout: list) -> dict:
    """A worker's spec for one CPU load of ``path``: ``layout`` is the model's
    (name, shape, dtype) list, ``nbytes`` the file's tensor bytes."""
    return {
        "contender": contender,
        "path": str(path),
        "files": [str(path)],
        "device": "cpu",
        "nbytes": nbytes,
        "prefix": [],
        "layout": layout,
    }


def test_worker_protocol(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({"x.weight": torch.randn(4, 4)}, str(path))
    spec = _spec("safe_open+copy_", path, 64, [("x.weight", [4, 4], "float32")])
    commands = "".join(json.dumps({"cmd": c}) + "\n" for c in ("prepare", "go", "quit", "go"))
    serve(spec, io.StringIO(commands))
    replies = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert replies[0] == {"ready": True}
    assert replies[1]["verified"] is True and replies[1]["seconds"] > 0
    assert len(replies) == 2  # nothing after quit


def _serve_once(contender: str, tmp_path, capsys) -> dict:
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.randn(2)}, str(path))
    spec = _spec(contender, path, 8, [("x", [2], "float32")])
    serve(spec, io.StringIO('{"cmd": "prepare"}\n{"cmd": "go"}\n'))
    replies = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return replies[-1]


def test_worker_reports_a_contender_it_cannot_import_as_skipped(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "fastsafetensors", None)  # import fails: not installed
    reply = _serve_once("fastsafetensors", tmp_path, capsys)
    assert set(reply) == {"skipped"} and reply["skipped"].startswith("ModuleNotFoundError"), reply


def test_worker_reports_an_attribute_error_as_an_error_not_a_skip(tmp_path, capsys, monkeypatch):
    import fastckpt

    monkeypatch.delattr(fastckpt, "load_into", raising=False)
    reply = _serve_once("fastckpt", tmp_path, capsys)
    assert "skipped" not in reply, reply
    assert reply["error"] == "AttributeError: module 'fastckpt' has no attribute 'load_into'"
    assert "Traceback" in reply["traceback"]


def test_fresh_mode_gives_every_timed_run_a_new_process(tmp_path, monkeypatch):
    import fastckpt.bench as bench

    path = tmp_path / "f.safetensors"
    save_file({"x.weight": torch.randn(8, 8)}, str(path))
    started: list[int] = []
    real = bench.Worker

    class Counting(real):  # type: ignore[misc,valid-type]
        def __init__(self, spec, folder):
            super().__init__(spec, folder)
            started.append(self.proc.pid)

    monkeypatch.setattr(bench, "Worker", Counting)
    notes: list[str] = []
    target = bench.bench_target(
        "f", path, device="cpu", cold=False, repeat=2, notes=notes, fresh=True, fastckpt_only=True
    )
    ran = [r for r in target.results if r.status == "ok"]
    assert [r.contender for r in ran] == ["fastckpt"], target
    assert all(len(r.times) == 2 for r in ran), target
    assert all(r.verified for r in ran if not r.is_ceiling), target
    # one worker per contender for the untimed round, then one per timed run
    assert len(set(started)) == len(target.results) * 3


def test_cast_workloads_pair_each_cast_with_a_same_dtype_load():
    from fastckpt.bench.workloads import CAST_SIZES

    by_name = {w.name: w for w in CAST_SIZES["full"]}
    casts = {(w.file_dtype, w.model_dtype) for w in by_name.values() if w.model_dtype}
    assert casts == {
        ("bfloat16", "float32"),
        ("float16", "float32"),
        ("float32", "bfloat16"),
        ("float8_e4m3fn", "bfloat16"),
        ("float8_e5m2", "bfloat16"),
    }
    assert by_name["same-fp32"].model_dtype is None and by_name["same-bf16"].model_dtype is None
    # 40 tensors of 1024x1024: 168 MB as fp32, as in the issue that asked for them.
    assert by_name["same-fp32"].nbytes == 40 * 1024 * 1024 * 4
    assert by_name["cast-fp8-to-bf16"].nbytes == 40 * 1024 * 1024


@pytest.mark.parametrize("contender", ["fastckpt", "torch-cast-in-memory"])
def test_worker_cast_contenders_load_and_verify(tmp_path, capsys, contender):
    path = tmp_path / "w.safetensors"
    save_file({"x.weight": torch.randn(8, 8).to(torch.float8_e4m3fn)}, str(path))
    # the layout holds the model's dtype, not the file's
    spec = _spec(contender, path, 64, [("x.weight", [8, 8], "bfloat16")])
    serve(spec, io.StringIO('{"cmd": "prepare"}\n{"cmd": "go"}\n{"cmd": "quit"}\n'))
    replies = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert replies[1]["verified"] is True, replies


def test_cast_contenders_replace_the_peers():
    names, _ = contenders_for("safetensors", "cpu", cold=False, cast=True)
    assert names == [
        "fastckpt",
        "safetensors.load_file+load_state_dict",
        "torch-cast-in-memory",
        "ceiling:memcpy",
    ]


def test_worker_reports_cpu_faults_and_fastckpt_phases(tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    save_file({"x.weight": torch.randn(64, 64)}, str(path))
    spec = _spec("fastckpt", path, 64 * 64 * 4, [("x.weight", [64, 64], "float32")])
    serve(spec, io.StringIO('{"cmd": "prepare"}\n{"cmd": "go"}\n{"cmd": "quit"}\n'))
    reply = json.loads(capsys.readouterr().out.splitlines()[1])
    assert reply["verified"] is True
    assert reply["cpu_seconds"] >= 0 and reply["minor_faults"] >= 0
    assert list(reply["phases"]) == ["plan", "prepare", "copy"]
    assert all(v >= 0 for v in reply["phases"].values())
    assert sum(reply["phases"].values()) <= reply["seconds"]


def test_paired_rounds_give_one_ratio_per_round(tmp_path):
    from fastckpt.bench.paired import run_pairs

    path = tmp_path / "p.safetensors"
    save_file({"a.weight": torch.randn(32, 32), "b.bias": torch.randn(32)}, str(path))
    spec = {
        "path": str(path),
        "files": [str(path)],
        "device": "cpu",
        "nbytes": (32 * 32 + 32) * 4,
        "prefix": [],
        "layout": [("a.weight", [32, 32], "float32"), ("b.bias", [32], "float32")],
    }
    out = run_pairs(spec, ["ceiling:memcpy", "safe_open+copy_"], 3)
    assert set(out) == {"ceiling:memcpy", "safe_open+copy_"}
    for r in out.values():
        assert r["status"] == "ok" and r["pairs"] == 3, r
        assert 0 < r["min_ratio"] <= r["median_ratio"] <= r["max_ratio"]
        assert r["peer_seconds"] > 0 and r["fastckpt_seconds"] > 0


def test_paired_rounds_report_a_peer_that_loads_wrong_values(tmp_path, monkeypatch):
    from fastckpt.bench import paired
    from fastckpt.bench.worker import Contender

    path = tmp_path / "p.safetensors"
    save_file({"a": torch.ones(8)}, str(path))
    spec = {
        "path": str(path),
        "files": [str(path)],
        "device": "cpu",
        "nbytes": 32,
        "prefix": [],
        "layout": [("a", [8], "float32")],
    }
    monkeypatch.setattr(Contender, "_load_safe_open", lambda self: None)  # loads nothing
    out = paired.run_pairs(spec, ["safe_open+copy_"], 2)
    assert out == {
        "safe_open+copy_": {"status": "error", "note": "safe_open+copy_: loaded values differ"}
    }


def test_bench_target_with_pairs_runs_them_in_another_process(tmp_path):
    import fastckpt.bench as bench

    path = tmp_path / "t.pt"
    torch.save({"w": torch.randn(16, 16)}, path)
    target = bench.bench_target("t", path, device="cpu", cold=False, repeat=1, notes=[], pairs=2)
    assert set(target.paired) == {"ceiling:memcpy", "torch.load(mmap)+load_state_dict"}
    assert all(p["status"] == "ok" and p["pairs"] == 2 for p in target.paired.values())
    ours = next(r for r in target.results if r.contender == "fastckpt")
    assert set(ours.median_phases) == {"plan", "prepare", "copy"}
    assert ours.cpu is not None


def test_memory_run_is_fastckpt_alone_on_a_5gb_file():
    from fastckpt.bench.workloads import MEMORY_SIZES

    (big,) = MEMORY_SIZES["full"]
    assert 5.3e9 < big.nbytes < 5.5e9 and big.fastckpt_only
    assert contenders_for("safetensors", "cpu", cold=False, fastckpt_only=True) == (
        ["fastckpt"],
        [],
    )
