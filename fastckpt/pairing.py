"""Suggest a rule set that maps one key set onto another, from names and shapes.

``suggest_pairings(source_shapes, target_shapes)`` returns rules-format lines
(docs/RULES.md) a user can save, read and edit. In order of trust:

1. a prefix change (strip ``module.``/``bert.``..., add ``roberta.``...) that
   makes the most names meet with equal shapes;
2. known segment renames (``gamma`` -> ``weight``, ``beta`` -> ``bias``);
3. pairs of the keys still unmatched whose shapes and relative positions match:
   keys are grouped by their layer numbers and shape (and, first, their last
   segment); a group with as many sources as targets is paired in order, so
   the dict order of both inputs matters (checkpoint order, model order);
   a first dimension larger in the source than in the target (a vocabulary
   cut) pairs the same way with ``rows[:N]``;
4. ``ignore`` for siblings of a stripped prefix of which nothing pairs
   (``cls.**`` next to ``bert.``).

Pairs are written as patterns: layer numbers become ``{i}`` (``{j}``, ...) and a
shared last segment ``{p}`` when the pattern holds for every key it matches;
otherwise the keys are written out. Targets left without a source are listed
as comments at the end.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from fastckpt.rules import Rules

__all__ = ["suggest_pairings"]

KNOWN_RENAMES = {"gamma": "weight", "beta": "bias"}  # last segment, TF/old names -> torch
CAPTURES = ("i", "j", "k", "l")
Shape = tuple[int, ...]


def suggest_pairings(
    source_shapes: Mapping[str, Sequence[int]], target_shapes: Mapping[str, Sequence[int]]
) -> list[str]:
    src = {k: tuple(v) for k, v in source_shapes.items()}
    dst = {k: tuple(v) for k, v in target_shapes.items()}
    strip, add = _best_prefix(src, dst)

    def renamed(key: str) -> str | None:
        if not key.startswith(strip):
            return None
        return add + key[len(strip) :]

    # Pairs found so far: source -> (target, rows stop or None).
    pairs: dict[str, tuple[str, int | None]] = {}
    taken: set[str] = set()

    def pair(s: str, t: str, rows: int | None = None) -> None:
        pairs[s] = (t, rows)
        taken.add(t)

    for s, shape in src.items():
        t = renamed(s) if s.startswith(strip) else s
        if t is not None and dst.get(t) == shape and t not in taken:
            pair(s, t)
    renames_used: set[str] = set()
    for s, shape in src.items():
        t = renamed(s)
        if s in pairs or t is None:
            continue
        head, _, last = t.rpartition(".")
        if last in KNOWN_RENAMES:
            t2 = f"{head}.{KNOWN_RENAMES[last]}" if head else KNOWN_RENAMES[last]
            if dst.get(t2) == shape and t2 not in taken:
                pair(s, t2)
                renames_used.add(last)

    _pair_by_position(src, dst, pairs, taken, pair)

    # The base rules: renames, then ignores, then the prefix change as a catch-all.
    base: list[str] = []
    p_pat = f"{strip.rstrip('.')}." if strip else ""
    a_pat = f"{add.rstrip('.')}." if add else ""
    for old in sorted(renames_used):
        base.append(f"{p_pat}{{x*}}.{old} -> {a_pat}{{x*}}.{KNOWN_RENAMES[old]}")
    base += [f"ignore {g}.**" for g in _ignorable_groups(src, dst, pairs, strip)]
    if strip or add:
        base.append(f"{p_pat}{{rest*}} -> {a_pat}{{rest*}}")

    # Pairs the base rules get wrong need rules of their own, placed first.
    base_rules = Rules(base)
    keys = list(src)
    base_target = {
        s: (m.targets[0] if m and m.targets else (None if m else s))
        for s, m in zip(keys, base_rules.match(keys), strict=True)
    }
    needed = {s: tp for s, tp in pairs.items() if base_target[s] != tp[0] or tp[1] is not None}
    position = {s: n for n, s in enumerate(keys)}
    specific: list[tuple[int, str]] = []
    covered: set[str] = set()
    for s, (t, rows) in needed.items():
        if s in covered:
            continue
        for line in _candidate_lines(s, t, rows):
            hits = _valid_cover(line, keys, pairs)
            if hits is not None:
                specific.append((min(position[h] for h in hits), line))
                covered |= hits
                break

    missing = [t for t in dst if t not in taken]
    notes = [f"# no source found for {t} {list(dst[t])}" for t in missing]
    return [line for _, line in sorted(specific)] + base + notes


def _best_prefix(src: dict[str, Shape], dst: dict[str, Shape]) -> tuple[str, str]:
    """The (strip, add) prefix change under which the most names meet with equal shapes."""

    def prefixes(keys: Sequence[str]) -> list[str]:
        counts: Counter[str] = Counter()
        for k in keys:
            parts = k.split(".")
            for n in (1, 2):
                if len(parts) > n:
                    counts[".".join(parts[:n]) + "."] += 1
        return [""] + [p for p, _ in counts.most_common(6)]

    def score(strip: str, add: str) -> int:
        return sum(
            1
            for s, shape in src.items()
            if s.startswith(strip) and dst.get(add + s[len(strip) :]) == shape
        )

    best = ("", "")
    best_score = score("", "")
    for strip in prefixes(list(src)):
        for add in prefixes(list(dst)):
            if (strip, add) == ("", ""):
                continue
            sc = score(strip, add)
            if sc > best_score:
                best, best_score = (strip, add), sc
    return best


def _numbers(key: str) -> tuple[str, ...]:
    return tuple(seg for seg in key.split(".") if seg.isdigit())


def _pair_by_position(src, dst, pairs, taken, pair) -> None:
    def leftovers():
        s_left = [s for s in src if s not in pairs]
        t_left = [t for t in dst if t not in taken]
        return s_left, t_left

    def tail(k: str, n: int) -> tuple[str, ...]:
        return tuple(k.split(".")[-n:])

    # Most specific grouping first: layer numbers, shape and the last two, one
    # or no name segments. Then a vocabulary cut: equal trailing dimensions,
    # more rows in the source than in the target.
    passes = [
        (lambda k, shape: (_numbers(k), shape, tail(k, 2)), False),
        (lambda k, shape: (_numbers(k), shape, tail(k, 1)), False),
        (lambda k, shape: (_numbers(k), shape), False),
        (lambda k, shape: (_numbers(k), shape[1:], tail(k, 2)), True),
        (lambda k, shape: (_numbers(k), shape[1:]), True),
    ]
    for key_of, cut in passes:
        s_left, t_left = leftovers()
        groups: dict[tuple, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for s in s_left:
            if src[s] or not cut:
                groups[key_of(s, src[s])][0].append(s)
        for t in t_left:
            if dst[t] or not cut:
                groups[key_of(t, dst[t])][1].append(t)
        for ss, ts in groups.values():
            if not ss or len(ss) != len(ts):
                continue
            if cut and not all(src[s][0] > dst[t][0] for s, t in zip(ss, ts, strict=True)):
                continue
            for s, t in zip(ss, ts, strict=True):
                pair(s, t, dst[t][0] if cut else None)


def _ignorable_groups(src, dst, pairs, strip: str) -> list[str]:
    """Siblings of a stripped prefix (``cls`` next to ``bert.``) of which nothing
    pairs and no target name starts the same way: heads the target lacks."""
    if not strip:
        return []
    strip_parts = strip.rstrip(".").split(".")
    groups: dict[str, list[str]] = {}
    for s in src:
        if s.startswith(strip):
            continue
        parts = s.split(".")
        shared = 0
        while (
            shared < len(strip_parts)
            and shared < len(parts) - 1
            and parts[shared] == strip_parts[shared]
        ):
            shared += 1
        if len(parts) <= shared + 1:
            continue
        groups.setdefault(".".join(parts[: shared + 1]), []).append(s)
    out = []
    for g, members in groups.items():
        if any(m in pairs for m in members):
            continue
        if any(t == g or t.startswith(g + ".") for t in dst):
            continue
        out.append(g)
    return out


def _candidate_lines(s: str, t: str, rows: int | None) -> list[str]:
    attr = f" rows[:{rows}]" if rows is not None else ""
    lines = []
    s_parts, t_parts = s.split("."), t.split(".")
    s_nums = [i for i, p in enumerate(s_parts) if p.isdigit()]
    t_nums = [i for i, p in enumerate(t_parts) if p.isdigit()]
    numbered = None
    if (
        s_nums
        and len(s_nums) == len(t_nums) <= len(CAPTURES)
        and all(s_parts[a] == t_parts[b] for a, b in zip(s_nums, t_nums, strict=True))
    ):
        sp, tp = list(s_parts), list(t_parts)
        for n, (a, b) in enumerate(zip(s_nums, t_nums, strict=True)):
            sp[a] = tp[b] = f"{{{CAPTURES[n]}}}"
        numbered = (sp, tp)
    for sp, tp in ([numbered] if numbered else []) + [(s_parts, t_parts)]:
        if len(sp) > 1 and len(tp) > 1 and sp[-1] == tp[-1] and not sp[-1].startswith("{"):
            lines.append(".".join(sp[:-1] + ["{p}"]) + " -> " + ".".join(tp[:-1] + ["{p}"]) + attr)
        lines.append(".".join(sp) + " -> " + ".".join(tp) + attr)
    return list(dict.fromkeys(lines))


def _valid_cover(line: str, keys: list[str], pairs) -> set[str] | None:
    """The source keys `line` maps, if it maps every key it matches to its pair."""
    rows_m = re.search(r" rows\[:(\d+)\]$", line)
    rows = int(rows_m.group(1)) if rows_m else None
    hits = set()
    for s, m in zip(keys, Rules([line]).match(keys), strict=True):
        if m is None:
            continue
        if s not in pairs or pairs[s] != (m.targets[0], rows):
            return None
        hits.add(s)
    return hits
