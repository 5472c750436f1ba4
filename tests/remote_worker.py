"""One rank of tests/test_remote.py's FSDP2 load from S3 (pattern of tests/sharded_worker.py).

``python -m tests.remote_worker RANK WORLD PORT FOLDER remote_fsdp2``; the test has
uploaded FOLDER/net.safetensors to FASTCKPT_TEST_URL and set the S3 environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import fastckpt
from tests.sharded_worker import Net, fsdp, same_as, serve, world_mesh


def scenario_remote_fsdp2(folder: Path) -> dict:
    model = fsdp(Net(), world_mesh())
    report = fastckpt.load_into(model, os.environ["FASTCKPT_TEST_URL"])
    local = 0
    for t in model.state_dict().values():
        t = t.to_local() if isinstance(t, DTensor) else t
        local += t.numel() * t.element_size()
    return same_as(model, load_file(folder / "net.safetensors")) | {
        "fetched": report.fetched,
        "local_bytes": local,
    }


if __name__ == "__main__":
    serve({"remote_fsdp2": scenario_remote_fsdp2}, lambda folder: None)
