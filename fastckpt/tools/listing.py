"""Tables of names for the command line, with the names never cut.

A name is the one column a user reads, greps and copies, so it is printed whole:

- stdout is not a terminal (piped, redirected): plain aligned text, no box
  drawing, no width limit, one row per line, so ``| grep layer.1`` sees whole rows;
- a terminal wide enough for the longest name plus the other columns wrapped at
  word boundaries: a rich table whose name column is never wrapped;
- a narrower terminal: one block per row, the name on its own line and the other
  columns below it.

Columns that are empty in every row are left out. The helpers below collapse the
numeric segments of names into ranges (``layer.{0..23}.weight``) for grouped views.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported when something is printed, not by `import fastckpt`
    from rich.console import Console, ConsoleOptions, RenderResult

# The terminal table: a rule under the header, no outer border, columns apart by
# one padding character each side of a blank separator: 3 characters between two.
_BETWEEN = 3


@dataclass(frozen=True)
class Listing:
    """Rows whose first column is a name. ``right``: columns justified to the right."""

    columns: tuple[str, ...]
    rows: Sequence[Sequence[str]]
    title: str = ""
    right: frozenset[str] = field(default_factory=frozenset)
    header: bool = True

    def _kept(self) -> list[int]:
        """Column indices to show: the name, and every column with a non-empty cell."""
        return [0] + [i for i in range(1, len(self.columns)) if any(r[i] for r in self.rows)]

    def plain_lines(self) -> list[str]:
        """The rows as aligned text: two spaces between columns, nothing cut, no trailing blanks."""
        kept = self._kept()
        lines = [[r[i] for i in kept] for r in self.rows]
        if self.header:
            lines.insert(0, [self.columns[i] for i in kept])
        widths = [max((len(ln[j]) for ln in lines), default=0) for j in range(len(kept))]
        out = [self.title] if self.title else []
        for ln in lines:
            cells = []
            for j, cell in enumerate(ln):
                last = j == len(kept) - 1
                if self.columns[kept[j]] in self.right:
                    cells.append(cell.rjust(widths[j]))
                else:
                    cells.append(cell if last else cell.ljust(widths[j]))
            out.append("  ".join(cells).rstrip())
        return out

    def _widths(self, width: int) -> list[int] | None:
        """Column widths (kept columns) of a table at most ``width`` wide with the whole
        longest name and the other columns wrapped at word boundaries; None if none fits."""
        kept = self._kept()
        longest, shortest = [], []
        for i in kept:
            cells = [r[i] for r in self.rows] + ([self.columns[i]] if self.header else [])
            longest.append(max((len(c) for c in cells), default=0))
            shortest.append(max((len(w) for c in cells for w in c.split()), default=0))
        shortest[0] = longest[0]  # the name is never wrapped
        excess = sum(longest) + _BETWEEN * (len(kept) - 1) - width
        if sum(shortest) + _BETWEEN * (len(kept) - 1) > width:
            return None
        widths = list(longest)
        while excess > 0:  # narrow the column with the most room to wrap, one character
            j = max(range(len(kept)), key=lambda k: widths[k] - shortest[k])
            widths[j] -= 1
            excess -= 1
        return widths

    def fits(self, width: int) -> bool:
        return self._widths(width) is not None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        from rich import box
        from rich.table import Table
        from rich.text import Text

        kept = self._kept()
        widths = self._widths(options.max_width)
        if widths is not None:
            table = Table(
                title=self.title or None,
                title_justify="left",
                show_header=self.header,
                box=box.SIMPLE_HEAD,
                show_edge=False,
                pad_edge=False,
            )
            for i, w in zip(kept, widths, strict=True):
                col = self.columns[i]
                table.add_column(
                    col, width=w, overflow="fold", justify="right" if col in self.right else "left"
                )
            for r in self.rows:
                table.add_row(*(Text(r[i]) for i in kept))
            yield table
            return
        if self.title:
            yield Text(self.title, style="bold")
        for r in self.rows:
            yield Text(r[0], overflow="fold")
            parts = [f"{self.columns[i]} {r[i]}" if self.header else r[i] for i in kept[1:] if r[i]]
            if parts:
                yield Text("    " + " · ".join(parts), style="dim")

    def print(self, console: Console) -> None:
        """Print as a table or blocks on a terminal, as plain lines otherwise."""
        if console.is_terminal:
            console.print(self)
        else:
            write_plain(console, self.plain_lines())


def write_plain(console: Console, lines: Iterable[str]) -> None:
    """Lines as they are: no markup, no wrapping, no cropping (for pipes and files)."""
    text = "".join(line + "\n" for line in lines)
    console.file.write(text)
    console.file.flush()


def print_line(console: Console, line: str, style: str | None = None) -> None:
    """One line of text: wrapped on a terminal, whole when piped."""
    if console.is_terminal:
        console.print(line, style=style, highlight=False, markup=False)
    else:
        write_plain(console, [line])


# -- numeric segments collapsed into ranges -----------------------------------------
def split_numbers(name: str) -> tuple[tuple[str | None, ...], tuple[int, ...]]:
    """``a.3.b.0`` -> (("a", None, "b", None), (3, 0)): the template and its numbers."""
    segs = name.split(".")
    template = tuple(None if s.isdigit() else s for s in segs)
    return template, tuple(int(s) for s in segs if s.isdigit())


def ranges(values: Sequence[int]) -> str:
    """{0..3,5} for 0, 1, 2, 3, 5."""
    vs = sorted(set(values))
    out: list[str] = []
    start = prev = vs[0]
    for v in vs[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}..{prev}")
        if v is not None:
            start = prev = v
    return "{" + ",".join(out) + "}"


def collapse(
    template: Sequence[str | None], tuples: list[tuple[int, ...]]
) -> list[tuple[str, list[tuple[int, ...]]]]:
    """Names for the numeric tuples that fill the template's None slots, in few lines,
    each with the tuples it stands for."""
    if len(tuples) == 1 or not tuples:
        return [(_fill(template, [str(v) for v in t]), [t]) for t in tuples]
    columns = [sorted({t[i] for t in tuples}) for i in range(len(tuples[0]))]
    if math.prod(len(c) for c in columns) == len(set(tuples)):  # a full product: one line
        name = _fill(template, [ranges(c) if len(c) > 1 else str(c[0]) for c in columns])
        return [(name, tuples)]
    # Not a product: split on the first slot and collapse the rest within each value.
    out: list[tuple[str, list[tuple[int, ...]]]] = []
    slot = list(template).index(None)
    for first in columns[0]:
        mine = [t for t in tuples if t[0] == first]
        sub_template = list(template[:slot]) + [str(first)] + list(template[slot + 1 :])
        for name, subs in collapse(sub_template, [t[1:] for t in mine]):
            out.append((name, [(first, *t) for t in subs]))
    return out


def _fill(template: Sequence[str | None], values: list[str]) -> str:
    it: Iterator[str] = iter(values)
    return ".".join(seg if seg is not None else next(it) for seg in template)
