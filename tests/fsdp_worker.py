"""FSDP2 loads run by the shared rank pools (tests/rank_pool.py): the scenarios of
tests/test_plan.py (1 rank) and tests/test_hf_model.py (2 ranks) that need a process group.

``write_checkpoints`` writes nothing: each test writes its folder before it asks the pool.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import fully_shard

import fastckpt


def write_checkpoints(folder: Path) -> None:
    pass


def _refused_or_loaded(folder: Path, file_dtype: str, init: str) -> dict:
    """A 1-rank FSDP2 model (built on the CPU or on meta, then to_empty): the load either
    refuses by name with the parameters untouched, or loads every value exactly."""
    path = folder / f"f_{file_dtype}_{init}.safetensors"
    dtype = getattr(torch, file_dtype)
    g = torch.Generator().manual_seed(0)
    state = {
        "0.weight": torch.randn(8, 4, generator=g),
        "0.bias": torch.randn(8, generator=g),
        "1.weight": torch.randn(2, 8, generator=g),
        "1.bias": torch.randn(2, generator=g),
    }
    if dist.get_rank() == 0:
        save_file({k: v.to(dtype) for k, v in state.items()}, path)
    dist.barrier()
    if init == "meta":
        with torch.device("meta"):
            model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    else:
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    fully_shard(model)
    if init == "meta":
        model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().fill_(7.0)
    try:
        fastckpt.load_into(model, path)
    except fastckpt.CheckpointError as e:
        untouched = all(bool((p.to_local() == 7.0).all()) for p in model.parameters())
        return {"refused": str(e), "untouched": untouched}
    loaded = all(
        torch.equal(
            p.full_tensor().view(torch.uint8), state[n].to(dtype).to(p.dtype).view(torch.uint8)
        )
        for n, p in model.named_parameters()
    )
    return {"loaded": loaded}


def scenario_llama_meta_to_empty(folder: Path) -> dict:
    """transformers' Llama built on meta, fully_shard per layer and root, to_empty, loaded
    from its save_pretrained folder: logits byte-identical to from_pretrained's."""
    import transformers

    folder = folder / "LlamaForCausalLM"
    cfg = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    report = fastckpt.load_into(model, folder)
    ids = torch.tensor([[1, 5, 7, 3, 2]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    ref = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    return {
        "initialised": len(report.initialised),
        "same": torch.equal(got.view(torch.uint8), want.view(torch.uint8)),
    }


SCENARIOS: dict[str, Callable[[Path], dict]] = {
    f"refused_or_loaded_{d}_{i}": (lambda folder, d=d, i=i: _refused_or_loaded(folder, d, i))
    for d in ("float32", "float16")
    for i in ("cpu", "meta")
} | {"llama_meta_to_empty": scenario_llama_meta_to_empty}
