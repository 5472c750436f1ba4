"""Training checkpoints keyed by parameter *name*: ``fastckpt.save`` / ``fastckpt.resume``.

Layout written by ``save(path, ...)`` (a folder; no pickle anywhere)::

    path/fastckpt.json          manifest: format, model class, tied aliases, files
    path/model.safetensors      model state_dict; tied tensors stored once
                                (aliases in the manifest and the file's metadata)
    path/optimizer.safetensors  per-parameter optimizer state tensors
    path/optimizer.json         optimizer class, param_groups with parameter NAMES,
                                and per name: which state entries are tensors
                                (stored under "state.<name>.<key>") and which are
                                plain JSON values (python step counts etc.)
    path/extra.json             ``extra`` (anything JSON can hold)

The save is atomic as a whole: everything is written into a hidden temporary
folder beside ``path`` which is then renamed into place. If ``path`` already
holds a fastckpt save, it is renamed aside first and removed after the new one
is in place; a crash between those two renames leaves the old save intact as
``.<name>.old-*`` beside ``path`` (never a half-written one at ``path``).

``resume(path, model, optimizer)`` also reads Hugging Face Trainer folders
(``optimizer.pt`` beside ``model.safetensors`` / ``pytorch_model.bin``), whose
optimizer state is keyed by position only; see ``remap_optimizer_state``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastckpt.atomic import atomic_folder, atomic_write
from fastckpt.destinations import state_tensors, tie_groups
from fastckpt.errors import CheckpointError, UninitializedWarning
from fastckpt.mapping import Assignment, MappingPlan
from fastckpt.safetensors_writer import TensorSpec, write_safetensors

FORMAT = "fastckpt.train/1"
MANIFEST = "fastckpt.json"
MODEL_FILE = "model.safetensors"
OPT_TENSORS = "optimizer.safetensors"
OPT_JSON = "optimizer.json"
EXTRA_JSON = "extra.json"
TRAINER_OPTIMIZER = "optimizer.pt"

PathLike = str | os.PathLike

# A name-keyed optimizer state: {"state": {param name: {key: value}},
# "param_groups": [{..., "params": [param names]}]}.
NamedOptimizerState = dict[str, Any]


# -- save ---------------------------------------------------------------------------
def _write_json(path: Path, doc: Any) -> None:
    with atomic_write(path) as f:
        f.write(json.dumps(doc, indent=1, sort_keys=False).encode())


def _to_json(value: Any, where: str) -> Any:
    """Plain JSON for numbers, strings, lists; tuples are tagged so they come back as tuples."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, where) for v in value]}
    if isinstance(value, list):
        return [_to_json(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _to_json(v, where) for k, v in value.items()}
    raise TypeError(f"{where}: cannot store {type(value).__name__} value {value!r} as JSON")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """state_dict tensors stored once each, and ``alias -> stored name`` for tied ones
    (one tensor object under several names: ``fastckpt.destinations.tie_groups``)."""
    state = state_tensors(model)
    groups = tie_groups(list(state), list(state.values())) or [[n] for n in state]
    stored = {g[0]: state[g[0]].detach() for g in groups}
    aliases = {n: g[0] for g in groups for n in g[1:]}
    return stored, aliases


def _param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its name (the first name, for tied parameters)."""
    return {id(p): n for n, p in model.named_parameters()}


def _write_tensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    write_safetensors(path, specs, lambda s: tensors[s.name], metadata)


def save(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra: Any = None,
) -> Path:
    """Save model, optimizer state (keyed by parameter name) and ``extra`` into the folder ``path``.

    Atomic as a whole (see the module docstring). Returns the folder.
    """
    target = Path(path)
    if target.exists() and not (target / MANIFEST).is_file():
        raise FileExistsError(
            f"{target}: exists and is not a fastckpt save; refusing to replace it"
        )
    with atomic_folder(target) as tmp:
        tensors, aliases = _model_tensors(model)
        _write_tensors(
            tmp / MODEL_FILE, tensors, {"format": "pt", "fastckpt.aliases": json.dumps(aliases)}
        )
        files = [MODEL_FILE]
        if optimizer is not None:
            _save_optimizer(tmp, model, optimizer)
            files += [OPT_TENSORS, OPT_JSON]
        if extra is not None:
            _write_json(tmp / EXTRA_JSON, _to_json(extra, "extra"))
            files.append(EXTRA_JSON)
        _write_json(
            tmp / MANIFEST,
            {
                "format": FORMAT,
                "model_class": type(model).__name__,
                "aliases": aliases,
                "files": files,
            },
        )
    return target


def _save_optimizer(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    names = _param_names(model)
    sd = optimizer.state_dict()
    # state_dict() numbers parameters 0, 1, ... across the groups in order.
    position_names: list[str] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(
                    f"{folder}: the optimizer holds a parameter of shape {list(p.shape)} "
                    "that is not a parameter of the model"
                )
            position_names.append(names[id(p)])
    groups = []
    for group, sd_group in zip(optimizer.param_groups, sd["param_groups"], strict=True):
        g = {k: _to_json(v, f"param group {k!r}") for k, v in sd_group.items() if k != "params"}
        g["params"] = [names[id(p)] for p in group["params"]]
        groups.append(g)
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Any]] = {}
    for pos, entry in sd["state"].items():
        name = position_names[pos]
        record: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tkey = f"state.{name}.{key}"
                tensors[tkey] = value
                record[key] = {"tensor": tkey}
            else:
                record[key] = {"value": _to_json(value, f"optimizer state {name}.{key}")}
        state[name] = record
    _write_tensors(folder / OPT_TENSORS, tensors, {"format": "pt"})
    _write_json(
        folder / OPT_JSON,
        {"class": type(optimizer).__name__, "param_groups": groups, "state": state},
    )


# -- report -------------------------------------------------------------------------
@dataclass(slots=True)
class ResumeReport:
    path: str
    layout: str  # "fastckpt" (name-keyed) or "position-keyed" (torch.optim / HF Trainer)
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
    notes: list[str] = field(default_factory=list)  # how a position-keyed state was aligned
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
        }

    def __str__(self) -> str:
        lines = [
            (f"resumed from {self.path} ({self.layout}): {self.model_loaded} model tensors, "
            f"optimizer state for {len(self.restored)} parameters")
        ]
        lines += [f"  {p}" for p in self.problems]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- model weights ------------------------------------------------------------------
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


# -- optimizer state ----------------------------------------------------------------
def _load_named_optimizer_state(folder: Path) -> NamedOptimizerState:
    import fastckpt

    try:
        doc = json.loads((folder / OPT_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / OPT_JSON}: cannot read optimizer state: {e}") from None
    state: dict[str, dict[str, Any]] = {}
    with fastckpt.open(folder / OPT_TENSORS) as ckpt:
        for name, record in doc["state"].items():
            entry: dict[str, Any] = {}
            for key, v in record.items():
                if "tensor" in v:
                    # Materialised: the optimizer owns and updates this memory in place.
                    entry[key] = ckpt.tensor(v["tensor"]).clone()
                else:
                    entry[key] = _from_json(v["value"])
            state[name] = entry
    groups = [_from_json(g) for g in doc["param_groups"]]
    return {"state": state, "param_groups": groups, "class": doc.get("class")}


def _state_shape_ok(entry: Mapping[str, Any], shape: tuple[int, ...]) -> str | None:
    """None when every per-parameter tensor in ``entry`` has ``shape``; else a reason."""
    for key, v in entry.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != shape:
            return f"{key} has shape {list(v.shape)}, parameter has {list(shape)}"
    return None


def _apply_named_state(
    named: NamedOptimizerState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    report: ResumeReport,
) -> dict[str, Any]:
    """Fill ``report`` and build the position-keyed state_dict for ``optimizer``."""
    names = _param_names(model)
    all_named = dict(model.named_parameters(remove_duplicate=False))
    current: list[str] = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not in the model")
            current.append(names[id(p)])
    current_set = set(current)
    saved_state: dict[str, dict[str, Any]] = named["state"]
    saved_names = [n for g in named["param_groups"] for n in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for pos, name in enumerate(current):
        if name not in saved_state:
            if name not in saved_names:
                report.new.append(name)
            continue  # saved without state (never stepped): fresh either way
        reason = _state_shape_ok(saved_state[name], tuple(all_named[name].shape))
        if reason is not None:
            report.shape_mismatch.append(f"{name} ({reason})")
            continue
        state[pos] = saved_state[name]
        report.restored.append(name)
    for name in saved_names:
        if name in current_set:
            continue
        if name in all_named and names.get(id(all_named[name])) in current_set:
            report.dropped_tied.append((name, names[id(all_named[name])]))
        else:
            report.dropped.append(name)
    # Hyperparameters (lr as a scheduler left it, betas, ...) come back group by group:
    # each current group from the saved group that held its parameters, whatever the order.
    saved_groups = named["param_groups"]
    saved_group_of = {n: j for j, g in enumerate(saved_groups) for n in g["params"]}
    current_groups = []
    pos = 0
    for group in optimizer.param_groups:
        current_groups.append(current[pos : pos + len(group["params"])])
        pos += len(group["params"])
    sources = [{saved_group_of[n] for n in ns if n in saved_group_of} for ns in current_groups]
    taken = [next(iter(js)) for js in sources if len(js) == 1]
    groups: list[dict[str, Any]] = []
    pos = 0
    for i, (group, js) in enumerate(zip(optimizer.param_groups, sources, strict=True)):
        if len(js) == 1 and taken.count(next(iter(js))) == 1:
            g = {k: v for k, v in saved_groups[next(iter(js))].items() if k != "params"}
        else:
            g = {k: v for k, v in group.items() if k != "params"}
            report.notes.append(
                f"param group {i}: "
                + (
                    "no saved parameter in it"
                    if not js
                    else f"its parameters were in saved groups {sorted(js)}"
                    if len(js) > 1
                    else f"shares saved group {next(iter(js))} with another group"
                )
                + ": hyperparameters kept as they are now"
            )
        g["params"] = list(range(pos, pos + len(group["params"])))
        pos += len(group["params"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# -- position-keyed states (torch.optim, Hugging Face Trainer) -----------------------
# Beyond this many reachable (count per group) states the alignment is refused as
# too open to prove (only when shapes barely constrain many groups of many parameters).
_MAX_STATES = 2_000_000

# Group entries compared between the saved and the current optimizer, when both have
# them ("lr" as the value before any scheduler: "initial_lr" when a scheduler set it).
_HYPER_KEYS = (
    "lr", "weight_decay", "betas", "eps", "momentum", "dampening", "nesterov", "amsgrad",
    "alpha", "centered", "name",
)


@dataclass(frozen=True, slots=True)
class _Hypothesis:
    tied_at_save: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]


@dataclass(slots=True)
class _Alignment:
    """Every way to put ``params`` (model order) into the saved groups, each group
    keeping model order: ``choices[t]`` holds the groups parameter ``t`` takes in at
    least one complete assignment (empty lists when there is none)."""

    params: list[str]
    choices: list[list[int]]
    blocked: str | None = None  # why no assignment exists

    @property
    def unique(self) -> bool:
        return self.blocked is None and all(len(c) == 1 for c in self.choices)

    def groups(self, k: int) -> tuple[tuple[str, ...], ...]:
        return tuple(
            tuple(n for n, c in zip(self.params, self.choices, strict=True) if c == [g])
            for g in range(k)
        )

    def ambiguous(self) -> list[str]:
        return [
            f"{n} (group {' or '.join(map(str, c))})"
            for n, c in zip(self.params, self.choices, strict=True)
            if len(c) > 1
        ]


def _align(
    params: Sequence[str],
    shapes: Mapping[str, tuple[int, ...]],
    saved_groups: Sequence[Mapping[str, Any]],
    saved_state: Mapping[Any, Mapping[str, Any]],
    allowed: Mapping[str, Sequence[int]] | None = None,
) -> _Alignment:
    """Forward: the (parameters placed per group) states reachable after each parameter;
    backward: those from which the saved group sizes are still reachable. A parameter
    may go to group g at the j-th free place when that place's saved state tensors
    (if any) have its shape and, with ``allowed``, g is among its allowed groups."""
    k = len(saved_groups)
    sizes = tuple(len(g["params"]) for g in saved_groups)
    n = len(params)
    if n != sum(sizes):
        return _Alignment(
            list(params), [[] for _ in params],
            f"{n} parameters for {sum(sizes)} saved positions",
        )
    fits: dict[tuple[int, int, tuple[int, ...]], str | None] = {}

    def reason(g: int, j: int, shape: tuple[int, ...]) -> str | None:
        key = (g, j, shape)
        if key not in fits:
            entry = saved_state.get(saved_groups[g]["params"][j])
            fits[key] = None if entry is None else _state_shape_ok(entry, shape)
        return fits[key]

    def moves(t: int, c: tuple[int, ...]) -> list[int]:
        groups = allowed.get(params[t], range(k)) if allowed else range(k)
        return [g for g in groups if c[g] < sizes[g] and reason(g, c[g], shapes[params[t]]) is None]

    forward: list[set[tuple[int, ...]]] = [{(0,) * k}]
    total = 1
    for t in range(n):
        nxt = set()
        for c in forward[t]:
            for g in moves(t, c):
                nxt.add(c[:g] + (c[g] + 1,) + c[g + 1 :])
        if not nxt:
            c = next(iter(forward[t]))
            why = next(
                (r for g in range(k) if c[g] < sizes[g]
                 and (r := reason(g, c[g], shapes[params[t]])) is not None),
                "no group with a free place may hold it",
            )
            return _Alignment(list(params), [[] for _ in params], f"{params[t]}: {why}")
        total += len(nxt)
        if total > _MAX_STATES:
            return _Alignment(
                list(params), [[] for _ in params],
                f"too many possible alignments to check ({k} groups of {list(sizes)})",
            )
        forward.append(nxt)
    choices: list[list[int]] = [[] for _ in params]
    back = {sizes}
    for t in range(n - 1, -1, -1):
        prev = set()
        seen: set[int] = set()
        for c in forward[t]:
            for g in moves(t, c):
                if c[:g] + (c[g] + 1,) + c[g + 1 :] in back:
                    prev.add(c)
                    seen.add(g)
        choices[t] = sorted(seen)
        back = prev
    return _Alignment(list(params), choices)


def _hyper(group: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key in _HYPER_KEYS:
        if key == "lr":
            value = group.get("initial_lr", group.get("lr"))
        else:
            value = group.get(key)
        if value is not None:
            out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _allowed_by_hyperparameters(
    saved_groups: Sequence[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
) -> dict[str, list[int]]:
    """Parameter name -> the saved groups whose hyper-parameters equal those of the group
    holding the parameter in ``optimizer`` now (where at least one does)."""
    names = _param_names(model)
    saved = [_hyper(g) for g in saved_groups]
    allowed: dict[str, list[int]] = {}
    for group in optimizer.param_groups:
        now = _hyper(group)
        same = [
            j for j, s in enumerate(saved)
            if all(s[key] == now[key] for key in s.keys() & now.keys())
        ]
        if not same or len(same) == len(saved):
            continue
        for p in group["params"]:
            if id(p) in names:
                allowed[names[id(p)]] = same
    return allowed


def remap_optimizer_state(
    optimizer_state: Mapping[str, Any],
    checkpoint: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[NamedOptimizerState, list[str]]:
    """Name the parameters of a position-keyed ``torch.optim`` state dict. Returns (state, notes).

    Recovers the saving model's parameter list and proves its alignment with the
    state. Assumptions (each checked where the data allows):

    - the saving model had the current model's architecture: its parameters are
      the current model's names (``named_parameters(remove_duplicate=False)``
      order, i.e. module registration order) that its checkpoint holds;
      checkpoint tensors the current model lacks are taken as buffers, not
      parameters (a parameter that vanished cannot be placed: the alignment
      then fails the count check and the call refuses);
    - a name the checkpoint stores as a view of an earlier one (torch files), or
      a current alias the checkpoint lacks, was tied when saving: the saving
      model's ``named_parameters()`` listed it once, under its first name; a
      current alias the checkpoint does hold may have been tied or not — both
      are tried;
    - frozen parameters (``requires_grad=False`` now) were not in the optimizer;
    - every parameter was in exactly one group, and each group lists its
      parameters in ``named_parameters`` order (as groups built by filtering
      ``named_parameters()`` do: one group, the Trainer's decay / no-decay split,
      ``no_decay = ["bias", "norm"]`` lists, per-module groups, in any group order).

    Every assignment of parameters to the saved groups that gives the saved group
    sizes and every saved per-parameter state tensor (``exp_avg``...) the shape of
    its parameter is found. Exactly one: it is used. Several: when ``optimizer``
    (the current one) is given, a parameter is further held to the saved groups
    whose hyper-parameters (initial lr, weight decay, betas...) equal those of the
    group it is in now; still several, or none, raise ``CheckpointError`` naming
    the ambiguous parameters or the reason. One parameter's moments are never
    given to another on a guess.
    """
    import fastckpt

    where = str(checkpoint)
    saved_groups = optimizer_state.get("param_groups")
    saved_state = optimizer_state.get("state")
    if not isinstance(saved_groups, list) or not isinstance(saved_state, Mapping):
        raise CheckpointError(f"{where}: not a torch.optim state dict (no 'state'/'param_groups')")
    if not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in saved_groups):
        raise CheckpointError(f"{where}: a param group has no 'params' list")
    sizes = tuple(len(g["params"]) for g in saved_groups)
    flat_positions = [i for g in saved_groups for i in g["params"]]
    with fastckpt.open(checkpoint) as ckpt:
        ck_keys = ckpt.keys()
        ck_set = set(ck_keys)
        ck_shares = {k: ckpt.info(k).shares_storage_with for k in ck_keys}
    all_named = list(model.named_parameters(remove_duplicate=False))
    shapes = {n: tuple(p.shape) for n, p in all_named}
    first_name: dict[int, str] = {}
    for n, p in all_named:
        first_name.setdefault(id(p), n)
    order = [n for n, p in all_named if n in ck_set and p.requires_grad]
    known_tied = set()
    for i, n in enumerate(order):
        if any(other in order[:i] for other in ck_shares.get(n, ())):
            known_tied.add(n)
    maybe_tied = [
        n for n, p in all_named if n in ck_set and first_name[id(p)] != n and n not in known_tied
    ]
    if len(maybe_tied) > 10:
        raise CheckpointError(f"{where}: too many tied parameters to align ({len(maybe_tied)})")
    allowed = (
        _allowed_by_hyperparameters(saved_groups, optimizer, model) if optimizer else {}
    )

    failures: list[str] = []
    passing: list[_Hypothesis] = []
    ambiguous: list[tuple[_Hypothesis, list[str]]] = []
    by_hyper: list[str] = []
    for r in range(len(maybe_tied) + 1):
        for tied in itertools.combinations(maybe_tied, r):
            params = [n for n in order if n not in known_tied and n not in tied]
            tied_h = tuple(sorted(tied))
            a = _align(params, shapes, saved_groups, saved_state)
            if a.blocked is not None:
                failures.append(f"{_describe(tied_h, len(sizes))}: {a.blocked}")
                continue
            if not a.unique and allowed:
                narrowed = _align(params, shapes, saved_groups, saved_state, allowed)
                if narrowed.unique:
                    by_hyper += [
                        n for n, c in zip(a.params, a.choices, strict=True) if len(c) > 1
                    ]
                    a = narrowed
            h = _Hypothesis(tied_h, a.groups(len(sizes)))
            if not a.unique:
                ambiguous.append((h, a.ambiguous()))
            elif all(p.groups != h.groups for p in passing):
                passing.append(h)
    if ambiguous:
        h, names = ambiguous[0]
        raise CheckpointError(
            f"{where}: ambiguous optimizer state: with {_describe(h.tied_at_save, len(sizes))}, "
            f"more than one assignment of parameters to the saved groups of {list(sizes)} fits "
            f"the group sizes, the model's order and the state shapes; the ambiguous parameters: "
            f"{', '.join(names)}; refusing to guess"
        )
    if not passing:
        detail = "; ".join(dict.fromkeys(failures)) or "no candidate"
        raise CheckpointError(
            f"{where}: cannot align the position-keyed optimizer state ({len(flat_positions)} "
            f"parameters in groups of {list(sizes)}) with the checkpoint's parameter names: "
            + detail
        )
    if len(passing) > 1:
        ha, hb = passing[0], passing[1]
        fa = [n for g in ha.groups for n in g]
        fb = [n for g in hb.groups for n in g]
        differ = [
            f"position {i}: {x} or {y}"
            for i, (x, y) in enumerate(zip(fa, fb, strict=True))
            if x != y
        ]
        raise CheckpointError(
            f"{where}: ambiguous optimizer state: {_describe(ha.tied_at_save, len(sizes))} and "
            f"{_describe(hb.tied_at_save, len(sizes))} both fit "
            f"the group sizes and state shapes but name positions differently "
            f"({'; '.join(differ[:3])}); refusing to guess"
        )
    h = passing[0]
    names = [n for g in h.groups for n in g]
    state = {
        n: dict(saved_state[pos])
        for n, pos in zip(names, flat_positions, strict=True)
        if pos in saved_state
    }
    groups_named = []
    for g, names_g in zip(saved_groups, h.groups, strict=True):
        d = {k: v for k, v in g.items() if k != "params"}
        d["params"] = list(names_g)
        groups_named.append(d)
    notes = [f"position-keyed optimizer state aligned by {_describe(h.tied_at_save, len(sizes))}"]
    if by_hyper:
        notes.append(
            "placed by the hyper-parameters of their group in the current optimizer: "
            + ", ".join(dict.fromkeys(by_hyper))
        )
    if known_tied:
        notes.append(f"tied when saved (stored as views): {', '.join(sorted(known_tied))}")
    return {"state": state, "param_groups": groups_named}, notes


def _describe(tied_at_save: tuple[str, ...], n_groups: int) -> str:
    tied = f"{', '.join(tied_at_save)} tied when saved" if tied_at_save else "no extra ties"
    if n_groups == 1:
        return f"one group ({tied})"
    return f"{n_groups} groups, each in model order ({tied})"


# -- resume -------------------------------------------------------------------------
def resume(
    path: PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    strict: bool = True,
) -> ResumeReport:
    """Restore ``model`` (and ``optimizer``) from a ``save`` folder or a Trainer checkpoint folder.

    Everything is checked before anything is changed: with ``strict=True`` any
    missing / unexpected model tensor, new / vanished parameter, state dropped
    because of a new tie, or misfitting state shape raises ``CheckpointError``
    listing them, and the model and optimizer are left as they were.
    """
    import fastckpt

    folder = Path(path)
    if (folder / MANIFEST).is_file():
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise CheckpointError(f"{folder / MANIFEST}: unknown format {manifest.get('format')!r}")
        report = ResumeReport(path=str(folder), layout="fastckpt")
        weights: Path = folder / MODEL_FILE
        aliases: dict[str, str] = manifest.get("aliases", {})
    else:
        report = ResumeReport(path=str(folder), layout="position-keyed")
        weights, aliases = folder, {}
    state = state_tensors(model)
    ties = tie_groups(list(state), list(state.values())) or []
    weights_plan = fastckpt.plan(
        model, weights, _SavedNames(aliases, [g for g in ties if len(g) > 1])
    )
    report.model_missing = list(weights_plan.missing)
    report.model_unexpected = list(weights_plan.unexpected)
    report.model_shape_mismatch = [
        f"{m.name} (file {list(m.source_shape)}, model {list(m.target_shape)})"
        for m in weights_plan.mismatched
    ]

    new_state: dict[str, Any] | None = None
    if optimizer is not None:
        if report.layout == "fastckpt":
            if not (folder / OPT_JSON).is_file():
                raise CheckpointError(f"{folder}: saved without an optimizer")
            named = _load_named_optimizer_state(folder)
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
        new_state = _apply_named_state(named, model, optimizer, report)

    if strict and report.problems:
        raise CheckpointError(
            f"{folder}: resume is not exact (strict=True):\n  "
            + "\n  ".join(report.problems)
            + "\npass strict=False to resume anyway; these are then listed in the report"
        )
    with warnings.catch_warnings():  # what stays unloaded is in this report already
        warnings.simplefilter("ignore", UninitializedWarning)
        report.model_loaded = len(fastckpt.load_into(model, weights_plan, strict=False).loaded)
    if optimizer is not None and new_state is not None:
        optimizer.load_state_dict(new_state)
    if (folder / EXTRA_JSON).is_file():
        with contextlib.suppress(OSError):
            report.extra = _from_json(json.loads((folder / EXTRA_JSON).read_text("utf-8")))
    return report
