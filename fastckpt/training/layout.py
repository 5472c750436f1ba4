"""The folder ``fastckpt.save`` writes and ``fastckpt.resume`` reads, keyed by parameter *name*.

Layout written by ``save(path, ...)`` (a folder; no pickle anywhere)::

    path/fastckpt.json          manifest: format, model class, tied aliases, files
    path/model.safetensors      model state_dict; tied tensors stored once
                                (aliases in the manifest and the file's metadata)
    path/optimizer.safetensors  per-parameter optimizer state tensors
    path/optimizer.json         optimizer class, param_groups with parameter NAMES,
                                and per name: which state entries are tensors
                                (stored under "state.<name>.<key>") and which are
                                plain JSON values (python step counts etc.)
    path/extra.json             ``extra`` (anything JSON can hold)

The save is atomic as a whole: everything is written into a hidden temporary
folder beside ``path`` which is then renamed into place. If ``path`` already
holds a fastckpt save, it is renamed aside first and removed after the new one
is in place; a crash between those two renames leaves the old save intact as
``.<name>.old-*`` beside ``path`` (never a half-written one at ``path``).

``resume(path, model, optimizer)`` also reads Hugging Face Trainer folders
(``optimizer.pt`` beside ``model.safetensors`` / ``pytorch_model.bin``), whose
optimizer state is keyed by position only; see ``remap_optimizer_state``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from fastckpt.atomic import atomic_write

FORMAT = "fastckpt.train/1"
MANIFEST = "fastckpt.json"
MODEL_FILE = "model.safetensors"
OPT_TENSORS = "optimizer.safetensors"
OPT_JSON = "optimizer.json"
EXTRA_JSON = "extra.json"
TRAINER_OPTIMIZER = "optimizer.pt"

PathLike = str | os.PathLike

# A name-keyed optimizer state: {"state": {param name: {key: value}},
# "param_groups": [{..., "params": [param names]}]}.
NamedOptimizerState = dict[str, Any]


def write_json(path: Path, doc: Any) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(doc, indent=1, sort_keys=False).encode())


def to_json(value: Any, where: str) -> Any:
    """Plain JSON for numbers, strings, lists; tuples are tagged so they come back as tuples."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [to_json(v, where) for v in value]}
    if isinstance(value, list):
        return [to_json(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: to_json(v, where) for k, v in value.items()}
    raise TypeError(f"{where}: cannot store {type(value).__name__} value {value!r} as JSON")


def from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(from_json(v) for v in value["__tuple__"])
        return {k: from_json(v) for k, v in value.items()}
    return value


def param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name (the first name, for tied parameters)."""
    return {id(p): n for n, p in model.named_parameters()}
