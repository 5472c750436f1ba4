"""The model side of a load: which tensors it has, which are tied, and which fastckpt may write.

A destination is one of a few kinds, and nothing else is ever written through:

- a plain CPU or CUDA tensor (``torch.Tensor`` or ``nn.Parameter``, strided, not
  quantized, no conjugate/negative view bit): its memory is exactly what
  ``data_ptr``, ``shape`` and ``stride`` say;
- a tensor on the meta device, allocated on ``device=`` and then assigned;
- anything else (tensor subclasses such as DTensor, FakeTensor or a wrapper with
  ``__torch_dispatch__``, quantized or sparse tensors, lazy parameters) is
  refused by name before a byte is written (``refusal``).

A tie is one tensor object under several names (``load_state_dict``'s view: a
tied head and embedding are the same ``Parameter``). That is the one definition
used by loading, diff and resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import fastckpt._core as _core

# Exactly these classes describe their memory by data_ptr/shape/stride; a subclass
# may not (a wrapper subclass's data_ptr is not where its values live).
_PLAIN_TYPES = frozenset({torch.Tensor, nn.Parameter})

_BASE_SAVE = nn.Module._save_to_state_dict
_BASE_EXTRA_STATE = nn.Module.get_extra_state


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model.state_dict(keep_vars=True)``, built without its call chain.

    The fast walk (in C, ``_core.state_tensors``) reads ``_parameters`` and
    persistent ``_buffers`` directly, in state_dict's order (a module's own
    tensors, then its children depth first, shared submodules visited each
    time). It is only taken when no module could make state_dict differ: a
    custom ``_save_to_state_dict``, extra state or a state_dict hook sends the
    whole model through ``state_dict()`` instead (and its non-tensor entries,
    such as extra state, are dropped). A tree of 41k modules: 130-200 ms through
    ``state_dict()``, ~42 ms as a Python loop, 30-40 ms in C (bound by memory
    latency: every module's dicts are read once).
    """
    walked: dict[str, torch.Tensor] | None = _core.state_tensors(
        model, _BASE_SAVE, _BASE_EXTRA_STATE
    )
    if walked is not None:
        return walked
    full = model.state_dict(keep_vars=True)
    return {k: v for k, v in full.items() if isinstance(v, torch.Tensor)}


@dataclass
class ModelTensors:
    """A model's state tensors, with ties folded.

    ``tensors[g]`` is one distinct tensor object; ``groups`` is None when nothing
    is tied (then group g is the single name ``names[g]``), else ``groups[g]``
    lists every name of tensor g in state_dict order.
    """

    state: dict[str, torch.Tensor]
    names: list[str]
    tensors: list[torch.Tensor]
    groups: list[list[str]] | None

    @classmethod
    def of(cls, model: nn.Module) -> ModelTensors:
        state = state_tensors(model)
        names = list(state)
        tensors = list(state.values())
        groups = tie_groups(names, tensors)
        if groups is not None:
            tensors = [state[g[0]] for g in groups]
        return cls(state, names, tensors, groups)

    def group(self, g: int) -> list[str]:
        return [self.names[g]] if self.groups is None else self.groups[g]

    def all_names(self) -> list[str]:
        return self.names if self.groups is None else [n for g in self.groups for n in g]


def tie_groups(names: list[str], tensors: list[torch.Tensor]) -> list[list[str]] | None:
    """Names grouped by tensor object (first-seen order), or None when all are distinct."""
    if _core.all_distinct(tensors):
        return None
    first: dict[int, int] = {}
    groups: list[list[str]] = []
    for n, v in zip(names, tensors, strict=True):
        g = first.setdefault(id(v), len(groups))
        if g == len(groups):
            groups.append([n])
        else:
            groups[g].append(n)
    return groups


def all_plain(tensors: list[torch.Tensor]) -> bool:
    return set(map(type, tensors)) <= _PLAIN_TYPES


def refusal(name: str, t: torch.Tensor) -> str | None:
    """Why fastckpt must not write into ``t`` (None when it may), naming it and its type."""
    kind = type(t)
    if kind not in _PLAIN_TYPES:
        what = f"{kind.__module__}.{kind.__qualname__}"
        if kind.__name__ == "DTensor":
            how = "a sharded DTensor whose mesh or placements fastckpt cannot map"
        elif isinstance(t, (nn.UninitializedParameter, nn.UninitializedBuffer)):
            how = "an uninitialised lazy parameter (run one forward pass first)"
        else:
            how = "a tensor subclass: its data_ptr need not be where its values live"
        return f"the model's {name!r} is a {what} ({how}); fastckpt writes plain tensors only"
    if t.layout != torch.strided:
        return (
            f"the model's {name!r} is a {t.layout} tensor and cannot be loaded into "
            "(it has no strided memory); fastckpt writes dense (strided) tensors"
        )
    if t.is_quantized:
        return f"the model's {name!r} is a quantized tensor ({t.dtype}); fastckpt cannot write it"
    if t.is_conj() or t.is_neg():
        return (
            f"the model's {name!r} is a conjugate or negated view; its memory does not hold "
            "its values as they read (call .resolve_conj() / .resolve_neg() first)"
        )
    return None


def same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        # Index 0 is an index: only a missing one means the current device.
        here = torch.cuda.current_device()
        return (here if a.index is None else a.index) == (here if b.index is None else b.index)
    return True


def owners(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """state_dict name -> (module, attribute, is a parameter)."""
    out: dict[str, tuple[nn.Module, str, bool]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for name, p in module._parameters.items():
            if p is not None:
                out[dot + name] = (module, name, True)
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set:
                out[dot + name] = (module, name, False)
    return out


def non_persistent_buffers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Buffers no state dict holds (``persistent=False``): name -> (module, attribute)."""
    out: dict[str, tuple[nn.Module, str]] = {}
    for prefix, module in model.named_modules():
        hidden = module._non_persistent_buffers_set
        if not hidden:
            continue
        dot = prefix + "." if prefix else ""
        for name in hidden:
            if module._buffers.get(name) is not None:
                out[dot + name] = (module, name)
    return out


def assign(
    names: list[str],
    old: torch.Tensor,
    tensor: torch.Tensor,
    where: dict[str, tuple[nn.Module, str, bool]],
) -> None:
    """Put a new tensor under every name of a (possibly tied) target, like assign=True."""
    value: torch.Tensor
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        value = tensor
    for name in names:
        module, attr, is_param = where[name]
        if is_param:
            module._parameters[attr] = value  # type: ignore[assignment]
        else:
            module._buffers[attr] = value
