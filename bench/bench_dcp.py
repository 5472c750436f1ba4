"""DCP checkpoints: ``fastckpt convert`` and ``load_into`` against torch's own routes.

The checkpoint is written by ``dcp.save`` from 4 gloo ranks of an FSDP2 model
(each tensor in 4 chunks over 4 ``.distcp`` files); the same ranks also write it
with ``HuggingFaceStorageWriter(save_distributed=True)`` (per-rank safetensors
shards), the input torch's ``consolidate_safetensors_files`` needs: it cannot read
``.distcp`` files. Every contender runs in a fresh process (the figure users live
with), contenders alternating.

``--part convert`` (warm page cache): DCP -> one Hugging Face safetensors file.

- ``fastckpt``: ``fastckpt.tools.convert.convert(DIR, OUT)`` (rows of a tensor assembled
  from its chunks, piece by piece within ``max_host_bytes``, written atomically);
- ``torch``: ``dcp_to_torch_save(DIR, tmp.pt)``, ``torch.load``, ``safetensors.save_file``
  (the recipe of torch's docs and the issues that ask for it);
- ``torch-hf``: ``consolidate_safetensors_files(HF_SHARDED_DIR, OUT, {fqn: 1})`` (torch's
  own safetensors consolidation, from the HuggingFaceStorageWriter save).

Per run: seconds from the call to the files durable on disk (fastckpt's convert
fsyncs before its atomic rename; the peers' files are fsynced after they return, and
the time they return is shown too), and the peak growth of private memory (RssAnon +
RssShmem, sampled every 2 ms). The outputs are checked against each other tensor by
tensor, byte for byte.

``--part load`` (cold page cache: each rank has its own copy of the DCP directory,
evicted before the run): 2 gloo ranks load a tensor-parallel model (Linear layers
alternately ``ColwiseParallel`` / ``RowwiseParallel``, built on meta):

- ``fastckpt``: ``load_into(model, DIR, device="cpu")``;
- ``dcp``: ``model.to_empty``, ``dcp.load({"model": get_model_state_dict(model)})``,
  ``set_model_state_dict``.

Per rank: seconds (between two barriers), bytes of its copy fetched into the page
cache (mincore), the peak growth of private memory; the ranks' local shards are
hashed and the contenders' hashes compared.

    .venv/bin/python bench/bench_dcp.py --dir /tmp/dcpbench --mb 2048 --repeat 2
"""

from __future__ import annotations

import argparse
import hashlib
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

CONVERT_WAYS = ("fastckpt", "torch", "torch-hf")
LOAD_WAYS = ("fastckpt", "dcp")
WORLD = 4
LOAD_WORLD = 2


def build_model(mb: int) -> torch.nn.Module:
    """Layers of two square fp32 matrices, ~`mb` MB in all. Rows of 16 KiB: half a row
    (a RowwiseParallel shard of it) is whole pages."""
    hidden = 4096
    layers = max(1, mb * 2**20 // (2 * hidden * hidden * 4))
    return torch.nn.Sequential(
        *[torch.nn.Linear(hidden, hidden, bias=False) for _ in range(2 * layers)]
    )


def _init(rank: int, world: int, port: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=900))


def save_rank(rank: int, port: str, folder: Path, mb: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _init(rank, WORLD, port)
    torch.manual_seed(0)
    model = build_model(mb)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    state = get_model_state_dict(model)
    dcp.save({"model": state}, checkpoint_id=folder / "ckpt")
    # The input of torch's consolidation: per-rank safetensors shards of the same state.
    writer = dcp.HuggingFaceStorageWriter(str(folder / "hf-sharded"), save_distributed=True)
    dcp.save(state, storage_writer=writer)
    if rank == 0:
        (folder / "fqns.json").write_text(json.dumps(list(state)))
    dist.destroy_process_group()


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _ranks(args: list[str], world: int, env: dict | None = None) -> list[str]:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *args[:1], str(r), port, *args[1:]],
            stdout=subprocess.PIPE, text=True, env=env,
        )
        for r in range(world)
    ]
    outs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode != 0 for p in procs):
        raise SystemExit(f"a rank failed: {args}")
    return outs


