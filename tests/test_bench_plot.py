"""`fastckpt bench --plot FILE.png|svg`: the tables drawn with matplotlib (an optional
extra; the test extra installs it)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from fastckpt.bench import BenchResult, ContenderResult, TargetResult, _summarize
from fastckpt.errors import CheckpointError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _result() -> BenchResult:
    t = TargetResult("bert-large", "safetensors", "p", ["p"], nbytes=1_340_000_000, tensors=393)
    t.results = [
        ContenderResult("fastckpt", times=[0.20, 0.21, 0.19]),
        ContenderResult("safe_open+copy_", times=[0.45, 0.44, 0.46]),
        ContenderResult("ceiling:memcpy", times=[0.17, 0.18, 0.17]),
        ContenderResult("ceiling:read", times=[0.19, 0.19, 0.2]),
        ContenderResult("fastsafetensors", status="skipped", note="not installed, not run"),
    ]
    _summarize(t)
    return BenchResult(device="cpu", cold=False, repeat=3, size="small", fresh=True, targets=[t])


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from fastckpt.bench.plot import plot

    out = plot(_result(), tmp_path / "bench.png")
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    # IHDR: width and height, big-endian, right after the signature and chunk header
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 500 and height > 150


def test_plot_writes_an_svg_with_the_ratios_labelled(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    from fastckpt.bench.plot import plot

    matplotlib.rcParams["svg.fonttype"] = "none"  # text as text, so the labels can be read
    try:
        out = plot(_result(), tmp_path / "bench.svg")
    finally:
        matplotlib.rcParams["svg.fonttype"] = "path"
    root = ET.parse(out).getroot()
    assert root.tag.endswith("svg")
    text = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    # fastckpt 0.95x the slowest ceiling (read); the peer 2.25x fastckpt's time (per-round medians)
    assert "0.95× ceiling" in text
    assert "2.25× fastckpt's time" in text
    assert "fastsafetensors" in text  # the contender that did not run is named


def test_plot_refuses_other_formats(tmp_path):
    from fastckpt.bench.plot import plot

    with pytest.raises(CheckpointError, match=r"\.png or \.svg"):
        plot(_result(), tmp_path / "bench.jpg")
    assert not (tmp_path / "bench.jpg").exists()


def test_without_matplotlib_the_error_says_what_to_install(tmp_path):
    from tests.conftest import run_python

    r = run_python(
        "import sys\n"
        "sys.modules['matplotlib'] = None  # as if not installed\n"
        "from tests.test_bench_plot import _result\n"
        "from fastckpt.bench.plot import plot\n"
        "from fastckpt.errors import CheckpointError\n"
        "try:\n"
        "    plot(_result(), sys.argv[1])\n"
        "except CheckpointError as e:\n"
        "    print(e)\n",
        tmp_path / "bench.png",
    )
    assert r.returncode == 0, r.stderr
    assert "pip install 'fastckpt[plot]'" in r.stdout
    assert not (tmp_path / "bench.png").exists()
