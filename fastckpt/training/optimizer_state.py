"""Optimizer state by parameter name: reading a ``save`` folder's, applying it to an
optimizer, and aligning a position-keyed ``optimizer.pt`` (torch.optim, Hugging Face
Trainer) to names (``remap_optimizer_state``)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastckpt.errors import CheckpointError
from fastckpt.training.layout import (
    OPT_JSON,
    OPT_TENSORS,
    NamedOptimizerState,
    PathLike,
    from_json,
    param_names,
)
from fastckpt.training.report import ResumeReport


def load_named_optimizer_state(folder: Path) -> NamedOptimizerState:
    from fastckpt.source.checkpoint import open as open_checkpoint

    try:
        doc = json.loads((folder / OPT_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / OPT_JSON}: cannot read optimizer state: {e}") from None
    state: dict[str, dict[str, Any]] = {}
    with open_checkpoint(folder / OPT_TENSORS) as ckpt:
        for name, record in doc["state"].items():
            entry: dict[str, Any] = {}
            for key, v in record.items():
                if "tensor" in v:
                    # Materialised: the optimizer owns and updates this memory in place.
                    entry[key] = ckpt.tensor(v["tensor"]).clone()
                else:
                    entry[key] = from_json(v["value"])
            state[name] = entry
    groups = [from_json(g) for g in doc["param_groups"]]
    return {"state": state, "param_groups": groups, "class": doc.get("class")}


def rule_renames(
    saved: Sequence[str], model: nn.Module, rules: Any
) -> tuple[dict[str, str], list[str]]:
    """Saved parameter name -> current name under ``rules`` (as ``load_into`` reads the
    weights), for the renames optimizer state can follow: plain renames (a cast too: the
    optimizer casts its state to the parameter's dtype). A parameter whose weight its rule
    cuts or converts keeps no saved state; a note says so. Returns (renames, notes)."""
    from fastckpt.planning.load_plan import match

    current = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    out: dict[str, str] = {}
    notes: list[str] = []
    for a in match(list(saved), current, rules).assignments:
        if a.rows is not None or a.converts:
            notes.append(
                f"{a.target}: the rule {a.rule!r} cuts or converts its weight; the saved "
                f"optimizer state of {a.source} does not follow it"
            )
        elif a.source != a.target:
            out[a.source] = a.target
            notes.append(f"optimizer state of {a.target} restored from {a.source} ({a.rule})")
    targets = set(out.values())
    clash = [n for n in saved if n not in out and n in targets]
    if clash:
        raise CheckpointError(
            f"rules rename saved optimizer state onto {', '.join(clash)}, which the saved "
            "state also holds under that name"
        )
    return out, notes


def renamed_state(named: NamedOptimizerState, renames: Mapping[str, str]) -> NamedOptimizerState:
    """``named`` with its saved parameter names turned into current ones."""
    groups = [
        {**g, "params": [renames.get(n, n) for n in g["params"]]} for g in named["param_groups"]
    ]
    state = {renames.get(n, n): v for n, v in named["state"].items()}
    return {**named, "state": state, "param_groups": groups}


def _state_shape_ok(entry: Mapping[str, Any], shape: tuple[int, ...]) -> str | None:
    """None when every per-parameter tensor in ``entry`` has ``shape``; else a reason."""
    for key, v in entry.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != shape:
            return f"{key} has shape {list(v.shape)}, parameter has {list(shape)}"
    return None


def apply_named_state(
    named: NamedOptimizerState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    report: ResumeReport,
) -> dict[str, Any]:
    """Fill ``report`` and build the position-keyed state_dict for ``optimizer``."""
    names = param_names(model)
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
    names = param_names(model)
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
    from fastckpt.source.checkpoint import open as open_checkpoint

    where = str(checkpoint)
    saved_groups = optimizer_state.get("param_groups")
    saved_state = optimizer_state.get("state")
    if not isinstance(saved_groups, list) or not isinstance(saved_state, Mapping):
        raise CheckpointError(f"{where}: not a torch.optim state dict (no 'state'/'param_groups')")
    if not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in saved_groups):
        raise CheckpointError(f"{where}: a param group has no 'params' list")
    sizes = tuple(len(g["params"]) for g in saved_groups)
    flat_positions = [i for g in saved_groups for i in g["params"]]
    with open_checkpoint(checkpoint) as ckpt:
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
