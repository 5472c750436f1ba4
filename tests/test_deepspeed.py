"""DeepSpeed ZeRO folders as a source, against DeepSpeed's own ``zero_to_fp32``.

The fixtures (tests/data/deepspeed/<run>/) were written by DeepSpeed's engine on 2 gloo
ranks (tests/fixtures/make_deepspeed.py): ZeRO stage 1, 2 and 3, fp32 and bf16 mixed
precision, a tied embedding/head, a frozen layer, a buffer and two param groups. Each
holds ``reference.pt``: ``get_fp32_state_dict_from_zero_checkpoint``'s state dict. Every
test compares fastckpt's tensors with it byte for byte. DeepSpeed is not needed to run
them; where it is installed, one test writes a fresh checkpoint and compares again.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import fastckpt
from fastckpt.cli.app import app
from fastckpt.tools.convert import convert
from fastckpt.tools.diff import diff
from tests.conftest import assert_same_bytes
from tests.fixtures.make_deepspeed import Net
from tests.rank_pool import run_ranks

DATA = Path(__file__).resolve().parent / "data" / "deepspeed"
RUNS = ["zero1", "zero2", "zero3", "zero1_bf16", "zero2_bf16", "zero3_bf16"]
# DeepSpeed 0.19 saves no frozen parameters with ZeRO-1 (zero_to_fp32 has none either).
WITH_FROZEN = ["zero2", "zero3", "zero2_bf16", "zero3_bf16"]
STAGE = {run: int(run[4]) for run in RUNS}


def reference(run: str) -> dict[str, torch.Tensor]:
    return torch.load(DATA / run / "reference.pt", weights_only=True)


def fresh_net() -> Net:
    torch.manual_seed(1)  # other values than the checkpoint's
    return Net()


def assert_model_equals(model: torch.nn.Module, ref: dict[str, torch.Tensor]) -> None:
    """Every reference tensor in the model, byte for byte in the model's dtype (zero_to_fp32
    makes floating buffers fp32; loading into the model decides the dtype)."""
    state = model.state_dict()
    for name, want in ref.items():
        assert_same_bytes(state[name], want.to(state[name].dtype))


# -- reading ---------------------------------------------------------------------------


@pytest.mark.parametrize("run", RUNS)
def test_every_tensor_equals_zero_to_fp32(run):
    ref = reference(run)
    with fastckpt.open(DATA / run) as ckpt:
        assert ckpt.format == "deepspeed"
        assert sorted(ckpt.keys()) == sorted(ref)
        for name, want in ref.items():
            assert ckpt.info(name).shape == tuple(want.shape)
            assert_same_bytes(ckpt.tensor(name), want)


@pytest.mark.parametrize("run", RUNS)
def test_parameters_come_from_the_partitions_of_every_rank(run):
    """The trainable parameters are read from the optimizer files' flat fp32 partitions
    (not the model states' 16-bit copies), and a partition boundary cuts through them."""
    with fastckpt.open(DATA / run) as ckpt:
        assert (ckpt.zero_stage, ckpt.world_size) == (STAGE[run], 2)
        assert ckpt.metadata["tag"] == "global_step2"
        files = {f for n in ("emb.weight", "up.weight", "down.weight") for f, _, _ in ckpt.runs(n)}
        assert {Path(f).name.endswith("_optim_states.pt") for f in files} == {True}
        assert len(files) == 2  # both ranks' partitions
        # a run ending inside a row: the partitions are not cut on row boundaries
        cuts = [c for n in ("emb.weight", "up.weight", "down.weight") for c in ckpt.runs(n)[:-1]]
        assert any((start + count) % 6 and (start + count) % 13 for _, start, count in cuts)
        assert ckpt.info("head.weight").shares_storage_with == ("emb.weight",)
        assert ckpt.runs("scale")[0][0].endswith("model_states.pt")  # buffers: stored whole


def test_stage3_pieces_are_ceil_numel_over_world():
    with fastckpt.open(DATA / "zero3") as ckpt:
        for name in ("emb.weight", "up.weight", "down.bias", "frozen.weight"):
            numel = math.prod(ckpt.info(name).shape)
            counts = [count for _, _, count in ckpt.runs(name)]
            piece = -(-numel // 2)
            assert counts == [piece, numel - piece], name


def test_flat_ranges_become_boxes_of_contiguous_runs():
    """Any range of a contiguous tensor's elements (a partition's share of a parameter) as
    boxes, in order, each one run of consecutive elements: the rows-and-columns the plan
    intersects with a DTensor shard."""
    from fastckpt.source.deepspeed import boxes

    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        ndim = int(torch.randint(0, 5, (1,), generator=gen))
        shape = tuple(int(d) for d in torch.randint(1, 6, (ndim,), generator=gen))
        n = math.prod(shape)
        start, stop = sorted(int(x) for x in torch.randint(0, n + 1, (2,), generator=gen))
        t = torch.arange(n).reshape(shape)
        got = []
        for offsets, sizes in boxes(shape, start, stop):
            part = t[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]
            flat = part.reshape(-1).tolist()
            assert flat == list(range(flat[0], flat[0] + len(flat))), (shape, offsets, sizes)
            got += flat
        assert got == list(range(start, stop)), (shape, start, stop)


def test_tag_folder_opens_like_the_top_folder():
    with fastckpt.open(DATA / "zero2" / "global_step2") as a, fastckpt.open(DATA / "zero2") as b:
        assert a.keys() == b.keys()
        for name in a.keys():
            assert_same_bytes(a.tensor(name), b.tensor(name))


def test_hf_trainer_folder_opens_its_model_file_and_its_tag_the_zero_state(tmp_path):
    """A Trainer's checkpoint-N/ holds model.safetensors beside latest + global_stepN/."""
    from safetensors.torch import save_file

    folder = _copy("zero2", tmp_path)
    save_file({"only.weight": torch.ones(2)}, folder / "model.safetensors")
    with fastckpt.open(folder) as ckpt:
        assert ckpt.format == "safetensors" and ckpt.keys() == ["only.weight"]
    with fastckpt.open(folder / "global_step2") as ckpt:
        assert ckpt.format == "deepspeed" and "up.weight" in ckpt.keys()


# -- loading ----------------------------------------------------------------------------


@pytest.mark.parametrize("run", RUNS)
def test_load_into_a_plain_model(run):
    model = fresh_net()
    if run in WITH_FROZEN:
        report = fastckpt.load_into(model, DATA / run)
    else:
        with pytest.warns(fastckpt.UninitializedWarning, match="frozen"):
            report = fastckpt.load_into(model, DATA / run, strict=False)
    assert_model_equals(model, reference(run))
    if run not in WITH_FROZEN:
        assert sorted(report.missing) == ["frozen.bias", "frozen.weight"]
    assert model.head.weight is model.emb.weight  # still tied, written once


@pytest.mark.parametrize("run", ["zero2", "zero3_bf16"])
def test_load_into_a_meta_model_on_a_device(run):
    with torch.device("meta"):
        model = Net()
    fastckpt.load_into(model, DATA / run, device="cpu")
    assert not any(t.is_meta for t in model.state_dict().values())
    assert_model_equals(model, reference(run))


@pytest.mark.parametrize("run", ["zero2", "zero3_bf16"])
def test_load_with_pread(run):
    model = fresh_net()
    report = fastckpt.load_into(model, DATA / run, read="pread")
    assert_model_equals(model, reference(run))
    assert report.fetched > 0


def test_plan_lists_every_tensor():
    p = fastckpt.plan(fresh_net(), DATA / "zero3")
    assert p.missing == [] and p.unexpected == [] and p.mismatched == []
    loaded = set(p.loaded + p.loaded_by_pieces)
    tie = {"emb.weight", "head.weight"}  # one parameter: written through one of its names
    assert len(loaded & tie) == 1 and loaded - tie == set(reference("zero3")) - tie


class Wrapped(torch.nn.Module):
    """Other names (``net.*``), fewer vocabulary rows, bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Net()
        self.net.emb = torch.nn.Embedding(7, 6)
        self.net.head = torch.nn.Linear(6, 7, bias=False)
        self.net.head.weight = self.net.emb.weight
        self.to(torch.bfloat16)


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_rules_rename_cut_rows_and_cast(run):
    ref = reference(run)
    model = Wrapped()
    rules = (
        "emb.weight -> net.emb.weight rows[2:9]\nhead.weight -> net.head.weight rows[2:9]\n"
        "{rest*} -> net.{rest*}\n"
    )
    report = fastckpt.load_into(model, DATA / run, rules)
    state = model.state_dict()
    assert_same_bytes(state["net.emb.weight"], ref["emb.weight"][2:9].to(torch.bfloat16))
    for name in ("up.weight", "down.bias", "frozen.weight", "scale"):
        assert_same_bytes(state[f"net.{name}"], ref[name].to(torch.bfloat16))
    assert report.missing == [] and report.mismatched == []
    assert ("up.weight", "net.up.weight") in report.renamed
    assert ("net.up.weight", "float32", "bfloat16") in report.cast


# -- tools ------------------------------------------------------------------------------


@pytest.mark.parametrize("run", ["zero1_bf16", "zero2", "zero3", "zero3_bf16"])
@pytest.mark.parametrize("budget", [256 << 20, 40])
def test_convert_writes_zero_to_fp32s_tensors(run, budget, tmp_path):
    """A 40-byte budget cuts every tensor into pieces of a row or two, across the runs."""
    ref = reference(run)
    report = convert(DATA / run, tmp_path / "out", max_host_bytes=budget)
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]  # no `latest` copied
    assert report.copied == []
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(out) == sorted(ref)
    for name, want in ref.items():
        if name == "scale" and want.dtype != out[name].dtype:  # see convert --dtype below
            continue
        assert_same_bytes(out[name], want)


def test_convert_to_fp32_gives_zero_to_fp32s_values(tmp_path):
    """zero_to_fp32 makes floating buffers fp32 and keeps bf16 frozen fragments bf16: with
    --dtype fp32 every tensor holds its values in fp32."""
    convert(DATA / "zero3_bf16", tmp_path / "m.safetensors", dtype="fp32")
    out = load_file(tmp_path / "m.safetensors")
    ref = reference("zero3_bf16")
    assert ref["frozen.weight"].dtype == torch.bfloat16 and ref["scale"].dtype == torch.float32
    for name, want in ref.items():
        assert_same_bytes(out[name], want.float())


def test_diff_against_the_reference_has_equal_values():
    d = diff(DATA / "zero3", DATA / "zero3" / "reference.pt", values=True)
    assert d.equal, d


def test_cli_inspect_diff_and_convert(tmp_path):
    r = CliRunner().invoke(app, ["inspect", str(DATA / "zero2")])
    assert r.exit_code == 0, r.output
    assert "deepspeed" in r.output and "up.weight" in r.output and "[13, 6]" in r.output
    r = CliRunner().invoke(
        app, ["diff", str(DATA / "zero2"), str(DATA / "zero2" / "reference.pt"), "--values"]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["convert", str(DATA / "zero3_bf16"), str(tmp_path / "hf")])
    assert r.exit_code == 0, r.output
    out = load_file(tmp_path / "hf" / "model.safetensors")
    assert_same_bytes(out["up.weight"], reference("zero3_bf16")["up.weight"])


# -- 2 FSDP2 ranks ----------------------------------------------------------------------


def test_load_into_fsdp2_ranks(tmp_path):
    scenarios = ["fsdp2_zero2", "fsdp2_zero3", "fsdp2_zero3_bf16_meta", "read_once_zero3"]
    per_rank = run_ranks(2, tmp_path, scenarios, worker="tests.deepspeed_worker")
    for rank, r in enumerate(per_rank):
        for name in scenarios:
            got = r[name]
            assert got["ok"], f"rank {rank} {name}: {got.get('error')}\n{got.get('trace')}"
            assert got["wrong"] == [] and got["missing"] == [], (rank, name, got)
            if name.startswith("fsdp2"):
                assert got["sharded"] > 0
                assert 0 < got["bytes"] < got["total"], (rank, name, got)  # its shards only


# -- broken and hostile folders ---------------------------------------------------------


def _copy(run: str, tmp_path: Path) -> Path:
    dst = tmp_path / run
    shutil.copytree(DATA / run, dst)
    return dst


def _optim(folder: Path, rank: int) -> Path:
    return next((folder / "global_step2").glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))


def _edit_model_states(folder: Path, edit) -> None:
    # model states hold only plain values and tensors: torch's weights_only reader takes them
    f = folder / "global_step2" / "mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=True)
    edit(state)
    torch.save(state, f)


def _truncated(folder: Path) -> str:
    f = _optim(folder, 1)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return f.name


def _no_latest(folder: Path) -> str:
    (folder / "latest").unlink()
    return "latest: missing"


def _no_tag(folder: Path) -> str:
    shutil.rmtree(folder / "global_step2")
    return "global_step2: missing"


def _escaping_tag(folder: Path) -> str:
    (folder / "latest").write_text("../../etc")
    return "does not name a tag folder"


def _rank_missing(folder: Path) -> str:
    _optim(folder, 1).unlink()
    return "holds 1 *_optim_states.pt file(s)"


def _too_large_shapes(folder: Path) -> str:
    _edit_model_states(folder, lambda s: s["param_shapes"][0].update({"up.weight": [14, 6]}))
    return "past the"


def _too_small_shapes(folder: Path) -> str:
    _edit_model_states(folder, lambda s: s["param_shapes"][0].update({"down.weight": [2, 13]}))
    return "more than the alignment padding"


def _shapes_not_shapes(folder: Path) -> str:
    _edit_model_states(folder, lambda s: s["param_shapes"][0].update({"up.weight": "big"}))
    return "'up.weight' has no shape"


def _other_runs_rank(folder: Path) -> str:
    shutil.copy(_optim(DATA / "zero3", 1), _optim(folder, 1))
    return "single_partition_of_fp32_groups"


CASES = {
    "truncated-optim-states": _truncated,
    "no-latest": _no_latest,
    "no-tag-folder": _no_tag,
    "tag-leaves-folder": _escaping_tag,
    "rank-file-missing": _rank_missing,
    "shapes-past-partitions": _too_large_shapes,
    "shapes-short-of-partitions": _too_small_shapes,
    "shape-not-a-shape": _shapes_not_shapes,
    "rank-file-of-another-stage": _other_runs_rank,
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_folder_gives_checkpoint_error_naming_the_file(case, tmp_path):
    folder = _copy("zero2", tmp_path)
    message = CASES[case](folder)
    with pytest.raises(fastckpt.CheckpointError) as err:
        fastckpt.load_into(fresh_net(), folder)
    assert message in str(err.value)
    assert str(folder) in str(err.value)


def test_zero3_partitions_of_unequal_size(tmp_path):
    folder = _copy("zero3", tmp_path)
    shutil.copy(_optim(DATA / "zero3_bf16", 1), _optim(folder, 1))  # same sizes: still fine
    fastckpt.open(folder).close()
    state = torch.load(folder / "global_step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                       weights_only=True)  # fmt: skip
    state["param_shapes"][1]["down.bias"] = [8]
    torch.save(state, folder / "global_step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(fastckpt.CheckpointError, match="optim_states.pt: .*partition"):
        fastckpt.open(folder)


def test_zero3_rank_model_states_missing(tmp_path):
    folder = _copy("zero3", tmp_path)
    (folder / "global_step2" / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(fastckpt.CheckpointError, match="ZeRO-3 checkpoint of 2 ranks holds"):
        fastckpt.open(folder)


def test_pickle_naming_os_system_is_refused_and_runs_nothing(tmp_path):
    folder = _copy("zero2", tmp_path)
    sentinel = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    torch.save({"optimizer_state_dict": Evil()}, _optim(folder, 0))
    # the payload is live: torch's full unpickler runs it
    torch.load(_optim(folder, 0), weights_only=False)
    assert sentinel.exists()
    sentinel.unlink()
    with pytest.raises(fastckpt.CheckpointError, match="os.system") as err:
        fastckpt.open(folder)
    assert _optim(folder, 0).name in str(err.value)
    assert not sentinel.exists()


def test_not_a_zero_checkpoint(tmp_path):
    folder = _copy("zero2", tmp_path)
    torch.save({"model": torch.zeros(2)}, _optim(folder, 0))
    with pytest.raises(fastckpt.CheckpointError, match="no 'optimizer_state_dict' dict"):
        fastckpt.open(folder)


# -- against a fresh DeepSpeed run ------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_fresh_deepspeed_run_loads_as_zero_to_fp32_makes_it(tmp_path):
    """DeepSpeed's engine writes a new ZeRO-3 bf16 checkpoint of 3 steps here and now."""
    from tests.fixtures import make_deepspeed

    out = tmp_path / "fresh"
    make_deepspeed.write_run(out, 3, True, steps=3)
    ref = torch.load(out / "reference.pt", weights_only=True)
    with fastckpt.open(out) as ckpt:
        assert sorted(ckpt.keys()) == sorted(ref)
        for name, want in ref.items():
            assert_same_bytes(ckpt.tensor(name), want)
    assert json.loads(json.dumps(fastckpt.open(out).metadata["zero_stage"])) == 3
