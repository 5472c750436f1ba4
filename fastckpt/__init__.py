"""fastckpt: stream PyTorch checkpoints straight into a built model."""

from fastckpt.checkpoint import Checkpoint, TensorInfo, open
from fastckpt.diff import DiffReport, diff
from fastckpt.errors import CheckpointError, LimitError, StrictLoadError, UninitializedWarning
from fastckpt.load import load_into
from fastckpt.planning import LoadPlan, PlanEntry, plan
from fastckpt.report import LoadReport, SharedReads
from fastckpt.rules import Rules, as_rules
from fastckpt.training import FreezeSummary, ResumeReport, freeze, resume, save

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
__version__ = "0.1.0"
