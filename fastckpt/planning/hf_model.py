"""What ``from_pretrained`` sets up in a transformers model beyond copying weights.

Non-persistent buffers: no checkpoint holds a non-persistent buffer (``rotary_emb.inv_freq``,
``embeddings.position_ids``): its values come from the model's code. A model built
on the meta device has none, and one built on meta and ``to_empty()``'d has
whatever the allocator left there, which runs without error and gives wrong
outputs. ``from_pretrained`` allocates these buffers and fills them with the
model's own ``_init_weights``; fastckpt does the same, guarding every other tensor
with transformers' ``_is_hf_initialized`` flag and checking, by each tensor's
version counter, that the buffers were written and nothing else was.

Recomputed parameters: a model may declare tensors that ``save_pretrained`` leaves
out (``_keys_to_ignore_on_save``: Marian's sinusoidal position tables) because
``from_pretrained`` recomputes them, with the same ``_init_weights``, as missing
keys. fastckpt fills them the same way, named in ``report.initialised``, instead
of calling them missing; on a meta model they are allocated on ``device`` first.

Ties: transformers declares which weights share a tensor (``all_tied_weights_keys``);
``model.to_empty()`` gives each its own tensor, and the checkpoint holds only one
of them. fastckpt does not re-tie a model behind its owner's back: the strict
error names the broken ties and says to call ``model.tie_weights()``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from fastckpt.errors import CheckpointError

_FLAG = "_is_hf_initialized"


def is_transformers_model(model: object) -> bool:
    """A ``transformers.PreTrainedModel``, without importing transformers for other models
    (nor hf_conversions: that is imported by the plan of a transformers model only)."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _can_initialise(model: nn.Module) -> bool:
    """A transformers model, and this transformers guards its init functions."""
    return (
        is_transformers_model(model)
        and importlib.util.find_spec("transformers.initialization") is not None
    )


def fillable(model: nn.Module, buffers: dict[str, tuple[nn.Module, str]]) -> list[str]:
    """The non-persistent buffers that transformers' initialisation gives values: plain
    tensors of a transformers model, when this transformers guards its init functions."""
    if not _can_initialise(model):
        return []
    return [
        name
        for name, (module, attr) in buffers.items()
        if type(module._buffers[attr]) is torch.Tensor
    ]


def recomputed(model: nn.Module, missing: list[str]) -> list[str]:
    """Of ``missing`` (tensors no checkpoint tensor fills), those the transformers model
    declares ``save_pretrained`` leaves out for ``from_pretrained`` to recompute."""
    if not missing or not _can_initialise(model):
        return []
    declared = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    return [n for n in missing if n in declared]


def _slot(module: nn.Module, attr: str) -> dict[str, torch.Tensor | None]:
    """The dict holding ``module.attr``: its parameters' or its buffers'."""
    return module._parameters if attr in module._parameters else module._buffers  # type: ignore[return-value]


