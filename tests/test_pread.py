"""read="pread": parallel preads into memory instead of a mapping (network filesystems)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastckpt
from fastckpt.load import pread_files

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:50 / /mnt/models rw,relatime shared:20 - nfs4 srv:/export rw,vers=4.2
41 22 0:51 / /mnt/lus rw - lustre 10.0.0.1@tcp:/fs rw
42 22 0:52 / /mnt/my\\040fuse rw - fuse.s3fs s3fs rw
43 40 0:53 / /mnt/models/local rw - ext4 /dev/sdb1 rw
"""


def test_filesystem_types_from_mountinfo():
    table = pread_files.mounts(MOUNTINFO)
    assert ("/mnt/my fuse", "fuse.s3fs") in table
    assert pread_files.filesystem_type("/mnt/models/a/b.safetensors", table) == "nfs4"
    assert pread_files.on_network_fs("/mnt/models/x", table)
    assert pread_files.on_network_fs("/mnt/lus/x", table)
    assert pread_files.on_network_fs("/mnt/my fuse/x", table)
    assert not pread_files.on_network_fs("/mnt/models/local/x", table)  # the deeper mount
    assert not pread_files.on_network_fs("/home/x", table)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(3000, 128)
        self.fc = nn.Linear(128, 1024)


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_file(dict(Net().state_dict()), str(path))
    return path


def test_pread_matches_a_mapped_load(ckpt):
    a, b = Net(), Net()
    fastckpt.load_into(a, ckpt)
    report = fastckpt.load_into(b, ckpt, read="pread", max_host_bytes=1 << 20)  # several windows
    for k, v in a.state_dict().items():
        assert torch.equal(v.view(torch.uint8), b.state_dict()[k].view(torch.uint8)), k
    assert report.fetched == sum(v.numel() * v.element_size() for v in a.state_dict().values())


def test_network_filesystem_picks_pread_by_itself(ckpt, monkeypatch):
    monkeypatch.setattr(pread_files, "mounts", lambda text=None: [("/", "nfs4")])
    a, b = Net(), Net()
    fastckpt.load_into(a, ckpt, read="pread")
    report = fastckpt.load_into(b, ckpt)
    assert report.fetched > 0  # read by preads, not through the mapping
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_pread_refuses_what_cannot_go_together(ckpt):
    with pytest.raises(ValueError, match="pread"):
        fastckpt.load_into(Net(), ckpt, read="pread", mmap=True)


@pytest.fixture
def fuse_mount(tmp_path):
    """A real FUSE mount (bindfs, from Debian: .ci/run installs it) of a folder of tmp_path."""
    import shutil
    import subprocess

    if shutil.which("bindfs") is None or shutil.which("fusermount") is None:
        pytest.skip("needs bindfs and fusermount (Debian's bindfs package)")
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    done = subprocess.run(["bindfs", str(src), str(mnt)], capture_output=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount FUSE here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield src, mnt
    finally:
        subprocess.run(["fusermount", "-u", str(mnt)], capture_output=True, timeout=30)


def test_a_checkpoint_on_a_fuse_mount_is_read_with_preads(fuse_mount, ckpt):
    src, mnt = fuse_mount
    (src / ckpt.name).write_bytes(ckpt.read_bytes())
    assert pread_files.filesystem_type(mnt / ckpt.name).startswith("fuse")
    a, b = Net(), Net()
    fastckpt.load_into(a, ckpt)
    report = fastckpt.load_into(b, mnt / ckpt.name, max_host_bytes=1 << 20)
    assert report.fetched == sum(v.numel() * v.element_size() for v in a.state_dict().values())
    for k, v in a.state_dict().items():
        assert torch.equal(v.view(torch.uint8), b.state_dict()[k].view(torch.uint8)), k


def test_pread_of_a_transposed_view_matches_the_mapped_load(tmp_path):
    # Its storage is read whole but its elements are not in the destination's order: it
    # goes through the memory file and the engine, not straight into the parameter.
    torch.manual_seed(5)
    w = torch.randn(300, 400)
    path = tmp_path / "t.pt"
    torch.save({"lin.weight": w.t(), "lin.bias": torch.randn(400)}, path)
    a, b = nn.Module(), nn.Module()
    a.lin, b.lin = nn.Linear(300, 400), nn.Linear(300, 400)
    fastckpt.load_into(a, path)
    fastckpt.load_into(b, path, read="pread")
    for k, v in a.state_dict().items():
        assert torch.equal(v.view(torch.uint8), b.state_dict()[k].view(torch.uint8)), k
    assert torch.equal(b.lin.weight, w.t())
