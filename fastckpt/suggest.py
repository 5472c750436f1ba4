"""Rules that would make a checkpoint fit a model, for strict-mode errors.

Each candidate is a small rules text (the format of ``fastckpt.rules``) plus the
same renaming as a Python function, so it can be scored without the rules
engine: a candidate "matches" a model name when some checkpoint name is mapped
onto it and the shapes agree. The best candidate that beats doing nothing wins.

New kinds of candidates (shape/position pairing, ...) are added by appending a
generator to ``CANDIDATE_SOURCES``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

Shapes = Mapping[str, tuple[int, ...]]

# Segment names that mean the same parameter in other code bases (TF-converted
# LayerNorm: gamma/beta).
SEGMENT_RENAMES: dict[str, str] = {"gamma": "weight", "beta": "bias"}


@dataclass(frozen=True)
class Candidate:
    description: str  # "strip prefix 'module.'"
    rules: tuple[str, ...]  # rules lines, in first-match-wins order
    transform: Callable[[str], str | None]  # checkpoint name -> model name (None: ignored)


@dataclass(frozen=True)
class Suggestion:
    rules_text: str = ""  # ready to pass as rules=...; empty when nothing helps
    lines: list[str] = field(default_factory=list)  # human-readable, one per change
    matches: int = 0  # model names the rules would fill
    total: int = 0  # model names

    def __bool__(self) -> bool:
        return bool(self.rules_text)


def _score(c: Candidate, sources: Shapes, targets: Shapes) -> tuple[int, set[str]]:
    hit: set[str] = set()
    used: set[str] = set()
    for name, shape in sources.items():
        t = c.transform(name)
        if t is not None and t in targets and targets[t] == shape:
            hit.add(t)
            used.add(name)
    return len(hit), used


def _common_prefixes(names: Iterable[str], limit: int = 3) -> list[str]:
    """The most frequent leading 1-3 segments ("module.", "bert.encoder."), with the dot."""
    counts: Counter[str] = Counter()
    for n in names:
        parts = n.split(".")
        for k in range(1, min(4, len(parts))):
            counts[".".join(parts[:k]) + "."] += 1
    return [p for p, _ in counts.most_common(limit * 3)][: limit * 3]


def _prefix_candidate(strip: str, add: str, renames: Mapping[str, str]) -> Candidate:
    parts = []
    if strip and add:
        parts.append(f"replace prefix '{strip}' with '{add}'")
    elif strip:
        parts.append(f"strip prefix '{strip}'")
    elif add:
        parts.append(f"add prefix '{add}'")
    if renames:
        parts.append("rename " + ", ".join(f"'{a}' -> '{b}'" for a, b in renames.items()))
    rules = [f"{strip}{{p*}}.{old} -> {add}{{p*}}.{new}" for old, new in renames.items()]
    if strip or add:
        rules.append(f"{strip}{{rest*}} -> {add}{{rest*}}")

    def transform(name: str) -> str:
        if not name.startswith(strip):
            return name
        rest = name[len(strip) :]
        head, _, last = rest.rpartition(".")
        if last in renames:
            rest = f"{head}.{renames[last]}" if head else renames[last]
        return add + rest

    return Candidate(" and ".join(parts), tuple(rules), transform)


def prefix_and_rename_candidates(sources: Shapes, targets: Shapes) -> Iterable[Candidate]:
    unexpected = [s for s in sources if s not in targets]
    missing = [t for t in targets if t not in sources]
    strips = [""] + [
        p for p in _common_prefixes(unexpected) if any(s.startswith(p) for s in unexpected)
    ]
    adds = [""] + _common_prefixes(missing)
    last_segments = {s.rpartition(".")[2] for s in unexpected}
    renames = {a: b for a, b in SEGMENT_RENAMES.items() if a in last_segments}
    for strip in strips:
        for add in adds:
            if strip != add:
                yield _prefix_candidate(strip, add, {})
            if renames:
                yield _prefix_candidate(strip, add, renames)


CANDIDATE_SOURCES: list[Callable[[Shapes, Shapes], Iterable[Candidate]]] = [
    prefix_and_rename_candidates,
]


def _ignore_lines(sources: Shapes, used: set[str], targets: Shapes) -> list[tuple[str, int]]:
    """`ignore FIRST.**` for top-level groups of the checkpoint that feed nothing."""
    by_head: dict[str, list[str]] = {}
    for s in sources:
        if "." in s:
            by_head.setdefault(s.split(".", 1)[0], []).append(s)
    out = []
    for head, names in by_head.items():
        if not any(n in used or n in targets for n in names):
            out.append((f"ignore {head}.**", len(names)))
    return out


def suggest_rules(source_shapes: Shapes, target_shapes: Shapes) -> Suggestion:
    """The rules that fill the most model names (shapes must agree), if any beat no rules."""
    sources = {k: tuple(v) for k, v in source_shapes.items()}
    targets = {k: tuple(v) for k, v in target_shapes.items()}
    identity = Candidate("", (), lambda n: n)
    best, (best_score, best_used) = identity, _score(identity, sources, targets)
    for make in CANDIDATE_SOURCES:
        for c in make(sources, targets):
            score, used = _score(c, sources, targets)
            if score > best_score:
                best, best_score, best_used = c, score, used
    ignores = _ignore_lines(sources, best_used, targets)
    if best_score == 0 or (best is identity and not ignores):
        return Suggestion(total=len(targets))
    rules = [line for line, _ in ignores] + list(best.rules)
    lines = [f"{best.description}: matches {best_score}/{len(targets)} keys"] if best.rules else []
    lines += [f"{line}: skips {n} checkpoint keys nothing uses" for line, n in ignores]
    return Suggestion("\n".join(rules) + "\n", lines, best_score, len(targets))
