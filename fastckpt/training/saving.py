"""``fastckpt.save``: model, name-keyed optimizer state and ``extra`` into one
folder, atomically (the layout: ``fastckpt.training.layout``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastckpt.atomic import atomic_folder
from fastckpt.planning.destinations import state_tensors, tie_groups
from fastckpt.source.safetensors_writer import TensorSpec, write_safetensors
from fastckpt.training.layout import (
    EXTRA_JSON,
    FORMAT,
    MANIFEST,
    MODEL_FILE,
    OPT_JSON,
    OPT_TENSORS,
    PathLike,
    param_names,
    to_json,
    write_json,
)


def _model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict tensors stored once each, and ``alias -> stored name`` for tied ones
    (one tensor object under several names: ``fastckpt.planning.destinations.tie_groups``)."""
    state = state_tensors(model)
    groups = tie_groups(list(state), list(state.values())) or [[n] for n in state]
    stored = {g[0]: state[g[0]].detach() for g in groups}
    aliases = {n: g[0] for g in groups for n in g[1:]}
    return stored, aliases


def _write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    write_safetensors(path, specs, lambda s: tensors[s.name], metadata)


def save(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: Any = None,
) -> Path:
    """Save model, optimizer state (keyed by parameter name) and ``extra`` into the folder ``path``.

    Atomic as a whole (see the module docstring). Returns the folder.
    """
    target = Path(path)
    if target.exists() and not (target / MANIFEST).is_file():
        raise FileExistsError(
            f"{target}: exists and is not a fastckpt save; refusing to replace it"
        )
    with atomic_folder(target) as tmp:
        tensors, aliases = _model_tensors(model)
        _write_tensors(
            tmp / MODEL_FILE, tensors, {"format": "pt", "fastckpt.aliases": json.dumps(aliases)}
        )
        files = [MODEL_FILE]
        if optimizer is not None:
            _save_optimizer(tmp, model, optimizer)
            files += [OPT_TENSORS, OPT_JSON]
        if extra is not None:
            write_json(tmp / EXTRA_JSON, to_json(extra, "extra"))
            files.append(EXTRA_JSON)
        write_json(
            tmp / MANIFEST,
            {
                "format": FORMAT,
                "model_class": type(model).__name__,
                "aliases": aliases,
                "files": files,
            },
        )
    return target


def _save_optimizer(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    names = param_names(model)
    sd = optimizer.state_dict()
    # state_dict() numbers parameters 0, 1, ... across the groups in order.
    position_names: list[str] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(
                    f"{folder}: the optimizer holds a parameter of shape {list(p.shape)} "
                    "that is not a parameter of the model"
                )
            position_names.append(names[id(p)])
    groups = []
    for group, sd_group in zip(optimizer.param_groups, sd["param_groups"], strict=True):
        g = {k: to_json(v, f"param group {k!r}") for k, v in sd_group.items() if k != "params"}
        g["params"] = [names[id(p)] for p in group["params"]]
        groups.append(g)
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for pos, entry in sd["state"].items():
        name = position_names[pos]
        record: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tkey = f"state.{name}.{key}"
                tensors[tkey] = value
                record[key] = {"tensor": tkey}
            else:
                record[key] = {"value": to_json(value, f"optimizer state {name}.{key}")}
        state[name] = record
    _write_tensors(folder / OPT_TENSORS, tensors, {"format": "pt"})
    write_json(
        folder / OPT_JSON,
        {"class": type(optimizer).__name__, "param_groups": groups, "state": state},
    )
