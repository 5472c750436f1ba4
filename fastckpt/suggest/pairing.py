"""Pairing by shape and name: the part of the suggestion engine
(``fastckpt.suggest.renames``) that explains keys no prefix change or known rename does.

``pair_by_shape`` pairs the keys still unmatched that share layer numbers and
shape, and never on position alone: a group (same layer numbers and shape, and,
first, the same last segments) is paired when it holds one source and one
target, or, with several, where the names single out a partner (see
``name_pairs``); the rest stay unexplained. The pairing depends on the sets of
keys only, never on their order. A first dimension larger in the source than in
the target (a vocabulary cut) pairs the same way with ``rows[:N]``. A
parametrization's storage (``parametrizations.weight.original0``) is never a
shape match for a plain tensor: loading a weight into it gives other values.

``pattern_lines`` writes such pairs as rules: layer numbers become ``{i}``
(``{j}``, ...) and a shared last segment ``{p}`` when the pattern holds for
every key it matches; otherwise the keys are written out.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

from fastckpt.planning.rules import Rules

__all__ = ["name_pairs", "pair_by_shape", "pattern_lines"]

CAPTURES = ("i", "j", "k", "l")
Shape = tuple[int, ...]
# source -> (target, rows stop for a vocabulary cut, or None)
Pairs = dict[str, tuple[str, int | None]]


def _numbers(key: str) -> tuple[str, ...]:
    return tuple(seg for seg in key.split(".") if seg.isdigit())


def _tail(key: str, n: int) -> tuple[str, ...]:
    return tuple(key.split(".")[-n:])


GroupKey = Callable[[str, Shape], tuple]

# Most specific grouping first: layer numbers, shape and the last two, one or no
# name segments. Then a vocabulary cut: equal trailing dimensions, more rows in
# the source than in the target.
_PASSES: list[tuple[GroupKey, bool]] = [
    (lambda k, shape: (_numbers(k), shape, _tail(k, 2)), False),
    (lambda k, shape: (_numbers(k), shape, _tail(k, 1)), False),
    (lambda k, shape: (_numbers(k), shape), False),
    (lambda k, shape: (_numbers(k), shape[1:], _tail(k, 2)), True),
    (lambda k, shape: (_numbers(k), shape[1:]), True),
]


# Name words that mean the same tensor in other code bases. Attention
# projections (BERT/ViT `query`, Meta Llama `wq`, `out_proj`, `o_proj`), the
# Llama/Mixtral feed-forward names (`w1` is the gate, `w3` the up projection,
# `w2` the down projection) and the seq2seq sides (`src_embedding` feeds the
# encoder). They only decide among keys that already share layer numbers and
# shape, and only where exactly one partner fits.
SYNONYMS: dict[str, str] = {
    "query": "q", "wq": "q",
    "key": "k", "wk": "k",
    "value": "v", "wv": "v",
    "output": "o", "out": "o", "wo": "o",
    "w1": "gate", "w3": "up", "w2": "down",
    "src": "encoder", "source": "encoder", "enc": "encoder",
    "tgt": "decoder", "target": "decoder", "dec": "decoder",
}  # fmt: skip


def _words(key: str) -> frozenset[str]:
    """The key's name words (segments split at ``_``, synonyms folded), numbers left out."""
    out = set()
    for seg in key.split("."):
        if seg.isdigit():
            continue
        for w in seg.lower().split("_"):
            if w:
                out.add(SYNONYMS.get(w, w))
    return frozenset(out)


def name_pairs(sources: Sequence[str], targets: Sequence[str]) -> dict[str, str]:
    """Pairs among same-shaped keys that their names single out.

    The words a key does not share with every other key of its side (``q`` and
    ``attention`` for ``...attention.query.bias`` among the layer's biases) are
    its distinguishing words. A source and a target pair when each is the
    other's only best match: no other key of the other side shares as many
    distinguishing words with it, and they share at least one. Keys without
    such evidence are left out, whatever their order.
    """
    if not sources or not targets:
        return {}

    def distinct(keys: Sequence[str]) -> dict[str, frozenset[str]]:
        words = {k: _words(k) for k in keys}
        common = frozenset.intersection(*words.values()) if len(keys) > 1 else frozenset()
        return {k: w - common for k, w in words.items()}

    ds, dt = distinct(sources), distinct(targets)
    score = {(s, t): len(ds[s] & dt[t]) for s in sources for t in targets}

    def only_best(others: Sequence[str], of: Callable[[str], int]) -> str | None:
        best = max(of(o) for o in others)
        hits = [o for o in others if of(o) == best]
        return hits[0] if best > 0 and len(hits) == 1 else None

    out = {}
    for s in sources:
        t = only_best(targets, lambda t, s=s: score[s, t])  # type: ignore[misc]
        if t is not None and only_best(sources, lambda s2, t=t: score[s2, t]) == s:  # type: ignore[misc]
            out[s] = t
    return out


