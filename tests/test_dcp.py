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
from tests.rank_pool import run_ranks


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def save_one_rank(state: dict, path: Path) -> None:
    # "torch.distributed is ... uninitialized": one process, on purpose.
    with warnings.catch_warnings():
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
        theirs = pickle.load(f)
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
        dtype, shape, _, offset = ckpt._handle_view(h)
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


# -- broken and hostile directories -----------------------------------------------------------


def broken_copy(one, tmp_path: Path, edit=None) -> Path:
    """A copy of the one-rank directory, its .metadata edited by ``edit(metadata)``."""
    import shutil

    src, _ = one
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    if edit is not None:
        meta = pickle.loads((dst / ".metadata").read_bytes())
        edit(meta)
        (dst / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))
    return dst


def open_error(path: Path) -> str:
    with pytest.raises(fastckpt.CheckpointError) as e:
        fastckpt.open(path).tensor("proj.weight")
    return str(e.value)


def test_missing_metadata(one, tmp_path):
    d = broken_copy(one, tmp_path)
    (d / ".metadata").unlink()
    assert open_error(d).startswith(f"{d / '.metadata'}: missing")


def test_truncated_distcp(one, tmp_path):
    d = broken_copy(one, tmp_path)
    (f,) = d.glob("*.distcp")
    os_size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(os_size - 100)
    msg = open_error(d)
    assert msg.startswith(f"{f}: ") and "past the end of the file" in msg and "truncated" in msg


def test_chunk_bytes_past_the_end_of_the_file(one, tmp_path):
    def far(meta):
        for info in meta.storage_data.values():
            info.offset += 10**9

    d = broken_copy(one, tmp_path, far)
    (f,) = d.glob("*.distcp")
    assert open_error(d).startswith(f"{f}: ")


def test_chunk_that_is_not_the_declared_tensor(one, tmp_path):
    def swap(meta):  # the storage of proj.weight's chunk points at proj.bias's archive
        by = {k.fqn: k for k in meta.storage_data}
        w, b = by["model.proj.weight"], by["model.proj.bias"]
        meta.storage_data[w] = meta.storage_data[b]

    d = broken_copy(one, tmp_path, swap)
    msg = open_error(d)
    assert ".distcp (archive of 'model.proj.weight'" in msg
    assert "declares F32 of shape (3, 5)" in msg


@pytest.mark.parametrize(
    "boxes, message",
    [
        ([((0, 0), (2, 5)), ((1, 0), (2, 5))], "chunks at offsets (0, 0) and (1, 0) overlap"),
        ([((0, 0), (2, 5))], "its chunks hold 10 of its 15 elements"),
    ],
    ids=["overlap", "missing"],
)
def test_chunks_that_do_not_tile_the_tensor(one, tmp_path, boxes, message):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    def edit(meta):
        fqn = "model.proj.weight"
        info = next(v for k, v in meta.storage_data.items() if k.fqn == fqn)
        meta.state_dict_metadata[fqn].chunks = [ChunkStorageMetadata(o, s) for o, s in boxes]
        for o, _ in boxes:
            meta.storage_data[MetadataIndex(fqn, o)] = info

    d = broken_copy(one, tmp_path, edit)
    msg = open_error(d)
    assert msg.startswith(f"{d / '.metadata'}: tensor 'model.proj.weight': ") and message in msg


def test_storage_transforms_are_refused_by_name(one, tmp_path):
    def compressed(meta):
        for info in meta.storage_data.values():
            info.transform_descriptors = ["zstd"]

    d = broken_copy(one, tmp_path, compressed)
    msg = open_error(d)
    assert "through the transform(s) zstd, which fastckpt does not read" in msg


