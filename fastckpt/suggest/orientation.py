"""Square weights of a family stored transposed: the orientation their siblings prove.

A transpose shows in a shape: a source ``[a, b]`` for a model key ``[b, a]``. A
square weight's transpose has its own shape, so nothing about the weight itself
shows how it is stored. Its siblings do: the 2-D weights of one block (the keys
that agree up to their last layer number, numbers aside: ``transformer.h.{i}.``)
are written by the same code. When every non-square 2-D weight of a block read
one to one is read transposed (GPT-2's ``Conv1D`` layout, ``[in, out]``), the
square ones are read transposed too, and the suggestion lists them under their
own heading; when the siblings disagree (some transposed, some not), or a key
left unexplained may be a transposed sibling, the square ones are left out of
the load and listed as unknown: never read one way silently.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

Shape = tuple[int, ...]

__all__ = ["Orientation", "block_of", "orient_squares"]


def block_of(key: str) -> str:
    """``transformer.h.3.attn.c_proj.weight`` -> ``transformer.h.{i}.``; ``""`` without a number."""
    parts = key.split(".")
    digits = [n for n, p in enumerate(parts) if p.isdigit()]
    if not digits:
        return ""
    return ".".join("{i}" if p.isdigit() else p for p in parts[: digits[-1] + 1]) + "."


@dataclass(frozen=True)
class Orientation:
    transposed: dict[str, str] = field(default_factory=dict)  # square source -> target
    siblings: int = 0  # non-square weights read transposed that they follow
    # square source -> target left out of the load: the siblings disagree, or a key
    # left unexplained could be a transposed one
    withheld: dict[str, str] = field(default_factory=dict)
    mixed_flipped: int = 0  # in the blocks of ``withheld``: non-square weights read transposed
    mixed_kept: int = 0  # ... and read as stored

    @property
    def unknown(self) -> list[str]:
        return sorted(self.withheld.values())


def _numbers(key: str) -> tuple[str, ...]:
    return tuple(p for p in key.split(".") if p.isdigit())


def orient_squares(
    as_stored: Mapping[str, str],
    transposed: Mapping[str, str],
    sources: Mapping[str, Shape],
    targets: Mapping[str, Shape],
    unused: Mapping[str, Shape] | None = None,
    unfilled: Mapping[str, Shape] | None = None,
) -> Orientation:
    """Which square pairs of ``as_stored`` (source -> target, read as stored) to read
    transposed, and which to leave out, given the pairs ``transposed`` (source ->
    target) read transposed and the keys left unexplained (``unused`` sources,
    ``unfilled`` targets): an unused non-square source whose transposed shape, and not
    its own, is an unfilled target's of its layer may be a transposed sibling."""
    flipped: dict[str, int] = defaultdict(int)
    kept: dict[str, int] = defaultdict(int)
    hinted: dict[str, int] = defaultdict(int)
    squares: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for s, t in transposed.items():
        if len(sources[s]) == 2:
            flipped[block_of(t)] += 1
    for s, t in as_stored.items():
        sh = sources[s]
        if len(sh) != 2 or len(targets[t]) != 2:
            continue
        if sh[0] == sh[1] and targets[t] == sh:
            squares[block_of(t)].append((s, t))
        else:
            kept[block_of(t)] += 1
    free: dict[tuple[tuple[str, ...], Shape], list[str]] = defaultdict(list)
    for t, sh in (unfilled or {}).items():
        free[(_numbers(t), sh)].append(t)
    for s, sh in (unused or {}).items():
        # (one that fits an unfilled key as stored too is no evidence either way)
        if len(sh) == 2 and sh[0] != sh[1] and (_numbers(s), sh) not in free:
            for t in free.get((_numbers(s), (sh[1], sh[0])), []):
                hinted[block_of(t)] += 1
    out: dict[str, str] = {}
    withheld: dict[str, str] = {}
    siblings = mixed_flipped = mixed_kept = 0
    for b in sorted(squares):
        if flipped[b] and not kept[b] and not hinted[b]:
            out |= dict(squares[b])
            siblings += flipped[b]
        elif flipped[b] or hinted[b]:
            withheld |= dict(squares[b])
            mixed_flipped += flipped[b] + hinted[b]
            mixed_kept += kept[b]
    # Counted over the blocks that have square weights: the ones the heading speaks of.
    return Orientation(out, siblings, withheld, mixed_flipped, mixed_kept)
