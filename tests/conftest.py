"""Shared fixtures: tiny checkpoints written by the tests themselves (no network)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The servers of tests/test_remote*.py (moto is imported only when one is started).
from tests.remote_fixtures import http_server, s3, s3_server  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


def run_python(script: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh interpreter (from the repository root): a crash there,
    such as SIGBUS, shows as a negative return code instead of killing the test run."""
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous: a fixed or
    hashed port can collide with another run's and hang its ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


ALL_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]


@contextlib.contextmanager
def empty_weights():
    """Parameters on the meta device, buffers real: what accelerate.init_empty_weights() does."""
    from torch import nn

    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        p = module._parameters[name]
        if p is not None and not p.is_meta:  # a meta one is kept as it is: it may be tied
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bytes reinterpreted as `dtype` (so every bit pattern is exercised),
    NaN-free floats."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 4).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


def assert_same_bytes(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert tuple(a.shape) == tuple(b.shape), (a.shape, b.shape)
    if a.numel() == 0:
        return
    assert torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Two state dicts with the same names, shapes and bytes."""
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.equal(
            a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8)
        ), k


@pytest.fixture
def tmp_ckpt_dir(tmp_path):
    return tmp_path


def tiny_hf_config(cls_name: str = "BertConfig", **overrides):
    """A tiny transformers config (hidden 16, 2 layers of 2 heads, vocab 50); tests override
    what their story needs. One factory so the tiny models of the suite stay comparable."""
    import transformers

    fields = {
        "vocab_size": 50,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 20,
    }
    fields.update(overrides)
    return getattr(transformers, cls_name)(**fields)


def hf_folder(tmp_path: Path, cls_name: str, config_name: str, **config) -> Path:
    """A folder written by transformers' own ``save_pretrained`` from a tiny config
    (seed 0): the reference ``from_pretrained`` reads and the loads are compared with."""
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(tiny_hf_config(config_name, **config)).eval()
    folder = tmp_path / cls_name
    model.save_pretrained(folder)
    return folder


def hf_logits(model) -> torch.Tensor:
    """The model's logits (``prediction_logits`` for BERT pre-training) on five fixed
    tokens, in eval mode without grad: what a user compares after a load."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 5, 7, 3, 2]]))
    return out["prediction_logits"] if "prediction_logits" in out else out["logits"]


def tf_names(state: dict, prefix: str = "") -> dict:
    """``state`` under old TF-converted names (LayerNorm.gamma / .beta), each key prefixed."""

    def tf(k: str) -> str:
        return k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        )

    return {prefix + tf(k): v for k, v in state.items()}
