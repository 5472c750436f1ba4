"""Gloo ranks shared by the multi-rank tests: one spawn per world size per test session.

Starting a rank costs a Python interpreter, torch, fastckpt and a process group: seconds
of CPU each, and the suite used to pay it per test module (2 and 4 ranks for the sharded
loads, again for read="once", 1 rank per FSDP2 refusal case). A ``RankPool`` starts its
ranks once; each ``run`` hands every rank the same request and the ranks run it together.

``python -m tests.rank_pool RANK WORLD PORT``: one rank. It joins the gloo group, then reads
requests from stdin, one JSON line each: ``{"id": N, "worker": MODULE, "folder": PATH,
"scenarios": [...]}``. MODULE is a worker (tests.sharded_worker, tests.read_once_worker, ...)
with ``SCENARIOS`` (name -> function of the folder returning a JSON-able dict) and
``write_checkpoints(folder)``, which rank 0 runs the first time a (worker, folder) is named.
The ranks run the scenarios in order, with a barrier after each, write FOLDER/rank{RANK}.json
(per scenario "ok" and the numbers, or the error and its traceback) and print
``@@done N``. Requests come to every rank from the test process, so an idle rank waits on
its stdin, not inside a collective whose timeout would fire while other tests run.

``run_ranks(world, folder, scenarios, worker)`` is what the tests call.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DONE = "@@done "


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


class RankPool:
    """``world`` rank processes, started on the first request and kept for the session."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
        self.requests = 0

    def _start(self) -> None:
        port = str(_free_port())
        logdir = Path(tempfile.mkdtemp(prefix=f"fastckpt_ranks{self.world}_"))
        self.lines = queue.Queue()
        self.procs, self.logs = [], []
        for r in range(self.world):
            log = logdir / f"rank{r}.log"
            with log.open("w") as err:  # the rank has its own copy of the descriptor
                proc = subprocess.Popen(
                    [sys.executable, "-m", "tests.rank_pool", str(r), str(self.world), port],
                    cwd=REPO,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                )
            # stdout: the rank's prints and its @@done lines, read by a thread so a
            # full pipe never blocks the rank and a wait can time out.
            # Each start has its own queue: a rank of an earlier start cannot answer for one
            # of this start.
            threading.Thread(target=self._read, args=(r, proc, self.lines), daemon=True).start()
            self.procs.append(proc)
            self.logs.append(log)

    @staticmethod
    def _read(rank: int, proc: subprocess.Popen, lines: queue.Queue) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put((rank, line.rstrip("\n")))
        proc.stdout.close()
        lines.put((rank, None))  # EOF: the rank exited

    def _alive(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs)

    def _failure(self, what: str, output: dict[int, list[str]]) -> AssertionError:
        self.close(kill=True)  # the other ranks are stuck in a collective or waiting
        parts = [what]
        for r, proc in enumerate(self.procs):
            err = self.logs[r].read_text()[-3000:] if self.logs[r].exists() else ""
            out = "\n".join(output.get(r, [])[-40:])
            parts.append(f"--- rank {r} (exit {proc.returncode}):\n{out}\n{err}")
        return AssertionError("\n".join(parts))

    def run(
        self, worker: str, folder: Path, scenarios: list[str], timeout: float = 240
    ) -> list[dict]:
        """Runs `scenarios` of `worker` on every rank; each rank's results, by rank."""
        if not self._alive():
            self.close()
            self._start()
        self.requests += 1
        n = self.requests
        request = json.dumps(
            {"id": n, "worker": worker, "folder": str(folder), "scenarios": scenarios}
        )
        for r in range(self.world):
            (folder / f"rank{r}.json").unlink(missing_ok=True)
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(request + "\n")
            proc.stdin.flush()
        done: set[int] = set()
        output: dict[int, list[str]] = {}
        deadline = time.monotonic() + timeout
        while len(done) < self.world:
            try:
                rank, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise self._failure(
                    f"{worker} {scenarios}: no answer in {timeout} s", output
                ) from None
            if line == f"{DONE}{n}":
                done.add(rank)
            elif line is None:  # its stdout closed: it is exiting, let it finish
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.procs[rank].wait(timeout=10)
                raise self._failure(f"{worker} {scenarios}: rank {rank} exited", output)
            else:
                output.setdefault(rank, []).append(line)
        return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(self.world)]

    def close(self, kill: bool = False) -> None:
        """Ends the ranks: EOF on stdin lets them leave the group; a hung one is killed."""
        for proc in self.procs:
            if kill and proc.poll() is None:
                proc.kill()
            if proc.stdin and not proc.stdin.closed:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_POOLS: dict[int, RankPool] = {}


def pool(world: int) -> RankPool:
    if world not in _POOLS:
        _POOLS[world] = RankPool(world)
    return _POOLS[world]


@atexit.register
def close_pools() -> None:
    for p in _POOLS.values():
        p.close()
    _POOLS.clear()


def run_ranks(
    world: int, folder: Path, scenarios: list[str], worker: str = "tests.sharded_worker"
) -> list[dict]:
    """Each rank's results (FOLDER/rank{r}.json) of `scenarios` run by the shared pool of
    `world` ranks."""
    return pool(world).run(worker, folder, scenarios)


# -- one rank ---------------------------------------------------------------------------


def _serve(rank: int, world: int, port: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # transformers' workers
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    written: set[tuple[str, str]] = set()
    for line in sys.stdin:
        request = json.loads(line)
        worker = importlib.import_module(request["worker"])
        folder = Path(request["folder"])
        if (request["worker"], request["folder"]) not in written:
            written.add((request["worker"], request["folder"]))
            if rank == 0:
                worker.write_checkpoints(folder)
            dist.barrier()
        results = {}
        for name in request["scenarios"]:
            try:
                results[name] = {"ok": True} | worker.SCENARIOS[name](folder)
            except Exception as e:
                results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                 "trace": traceback.format_exc()}  # fmt: skip
            dist.barrier()
        (folder / f"rank{rank}.json").write_text(json.dumps(results))
        print(f"{DONE}{request['id']}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
