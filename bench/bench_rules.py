"""Compile + match 1,000 rules over 100,000 keys (target: under 50 ms).

Peers run side by side in this one process:
- fastckpt: ``_core.parse_rules`` + ``match_sources`` (compile and match, the
  C++ trie), and ``Rules.parse(...).plan(...)`` (what the loader calls,
  including building the Python ``MappingPlan``);
- Python ``re``: the same rules as one alternation regex (first alternative
  that matches wins, like the rules) -- the fastest plain-Python way to do it.

    .venv/bin/python bench/bench_rules.py [--keys 100000] [--rules 1000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

from fastckpt import _core
from fastckpt.planning.rules import Rules

MODULES = 50  # modules per layer, two tensors each


def make_keys(n_keys: int) -> list[str]:
    layers = n_keys // (2 * MODULES)
    return [
        f"module.encoder.layers.{i}.mod{m}.{p}"
        for i in range(layers)
        for m in range(MODULES)
        for p in ("weight", "bias")
    ]


def make_rules(n_rules: int, layers: int) -> list[str]:
    """A realistic mix: per-module capture renames, exact renames of single
    tensors, a few wildcard ignores, and a catch-all prefix strip at the end."""
    rules = [
        f"module.encoder.layers.{{i}}.mod{m}.{{p}} -> encoder.layers.{{i}}.block{m}.{{p}}"
        for m in range(0, MODULES, 2)
    ]
    rules += ["ignore module.encoder.layers.*.mod49.**", "ignore **.optimizer_state"]
    k = 0
    while len(rules) < n_rules - 1:
        i, m = (k * 7919) % layers, 1 + 2 * (k % (MODULES // 2))
        rules.append(f"module.encoder.layers.{i}.mod{m}.weight -> enc.l{i}.m{m}.w dtype=bf16")
        k += 1
    rules.append("module.{rest*} -> {rest*}")
    return rules


def pattern_regex(src: str) -> str:
    out = []
    for seg in src.split("."):
        if seg == "*" or (seg.startswith("{") and not seg.endswith("*}")):
            out.append(r"[^.]+")
        elif seg == "**" or seg.startswith("{"):
            out.append(r"(?:[^.]+(?:\.[^.]+)*)?")
        else:
            out.append(re.escape(seg))
    return r"\.".join(out)


def regex_peer(rules: list[str]):
    alternation = "|".join(
        f"(?P<r{n}>{pattern_regex(r.removeprefix('ignore ').split(' -> ')[0])})"
        for n, r in enumerate(rules)
    )
    compiled = re.compile(f"(?:{alternation})\\Z")

    def match(keys: list[str]) -> list[int | None]:
        out = []
        for k in keys:
            m = compiled.match(k)
            out.append(None if m is None else int(m.lastgroup[1:]))
        return out

    return match


def timed(fn, repeat: int) -> tuple[float, float, float]:
    """(min wall ms, median wall ms, median CPU ms of this thread).

    The CPU time is what the work costs; wall time on a shared 2-core box also
    counts the time other processes held the cores."""
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return min(wall) * 1e3, statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--rules", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--regex-keys", type=int, default=10_000, help="keys for the slow regex peer")
    args = ap.parse_args()

    keys = make_keys(args.keys)
    rules = make_rules(args.rules, len(keys) // (2 * MODULES))
    text = "\n".join(rules) + "\n"

    # Sanity: every key is matched by some rule, and the peers agree on which.
    ours = [
        m.rule.line - 1 if m else None for m in Rules.parse(text).match(keys[: args.regex_keys])
    ]
    assert ours == regex_peer(rules)(keys[: args.regex_keys]), "peers disagree"
    assert all(r is not None for r in ours)

    def compile_and_match() -> None:
        _core.parse_rules(text, "bench").match_sources(keys)

    def full_plan() -> None:
        Rules.parse(text, "bench").plan(keys, keys)

    match_regex = regex_peer(rules)
    sub = keys[: args.regex_keys]

    rows = [
        ("fastckpt compile + match (C++ trie)", len(keys), *timed(compile_and_match, args.repeat)),
        ("fastckpt Rules.parse + plan (-> MappingPlan)", len(keys), *timed(full_plan, args.repeat)),
        ("Python re alternation, match only", len(sub), *timed(lambda: match_regex(sub), 3)),
    ]
    print(f"{len(rules)} rules x {len(keys)} keys")
    print("| peer | keys | wall min ms | wall median ms | CPU median ms | CPU ms per 100k keys |")
    print("|---|---|---|---|---|---|")
    for name, n, lo, med, cpu in rows:
        print(f"| {name} | {n} | {lo:.1f} | {med:.1f} | {cpu:.1f} | {cpu * 100_000 / n:.1f} |")
    base = rows[0][4] * 100_000 / rows[0][1]
    regex = rows[2][4] * 100_000 / rows[2][1]
    print(f"\nregex peer / fastckpt compile+match, CPU per key: {regex / base:.0f}x")


if __name__ == "__main__":
    main()
