"""load_into against its peers, side by side in one run, warm and cold page cache.

    .venv/bin/python bench/bench_load.py [--dir /tmp/fastckpt-bench] [--repeat 3] [--keep]

Every contender runs in its own subprocess (so peak private memory, RssAnon,
is its own), loading into a model built in advance. The files are deleted at
the end unless --keep. fastckpt reads both copies of each checkpoint: the
safetensors file (``fastckpt``) and the torch.save zip (``fastckpt_pt``).
Every child runs ``gc.collect()`` before its clock starts, so no contender pays
for the collection its imports left pending. ``memcpy`` is torch ``copy_``
between two touched buffers with torch's thread count set to fastckpt's (2 on
this machine). ``--workloads big_5g`` loads a 5 GB file once, for memory only.

After the warm runs of a workload, one more child alternates a peer and
fastckpt ``--pairs`` times in one process (``paired_memcpy`` for bert_large,
``paired_safe_open_copy`` for small_30720) and reports the median and best of
the per-pair ratios: both sides of each ratio ran within milliseconds of each
other, so the machine's noise largely cancels.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve()


# -- checkpoints ------------------------------------------------------------------------------


def bert_large_shapes() -> dict[str, tuple[int, ...]]:
    h, ffn, vocab = 1024, 4096, 50000
    s: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (vocab, h),
        "embeddings.position_embeddings.weight": (512, h),
        "embeddings.token_type_embeddings.weight": (2, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(24):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            s[p + f"attention.self.{n}.weight"] = (h, h)
            s[p + f"attention.self.{n}.bias"] = (h,)
        s[p + "attention.output.dense.weight"] = (h, h)
        s[p + "attention.output.dense.bias"] = (h,)
        s[p + "attention.output.LayerNorm.weight"] = (h,)
        s[p + "attention.output.LayerNorm.bias"] = (h,)
        s[p + "intermediate.dense.weight"] = (ffn, h)
        s[p + "intermediate.dense.bias"] = (ffn,)
        s[p + "output.dense.weight"] = (h, ffn)
        s[p + "output.dense.bias"] = (h,)
        s[p + "output.LayerNorm.weight"] = (h,)
        s[p + "output.LayerNorm.bias"] = (h,)
    s["pooler.dense.weight"] = (h, h)
    s["pooler.dense.bias"] = (h,)
    return s


def small_shapes() -> dict[str, tuple[int, ...]]:
    # 30,720 tensors of 2,034 fp32 values: 250 MB.
    return {f"blocks.{i}.p{j}": (2034,) for i in range(960) for j in range(32)}


def big_shapes() -> dict[str, tuple[int, ...]]:
    # 1,280 tensors of 1024 x 1024 fp32: 5.4 GB, to see that private memory stays flat.
    return {f"layers.{i}.weight": (1024, 1024) for i in range(1280)}


WORKLOADS = {"bert_large": bert_large_shapes, "small_30720": small_shapes, "big_5g": big_shapes}


class ShapedModel(nn.Module):
    """Parameters with the given dotted names and shapes (zero-filled, memory touched)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            *path, leaf = name.split(".")
            mod: nn.Module = self
            for seg in path:
                if not hasattr(mod, seg):
                    mod.add_module(seg, nn.Module())
                mod = getattr(mod, seg)
            mod.register_parameter(leaf, nn.Parameter(torch.zeros(shape)))


def write_files(workload: str, folder: Path) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    st, pt = folder / f"{workload}.safetensors", folder / f"{workload}.pt"
    if st.exists() and pt.exists():
        return st, pt
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v, generator=g) for k, v in WORKLOADS[workload]().items()}
    save_file(state, str(st))
    if workload == "big_5g":
        pt.write_bytes(b"")  # memory check only: no torch.save copy of 5 GB
    else:
        torch.save(state, pt)
    return st, pt


# -- one contender, in a subprocess -----------------------------------------------------------


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_total() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float | None:
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    try:
        return int(out) / path.stat().st_size
    except ValueError:
        return None


