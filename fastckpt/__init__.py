"""fastckpt: stream PyTorch checkpoints straight into a built model."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastckpt.errors import CheckpointError, LimitError, StrictLoadError, UninitializedWarning
from fastckpt.load.execute import load_into
from fastckpt.planning.load_plan import LoadPlan, PlanEntry, plan
from fastckpt.planning.rules import Rules, as_rules
from fastckpt.report import LoadReport, SharedReads
from fastckpt.source.checkpoint import Checkpoint, TensorInfo, open
from fastckpt.version import __version__ as __version__

if TYPE_CHECKING:
    from fastckpt.tools.diff import DiffReport, diff
    from fastckpt.training import FreezeSummary, ResumeReport, freeze, resume, save

# Imported on first use, so that `import fastckpt` in a script that only loads costs
# what loading needs (tests/test_import_time.py): diff and the training helpers.
_LAZY = {
    "DiffReport": "fastckpt.tools.diff",
    "diff": "fastckpt.tools.diff",
    "FreezeSummary": "fastckpt.training",
    "ResumeReport": "fastckpt.training",
    "freeze": "fastckpt.training",
    "resume": "fastckpt.training",
    "save": "fastckpt.training",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: the next lookup is an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DiffReport",
    "FreezeSummary",
    "LimitError",
    "LoadPlan",
    "LoadReport",
    "PlanEntry",
    "ResumeReport",
    "Rules",
    "SharedReads",
    "StrictLoadError",
    "TensorInfo",
    "UninitializedWarning",
    "as_rules",
    "diff",
    "freeze",
    "load_into",
    "open",
    "plan",
    "resume",
    "save",
]
