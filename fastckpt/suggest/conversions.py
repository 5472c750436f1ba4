"""Conversions a suggestion may propose (fastckpt.suggest.renames): stacks of per-expert
tensors, concatenations of them, and exact transposes, when names and shapes prove them.

- A *family* is the unexplained checkpoint keys that differ only in their last
  number (``l.0.experts.{e}.w1.weight``), numbered 0..N-1 without a gap, all of
  one shape S.
- ``stack[e]``: a model tensor left without a source, of shape (N, *S), with the
  family's other numbers (its layer), is the only such target and the family the
  only such family of that layer: the stack is proved by shape.
- ``stack[e] cat[...]``: a target of shape (N, R, ...) whose last name lists the
  words that set families apart (``gate_up_proj``: the ``w1``/gate and
  ``w3``/up families), in that order, with rows adding up to R.
- ``cat[...]`` of plain tensors: the sources of a layer (same trailing shape)
  whose distinguishing words the target's name lists (``q``, ``k``, ``v`` in
  ``qkv_proj``), in that order, their rows adding up to the target's.
- ``transpose``: a source of shape (a, b), a != b, and a target of shape (b, a):
  the same name (a source whose name is a model key is never read into another
  key), or each the only one of its shape left in its layer.

Every proposed line is checked by planning it over all the keys: it must give
exactly the intended pieces, or its layer numbers are written out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from fastckpt.planning.mapping import Select, Span, regions
from fastckpt.planning.rules import Rules
from fastckpt.suggest.pairing import SYNONYMS

Shape = tuple[int, ...]
Piece = tuple[str, str, tuple]  # (target, source, into regions)

__all__ = ["generalise", "suggest_conversions"]


def _digits(key: str) -> list[int]:
    return [n for n, seg in enumerate(key.split(".")) if seg.isdigit()]


def _layer(key: str, skip: int | None = None) -> tuple[str, ...]:
    parts = key.split(".")
    return tuple(parts[n] for n in _digits(key) if n != skip)


def _families(sources: Mapping[str, Shape]) -> dict[str, tuple[Shape, list[str]]]:
    """template (last number as {e}) -> (shape, keys by index) for complete families."""
    groups: dict[str, dict[int, str]] = defaultdict(dict)
    for key in sources:
        d = _digits(key)
        if not d:
            continue
        parts = key.split(".")
        e = int(parts[d[-1]])
        parts[d[-1]] = "{e}"
        groups[".".join(parts)][e] = key
    out = {}
    for template, by_index in groups.items():
        keys = [by_index.get(i) for i in range(len(by_index))]
        shapes = {sources[k] for k in keys if k is not None}
        if len(keys) >= 2 and None not in keys and len(shapes) == 1:
            out[template] = (shapes.pop(), keys)  # type: ignore[arg-type]
    return out  # type: ignore[return-value]


def _word(template: str, others: list[str]) -> str | None:
    """The one name word setting ``template`` apart from the other families of its layer."""

    def words(t: str) -> list[str]:
        return [SYNONYMS.get(w, w) for seg in t.split(".") for w in seg.lower().split("_")]

    mine = words(template)
    common = set(mine)
    for o in others:
        common &= set(words(o))
    own = [w for w in mine if w not in common and w not in ("{e}",)]
    return own[0] if len(own) == 1 else None


def _order_in(target: str, words: list[str], letters: set[str]) -> list[int] | None:
    """Positions of ``words`` in the target's last name segments (``gate_up_proj``;
    single letters in a run made only of ``letters``, such as ``qkv``), or None when
    one is missing or ambiguous."""
    tail = target.split(".")[-2:]
    tokens = [w for seg in tail for w in seg.lower().split("_")]
    runs = [(n, t) for n, t in enumerate(tokens) if len(t) > 1 and set(t) <= letters]
    pos = []
    for w in words:
        if w in tokens:
            pos.append(tokens.index(w) * 100)
            continue
        hits = [(n, t.index(w)) for n, t in runs if len(w) == 1 and t.count(w) == 1]
        if len(hits) != 1:
            return None
        pos.append(hits[0][0] * 100 + hits[0][1])
    return pos if len(set(pos)) == len(pos) else None


def suggest_conversions(
    sources: Mapping[str, Shape],
    targets: Mapping[str, Shape],
    bound: Mapping[str, str] | None = None,
    keys: Sequence[str] | None = None,
) -> tuple[list[str], set[str], set[str], dict[str, str]]:
    """(rules lines, sources used, targets filled, {source: target} read transposed) for
    the unexplained keys given.

    A ``bound`` source (``{source: model key}``: its own name, as the chosen renaming
    writes it, is a model key; it feeds that key or nothing) is only ever read into
    that key, transposed when its shape is the key's transposed, and that key is
    fed by nothing else; ``keys``: every checkpoint key (the lines are checked over
    them all), by default the sources given.
    """
    pieces: list[Piece] = []
    lines: list[str] = []
    used: set[str] = set()
    filled: set[str] = set()
    transposed: dict[str, str] = {}
    all_keys = list(sources) if keys is None else list(keys)
    bound = bound or {}
    for s, t in sorted(bound.items()):
        sh, th = sources.get(s), targets.get(t)
        if sh is not None and th is not None and len(sh) == 2 and sh[0] != sh[1]:
            if th == (sh[1], sh[0]):
                pieces.append((t, s, ()))
                lines.append(f"{s} -> {t} transpose")
                used.add(s)
                filled.add(t)
                transposed[s] = t
    sources = {s: sh for s, sh in sources.items() if s not in bound}
    targets = {t: sh for t, sh in targets.items() if t not in set(bound.values())}
    fams = _families(sources)
    by_layer: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for t, (_, keys) in fams.items():
        by_layer[_layer(keys[0], _digits(keys[0])[-1])].append(t)
    t_by_layer: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for t in targets:
        t_by_layer[_layer(t)].append(t)
    for layer, templates in by_layer.items():
        free = [t for t in t_by_layer.get(layer, []) if t not in filled]
        # stack: one family and one target of the stacked shape in this layer
        for tpl in templates:
            shape, keys = fams[tpl]
            want = (len(keys), *shape)
            same_fams = [o for o in templates if (len(fams[o][1]), *fams[o][0]) == want]
            hits = [t for t in free if targets[t] == want and t not in filled]
            if len(hits) == 1 and len(same_fams) == 1:
                t = hits[0]
                pieces += [(t, k, (Select(0, e),)) for e, k in enumerate(keys)]
                lines.append(f"{tpl} -> {t} stack[e]")
                used.update(keys)
                filled.add(t)
        # stack + concatenate: families named in the target's name, in that order
        for t in free:
            if t in filled or len(targets[t]) < 2:
                continue
            n, rows, rest = targets[t][0], targets[t][1], targets[t][2:]
            parts = [o for o in templates if len(fams[o][1]) == n and fams[o][0][1:] == rest]
            parts = [o for o in parts if not used & set(fams[o][1])]
            if len(parts) < 2:
                continue
            words = [_word(o, [p for p in parts if p != o]) for o in parts]
            if None in words:
                continue
            order = _order_in(t, words, {w for w in words if w and len(w) == 1})  # type: ignore[arg-type]
            chosen = [p for _, p in sorted(zip(order, parts, strict=True))] if order else []
            if not chosen or sum(fams[p][0][0] for p in chosen) != rows:
                continue
            at = 0
            for p in chosen:
                shape, keys = fams[p]
                pieces += [
                    (t, k, (Select(0, e), Span(0, at, shape[0]))) for e, k in enumerate(keys)
                ]
                lines.append(f"{p} -> {t} stack[e] cat[{at}:{at + shape[0]}]")
                used.update(keys)
                at += shape[0]
            filled.add(t)
    # concatenations of plain tensors (q, k, v -> qkv_proj): the sources of a layer whose
    # distinguishing word is in the target's name, in that order, rows adding up
    s_by_layer: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for s in sources:
        if s not in used:
            s_by_layer[_layer(s)].append(s)
    for layer, ts in t_by_layer.items():
        for t in ts:
            if t in filled or not targets[t]:
                continue
            cands = [s for s in s_by_layer.get(layer, []) if s not in used]
            cands = [s for s in cands if sources[s][1:] == targets[t][1:] and sources[s]]
            if len(cands) < 2:
                continue
            named = []
            word_of = {s: _word(s, [o for o in cands if o != s]) for s in cands}
            letters = {w for w in word_of.values() if w and len(w) == 1}
            for s in cands:
                w = word_of[s]
                pos = _order_in(t, [w], letters) if w is not None else None
                if pos is not None:
                    named.append((pos[0], s))
            named.sort()
            if len(named) < 2 or len({p for p, _ in named}) != len(named):
                continue
            if sum(sources[s][0] for _, s in named) != targets[t][0]:
                continue
            at = 0
            for _, s in named:
                pieces.append((t, s, (Span(0, at, sources[s][0]),)))
                lines.append(f"{s} -> {t} cat[{at}:{at + sources[s][0]}]")
                used.add(s)
                at += sources[s][0]
            filled.add(t)
    # transposes: unique (a, b) / (b, a) pairs within a layer
    s_left = [s for s in sources if s not in used]
    t_left = [t for t in targets if t not in filled]
    groups: dict[tuple, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for s in s_left:
        sh = sources[s]
        if len(sh) == 2 and sh[0] != sh[1]:
            groups[(_layer(s), sh)][0].append(s)
    for t in t_left:
        sh = targets[t]
        if len(sh) == 2 and sh[0] != sh[1]:
            groups[(_layer(t), (sh[1], sh[0]))][1].append(t)
    for (layer, shape), (ss, ts) in groups.items():
        plain = [t for t in t_left if targets[t] == shape and _layer(t) == layer]
        if len(ss) == 1 and len(ts) == 1 and not plain:
            pieces.append((ts[0], ss[0], ()))
            lines.append(f"{ss[0]} -> {ts[0]} transpose")
            used.add(ss[0])
            filled.add(ts[0])
            transposed[ss[0]] = ts[0]
    return generalise(lines, pieces, all_keys), used, filled, transposed


def generalise(lines: list[str], pieces: list[Piece], keys: list[str]) -> list[str]:
    """Layer numbers as {i} where that plans exactly the intended pieces, else as written."""
    want = set(pieces)

    def planned(rules: list[str]) -> set[Piece] | None:
        try:
            plan = Rules(rules).plan(keys, None)
        except Exception:
            return None
        return {
            (a.target, a.source, regions(a.into)) for a in plan.assignments if a.rule is not None
        }

    general: list[str] = []
    for line in lines:
        src, _, rest = line.partition(" -> ")
        tgt, _, attrs = rest.partition(" ")
        sp, tp = src.split("."), tgt.split(".")
        s_num = [n for n, p in enumerate(sp) if p.isdigit()]
        t_num = [n for n, p in enumerate(tp) if p.isdigit()]
        if s_num and len(s_num) == len(t_num) and [sp[n] for n in s_num] == [tp[n] for n in t_num]:
            for k, (a, b) in enumerate(zip(s_num, t_num, strict=True)):
                sp[a] = tp[b] = "{" + "ijkl"[k] + "}" if k < 4 else sp[a]
            candidate = f"{'.'.join(sp)} -> {'.'.join(tp)} {attrs}".rstrip()
            if candidate not in general:
                general.append(candidate)
            continue
        general.append(line)
    if planned(general) == want:
        return general
    return lines if planned(lines) == want else []