def run_contender(name: str, workload: str, st: Path, pt: Path, max_host_bytes: int) -> dict:
    import gc

    import fastckpt.load

    # Same thread count as fastckpt's copy engine, for torch's copy_ and load_state_dict.
    torch.set_num_threads(fastckpt.load._default_threads())
    nbytes = st.stat().st_size
    model = None
    if name not in ("memcpy", "sequential_read"):
        model = ShapedModel(WORKLOADS[workload]())
    src = dst = buf = None
    if name == "memcpy":
        n = sum(torch.Size(s).numel() for s in WORKLOADS[workload]().values())
        src, dst = torch.ones(n), torch.zeros(n)
    if name == "sequential_read":
        buf = bytearray(16 << 20)
    base_anon = rss_anon()
    peak = [base_anon, rss_total()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon())
            peak[1] = max(peak[1], rss_total())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    gc.collect()
    t0 = time.perf_counter()
    c0 = time.process_time()
    if name.startswith("fastckpt"):
        src = pt if name == "fastckpt_pt" else st
        fastckpt.load_into(model, src, max_host_bytes=max_host_bytes)
    elif name == "torch_load_mmap":
        sd = torch.load(pt, mmap=True, weights_only=True)
        model.load_state_dict(sd)
        del sd
    elif name == "safetensors_load_file":
        from safetensors.torch import load_file

        sd = load_file(st)
        model.load_state_dict(sd)
        del sd
    elif name == "safe_open_copy":
        from safetensors import safe_open

        params = dict(model.named_parameters())
        with torch.no_grad(), safe_open(str(st), "pt") as f:
            for k in f.keys():
                params[k].copy_(f.get_tensor(k))
    elif name == "memcpy":
        dst.copy_(src)
    elif name == "sequential_read":
        with open(st, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0  # every thread of the process, sampler included
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], rss_anon())
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "gbps": nbytes / seconds / 1e9,
        "extra_anon_mb": (peak[0] - base_anon) / 2**20,
        "peak_rss_mb": peak[1] / 2**20,
    }


