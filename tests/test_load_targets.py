"""load_into's destinations are exactly model.state_dict(keep_vars=True), whatever the model."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from fastckpt.load.execute import _state_tensors


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("kept", torch.ones(2))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.register_buffer("empty", None)
        self.register_parameter("absent", None)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)
        self.b = self.a  # one submodule under two names: state_dict lists both


class ExtraState(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def get_extra_state(self):
        return {"step": 1}

    def set_extra_state(self, state):
        pass


def hooked() -> nn.Module:
    m = nn.Sequential(nn.Linear(2, 2))
    def drop_bias(module, state_dict, prefix, local_metadata):
        del state_dict[prefix + "0.bias"]

    m._register_state_dict_hook(drop_bias)
    return m


class CustomSave(nn.Linear):
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "w_renamed"] = self.weight if keep_vars else self.weight.detach()


def child_pre_hook() -> nn.Module:
    m = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 1)))
    m[1].register_state_dict_pre_hook(lambda module, prefix, keep_vars: None)
    return m


def with_holes() -> nn.Module:
    m = nn.Sequential(nn.Linear(2, 2))
    m.register_module("gone", None)  # a child slot holding None
    m.add_module("deep", nn.Sequential(nn.Sequential(nn.Linear(1, 1))))
    return m


def scripted() -> nn.Module:
    # A ScriptModule keeps its tensors in wrappers, not dicts: the walk falls back.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated
        return torch.jit.script(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def tiny_bert() -> nn.Module:
    from transformers import BertModel

    from tests.conftest import tiny_hf_config

    return BertModel(tiny_hf_config())


@pytest.mark.parametrize(
    "make",
    [
        WithBuffers,
        Shared,
        ExtraState,
        hooked,
        lambda: nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)),
        lambda: nn.Sequential(nn.Linear(2, 2), CustomSave(2, 2)),
        child_pre_hook,
        with_holes,
        tiny_bert,
        scripted,
    ],
    ids=[
        "buffers",
        "shared-submodule",
        "extra-state",
        "state-dict-hook",
        "batchnorm",
        "child-custom-save",
        "child-pre-hook",
        "none-children-and-depth",
        "tiny-bert",
        "script-module",
    ],
)
def test_destinations_equal_state_dict(make):
    model = make()
    full = model.state_dict(keep_vars=True)
    # The destinations are state_dict's tensors (extra state is not one), in its order.
    expected = {k: v for k, v in full.items() if isinstance(v, torch.Tensor)}
    got = _state_tensors(model)
    assert list(got) == list(expected)
    for k, v in expected.items():  # the very tensor objects
        assert got[k] is v
