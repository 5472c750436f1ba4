"""``fastckpt bench --ranks N``: loading an FSDP2-sharded model on N gloo CPU ranks.

With ``--read once`` the model is replicated instead (a plain model on every rank,
as under DDP) and ``fastckpt-once``, ``load_into(..., read="once")`` over all the
ranks, joins: each byte is read from storage by one rank and broadcast.

Contenders, each in fresh rank processes, from a cold page cache, every rank
with its own copy of the checkpoint (so that what a rank fetches is its own):

- ``fastckpt``: ``load_into(model, path)`` on every rank;
- ``dcp``: ``torch.distributed.checkpoint.load`` with ``HuggingFaceStorageReader``
  into the model's sharded state dict;
- ``broadcast``: ``torch.load`` on rank 0, then ``set_model_state_dict`` with
  ``full_state_dict=True, broadcast_from_rank0=True``.

Per rank: seconds (between two barriers), bytes of its checkpoint copy fetched
into the page cache (cachestat), and the peak growth of its private memory
(RssAnon + RssShmem, sampled every 2 ms: the memory file of read="once" is
shmem) over the model's own, whose local shards are
written (resident) before the baseline. Every rank then checks its
local shards against ``distribute_tensor`` of the file's tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

CONTENDERS = ("fastckpt", "dcp", "broadcast")
REPLICATED_CONTENDERS = ("fastckpt", "fastckpt-once", "broadcast")


class Stack(nn.Module):
    def __init__(self, layers: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))


def write_checkpoint(folder: Path, layers: int, hidden: int) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = Stack(layers, hidden)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    torch.save(state, folder / "model.pt")


def _rss_anon() -> int:
    total = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssShmem:")):
                total += int(line.split()[1]) * 1024
    return total


class PeakPrivate:
    """Samples RssAnon + RssShmem on a thread while the block runs."""

    def __enter__(self) -> PeakPrivate:
        self.base = self.peak = _rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_anon())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())


def _cached_bytes(path: Path) -> int:
    import fastckpt._core as _core

    return _core._testing.cached_pages(str(path), 0, path.stat().st_size) * 4096


def rank_main(rank: int, world: int, port: str, folder: Path, contender: str, layers: int,
              hidden: int, replicated: bool = False) -> dict:  # fmt: skip
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from fastckpt.bench import evict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    own = folder / f"rank{rank}"
    with torch.device("meta"):
        model = Stack(layers, hidden)
    if not replicated:
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    model.to_empty(device="cpu")

    def local(p: torch.Tensor) -> torch.Tensor:
        return p if replicated else p.to_local()  # type: ignore[attr-defined]

    with torch.no_grad():  # the shards' pages are resident before the baseline is taken
        for p in model.parameters():
            local(p).zero_()
    files = [own / "model.safetensors", own / "model.pt"]
    evict([str(f) for f in files])
    dist.barrier()
    with PeakPrivate() as mem:
        start = time.perf_counter()
        if contender in ("fastckpt", "fastckpt-once"):
            import fastckpt

            read = "once" if contender == "fastckpt-once" else "own"
            fastckpt.load_into(model, own / "model.safetensors", read=read)
        elif contender == "dcp":
            import torch.distributed.checkpoint as dcp

            state = model.state_dict()
            dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(own)))
        else:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
            )

            full = torch.load(own / "model.pt", mmap=False) if rank == 0 else {}
            set_model_state_dict(
                model, full,
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
            )  # fmt: skip
            del full
        dist.barrier()
        seconds = time.perf_counter() - start
    fetched = sum(_cached_bytes(f) for f in files)
    local_bytes = sum(local(p).numel() * p.element_size() for p in model.parameters())
    from safetensors import safe_open

    wrong = 0
    with safe_open(str(own / "model.safetensors"), "pt") as f:
        for name, p in model.named_parameters():
            want = f.get_tensor(name)
            if not replicated:
                want = distribute_tensor(want, p.device_mesh, p.placements,  # type: ignore[attr-defined]
                                         src_data_rank=None).to_local()  # fmt: skip
            wrong += not torch.equal(local(p).view(torch.uint8), want.view(torch.uint8))
    dist.destroy_process_group()
    return {
        "seconds": seconds,
        "fetched": fetched,
        "local_bytes": local_bytes,
        "private_peak": mem.peak - mem.base,
        "wrong": wrong,
    }


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_sharded_bench(ranks: int, layers: int, hidden: int, repeat: int, folder: Path,
                      replicated: bool = False) -> dict:  # fmt: skip
    """Per contender, per run, per rank: the numbers of ``rank_main``."""
    contenders = REPLICATED_CONTENDERS if replicated else CONTENDERS
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoint(folder, layers, hidden)
    for r in range(ranks):
        (folder / f"rank{r}").mkdir(exist_ok=True)
        for name in ("model.safetensors", "model.pt"):
            shutil.copyfile(folder / name, folder / f"rank{r}" / name)
    results: dict[str, list[list[dict]]] = {c: [] for c in contenders}
    for _ in range(repeat):
        for contender in contenders:  # in alternation, so drift hits every contender alike
            port = _free_port()
            procs = [
                subprocess.Popen(
                    [sys.executable, "-m", "fastckpt.bench.sharded", str(r), str(ranks), port,
                     str(folder), contender, str(layers), str(hidden), str(int(replicated))],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )
                for r in range(ranks)
            ]
            outs = [p.communicate(timeout=1200) for p in procs]
            for p, (_, err) in zip(procs, outs, strict=True):
                if p.returncode != 0:
                    raise RuntimeError(f"{contender}: a rank failed:\n{err[-3000:]}")
            results[contender].append([json.loads(out.splitlines()[-1]) for out, _ in outs])
    size = (folder / "model.safetensors").stat().st_size
    return {"ranks": ranks, "layers": layers, "hidden": hidden, "file_bytes": size,
            "replicated": replicated, "runs": results}  # fmt: skip


def summary(result: dict) -> list[dict]:
    """Per contender: median seconds (slowest rank per run), max fetched and private peak."""
    rows = []
    for contender, runs in result["runs"].items():
        slowest = sorted(max(r["seconds"] for r in run) for run in runs)
        rows.append({
            "contender": contender,
            "seconds": slowest[len(slowest) // 2],
            "fetched_per_rank": max(r["fetched"] for run in runs for r in run),
            "local_bytes": max(r["local_bytes"] for run in runs for r in run),
            "private_peak": max(r["private_peak"] for run in runs for r in run),
            "wrong": sum(r["wrong"] for run in runs for r in run),
        })  # fmt: skip
    return rows


if __name__ == "__main__":
    rank, world, port, folder, contender, layers, hidden, replicated = sys.argv[1:9]
    out = rank_main(int(rank), int(world), port, Path(folder), contender, int(layers), int(hidden),
                    replicated == "1")  # fmt: skip
    print(json.dumps(out))