def _is_parametrization(key: str) -> bool:
    """``conv.parametrizations.weight.original0``: a parametrization's storage, not a value."""
    parts = key.split(".")
    return len(parts) >= 3 and parts[-3] == "parametrizations"


def pair_by_shape(
    sources: Mapping[str, Shape],
    targets: Mapping[str, Shape],
    used: set[str],
    taken: set[str],
    bound: Mapping[str, str] | None = None,
) -> Pairs:
    """Pairs among sources not in ``used`` and targets not in ``taken`` (neither is changed).

    Groups are keyed by layer numbers and shape; a group of one source and one
    target pairs, a larger one pairs only what ``name_pairs`` proves. Neither
    depends on the order of the keys. A ``bound`` source (``{source: model key}``:
    its own name, or that name renamed by the chosen prefix rule, is a model key
    nothing else feeds) pairs only with that key, and that key with nothing else:
    a shape that happens to fit another model key is no evidence (GPT-2's ``c_fc`` / ``c_proj``,
    ``[768, 3072]`` / ``[3072, 768]``, fit each other's transposed shapes).
    """
    pairs: Pairs = {}
    for key_of, cut in _PASSES:
        s_left = [s for s in sources if s not in used and s not in pairs]
        paired = {t for t, _ in pairs.values()}
        t_left = [t for t in targets if t not in taken and t not in paired]
        bound = bound or {}
        for s in [s for s in s_left if s in bound]:
            t = bound[s]
            same = key_of(s, sources[s])[1:] == key_of(t, targets[t])[1:]  # shape and tail
            if t in t_left and same and (not cut or sources[s][0] > targets[t][0]):
                pairs[s] = (t, targets[t][0] if cut else None)
                t_left.remove(t)
        # A model key the checkpoint has a key for is that key's to fill.
        s_left = [s for s in s_left if s not in bound]
        t_left = [t for t in t_left if t not in set(bound.values())]
        groups: dict[tuple, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for s in s_left:
            if (sources[s] or not cut) and not _is_parametrization(s):
                groups[key_of(s, sources[s])][0].append(s)
        for t in t_left:
            if (targets[t] or not cut) and not _is_parametrization(t):
                groups[key_of(t, targets[t])][1].append(t)
        for ss, ts in groups.values():
            if not ss or not ts:
                continue
            found = {ss[0]: ts[0]} if len(ss) == len(ts) == 1 else name_pairs(ss, ts)
            for s, t in found.items():
                if cut and not sources[s][0] > targets[t][0]:
                    continue
                pairs[s] = (t, targets[t][0] if cut else None)
    return pairs


def pattern_lines(needed: Pairs, all_pairs: Pairs, keys: Sequence[str]) -> list[str]:
    """Rules for the ``needed`` pairs, as general as stays correct.

    A line is kept only if every key of ``keys`` it matches is a pair of
    ``all_pairs`` it maps exactly (target and rows). Lines come in the order of
    the first source they match, so that first-match-wins keeps them apart.
    """
    position = {s: n for n, s in enumerate(keys)}
    specific: list[tuple[int, str]] = []
    covered: set[str] = set()
    for s, (t, rows) in needed.items():
        if s in covered:
            continue
        for line in _candidate_lines(s, t, rows):
            hits = _valid_cover(line, keys, all_pairs)
            if hits is not None:
                specific.append((min(position[h] for h in hits), line))
                covered |= hits
                break
    return [line for _, line in sorted(specific)]


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
            head_s, head_t = ".".join(sp[:-1]), ".".join(tp[:-1])
            lines.append(f"{head_s}.{{p}} -> {head_t}.{{p}}{attr}")
        lines.append(".".join(sp) + " -> " + ".".join(tp) + attr)
    return list(dict.fromkeys(lines))


def _valid_cover(line: str, keys: Sequence[str], pairs: Pairs) -> set[str] | None:
    """The source keys ``line`` maps, if it maps every key it matches to its pair."""
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
