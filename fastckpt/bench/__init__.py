"""``fastckpt bench``: fastckpt against its peers and the hardware ceilings, side by side.

Every contender runs in its own long-lived worker process (``fastckpt.bench.worker``)
so its peak memory is its own; the harness runs them in alternation, round after
round (each round starts at the next contender), so drifting machine load spreads
evenly. Round 0 is untimed: it warms imports and checks the loaded values against
the file. With ``cold=True`` the file is evicted from the page cache
(``posix_fadvise(DONTNEED)``) before every timed run, and ``fincore`` (when
installed) reports how much of it was still resident.

Peak private memory is RssAnon sampled from outside the worker (every ~1 ms) minus
its value just before the run; peak RSS is the kernel's VmHWM, reset before the run.

``fresh=True``: every timed run is the first load of a new worker process (what a
user who loads once waits for). ``pairs=N``: after the rounds, one more process
alternates fastckpt with the ceiling and with the file's main peer N times
(``fastckpt.bench.paired``): the steady-state ratio, paired within milliseconds.
``memory=True``: a 5.4 GB file loaded by fastckpt alone (private memory stays flat).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastckpt.bench.paired import spawn_pairs
from fastckpt.bench.workloads import (
    CAST_SIZES,
    MEMORY_SIZES,
    SIZES,
    default_cache_dir,
    ensure_files,
)

FASTCKPT = "fastckpt"
PEERS = {
    "safetensors": [
        "safetensors.load_file+load_state_dict",
        "safe_open+copy_",
        "fastsafetensors",
        "runai-model-streamer",
    ],
    "torch": ["torch.load(mmap)+load_state_dict"],
}
# The peer each file's paired rounds (``pairs=``) set fastckpt against, beside the ceiling.
PAIRED_PEER = {
    "safetensors": "safe_open+copy_",
    "torch": "torch.load(mmap)+load_state_dict",
    "cast": "safetensors.load_file+load_state_dict",
}
# Cast loads: the one peer that casts on the way, and torch's conversion of the
# tensors already in memory (Tensor.copy_ into the model: what .to() computes).
CAST_CONTENDERS = ["safetensors.load_file+load_state_dict", "torch-cast-in-memory"]
# Peers that read a Hugging Face folder (every .safetensors file of the folder is the
# checkpoint's); from_pretrained also needs its config.json.
HF_FOLDER = "torch.dcp HuggingFaceStorageReader"
HF_MODEL = "transformers from_pretrained"
OPTIONAL = {
    "fastsafetensors": "fastsafetensors",
    "runai-model-streamer": "runai_model_streamer",
    HF_MODEL: "transformers",
}


@dataclass
class ContenderResult:
    contender: str
    status: str = "ok"  # ok | skipped | error
    note: str = ""
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # CPU s of every thread, per run
    faults: list[int] = field(default_factory=list)  # minor page faults, per run
    phases: list[dict[str, float]] = field(default_factory=list)  # fastckpt: LoadReport.phases
    peak_private: int = 0  # bytes of RssAnon above the pre-run value, max over runs
    peak_rss: int = 0  # VmHWM during the run (destination included), max over runs
    verified: bool | None = None
    resident_before: list[int] = field(default_factory=list)  # cold runs: fincore bytes
    median: float | None = None
    spread: float | None = None  # (max - min) / median
    gbps: float | None = None
    x_ceiling: float | None = None  # fraction of the ceiling's speed (1.0 = as fast)
    x_fastckpt: float | None = None  # time / fastckpt's time (2.0 = twice as slow)
    cpu: float | None = None  # median CPU seconds
    median_faults: int | None = None
    median_phases: dict[str, float] = field(default_factory=dict)

    @property
    def is_ceiling(self) -> bool:
        return self.contender.startswith("ceiling:")


@dataclass
class TargetResult:
    workload: str
    format: str
    path: str
    files: list[str]
    nbytes: int
    tensors: int
    ceiling: str | None = None
    results: list[ContenderResult] = field(default_factory=list)
    # pairs=N: {peer: {"status", "pairs", "median_ratio", "min_ratio", "max_ratio",
    # "peer_seconds", "fastckpt_seconds"}} (ratio: peer seconds / fastckpt seconds)
    paired: dict[str, dict] = field(default_factory=dict)


@dataclass
class BenchResult:
    device: str
    cold: bool
    repeat: int
    size: str | None
    fresh: bool = False  # one load per fresh worker process
    pairs: int = 0  # paired rounds per file (0: none)
    targets: list[TargetResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def failed(self) -> list[str]:
        return [
            f"{t.workload}/{t.format}: {r.contender}: {r.note}"
            for t in self.targets
            for r in t.results
            if r.status == "error"
        ] + [
            f"{t.workload}/{t.format}: paired with {peer}: {p.get('note', '')}"
            for t in self.targets
            for peer, p in t.paired.items()
            if p.get("status") == "error"
        ]


# -- the checkpoint's layout ------------------------------------------------------------
def read_layout(path: Path) -> dict:
    """Files, state-dict prefix, and (name, shape, dtype) of every tensor, for the workers."""
    import fastckpt

    with fastckpt.open(path) as ck:
        return {
            "format": "safetensors" if ck.format == "safetensors" else "torch",
            "files": [str(f) for f in ck.files],
            "prefix": list(ck.prefix),
            "layout": [
                (k, list(ck.info(k).shape), str(ck.info(k).dtype).removeprefix("torch."))
                for k in ck.keys()
            ],
        }


def hf_folder_of(files: list[str]) -> str | None:
    """The folder when ``files`` are exactly the .safetensors files it holds (a Hugging
    Face folder's weights), else None."""
    if not files or not all(f.endswith(".safetensors") for f in files):
        return None
    folder = Path(files[0]).parent
    if {Path(f).resolve() for f in files} != {p.resolve() for p in folder.glob("*.safetensors")}:
        return None
    return str(folder)


# -- page cache -----------------------------------------------------------------------
def evict(files: list[str]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (a freshly generated file) are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(files: list[str]) -> int | None:
    """Bytes of the files in the page cache, by ``fincore``; None when it is not installed."""
    exe = shutil.which("fincore")
    if exe is None:
        return None
    out = subprocess.run(
        [exe, "--bytes", "--noheadings", "--output", "RES", *files],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        return None
    return sum(int(x) for x in out.stdout.split())


def warm(files: list[str]) -> None:
    """The files in the page cache as a first read from disk leaves them.

    How a file got into the cache decides how its pages are mapped: one still
    cached from being written sits in small folios, and reading it through a
    mapping (as fastckpt does for cached ranges) takes a fault per 64 KB; a
    sequential read from disk fills large folios, a fault per folio (1.42 GB:
    21,670 faults against 848, 0.41 against 0.30 CPU s for the copy, this VM).
    So the file is evicted and read once: the same state for every run and every
    contender, whoever wrote it.
    """
    evict(files)
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


# -- workers ----------------------------------------------------------------------------
def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Worker:
    def __init__(self, spec: dict, folder: Path):
        self.name = spec["contender"]
        spec_path = folder / f"spec-{abs(hash(self.name))}.json"
        spec_path.write_text(json.dumps(spec))
        self.log = open(folder / f"worker-{abs(hash(self.name))}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastckpt.bench.worker", str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )

    def ask(self, cmd: str) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            tail = self.log.read()[-800:].strip().splitlines()
            return {"error": f"worker exited ({tail[-1] if tail else 'no output'})"}
        return json.loads(line)

    def measure(self) -> dict:
        """One timed run, with RssAnon sampled from this process meanwhile."""
        reply = self.ask("prepare")
        if "ready" not in reply:
            return reply
        pid = self.proc.pid
        baseline = _rss_anon(pid)
        peak = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_anon(pid))
                time.sleep(0.001)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            reply = self.ask("go")
        finally:
            done.set()
            sampler.join()
        reply["peak_private"] = max(0, peak[0] - baseline)
        return reply

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError, AssertionError):
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.flush()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self.log.close()


# -- the run ----------------------------------------------------------------------------
def contenders_for(
    fmt: str,
    device: str,
    cold: bool,
    *,
    cast: bool = False,
    hf_folder: str | None = None,
    hf_config: bool = False,
    fastckpt_only: bool = False,
) -> tuple[list[str], list[str]]:
    """(contenders to run, notes about the ones left out)."""
    if fastckpt_only:
        return [FASTCKPT], []
    names = [FASTCKPT, *(CAST_CONTENDERS if cast else PEERS[fmt])]
    notes = []
    if fmt == "safetensors" and not cast:
        if hf_folder is not None:
            names.append(HF_FOLDER)
            if hf_config:
                names.append(HF_MODEL)
            else:
                notes.append(f"{HF_MODEL}: no config.json beside the checkpoint, not run")
        else:
            notes.append(
                f"{HF_FOLDER}, {HF_MODEL}: the checkpoint is not a whole Hugging Face "
                "folder, not run"
            )
    for name, module in OPTIONAL.items():
        if name in names and importlib.util.find_spec(module) is None:
            names.remove(name)
            notes.append(f"{name}: not installed, not run")
    if device.startswith("cuda"):
        names.append("ceiling:h2d")
    else:
        names.append("ceiling:memcpy")
    if cold:
        names.append("ceiling:read")
    return names, notes


def _summarize(target: TargetResult) -> None:
    for r in target.results:
        if r.status == "ok" and r.times:
            r.median = statistics.median(r.times)
            r.spread = (max(r.times) - min(r.times)) / r.median if r.median else 0.0
            r.gbps = target.nbytes / r.median / 1e9 if r.median else None
            if r.cpu_times:
                r.cpu = statistics.median(r.cpu_times)
            if r.faults:
                r.median_faults = int(statistics.median(r.faults))
            for phase in r.phases[0] if r.phases else {}:
                r.median_phases[phase] = statistics.median(p.get(phase, 0.0) for p in r.phases)
    ceilings = [r for r in target.results if r.is_ceiling and r.median is not None]
    if ceilings:
        slowest = max(ceilings, key=lambda r: r.median or 0.0)
        target.ceiling = slowest.contender
        for r in target.results:
            if r.median:
                r.x_ceiling = _ratio(slowest, r)
    ours = next((r for r in target.results if r.contender == FASTCKPT and r.median), None)
    if ours is not None:
        for r in target.results:
            if r.median and not r.is_ceiling:
                r.x_fastckpt = _ratio(r, ours)


def _ratio(num: ContenderResult, den: ContenderResult) -> float:
    """num's time over den's: the median of per-round ratios when both ran every round.

    A round runs each contender once, back to back, so the pair shares the
    machine's state at that moment; on a VM whose speed drifts by a quarter
    within a minute, that is steadier than a ratio of medians, which is the
    fallback when a contender missed rounds.
    """
    assert num.median is not None and den.median is not None
    if len(num.times) == len(den.times) and all(num.times + den.times):
        return statistics.median(a / b for a, b in zip(num.times, den.times, strict=True))
    return num.median / den.median


def bench_target(
    workload: str,
    path: Path,
    *,
    device: str,
    cold: bool,
    repeat: int,
    notes: list[str],
    on_run: Callable[[str], None] | None = None,
    fresh: bool = False,
    model_dtype: str | None = None,
    pairs: int = 0,
    fastckpt_only: bool = False,
) -> TargetResult:
    """``fresh``: every timed run is the first load of a new worker process (the
    model built the usual way, one load, exit), the figure a user who loads once
    lives with; otherwise one long-lived worker per contender (steady state).
    ``model_dtype``: the model's dtype when it is not the file's (a cast load).
    ``pairs``: then that many paired rounds (fastckpt.bench.paired) against the
    ceiling and the file's main peer. ``fastckpt_only``: no peers, no ceiling."""
    info = read_layout(path)
    files = info["files"]
    nbytes = 0
    import torch

    for _, shape, dtype in info["layout"]:
        numel = 1
        for d in shape:
            numel *= d
        nbytes += numel * getattr(torch, dtype).itemsize
    target = TargetResult(workload, info["format"], str(path), files, nbytes, len(info["layout"]))
    if model_dtype is not None:  # nbytes stays what is read: the file's bytes
        info["layout"] = [(n, shape, model_dtype) for n, shape, _ in info["layout"]]
    folder = hf_folder_of(files) if info["format"] == "safetensors" else None
    has_config = folder is not None and (Path(folder) / "config.json").is_file()
    names, left_out = contenders_for(
        info["format"],
        device,
        cold,
        cast=model_dtype is not None,
        hf_folder=folder,
        hf_config=has_config,
        fastckpt_only=fastckpt_only,
    )
    notes.extend(f"{workload}/{info['format']}: {n}" for n in left_out)
    results = {n: ContenderResult(n) for n in names}
    target.results = list(results.values())
    with tempfile.TemporaryDirectory(prefix="fastckpt-bench-") as tmp:
        workers: dict[str, Worker] = {}
        specs = {
            n: {
                "contender": n,
                "path": str(path),
                "device": device,
                "nbytes": nbytes,
                "hf_folder": folder,
                **info,
            }
            for n in names
        }
        try:
            for n in names:
                workers[n] = Worker(specs[n], Path(tmp))
            if not cold:
                warm(files)
            for round_ in range(repeat + 1):  # round 0: warm-up and value check, untimed
                order = names[round_ % len(names) :] + names[: round_ % len(names)]
                for n in order:
                    r = results[n]
                    if r.status != "ok":
                        continue
                    if cold and round_ > 0:
                        evict(files)
                        res = resident_bytes(files)
                        if res is not None:
                            r.resident_before.append(res)
                    if on_run is not None:
                        on_run(f"{workload}/{info['format']}: {n} ({round_}/{repeat})")
                    if fresh and round_ > 0:
                        workers[n].close()
                        workers[n] = Worker({**specs[n], "verify": False}, Path(tmp))
                    reply = workers[n].measure()
                    if "skipped" in reply:
                        r.status, r.note = "skipped", reply["skipped"]
                    elif "error" in reply:
                        r.status, r.note = "error", reply["error"]
                    elif round_ == 0:
                        if reply.get("verified") is False:
                            r.status, r.note = "error", "loaded values differ from the file"
                        r.verified = reply.get("verified")
                    else:
                        r.times.append(reply["seconds"])
                        r.cpu_times.append(reply.get("cpu_seconds", 0.0))
                        r.faults.append(reply.get("minor_faults", 0))
                        if reply.get("phases"):
                            r.phases.append(reply["phases"])
                        r.peak_private = max(r.peak_private, reply["peak_private"])
                        r.peak_rss = max(r.peak_rss, reply["peak_rss"])
        finally:
            for w in workers.values():
                w.close()
        if pairs > 0 and results[FASTCKPT].status == "ok":
            ceilings = [n for n in names if n.startswith("ceiling:") and n != "ceiling:read"]
            ceiling = ceilings[0] if ceilings else None
            peer = PAIRED_PEER["cast" if model_dtype is not None else info["format"]]
            peers = [p for p in (ceiling, peer) if p is not None and p in results]
            if peers:
                if not cold:
                    warm(files)
                if on_run is not None:
                    on_run(f"{workload}/{info['format']}: {pairs} pairs")
                target.paired = spawn_pairs(specs[FASTCKPT], peers, pairs, Path(tmp))
    _summarize(target)
    return target


def run_bench(
    path: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    cold: bool = False,
    repeat: int = 3,
    size: str = "full",
    cache_dir: str | os.PathLike | None = None,
    on_run: Callable[[str], None] | None = None,
    fresh: bool = False,
    casts: bool = False,
    pairs: int = 0,
    memory: bool = False,
) -> BenchResult:
    """Bench ``path``, or (None) the default workloads of ``size`` ("full" or "small");
    ``casts``: the cast workloads (``CAST_SIZES``) instead; ``memory``: the memory
    run (``MEMORY_SIZES``, fastckpt alone); ``pairs``: paired rounds per file."""
    if repeat < 1:
        raise ValueError(f"--repeat must be at least 1, not {repeat}")
    if pairs < 0:
        raise ValueError(f"--pairs must be 0 or more, not {pairs}")
    if casts and memory:
        raise ValueError("--casts and --memory are two different runs: pass one")
    if pairs and cold:
        raise ValueError("--pairs runs with the file in the page cache: not with --cold")
    if size not in SIZES:
        raise ValueError(f"--size must be one of {', '.join(SIZES)}, not {size!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device here")
    elif device != "cpu":
        raise ValueError(f"--device must be cpu or cuda, not {device!r}")
    result = BenchResult(device, cold, repeat, None if path is not None else size, fresh, pairs)
    if cold and resident_bytes([sys.executable]) is None:
        result.notes.append("fincore not found: eviction is not double-checked")
    if path is not None:
        p = Path(path)
        targets: list[tuple[str, Path, str | None, bool]] = [(p.name, p, None, False)]
    else:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        targets = []
        sizes = CAST_SIZES if casts else MEMORY_SIZES if memory else SIZES
        for w in sizes[size]:
            files = ensure_files(w, cache, size)
            targets += [(w.name, files[fmt], w.model_dtype, w.fastckpt_only) for fmt in w.formats]
    for name, p, model_dtype, only in targets:
        result.targets.append(
            bench_target(
                name,
                p,
                device=device,
                cold=cold,
                repeat=repeat,
                notes=result.notes,
                on_run=on_run,
                fresh=fresh,
                model_dtype=model_dtype,
                pairs=0 if only else pairs,
                fastckpt_only=only,
            )
        )
    return result
