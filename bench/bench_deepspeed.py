"""DeepSpeed ZeRO checkpoints: fastckpt against DeepSpeed's own ``zero_to_fp32``.

The checkpoint is written by DeepSpeed's engine (``pip install deepspeed``; CPU
accelerator, 2 gloo ranks; tests/fixtures/make_deepspeed.py) for a ``Net`` of about
``--mb`` MB of fp32 parameters, under ZeRO stage 2 and 3, after one training step.
Every contender runs in a fresh process (the figure users live with), contenders
alternating, warm page cache:

``load`` (into a plain fp32 model built before the clock starts):

- ``fastckpt``: ``fastckpt.load_into(model, DIR)`` (each parameter copied from the
  runs of the ranks' flat partitions that hold it, straight into the model);
- ``zero_to_fp32``: ``get_fp32_state_dict_from_zero_checkpoint(DIR)`` then
  ``model.load_state_dict(state)`` (DeepSpeed's documented recipe).

``convert`` (to one Hugging Face safetensors file):

- ``fastckpt``: ``fastckpt.tools.convert.convert(DIR, OUT)`` (fsynced, atomic);
- ``zero_to_fp32``: ``convert_zero_checkpoint_to_fp32_state_dict(DIR, OUT,
  safe_serialization=True)``.

Per run: seconds from the call until it returns (modules imported and the model built
before), and the peak growth of private memory (RssAnon + RssShmem, sampled every 2 ms).
The contenders' results are compared byte for byte (the loaded models' state dicts by
digest; the converted files tensor by tensor).

    .venv/bin/python bench/bench_deepspeed.py --dir /tmp/fastckpt-ds-bench --mb 300
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
from pathlib import Path

from bench_dcp import load_average, same_outputs  # this folder: sys.path[0]

REPO = Path(__file__).resolve().parents[1]
WAYS = ("fastckpt", "zero_to_fp32")
STAGES = (2, 3)


def sizes_for(mb: int) -> tuple[int, int, bool]:
    """(width, hidden, tied) of a ``Net`` of about ``mb`` MB of fp32 parameters (width**2 +
    2 * width * hidden of them). Not tied: zero_to_fp32's safetensors output refuses tied
    weights (safetensors' shared-memory check)."""
    width = 2048
    hidden = max(16, (mb * 2**20 // 4 - width * width) // (2 * width))
    return width, hidden, False


def write_checkpoints(folder: Path, mb: int) -> None:
    sys.path.insert(0, str(REPO))
    from tests.fixtures.make_deepspeed import write_run

    for stage in STAGES:
        out = folder / f"zero{stage}"
        if not (out / "latest").is_file():
            write_run(out, stage, False, sizes=sizes_for(mb), steps=1, reference=False)


def _digest(model: object) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():  # type: ignore[attr-defined]
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(__import__("torch").uint8).numpy())
    return h.hexdigest()


def run_one(part: str, way: str, src: Path, out: Path, mb: int) -> dict:
    """One contender in this (fresh) process."""
    import torch

    sys.path.insert(0, str(REPO))
    import fastckpt
    from fastckpt.bench.sharded import PeakPrivate
    from fastckpt.tools.convert import convert
    from tests.fixtures.make_deepspeed import Net

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import (
        convert_zero_checkpoint_to_fp32_state_dict,
        get_fp32_state_dict_from_zero_checkpoint,
    )

    torch.manual_seed(1)
    model = Net(*sizes_for(mb)) if part == "load" else None
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    with PeakPrivate() as mem:
        if part == "load" and way == "fastckpt":
            fastckpt.load_into(model, src)
        elif part == "load":
            state = get_fp32_state_dict_from_zero_checkpoint(str(src))
            model.load_state_dict(state)  # type: ignore[union-attr]
            del state
        elif way == "fastckpt":
            convert(src, out)
        else:
            convert_zero_checkpoint_to_fp32_state_dict(str(src), str(out), safe_serialization=True)
    seconds = time.perf_counter() - start
    result = {"part": part, "way": way, "seconds": seconds,
              "peak_private_mb": (mem.peak - mem.base) / 2**20}  # fmt: skip
    if model is not None:
        result["digest"] = _digest(model)
    return result


def bench(args: argparse.Namespace) -> None:
    parts = ("load", "convert") if args.part == "both" else (args.part,)
    for stage in STAGES:
        src = args.dir / f"zero{stage}"
        size = sum(f.stat().st_size for f in src.rglob("*.pt")) / 2**20
        for part in parts:
            runs: dict[str, list[dict]] = {w: [] for w in WAYS}
            for _ in range(args.repeat):
                for way in WAYS:
                    out = args.dir / f"out-{way}"
                    proc = subprocess.run(
                        [sys.executable, __file__, "--one", part, way, str(src), str(out),
                         str(args.mb)],
                        capture_output=True, text=True, check=True, cwd=REPO,
                        env={**os.environ, "DS_ACCELERATOR": "cpu"},
                    )  # fmt: skip
                    runs[way].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(
                f"-- ZeRO-{stage}, 2 ranks, {args.mb} MB of parameters ({size:.0f} MB of "
                f"*_states.pt files), {part}, load average {load_average()}"
            )
            base = statistics.median(r["seconds"] for r in runs["fastckpt"])
            for way, rs in runs.items():
                secs = [r["seconds"] for r in rs]
                print(
                    f"{way:13s} median {statistics.median(secs):6.2f} s"
                    f" ({statistics.median(secs) / base:4.1f}x fastckpt)"
                    f"  (runs {', '.join(f'{s:.2f}' for s in secs)})"
                    f"  peak private +{max(r['peak_private_mb'] for r in rs):7.1f} MB"
                )
            if part == "load":
                same = len({r["digest"] for rs in runs.values() for r in rs}) == 1
                print(f"the loaded models identical byte for byte: {same}")
            else:
                same = same_outputs(args.dir / "out-fastckpt", args.dir / "out-zero_to_fp32")
                print(f"the converted files identical byte for byte, tensor by tensor: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/fastckpt-ds-bench"))
    ap.add_argument("--mb", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--part", choices=("load", "convert", "both"), default="both")
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        part, way, src, out, mb = args.one
        print(json.dumps(run_one(part, way, Path(src), Path(out), int(mb))))
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    write_checkpoints(args.dir, args.mb)
    bench(args)


if __name__ == "__main__":
    main()
