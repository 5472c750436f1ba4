"""``fastckpt.freeze(model, patterns)``: set ``requires_grad`` by name patterns.

Patterns are shell-style globs (``fnmatch``) over the parameter names that
``model.named_parameters()`` reports, tied aliases included: ``*`` matches any
run of characters, dots included, so ``bert.*`` is everything under ``bert``.
A pattern without a wildcard that names a module (``classifier``, ``linear.0``)
covers every parameter below it. Parameters matched by no pattern keep their
current ``requires_grad``. ``unfreeze`` patterns apply after the freeze ones.

A pattern that matches no parameter is an error: it is nearly always a typo,
and a silent no-op would train (or freeze) what the user meant not to.

The ``freeze`` / ``unfreeze`` lines of a rules file (docs/RULES.md) are these
same globs, not the rules' key patterns (where ``*`` is one segment):
``fastckpt.freeze(model, rules)`` applies them exactly as if passed here.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(slots=True)
class ModuleCounts:
    trainable_params: int = 0
    frozen_params: int = 0
    trainable_elements: int = 0
    frozen_elements: int = 0


@dataclass(slots=True)
class FreezeSummary:
    """Trainable / frozen parameters (tensors) and elements, by top-level module."""

    by_module: dict[str, ModuleCounts] = field(default_factory=dict)
    frozen: list[str] = field(default_factory=list)  # parameter names now frozen
    trainable: list[str] = field(default_factory=list)

    def _total(self) -> ModuleCounts:
        t = ModuleCounts()
        for c in self.by_module.values():
            t.trainable_params += c.trainable_params
            t.frozen_params += c.frozen_params
            t.trainable_elements += c.trainable_elements
            t.frozen_elements += c.frozen_elements
        return t

    @property
    def trainable_elements(self) -> int:
        return self._total().trainable_elements

    @property
    def frozen_elements(self) -> int:
        return self._total().frozen_elements

    def to_dict(self) -> dict[str, Any]:
        return {
            "by_module": {
                name: {
                    "trainable_params": c.trainable_params,
                    "frozen_params": c.frozen_params,
                    "trainable_elements": c.trainable_elements,
                    "frozen_elements": c.frozen_elements,
                }
                for name, c in self.by_module.items()
            },
            "frozen": list(self.frozen),
            "trainable": list(self.trainable),
        }

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title="trainable parameters")
        for col in ("module", "trainable", "frozen", "trainable elements", "frozen elements"):
            table.add_column(col, justify="left" if col == "module" else "right")
        rows = list(self.by_module.items()) + [("total", self._total())]
        for name, c in rows:
            table.add_row(
                name,
                str(c.trainable_params),
                str(c.frozen_params),
                f"{c.trainable_elements:,}",
                f"{c.frozen_elements:,}",
                end_section=name == rows[-2][0] if len(rows) > 1 else False,
            )
        return table

    def __str__(self) -> str:
        import io

        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=120, color_system=None, highlight=False).print(self)
        return buf.getvalue().rstrip("\n")


def _as_list(patterns: str | Iterable[str] | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def _matches(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _no_match_error(pattern: str, kind: str, names: Sequence[str]) -> ValueError:
    modules = {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 1)}
    literal = pattern.replace("*", "").replace("?", "").strip(".")
    close = difflib.get_close_matches(literal, sorted(set(names) | modules), n=3, cutoff=0.5)
    hint = f"; closest names: {', '.join(close)}" if close else ""
    return ValueError(f"{kind} pattern {pattern!r} matches no parameter (a typo?){hint}")


def summarize(model: nn.Module) -> FreezeSummary:
    """Counts of ``model``'s trainable and frozen parameters, without changing anything."""
    summary = FreezeSummary()
    for name, p in model.named_parameters():  # tied parameters counted once
        top = name.split(".", 1)[0] if "." in name else "(top level)"
        c = summary.by_module.setdefault(top, ModuleCounts())
        if p.requires_grad:
            c.trainable_params += 1
            c.trainable_elements += p.numel()
            summary.trainable.append(name)
        else:
            c.frozen_params += 1
            c.frozen_elements += p.numel()
            summary.frozen.append(name)
    return summary


def freeze(
    model: nn.Module,
    patterns: str | Iterable[str] | Any,
    *,
    unfreeze: str | Iterable[str] | None = None,
) -> FreezeSummary:
    """Freeze parameters whose names match ``patterns``, then unfreeze those matching ``unfreeze``.

    ``patterns`` is a glob, a list of globs, or a rules object (its ``freeze_patterns``
    and ``unfreeze_patterns`` are used; ``unfreeze`` adds to the latter).
    Raises ``ValueError`` naming any pattern that matches nothing, before changing anything.
    """
    if hasattr(patterns, "freeze_patterns"):
        freeze_list = list(patterns.freeze_patterns)
        unfreeze_list = list(getattr(patterns, "unfreeze_patterns", [])) + _as_list(unfreeze)
    else:
        freeze_list, unfreeze_list = _as_list(patterns), _as_list(unfreeze)
    named = list(model.named_parameters(remove_duplicate=False))
    names = [n for n, _ in named]
    for kind, plist in (("freeze", freeze_list), ("unfreeze", unfreeze_list)):
        for pat in plist:
            if not any(_matches(n, pat) for n in names):
                raise _no_match_error(pat, kind, names)
    for plist, flag in ((freeze_list, False), (unfreeze_list, True)):
        for name, p in named:
            if any(_matches(name, pat) for pat in plist):
                p.requires_grad_(flag)
    return summarize(model)
