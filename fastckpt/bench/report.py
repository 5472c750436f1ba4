"""The bench result as rich tables (one per checkpoint file) or Markdown."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from fastckpt.bench import BenchResult, ContenderResult, TargetResult

COLUMNS = (
    "contender",
    "median s",
    "±",
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
        return [r.contender, "-", "-", "-", "-", "-", "-", "-", r.status]
    note = r.note
    if r.resident_before:
        note = (
            note + " " if note else ""
        ) + f"resident before: {max(r.resident_before) / 1e6:.0f} MB"
    return [
        r.contender,
        f"{r.median:.3f}",
        f"{100 * (r.spread or 0) / 2:.0f}%",
        f"{r.gbps:.2f}" if r.gbps else "-",
        f"{r.x_ceiling:.2f}" if r.x_ceiling else "-",
        f"{r.x_fastckpt:.2f}" if r.x_fastckpt else "-",
        "-" if r.is_ceiling else _mb(r.peak_private),
        "-" if r.is_ceiling else _mb(r.peak_rss),
        note,
    ]


def _title(t: TargetResult, result: BenchResult) -> str:
    cache = "cold" if result.cold else "warm"
    if result.fresh:
        cache += " · one load per fresh process"
    size = f"{t.nbytes / 1e9:.2f} GB" if t.nbytes >= 1e9 else f"{t.nbytes / 1e6:.1f} MB"
    return (
        f"{t.workload} · {t.format} · {size}, {t.tensors} tensors · "
        f"{cache} page cache · {result.device} · median of {result.repeat}"
    )


def print_tables(result: BenchResult, console: Console) -> None:
    if not console.is_terminal:
        console = Console(width=150)  # piped: keep rows on one line
    for t in result.targets:
        table = Table(title=_title(t, result), title_justify="left")
        for c in COLUMNS:
            left = c in ("contender", "note")
            table.add_column(c, justify="left" if left else "right", no_wrap=c != "note")
        for r in t.results:
            table.add_row(*_row(r))
        console.print(table)
        if t.ceiling:
            console.print(f"  ceiling: {t.ceiling}", style="dim")
        for r in t.results:
            if r.status != "ok":
                console.print(f"  {r.contender} {r.status}: {r.note}", style="dim", highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", style="dim")
    console.print(
        "× ceiling: GB/s as a fraction of the slowest ceiling's; time / fastckpt: >1 means "
        "slower than fastckpt (both ratios are medians of per-round ratios; a round runs "
        "every contender once, back to back); +private: peak RssAnon above the pre-load "
        "value (the model itself excluded); peak RSS: VmHWM during the load, model included.",
        style="dim",
    )


def markdown(result: BenchResult, command: str) -> str:
    """The tables as Markdown (for bench/RESULTS.md)."""
    out = [f"`{command}`", ""]
    for t in result.targets:
        out += [f"**{_title(t, result)}** (ceiling: {t.ceiling or '-'})", ""]
        out.append("| " + " | ".join(COLUMNS) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        out += ["| " + " | ".join(_row(r)) + " |" for r in t.results]
        out += [f"- {r.contender} {r.status}: {r.note}" for r in t.results if r.status != "ok"]
        out.append("")
    out += [f"- {n}" for n in result.notes]
    return "\n".join(out) + "\n"
