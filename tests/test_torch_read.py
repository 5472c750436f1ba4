"""fastckpt.open on torch.save files (zip and legacy), byte for byte against torch.load."""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastckpt
from fastckpt.errors import CheckpointError
from tests.conftest import ALL_DTYPES, assert_same_bytes, random_tensor

FORMATS = ["zip", "legacy"]

# Dtypes torch itself cannot load back from a legacy file (its legacy loader asks
# UntypedStorage for a dtype): fastckpt reads them, checked against the saved values.
LEGACY_UNLOADABLE = {
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
}


def save(obj, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def flatten(obj, prefix: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The dotted names fastckpt gives the tensors of a nested container tree."""
    if isinstance(obj, torch.Tensor):
        return {".".join(prefix) if prefix else "": obj}
    items = (
        obj.items()
        if isinstance(obj, dict)
        else enumerate(obj)
        if isinstance(obj, (list, tuple))
        else ()
    )
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(flatten(v, (*prefix, str(k))))
    return out


def same_tensor(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert tuple(got.stride()) == tuple(expected.stride()) or got.numel() <= 1
    assert_same_bytes(got, expected)


# -- dtypes, views, shapes ---------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype_matches_torch_load(tmp_path, fmt, dtype):
    tensors = {
        "matrix": random_tensor((5, 7), dtype, 1),
        "scalar": random_tensor((), dtype, 2),
        "empty": random_tensor((0, 3), dtype, 3),
        "column": random_tensor((6, 4), dtype, 4)[:, 1],  # a strided view
    }
    path = save(tensors, tmp_path / "m.pt", fmt)
    if fmt == "legacy" and dtype in LEGACY_UNLOADABLE:
        expected = tensors
    else:
        expected = torch.load(path, weights_only=True)
    with fastckpt.open(path) as ckpt:
        assert ckpt.format == ("torch_zip" if fmt == "zip" else "torch_legacy")
        assert sorted(ckpt.keys()) == sorted(expected)
        for name, ref in expected.items():
            info = ckpt.info(name)
            assert info.shape == tuple(ref.shape)
            assert info.dtype == ref.dtype
            assert info.strides == tuple(ref.stride())
            assert info.storage_offset == ref.storage_offset()
            assert info.nbytes == ref.numel() * ref.element_size()
            same_tensor(ckpt.tensor(name), ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_and_shared_storages(tmp_path, fmt):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    emb = torch.randn(7, 3)
    sd = {
        "embed.weight": emb,
        "head.weight": emb,  # tied: the same tensor twice
        "base": base,
        "rows": base[2:4],  # offset view
        "cols": base[:, 3:5],  # non-contiguous view
        "transposed": base.t(),
        "element": base[5, 9],  # 0-d view at the last element
        "alone": torch.ones(3),
    }
    path = save(sd, tmp_path / "m.pt", fmt)
    ref = torch.load(path, weights_only=True)
    with fastckpt.open(path) as ckpt:
        for name in sd:
            same_tensor(ckpt.tensor(name), ref[name])
            assert ckpt.info(name).storage_offset == ref[name].storage_offset()
        assert ckpt.info("embed.weight").shares_storage_with == ("head.weight",)
        assert set(ckpt.info("base").shares_storage_with) == {
            "rows",
            "cols",
            "transposed",
            "element",
        }
        assert ckpt.info("alone").shares_storage_with == ()
        assert not ckpt.info("transposed").is_contiguous
        assert ckpt.info("rows").storage_offset == 20
        assert ckpt.info("element").storage_offset == 59


@pytest.mark.parametrize("fmt", FORMATS)
def test_nested_containers_get_dotted_names(tmp_path, fmt):
    tree = {
        "model": {
            "encoder": {
                "layers": [
                    {"fc1": {"weight": torch.randn(3, 2)}},
                    {"fc1": {"weight": torch.randn(3, 2)}},
                ]
            },
            "decoder.out": torch.randn(4),  # a key that holds a dot itself
        },
        "optimizer": {
            "state": {3: {"exp_avg": torch.randn(3, 2), "step": torch.tensor(7.0)}},
            "param_groups": [{"lr": 0.1}],
        },
        "pair": (torch.zeros(2), [torch.ones(1)]),
        "epoch": 4,
    }
    path = save(tree, tmp_path / "m.pt", fmt)
    expected = flatten(torch.load(path, weights_only=True))
    with fastckpt.open(path, key="") as ckpt:
        assert sorted(ckpt.keys()) == sorted(expected)
        assert "model.encoder.layers.1.fc1.weight" in ckpt
        assert "optimizer.state.3.exp_avg" in ckpt
        assert "pair.1.0" in ckpt
        for name, ref in expected.items():
            same_tensor(ckpt.tensor(name), ref)
        paths = dict(zip(ckpt._indexes[0].names(), ckpt._indexes[0].paths(), strict=True))
        assert paths["model.decoder.out"] == ("model", "decoder.out")
        assert paths["optimizer.state.3.step"] == ("optimizer", "state", "3", "step")
        assert ckpt.metadata["epoch"] == 4
        assert ckpt.metadata["optimizer"]["param_groups"] == [{"lr": 0.1}]
        assert ckpt.metadata["model"]["decoder.out"] == {"__tensor__": "model.decoder.out"}
    # Default pick: the state dict under "model"; key= picks explicitly.
    with fastckpt.open(path) as ckpt:
        assert ckpt.prefix == ("model",)
        assert sorted(ckpt.keys()) == sorted(
            k.removeprefix("model.") for k in expected if k.startswith("model.")
        )
        assert sorted(ckpt.all_keys()) == sorted(expected)
    with fastckpt.open(path, key="optimizer.state") as ckpt:
        assert sorted(ckpt.keys()) == ["3.exp_avg", "3.step"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_parameter_and_bare_tensor_saved_directly(tmp_path, fmt):
    param = torch.nn.Parameter(torch.randn(4, 3))
    path = save(param, tmp_path / "p.pt", fmt)
    with fastckpt.open(path) as ckpt:
        assert ckpt.keys() == [""]
        same_tensor(ckpt.tensor(""), torch.load(path, weights_only=True).detach())
    path = save(torch.arange(5), tmp_path / "t.pt", fmt)
    with fastckpt.open(path) as ckpt:
        assert_same_bytes(ckpt.tensor(""), torch.arange(5))


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_state_dict_with_metadata(tmp_path, fmt):
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    )
    sd = model.state_dict()  # an OrderedDict with a _metadata attribute (BUILD)
    path = save({"state_dict": sd, "step": 10}, tmp_path / "m.pt", fmt)
    with fastckpt.open(path) as ckpt:
        assert ckpt.prefix == ("state_dict",)
        assert ckpt.keys() == list(sd)
        for name, ref in sd.items():
            same_tensor(ckpt.tensor(name), ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_module_pickle_names_tensors_like_state_dict(tmp_path, fmt):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    path = save(model, tmp_path / "m.pt", fmt)
    with fastckpt.open(path) as ckpt:
        assert sorted(ckpt.keys()) == sorted(model.state_dict())
        for name, ref in model.state_dict().items():
            same_tensor(ckpt.tensor(name), ref)
        assert ckpt.metadata["__root__"]["__object__"] == "torch.nn.modules.container.Sequential"


# -- foreign objects: placeholders, never calls -------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_fairseq_style_checkpoint_with_namespace(tmp_path, fmt):
    args = argparse.Namespace(
        arch="transformer", lr=[0.0005], dropout=0.1, share_all_embeddings=True
    )
    model = {"encoder.embed_tokens.weight": torch.randn(10, 4), "decoder.fc.bias": torch.randn(4)}
    ckpt_obj = {
        "args": args,
        "model": model,
        "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "num_updates": 12}],
        "extra_state": {"epoch": 3, "val_loss": 1.5},
    }
    path = save(ckpt_obj, tmp_path / "checkpoint_best.pt", fmt)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with fastckpt.open(path) as ckpt:
        assert ckpt.prefix == ("model",)
        assert sorted(ckpt.keys()) == sorted(model)
        for name, ref in model.items():
            same_tensor(ckpt.tensor(name), ref)
        meta = ckpt.metadata
    assert meta["args"]["__object__"] == "argparse.Namespace"
    assert meta["args"]["state"] == {
        "arch": "transformer",
        "lr": [0.0005],
        "dropout": 0.1,
        "share_all_embeddings": True,
    }
    assert meta["optimizer_history"] == [
        {"criterion_name": "CrossEntropyCriterion", "num_updates": 12}
    ]
    assert meta["extra_state"] == {"epoch": 3, "val_loss": 1.5}


class _RunsShell:
    """Pickles as a call of os.system: unpickling it with pickle.load would run the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _CallsTheResult:
    """A REDUCE whose callable is built by REDUCEs: getattr(import_module('os'), 'system')."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (_SystemFunction(), (self.command,))


class _OsModule:
    def __call__(self):  # the pickler only accepts callables as REDUCE targets
        raise AssertionError

    def __reduce__(self):
        return (importlib.import_module, ("os",))


class _SystemFunction:
    def __call__(self):
        raise AssertionError

    def __reduce__(self):
        return (getattr, (_OsModule(), "system"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload", [_RunsShell, _CallsTheResult])
def test_reduce_of_os_system_is_never_called(tmp_path, fmt, payload):
    sentinel = tmp_path / "pwned"
    path = save(
        {"weight": torch.ones(2), "evil": payload(f"touch {sentinel}")}, tmp_path / "evil.pt", fmt
    )
    # fastckpt refuses it, naming the global; nothing is ever called. (Other
    # unknown classes, e.g. argparse.Namespace, stay readable placeholders.)
    with pytest.raises(fastckpt.CheckpointError) as exc:
        fastckpt.open(path)
    assert not sentinel.exists()
    message = str(exc.value)
    assert str(path) in message
    assert re.search(
        r"refers to '(posix\.system|__builtin__\.getattr|importlib\.import_module)', which only "
        r"code-executing pickles use; refusing the file \(nothing was run\)",
        message,
    ), message
    # The file really is hostile: the standard unpickler (weights_only=False) runs it.
    torch.load(path, weights_only=False)
    assert sentinel.exists()


# -- torch-like files written by hand: root names, keys, locations, byteorder ------------


class _Storage:
    def __init__(self, cls, key: str, location: str, numel: int):
        self.pid = ("storage", cls, key, location, numel)


class _TensorRef:
    """Pickles like torch.save pickles a tensor, over a storage we name ourselves."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, torch.Size(size), stride, False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _TorchLikePickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Storage) else None


def write_torch_like_zip(
    path: Path,
    obj,
    records: dict[str, bytes],
    root: str = "my_model",
    byteorder: bytes | None = b"little",
    compress: bool = False,
) -> Path:
    buf = io.BytesIO()
    _TorchLikePickler(buf, protocol=2).dump(obj)
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(f"{root}/data.pkl", buf.getvalue(), compress_type=method)
        if byteorder is not None:
            z.writestr(f"{root}/byteorder", byteorder)
        for key, data in records.items():
            z.writestr(f"{root}/data/{key}", data, compress_type=method)
        z.writestr(f"{root}/version", b"3\n")
    return path


def test_root_folder_keys_and_locations_come_from_the_file(tmp_path):
    a = torch.arange(12, dtype=torch.float32)
    b = torch.arange(6, dtype=torch.int16)
    sa = _Storage(torch.FloatStorage, "w17", "cuda:0", 12)
    sb = _Storage(torch.ShortStorage, "x", "cuda:1", 6)
    obj = {
        "a": _TensorRef(sa, 2, (2, 5), (5, 1)),
        "b": _TensorRef(sb, 0, (6,), (1,)),
        "a2": _TensorRef(sa, 0, (3,), (4,)),
    }
    path = write_torch_like_zip(
        tmp_path / "m.pt",
        obj,
        {"w17": a.numpy().tobytes(), "x": b.numpy().tobytes()},
        byteorder=None,
    )
    ref = torch.load(path, weights_only=True, map_location="cpu")
    with fastckpt.open(path) as ckpt:
        assert sorted(ckpt.keys()) == ["a", "a2", "b"]
        for name in ref:
            same_tensor(ckpt.tensor(name), ref[name])
        assert ckpt.info("a").storage == "w17"
        assert ckpt.info("a").shares_storage_with == ("a2",)


def test_big_endian_files_are_refused(tmp_path):
    s = _Storage(torch.FloatStorage, "0", "cpu", 2)
    path = write_torch_like_zip(
        tmp_path / "m.pt", {"a": _TensorRef(s, 0, (2,), (1,))}, {"0": bytes(8)}, byteorder=b"big"
    )
    with pytest.raises(CheckpointError) as e:
        fastckpt.open(path)
    assert str(e.value) == (
        f"{path}: checkpoint was saved on a big-endian machine; "
        "only little-endian data is supported"
    )


def test_compressed_records_are_refused_by_name(tmp_path):
    s = _Storage(torch.FloatStorage, "0", "cpu", 2)
    path = write_torch_like_zip(
        tmp_path / "m.pt", {"a": _TensorRef(s, 0, (2,), (1,))}, {"0": bytes(8)}, compress=True
    )
    with pytest.raises(CheckpointError) as e:
        fastckpt.open(path)
    assert str(e.value) == (
        f"{path}: record 'my_model/data.pkl' is compressed (zip method 8); "
        "only stored records can be read in place"
    )


def test_missing_and_short_storage_records(tmp_path):
    s = _Storage(torch.FloatStorage, "0", "cpu", 4)
    obj = {"a": _TensorRef(s, 0, (4,), (1,))}
    path = write_torch_like_zip(tmp_path / "missing.pt", obj, {})
    with pytest.raises(CheckpointError) as e:
        fastckpt.open(path)
    assert (
        str(e.value)
        == f"{path}: record 'my_model/data/0' (storage '0') is missing from the archive"
    )
    path = write_torch_like_zip(tmp_path / "short.pt", obj, {"0": bytes(12)})
    with pytest.raises(CheckpointError) as e:
        fastckpt.open(path)
    assert str(e.value) == (
        f"{path}: record 'my_model/data/0' holds 12 bytes but its storage declares 16"
    )


def test_view_past_the_end_of_its_storage(tmp_path):
    s = _Storage(torch.FloatStorage, "0", "cpu", 4)
    path = write_torch_like_zip(
        tmp_path / "m.pt", {"a": _TensorRef(s, 2, (3,), (1,))}, {"0": bytes(16)}
    )
    with pytest.raises(CheckpointError) as e:
        fastckpt.open(path)
    assert str(e.value) == f"{path}: tensor 'a' reaches past the end of its storage '0' (16 bytes)"


def write_raw_pickle_zip(path: Path, pkl: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
    return path


def test_deep_nesting_is_a_limit_error_not_a_crash(tmp_path):
    depth = 200_000
    pkl = b"\x80\x02" + b"(" * depth + b")" + b"l" * depth + b"."
    path = write_raw_pickle_zip(tmp_path / "deep.pt", pkl)
    with pytest.raises(fastckpt.CheckpointError) as e:
        fastckpt.open(path, key="")
    assert type(e.value).__name__ == "LimitError"
    assert (
        str(e.value)
        == f"{path}: pickle containers nest deeper than 1000 levels (the nesting limit)"
    )


def test_cycles_are_shown_once(tmp_path):
    # l = []; l.append(l); {"loop": l, "w": tensor-free}
    pkl = b"\x80\x02}q\x00X\x04\x00\x00\x00loopq\x01]q\x02h\x02as."
    path = write_raw_pickle_zip(tmp_path / "cycle.pt", pkl)
    index = fastckpt._core.open_file(str(path))
    assert json.loads(index.metadata_json) == {"loop": [{"__cycle__": True}]}


@pytest.mark.parametrize(
    ("pkl", "message"),
    [
        (
            b"\x80\x02K\x01",
            "record 'archive/data.pkl' is truncated (ends inside the pickle, at byte 4)",
        ),
        (b"\x80\x02I1\n.", "record 'archive/data.pkl' at byte 2: unsupported pickle opcode 0x49"),
        (b"\x80\x02h\x05.", "record 'archive/data.pkl' at byte 2: memo index 5 was never stored"),
        (b"\x80\x020.", "record 'archive/data.pkl' at byte 2: pop from an empty stack"),
        (
            b"\x80\x02X\x02\x00\x00\x00\xff\xfe.",
            "record 'archive/data.pkl' at byte 2: string is not valid UTF-8",
        ),
        (
            b"\x80\x02(X\x07\x00\x00\x00storageq\x00tQ.",
            "record 'archive/data.pkl' at byte 18: storage persistent id has 1 fields",
        ),
    ],
    ids=["truncated", "protocol0", "bad-memo", "empty-stack", "bad-utf8", "bad-persid"],
)
def test_malformed_pickles(tmp_path, pkl, message):
    path = write_raw_pickle_zip(tmp_path / "bad.pt", pkl)
    with pytest.raises(CheckpointError) as e:
        fastckpt.open(path)
    assert str(e.value) == f"{path}: {message}"


# -- truncation -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_always_raise_checkpoint_error(tmp_path, fmt):
    sd = {"a": torch.randn(16, 8), "b": {"c": torch.arange(30)}, "n": 3, "s": "text"}
    path = save(sd, tmp_path / "full.pt", fmt)
    data = path.read_bytes()
    cut_path = tmp_path / "cut.pt"
    cuts = sorted(set(range(0, len(data), 37)) | set(range(max(0, len(data) - 64), len(data))))
    for cut in cuts:
        cut_path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            fastckpt.open(cut_path)
        assert str(e.value).startswith(f"{cut_path}: "), (cut, str(e.value))


def test_truncated_messages_say_what_is_missing(tmp_path):
    path = save({"a": torch.randn(64)}, tmp_path / "m.pt", "zip")
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError) as e:
        fastckpt.open(path)
    assert str(e.value) == (
        f"{path}: zip end of central directory record not found (truncated or not a zip file)"
    )
    legacy = save({"a": torch.randn(64)}, tmp_path / "l.pt", "legacy")
    data = legacy.read_bytes()
    legacy.write_bytes(data[:-10])
    with pytest.raises(CheckpointError) as e:
        fastckpt.open(legacy)
    assert "legacy storage" in str(e.value) and "lie outside the file" in str(e.value)


# -- property test ----------------------------------------------------------------

_dtypes = st.sampled_from(ALL_DTYPES)
_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
_keys = st.text(alphabet="abcxyz_", min_size=1, max_size=6)


def _tensors():
    return st.builds(
        lambda shape, dtype, seed: random_tensor(shape, dtype, seed),
        _shapes,
        _dtypes,
        st.integers(0, 99),
    )


def _trees():
    leaves = st.one_of(_tensors(), st.integers(-5, 5), st.none(), _keys)
    return st.recursive(
        leaves,
        lambda kids: st.one_of(
            st.dictionaries(_keys, kids, min_size=1, max_size=4),
            st.lists(kids, min_size=1, max_size=3),
            st.lists(kids, min_size=1, max_size=3).map(tuple),
        ),
        max_leaves=12,
    )


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=st.dictionaries(_keys, _trees(), min_size=1, max_size=4), fmt=st.sampled_from(FORMATS))
def test_random_trees_read_back_exactly(tmp_path, tree, fmt):
    path = save(tree, tmp_path / "h.pt", fmt)
    expected = flatten(tree)
    with fastckpt.open(path, key="") as ckpt:
        assert sorted(ckpt.keys()) == sorted(expected)
        for name, ref in expected.items():
            info = ckpt.info(name)
            assert info.shape == tuple(ref.shape) and info.dtype == ref.dtype
            assert_same_bytes(ckpt.tensor(name), ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupted_bytes_never_crash(tmp_path, fmt):
    """Random byte flips: the reader either reads something or raises CheckpointError."""
    import random

    sd = {"model": {"a": torch.randn(8, 4), "b": torch.arange(10)}, "args": argparse.Namespace(x=1)}
    data = bytearray(save(sd, tmp_path / "full.pt", fmt).read_bytes())
    rng = random.Random(1234)
    path = tmp_path / "bad.pt"
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        path.write_bytes(bytes(mutated))
        try:
            with fastckpt.open(path, key="") as ckpt:
                for name in ckpt.keys():
                    ckpt.tensor(name)
        except CheckpointError as e:
            assert str(e).startswith(f"{path}"), str(e)
