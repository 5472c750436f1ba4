"""The bench result as rich tables (one per checkpoint file) or Markdown."""

from __future__ import annotations

from rich.console import Console

from fastckpt.bench import BenchResult, ContenderResult, TargetResult
from fastckpt.tools.listing import Listing, print_line

COLUMNS = (
    "contender",
    "median s",
    "±",
    "CPU s",
    "GB/s",
    "× ceiling",
    "t / fastckpt",
    "+private",
    "peak RSS",
    "note",
)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n else "-"


def _row(r: ContenderResult) -> list[str]:
    if r.status != "ok" or r.median is None:
        return [r.contender, *["-"] * (len(COLUMNS) - 2), r.status]
    note = r.note
    if r.resident_before:
        note = (
            note + " " if note else ""
        ) + f"resident before: {max(r.resident_before) / 1e6:.0f} MB"
    return [
        r.contender,
        f"{r.median:.3f}",
        f"{100 * (r.spread or 0) / 2:.0f}%",
        f"{r.cpu:.3f}" if r.cpu is not None else "-",
        f"{r.gbps:.2f}" if r.gbps else "-",
        f"{r.x_ceiling:.2f}" if r.x_ceiling else "-",
        f"{r.x_fastckpt:.2f}" if r.x_fastckpt else "-",
        "-" if r.is_ceiling else _mb(r.peak_private),
        "-" if r.is_ceiling else _mb(r.peak_rss),
        note,
    ]


def _details(t: TargetResult) -> list[str]:
    """fastckpt's phase times and page faults, and the paired rounds, as lines."""
    lines = []
    ours = next((r for r in t.results if r.contender == "fastckpt" and r.median), None)
    if ours is not None and ours.median_phases:
        phases = " · ".join(f"{k} {1e3 * v:.1f} ms" for k, v in ours.median_phases.items())
        faults = f"; {ours.median_faults:,} minor page faults" if ours.median_faults else ""
        lines.append(f"fastckpt phases (median): {phases}{faults}")
    for peer, p in t.paired.items():
        if p.get("status") != "ok":
            lines.append(f"paired with {peer}: {p.get('status')}: {p.get('note', '')}")
            continue
        what = "× ceiling" if peer.startswith("ceiling:") else "t / fastckpt"
        lines.append(
            f"paired with {peer}, {p['pairs']} rounds in one process: {what} "
            f"{p['median_ratio']:.2f} median ({p['min_ratio']:.2f}-{p['max_ratio']:.2f}); "
            f"{peer} {p['peer_seconds']:.3f} s, fastckpt {p['fastckpt_seconds']:.3f} s"
        )
    return lines


def title_of(t: TargetResult, result: BenchResult) -> str:
    cache = ("cold" if result.cold else "warm") + " page cache"
    if result.fresh:
        cache += " · one load per fresh process"
    size = f"{t.nbytes / 1e9:.2f} GB" if t.nbytes >= 1e9 else f"{t.nbytes / 1e6:.1f} MB"
    return (
        f"{t.workload} · {t.format} · {size}, {t.tensors} tensors · "
        f"{cache} · {result.device} · median of {result.repeat}"
    )


def print_tables(result: BenchResult, console: Console) -> None:
    """One table per checkpoint; it fits the terminal (columns wrap, then one block per
    contender), and is plain text with nothing cut when piped."""
    for t in result.targets:
        Listing(
            columns=COLUMNS,
            rows=[_row(r) for r in t.results],
            title=title_of(t, result),
            right=frozenset(c for c in COLUMNS if c not in ("contender", "note")),
        ).print(console)
        if t.ceiling:
            print_line(console, f"  ceiling: {t.ceiling}", style="dim")
        for line in _details(t):
            print_line(console, f"  {line}")
        for r in t.results:
            if r.status != "ok":
                print_line(console, f"  {r.contender} {r.status}: {r.note}", style="dim")
    for note in result.notes:
        print_line(console, f"note: {note}", style="dim")
    print_line(
        console,
        "× ceiling: GB/s as a fraction of the slowest ceiling's; time / fastckpt: >1 means "
        "slower than fastckpt (both ratios are medians of per-round ratios; a round runs "
        "every contender once, back to back); +private: peak RssAnon above the pre-load "
        "value (the model itself excluded); peak RSS: VmHWM during the load, model included; "
        "CPU s: CPU time of every thread of the contender's process during the load.",
        style="dim",
    )


def markdown(result: BenchResult, command: str) -> str:
    """The tables as Markdown (for bench/RESULTS.md)."""
    out = [f"`{command}`", ""]
    for t in result.targets:
        out += [f"**{title_of(t, result)}** (ceiling: {t.ceiling or '-'})", ""]
        out.append("| " + " | ".join(COLUMNS) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        out += ["| " + " | ".join(_row(r)) + " |" for r in t.results]
        out += [f"- {r.contender} {r.status}: {r.note}" for r in t.results if r.status != "ok"]
        out += [f"- {line}" for line in _details(t)]
        out.append("")
    out += [f"- {n}" for n in result.notes]
    return "\n".join(out) + "\n"
