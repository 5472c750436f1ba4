"""A strided source read through the mapping while its file shrinks: CheckpointError, no SIGBUS."""

import os

import pytest
import torch
from torch import nn

import fastckpt


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("t", torch.zeros(512, 1024))


def test_strided_source_in_a_truncated_file_gives_checkpoint_error(tmp_path):
    path = tmp_path / "view.pt"
    # A transposed view is saved with its strides: the core gathers it from the mapping.
    torch.save({"t": torch.randn(1024, 512).t()}, path)
    ckpt = fastckpt.open(path)
    assert not ckpt.info("t").is_contiguous
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(
        fastckpt.CheckpointError,
        match=r"the file was truncated or rewritten while it was being read "
        r"\(part of it vanished\) \(while copying 't' -> 't'\)",
    ):
        fastckpt.load_into(Holder(), ckpt)