def write_checkpoint(folder: Path, mb: int) -> None:
    _ranks(["--save-rank", str(folder), str(mb)], WORLD)


def convert_one(way: str, folder: Path, out: Path) -> dict:
    from fastckpt.bench.sharded import PeakPrivate

    src = folder / "ckpt"
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    start = time.perf_counter()
    with PeakPrivate() as mem:
        if way == "fastckpt":
            from fastckpt.tools.convert import convert

            convert(src, out)
        elif way == "torch":
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
        else:
            from torch.distributed.checkpoint._consolidate_hf_safetensors import (
                consolidate_safetensors_files,
            )

            fqns = json.loads((folder / "fqns.json").read_text())
            out.mkdir()
            consolidate_safetensors_files(
                str(folder / "hf-sharded"), str(out), dict.fromkeys(fqns, 1)
            )
    seconds = time.perf_counter() - start
    # fastckpt's files are durable when convert returns (atomic: fsync, rename); the
    # peers' are in the page cache: their time to the same state is after an fsync.
    for f in out.iterdir():
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    durable = time.perf_counter() - start
    return {
        "way": way, "seconds": seconds, "durable_seconds": durable,
        "peak_private_mb": (mem.peak - mem.base) / 2**20,
    }  # fmt: skip


def _tp_model(mb: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    with torch.device("meta"):
        model = build_model(mb)
    plan = {
        str(i): ColwiseParallel() if i % 2 == 0 else RowwiseParallel() for i in range(len(model))
    }
    return parallelize_module(model, init_device_mesh("cpu", (LOAD_WORLD,)), plan)


def load_rank(rank: int, port: str, way: str, folder: Path, mb: int) -> dict:
    import torch.distributed as dist

    from fastckpt.bench import evict
    from fastckpt.bench.sharded import PeakPrivate, _cached_bytes

    _init(rank, LOAD_WORLD, port)
    own = folder / f"load-rank{rank}"
    files = sorted(own.iterdir())
    model = _tp_model(mb)
    evict([str(f) for f in files])
    dist.barrier()
    with PeakPrivate() as mem:
        start = time.perf_counter()
        if way == "fastckpt":
            import fastckpt

            fastckpt.load_into(model, own, device="cpu")
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import (
                get_model_state_dict,
                set_model_state_dict,
            )

            model.to_empty(device="cpu")
            state = {"model": get_model_state_dict(model)}
            dcp.load(state, checkpoint_id=own)
            set_model_state_dict(model, state["model"])
        dist.barrier()
        seconds = time.perf_counter() - start
    fetched = sum(_cached_bytes(f) for f in files)
    digest = hashlib.blake2b()
    local = 0
    for p in model.parameters():
        t = p.to_local()  # type: ignore[attr-defined]
        local += t.numel() * t.element_size()
        digest.update(memoryview(t.detach().contiguous().view(torch.uint8).numpy()))
    dist.destroy_process_group()
    return {
        "seconds": seconds, "fetched_mb": fetched / 2**20, "local_mb": local / 2**20,
        "peak_private_mb": (mem.peak - mem.base) / 2**20, "digest": digest.hexdigest(),
    }  # fmt: skip


def same_outputs(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    files_a, files_b = sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))
    if len(files_a) != 1 or len(files_b) != 1:
        return False
    with safe_open(str(files_a[0]), "pt") as x, safe_open(str(files_b[0]), "pt") as y:
        if set(x.keys()) != set(y.keys()):
            return False
        return all(
            torch.equal(x.get_tensor(k).view(torch.uint8), y.get_tensor(k).view(torch.uint8))
            for k in x.keys()
        )


