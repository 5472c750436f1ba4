"""``ResumeReport``: what ``fastckpt.resume`` restored, and what it could not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ResumeReport:
    path: str
    layout: str  # "fastckpt", "dcp" (name-keyed) or "position-keyed" (torch.optim, Trainer)
    model_loaded: int = 0
    model_missing: list[str] = field(default_factory=list)  # model tensors the file lacks
    model_unexpected: list[str] = field(default_factory=list)  # file tensors the model lacks
    model_shape_mismatch: list[str] = field(default_factory=list)  # left as they are in the model
    restored: list[str] = field(default_factory=list)  # parameters that got their saved state
    new: list[str] = field(default_factory=list)  # parameters with no saved state: fresh state
    dropped: list[str] = field(default_factory=list)  # saved state of parameters now gone
    # saved state of a name that is now tied to (an alias of) another parameter: (alias, kept)
    dropped_tied: list[tuple[str, str]] = field(default_factory=list)
    # saved state whose tensor shapes do not fit the parameter: fresh state instead
    shape_mismatch: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how a state was aligned or renamed
    optimizer_bytes: int = 0  # optimizer state bytes this rank read (DCP: its shard of them)
    extra: Any = None

    @property
    def problems(self) -> list[str]:
        """One line per case ``strict=True`` refuses."""
        lines = []
        for label, names in (
            ("model tensors missing from the checkpoint", self.model_missing),
            ("checkpoint tensors the model does not have", self.model_unexpected),
            ("model tensors whose shape differs from the checkpoint", self.model_shape_mismatch),
            ("parameters with no saved optimizer state (would start fresh)", self.new),
            ("saved optimizer state of parameters the model no longer has", self.dropped),
            ("saved optimizer state whose shapes do not fit the parameter", self.shape_mismatch),
        ):
            if names:
                lines.append(f"{label}: {', '.join(names)}")
        if self.dropped_tied:
            pairs = ", ".join(f"{a} (now tied to {k})" for a, k in self.dropped_tied)
            lines.append(
                f"saved optimizer state dropped because the parameter is now tied: {pairs}"
            )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "layout": self.layout,
            "model_loaded": self.model_loaded,
            "model_missing": list(self.model_missing),
            "model_unexpected": list(self.model_unexpected),
            "model_shape_mismatch": list(self.model_shape_mismatch),
            "restored": list(self.restored),
            "new": list(self.new),
            "dropped": list(self.dropped),
            "dropped_tied": [list(p) for p in self.dropped_tied],
            "shape_mismatch": list(self.shape_mismatch),
            "notes": list(self.notes),
            "optimizer_bytes": self.optimizer_bytes,
        }

    def __str__(self) -> str:
        lines = [
            (f"resumed from {self.path} ({self.layout}): {self.model_loaded} model tensors, "
            f"optimizer state for {len(self.restored)} parameters")
        ]
        lines += [f"  {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