def test_metadata_that_runs_code_is_refused_and_runs_nothing(one, tmp_path):
    import os
    import subprocess
    import sys

    from tests.hostile import _Evil, touch_command

    sentinel = tmp_path / "ran"

    def evil(meta):
        meta.planner_data["payload"] = _Evil(os.system, (touch_command(sentinel),))

    d = broken_copy(one, tmp_path, evil)
    msg = open_error(d)
    assert msg.startswith(f"{d / '.metadata'}: ") and "system', which only code-executing" in msg
    assert not sentinel.exists()
    # The payload is live: torch's own reader (pickle.load) runs it.
    script = (
        "import sys, torch.distributed.checkpoint as d\n"
        "d.FileSystemReader(sys.argv[1]).read_metadata()"
    )
    subprocess.run([sys.executable, "-c", script, str(d)], capture_output=True, timeout=120)
    assert sentinel.exists()


def test_other_globals_are_refused_by_name(one, tmp_path):
    import collections

    d = broken_copy(one, tmp_path, lambda m: m.planner_data.__setitem__("x", collections.Counter()))
    assert "'collections.Counter', which a DCP .metadata file does not hold" in open_error(d)


# -- fastckpt convert DCP_DIR OUT/ ---------------------------------------------------------------


# "100": pieces of 1 or 2 rows (48-byte rows), crossing every chunk boundary.
@pytest.mark.parametrize("budget", ["256MiB", "100"])
@pytest.mark.parametrize("layout", ["fsdp2", "tp"])
def test_convert_to_safetensors_equals_torchs_consolidation(ranks, layout, budget, tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from fastckpt.cli.app import app

    folder = ranks / layout
    want = torch_consolidated(folder, tmp_path)["model"]
    out = tmp_path / "hf"
    args = ["convert", str(folder), str(out), "--max-shard-size", "2KB"]
    r = CliRunner().invoke(app, [*args, "--max-host-bytes", budget])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors.index.json").is_file()
    assert not list(out.glob("*.distcp"))  # the source's data files are not "side files"
    got = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        got |= load_file(shard)
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert same_bytes(got[name], t), name


@pytest.mark.parametrize("budget", [256 << 20, 40])
def test_convert_with_dtype_and_rules(ranks, budget, tmp_path):
    from safetensors.torch import load_file

    from fastckpt.tools.convert import convert

    folder = ranks / "fsdp2"
    want = torch_consolidated(folder, tmp_path)["model"]
    index = [36, 0, 1, 2, 20, 21, 5]  # runs across the chunks of the 37 rows
    (tmp_path / "rows.txt").write_text("\n".join(map(str, index)))
    rules = (
        "embed.weight -> model.embed_tokens.weight rows[:30]\n"
        f"head.weight -> model.head.weight rows[@{tmp_path / 'rows.txt'}]\n"
        "{rest*} -> model.{rest*}\n"
    )
    report = convert(folder, tmp_path / "out", rules, dtype="bf16", max_host_bytes=budget)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert same_bytes(got["model.embed_tokens.weight"], want["embed.weight"][:30].bfloat16())
    assert same_bytes(got["model.head.weight"], want["head.weight"][index].bfloat16())
    assert same_bytes(got["model.blocks.0.q.weight"], want["blocks.0.q.weight"].bfloat16())
    assert report.sliced == ["model.embed_tokens.weight", "model.head.weight"]
    assert len(report.cast) == len(want)  # all float32


def test_explain_and_the_report_list_tensors_filled_chunk_by_chunk(one):
    folder, state = one
    model = Small()
    model.emb = nn.Embedding(4, 5)
    plan = fastckpt.plan(model, folder, "emb.weight -> emb.weight rows[:4]")
    text = plan.explain(full=True)
    for name in ("emb.weight", "proj.weight", "proj.bias", "counts"):
        assert name in text, text
    assert "[0:4]" in text
    names = {"emb.weight", "proj.weight", "proj.bias", "counts"}
    assert {e.target for e in plan.entries()} == names
    report = fastckpt.load_into(model, plan, strict=False)
    assert report.sliced == ["emb.weight"]
    assert report.rule_for["emb.weight"] == "emb.weight -> emb.weight rows[:4]"
    assert same_bytes(model.emb.weight, state["model"]["emb.weight"][:4])
