"""What ``from_pretrained`` sets up in a transformers model beyond copying weights.

Non-persistent buffers: no checkpoint holds a non-persistent buffer (``rotary_emb.inv_freq``,
``embeddings.position_ids``): its values come from the model's code. A model built
on the meta device has none, and one built on meta and ``to_empty()``'d has
whatever the allocator left there, which runs without error and gives wrong
outputs. ``from_pretrained`` allocates these buffers and fills them with the
model's own ``_init_weights``; fastckpt does the same, guarding every other tensor
with transformers' ``_is_hf_initialized`` flag and checking, by each tensor's
version counter, that the buffers were written and nothing else was.

Ties: transformers declares which weights share a tensor (``all_tied_weights_keys``);
``model.to_empty()`` gives each its own tensor, and the checkpoint holds only one
of them. fastckpt does not re-tie a model behind its owner's back: the strict
error names the broken ties and says to call ``model.tie_weights()``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

import torch
from torch import nn

from fastckpt.errors import CheckpointError
from fastckpt.planning.hf_conversions import is_transformers_model

_FLAG = "_is_hf_initialized"


def fillable(model: nn.Module, buffers: dict[str, tuple[nn.Module, str]]) -> list[str]:
    """The non-persistent buffers that transformers' initialisation gives values: plain
    tensors of a transformers model, when this transformers guards its init functions."""
    if (
        not is_transformers_model(model)
        or importlib.util.find_spec("transformers.initialization") is None
    ):
        return []
    return [
        name
        for name, (module, attr) in buffers.items()
        if type(module._buffers[attr]) is torch.Tensor
    ]


def initialise(
    model: nn.Module,
    names: list[str],
    buffers: dict[str, tuple[nn.Module, str]],
    device: torch.device | None,
    path: object,
) -> None:
    """Give the buffers ``names`` their values with the model's own ``_init_weights``,
    allocating those on meta on ``device`` first. They keep their dtype, as
    ``from_pretrained(dtype=...)`` leaves them (rotary frequencies stay fp32).

    Raises CheckpointError, with the meta buffers put back, if the initialisation
    leaves an allocated buffer unwritten or writes any other tensor."""
    from transformers import PreTrainedModel

    fresh: dict[str, torch.Tensor] = {}
    for name in names:
        module, attr = buffers[name]
        old = module._buffers[attr]
        assert old is not None
        if old.is_meta:
            assert device is not None, "the plan leaves meta buffers on meta without device="
            fresh[name] = old
            with torch.inference_mode(False):
                module._buffers[attr] = torch.empty(old.shape, dtype=old.dtype, device=device)
    held = {n: _buffer(*buffers[n]) for n in names}
    ids = {id(t) for t in held.values()}
    versions = {n: _version(t) for n, t in held.items()}
    # The buffers' names say where their modules are: no walk over the whole model.
    owners = {n.rpartition(".")[0]: buffers[n][0] for n in names}
    written_others: list[str] = []
    for prefix, module in owners.items():
        named: dict[str, torch.Tensor] = dict(module.named_buffers(remove_duplicate=False))
        named.update(module.named_parameters(remove_duplicate=False))
        others = {n: t for n, t in named.items() if id(t) not in ids}
        before = {n: _version(t) for n, t in others.items()}
        with _flagged(list(others.values()), list(held.values())), torch.no_grad():
            _init_for(model, prefix, PreTrainedModel)(module)
        dot = prefix + "." if prefix else ""
        written_others += [dot + n for n, t in others.items() if _version(t) != before[n]]
    unwritten = [
        n for n, t in held.items() if versions[n] is not None and _version(t) == versions[n]
    ]
    unfilled = [n for n in unwritten if n in fresh]
    if unfilled or written_others:
        for name, old in fresh.items():
            module, attr = buffers[name]
            module._buffers[attr] = old
        cls = type(model).__name__
        if written_others:
            raise CheckpointError(
                f"{path}: {cls}'s _init_weights, run to give its non-persistent buffers values as "
                f"from_pretrained does, also wrote {', '.join(sorted(written_others))}; "
                "nothing was loaded"
            )
        raise CheckpointError(
            f"{path}: {cls}'s _init_weights gives no values to the non-persistent buffers "
            f"{', '.join(unfilled)}, which no checkpoint holds; nothing was loaded. Build the "
            "model so that buffers are real tensors (accelerate.init_empty_weights() puts only "
            "parameters on meta)"
        )


def _init_for(model: nn.Module, prefix: str, base: type) -> Callable[[nn.Module], None]:
    """The ``_init_weights`` of the innermost transformers model on the way to the module
    at ``prefix``, as ``initialize_weights`` dispatches for composite models."""
    init = model._init_weights
    node = model
    for part in prefix.split(".") if prefix else ():
        node = node.get_submodule(part)
        if isinstance(node, base):
            init = node._init_weights
    return cast(Callable[[nn.Module], None], init)


def _buffer(module: nn.Module, attr: str) -> torch.Tensor:
    t = module._buffers[attr]
    assert t is not None
    return t


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter; None for inference tensors, which have none."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


@contextmanager
def _flagged(guarded: list[torch.Tensor], open_: list[torch.Tensor]) -> Iterator[None]:
    """transformers' init functions skip tensors flagged initialised: flag ``guarded``,
    unflag ``open_``, run under transformers' guard, and put every flag back after."""
    from transformers.initialization import guard_torch_init_functions

    saved = [(t, t.__dict__.get(_FLAG, _FLAG)) for t in guarded + open_]
    for t in guarded:
        setattr(t, _FLAG, True)
    for t in open_:
        t.__dict__.pop(_FLAG, None)
    try:
        with guard_torch_init_functions():
            yield
    finally:
        for t, was in saved:
            if was is _FLAG:
                t.__dict__.pop(_FLAG, None)
            else:
                setattr(t, _FLAG, was)


def broken_ties(model: nn.Module, missing: list[str]) -> list[tuple[str, str]]:
    """(name, the name transformers ties it to) for each missing name that the model
    declares tied to a tensor the checkpoint fills: a tie ``to_empty()`` broke."""
    if not is_transformers_model(model):
        return []
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    gone = set(missing)
    return [
        (name, str(declared[name]))
        for name in missing
        if name in declared and str(declared[name]) not in gone
    ]
