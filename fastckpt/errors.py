"""Every exception and warning class of the library, in one place.

``CheckpointError`` (and ``LimitError``) are raised by the C++ core and by
Python code alike; the others are Python's own.
"""

from __future__ import annotations

from typing import Any

from fastckpt._core import CheckpointError, LimitError

# Shown as fastckpt.CheckpointError in tracebacks.
CheckpointError.__module__ = "fastckpt"
LimitError.__module__ = "fastckpt"


class StrictLoadError(CheckpointError, RuntimeError):
    """The checkpoint does not fit the model (strict=True); nothing was modified.

    A ``RuntimeError`` too, as ``load_state_dict``'s error is. ``report`` holds what
    a non-strict load would have done; ``suggested_rules`` is a ``Rules`` object
    that makes the names fit (None when there is no suggestion):
    ``load_into(model, path, rules=e.suggested_rules)``.
    """

    def __init__(self, message: str, report: Any, suggested_rules: Any = None):
        super().__init__(message)
        self.report = report
        self.suggested_rules = suggested_rules


StrictLoadError.__module__ = "fastckpt"


class UninitializedWarning(UserWarning):
    """A non-strict load left some of the model's tensors as they were."""


UninitializedWarning.__module__ = "fastckpt"

__all__ = ["CheckpointError", "LimitError", "StrictLoadError", "UninitializedWarning"]
