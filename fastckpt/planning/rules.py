"""Rename rules: which checkpoint key feeds which model key (format: docs/RULES.md).

A rule set is parsed and compiled once by the C++ core into a trie over
dot-separated key segments; matching every key of a checkpoint is one pass.

    rules = fastckpt.Rules.from_file("deltalm.rules")
    rules = fastckpt.Rules([("module.{rest*}", "{rest*}"), "ignore cls.**"])
    rules = fastckpt.Rules().strip_prefix("module.").rename("{p*}.gamma", "{p*}.weight")

``Rules.plan(source_keys, target_keys)`` returns a ``fastckpt.planning.mapping.MappingPlan``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import fastckpt._core as _core
from fastckpt.dtypes import short_name, to_torch
from fastckpt.errors import CheckpointError
from fastckpt.planning.mapping import (
    Assignment,
    MappingPlan,
    Region,
    Rope,
    RowSelection,
    Select,
    Span,
)

__all__ = ["Conversion", "Rule", "RuleMatch", "Rules", "RulesLike", "as_rules", "select"]

KEYWORDS = ("ignore", "ignore-target", "freeze", "unfreeze")


@dataclass(frozen=True, slots=True)
class Rule:
    """One line of a rule set."""

    kind: str  # "map", "ignore", "ignore-target", "freeze" or "unfreeze"
    source: str  # the pattern as written (for ignore-target/freeze: the target pattern)
    targets: tuple[str, ...]  # target templates of a "map" rule
    rows: RowSelection | None
    rows_file: str | None  # `rows[@file]` as written
    dtype: torch.dtype | None
    wins: bool
    line: int
    column: int
    text: str  # canonical text: parsing it gives this rule back
    convert: Conversion | None = None  # stack / cat / pick / split / transpose / rope

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Conversion:
    """A rule's conversions (``stack[e] cat[0:8]``, ``split[:,0:8] transpose``, ``rope[32]``).

    ``into`` / ``part``: regions of the target / source in the order written; a
    ``Select`` whose index is a capture name (``stack[e]``) takes its value from
    each source key (``capture_at``: that capture's segment position, counted
    from the end when negative).
    """

    into: tuple[tuple[str, int, int | str, int | None], ...] = ()  # (kind, dim, start|name, length)
    part: tuple[tuple[str, int, int, int | None], ...] = ()
    transpose: bool = False
    rope: Rope | None = None
    capture_at: int | None = None

    def regions(self, key: str, target: int = 0) -> tuple[tuple[Region, ...], tuple[Region, ...]]:
        """(into, part) for the source ``key`` and the rule's ``target``-th target."""
        return (
            tuple(_region(r, key, self.capture_at, target) for r in self.into),
            tuple(_region(r, key, self.capture_at, target) for r in self.part),
        )

    @property
    def per_target(self) -> bool:
        """Whether the targets read different parts (``split[0:4|4:8]``)."""
        return any(isinstance(r[2], tuple) for r in self.part)


@dataclass(frozen=True, slots=True)
class RuleMatch:
    rule: Rule  # the first rule (file order) whose source pattern matches
    targets: tuple[str, ...]  # rendered targets; empty for an `ignore` rule


