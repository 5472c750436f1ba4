"""What transformers converts on load, as fastckpt assignments (no tensor materialised).

A transformers v5 model declares, for its model type, how checkpoint names and
layouts become its own (``transformers.conversion_mapping``): renames, and
``WeightConverter`` chains of ops such as ``MergeModulelist`` (per-expert
tensors stacked), ``Concatenate`` (gate and up fused), ``Chunk`` / ``Split``,
``Transpose``, ``PermuteForRope`` and ``Interleave``. ``rules_for(model,
source_shape)`` returns an object with the rules interface (``plan(source_keys,
target_keys) -> MappingPlan``) whose assignments say the same with regions,
transposes and row permutations (``fastckpt.planning.mapping``), so the copy engine
streams each piece into place.

Names are matched by transformers' own matching (``rename_source_key``, in its
``dot_natural_key`` order, which also numbers the experts), so a key goes where
``from_pretrained`` puts it. An op fastckpt cannot express as a view is refused
by name (op, model type, patterns) when a checkpoint key needs it; nothing is
skipped. transformers is imported only for a model that is one of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from fastckpt.errors import CheckpointError
from fastckpt.planning.hf_model import is_transformers_model
from fastckpt.planning.mapping import Assignment, MappingPlan, Region, Rope, Select, Span
from fastckpt.planning.views import read_shape

__all__ = ["HFConversions", "rules_for"]

Shape = tuple[int, ...]


def rules_for(
    model: nn.Module, source_shape: Callable[[str], Sequence[int]]
) -> HFConversions | None:
    """The conversions transformers declares for ``model`` (None: not a transformers
    model, or it declares none). ``source_shape(key)`` gives a checkpoint tensor's shape."""
    if not is_transformers_model(model):
        return None
    from fastckpt.planning.hf_mapping_table import model_conversion_mapping

    transforms = model_conversion_mapping(model)
    if not transforms:
        return None
    return HFConversions(model, transforms, source_shape)


@dataclass(frozen=True)
class _Piece:
    """One source's path into a symbolic tensor: read ``part`` of it, maybe transposed or
    row-permuted, into region ``into`` of the tensor."""

    source: str
    part: tuple[Region, ...] = ()
    transpose: bool = False
    rope: Rope | None = None
    into: tuple[Region, ...] = ()


@dataclass(frozen=True)
class _Sym:
    """A tensor an op chain produces, as the pieces it is made of."""

    shape: Shape
    pieces: tuple[_Piece, ...] = field(default_factory=tuple)

    def single(self) -> _Piece | None:
        """The one piece, when it fills the whole tensor (ops may then act on its source)."""
        if len(self.pieces) == 1 and not self.pieces[0].into:
            return self.pieces[0]
        return None


