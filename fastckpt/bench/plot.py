"""The bench result as a picture (``fastckpt bench --plot FILE.png|svg``): one panel per
checkpoint file, a bar per contender (median seconds, ceilings grey, fastckpt blue,
peers orange), each labelled with its ratio: "x ceiling" for fastckpt and the
ceilings, "t / fastckpt" for the peers, as in the table.

matplotlib is an optional extra (``pip install 'fastckpt[plot]'``), imported here only.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from fastckpt.atomic import atomic_write
from fastckpt.bench import BenchResult, ContenderResult, TargetResult
from fastckpt.bench.report import title_of
from fastckpt.errors import CheckpointError

FORMATS = (".png", ".svg")
_COLOURS = {"ceiling": "#9e9e9e", "fastckpt": "#1f77b4", "peer": "#ff7f0e"}


def _kind(r: ContenderResult) -> str:
    if r.is_ceiling:
        return "ceiling"
    return "fastckpt" if r.contender == "fastckpt" else "peer"


def _label(r: ContenderResult) -> str:
    assert r.median is not None
    parts = [f"{r.median:.3f} s"]
    if r.contender == "fastckpt" or r.is_ceiling:
        if r.x_ceiling:
            parts.append(f"{r.x_ceiling:.2f}× ceiling")
    elif r.x_fastckpt:
        parts.append(f"{r.x_fastckpt:.2f}× fastckpt's time")
    return " · ".join(parts)


def _panel(ax: Any, t: TargetResult, result: BenchResult) -> None:
    rows = [r for r in t.results if r.status == "ok" and r.median is not None]
    rows.sort(key=lambda r: (_kind(r) != "ceiling", _kind(r) != "fastckpt", r.contender))
    names = [r.contender for r in rows]
    seconds = [r.median or 0.0 for r in rows]
    ys = range(len(rows))
    ax.barh(ys, seconds, color=[_COLOURS[_kind(r)] for r in rows], height=0.6)
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()  # ceilings on top, then fastckpt, then the peers
    longest = max(seconds, default=0.0) or 1.0
    for y, r in zip(ys, rows, strict=True):
        ax.text((r.median or 0.0) + longest * 0.01, y, _label(r), va="center", fontsize=8)
    ax.set_xlim(0, longest * 1.6)  # room for the labels right of the longest bar
    ax.set_xlabel("median seconds per load (shorter is better)")
    ax.set_title(title_of(t, result), fontsize=9, loc="left")
    skipped = [r.contender for r in t.results if r.status != "ok"]
    if skipped:
        ax.text(
            0.99,
            0.03,
            "not run: " + ", ".join(skipped),
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="#666666",
        )


def plot(result: BenchResult, path: str | os.PathLike[str]) -> Path:
    """Draw ``result`` into ``path`` (.png or .svg), written atomically; returns the path."""
    out = Path(path)
    if out.suffix.lower() not in FORMATS:
        what = out.suffix or "no suffix"
        raise CheckpointError(f"{out}: --plot writes .png or .svg, not {what!r}")
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: a file is all that is drawn
        from matplotlib.figure import Figure
    except ImportError:
        raise CheckpointError(
            f"{out}: drawing the bench needs matplotlib: pip install 'fastckpt[plot]'"
        ) from None
    targets = [t for t in result.targets if any(r.status == "ok" for r in t.results)]
    if not targets:
        raise CheckpointError(f"{out}: no contender ran: nothing to draw")
    heights = [0.9 + 0.38 * sum(r.status == "ok" for r in t.results) for t in targets]
    fig = Figure(figsize=(10, sum(heights) + 0.4 * len(targets)), layout="constrained")
    axes = fig.subplots(len(targets), 1, squeeze=False, height_ratios=heights)
    for ax, t in zip(axes[:, 0], targets, strict=True):
        _panel(ax, t, result)
    buf = io.BytesIO()
    fig.savefig(buf, format=out.suffix.lower().lstrip("."), dpi=110)
    with atomic_write(out) as f:
        f.write(buf.getvalue())
    return out