class Rules:
    """An ordered rule set. First matching rule wins; unmatched keys keep their name.

    ``Rules(items)`` takes rule lines and ``(source, target)`` /
    ``(source, [target, ...])`` pairs. Builder methods return a new ``Rules``.
    """

    def __init__(
        self,
        items: Iterable[str | tuple[str, str | Sequence[str]]] = (),
        *,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        lines = [_item_line(item) for item in items]
        self._init("".join(line + "\n" for line in lines), "<python>", base_dir)

    def _init(self, text: str, source: str, base_dir: str | os.PathLike[str] | None) -> None:
        self.source = source
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self._core = _core.parse_rules(text, source)
        self._rules = [self._make_rule(t) for t in self._core.rules()]

    @classmethod
    def parse(
        cls, text: str, source: str = "<string>", base_dir: str | os.PathLike[str] | None = None
    ) -> Rules:
        """Rules from text; ``source`` names it in errors, ``rows[@file]`` is relative
        to ``base_dir`` (default: the current directory)."""
        self = cls.__new__(cls)
        self._init(text, source, base_dir)
        return self

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Rules:
        """Rules from a file; ``rows[@file]`` paths are relative to its folder."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"rules file not found: {p}") from None
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{p}: not a UTF-8 text file ({e.reason})") from None
        return cls.parse(text, str(p), p.parent)

    # -- the rules ---------------------------------------------------------

    @property
    def rules(self) -> list[Rule]:
        return list(self._rules)

    @property
    def freeze_patterns(self) -> list[str]:
        return [r.source for r in self._rules if r.kind == "freeze"]

    @property
    def unfreeze_patterns(self) -> list[str]:
        return [r.source for r in self._rules if r.kind == "unfreeze"]

    def __iter__(self) -> Iterator[Rule]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def __str__(self) -> str:
        return "".join(r.text + "\n" for r in self._rules)

    def __repr__(self) -> str:
        return f"<Rules: {len(self._rules)} rules from {self.source}>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Rules):
            return NotImplemented
        return [r.text for r in self._rules] == [r.text for r in other._rules]

    __hash__ = None  # type: ignore[assignment]

    # -- builders ----------------------------------------------------------

    def _with(self, line: str) -> Rules:
        return Rules.parse(str(self) + line + "\n", self.source, self.base_dir)

    def strip_prefix(self, prefix: str) -> Rules:
        """``module.x`` -> ``x``."""
        return self._with(f"{_segments(prefix)}.{{rest*}} -> {{rest*}}")

    def add_prefix(self, prefix: str) -> Rules:
        """``x`` -> ``bert.x`` (for every key no earlier rule matched)."""
        return self._with(f"{{rest*}} -> {_segments(prefix)}.{{rest*}}")

    def rename(
        self,
        source: str,
        target: str | Sequence[str],
        *,
        rows: slice | str | os.PathLike[str] | None = None,
        dtype: torch.dtype | str | None = None,
        wins: bool = False,
    ) -> Rules:
        """``source -> target``; ``rows`` is a slice (``slice(None, 1001)``) or the
        path of an index file; ``dtype`` casts on the way."""
        line = _item_line((source, target))
        if rows is not None:
            line += " " + _rows_attr(rows)
        if dtype is not None:
            line += f" dtype={short_name(dtype) if isinstance(dtype, torch.dtype) else dtype}"
        if wins:
            line += " wins"
        return self._with(line)

    def convert(
        self,
        source: str,
        target: str | Sequence[str],
        *,
        stack: str | int | None = None,
        cat: slice | tuple[int, slice] | None = None,
        pick: int | tuple[int, int] | None = None,
        split: slice | tuple[int, slice] | None = None,
        splits: Sequence[tuple[int, int]] | tuple[int, Sequence[tuple[int, int]]] | None = None,
        transpose: bool = False,
        rope: int | None = None,
        unrope: int | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> Rules:
        """``source -> target`` with conversions, as the text attributes (docs/RULES.md):
        ``stack="e"`` (or an index) puts the source at that index of the target's dim 0;
        ``cat=slice(0, 8)`` or ``(dim, slice)`` at a range; ``pick`` / ``split`` read an
        index / a range of the source, ``splits=[(0, 4), (4, 8)]`` (or ``(dim, [...])``)
        one range per target; ``transpose`` (2-D); ``rope=heads`` permutes
        Meta's interleaved rotary rows into Hugging Face's halves, ``unrope`` back."""
        line = _item_line((source, target))
        if dtype is not None:
            line += f" dtype={short_name(dtype) if isinstance(dtype, torch.dtype) else dtype}"
        if stack is not None:
            line += f" stack[{stack}]"
        if cat is not None:
            line += " cat" + _index_attr(cat)
        if pick is not None:
            dim, i = pick if isinstance(pick, tuple) else (0, pick)
            line += f" pick[{':,' * dim}{i}]"
        if split is not None:
            line += " split" + _index_attr(split)
        if splits is not None:
            dim, parts = splits if isinstance(splits[0], int) else (0, splits)  # type: ignore[misc,assignment]
            line += f" split[{':,' * dim}" + "|".join(f"{a}:{b}" for a, b in parts) + "]"  # type: ignore[misc]
        if transpose:
            line += " transpose"
        if rope is not None:
            line += f" rope[{rope}]"
        if unrope is not None:
            line += f" unrope[{unrope}]"
        return self._with(line)

    def unstack(
        self,
        source: str,
        targets: str | Sequence[str],
        count: int,
        *,
        splits: Sequence[tuple[int, int]] | None = None,
        capture: str = "e",
    ) -> Rules:
        """The reverse of a stack, as one rule: index ``i`` of ``source``'s dim 0 feeds
        each of ``targets`` with ``{capture}`` replaced by ``i``, for i < ``count``
        (``pick[0|1|...]``); ``splits``: one row range per template (``w1`` rows 0:8,
        ``w3`` rows 8:16 of a stacked gate_up)."""
        templates = [targets] if isinstance(targets, str) else list(targets)
        names = [t.replace(f"{{{capture}}}", str(i)) for t in templates for i in range(count)]
        line = _item_line((source, names))
        line += " pick[" + "|".join(str(i) for _ in templates for i in range(count)) + "]"
        if splits is not None:
            if len(splits) != len(templates):
                raise ValueError(f"{len(splits)} splits for {len(templates)} target templates")
            line += " split[" + "|".join(f"{a}:{b}" for a, b in splits for _ in range(count)) + "]"
        return self._with(line)

    def ignore(self, pattern: str) -> Rules:
        """Source keys that are not wanted (``cls.**``)."""
        return self._with(f"ignore {pattern}")

    def ignore_target(self, pattern: str) -> Rules:
        """Targets the checkpoint never has (``**.version``): not reported missing."""
        return self._with(f"ignore-target {pattern}")

    def freeze(self, pattern: str) -> Rules:
        return self._with(f"freeze {pattern}")

    def unfreeze(self, pattern: str) -> Rules:
        return self._with(f"unfreeze {pattern}")

    # -- matching ----------------------------------------------------------

    def match(self, keys: Sequence[str]) -> list[RuleMatch | None]:
        """For each source key, the first rule that matches it (None: keeps its name)."""
        rule_bytes, begin_bytes, targets = self._core.match_sources(keys)
        rule_of, begin = _u32(rule_bytes), _u32(begin_bytes)
        out: list[RuleMatch | None] = []
        for i, r in enumerate(rule_of):
            if r == NO_RULE:
                out.append(None)
            else:
                out.append(RuleMatch(self._rules[r], tuple(targets[begin[i] : begin[i + 1]])))
        return out

    def plan(self, source_keys: Sequence[str], target_keys: Sequence[str] | None) -> MappingPlan:
        """Which source feeds which target.

        - A source key no rule matches feeds the target of the same name, if any.
        - Targets a rule produces are kept even when ``target_keys`` lacks them:
          the loader reports those as unexpected, with the rule.
        - Two sources for one target raise ``CheckpointError`` naming both,
          unless exactly one comes from a rule marked ``wins``; the others are
          then listed in ``ignored_sources``.
        - ``ignored_targets``: targets without a source that ``ignore-target`` covers.
        - ``unused_rules``: rules that were the first match for no key (often a typo).
        - ``target_keys=None`` (no model, e.g. ``convert``): every source maps, by its
          rule or to itself.
        """
        sources = tuple(source_keys)
        targets = sources if target_keys is None else tuple(target_keys)
        names, src_of, rule_of, ign_src, ign_tgt, unused = self._core.plan(sources, targets)
        # One (text, rows, dtype) per rule, not per assignment; None for same-name pairs.
        attrs = [(r.text, r.rows, r.dtype) for r in self._rules]
        triples = list(zip(names, _u32(src_of), _u32(rule_of), strict=True))
        # Which of its rule's targets each assignment is, where the targets read
        # different parts of one source (split[0:4|4:8]): the rule's targets in order.
        per_target = [
            r != NO_RULE and (c := self._rules[r].convert) is not None and c.per_target
            for _, _, r in triples
        ]
        order: dict[str, tuple[str, ...]] = {}
        if any(per_target):
            keys = sorted(
                {sources[s] for (_, s, _), p in zip(triples, per_target, strict=True) if p}
            )
            order = {k: m.targets for k, m in zip(keys, self.match(keys), strict=True) if m}
        assignments = [
            Assignment(t, sources[s])
            if r == NO_RULE
            else Assignment(t, sources[s], *attrs[r])
            if self._rules[r].convert is None
            else _converted(t, sources[s], self._rules[r], order[sources[s]].index(t) if p else 0)
            for (t, s, r), p in zip(triples, per_target, strict=True)
        ]
        return MappingPlan(
            assignments=assignments,
            ignored_sources=[sources[i] for i in _u32(ign_src)],
            ignored_targets=[targets[i] for i in _u32(ign_tgt)],
            unused_rules=[self._rules[i].text for i in _u32(unused)],
        )

    # -- internals ---------------------------------------------------------

    def _make_rule(self, t: tuple) -> Rule:
        kind, source, targets, rows_spec, dtype_name, wins, line, column, text, conv, cols = t
        rows: RowSelection | None = None
        rows_file: str | None = None
        if rows_spec is not None and rows_spec[0] == "range":
            rows = RowSelection(start=rows_spec[1], stop=rows_spec[2])
        elif rows_spec is not None:
            rows_file = rows_spec[1]
            rows = RowSelection(index=self._read_rows_file(rows_file, line, rows_spec[2]))
        dtype = to_torch(dtype_name) if dtype_name is not None else None
        convert = (
            _parse_conversion(conv, cols, source, len(targets), f"{self.source}:{line}")
            if conv
            else None
        )
        return Rule(
            kind, source, tuple(targets), rows, rows_file, dtype, wins, line, column, text, convert
        )

    def _read_rows_file(self, name: str, line: int, column: int) -> tuple[int, ...]:
        where = f"{self.source}:{line}:{column}"
        path = Path(name)
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise CheckpointError(f"{where}: cannot read rows file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise CheckpointError(f"{where}: rows file {path} is not a text file") from None
        index: list[int] = []
        for n, raw in enumerate(text.splitlines(), start=1):
            word = raw.strip()
            if not word:
                continue
            if not word.isdigit():
                raise CheckpointError(
                    f"{where}: rows file {path}:{n}: '{word}' is not a row number"
                )
            index.append(int(word))
        if not index:
            raise CheckpointError(f"{where}: rows file {path} lists no rows")
        return tuple(index)


def _converted(target: str, source: str, rule: Rule, index: int) -> Assignment:
    conv = rule.convert
    assert conv is not None
    into, part = conv.regions(source, index)
    return Assignment(
        target,
        source,
        rule.text,
        rule.rows,
        rule.dtype,
        into=into or None,
        part=part or None,
        transpose=conv.transpose,
        rope=conv.rope,
    )


def _region(r: tuple, key: str, capture_at: int | None, target: int) -> Region:
    kind, dim, start, length = r
    if isinstance(start, tuple):
        start, length = start[target]
    elif isinstance(start, str):
        assert capture_at is not None
        value = key.split(".")[capture_at]
        if not value.isdigit():
            raise CheckpointError(
                f"{key}: stack[{start}] needs a number where {{{start}}} matches, not {value!r}"
            )
        start = int(value)
    return Select(dim, start) if kind == "select" else Span(dim, start, length)


def _parse_conversion(
    attrs: Sequence[str], cols: Sequence[int], pattern: str, n_targets: int, where: str
) -> Conversion:
    """The conversion attributes of one rule (the core checked their form)."""
    into: list[tuple] = []
    part: list[tuple] = []
    transpose = False
    rope: Rope | None = None
    capture_at: int | None = None
    for attr, col in zip(attrs, cols, strict=True):
        at = f"{where}:{col}: {attr}"
        if attr == "transpose":
            if transpose:
                raise CheckpointError(f"{at}: transpose given twice")
            if rope is not None:
                raise CheckpointError(f"{at}: transpose must come before rope[...]")
            transpose = True
            continue
        name, _, inner = attr[:-1].partition("[")
        items = inner.split(",")
        if any(i != ":" for i in items[:-1]):
            raise CheckpointError(f"{at}: only ':' may come before the last index (one per dim)")
        dim, last = len(items) - 1, items[-1]
        if name in ("rope", "unrope"):
            if rope is not None:
                raise CheckpointError(f"{at}: a second rotary permutation")
            if dim or not last.isdigit() or int(last) == 0:
                raise CheckpointError(f"{at}: expected the number of heads, rope[32]")
            rope = Rope(int(last), to_halves=name == "rope")
            continue
        if name == "pick" and "|" in last:
            picks = last.split("|")
            if not all(p.isdigit() for p in picks):
                raise CheckpointError(f"{at}: expected an index per target, pick[0|1|2]")
            if len(picks) != n_targets:
                raise CheckpointError(
                    f"{at}: {len(picks)} indices for {n_targets} targets (one index per target)"
                )
            part.append(("select", dim, tuple((int(p), None) for p in picks), None))
            continue
        if name in ("stack", "pick"):
            if last.isdigit():
                index: int | str = int(last)
            elif name == "pick":
                raise CheckpointError(f"{at}: expected an index, pick[3]")
            else:
                index, capture_at = last, _capture_position(pattern, last, at)
            (into if name == "stack" else part).append(("select", dim, index, None))
            continue
        ranges = []
        for text in last.split("|"):
            lo, colon, hi = text.partition(":")
            if not colon or not lo.isdigit() or not hi.isdigit() or int(hi) < int(lo):
                raise CheckpointError(f"{at}: expected a range A:B with A <= B, {name}[0:8]")
            ranges.append((int(lo), int(hi) - int(lo)))
        if len(ranges) == 1:
            (into if name == "cat" else part).append(("span", dim, *ranges[0]))
        elif name == "cat":
            raise CheckpointError(f"{at}: cat[...] takes one range")
        elif len(ranges) != n_targets:
            raise CheckpointError(
                f"{at}: {len(ranges)} ranges for {n_targets} targets (one range per target)"
            )
        else:
            part.append(("span", dim, tuple(ranges), None))
        if name == "split" and (transpose or rope is not None):
            raise CheckpointError(f"{at}: split[...] must come before transpose and rope[...]")
    return Conversion(tuple(into), tuple(part), transpose, rope, capture_at)


def _capture_position(pattern: str, name: str, at: str) -> int:
    """The segment of a key that ``{name}`` of ``pattern`` matches: counted from the start
    when no multi-segment wildcard comes before it, else from the end."""
    segs = pattern.split(".")
    k = segs.index(f"{{{name}}}")

    def many(seg: str) -> bool:
        return seg == "**" or (seg.startswith("{") and seg.endswith("*}"))

    if not any(many(s) for s in segs[:k]):
        return k
    if not any(many(s) for s in segs[k + 1 :]):
        return k - len(segs)
    raise CheckpointError(f"{at}: {{{name}}} lies between two multi-segment wildcards")


def _index_attr(x: slice | tuple[int, slice]) -> str:
    dim, sl = x if isinstance(x, tuple) else (0, x)
    if sl.step not in (None, 1) or sl.stop is None:
        raise ValueError(f"a range with a stop and no step, not {sl}")
    return f"[{':,' * dim}{sl.start or 0}:{sl.stop}]"


RulesLike = Rules | str | os.PathLike | None


def as_rules(obj: object) -> Rules | None:
    """None -> None; a Rules (or any object with ``.plan``) as is; a path -> the
    file's rules; a string with a newline, a ``->`` or a keyword -> rules text;
    any other string -> a path."""
    if obj is None or isinstance(obj, Rules):
        return obj
    if isinstance(obj, os.PathLike):
        return Rules.from_file(obj)
    if isinstance(obj, str):
        first = obj.strip().split(None, 1)[0] if obj.strip() else ""
        if "\n" in obj or "->" in obj or first in KEYWORDS or not obj.strip():
            return Rules.parse(obj)
        return Rules.from_file(obj)
    if callable(getattr(obj, "plan", None)):
        return obj  # type: ignore[return-value]  # a duck-typed rules object
    raise TypeError(
        f"rules must be None, a path, rules text or a Rules object, not {type(obj).__name__}"
    )


def select(pattern: str, names: Sequence[str]) -> list[str]:
    """The names a rules pattern matches (``bert.**``, ``linear.*.weight``, ...)."""
    names = tuple(names)
    hits = _core.match_pattern(pattern, names)
    return [n for n, hit in zip(names, hits, strict=True) if hit]


NO_RULE = 0xFFFFFFFF  # the core's "no rule matched"


def _u32(b: bytes) -> memoryview:
    return memoryview(b).cast("I")


def _segments(prefix: str) -> str:
    p = prefix.strip(".")
    if not p:
        raise ValueError(f"empty prefix: {prefix!r}")
    return p


def _item_line(item: str | tuple[str, str | Sequence[str]]) -> str:
    if isinstance(item, str):
        if "\n" in item:
            raise ValueError(f"one rule per item, got a newline in {item!r}")
        return item
    source, target = item
    targets = [target] if isinstance(target, str) else list(target)
    return f"{source} -> {', '.join(targets)}"


def _rows_attr(rows: slice | str | os.PathLike[str]) -> str:
    if isinstance(rows, slice):
        if rows.step not in (None, 1):
            raise ValueError(f"rows: a step is not supported ({rows})")
        start = "" if rows.start in (None, 0) else str(rows.start)
        stop = "" if rows.stop is None else str(rows.stop)
        return f"rows[{start}:{stop}]"
    return f"rows[@{os.fspath(rows)}]"
