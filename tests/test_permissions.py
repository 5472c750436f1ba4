"""Files and folders fastckpt writes get the modes ``open()`` / ``mkdir`` would give
under the process umask (0644 / 0755 under 022), and are still written atomically."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fastckpt
from fastckpt.atomic import atomic_folder, atomic_write, current_umask
from fastckpt.tools.convert import convert


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def modes_under(folder) -> dict[str, int]:
    return {p.name: mode(p) for p in folder.iterdir()}


@pytest.fixture
def hf_folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_file(
        {f"layer.{i}.weight": torch.randn(8, 8) for i in range(4)}, str(src / "model.safetensors")
    )
    (src / "config.json").write_text("{}")
    os.chmod(src / "config.json", 0o600)  # the copy gets the umask's mode, not the source's
    return src


@pytest.mark.parametrize(
    "mask, file, folder",
    [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o027, 0o640, 0o750), (0o002, 0o664, 0o775)],
)
def test_convert_and_save_follow_the_umask(tmp_path, hf_folder, mask, file, folder):
    with umask(mask):
        assert current_umask() == mask
        single = tmp_path / "one.safetensors"
        convert(hf_folder, single)
        sharded = tmp_path / "sharded"
        convert(hf_folder, sharded, max_shard_size="300B")
        nested = tmp_path / "a" / "b" / "c.safetensors"  # parents made as mkdir -p would
        convert(hf_folder, nested)
        model = nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters())
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        saved = fastckpt.save(tmp_path / "save", model, opt, extra={"step": 1})
    assert mode(single) == file
    assert mode(sharded) == folder and mode(saved) == folder
    assert mode(tmp_path / "a") == folder and mode(tmp_path / "a" / "b") == folder
    assert mode(nested) == file
    inside = modes_under(sharded)
    assert set(inside) == {
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
        "model.safetensors.index.json",
        "config.json",
    }
    assert set(inside.values()) == {file}
    assert set(modes_under(saved).values()) == {file} and len(modes_under(saved)) == 5
    # nothing left behind: no temporary or aside folders
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a",
        "one.safetensors",
        "save",
        "sharded",
        "src",
    ]


def test_replacing_keeps_modes_and_leaves_nothing_behind(tmp_path, hf_folder):
    with umask(0o022):
        dst = tmp_path / "out"
        convert(hf_folder, dst)
        convert(hf_folder, dst, max_shard_size="300B", overwrite=True)
        model = nn.Linear(3, 2)
        fastckpt.save(tmp_path / "save", model)
        fastckpt.save(tmp_path / "save", model)
    assert mode(dst) == 0o755 and set(modes_under(dst).values()) == {0o644}
    assert "model.safetensors.index.json" in modes_under(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "save", "src"]


def test_atomic_write_failure_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"new, half")
        raise RuntimeError("crash")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


def test_atomic_folder_failure_leaves_the_old_folder(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "keep").write_text("new")
        raise RuntimeError("crash")
    assert (target / "keep").read_text() == "old" and os.listdir(tmp_path) == ["d"]
    with atomic_folder(target) as tmp:
        (tmp / "new").write_text("new")
    assert os.listdir(target) == ["new"] and os.listdir(tmp_path) == ["d"]


@pytest.mark.parametrize("mask, want", [("022", "-rw-r--r--"), ("077", "-rw-------")])
def test_ls_l_after_the_cli_convert(tmp_path, hf_folder, mask, want):
    exe = os.path.join(os.path.dirname(sys.executable), "fastckpt")
    out = tmp_path / "out"
    listing = subprocess.run(
        f"umask {mask} && {exe} convert {hf_folder} {out} --max-shard-size 300B >/dev/null "
        f"&& ls -l {out} && ls -ld {out}",
        shell=True,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    files = [ln for ln in listing if ln.startswith("-")]
    assert len(files) == 6 and all(ln.split()[0] == want for ln in files)
    dir_mode = listing[-1].split()[0]
    assert dir_mode == ("drwxr-xr-x" if mask == "022" else "drwx------")
    back = load_file(str(out / "model-00001-of-00004.safetensors"))
    assert_equal = torch.equal(
        back["layer.0.weight"].view(torch.uint8),
        load_file(str(hf_folder / "model.safetensors"))["layer.0.weight"].view(torch.uint8),
    )
    assert assert_equal
