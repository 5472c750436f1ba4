"""Optimizer state from a torch.distributed.checkpoint directory, by parameter name.

``dcp.save({"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)})``
stores the optimizer state keyed by FQN: per parameter, ``optim/state/<fqn>/<key>``
tensors (``exp_avg``, ``exp_avg_sq`` chunked like the parameter; Adam's ``step`` a 0-d
tensor stored once) and ``optim/param_groups/<i>/<key>`` values (small pickles;
``params`` lists the FQNs). Paths come from ``planner_data``, never from splitting a
dotted name: FQNs hold dots.

Keyed by name already, it goes through ``apply_named_state`` as a ``save`` folder's state
does. What differs is when tensors are read: the state is first described with meta
tensors of the saved shapes and dtypes (all ``apply_named_state`` checks), so that a
refused resume reads nothing; once it goes ahead, ``read`` fetches only the state of the
parameters that are restored, through ``load_into``, into tensors made like the
parameters now. A DTensor parameter's moments are DTensors of its mesh and placements,
so each rank reads only the chunks of its own shard, whatever topology saved them.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastckpt.errors import CheckpointError, UninitializedWarning
from fastckpt.planning.mapping import Assignment, MappingPlan
from fastckpt.training.layout import NamedOptimizerState
from fastckpt.training.optimizer_state import renamed_state, rule_renames


@dataclass(frozen=True)
class _Pairs:
    """Rules for ``load_into``: exactly these (target -> checkpoint name) copies."""

    pairs: Mapping[str, str]

    def plan(self, source_keys: Sequence[str], target_keys: Sequence[str] | None) -> MappingPlan:
        return MappingPlan(assignments=[Assignment(t, s) for t, s in self.pairs.items()])


def optimizer_prefix(ckpt: Any) -> tuple[str, ...]:
    """Where the optimizer state dict sits in the saved state dict: the one path whose
    ``param_groups/<i>/params`` lists are stored."""
    found = {
        p[:-3] for p in ckpt.value_paths() if len(p) >= 3 and p[-3] == "param_groups"
        and p[-1] == "params"
    }  # fmt: skip
    if not found:
        raise CheckpointError(
            f"{ckpt.path}: no optimizer state (no param_groups with a params list), "
            "as get_optimizer_state_dict writes it"
        )
    if len(found) > 1:
        where = ", ".join(sorted("/".join(p) or "(top level)" for p in found))
        raise CheckpointError(f"{ckpt.path}: more than one optimizer state: {where}")
    return found.pop()


@dataclass
class DcpOptimizerState:
    """The named optimizer state of a DCP directory; tensors are meta placeholders until
    ``read``."""

    ckpt: Any  # DcpCheckpoint opened with key="" (names are the dotted saved paths)
    named: NamedOptimizerState
    # current parameter name -> {state key: checkpoint name} of its state tensors
    sources: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def describe(cls, ckpt: Any, model: nn.Module, rules: Any = None) -> DcpOptimizerState:
        """The state of ``ckpt``, its saved names turned into the model's by ``rules``."""
        prefix = optimizer_prefix(ckpt)
        n = len(prefix)
        groups: dict[int, dict[str, Any]] = {}
        state: dict[str, dict[str, Any]] = {}
        sources: dict[str, dict[str, str]] = {}
        for path in ckpt.value_paths():
            if path[:n] != prefix or len(path) != n + 3:
                continue
            kind, middle, key = path[n:]
            if kind == "param_groups":
                groups.setdefault(_index(ckpt, path, middle), {})[key] = ckpt.value_at(path)
            elif kind == "state":
                state.setdefault(middle, {})[key] = ckpt.value_at(path)
        for path in ckpt.tensor_paths():
            if path[:n] != prefix or len(path) != n + 3:
                continue
            kind, middle, key = path[n:]
            name = ".".join(path)
            if kind == "param_groups":  # a tensor hyperparameter (lr as a tensor): small
                groups.setdefault(_index(ckpt, path, middle), {})[key] = ckpt.tensor(name).clone()
            elif kind == "state":
                info = ckpt.info(name)
                state.setdefault(middle, {})[key] = torch.empty(
                    info.shape, dtype=info.dtype, device="meta"
                )
                sources.setdefault(middle, {})[key] = name
        if sorted(groups) != list(range(len(groups))):
            raise CheckpointError(f"{ckpt.path}: param groups {sorted(groups)} are not 0..N-1")
        param_groups = [groups[i] for i in range(len(groups))]
        for i, group in enumerate(param_groups):
            params = group.get("params")
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                raise CheckpointError(
                    f"{ckpt.path}: param group {i}'s params is not a list of names: {params!r}"
                )
        named = {"state": state, "param_groups": param_groups, "class": None}
        notes: list[str] = []
        if rules is not None:
            saved = [p for g in param_groups for p in g["params"]]
            renames, notes = rule_renames(saved, model, rules)
            named = renamed_state(named, renames)
            sources = {renames.get(k, k): v for k, v in sources.items()}
        return cls(ckpt, named, sources, notes)

    def read(self, model: nn.Module, restored: Sequence[str]) -> int:
        """Fill the state tensors of the ``restored`` parameters, in place in ``named``.
        A tensor of the parameter's shape is made like the parameter (a DTensor: its local
        shard, so this rank reads only those bytes); others (0-d ``step``) are plain CPU
        tensors. Every rank of a sharded model calls this together (``load_into``).
        Returns the bytes this rank read."""
        from fastckpt.load.execute import load_into

        params = dict(model.named_parameters(remove_duplicate=False))
        holder = nn.Module()
        pairs: dict[str, str] = {}
        for i, name in enumerate(restored):
            entry = self.named["state"][name]
            slot = nn.Module()
            # Buffers are named k0, k1...: a state key need not be a valid attribute name.
            for j, (key, source) in enumerate(self.sources.get(name, {}).items()):
                meta, param = entry[key], params[name]
                if meta.dim() > 0 and meta.shape == param.shape:
                    dest = torch.empty_like(param, dtype=meta.dtype, requires_grad=False)
                else:
                    dest = torch.empty(meta.shape, dtype=meta.dtype)
                slot.register_buffer(f"k{j}", dest)
                pairs[f"p{i}.k{j}"] = source
                entry[key] = dest
            holder.add_module(f"p{i}", slot)
        if not pairs:
            return 0
        with warnings.catch_warnings():  # every pair has its source: nothing stays unloaded
            warnings.simplefilter("ignore", UninitializedWarning)
            return load_into(holder, self.ckpt, _Pairs(pairs), strict=False).bytes


def _index(ckpt: Any, path: tuple[str, ...], text: str) -> int:
    if not text.isdigit():
        raise CheckpointError(f"{ckpt.path}: {'/'.join(path)}: param_groups is not a list")
    return int(text)
