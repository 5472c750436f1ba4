"""The command line's listings: names whole at any width, plain text when piped,
--filter, --group, and bench tables that fit the terminal."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file
from typer.testing import CliRunner

import fastckpt.cli.app as cli
from fastckpt.bench import BenchResult, ContenderResult, TargetResult
from fastckpt.bench.report import print_tables
from fastckpt.cli.app import app

runner = CliRunner()
BOX = set("│┃━─┏┓┗┛╇╈┡┩")


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    from transformers import BertConfig, BertForPreTraining

    cfg = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertForPreTraining(cfg).save_pretrained(folder)
    with fastckpt_open(folder) as ckpt:
        names = ckpt.keys()
    return folder, names


def fastckpt_open(path):
    import fastckpt

    return fastckpt.open(path)


def terminal(monkeypatch, width):
    console = Console(force_terminal=True, width=width, color_system=None)
    monkeypatch.setattr(cli, "console", console)


def test_piped_inspect_is_plain_whole_names_one_per_line(bert_folder):
    folder, names = bert_folder
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert not BOX & set(result.output)
    for name in names:  # each name starts exactly one line, whole, followed by its shape
        assert sum(ln.split()[0] == name for ln in lines if ln.strip()) == 1
    assert lines[1].split() == ["name", "shape", "dtype", "size"]  # empty column dropped
    assert lines[-1] == f"{len(names)} tensors, " + lines[-1].split(", ")[1]


def test_real_pipe_to_grep_at_80_columns(bert_folder):
    folder, names = bert_folder
    exe = os.path.join(os.path.dirname(sys.executable), "fastckpt")
    env = dict(os.environ, COLUMNS="80")
    out = subprocess.run(
        f"{exe} inspect {folder} | grep layer.1", shell=True, env=env, capture_output=True,
        text=True, check=True,
    ).stdout
    got = {ln.split()[0] for ln in out.splitlines()}
    want = {n for n in names if "layer.1" in n}  # grep's '.' also matches layer.10, layer.11
    assert got == want and len(want) == 48
    assert max(len(ln) for ln in out.splitlines()) > 80  # rows are whole, not cut at 80


def test_terminal_at_80_columns_keeps_every_name_whole(bert_folder, monkeypatch):
    folder, names = bert_folder
    terminal(monkeypatch, 80)
    result = runner.invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(ln) for ln in lines) <= 80
    firsts = [ln.split()[0] for ln in lines if ln.strip()]
    assert all(n in firsts for n in names)


def test_narrow_terminal_prints_one_name_per_line(bert_folder, monkeypatch):
    folder, names = bert_folder
    longest = max(len(n) for n in names)
    terminal(monkeypatch, longest + 2)  # too narrow for the table, wide enough for a name
    result = runner.invoke(app, ["inspect", str(folder)])
    lines = result.output.splitlines()
    assert max(len(ln) for ln in lines) <= longest + 2
    for name in names:
        i = lines.index(name)
        assert lines[i + 1].lstrip().startswith("shape [")


def test_filter_and_bad_regex(bert_folder):
    folder, names = bert_folder
    result = runner.invoke(app, ["inspect", str(folder), "--filter", r"layer\.1\.attention"])
    assert result.exit_code == 0, result.output
    want = [n for n in names if "layer.1.attention" in n]
    body = [ln.split()[0] for ln in result.output.splitlines()[2:-1]]
    assert body == want and len(want) == 10
    assert result.output.splitlines()[-1].startswith(
        f"10 tensors matching 'layer\\\\.1\\\\.attention' (of {len(names)})"
    )
    result = runner.invoke(app, ["inspect", str(folder), "--filter", "layer[", "--json"])
    assert result.exit_code == 2 and "--filter 'layer['" in result.output


def test_group_collapses_layers_and_counts_every_tensor(bert_folder):
    folder, names = bert_folder
    result = runner.invoke(app, ["inspect", str(folder), "--group"])
    assert result.exit_code == 0, result.output
    rows = [ln.split() for ln in result.output.splitlines()[2:-1]]
    assert sum(int(r[1]) for r in rows) == len(names)
    row = next(r for r in rows if r[0] == "bert.encoder.layer.{0..11}.attention.self.query.weight")
    assert row[1:5] == ["12", "[16,", "16]", "float32"]
    assert len(rows) < len(names) / 5


def test_group_splits_a_non_product_and_counts_each_line(tmp_path):
    tensors = {f"h.{i}.{j}.w": torch.zeros(2) for i in range(3) for j in range(i + 1)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    result = runner.invoke(app, ["inspect", str(tmp_path / "m.safetensors"), "--group"])
    rows = [ln.split()[:2] for ln in result.output.splitlines()[2:-1]]
    assert rows == [["h.0.0.w", "1"], ["h.1.{0..1}.w", "2"], ["h.2.{0..2}.w", "3"]]


def test_shared_storage_column_shown_only_when_used(tmp_path):
    w = torch.randn(4, 4)
    path = tmp_path / "tied.pt"
    torch.save({"embed.weight": w, "head.weight": w, "bias": torch.zeros(4)}, path)
    lines = runner.invoke(app, ["inspect", str(path)]).output.splitlines()
    assert lines[1].split()[-3:] == ["shares", "storage", "with"]
    assert lines[2].split()[0] == "embed.weight" and lines[2].split()[-1] == "head.weight"


def test_diff_piped_filter_and_exit_status(bert_folder, tmp_path):
    folder, _names = bert_folder
    import fastckpt

    with fastckpt.open(folder) as ckpt:
        changed = {n: ckpt.tensor(n).clone() for n in ckpt.keys()}
    changed["bert.encoder.layer.3.output.dense.weight"] += 1
    save_file(changed, str(tmp_path / "b.safetensors"))
    b = str(tmp_path / "b.safetensors")
    result = runner.invoke(app, ["diff", str(folder), b, "--values"])
    assert result.exit_code == 1 and not BOX & set(result.output)
    line = next(ln for ln in result.output.splitlines() if ln.startswith("bert.encoder.layer.3."))
    assert line.split()[:2] == ["bert.encoder.layer.3.output.dense.weight", "changed"]
    result = runner.invoke(app, ["diff", str(folder), b, "--values", "--filter", r"layer\.4\."])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith("EQUAL: 16 in both")
    result = runner.invoke(
        app, ["diff", str(folder), b, "--values", "--filter", "layer.3", "--json"]
    )
    doc = __import__("json").loads(result.stdout)
    assert result.exit_code == 1 and len(doc["tensors"]) == 16


def _bench_result() -> BenchResult:
    rows = [
        ContenderResult("fastckpt load_into", times=[0.1], median=0.1, spread=0.02, gbps=3.4,
                        x_ceiling=0.9, x_fastckpt=1.0, peak_private=1_000_000,
                        peak_rss=2_000_000_000),
        ContenderResult("runai-model-streamer (SafetensorsStreamer)", times=[0.2], median=0.2,
                        spread=0.1, gbps=1.7, x_ceiling=0.45, x_fastckpt=2.0,
                        peak_private=900_000_000, peak_rss=2_900_000_000,
                        note="CPU tensors, copied into the model"),
        ContenderResult("fastsafetensors", status="skipped", note="not installed"),
    ]
    target = TargetResult("bert-large", "safetensors", "/x", ["/x"], 1_340_000_000, 391,
                          ceiling="memcpy", results=rows)
    return BenchResult("cpu", False, 3, "full", targets=[target])


@pytest.mark.parametrize("width", [60, 80, 120])
def test_bench_tables_fit_the_terminal(width, capsys):
    console = Console(force_terminal=True, width=width, color_system=None)
    print_tables(_bench_result(), console)
    out = capsys.readouterr().out
    assert max(len(ln) for ln in out.splitlines()) <= width
    assert any("runai-model-streamer (SafetensorsStreamer)" in ln for ln in out.splitlines())


def test_bench_tables_piped_are_plain_and_whole(capsys):
    console = Console(force_terminal=False, width=80)
    print_tables(_bench_result(), console)
    out = capsys.readouterr().out
    assert not BOX & set(out)
    row = next(ln for ln in out.splitlines() if ln.startswith("runai-model-streamer"))
    assert row.startswith("runai-model-streamer (SafetensorsStreamer)  ")
    assert row.endswith("CPU tensors, copied into the model")
