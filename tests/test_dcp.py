"""torch.distributed.checkpoint directories as a source (fastckpt/source/dcp.py).

Directories are written by ``dcp.save`` itself: in this process (one rank, no
process group) and by 2 gloo ranks from an FSDP2 and a tensor-parallel model
(tests/dcp_worker.py). Values are compared byte for byte with torch's own
reading (``dcp_to_torch_save``, which goes through ``dcp.load``).
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import fastckpt
from tests.test_sharded_load import run_ranks


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def save_one_rank(state: dict, path: Path) -> None:
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process, on purpose
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=path)


def torch_consolidated(path: Path, tmp: Path) -> dict:
    """What torch itself reads from the directory: dcp_to_torch_save, then torch.load."""
    out = tmp / f"{path.name}.consolidated.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)


def flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.proj = nn.Linear(5, 3)
        self.register_buffer("counts", torch.arange(4, dtype=torch.int64))


def small_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    m = Small()
    return {
        "model": {**m.state_dict(), "half": torch.randn(2, 2).to(torch.bfloat16)},
        "optim": {"step": 7, "param_groups": [{"lr": 0.1, "params": ["proj.weight"]}]},
        "rng": io.BytesIO(b"\x00\x01\x02"),
        # FQN-like keys with dots at two levels: names come from paths, not from splitting.
        "dotted": {"a.b": torch.ones(2), "a": {"c": torch.zeros(3)}},
    }


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("dcp_one") / "ckpt"
    state = small_state()
    save_one_rank(state, folder)
    state["rng"] = b"\x00\x01\x02"
    return folder, state


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dcp_ranks")
    per_rank = run_ranks(2, folder, ["save_fsdp2", "save_tp"], worker="tests.dcp_worker")
    for rank, r in enumerate(per_rank):
        for name, got in r.items():
            assert got["ok"], f"rank {rank} {name}: {got.get('error')}\n{got.get('trace')}"
    return folder


# -- .metadata, as written by dcp.save ----------------------------------------------------


def test_metadata_records_match_torchs_reading(one):
    folder, _ = one
    meta = fastckpt._core.read_dcp_metadata(str(folder / ".metadata"))
    with open(folder / ".metadata", "rb") as f:
        theirs = pickle.load(f)  # noqa: S301 - our own file, to compare with
    items = {i.fqn: i for i in meta.items}
    assert set(items) == set(theirs.state_dict_metadata)
    for fqn, md in theirs.state_dict_metadata.items():
        mine = items[fqn]
        assert mine.path == tuple(str(p) for p in theirs.planner_data[fqn])
        if hasattr(md, "chunks"):
            assert not mine.is_bytes
            assert mine.size == tuple(md.size)
            assert mine.torch_dtype == str(md.properties.dtype)
            assert [(c.offsets, c.sizes) for c in mine.chunks] == [
                (tuple(c.offsets), tuple(c.sizes)) for c in md.chunks
            ]
        else:
            assert mine.is_bytes
    assert len(meta.storage) == len(theirs.storage_data)
    places = {(s.relative_path, s.offset, s.length) for s in meta.storage}
    assert places == {(s.relative_path, s.offset, s.length) for s in theirs.storage_data.values()}


def test_open_lists_the_model_by_fqn(one):
    folder, state = one
    ckpt = fastckpt.open(folder)
    assert ckpt.format == "dcp"
    assert ckpt.prefix == ("model",)
    assert sorted(ckpt.keys()) == sorted(state["model"])
    for name, want in state["model"].items():
        info = ckpt.info(name)
        assert (info.shape, info.dtype) == (tuple(want.shape), want.dtype)
        assert same_bytes(ckpt.tensor(name), want)


def test_dotted_keys_come_from_paths(one):
    folder, state = one
    ckpt = fastckpt.open(folder, key="dotted")
    assert sorted(ckpt.keys()) == ["a.b", "a.c"]
    assert same_bytes(ckpt.tensor("a.b"), state["dotted"]["a.b"])
    assert same_bytes(ckpt.tensor("a.c"), state["dotted"]["a"]["c"])
    everything = fastckpt.open(folder, key="")
    assert "dotted.a.b" in everything.keys() and "model.proj.weight" in everything.keys()


def test_non_tensor_values_are_plain(one):
    folder, _ = one
    ckpt = fastckpt.open(folder)
    assert ckpt.value("optim.step") == 7
    assert ckpt.value("optim.param_groups.0.lr") == 0.1
    assert ckpt.value("optim.param_groups.0.params") == ["proj.weight"]
    assert ckpt.value("rng") == b"\x00\x01\x02"  # an io.BytesIO value: its bytes
    assert ckpt.metadata["optim"]["step"] == 7
    assert "optim.step" in ckpt.value_keys()


# -- chunks: 2 ranks, FSDP2 and tensor parallel -----------------------------------------------


@pytest.mark.parametrize("layout", ["fsdp2", "tp"])
def test_every_tensor_equals_torchs_own_reading(ranks, layout, tmp_path):
    folder = ranks / layout
    want = flatten(torch_consolidated(folder, tmp_path))
    ckpt = fastckpt.open(folder, key="")
    assert sorted(ckpt.keys()) == sorted(want)
    chunked = 0
    for name, t in want.items():
        assert same_bytes(ckpt.tensor(name), t), name
        chunked += len(ckpt.chunks(name)) > 1
    assert chunked > 0  # the layouts really split tensors over the ranks' files
    picked = fastckpt.open(folder)
    assert picked.prefix == ("model",)
    assert "state.embed.weight.exp_avg" in fastckpt.open(folder, key="optim").keys()


def test_chunks_follow_the_contract(ranks):
    ckpt = fastckpt.open(ranks / "fsdp2")
    handles = ckpt._handles()
    for name, h in handles.items():
        chunks = ckpt._chunks(h)
        assert chunks, name
        dtype, shape, strides, offset = ckpt._handle_view(h)
        assert (shape, offset) == (ckpt.info(name).shape, 0)
        assert ckpt._handle_shape(h) == shape and ckpt._handle_file(h) == str(ranks / "fsdp2")
        whole = ckpt.tensor(name)
        covered = 0
        for c in chunks:
            assert ckpt._chunks(c.handle) is None  # an ordinary stored tensor
            cdtype, cshape, _, _ = ckpt._handle_view(c.handle)
            assert (cdtype, cshape) == (dtype, c.sizes)
            file, pos = ckpt._handle_storage(c.handle)
            assert ckpt._core_indexes[file].path.endswith(".distcp") and pos > 0
            region = whole
            for d, (o, s) in enumerate(zip(c.offsets, c.sizes, strict=True)):
                region = region.narrow(d, o, s)
            assert same_bytes(ckpt._handle_tensor(c.handle)[0], region)
            covered += region.numel()
        assert covered == whole.numel()


# -- loading (the planner turns chunks into copies) -----------------------------------------


def test_load_into_a_plain_model(one):
    folder, state = one
    model = Small()
    report = fastckpt.load_into(model, folder, strict=False)
    assert report.unexpected == ["half"] and report.missing == []
    for name, t in model.state_dict().items():
        assert same_bytes(t, state["model"][name]), name


def test_load_into_a_meta_model(one):
    folder, state = one
    with torch.device("meta"):
        model = Small()
    fastckpt.load_into(model, folder, device="cpu", strict=False)
    for name, t in model.state_dict().items():
        assert same_bytes(t, state["model"][name]), name


@pytest.mark.slow
def test_load_into_another_topology_with_rules(ranks):
    per_rank = run_ranks(
        2,
        ranks,
        ["load_fsdp2_from_tp", "load_tp_from_fsdp2_meta", "load_tp_rules"],
        worker="tests.dcp_worker",
    )
    for rank, r in enumerate(per_rank):
        for name, got in r.items():
            assert got["ok"], f"rank {rank} {name}: {got.get('error')}\n{got.get('trace')}"
            assert got["wrong"] == [] and got["sharded"] > 0, (rank, name, got)
        assert r["load_tp_rules"]["renamed"] > 0
