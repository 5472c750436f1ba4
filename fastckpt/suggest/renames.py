"""Rules that would make a checkpoint fit a model, for strict-mode errors.

Each candidate is a small rules text (the format of ``fastckpt.planning.rules``) plus the
same renaming as a Python function, so it can be scored without the rules
engine: a candidate "matches" a model name when some checkpoint name is mapped
onto it and the shapes agree. The best candidate that beats doing nothing wins.

New kinds of prefix/rename candidates are added by appending a generator to
``CANDIDATE_SOURCES``. Keys no candidate explains are then paired by shape and
name (``fastckpt.suggest.pairing``): this module is the one suggestion engine; the
strict-mode error of ``load_into`` and ``fastckpt diff A B --suggest`` print it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fastckpt.errors import CheckpointError
from fastckpt.planning.rules import Rules
from fastckpt.report import format_groups
from fastckpt.suggest.conversions import generalise, suggest_conversions
from fastckpt.suggest.orientation import Orientation, orient_squares
from fastckpt.suggest.pairing import Pairs, pair_by_shape, pattern_lines

Shapes = Mapping[str, tuple[int, ...]]
ShapesIn = Mapping[str, Sequence[int]]  # what callers pass: tuples, lists, torch.Size

# Segment names that mean the same parameter in other code bases (TF-converted
# LayerNorm: gamma/beta; the legacy ``torch.nn.utils.weight_norm`` names of the
# magnitude and direction, which ``parametrizations.weight_norm`` stores as
# original0 / original1).
SEGMENT_RENAMES: dict[str, str] = {
    "gamma": "weight",
    "beta": "bias",
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}


@dataclass(frozen=True)
class Candidate:
    description: str  # "strip prefix 'module.'"
    rules: tuple[str, ...]  # rules lines, in first-match-wins order
    transform: Callable[[str], str | None]  # checkpoint name -> model name (None: ignored)
    # strips a prefix every checkpoint key has and adds none (DDP's ``module.``): no
    # chance fit, however many keys land on nothing
    strips_all: bool = False


@dataclass(frozen=True)
class Suggestion:
    rules_text: str = ""  # ready to pass as rules=...; empty when nothing helps
    lines: list[str] = field(default_factory=list)  # human-readable, one per change
    matches: int = 0  # model names the rules would fill
    total: int = 0  # model names
    notes: list[str] = field(default_factory=list)  # "# no source found for ..." comments
    orientation: Orientation = field(default_factory=Orientation)  # square weights' orientation

    def orientation_lines(self, indent: str = "  ") -> list[str]:
        """The square weights whose orientation no shape shows, under their own headings."""
        o = self.orientation
        out = []
        if o.transposed:
            out.append(
                f"{indent}orientation taken from {o.siblings} sibling weights "
                f"({len(o.transposed)} square weights read transposed, as their "
                "family is stored):"
            )
            out += format_groups(sorted(o.transposed.values()), indent * 2)
        if o.unknown:
            out.append(
                f"{indent}orientation unknown, not loaded ({len(o.unknown)} square weights; "
                f"of their sibling weights {o.mixed_flipped} are or may be stored "
                f"transposed, {o.mixed_kept} as the model has them): add 'K -> K' or "
                "'K -> K transpose' for them"
            )
            out += format_groups(o.unknown, indent * 2)
        return out

    def as_file(self, header: str = "") -> str:
        """A rules file to save and edit: what each part does as comments, the rules,
        then the model names still without a source."""
        out = [f"# {header}"] if header else []
        out += [f"# {line}" for line in self.lines]
        out += ["#" + line.rstrip() for line in self.orientation_lines(" ")]
        return (
            "\n".join(out)
            + ("\n" if out else "")
            + self.rules_text
            + "".join(n + "\n" for n in self.notes)
        )

    def __bool__(self) -> bool:
        return bool(self.rules_text)

    def as_rules(self) -> Rules | None:
        """The suggested rules as a ``fastckpt.Rules`` (None when nothing helps)."""
        return Rules.parse(self.rules_text, "<suggested rules>") if self.rules_text else None


def _score(c: Candidate, sources: Shapes, targets: Shapes) -> tuple[int, set[str]]:
    """(model names filled, checkpoint names used); (-1, ...) for a candidate that
    renames mostly onto nothing: a prefix that fits a few keys by chance
    (``tgt_embedding.`` -> ``encoder.`` for one position table) is a wrong guess."""
    hit: set[str] = set()
    used: set[str] = set()
    # Counted per name with its numbers blanked: 64 experts of one kind that land on
    # nothing are one miss, not 64.
    rewritten: set[str] = set()
    rewritten_hits: set[str] = set()
    mapped = {name: c.transform(name) for name in sources}
    fed = {
        t for s, t in mapped.items() if t is not None and t != s and sources[s] == targets.get(t)
    }
    for name, t in mapped.items():
        # A key whose own name the model has keeps it, unless the same renaming
        # also feeds that name (a chain the names support: a.x -> a.y, a.y -> a.z).
        if name in targets and t is not None and t != name and name not in fed:
            return -1, set()
    for name, shape in sources.items():
        t = mapped[name]
        ok = t is not None and t in targets and targets[t] == shape
        if t != name:
            blank = ".".join("#" if p.isdigit() else p for p in name.split("."))
            rewritten.add(blank)
            # a model name whose shape is the key's transposed is a name found too
            flipped = t is not None and len(shape) == 2 and targets.get(t) == shape[::-1]
            if ok or flipped:
                rewritten_hits.add(blank)
        if ok:
            assert t is not None
            hit.add(t)
            used.add(name)
    if 2 * len(rewritten_hits) < len(rewritten) and not c.strips_all:
        return -1, used
    return len(hit), used


def _common_prefixes(names: Iterable[str], limit: int = 3) -> list[str]:
    """The most frequent leading 1-3 segments ("module.", "bert.encoder."), with the dot."""
    counts: Counter[str] = Counter()
    for n in names:
        parts = n.split(".")
        for k in range(1, min(4, len(parts))):
            counts[".".join(parts[:k]) + "."] += 1
    # Ties broken by name, not by which key came first: the suggestion must not
    # depend on the order of the keys (a sharded folder lists them differently).
    ranked = sorted(counts.items(), key=lambda pc: (-pc[1], pc[0]))
    return [p for p, _ in ranked[: limit * 3]]


def _prefix_candidate(
    strip: str, add: str, renames: Mapping[str, str], strips_all: bool = False
) -> Candidate:
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

    return Candidate(" and ".join(parts), tuple(rules), transform, strips_all)


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
        everywhere = bool(strip) and all(s.startswith(strip) for s in sources)
        for add in adds:
            if strip != add:
                yield _prefix_candidate(strip, add, {}, everywhere and not add)
            if renames:
                yield _prefix_candidate(strip, add, renames, everywhere and not add)


CANDIDATE_SOURCES: list[Callable[[Shapes, Shapes], Iterable[Candidate]]] = [
    prefix_and_rename_candidates,
]


def _ignore_lines(
    sources: Shapes, used: set[str], targets: Shapes, unfilled: set[tuple[int, ...]]
) -> list[tuple[str, int]]:
    """`ignore G.**` for the shortest groups of checkpoint keys of which nothing is used.

    ``cls.**`` next to a stripped ``bert.``; ``module.cls.**`` next to a stripped
    ``module.bert.``. A group whose name the model also has (``G.x`` targets),
    or with a key shaped like a model tensor left without a source (``unfilled``
    shapes), is left out: its keys are more likely misnamed than unwanted.
    """
    live: set[str] = set()  # prefixes (with a trailing dot) of a used or same-name key
    for s in sources:
        if s in used or s in targets:
            parts = s.split(".")
            live.update(".".join(parts[:d]) + "." for d in range(1, len(parts)))
    target_heads = {
        ".".join(t.split(".")[:d]) + "." for t in targets for d in range(1, t.count(".") + 1)
    }
    groups: dict[str, int] = {}
    misnamed: set[str] = set()
    for s in sources:
        if s in used or s in targets:
            continue
        parts = s.split(".")
        for d in range(1, len(parts)):
            g = ".".join(parts[:d]) + "."
            if g not in live:
                if g not in target_heads:
                    groups[g] = groups.get(g, 0) + 1
                    if sources[s] in unfilled:
                        misnamed.add(g)
                break
    if not live:
        return []  # nothing is used: ignoring would hide the whole checkpoint
    return [(f"ignore {g}**", n) for g, n in groups.items() if g not in misnamed]


@dataclass(frozen=True)
class _Assembled:
    rules: list[str]
    hits: set[str]  # targets filled
    pairs: Pairs  # source -> (target, rows), every source the rules feed a target from


def suggested_rules(source_shapes: ShapesIn, target_shapes: ShapesIn) -> Rules | None:
    """``suggest_rules(...)`` as a ``fastckpt.Rules``, None when nothing helps (what
    ``StrictLoadError.suggested_rules`` holds)."""
    return suggest_rules(source_shapes, target_shapes).as_rules()


def suggest_rules(source_shapes: ShapesIn, target_shapes: ShapesIn) -> Suggestion:
    """The rules that fill the most model names (shapes must agree), if any beat no rules.

    In order of trust: a prefix change and known segment renames (scored over
    every key), then pairs of the keys still unexplained by shape (unique) and name
    (``fastckpt.suggest.pairing``), then ``ignore`` lines for checkpoint groups nothing
    uses. Targets left without a source are listed in ``notes``.
    """
    # Sorted: the same keys give the same suggestion, in whatever order they come.
    sources = {k: tuple(source_shapes[k]) for k in sorted(source_shapes)}
    targets = {k: tuple(target_shapes[k]) for k in sorted(target_shapes)}
    identity = Candidate("", (), lambda n: n)
    best, (best_score, best_used) = identity, _score(identity, sources, targets)
    tops: list[tuple[Candidate, set[str]]] = []
    for make in CANDIDATE_SOURCES:
        for c in make(sources, targets):
            score, used = _score(c, sources, targets)
            if score > best_score:
                tops, best_score = [(c, used)], score
            elif score == best_score and tops:
                tops.append((c, used))
    # Candidates that fill as many names but pair them differently (blk.0.mix_a.
    # onto blk.0.left. or onto blk.0.right.) are a guess: none is taken.
    if tops and len({frozenset((s, c.transform(s)) for s in u) for c, u in tops}) == 1:
        best, best_used = tops[0]
    else:
        best_score, best_used = _score(identity, sources, targets)

    pairs: Pairs = {}
    for s in best_used:
        t = best.transform(s)
        assert t is not None
        pairs[s] = (t, None)
    taken = {t for t, _ in pairs.values()}
    # A source whose name (as the chosen renaming writes it) the model has, and that
    # nothing else feeds, feeds that name or nothing: never another key whose shape
    # it happens to have.
    suffixes = _suffixes(targets)
    bound = {
        s: t
        for s in sources
        if s not in pairs
        and (t := _own_name(s, best, targets, suffixes)) is not None
        and t not in taken
    }
    extra = pair_by_shape(sources, targets, set(pairs), taken, bound)
    pairs |= extra
    used = set(pairs)
    # Stacks, concatenations and transposes among the keys still unexplained.
    filled_now = {t for t, _ in pairs.values()}
    conv_lines, conv_used, conv_filled, conv_transposed = suggest_conversions(
        {s: sh for s, sh in sources.items() if s not in used},
        {t: sh for t, sh in targets.items() if t not in filled_now},
        {b: t for b, t in bound.items() if b not in used},
        list(sources),
    )
    used |= conv_used
    # Square weights take the orientation of their family (GPT-2's Conv1D layout).
    orient = orient_squares(
        {s: t for s, (t, rows) in pairs.items() if rows is None},
        conv_transposed,
        sources,
        targets,
        {s: sh for s, sh in sources.items() if s not in used},
        {t: sh for t, sh in targets.items() if t not in filled_now and t not in conv_filled},
    )
    # Square weights whose orientation nothing settles are not loaded either way.
    for s in orient.withheld:
        del pairs[s]
        extra.pop(s, None)
        used.discard(s)
    withheld, _ = _ignore_keys(sorted(orient.withheld), list(sources))
    orient_lines = (
        generalise(
            sorted(f"{s} -> {t} transpose" for s, t in orient.transposed.items()),
            [(t, s, ()) for s, t in orient.transposed.items()],
            list(sources),
        )
        if orient.transposed
        else []
    )
    unfilled = {
        shape for t, shape in targets.items() if t not in filled_now and t not in conv_filled
    }
    ignores = _ignore_lines(sources, used | set(orient.withheld), targets, unfilled)
    base = [line for line, _ in ignores] + list(best.rules)
    # Pairs the prefix / rename rules get wrong need rules of their own, placed first.
    keys = list(sources)
    base_rules = Rules(base)
    base_target = {
        s: (m.targets[0] if m.targets else None) if m is not None else s
        for s, m in zip(keys, base_rules.match(keys), strict=True)
    }
    needed = {
        s: p
        for s, p in extra.items()
        if (base_target[s] != p[0] or p[1] is not None) and s not in orient.transposed
    }
    specific = withheld + orient_lines + conv_lines + pattern_lines(needed, pairs, keys)

    filled = {t for t, _ in pairs.values()} | conv_filled
    total = len(targets)
    notes = [
        f"# no source found for {t} {list(shape)}"
        for t, shape in targets.items()
        if t not in filled
    ]
    if not filled or (best is identity and not ignores and not specific):
        return Suggestion(total=total, notes=notes, orientation=orient)
    rules = specific + base
    # Keys the prefix rule would send to names the model lacks (the loader refuses
    # such rules, strict or not): skipped, each by name.
    astray, n_astray = _astray_ignores(rules, keys, targets)
    rules = astray + rules
    read_flipped = conv_transposed | orient.transposed
    one_to_one = {t: (s, s in read_flipped) for s, (t, _) in pairs.items()}
    one_to_one |= {t: (s, True) for s, t in conv_transposed.items()}
    if not _plans_as_intended(rules, keys, targets, one_to_one, conv_filled, conv_used):
        # Sound or nothing: rules that would feed a key otherwise than intended are
        # not suggested (the keys stay listed as missing / unexpected).
        return Suggestion(total=total, notes=notes)
    lines = [f"{best.description}: matches {best_score}/{total} keys"] if best.rules else []
    if extra:
        cuts = sum(1 for _, rows in extra.values() if rows is not None)
        how = f" ({cuts} with a vocabulary cut)" if cuts else ""
        lines.append(
            f"pair {len(extra)}{' more' if best.rules else ''} keys by shape and name{how}: "
            f"matches {len(filled)}/{total} keys"
        )
    if conv_lines:
        lines.append(
            f"stack / concatenate / transpose {len(conv_used)} keys into {len(conv_filled)} "
            f"model tensors: matches {len(filled)}/{total} keys"
        )
    if orient_lines:
        lines.append(
            f"transpose {len(orient.transposed)} square weights as their family is stored"
        )
    if withheld:
        lines.append(f"skip {len(orient.withheld)} square weights of unknown orientation")
    lines += [f"{line}: skips {n} checkpoint keys nothing uses" for line, n in ignores]
    if astray:
        lines.append(f"skip {n_astray} checkpoint keys the rules would send to no model key")
    return Suggestion("\n".join(rules) + "\n", lines, len(filled), total, notes, orient)


def _own_name(
    s: str, best: Candidate, targets: Shapes, suffixes: Mapping[str, list[str]]
) -> str | None:
    """The model key that is ``s`` by name: ``s`` as the chosen renaming writes it, or
    else the one model key that is ``s`` with a prefix taken off or put on."""
    t = best.transform(s)
    if t is not None and t in targets:
        return t
    parts = s.split(".")
    found = {".".join(parts[k:]) for k in range(1, len(parts))} & targets.keys()
    found |= set(suffixes.get(s, ()))
    return found.pop() if len(found) == 1 else None


def _suffixes(targets: Shapes) -> dict[str, list[str]]:
    """Each proper dotted suffix of a model key -> the keys ending in it."""
    out: dict[str, list[str]] = {}
    for t in targets:
        parts = t.split(".")
        for k in range(1, len(parts)):
            out.setdefault(".".join(parts[k:]), []).append(t)
    return out


def _astray_ignores(
    rules: list[str], keys: list[str], targets: Shapes
) -> tuple[list[str], int]:
    """``ignore`` lines for the keys ``rules`` map onto names the model does not have:
    layer numbers as ``*`` where that matches only such keys, else the key itself."""
    try:
        plan = Rules(rules).plan(keys, list(targets))
    except CheckpointError:
        return [], 0
    astray = sorted(
        {a.source for a in plan.assignments if a.rule is not None and a.target not in targets}
    )
    return _ignore_keys(astray, keys)


def _ignore_keys(skip: list[str], keys: list[str]) -> tuple[list[str], int]:
    """``ignore`` lines for the keys ``skip``: layer numbers as ``*`` where that matches
    no other key, else the key itself; and how many keys they skip. One match over
    ``keys`` per distinct pattern, not per key skipped."""
    by_pattern: dict[str, list[str]] = {}
    for s in skip:
        general = ".".join("*" if p.isdigit() else p for p in s.split("."))
        by_pattern.setdefault(general, []).append(s)
    wanted = set(skip)
    lines: list[str] = []
    for general, mine in sorted(by_pattern.items()):
        if general not in wanted:  # a pattern, not the key itself
            ms = Rules([f"ignore {general}"]).match(keys)
            if all(k in wanted for k, m in zip(keys, ms, strict=True) if m):
                lines.append(f"ignore {general}")
                continue
        lines += [f"ignore {s}" for s in sorted(mine)]
    return lines, len(wanted)


def _plans_as_intended(
    rules: list[str],
    keys: list[str],
    targets: Shapes,
    one_to_one: Mapping[str, tuple[str, bool]],
    converted: set[str],
    conv_used: set[str],
) -> bool:
    """Whether ``rules``, planned over every key, feed each model key as intended:
    ``one_to_one`` target -> (source, read transposed), ``converted`` targets from
    ``conv_used`` sources only, and any other model key from nothing or its own name."""
    try:
        plan = Rules(rules).plan(keys, list(targets))
    except CheckpointError:
        return False
    got: dict[str, set[tuple[str, bool]]] = {}
    for a in plan.assignments:
        got.setdefault(a.target, set()).add((a.source, a.transpose))
    for t in targets:
        fed = got.get(t, set())
        if t in one_to_one:
            if fed != {one_to_one[t]}:
                return False
        elif t in converted:
            if not fed or any(s not in conv_used for s, _ in fed):
                return False
        elif fed - {(t, False)}:
            return False
    return True


def suggest_pairings(source_shapes: ShapesIn, target_shapes: ShapesIn) -> list[str]:
    """``suggest_rules`` as plain lines: rules, then a note per target left without a source."""
    s = suggest_rules(source_shapes, target_shapes)
    return s.rules_text.splitlines() + s.notes
