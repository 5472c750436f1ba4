"""DCP -> Hugging Face safetensors: ``fastckpt convert`` against torch's own route.

The checkpoint is written by ``dcp.save`` from 4 gloo ranks of an FSDP2 model
(each tensor in 4 chunks over 4 ``.distcp`` files). Contenders, each run in a
fresh process (the figure users live with), alternating, warm page cache:

- ``fastckpt``: ``fastckpt.tools.convert.convert(DIR, OUT)`` (one tensor assembled
  from its chunks at a time, written atomically);
- ``torch``: ``dcp_to_torch_save(DIR, tmp.pt)``, ``torch.load``, ``safetensors.save_file``
  (the recipe of torch's docs and the issues that ask for it).

Per run: seconds from the call to the files on disk, and the peak growth of private
memory (RssAnon + RssShmem, sampled every 2 ms). The outputs are checked against
each other byte for byte.

    .venv/bin/python bench/bench_dcp.py --dir /tmp/dcpbench --mb 300 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import torch

WAYS = ("fastckpt", "torch")
WORLD = 4


def build_model(mb: int) -> torch.nn.Module:
    """Layers of two square fp32 matrices, ~`mb` MB in all."""
    hidden = 1024
    layers = max(1, mb * 2**20 // (2 * hidden * hidden * 4))
    return torch.nn.Sequential(
        *[torch.nn.Linear(hidden, hidden, bias=False) for _ in range(2 * layers)]
    )


def save_rank(rank: int, port: str, folder: Path, mb: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=600))
    torch.manual_seed(0)
    model = build_model(mb)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=folder)
    dist.destroy_process_group()


def write_checkpoint(folder: Path, mb: int) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--save-rank", str(r), port, str(folder), str(mb)]
        )
        for r in range(WORLD)
    ]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a saving rank failed")


def run_one(way: str, src: Path, out: Path) -> dict:
    from fastckpt.bench.sharded import PeakPrivate

    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    start = time.perf_counter()
    with PeakPrivate() as mem:
        if way == "fastckpt":
            from fastckpt.tools.convert import convert

            convert(src, out)
        else:
            from safetensors.torch import save_file
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            tmp = out.with_suffix(".pt")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp_to_torch_save(src, tmp)
            state = torch.load(tmp, weights_only=True)["model"]
            out.mkdir()
            save_file(state, out / "model.safetensors", metadata={"format": "pt"})
            del state
            tmp.unlink()
    seconds = time.perf_counter() - start
    return {"way": way, "seconds": seconds, "peak_private_mb": (mem.peak - mem.base) / 2**20}


def same_outputs(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return x.keys() == y.keys() and all(
        torch.equal(x[k].view(torch.uint8), y[k].view(torch.uint8)) for k in x
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fastckpt-dcp-bench"))
    ap.add_argument("--mb", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--one", nargs=3, metavar=("WAY", "SRC", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--save-rank", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.save_rank:
        rank, port, folder, mb = args.save_rank
        save_rank(int(rank), port, Path(folder), int(mb))
        return
    if args.one:
        way, src, out = args.one
        print(json.dumps(run_one(way, Path(src), Path(out))))
        return
    src = args.dir / "ckpt"
    if not (src / ".metadata").is_file():
        args.dir.mkdir(parents=True, exist_ok=True)
        write_checkpoint(src, args.mb)
    size = sum(f.stat().st_size for f in src.iterdir())
    files = len(list(src.iterdir()))
    print(f"checkpoint: {src} ({size / 1e6:.0f} MB in {files} files, {WORLD} ranks)")
    # glibc raises its mmap threshold after a large block is freed and then keeps freed
    # tensors resident on its heap; the second setting pins the threshold (as `fastckpt
    # bench` workers do), so that private memory shows what is held, not what is cached.
    for label, env in (
        ("glibc default", {}),
        ("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"}),
    ):
        runs: dict[str, list[dict]] = {w: [] for w in WAYS}
        for _ in range(args.repeat):
            for way in WAYS:
                out = args.dir / f"out-{way}"
                proc = subprocess.run(
                    [sys.executable, __file__, "--one", way, str(src), str(out)],
                    capture_output=True, text=True, check=True, env={**os.environ, **env},
                )  # fmt: skip
                runs[way].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"-- {label}, load average {os.getloadavg()[0]:.1f}")
        for way, rs in runs.items():
            secs = [r["seconds"] for r in rs]
            mem = [r["peak_private_mb"] for r in rs]
            print(
                f"{way:9s} median {statistics.median(secs):6.2f} s"
                f"  (runs {', '.join(f'{s:.2f}' for s in secs)})"
                f"  peak private +{max(mem):7.1f} MB"
            )
        same = same_outputs(args.dir / "out-fastckpt", args.dir / "out-torch")
        print(f"outputs identical byte for byte: {same}")


if __name__ == "__main__":
    main()