def initialise(
    model: nn.Module,
    names: list[str],
    buffers: dict[str, tuple[nn.Module, str]],
    device: torch.device | None,
    path: object,
    dtype: torch.dtype | None = None,
) -> None:
    """Give the buffers ``names`` their values with the model's own ``_init_weights``,
    allocating those on meta on ``device`` first. They keep their dtype, as
    ``from_pretrained(dtype=...)`` leaves them (rotary frequencies stay fp32). A name
    not in ``buffers`` is a parameter transformers recomputes (``recomputed``): on meta, it
    is allocated in ``dtype`` (the load's ``dtype=``) when floating, as its neighbours are.

    Raises CheckpointError, with the meta tensors put back, if the initialisation
    leaves an allocated tensor unwritten or writes any other tensor."""
    from transformers import PreTrainedModel

    where = {n: buffers[n] if n in buffers else _owner(model, n) for n in names}
    fresh: dict[str, torch.Tensor] = {}
    for name in names:
        module, attr = where[name]
        slot = _slot(module, attr)
        old = slot[attr]
        assert old is not None
        if old.is_meta:
            assert device is not None, "the plan leaves meta tensors on meta without device="
            fresh[name] = old
            with torch.inference_mode(False):
                kind = old.dtype
                if name not in buffers and dtype is not None and kind.is_floating_point:
                    kind = dtype
                new = torch.empty(old.shape, dtype=kind, device=device)
                if isinstance(old, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=old.requires_grad)
                slot[attr] = new
    buffers = where
    held = {n: _buffer(*buffers[n]) for n in names}
    versions = {n: _version(t) for n, t in held.items()}
    # The buffers' names say where their modules are: no walk over the whole model.
    owners = {n.rpartition(".")[0]: buffers[n][0] for n in names}
    written_others: list[str] = []
    for prefix, module in owners.items():
        written_others += _run_init(model, prefix, module, held, PreTrainedModel)
    # A buffer an enclosing model fills (Falcon-H1's per-layer mup_vector, written by
    # the init of FalconH1Model): the init of each enclosing module, nearest first.
    # Only for tensors allocated here: a real buffer kept the values its constructor gave.
    done = set(owners)
    for name in fresh:
        parts = name.split(".")[:-2]
        for prefix in (".".join(parts[:i]) for i in range(len(parts), -1, -1)):
            if not _unwritten(held, versions, name):
                break
            if prefix not in done:
                done.add(prefix)
                module = model.get_submodule(prefix)
                written_others += _run_init(model, prefix, module, held, PreTrainedModel)
    unwritten = [n for n in held if _unwritten(held, versions, n)]
    unfilled = [n for n in unwritten if n in fresh]
    if unfilled or written_others:
        for name, old in fresh.items():
            module, attr = buffers[name]
            _slot(module, attr)[attr] = old
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


def _unwritten(held: dict[str, torch.Tensor], versions: dict[str, int | None], name: str) -> bool:
    return versions[name] is not None and _version(held[name]) == versions[name]


def _run_init(
    model: nn.Module, prefix: str, module: nn.Module, held: dict[str, torch.Tensor], base: type
) -> list[str]:
    """Run the ``_init_weights`` that applies to ``module`` on it, every tensor but ``held``
    guarded; the names of the other tensors it wrote all the same."""
    ids = {id(t) for t in held.values()}
    named: dict[str, torch.Tensor] = dict(module.named_buffers(remove_duplicate=False))
    named.update(module.named_parameters(remove_duplicate=False))
    others = {n: t for n, t in named.items() if id(t) not in ids}
    # a tensor still on meta (one the load allocates afterwards) holds nothing to spoil
    before = {n: _version(t) for n, t in others.items() if not t.is_meta}
    with (
        _flagged(list(others.values()), list(held.values())),
        _stand_ins(module, ids),
        torch.no_grad(),
    ):
        _init_for(model, prefix, base)(module)
    dot = prefix + "." if prefix else ""
    return [dot + n for n, v in before.items() if _version(others[n]) != v]


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
    t = _slot(module, attr)[attr]
    assert t is not None
    return t


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, attr = name.rpartition(".")
    return model.get_submodule(prefix), attr


def _version(t: torch.Tensor) -> int | None:
    """The tensor's version counter; None for inference tensors, which have none."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


@contextmanager
def _stand_ins(module: nn.Module, keep: set[int]) -> Iterator[None]:
    """Every tensor of ``module`` but those in ``keep`` (by id) replaced by a meta tensor
    while the initialisation runs: an init that ignores transformers' flag (a write through
    ``weight[padding_idx]``, a view the flag is not on) writes nowhere."""
    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    try:
        for sub in module.modules():
            slots: tuple[dict[str, Any], ...] = (sub._parameters, sub._buffers)
            for slot in slots:
                for attr, t in slot.items():
                    if t is None or id(t) in keep or t.is_meta:
                        continue
                    stand_in = torch.empty(t.shape, dtype=t.dtype, device="meta")
                    if isinstance(t, nn.Parameter):
                        stand_in = nn.Parameter(stand_in, requires_grad=t.requires_grad)
                    swapped.append((slot, attr, t))
                    slot[attr] = stand_in
        yield
    finally:
        for slot, attr, t in reversed(swapped):
            slot[attr] = t


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
