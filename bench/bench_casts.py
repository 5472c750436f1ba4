"""Cast loads per fresh process, before and after a kernel set, paired in one run.

For each ``fastckpt bench --casts`` workload every round starts one fresh worker
(``fastckpt.bench.worker``: destination built and touched, then one timed load)
per contender, in an order that rotates from round to round:

- ``fastckpt``: the kernels loads pick on this CPU;
- ``fastckpt[avx2]``: the same build capped at the AVX2 set (``FASTCKPT_CAST_KERNELS=avx2``),
  the kernels before AVX-512 ones existed;
- ``safetensors.load_file+load_state_dict`` (cast workloads).

Printed: median seconds per contender, and the median over rounds of each round's
ratios: ``load_file / fastckpt`` for the casts, and for the fp8 casts their speed
against the same-dtype (bf16) load of the same destination bytes in the same round.

    .venv/bin/python bench/bench_casts.py --repeat 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from fastckpt.bench import read_layout
from fastckpt.bench.workloads import CAST_SIZES, default_cache_dir, ensure_files

PEER = "safetensors.load_file+load_state_dict"
CAPPED = "fastckpt[avx2]"


def fresh_load(spec: dict, folder: Path, env_extra: dict[str, str]) -> float:
    """Seconds of one load in a new worker process."""
    spec_file = folder / f"{abs(hash(json.dumps(spec, sort_keys=True)))}.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, **env_extra}
    out = subprocess.run(
        [sys.executable, "-m", "fastckpt.bench.worker", str(spec_file)],
        input='{"cmd": "prepare"}\n{"cmd": "go"}\n{"cmd": "quit"}\n',
        capture_output=True, text=True, env=env, check=True,
    )
    replies = [json.loads(line) for line in out.stdout.splitlines()]
    if "seconds" not in replies[-1]:
        raise RuntimeError(f"{spec['contender']}: {replies[-1]}")
    return float(replies[-1]["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="full", choices=sorted(CAST_SIZES))
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--only", nargs="*", help="workload names (default: all)")
    args = ap.parse_args()
    cache = default_cache_dir()
    runs: list[tuple[str, str, str | None, dict]] = []  # (workload, contender, env cap, spec)
    for w in CAST_SIZES[args.size]:
        if args.only and w.name not in args.only:
            continue
        path = ensure_files(w, cache, args.size)["safetensors"]
        info = read_layout(path)
        if w.model_dtype is not None:
            info["layout"] = [(n, s, w.model_dtype) for n, s, _ in info["layout"]]
        names = ["fastckpt", CAPPED] + ([PEER] if w.model_dtype else [])
        for name in names:
            spec = {"contender": "fastckpt" if name == CAPPED else name, "path": str(path),
                    "device": "cpu", "nbytes": w.nbytes, "verify": False, **info}
            runs.append((w.name, name, "avx2" if name == CAPPED else None, spec))
    times: dict[tuple[str, str], list[float]] = {(w, n): [] for w, n, _, _ in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat + 1):  # round 0: warm-up, untimed
            order = runs[r % len(runs):] + runs[: r % len(runs)]
            for w, n, cap, spec in order:
                s = fresh_load(spec, Path(tmp), {"FASTCKPT_CAST_KERNELS": cap} if cap else {})
                if r > 0:
                    times[w, n].append(s)
    print(f"load average {os.getloadavg()}")
    print("| workload | contender | median ms | load_file / it | speed / same-dtype bf16 load |")
    print("|---|---|---|---|---|")
    for w, n in times:
        t = times[w, n]
        peer = times.get((w, PEER))
        vs_peer = None
        if peer and n != PEER:
            vs_peer = statistics.median(p / x for p, x in zip(peer, t, strict=True))
        same = times.get(("same-bf16", n)) if "fp8" in w else None
        vs_same = statistics.median(s / x for s, x in zip(same, t, strict=True)) if same else None
        print(f"| {w} | {n} | {1000 * statistics.median(t):.1f} | "
              f"{f'{vs_peer:.2f}x' if vs_peer else '-'} | {f'{vs_same:.2f}' if vs_same else '-'} |")


if __name__ == "__main__":
    main()
