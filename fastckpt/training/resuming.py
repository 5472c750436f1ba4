"""``fastckpt.resume``: a model and its optimizer from a ``save`` folder, a Hugging Face
Trainer checkpoint folder or a torch.distributed.checkpoint directory, everything checked
before anything changes."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastckpt.errors import CheckpointError, UninitializedWarning
from fastckpt.planning.destinations import state_tensors, tie_groups
from fastckpt.planning.mapping import Assignment, MappingPlan
from fastckpt.training.layout import (
    EXTRA_JSON,
    FORMAT,
    MANIFEST,
    MODEL_FILE,
    OPT_JSON,
    TRAINER_OPTIMIZER,
    PathLike,
    from_json,
)
from fastckpt.training.optimizer_state import (
    apply_named_state,
    load_named_optimizer_state,
    remap_optimizer_state,
    renamed_state,
    rule_renames,
)
from fastckpt.training.report import ResumeReport


@dataclass(frozen=True)
class _SavedNames:
    """Rules for ``fastckpt.plan``: every name reads itself, and a name that was tied
    when saving (stored once, under another name) reads the stored tensor. A tensor
    tied in the model now is read from the first of its names the file has (the one
    whose optimizer state is kept); the file's other names for it are ignored."""

    aliases: Mapping[str, str]  # alias -> stored name
    ties: Sequence[Sequence[str]] = ()  # the model's tie groups, in state_dict order

    def plan(self, source_keys: Sequence[str], target_keys: Sequence[str] | None) -> MappingPlan:
        sources = set(source_keys)
        picked: dict[str, str] = {}
        for t in target_keys if target_keys is not None else source_keys:
            if t in sources:
                picked[t] = t
            elif (stored := self.aliases.get(t)) is not None and stored in sources:
                picked[t] = stored
        skipped: list[str] = []
        for group in self.ties:
            first = next((n for n in group if n in picked), None)
            for n in group:
                if n != first and n in picked:
                    if picked.pop(n) == n:
                        skipped.append(n)
        return MappingPlan(
            assignments=[Assignment(t, s) for t, s in picked.items()], ignored_sources=skipped
        )


def resume(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    rules: Any = None,
    *,
    strict: bool = True,
) -> ResumeReport:
    """Restore ``model`` (and ``optimizer``) from a ``save`` folder, a Trainer checkpoint
    folder or a torch.distributed.checkpoint directory of ``{"model":
    get_model_state_dict(m), "optim": get_optimizer_state_dict(m, opt)}`` (plain or
    DTensor models, each rank reading only its shard of weights and moments).

    ``rules`` (name-keyed layouts: ``save`` folders and DCP directories) rename the
    saved names as ``load_into`` does; a parameter's optimizer state follows a plain
    rename of its weight.

    Everything is checked before anything is changed: with ``strict=True`` any
    missing / unexpected model tensor, new / vanished parameter, state dropped
    because of a new tie, or misfitting state shape raises ``CheckpointError``
    listing them, and the model and optimizer are left as they were.
    """
    from fastckpt.load.execute import load_into
    from fastckpt.planning.load_plan import plan
    from fastckpt.source.dcp import is_dcp_dir
    from fastckpt.source.urls import is_url

    if is_url(path):
        raise CheckpointError(
            f"{path}: resume reads local folders only (a save folder, a Trainer checkpoint, "
            "a DCP directory): download it first; load_into(model, URL) reads a model's "
            "weights from a URL"
        )
    folder = Path(path)
    dcp_ckpt: Any = None
    if (folder / MANIFEST).is_file():
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{folder / MANIFEST}: unknown format {manifest.get('format')!r}")
        report = ResumeReport(path=str(folder), layout="fastckpt")
        weights: Path = folder / MODEL_FILE
        aliases: dict[str, str] = manifest.get("aliases", {})
    elif is_dcp_dir(folder):
        from fastckpt.source.dcp import DcpCheckpoint

        report = ResumeReport(path=str(folder), layout="dcp")
        weights, aliases = folder, {}
        # Every saved path by its dotted name: the optimizer's part is found by its paths.
        from fastckpt.planning.dtensor_plan import any_dtensor
        from fastckpt.source.checkpoint import Opening

        # A rank of a sharded model reads its shard of the moments: no readahead around them.
        opening = Opening(folder, exact_reads=any_dtensor(model.parameters()))
        dcp_ckpt = DcpCheckpoint(folder, key="", _opening=opening)
    else:
        report = ResumeReport(path=str(folder), layout="position-keyed")
        weights, aliases = folder, {}
        if rules is not None:
            raise ValueError(
                f"{folder}: rules apply to name-keyed optimizer states (fastckpt save "
                "folders, DCP directories); this one is keyed by position"
            )
    state = state_tensors(model)
    ties = tie_groups(list(state), list(state.values())) or []
    weights_plan = plan(
        model,
        weights,
        _SavedNames(aliases, [g for g in ties if len(g) > 1]) if rules is None else rules,
    )
    report.model_missing = list(weights_plan.missing)
    report.model_unexpected = list(weights_plan.unexpected)
    report.model_shape_mismatch = [
        f"{m.name} (file {list(m.source_shape)}, model {list(m.target_shape)})"
        for m in weights_plan.mismatched
    ]

    new_state: dict[str, Any] | None = None
    dcp_state: Any = None
    if optimizer is not None:
        if report.layout == "fastckpt":
            if not (folder / OPT_JSON).is_file():
                raise CheckpointError(f"{folder}: saved without an optimizer")
            named = load_named_optimizer_state(folder)
            if rules is not None:
                saved = [n for g in named["param_groups"] for n in g["params"]]
                renames, notes = rule_renames(saved, model, rules)
                named = renamed_state(named, renames)
                report.notes += notes
        elif report.layout == "dcp":
            from fastckpt.training.dcp_optimizer import DcpOptimizerState

            dcp_state = DcpOptimizerState.describe(dcp_ckpt, model, rules)
            named = dcp_state.named
            report.notes += dcp_state.notes
        else:
            opt_file = folder / TRAINER_OPTIMIZER if folder.is_dir() else None
            if opt_file is None or not opt_file.is_file():
                raise CheckpointError(
                    f"{folder}: no {TRAINER_OPTIMIZER} to resume the optimizer from"
                )
            try:
                # weights_only: the safe unpickler (tensors and python containers/numbers only).
                raw = torch.load(opt_file, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{opt_file}: cannot read optimizer state: {e}") from None
            named, notes = remap_optimizer_state(raw, weights, model, optimizer)
            report.notes += notes
        new_state = apply_named_state(named, model, optimizer, report)

    if strict and report.problems:
        raise CheckpointError(
            f"{folder}: resume is not exact (strict=True):\n  "
            + "\n  ".join(report.problems)
            + "\npass strict=False to resume anyway; these are then listed in the report"
        )
    with warnings.catch_warnings():  # what stays unloaded is in this report already
        warnings.simplefilter("ignore", UninitializedWarning)
        report.model_loaded = len(load_into(model, weights_plan, strict=False).loaded)
    if dcp_state is not None:
        report.optimizer_bytes = dcp_state.read(model, report.restored)  # only what is restored
    if dcp_ckpt is not None:
        dcp_ckpt.close()  # what was read was copied: nothing views its mapping
    if optimizer is not None and new_state is not None:
        optimizer.load_state_dict(new_state)
    if (folder / EXTRA_JSON).is_file():
        with contextlib.suppress(OSError):
            report.extra = from_json(json.loads((folder / EXTRA_JSON).read_text("utf-8")))
    return report
