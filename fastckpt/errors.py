"""The library's one exception type (raised by the C++ core and by Python code)."""

from fastckpt._core import CheckpointError, LimitError

# Shown as fastckpt.CheckpointError in tracebacks.
CheckpointError.__module__ = "fastckpt"
LimitError.__module__ = "fastckpt"

__all__ = ["CheckpointError", "LimitError"]
