"""Opening and listing a checkpoint: fastckpt vs torch.load / safetensors, side by side.

A torch zip file and a safetensors file with 40 layers x 256 experts x 3 weights
of 64x32 fp32 (30,720 tensors). Each round times, in one process and in turn:

- fastckpt.open(path) + keys() + info(k) for every key,
- torch.load(path, mmap=True, weights_only=True) (the zip file),
- safetensors.safe_open + keys() + get_slice(k).get_shape() (the safetensors file).

Prints the medians and the ratios. Usage:
    python bench/bench_open.py [--layers 40] [--experts 256] [--repeats 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fastckpt


def build_state_dict(layers: int, experts: int) -> dict[str, torch.Tensor]:
    # One shared random block, cloned: generation time is not what is measured.
    block = torch.randn(64, 32)
    return {
        f"layers.{layer}.experts.{e}.{w}.weight": block.clone()
        for layer in range(layers)
        for e in range(experts)
        for w in ("w1", "w2", "w3")
    }


def fastckpt_open(path: Path) -> int:
    with fastckpt.open(path) as ckpt:
        n = 0
        for k in ckpt.keys():
            n += ckpt.info(k).numel
        return n


def torch_open(path: Path) -> int:
    sd = torch.load(path, mmap=True, weights_only=True)
    return sum(t.numel() for t in sd.values())


def safetensors_open(path: Path) -> int:
    n = 0
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            shape = f.get_slice(k).get_shape()
            n += shape[0] * shape[1]
    return n


def timed(fn: Callable[[Path], int], path: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process)."""
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    fn(path)
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        sd = build_state_dict(args.layers, args.experts)
        zip_path = Path(tmp) / "experts.pt"
        st_path = Path(tmp) / "experts.safetensors"
        torch.save(sd, zip_path)
        save_file(sd, st_path)
        expected = sum(t.numel() for t in sd.values())
        del sd

        peers = {
            "fastckpt zip": (fastckpt_open, zip_path),
            "torch.load zip": (torch_open, zip_path),
            "fastckpt safetensors": (fastckpt_open, st_path),
            "safetensors": (safetensors_open, st_path),
        }
        for name, (fn, path) in peers.items():  # warm the page cache and check agreement
            got = fn(path)
            assert got == expected, (name, got, expected)
        wall: dict[str, list[float]] = {name: [] for name in peers}
        cpu: dict[str, list[float]] = {name: [] for name in peers}
        for _ in range(args.repeats):
            for name, (fn, path) in peers.items():
                w, c = timed(fn, path)
                wall[name].append(w)
                cpu[name].append(c)

    n = args.layers * args.experts * 3
    print(f"{n} tensors, {args.repeats} rounds; medians of open + keys + info of every key")
    print(f"  {'':<22} {'wall ms':>9} {'cpu ms':>9}")
    mw = {k: statistics.median(v) for k, v in wall.items()}
    mc = {k: statistics.median(v) for k, v in cpu.items()}
    for name in peers:
        print(f"  {name:<22} {mw[name] * 1000:9.1f} {mc[name] * 1000:9.1f}")
    for slow, fast in (("torch.load zip", "fastckpt zip"), ("safetensors", "fastckpt safetensors")):
        print(f"  {slow} / {fast}: {mw[slow] / mw[fast]:.1f}x wall, {mc[slow] / mc[fast]:.1f}x cpu")


if __name__ == "__main__":
    main()