def load_average() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def bench_convert(args: argparse.Namespace) -> None:
    for label, env in (
        ("glibc default", {}),
        ("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"}),
    ):
        if args.malloc != "both" and (args.malloc == "pinned") != bool(env):
            continue
        runs: dict[str, list[dict]] = {w: [] for w in CONVERT_WAYS}
        for _ in range(args.repeat):
            for way in CONVERT_WAYS:
                out = args.dir / f"out-{way}"
                proc = subprocess.run(
                    [sys.executable, __file__, "--convert-one", way, str(args.dir), str(out)],
                    capture_output=True, text=True, check=True, env={**os.environ, **env},
                )  # fmt: skip
                runs[way].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"-- convert, {label}, load average {load_average()}")
        base = statistics.median(r["durable_seconds"] for r in runs["fastckpt"])
        for way, rs in runs.items():
            secs = [r["seconds"] for r in rs]
            durable = [r["durable_seconds"] for r in rs]
            mem = [r["peak_private_mb"] for r in rs]
            print(
                f"{way:9s} to disk (fsync) median {statistics.median(durable):6.2f} s"
                f" ({statistics.median(durable) / base:4.1f}x fastckpt)"
                f"  (runs {', '.join(f'{s:.2f}' for s in durable)});"
                f" returned after {statistics.median(secs):6.2f} s"
                f"  peak private +{max(mem):7.1f} MB"
            )
        for other in CONVERT_WAYS[1:]:
            same = same_outputs(args.dir / "out-fastckpt", args.dir / f"out-{other}")
            print(f"fastckpt and {other}: every tensor identical byte for byte: {same}")


def bench_load(args: argparse.Namespace) -> None:
    for r in range(LOAD_WORLD):
        own = args.dir / f"load-rank{r}"
        if not (own / ".metadata").is_file():
            shutil.copytree(args.dir / "ckpt", own)
    runs: dict[str, list[list[dict]]] = {w: [] for w in LOAD_WAYS}
    for _ in range(args.repeat):
        for way in LOAD_WAYS:
            outs = _ranks(["--load-rank", way, str(args.dir), str(args.mb)], LOAD_WORLD)
            runs[way].append([json.loads(o.strip().splitlines()[-1]) for o in outs])
    print(f"-- load into {LOAD_WORLD} TP ranks, cold cache, load average {load_average()}")
    base = statistics.median(max(r["seconds"] for r in run) for run in runs["fastckpt"])
    for way, rs in runs.items():
        slowest = [max(r["seconds"] for r in run) for run in rs]
        fetched = [r["fetched_mb"] for r in rs[-1]]
        print(
            f"{way:9s} median {statistics.median(slowest):6.2f} s"
            f" ({statistics.median(slowest) / base:4.1f}x fastckpt)"
            f"  (runs {', '.join(f'{s:.2f}' for s in slowest)})"
            f"  fetched per rank {', '.join(f'{f:.0f}' for f in fetched)} MB"
            f" (local shard {rs[-1][0]['local_mb']:.0f} MB)"
            f"  peak private +{max(r['peak_private_mb'] for run in rs for r in run):.0f} MB"
        )
    same = all(
        a["digest"] == b["digest"]
        for a, b in zip(runs["fastckpt"][-1], runs["dcp"][-1], strict=True)
    )
    print(f"every rank's local shards identical between fastckpt and dcp: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fastckpt-dcp-bench"))
    ap.add_argument("--mb", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--part", choices=("convert", "load", "both"), default="both")
    ap.add_argument("--malloc", choices=("default", "pinned", "both"), default="both")
    ap.add_argument("--convert-one", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--save-rank", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--load-rank", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.save_rank:
        rank, port, folder, mb = args.save_rank
        save_rank(int(rank), port, Path(folder), int(mb))
        return
    if args.load_rank:
        rank, port, way, folder, mb = args.load_rank
        print(json.dumps(load_rank(int(rank), port, way, Path(folder), int(mb))))
        return
    if args.convert_one:
        way, folder, out = args.convert_one
        print(json.dumps(convert_one(way, Path(folder), Path(out))))
        return
    if not (args.dir / "ckpt" / ".metadata").is_file():
        args.dir.mkdir(parents=True, exist_ok=True)
        write_checkpoint(args.dir, args.mb)
    src = args.dir / "ckpt"
    size = sum(f.stat().st_size for f in src.iterdir())
    files = len(list(src.iterdir()))
    print(f"checkpoint: {src} ({size / 1e6:.0f} MB in {files} files, {WORLD} FSDP2 ranks)")
    if args.part in ("convert", "both"):
        bench_convert(args)
    if args.part in ("load", "both"):
        bench_load(args)


if __name__ == "__main__":
    main()
