"""The command line through typer's runner: every command, its --json, its exit codes."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fastckpt.cli.app import app
from tests.conftest import assert_same_bytes

runner = CliRunner()


@pytest.fixture
def small_file(tmp_path):
    tensors = {"embed.weight": torch.randn(10, 4), "head.bias": torch.arange(3, dtype=torch.int32)}
    path = tmp_path / "small.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_help_has_an_example_per_command():
    for cmd in ("inspect", "convert", "bench", "demo"):
        result = runner.invoke(app, [cmd, "--help"])
        assert result.exit_code == 0, result.output
        assert "Example: fastckpt " in result.output


def test_inspect_table_and_json(small_file):
    path, _ = small_file
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0
    assert "embed.weight" in result.output and "2 tensors" in result.output
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    doc = json.loads(result.stdout)
    assert doc["total_tensors"] == 2
    assert {t["name"]: t["shape"] for t in doc["tensors"]} == {
        "embed.weight": [10, 4],
        "head.bias": [3],
    }


def test_inspect_missing_file_is_exit_2_one_line(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "nope.pt")])
    assert result.exit_code == 2
    assert (
        result.output.strip() == f"error: {tmp_path / 'nope.pt'}: no such checkpoint file or folder"
    )


def test_convert_json_report(small_file, tmp_path):
    path, tensors = small_file
    dst = tmp_path / "out.safetensors"
    result = runner.invoke(app, ["convert", str(path), str(dst), "--dtype", "bf16", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["tensors"] == 2 and doc["files"] == ["out.safetensors"]
    assert doc["cast"] == ["embed.weight"]
    back = load_file(str(dst))
    assert_same_bytes(back["embed.weight"], tensors["embed.weight"].bfloat16())
    assert_same_bytes(back["head.bias"], tensors["head.bias"])


def test_convert_table(small_file, tmp_path):
    path, _ = small_file
    result = runner.invoke(
        app, ["convert", str(path), str(tmp_path / "out"), "--max-shard-size", "100B"]
    )
    assert result.exit_code == 0, result.output
    assert "model.safetensors.index.json" in result.output
    assert (tmp_path / "out" / "model-00001-of-00002.safetensors").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "int4"], "--dtype must be one of bf16, fp16, fp32, not 'int4'"),
        (
            ["--max-shard-size", "lots"],
            "cannot read size 'lots' (examples: 2GB, 500MB, 1GiB, 1048576)",
        ),
        (["--max-shard-size", "100B"], "give a folder as destination for sharded output"),
    ],
)
def test_convert_usage_errors_exit_2(small_file, tmp_path, args, message):
    path, _ = small_file
    result = runner.invoke(app, ["convert", str(path), str(tmp_path / "o.safetensors"), *args])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: ")
    assert result.output.strip().endswith(message)
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_refuses_existing_destination(small_file, tmp_path):
    path, _ = small_file
    dst = tmp_path / "o.safetensors"
    dst.write_bytes(b"x")
    result = runner.invoke(app, ["convert", str(path), str(dst)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {dst}: already exists (pass --overwrite to replace it)"
    result = runner.invoke(app, ["convert", str(path), str(dst), "--overwrite"])
    assert result.exit_code == 0


def test_convert_corrupt_source_exit_2(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    result = runner.invoke(app, ["convert", str(bad), str(tmp_path / "o.safetensors")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}")
    assert "Traceback" not in result.output


def test_bench_small_json(tmp_path):
    result = runner.invoke(
        app, ["bench", "--size", "small", "--repeat", "1", "--cache-dir", str(tmp_path), "--json"]
    )
    doc = json.loads(result.stdout)
    assert result.exit_code == 0, result.output
    assert [(t["workload"], t["format"]) for t in doc["targets"]] == [
        ("bert-small", "safetensors"),
        ("bert-small", "torch"),
        ("many-small", "safetensors"),
        ("many-small", "torch"),
    ]
    for t in doc["targets"]:
        rows = {r["contender"]: r for r in t["results"]}
        assert t["ceiling"] == "ceiling:memcpy"
        assert rows["ceiling:memcpy"]["status"] == "ok"
        peers = (
            ["torch.load(mmap)+load_state_dict"]
            if t["format"] == "torch"
            else ["safetensors.load_file+load_state_dict", "safe_open+copy_"]
        )
        for name in peers:
            assert rows[name]["status"] == "ok", rows[name]
            assert rows[name]["verified"] is True
            assert len(rows[name]["times"]) == 1 and rows[name]["gbps"] > 0
            assert rows[name]["peak_rss"] > 0
        ours = rows["fastckpt"]
        assert ours["status"] == "ok" and ours["verified"] is True, ours
        assert ours["x_fastckpt"] == 1.0


def test_bench_table_pairs_and_phases_on_a_given_file(small_file, tmp_path):
    path, _ = small_file
    args = ["bench", str(path), "--repeat", "1", "--pairs", "2"]
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    if has_matplotlib:  # the same run drawn too (fastckpt[plot])
        args += ["--plot", str(tmp_path / "bench.svg")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "safetensors.load_file+load_state_dict" in result.output
    assert "ceiling:memcpy" in result.output
    out = " ".join(result.output.split())  # the table may wrap
    assert "paired with ceiling:memcpy, 2 rounds in one process: × ceiling" in out
    assert "paired with safe_open+copy_, 2 rounds in one process: t / fastckpt" in out
    assert "fastckpt phases (median): plan" in out
    if has_matplotlib:
        svg = (tmp_path / "bench.svg").read_text()
        assert svg.lstrip().startswith("<?xml") and "<svg" in svg


def test_bench_usage_errors_exit_2(tmp_path):
    result = runner.invoke(app, ["bench", "--size", "huge"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --size must be one of full, small, not 'huge'"
    result = runner.invoke(app, ["bench", "--device", "tpu", "--size", "small"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --device must be cpu or cuda, not 'tpu'"
    result = runner.invoke(app, ["bench", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2
    assert "no such checkpoint file or folder" in result.output
    result = runner.invoke(app, ["bench", "--size", "small", "--plot", "bench.jpg"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --plot writes .png or .svg, not 'bench.jpg'"


def test_demo_runs_without_failing():
    # the bench part is covered by test_bench_small_json; `make demo` runs both
    result = runner.invoke(app, ["demo", "--no-bench"])
    assert result.exit_code == 0, result.output
    for step in ("rename + slice", "strict error", "diff"):
        assert step in result.output


def test_bench_memory_run_and_its_usage_errors(tmp_path):
    result = runner.invoke(
        app, ["bench", "--memory", "--size", "small", "--repeat", "1", "--cache-dir", str(tmp_path),
              "--json"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (t,) = doc["targets"]
    assert t["workload"] == "big-small" and [r["contender"] for r in t["results"]] == ["fastckpt"]
    assert t["results"][0]["verified"] is True
    result = runner.invoke(app, ["bench", "--memory", "--casts"])
    assert result.exit_code == 2 and "--casts and --memory" in result.output
    result = runner.invoke(app, ["bench", "--pairs", "2", "--cold", "--size", "small"])
    assert result.exit_code == 2 and "not with --cold" in result.output