def run_paired(
    peer: str, workload: str, st: Path, pt: Path, max_host_bytes: int, pairs: int
) -> dict:
    """One process, ``pairs`` rounds of (peer, fastckpt) back to back: per-round ratios.

    The ratio is peer seconds / fastckpt seconds, so for ``memcpy`` it is
    fastckpt's GB/s as a fraction of memcpy's, and for a peer loader how many
    times faster fastckpt is. Pairing within one process cancels most of the
    noise of a shared machine: both sides of a ratio ran within milliseconds.
    """
    import gc

    import fastckpt.load

    torch.set_num_threads(fastckpt.load._default_threads())
    shapes = WORKLOADS[workload]()
    model = ShapedModel(shapes)
    if peer == "memcpy":
        n = sum(torch.Size(s).numel() for s in shapes.values())
        src, dst = torch.ones(n), torch.zeros(n)

        def run_peer() -> None:
            dst.copy_(src)
    elif peer == "safe_open_copy":
        from safetensors import safe_open

        def run_peer() -> None:
            params = dict(model.named_parameters())
            with torch.no_grad(), safe_open(str(st), "pt") as f:
                for k in f.keys():
                    params[k].copy_(f.get_tensor(k))
    else:
        raise SystemExit(f"no paired peer {peer!r}")
    fastckpt.load_into(model, st, max_host_bytes=max_host_bytes)  # first calls out of the way
    run_peer()
    ratios, peer_s, ours_s = [], [], []
    for _ in range(pairs):
        gc.collect()
        t0 = time.perf_counter()
        run_peer()
        t1 = time.perf_counter()
        fastckpt.load_into(model, st, max_host_bytes=max_host_bytes)
        t2 = time.perf_counter()
        peer_s.append(t1 - t0)
        ours_s.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    ratios.sort()
    return {
        "peer": peer,
        "pairs": pairs,
        "median_ratio": ratios[len(ratios) // 2],
        "best_ratio": ratios[-1],
        "worst_ratio": ratios[0],
        "median_peer_seconds": sorted(peer_s)[len(peer_s) // 2],
        "median_fastckpt_seconds": sorted(ours_s)[len(ours_s) // 2],
    }


def spawn(
    name: str, workload: str, st: Path, pt: Path, cold: bool, max_host_bytes: int, pairs: int = 0
) -> dict:
    if cold:
        for p in (st, pt):
            drop_cache(p)
        res = {str(p.name): resident_fraction(p) for p in (st, pt)}
    else:
        res = None
    cmd = [
        sys.executable,
        str(HERE),
        "--child",
        name,
        "--workload",
        workload,
        "--st",
        str(st),
        "--pt",
        str(pt),
        "--max-host-bytes",
        str(max_host_bytes),
        "--pairs",
        str(pairs),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r["resident_before"] = res
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fastckpt-bench")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--max-host-bytes", type=int, default=256 << 20)
    ap.add_argument("--workloads", default="bert_large,small_30720")
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--child")
    ap.add_argument("--workload")
    ap.add_argument("--st")
    ap.add_argument("--pt")
    args = ap.parse_args()
    if args.child and args.child.startswith("paired_"):
        peer = args.child.removeprefix("paired_")
        st, pt = Path(args.st), Path(args.pt)
        r = run_paired(peer, args.workload, st, pt, args.max_host_bytes, args.pairs)
        print(json.dumps(r))
        return
    if args.child:
        print(
            json.dumps(
                run_contender(
                    args.child, args.workload, Path(args.st), Path(args.pt), args.max_host_bytes
                )
            )
        )
        return
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    plans = {
        "bert_large": {
            "warm": [
                "fastckpt",
                "fastckpt_pt",
                "memcpy",
                "torch_load_mmap",
                "safetensors_load_file",
            ],
            "cold": ["fastckpt", "fastckpt_pt", "sequential_read", "torch_load_mmap"],
        },
        "small_30720": {
            "warm": ["fastckpt", "fastckpt_pt", "torch_load_mmap", "safe_open_copy"],
            "cold": [],
        },
        "big_5g": {"warm": ["fastckpt"], "cold": []},
    }
    paired = {"bert_large": "memcpy", "small_30720": "safe_open_copy"}
    results: dict = {}
    paired_results: dict = {}
    try:
        for workload in args.workloads.split(","):
            st, pt = write_files(workload, folder)
            for cache, names in plans[workload].items():
                if cache == "warm":
                    for p in (st, pt):  # read once so every contender finds them cached
                        with open(p, "rb", buffering=0) as f:
                            while f.read(64 << 20):
                                pass
                for rep in range(args.repeat):
                    for name in names:  # interleaved: noise hits every contender alike
                        r = spawn(name, workload, st, pt, cache == "cold", args.max_host_bytes)
                        results.setdefault(workload, {}).setdefault(cache, {}).setdefault(
                            name, []
                        ).append(r)
                        print(workload, cache, rep, name, json.dumps(r), flush=True)
                if cache == "warm" and workload in paired and args.pairs > 0:
                    name = "paired_" + paired[workload]
                    r = spawn(name, workload, st, pt, False, args.max_host_bytes, args.pairs)
                    paired_results[f"{workload}/warm/{name}"] = r
                    print(workload, cache, name, json.dumps(r), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    summary = {}
    for workload, caches in results.items():
        for cache, by_name in caches.items():
            for name, runs in by_name.items():
                best = min(runs, key=lambda r: r["seconds"])
                summary[f"{workload}/{cache}/{name}"] = {
                    "best_seconds": best["seconds"],
                    "best_gbps": best["gbps"],
                    "median_seconds": sorted(r["seconds"] for r in runs)[len(runs) // 2],
                    "median_cpu_seconds": sorted(r["cpu_seconds"] for r in runs)[len(runs) // 2],
                    "max_extra_anon_mb": max(r["extra_anon_mb"] for r in runs),
                    "max_peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                }
    summary.update(paired_results)
    print("SUMMARY " + json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
