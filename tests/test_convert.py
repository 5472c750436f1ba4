"""fastckpt.tools.convert: safetensors in, safetensors out, with rules, casts, shards, atomicity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastckpt
from fastckpt.planning.mapping import Assignment, MappingPlan, RowSelection
from fastckpt.source.safetensors_writer import TensorSpec, write_safetensors
from fastckpt.tools.convert import convert, parse_size, plan_shards
from tests.conftest import ALL_DTYPES, assert_same_bytes, random_tensor, tiny_hf_config

REPO = Path(__file__).resolve().parents[1]


class FakeRules:
    """Test double for a rules object: a fixed rename table with rows, dtypes and ignores."""

    def __init__(
        self,
        table: dict[str, tuple[str, RowSelection | None, torch.dtype | None]],
        ignore: tuple[str, ...] = (),
    ):
        self.table = table
        self.ignore = ignore
        self.calls: list[tuple[list[str], object]] = []

    def plan(self, source_keys, target_keys):
        self.calls.append((list(source_keys), target_keys))
        plan = MappingPlan()
        for k in source_keys:
            if k in self.ignore:
                plan.ignored_sources.append(k)
            elif k in self.table:
                target, rows, dtype = self.table[k]
                plan.assignments.append(Assignment(target, k, f"{k} -> {target}", rows, dtype))
            else:
                plan.assignments.append(Assignment(k, k))
        return plan


def write_in_order(path, tensors):
    """Unlike safetensors' save_file, keeps the dict's order in the file."""
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    write_safetensors(path, specs, lambda s: tensors[s.name])


@pytest.fixture
def mixed_file(tmp_path):
    tensors = {f"t{i}": random_tensor((5, 3), d, i) for i, d in enumerate(ALL_DTYPES)}
    tensors["scalar"] = torch.tensor(1.5)
    tensors["empty"] = torch.zeros(0, 4)
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path), metadata={"note": "from the test"})
    return path, tensors


def test_identity_single_file_round_trip(mixed_file, tmp_path):
    src, tensors = mixed_file
    dst = tmp_path / "out.safetensors"
    report = convert(src, dst)
    back = load_file(str(dst))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert_same_bytes(back[k], v)
    with safe_open(str(dst), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["fastckpt_source"] == str(src.resolve())
    assert meta["fastckpt_version"] == fastckpt.__version__
    assert meta["fastckpt_rules_sha256"] == ""
    assert meta["note"] == "from the test"  # the source's own metadata is kept
    assert report.tensors == len(tensors)
    assert report.files == ["out.safetensors"]
    assert report.total_bytes == sum(v.numel() * v.element_size() for v in tensors.values())
    assert report.renamed == [] and report.cast == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.safetensors", "out.safetensors"]


def test_dtype_casts_only_wide_floats(mixed_file, tmp_path):
    src, tensors = mixed_file
    dst = tmp_path / "bf16.safetensors"
    report = convert(src, dst, dtype="bf16")
    back = load_file(str(dst))
    for k, v in tensors.items():
        if v.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16):
            assert_same_bytes(back[k], v.to(torch.bfloat16))
        else:
            assert_same_bytes(back[k], v)
    assert sorted(report.cast) == sorted(
        k for k, v in tensors.items() if v.dtype in (torch.float16, torch.float32, torch.float64)
    )
    with safe_open(str(dst), "pt") as f:
        assert f.metadata()["fastckpt_dtype"] == "bfloat16"


def test_rules_rename_slice_index_rows_rule_dtype_and_ignore(tmp_path):
    emb = torch.randn(10, 4)
    pos = torch.randn(6, 4)
    src = tmp_path / "src.safetensors"
    write_in_order(
        src, {"src.emb": emb, "src.pos": pos, "cls.head": torch.randn(2), "keep": torch.arange(3)}
    )
    rules = FakeRules(
        {
            "src.emb": ("encoder.embed_tokens.weight", RowSelection(0, 7), None),
            "src.pos": (
                "encoder.embed_positions.weight",
                RowSelection(index=(5, 0, 2)),
                torch.float16,
            ),
        },
        ignore=("cls.head",),
    )
    dst = tmp_path / "out.safetensors"
    report = convert(src, dst, rules, dtype="bf16")
    assert rules.calls == [(["src.emb", "src.pos", "cls.head", "keep"], None)]
    back = load_file(str(dst))
    assert set(back) == {"encoder.embed_tokens.weight", "encoder.embed_positions.weight", "keep"}
    assert_same_bytes(back["encoder.embed_tokens.weight"], emb[:7].to(torch.bfloat16))
    # the rule's own dtype wins over --dtype
    assert_same_bytes(back["encoder.embed_positions.weight"], pos[[5, 0, 2]].half())
    assert_same_bytes(back["keep"], torch.arange(3))
    assert report.renamed == [
        ("src.emb", "encoder.embed_tokens.weight"),
        ("src.pos", "encoder.embed_positions.weight"),
    ]
    assert report.sliced == ["encoder.embed_tokens.weight", "encoder.embed_positions.weight"]
    assert report.ignored == ["cls.head"]
    with safe_open(str(dst), "pt") as f:
        assert len(f.metadata()["fastckpt_rules_sha256"]) == 64


def test_rules_file_digest_is_the_file_sha256(tmp_path, monkeypatch):
    import hashlib

    import fastckpt.tools.convert as convert_mod

    src = tmp_path / "src.safetensors"
    save_file({"a": torch.ones(2)}, str(src))
    rules_file = tmp_path / "port.rules"
    rules_file.write_text("a -> b\n")
    monkeypatch.setattr(convert_mod, "_rules_object", lambda r: FakeRules({"a": ("b", None, None)}))
    convert(src, tmp_path / "out.safetensors", rules_file)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert f.metadata()["fastckpt_rules_sha256"] == hashlib.sha256(b"a -> b\n").hexdigest()
        assert list(f.keys()) == ["b"]


def test_two_sources_for_one_target_is_an_error(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, str(src))
    rules = FakeRules({"a": ("x", None, None), "b": ("x", None, None)})
    with pytest.raises(
        fastckpt.CheckpointError, match="target 'x' would come from both 'a' and 'b'"
    ):
        convert(src, tmp_path / "out.safetensors", rules)
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_row_index_is_an_error(tmp_path):
    src = tmp_path / "src.safetensors"
    save_file({"a": torch.ones(3, 2)}, str(src))
    rules = FakeRules({"a": ("a", RowSelection(index=(0, 3)), None)})
    with pytest.raises(
        fastckpt.CheckpointError, match="row index 3 out of range for 'a' with 3 rows"
    ):
        convert(src, tmp_path / "out.safetensors", rules)


def test_sharded_output_and_index(tmp_path):
    tensors = {f"layer.{i}.weight": random_tensor((64, 16), torch.float32, i) for i in range(7)}
    tensors["last"] = torch.randn(1024)
    src = tmp_path / "src.safetensors"
    write_in_order(src, tensors)
    dst = tmp_path / "out"
    report = convert(src, dst, max_shard_size="10KB")  # two 4 KB tensors fit, three do not
    names = sorted(p.name for p in dst.iterdir())
    assert names == [
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
        "model.safetensors.index.json",
    ]
    assert report.files == names
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 8 * 4096}
    assert index["weight_map"]["layer.0.weight"] == "model-00001-of-00004.safetensors"
    assert index["weight_map"]["layer.6.weight"] == "model-00004-of-00004.safetensors"
    assert index["weight_map"]["last"] == "model-00004-of-00004.safetensors"
    back = {}
    for name in names[:-1]:
        back.update(load_file(str(dst / name)))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert_same_bytes(back[k], v)
    # and fastckpt reads the folder back through the index
    with fastckpt.open(dst) as ck:
        assert sorted(ck.keys()) == sorted(tensors)
        assert_same_bytes(ck.tensor("layer.3.weight"), tensors["layer.3.weight"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_folder_without_split_is_one_model_file(mixed_file, tmp_path):
    src, _tensors = mixed_file
    report = convert(src, tmp_path / "out", max_shard_size="1GB")
    assert report.files == ["model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]


def test_plan_shards_keeps_order_and_isolates_oversized():
    specs = [
        TensorSpec(n, torch.float32, (s,)) for n, s in [("a", 2), ("b", 2), ("c", 10), ("d", 1)]
    ]
    groups = plan_shards(specs, 16)
    assert [[s.name for s in g] for g in groups] == [["a", "b"], ["c"], ["d"]]
    assert [[s.name for s in g] for g in plan_shards(specs, None)] == [["a", "b", "c", "d"]]
    assert plan_shards([], 16) == [[]]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GB", 2 * 10**9),
        ("500MB", 500 * 10**6),
        ("10KB", 10_000),
        ("1GiB", 2**30),
        ("3MiB", 3 * 2**20),
        ("1024", 1024),
        ("1.5GB", 1_500_000_000),
        ("7 kb", 7000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "2XB", "0"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_existing_destination_needs_overwrite(mixed_file, tmp_path):
    src, tensors = mixed_file
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep me")
    with pytest.raises(ValueError, match=r"out.safetensors: already exists \(pass --overwrite"):
        convert(src, dst)
    assert dst.read_bytes() == b"keep me"
    convert(src, dst, overwrite=True)
    assert set(load_file(str(dst))) == set(tensors)


def test_overwrite_replaces_a_folder(mixed_file, tmp_path):
    src, _tensors = mixed_file
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match="already exists"):
        convert(src, dst)
    convert(src, dst, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.safetensors", "out"]


def test_empty_folder_destination_is_fine(mixed_file, tmp_path):
    src, _ = mixed_file
    (tmp_path / "out").mkdir()
    convert(src, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_single_file_destination_cannot_be_split(mixed_file, tmp_path):
    src, _ = mixed_file
    with pytest.raises(ValueError, match="give a folder as destination for sharded output"):
        convert(src, tmp_path / "out.safetensors", max_shard_size="100B")
    assert [p.name for p in tmp_path.iterdir()] == ["mixed.safetensors"]


def test_bad_dtype_is_refused(mixed_file, tmp_path):
    src, _ = mixed_file
    with pytest.raises(ValueError, match="--dtype must be one of bf16, fp16, fp32, not 'int8'"):
        convert(src, tmp_path / "o.safetensors", dtype="int8")


def test_failure_mid_folder_write_leaves_nothing(mixed_file, tmp_path, monkeypatch):
    import fastckpt.tools.convert as convert_mod

    src, _ = mixed_file
    real = convert_mod.read_tensor
    count = {"n": 0}

    def failing(ckpt, a, spec, *budget):
        count["n"] += 1
        if count["n"] == 6:
            raise RuntimeError("disk on fire")
        return real(ckpt, a, spec, *budget)

    monkeypatch.setattr(convert_mod, "read_tensor", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(src, tmp_path / "out", max_shard_size="40B")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed.safetensors"]


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import fastckpt.tools.convert as c

    real = c.read_tensor
    marker = Path(sys.argv[3])

    def slow(ckpt, a, spec, *budget):
        t = real(ckpt, a, spec, *budget)
        marker.write_text(a.target)
        time.sleep(0.3)
        return t

    c.read_tensor = slow
    c.convert(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[4] if len(sys.argv) > 4 else None)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
@pytest.mark.parametrize("dst_name, shard", [("out.safetensors", None), ("out", "9KB")])
def test_killed_convert_leaves_no_destination(tmp_path, sig, dst_name, shard):
    tensors = {f"w{i}": torch.randn(1024) for i in range(8)}
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src))
    dst = tmp_path / dst_name
    marker = tmp_path / "progress"
    args = [sys.executable, "-c", KILL_SCRIPT, str(src), str(dst), str(marker)]
    if shard:
        args.append(shard)
    proc = subprocess.Popen(args, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        # wait until a later tensor is being written: earlier ones are already on disk
        while not (marker.exists() and marker.read_text() in ("w4", "w5")):
            assert proc.poll() is None, "converter ended before it was killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        assert proc.wait(30) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not dst.exists()
    leftovers = [
        p.name for p in tmp_path.iterdir() if p.name not in ("src.safetensors", "progress")
    ]
    # only the hidden temporary beside the destination remains, never the destination
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{dst_name}.")
    assert leftovers[0].endswith(".partial")


def tiny_bert():
    from transformers import BertModel

    torch.manual_seed(0)
    config = tiny_hf_config(
        vocab_size=99,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def test_hf_folder_sharded_loads_with_from_pretrained(tmp_path):
    from transformers import BertModel

    model = tiny_bert()
    src = tmp_path / "hf"
    model.save_pretrained(src, safe_serialization=True)
    (src / "tokenizer_config.json").write_text("{}")
    dst = tmp_path / "converted"
    report = convert(src, dst, max_shard_size="40KB")
    n = len([f for f in report.files if f.endswith(".safetensors")])
    assert n > 2
    assert sorted(report.copied) == ["config.json", "tokenizer_config.json"]
    assert (dst / "config.json").read_bytes() == (src / "config.json").read_bytes()
    back = BertModel.from_pretrained(dst).eval()
    expected = model.state_dict()
    got = back.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        assert_same_bytes(got[k], expected[k])
    ids = torch.tensor([[1, 5, 7, 3]])
    with torch.no_grad():
        assert torch.equal(back(ids).last_hidden_state, model(ids).last_hidden_state)


def test_hf_folder_bf16_loads_with_from_pretrained(tmp_path):
    from transformers import BertModel

    model = tiny_bert()
    src = tmp_path / "hf"
    model.save_pretrained(src, safe_serialization=True)
    dst = tmp_path / "bf16"
    convert(src, dst, dtype="bf16")
    back = BertModel.from_pretrained(dst, torch_dtype=torch.bfloat16)
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert_same_bytes(back.state_dict()[k], v.to(torch.bfloat16))


# -- max_host_bytes: a tensor larger than the budget streams in pieces of rows ----------------

_PEAK = textwrap.dedent(
    """
    import json, sys
    from fastckpt.bench.sharded import PeakPrivate
    from fastckpt.tools.convert import convert
    src, out, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with PeakPrivate() as mem:
        convert(src, out, dtype="bf16", max_host_bytes=budget)
    print(json.dumps({"peak": mem.peak - mem.base}))
    """
)


def test_a_tensor_larger_than_max_host_bytes_streams_within_it(tmp_path):
    """A 48 MiB tensor of a DCP directory cast to bf16 with an 8 MiB budget: the output
    equals the unbounded conversion byte for byte, and private memory grows by about the
    budget, not the tensor's cast (measured in a fresh
    process, RssAnon sampled as bench/bench_dcp.py does; glibc's mmap threshold pinned
    so that freed pieces leave the heap)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    big = torch.randn(3072, 4096)  # 48 MiB of fp32
    src = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process, no process group
        dcp.save({"model": {"big": big, "small": torch.randn(3)}}, checkpoint_id=src)
    del big
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    peaks = {}
    for budget in (8 << 20, 1 << 30):
        out = tmp_path / f"out-{budget}"
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK, str(src), str(out), str(budget)],
            capture_output=True, text=True, check=True, env=env, cwd=REPO,
        )  # fmt: skip
        peaks[budget] = json.loads(proc.stdout.strip().splitlines()[-1])["peak"]
    small, whole = load_file(tmp_path / f"out-{8 << 20}" / "model.safetensors"), load_file(
        tmp_path / f"out-{1 << 30}" / "model.safetensors"
    )
    assert small.keys() == whole.keys() == {"big", "small"}
    for k in small:
        assert_same_bytes(small[k], whole[k])
    with torch.no_grad():
        torch.manual_seed(0)
        assert_same_bytes(small["big"], torch.randn(3072, 4096).bfloat16())
    # The stored chunk is read in place; what is allocated is the cast: unbounded, all
    # 24 MiB of it at once; bounded, pieces within 8 MiB (plus some slack).
    assert peaks[1 << 30] > 20 << 20, peaks
    assert peaks[8 << 20] < (8 << 20) + (8 << 20), peaks
