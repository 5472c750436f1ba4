"""What a load did: ``LoadReport``, and the name grouping its tables use."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Mismatch(NamedTuple):
    name: str  # the model's name for the tensor
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]


@dataclass
class SharedReads:
    """``load_into(..., read="once")``: this rank's part in its group's shared reading."""

    read: int  # bytes this rank read from storage (its share of what the group needs)
    sent: int  # bytes it sent to other ranks (each receiver counted)
    received: int  # bytes other ranks read and sent to it


@dataclass
class LoadReport:
    """The outcome of ``fastckpt.load_into``.

    ``missing`` and ``unexpected`` are lists of names, so the report can stand in
    for the ``_IncompatibleKeys`` that ``load_state_dict`` returns.
    """

    loaded: list[str] = field(default_factory=list)  # model names written
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint name, model name)
    sliced: list[str] = field(default_factory=list)  # model names filled from selected rows
    cast: list[tuple[str, str, str]] = field(default_factory=list)  # (model name, from, to)
    mapped: list[str] = field(default_factory=list)  # views of the file (mmap=True), not copies
    tied: list[tuple[str, str]] = field(
        default_factory=list
    )  # (alias, name it was written through)
    missing: list[str] = field(default_factory=list)  # model names the checkpoint did not fill
    # (model name, what it is): the checkpoint has it, fastckpt cannot load it (sparse, ...)
    unloadable: list[tuple[str, str]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # checkpoint names nothing used
    mismatched: list[Mismatch] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # names rules said to skip
    unused_rules: list[str] = field(default_factory=list)
    rule_for: dict[str, str] = field(default_factory=dict)  # model name -> rule text
    # (model name, the part no source filled: "rows 50:60"), when a rule puts a
    # smaller source into part of a larger tensor (cat[0:50] into 60 rows)
    partly_loaded: list[tuple[str, str]] = field(default_factory=list)
    # non-persistent buffers given values by the transformers model's own
    # _init_weights, as from_pretrained does (no checkpoint holds them)
    initialised: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    shared: SharedReads | None = None  # read="once" only
    fetched: int = 0  # bytes fetched from a URL's checkpoint (or pread: read='pread'), no headers
    # Seconds of each phase of the call: "plan" (index, model walk, matching and
    # checks), "prepare" (allocations and the copy jobs), "copy" (the bytes moved).
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    # _IncompatibleKeys spelling
    @property
    def missing_keys(self) -> list[str]:
        return self.missing

    @property
    def unexpected_keys(self) -> list[str]:
        return self.unexpected

    def __iter__(self) -> Iterator[list[str]]:
        """``missing, unexpected = report``, as ``load_state_dict``'s result unpacks."""
        return iter((self.missing, self.unexpected))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mismatched"] = [
            {
                "name": m.name,
                "source_shape": list(m.source_shape),
                "target_shape": list(m.target_shape),
            }
            for m in self.mismatched
        ]
        d["renamed"] = [list(p) for p in self.renamed]
        d["cast"] = [list(c) for c in self.cast]
        d["tied"] = [list(t) for t in self.tied]
        d["unloadable"] = [list(u) for u in self.unloadable]
        d["gbps"] = self.gbps
        return d

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=None, show_header=True, header_style="bold", box=None, pad_edge=False)
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_column("names")
        rows: list[tuple[str, Sequence[str]]] = [
            ("loaded", self.loaded),
            ("renamed", [t for _, t in self.renamed]),
            ("sliced", self.sliced),
            ("cast", [f"{n} ({a}->{b})" for n, a, b in self.cast]),
            ("tied", [f"{a} = {b}" for a, b in self.tied]),
            ("missing", self.missing),
            ("not loadable", [f"{n} ({what})" for n, what in self.unloadable]),
            ("unexpected", self.unexpected),
            (
                "mismatched",
                [
                    f"{m.name} {list(m.source_shape)} vs {list(m.target_shape)}"
                    for m in self.mismatched
                ],
            ),
            ("partly loaded", [f"{n} ({what} not loaded)" for n, what in self.partly_loaded]),
            ("initialised", self.initialised),
            ("ignored", self.ignored),
            ("unused rules", self.unused_rules),
        ]
        for label, names in rows:
            if names or label == "loaded":
                groups = group_names(names, max_groups=4)
                shown = ", ".join(g if c == 1 else f"{g} ({c})" for g, c in groups)
                table.add_row(label, str(len(names)), shown)
        buf = io.StringIO()
        console = Console(file=buf, width=120, color_system=None, force_terminal=False)
        console.print(
            f"LoadReport: {len(self.loaded)} tensors, {self.bytes / 1e6:.1f} MB "
            f"in {self.seconds:.3f} s ({self.gbps:.2f} GB/s)"
        )
        console.print(table)
        return buf.getvalue().rstrip("\n")


def _range_text(numbers: set[int]) -> str:
    ordered = sorted(numbers)
    if len(ordered) == 1:
        return str(ordered[0])
    if ordered[-1] - ordered[0] + 1 == len(ordered):
        return f"{{{ordered[0]}..{ordered[-1]}}}"
    if len(ordered) <= 4:
        return "{" + ",".join(map(str, ordered)) + "}"
    return "*"


def _group_at(split: list[list[str]], depth: int) -> list[tuple[str, int]]:
    groups: dict[tuple[str, ...], tuple[list[set[int]], int]] = {}
    for parts in split:
        head = parts[:depth]
        key = tuple("#" if p.isdigit() else p for p in head) + (
            ("**",) if len(parts) > depth else ()
        )
        numbers, count = groups.get(key, ([set() for _ in head], 0))
        for i, p in enumerate(head):
            if p.isdigit():
                numbers[i].add(int(p))
        groups[key] = (numbers, count + 1)
    out = []
    for key, (numbers, count) in groups.items():
        text = [_range_text(numbers[i]) if seg == "#" else seg for i, seg in enumerate(key)]
        out.append((".".join(text), count))
    return out


def group_names(names: Sequence[str], max_groups: int = 10) -> list[tuple[str, int]]:
    """Names folded into at most ``max_groups`` patterns with counts, e.g.
    ``("bert.encoder.layer.{0..11}.attention.**", 48)``: numbered segments become
    ranges, and the grouping is as deep as the line budget allows.
    """
    if not names:
        return []
    split = [n.split(".") for n in names]
    deepest = max(len(p) for p in split)
    best = _group_at(split, 1)
    for depth in range(2, deepest + 1):
        groups = _group_at(split, depth)
        if len(groups) > max_groups:
            break
        best = groups
    if len(best) > max_groups:
        rest = sum(c for _, c in best[max_groups - 1 :])
        best = best[: max_groups - 1] + [(f"... {len(best) - max_groups + 1} more groups", rest)]
    return best


def format_groups(names: Sequence[str], indent: str = "    ", max_groups: int = 10) -> list[str]:
    groups = group_names(names, max_groups)
    width = max(len(g) for g, _ in groups)
    return [f"{indent}{g:<{width}}  {c:>5}" for g, c in groups]
