"""Planning time of the 30,720-tensor tree (`fastckpt bench`'s many-small workload): how
long `fastckpt.plan(model, path)` takes, the first plan of a fresh process and later ones,
CPU and wall. The copy is not timed: `fastckpt bench` does that.

    python bench/bench_plan.py [--repeat 5] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
t0 = time.perf_counter(); c0 = time.process_time()
import fastckpt
from fastckpt.bench.worker import FlatModel
from fastckpt.bench.workloads import SIZES
imported = (time.perf_counter() - t0, time.process_time() - c0)
layout = next(w for w in SIZES["full"] if w.name == "many-small").layout
model = FlatModel([(n, s, torch.float32) for n, s in layout])
model.materialize("cpu")
out = {"import_s": imported}
runs = []
for _ in range(int(sys.argv[2])):
    w = time.perf_counter(); c = time.process_time()
    p = fastckpt.plan(model, sys.argv[1])
    runs.append((time.perf_counter() - w, time.process_time() - c))
    assert len(p.loaded) == len(layout), len(p.loaded)
out["plans"] = runs
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cache-dir", type=Path, default=None)
    args = ap.parse_args()
    from fastckpt.bench.workloads import SIZES, default_cache_dir, ensure_files

    workload = next(w for w in SIZES["full"] if w.name == "many-small")
    path = ensure_files(workload, args.cache_dir or default_cache_dir(), "full")["safetensors"]
    firsts, laters = [], []
    for _ in range(args.repeat):
        got = json.loads(
            subprocess.run(
                [sys.executable, "-c", CHILD, str(path), "4"], capture_output=True, text=True,
                check=True,
            ).stdout
        )  # fmt: skip
        firsts.append(got["plans"][0])
        laters += got["plans"][1:]
    med = lambda xs, i: statistics.median(x[i] for x in xs) * 1e3  # noqa: E731
    print(f"{time.strftime('%Y-%m-%d')} {path} ({len(workload.layout)} tensors)")
    for label, runs in (("first plan of a fresh process", firsts), ("later plans", laters)):
        print(f"{label:30} {med(runs, 0):7.1f} ms wall {med(runs, 1):7.1f} ms CPU")


if __name__ == "__main__":
    main()
