"""What training code needs beyond loading weights: ``save`` and ``resume`` (model,
optimizer state keyed by parameter name, ``extra``), the remap of a position-keyed
optimizer state to names, and ``freeze`` by name patterns."""

from fastckpt.training.freezing import FreezeSummary, freeze
from fastckpt.training.optimizer_state import remap_optimizer_state
from fastckpt.training.report import ResumeReport
from fastckpt.training.resuming import resume
from fastckpt.training.saving import save

__all__ = ["FreezeSummary", "ResumeReport", "freeze", "remap_optimizer_state", "resume", "save"]