class HFConversions:
    """transformers' conversions for one model, with the rules interface."""

    def __init__(
        self, model: nn.Module, transforms: list[Any], source_shape: Callable[[str], Sequence[int]]
    ) -> None:
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.model = model
        self.config = model.config  # type: ignore[attr-defined]
        self.model_type = getattr(self.config, "model_type", type(model).__name__)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.source_shape = source_shape
        self.text = "".join(f"# transformers {self.model_type}: {t!r}\n" for t in transforms)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        n, m = len(self.renamings), len(self.converters)
        return f"<transformers conversions for {self.model_type}: {n} renames, {m} converters>"

    def plan(self, source_keys: Sequence[str], target_keys: Sequence[str] | None) -> MappingPlan:
        from transformers.core_model_loading import dot_natural_key, rename_source_key

        targets = list(source_keys if target_keys is None else target_keys)
        target_set = dict.fromkeys(targets, True)
        prefix = getattr(self.model, "base_model_prefix", None)
        by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        assignments: list[Assignment] = []
        groups: dict[str, tuple[Any, dict[str, list[str]]]] = {}
        used_rules: set[int] = set()
        for key in sorted(source_keys, key=dot_natural_key):
            renamed, pattern = rename_source_key(
                key, self.renamings, self.converters, prefix, target_set
            )
            if renamed not in target_set and key in target_set:
                renamed, pattern = rename_source_key(key, [], [], prefix, target_set)
            if renamed not in target_set:
                continue  # unexpected: the loader reports it
            if pattern is None:
                rule = None if renamed == key else f"transformers {self.model_type}: rename"
                assignments.append(Assignment(renamed, key, rule))
                continue
            conv = by_pattern[pattern]
            used_rules.add(id(conv))
            groups.setdefault(renamed, (conv, {}))[1].setdefault(pattern, []).append(key)
        for layer, (conv, collected) in groups.items():
            assignments += self._convert(layer, conv, collected, target_set)
        return MappingPlan(assignments=assignments)

    # -- the ops, symbolically --------------------------------------------------

    def _refuse(self, op: Any, conv: Any, why: str) -> CheckpointError:
        return CheckpointError(
            f"transformers conversion {type(op).__name__} for model type {self.model_type!r} "
            f"({conv.source_patterns} -> {conv.target_patterns}) cannot be loaded by fastckpt: "
            f"{why}"
        )

    def _convert(
        self, layer: str, conv: Any, collected: dict[str, list[str]], target_set: dict[str, bool]
    ) -> list[Assignment]:
        state: dict[str, list[_Sym]] = {
            p: [_Sym(tuple(self.source_shape(k)), (_Piece(k),)) for k in keys]
            for p in conv.source_patterns
            if (keys := collected.get(p))
        }
        names = {tp: layer.replace(conv.target_patterns[0], tp, 1) for tp in conv.target_patterns}
        rule = f"transformers {self.model_type}: {conv.source_patterns} -> {conv.target_patterns}"
        for op in conv.operations:
            state = self._apply(op, conv, state, names)
        out: list[Assignment] = []
        for key, syms in state.items():
            if len(syms) != 1:
                raise self._refuse(conv.operations[-1], conv, f"{len(syms)} tensors left for {key}")
            target = names.get(key, layer if len(state) == 1 else None)
            if target is None or target not in target_set:
                raise CheckpointError(
                    f"transformers conversion for model type {self.model_type!r} produces "
                    f"{target or key!r}, which the model does not have"
                )
            for pc in self._halves(syms[0].pieces):
                out.append(
                    Assignment(
                        target,
                        pc.source,
                        rule,
                        part=pc.part or None,
                        transpose=pc.transpose,
                        rope=pc.rope,
                        into=pc.into or None,
                    )
                )
        return out

    def _apply(
        self, op: Any, conv: Any, state: dict[str, list[_Sym]], names: dict[str, str]
    ) -> dict[str, list[_Sym]]:
        kind = type(op).__name__
        if kind == "MergeModulelist":
            out = {}
            for p, syms in state.items():
                shapes = {s.shape for s in syms}
                if len(shapes) != 1:
                    raise self._refuse(op, conv, f"tensors of different shapes {sorted(shapes)}")
                (shape,) = shapes
                d = op.dim
                if not 0 <= d <= len(shape):
                    raise self._refuse(op, conv, f"dim {d} of {len(shape)}-D tensors")
                stacked = tuple(
                    replace(pc, into=(Select(d, e), *pc.into))
                    for e, s in enumerate(syms)
                    for pc in s.pieces
                )
                key = conv.target_patterns[0] if len(state) == 1 else p
                out[key] = [_Sym(shape[:d] + (len(syms),) + shape[d:], stacked)]
            return out
        if kind == "Concatenate":
            syms = [s for p in conv.source_patterns for s in state.get(p, [])]
            d = op.dim
            rank = {len(s.shape) for s in syms}
            if len(rank) != 1 or not 0 <= d < rank.pop():
                raise self._refuse(op, conv, f"dim {d} of tensors {[list(s.shape) for s in syms]}")
            rest = {s.shape[:d] + s.shape[d + 1 :] for s in syms}
            if len(rest) != 1:
                counts = ", ".join(
                    f"{len(state[p][0].pieces) if p in state else 0} x {p}"
                    for p in conv.source_patterns
                )
                raise CheckpointError(
                    f"{names[conv.target_patterns[0]]}: the checkpoint's parts do not fit "
                    f"together ({counts}): transformers' {kind}(dim={d}) of shapes "
                    f"{[list(s.shape) for s in syms]}"
                )
            pieces: list[_Piece] = []
            at = 0
            for s in syms:
                n = s.shape[d]
                pieces += [replace(pc, into=(Span(d, at, n), *pc.into)) for pc in s.pieces]
                at += n
            shape = syms[0].shape[:d] + (at,) + syms[0].shape[d + 1 :]
            return {conv.target_patterns[0]: [_Sym(shape, tuple(pieces))]}
        if kind in ("Chunk", "Split"):
            (syms,) = state.values() if len(state) == 1 else (None,)  # type: ignore[assignment]
            if syms is None or len(syms) != 1 or syms[0].single() is None:
                raise self._refuse(op, conv, "it splits a tensor built from several sources")
            sym, pc = syms[0], syms[0].single()
            assert pc is not None
            d = op.dim + len(sym.shape) if op.dim < 0 else op.dim
            if not 0 <= d < len(sym.shape):
                raise self._refuse(op, conv, f"dim {d} of a {len(sym.shape)}-D tensor")
            if pc.transpose:
                raise self._refuse(op, conv, "a split after a transpose")
            tps = list(conv.target_patterns)
            if kind == "Chunk":
                if getattr(op, "num_shards_attribute", None) is not None:
                    count = getattr(self.config.get_text_config(), op.num_shards_attribute)  # type: ignore[union-attr,operator]
                    if len(tps) != 1:
                        raise self._refuse(op, conv, "a shard count with several targets")
                    tps = [tps[0].replace("*", str(i)) for i in range(count)]
                    for tp in tps:
                        names.setdefault(
                            tp, next(iter(names.values())).replace(conv.target_patterns[0], tp, 1)
                        )
                step = math.ceil(sym.shape[d] / len(tps))
                sizes = [max(0, min(step, sym.shape[d] - k * step)) for k in range(len(tps))]
            else:
                sizes = []
                for tp in tps:
                    shape = self._model_shape(names[tp])  # type: ignore[assignment]
                    if shape is None or d >= len(shape):
                        raise self._refuse(op, conv, f"the model has no tensor {names[tp]!r}")
                    sizes.append(shape[d])
            if sum(sizes) != sym.shape[d]:
                raise self._refuse(op, conv, f"parts {sizes} of a dim of {sym.shape[d]}")
            out = {}
            at = 0
            for tp, n in zip(tps, sizes, strict=True):
                shape = sym.shape[:d] + (n,) + sym.shape[d + 1 :]
                out[tp] = [_Sym(shape, (self._split_part(op, conv, pc, sym.shape[d], d, at, n),))]
                at += n
            return out
        if kind in ("Transpose", "PermuteForRope", "Interleave") or kind.endswith("UnpadVocab"):
            out = {}
            for key, syms in state.items():
                target = names.get(key) or (next(iter(names.values())) if len(names) == 1 else key)
                out[key] = [self._one(op, conv, key, target, s) for s in syms]
            return out
        if kind.endswith("MergeMessageQueries"):
            return self._merge_queries(op, conv, state)
        if kind.endswith("DequantizeExperts") and sum(len(v) for v in state.values()) == 1:
            # transformers' dequantizing ops hand a weight that comes without its scales
            # (a folder save_pretrained wrote) through unchanged
            return state
        raise self._refuse(op, conv, "no strided view expresses it")

    def _halves(self, pieces: tuple[_Piece, ...]) -> list[_Piece]:
        """A de-interleave along a dim other than rows, as two stepped parts each written into
        one half of that dim (transfers permute rows only)."""
        out: list[_Piece] = []
        for pc in pieces:
            rope = pc.rope
            if rope is None or rope.dim == 0 or rope.heads != 1 or not rope.to_halves:
                out.append(pc)
                continue
            read = Assignment("", pc.source, part=pc.part or None, transpose=pc.transpose)
            shape = read_shape(tuple(self.source_shape(pc.source)), read)
            d = rope.dim
            src_dim = (1 - d) if pc.transpose else d
            half = shape[d] // 2
            out += [
                replace(
                    pc,
                    part=(*pc.part, Span(src_dim, j, half, 2)),
                    into=(*pc.into, Span(d, j * half, half)),
                    rope=None,
                )
                for j in (0, 1)
            ]
        return out

    def _split_part(
        self, op: Any, conv: Any, pc: _Piece, size: int, d: int, at: int, n: int
    ) -> _Piece:
        """``pc`` narrowed to ``[at, at + n)`` of its dim ``d`` (of ``size``): a part of the
        source; after a de-interleave along ``d``, every other entry of one half."""
        rope = pc.rope
        if rope is None or rope.dim != d:
            return replace(pc, part=(*pc.part, Span(d, at, n)))
        half = size // 2
        if rope.heads != 1 or not rope.to_halves or (n and at // half != (at + n - 1) // half):
            raise self._refuse(op, conv, "a split across the pairs of an interleave")
        j = at // half if n else 0
        return replace(pc, part=(*pc.part, Span(d, 2 * (at - j * half) + j, n, 2)), rope=None)

    def _merge_queries(
        self, op: Any, conv: Any, state: dict[str, list[_Sym]]
    ) -> dict[str, list[_Sym]]:
        """Inkling2Loop's message queries: two ``(2L, H)`` tensors, (query, mlp) and (key,
        value) pairs of rows per loop layer, into one ``(L, 4, H)`` of (query, key, value,
        mlp): every other row of a source into one index of dim 1."""
        syms = [state.get(p, []) for p in conv.source_patterns]
        if getattr(op, "inverse", False) or len(syms) != 2 or any(len(s) != 1 for s in syms):
            raise self._refuse(op, conv, "it needs the two query tensors, one each")
        (q,), (kv,) = syms
        pq, pkv = q.single(), kv.single()
        if pq is None or pkv is None or len({q.shape, kv.shape}) != 1 or len(q.shape) != 2:
            raise self._refuse(op, conv, f"tensors {[list(q.shape), list(kv.shape)]}")
        rows, width = q.shape
        if rows % 2 or pq.transpose or pkv.transpose or pq.rope or pkv.rope:
            raise self._refuse(op, conv, f"{rows} rows, or a transpose or permutation first")
        n = rows // 2
        pieces = tuple(
            replace(pc, part=(*pc.part, Span(0, first, n, 2)), into=(Select(1, at),))
            for at, (pc, first) in enumerate(((pq, 0), (pkv, 0), (pkv, 1), (pq, 1)))
        )
        return {conv.target_patterns[0]: [_Sym((n, 4, width), pieces)]}

    def _unpad(self, op: Any, conv: Any, target: str, sym: _Sym, pc: _Piece) -> _Sym:
        """transformers' vocabulary un-padding: the first rows of the source, as many as
        the config's ``unpadded_vocab_size`` (the model's rows), a plain row cut."""
        if getattr(op, "inverse", False):
            raise self._refuse(op, conv, "padding adds rows no file holds")
        if pc.transpose or (pc.rope is not None and pc.rope.dim == 0) or not sym.shape:
            raise self._refuse(op, conv, "a row cut after a transpose or row permutation")
        get_text = getattr(self.config, "get_text_config", None)
        text = get_text() if callable(get_text) else None
        rows = getattr(text, "unpadded_vocab_size", None)
        if not isinstance(rows, int):
            shape = self._model_shape(target)
            if shape is None or not shape:
                raise self._refuse(op, conv, f"the model has no tensor {target!r}")
            rows = shape[0]
        if not 0 <= rows <= sym.shape[0]:
            raise self._refuse(op, conv, f"{rows} rows kept of {sym.shape[0]}")
        cut = replace(pc, part=(Span(0, 0, rows), *pc.part))
        return _Sym((rows, *sym.shape[1:]), (cut,))

    def _one(self, op: Any, conv: Any, key: str, target: str, sym: _Sym) -> _Sym:
        """Transpose / PermuteForRope / Interleave / un-padding of one tensor made of one
        whole source."""
        kind = type(op).__name__
        if kind == "PermuteForRope" and op.permute_layer_names is not None:
            if not any(name in key for name in op.permute_layer_names):
                return sym
        pc = sym.single()
        if pc is None:
            raise self._refuse(op, conv, "it acts on a tensor built from several sources")
        if kind.endswith("UnpadVocab"):
            return self._unpad(op, conv, target, sym, pc)
        if kind == "Transpose":
            dims = {op.dim0 % max(len(sym.shape), 1), op.dim1 % max(len(sym.shape), 1)}
            if len(sym.shape) != 2 or dims != {0, 1}:
                raise self._refuse(op, conv, f"dims {op.dim0}, {op.dim1} of {list(sym.shape)}")
            if pc.rope is not None:
                raise self._refuse(op, conv, "a transpose after a row permutation")
            flipped = (sym.shape[1], sym.shape[0])
            if op.check_dims:
                if self._model_shape(target) == sym.shape:
                    return sym
            return _Sym(flipped, (replace(pc, transpose=not pc.transpose),))
        if pc.rope is not None:
            raise self._refuse(op, conv, "two row permutations")
        if kind == "Interleave":
            d = op.dim + len(sym.shape) if op.dim < 0 else op.dim
            if not 0 <= d < len(sym.shape):
                raise self._refuse(op, conv, f"dim {op.dim} of a {len(sym.shape)}-D tensor")
            rope = Rope(1, to_halves=not op.inverse, dim=d)
            return _Sym(sym.shape, (replace(pc, rope=rope),))
        config = self.config
        if op.subconfig_key is not None:
            config = getattr(config, op.subconfig_key, config)
        heads = getattr(config, "num_attention_heads", 1)
        if len(sym.shape) not in (1, 2):
            raise self._refuse(op, conv, f"a {len(sym.shape)}-D tensor")
        return _Sym(sym.shape, (replace(pc, rope=Rope(heads, to_halves=not op.inverse)),))

    def _model_shape(self, name: str) -> Shape | None:
        try:
            t = self.model.get_parameter(name)
        except AttributeError:
            try:
                t = self.model.get_buffer(name)  # type: ignore[assignment]
            except AttributeError:
                return None
        return tuple(t.shape)
