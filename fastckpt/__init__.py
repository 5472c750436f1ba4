"""fastckpt: stream PyTorch checkpoints straight into a built model."""

from fastckpt.checkpoint import Checkpoint, TensorInfo, open
from fastckpt.errors import CheckpointError, LimitError
from fastckpt.rules import Rules, as_rules

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "LimitError",
    "Rules",
    "TensorInfo",
    "as_rules",
    "open",
]
__version__ = "0.1.0"
