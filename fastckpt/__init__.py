"""fastckpt: stream PyTorch checkpoints straight into a built model."""

from fastckpt.checkpoint import Checkpoint, TensorInfo, open
from fastckpt.errors import CheckpointError, LimitError
from fastckpt.load import StrictLoadError, UninitializedWarning, load_into
from fastckpt.report import LoadReport

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "LimitError",
    "LoadReport",
    "StrictLoadError",
    "UninitializedWarning",
    "load_into",
    "TensorInfo",
    "open",
]
__version__ = "0.1.0"
