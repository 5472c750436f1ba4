"""tests/test_remote.py's FSDP2 load from S3, run by the shared pool of 2 gloo ranks
(tests/rank_pool.py). The ranks were started before the test's S3 server: the test writes
the server's environment to FOLDER/env.json, which the scenario sets while it runs, and has
uploaded FOLDER/net.safetensors to the URL in it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import fastckpt
from tests.sharded_worker import Net, fsdp, same_as, world_mesh


def write_checkpoints(folder: Path) -> None:
    """The test wrote and uploaded the checkpoint."""


def scenario_remote_fsdp2(folder: Path) -> dict:
    env = json.loads((folder / "env.json").read_text())
    with mock.patch.dict(os.environ, env):
        model = fsdp(Net(), world_mesh())
        report = fastckpt.load_into(model, env["FASTCKPT_TEST_URL"])
    local = 0
    for t in model.state_dict().values():
        t = t.to_local() if isinstance(t, DTensor) else t
        local += t.numel() * t.element_size()
    return same_as(model, load_file(folder / "net.safetensors")) | {
        "fetched": report.fetched,
        "local_bytes": local,
    }


SCENARIOS = {"remote_fsdp2": scenario_remote_fsdp2}
