"""fastckpt: stream PyTorch checkpoints straight into a built model."""

from fastckpt.checkpoint import Checkpoint, TensorInfo, open
from fastckpt.errors import CheckpointError, LimitError

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "LimitError",
    "TensorInfo",
    "open",
]
__version__ = "0.1.0"
