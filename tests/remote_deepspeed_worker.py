"""tests/test_remote_deepspeed.py's larger ZeRO-2 folder and its FSDP2 ranks (run by the
shared pool of 2 gloo ranks, tests/rank_pool.py).

``write_zero2(folder, model)`` lays ``model``'s parameters out as DeepSpeed 0.19's ZeRO-2
does for 2 ranks (tests/data/deepspeed has the real, but tiny, output: its files are a few
KiB, smaller than the zip records a remote open fetches, so they cannot show what a load
leaves unfetched): one param group, its parameters flattened in order, padded to a
multiple of 2 * world, split in equal fp32 partitions, one per rank's optimizer file
beside Adam's exp_avg and exp_avg_sq of the same size; the model states file holds the
16-bit copies, ``param_shapes`` and the buffers. The tests check the local read of it
against the parameters themselves, then the URL's against the local one.

``remote_deepspeed_fsdp2`` loads it from the URL the test wrote to FOLDER/env.json, each
rank signing with its own access key (``rank<N>``) so that the server counts its bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from tests.remote_dcp_worker import Big as DcpBig
from tests.remote_dcp_worker import shards_from_url

WORLD = 2


class Big(DcpBig):
    """tests/remote_dcp_worker's model, with a buffer (stored whole in the model states)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.arange(7, dtype=torch.float32))


def reference() -> Big:
    torch.manual_seed(0)
    return Big()


def write_zero2(folder: Path, model: nn.Module) -> Path:
    """``folder/latest`` and ``folder/global_step5/`` as DeepSpeed writes them (see above)."""
    tag = folder / "global_step5"
    tag.mkdir(parents=True)
    (folder / "latest").write_text("global_step5")
    params = OrderedDict((n, p.detach()) for n, p in model.named_parameters())
    flat = torch.cat([p.reshape(-1).float() for p in params.values()])
    align = 2 * WORLD
    flat = torch.cat([flat, torch.zeros(-len(flat) % align)])
    part = len(flat) // WORLD
    for r in range(WORLD):
        mine = flat[r * part : (r + 1) * part].clone()
        optim = {
            "zero_stage": 2,
            "partition_count": [WORLD],
            "loss_scaler": None,
            "single_partition_of_fp32_groups": [mine],
            "base_optimizer_state": {
                "state": {
                    0: {
                        "step": torch.tensor(5.0),
                        "exp_avg": torch.randn(part),
                        "exp_avg_sq": torch.rand(part),
                    }
                },
                "param_groups": [{"lr": 1e-3, "params": [0]}],
            },
        }
        torch.save(
            {"optimizer_state_dict": optim, "ds_config": {"train_batch_size": 8},
             "ds_version": "0.19.8"},
            tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
        )  # fmt: skip
    module = OrderedDict((n, p.to(torch.bfloat16)) for n, p in params.items())
    module.update((n, b) for n, b in model.named_buffers())
    torch.save(
        {
            "module": module,
            "buffer_names": [n for n, _ in model.named_buffers()],
            "param_shapes": [OrderedDict((n, list(p.shape)) for n, p in params.items())],
            "frozen_param_shapes": None,
            "frozen_param_fragments": None,
            "shared_params": {},
            "ds_version": "0.19.8",
            "global_steps": 5,
        },
        tag / "mp_rank_00_model_states.pt",
    )
    return folder


def write_checkpoints(folder: Path) -> None:
    """Nothing: the test writes and uploads the folder before the ranks load it."""


def scenario_remote_deepspeed_fsdp2(folder: Path) -> dict:
    return shards_from_url(folder, Big, reference(), folder / "zero2")


SCENARIOS = {
    name[len("scenario_") :]: fn for name, fn in globals().items() if name.startswith("scenario_")
}
