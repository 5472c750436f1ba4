"""Scenarios of the conversions-into-shards tests (tests/test_moe_sharded.py), run by the
shared pool of 2 gloo ranks (tests/rank_pool.py).

Folders written by transformers' ``save_pretrained`` (per-expert tensors) are loaded
without rules into v5 models (fused ``experts.gate_up_proj``) that are sharded:
FSDP2 on a model built on meta, expert parallelism (fused experts as ``Shard(0)``
DTensors) and tensor parallelism across a fused ``qkv``. Each scenario compares with
``from_pretrained`` (or a plain load) byte for byte and counts the pages it fetched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from safetensors.torch import save_file
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import fastckpt
from fastckpt import _core
from fastckpt.bench import evict
from tests.sharded_worker import world_mesh
from tests.test_chunked_source import full_values, open_chunks, write_chunks

TINY = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
CONFIGS = {
    "mixtral": lambda **kw: transformers.MixtralConfig(
        **(TINY | {"intermediate_size": 8, "num_key_value_heads": 1, "num_local_experts": 3,
                   "num_experts_per_tok": 2} | kw),
    ),
    "qwen3_moe": lambda **kw: transformers.Qwen3MoeConfig(
        **(TINY | {"intermediate_size": 8, "moe_intermediate_size": 8, "num_key_value_heads": 1,
                   "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 8} | kw),
    ),
}  # fmt: skip
CLASSES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# Expert parallelism: experts large enough that each rank's half is many pages and the
# whole file is far more than the test's slack.
EP = {"hidden_size": 64, "intermediate_size": 1024, "num_local_experts": 8, "vocab_size": 64}
DIM = 64


def model_class(name: str) -> type:
    return getattr(transformers, CLASSES[name])


class Attention(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        if fused:
            self.qkv = nn.Linear(DIM, 3 * DIM)
        else:
            self.q, self.k, self.v = (nn.Linear(DIM, DIM) for _ in range(3))


QKV_RULES = "\n".join(
    f"attn.{x}.{p} -> attn.qkv.{p} cat[{i * DIM}:{(i + 1) * DIM}]"
    for p in ("weight", "bias")
    for i, x in enumerate("qkv")
)


def write_checkpoints(folder: Path) -> None:
    for name in CONFIGS:
        torch.manual_seed(0)
        model_class(name)(CONFIGS[name]()).save_pretrained(folder / name)
    torch.manual_seed(0)
    model_class("mixtral")(CONFIGS["mixtral"](**EP)).save_pretrained(folder / "ep")
    torch.manual_seed(0)
    split = nn.Module()
    split.attn = Attention(fused=False)
    save_file(dict(split.state_dict()), folder / "qkv.safetensors")
    write_chunks(folder)




def _same(model: nn.Module, expect: dict[str, torch.Tensor]) -> list[str]:
    wrong = []
    for name, t in model.state_dict().items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        ref = expect[name]
        if full.shape != ref.shape or not torch.equal(
            full.contiguous().view(torch.uint8), ref.contiguous().view(torch.uint8)
        ):
            wrong.append(name)
    return wrong


def _logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 7, 3, 2]])).logits


def _fsdp2(name: str, folder: Path, read: str) -> dict:
    src = folder / name
    reference = model_class(name).from_pretrained(src)
    with torch.device("meta"):
        model = model_class(name)(reference.config)
    mesh = world_mesh()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    report = fastckpt.load_into(model, src, read=read)
    fused = [n for n in report.loaded if n.endswith("experts.gate_up_proj")]
    wrong = _same(model, reference.state_dict())
    same_logits = torch.equal(
        _logits(model).view(torch.uint8), _logits(reference).view(torch.uint8)
    )
    return {"wrong": wrong, "fused": len(fused), "same_logits": same_logits,
            "missing": report.missing, "unexpected": report.unexpected}  # fmt: skip


def scenario_fsdp2_mixtral(folder: Path) -> dict:
    return _fsdp2("mixtral", folder, "own")


def scenario_fsdp2_qwen3_moe(folder: Path) -> dict:
    return _fsdp2("qwen3_moe", folder, "own")


def scenario_fsdp2_mixtral_read_once(folder: Path) -> dict:
    return _fsdp2("mixtral", folder, "once")


def scenario_expert_parallel(folder: Path) -> dict:
    """Fused experts as Shard(0) DTensors; each rank loads its own evicted copy of the
    folder and must fetch only its experts' pages (plus the tensors every rank reads)."""
    rank = dist.get_rank()
    own = folder / f"ep{rank}"
    shutil.copytree(folder / "ep", own, dirs_exist_ok=True)
    # (from the shared folder: from_pretrained's tensors may map their file, whose pages
    # then stay cached)
    reference = model_class("mixtral").from_pretrained(folder / "ep")
    torch.manual_seed(rank + 1)  # other initial values on each rank
    model = model_class("mixtral")(reference.config)
    mesh = world_mesh()
    experts = 0
    for module in model.modules():
        if type(module).__name__.endswith("Experts"):
            for pname, param in list(module.named_parameters(recurse=False)):
                module.register_parameter(
                    pname, nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)]))
                )
                experts += 1
    file = own / "model.safetensors"
    evict([str(file)])
    evicted = _core._testing.cached_pages(str(file), 0, file.stat().st_size)
    plan = fastckpt.plan(model, own)
    index = plan.checkpoint._core_indexes[0]
    names = index.names()
    need: set[int] = set()
    itemsize = 4

    def add(name: str, offset: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> None:
        # every element's page: the views here are dense rows of contiguous tensors
        base = index.tensor_view(names.index(name)).file_offset
        numel = 1
        for n in shape:
            numel *= n
        first = base + offset * itemsize
        need.update(range(first // 4096, (first + numel * itemsize - 1) // 4096 + 1))

    for t in plan.pieces:
        assert t.src_view is not None
        add(t.source, *t.src_view)
    for e in plan.entries():
        v = index.tensor_view(names.index(e.source))
        add(e.source, v.storage_offset, tuple(v.shape), tuple(v.strides))
    report = fastckpt.load_into(model, plan)
    fetched = _core._testing.cached_pages(str(file), 0, file.stat().st_size)
    return {
        "wrong": _same(model, reference.state_dict()),
        "experts": experts,
        "need_pages": len(need),
        "fetched": fetched,
        "file_pages": (file.stat().st_size + 4095) // 4096,
        "local_bytes": report.bytes,
        "evicted": evicted,
    }


def scenario_tp_fused_qkv(folder: Path) -> dict:
    """Separate q, k, v in the file, one qkv under ColwiseParallel: each rank's rows of the
    fused weight come from the sources that feed them."""
    plain = nn.Module()
    plain.attn = Attention(fused=True)
    fastckpt.load_into(plain, folder / "qkv.safetensors", QKV_RULES)
    model = nn.Module()
    model.attn = parallelize_module(Attention(fused=True), world_mesh(), {"qkv": ColwiseParallel()})
    report = fastckpt.load_into(model, folder / "qkv.safetensors", QKV_RULES)
    local = model.attn.qkv.weight.to_local()
    return {
        "wrong": _same(model, dict(plain.state_dict())),
        "local_rows": local.shape[0],
        "bytes": report.bytes,
    }


def scenario_chunked_fsdp2(folder: Path) -> dict:
    """A chunked source (tests/test_chunked_source.py) into FSDP2 shards: each rank copies
    the parts of the chunks that meet its rows."""
    model = nn.Linear(6, 8)
    fully_shard(model, mesh=world_mesh())
    report = fastckpt.load_into(model, open_chunks(folder))
    return {"wrong": _same(model, full_values()), "bytes": report.bytes}


SCENARIOS = {
    name[len("scenario_") :]: fn for name, fn in globals().items() if name.startswith("scenario_")
}
