"""fastckpt: stream PyTorch checkpoints straight into a built model."""

from fastckpt.errors import CheckpointError, LimitError, StrictLoadError, UninitializedWarning
from fastckpt.load.execute import load_into
from fastckpt.planning.load_plan import LoadPlan, PlanEntry, plan
from fastckpt.planning.rules import Rules, as_rules
from fastckpt.report import LoadReport, SharedReads
from fastckpt.source.checkpoint import Checkpoint, TensorInfo, open
from fastckpt.tools.diff import DiffReport, diff
from fastckpt.training import FreezeSummary, ResumeReport, freeze, resume, save
from fastckpt.version import __version__ as __version__

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
