"""Paired rounds in one process: a peer, then fastckpt, back to back, ``pairs`` times.

Started by the harness as ``python -m fastckpt.bench.paired SPEC.json``; prints one
JSON line. Both sides of each ratio run within milliseconds of each other in the
same process, so most of a shared machine's drift cancels: the ratio is peer
seconds / fastckpt seconds (for a ceiling, fastckpt's speed as a fraction of the
ceiling's; for a loader, how many times faster fastckpt is). Every run gets a
freshly built, touched destination, as in the harness's other modes; round 0 is
untimed and checks the loaded values against the file.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path

from fastckpt.bench.worker import SKIP_ERRORS, Contender, _fresh_process_malloc

FASTCKPT = "fastckpt"


def _one(c: Contender, verify: bool) -> tuple[dict, bool | None]:
    c.prepare()
    gc.collect()
    reply = c.timed_run()
    return reply, c.finish(verify)


def run_pairs(spec: dict, peers: list[str], pairs: int) -> dict[str, dict]:
    """``{peer: summary}`` for each of ``peers`` paired with fastckpt in turn, each
    round running every peer and fastckpt once (peer, fastckpt, next peer, fastckpt...)."""
    ours = Contender({**spec, "contender": FASTCKPT})
    others = {p: Contender({**spec, "contender": p}) for p in peers}
    out: dict[str, dict] = {}
    runs: dict[str, list[tuple[float, float]]] = {p: [] for p in peers}
    for round_ in range(pairs + 1):
        for name, peer in others.items():
            if name in out:  # skipped or failed
                continue
            try:
                theirs, ok_peer = _one(peer, verify=round_ == 0)
                mine, ok_ours = _one(ours, verify=round_ == 0)
            except SKIP_ERRORS as e:
                out[name] = {"status": "skipped", "note": f"{type(e).__name__}: {e}"}
                continue
            if ok_peer is False or ok_ours is False:
                who = name if ok_peer is False else FASTCKPT
                out[name] = {"status": "error", "note": f"{who}: loaded values differ"}
                continue
            if round_ > 0:
                runs[name].append((theirs["seconds"], mine["seconds"]))
    for name, pairs_ in runs.items():
        if name in out or not pairs_:
            continue
        ratios = sorted(a / b for a, b in pairs_)
        out[name] = {
            "status": "ok",
            "pairs": len(ratios),
            "median_ratio": statistics.median(ratios),
            "min_ratio": ratios[0],
            "max_ratio": ratios[-1],
            "peer_seconds": statistics.median(a for a, _ in pairs_),
            "fastckpt_seconds": statistics.median(b for _, b in pairs_),
        }
    return out


def spawn_pairs(spec: dict, peers: list[str], pairs: int, folder: Path) -> dict[str, dict]:
    """``run_pairs`` in a new process (so its memory and threads are its own)."""
    doc = folder / "paired.json"
    doc.write_text(json.dumps({"spec": spec, "peers": peers, "pairs": pairs}))
    proc = subprocess.run(
        [sys.executable, "-m", "fastckpt.bench.paired", str(doc)],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()
        why = f"paired process failed ({tail[-1] if tail else f'exit {proc.returncode}'})"
        return {p: {"status": "error", "note": why} for p in peers}
    result: dict[str, dict] = json.loads(lines[-1])
    return result


def main() -> None:
    doc = json.loads(Path(sys.argv[1]).read_text())
    _fresh_process_malloc()
    result = run_pairs(doc["spec"], doc["peers"], doc["pairs"])
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
