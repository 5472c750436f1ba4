"""fastckpt.planning.views against torch: stack / unstack, cat / split / chunk, t(), and the
rotary permutation of transformers' Llama conversion, each as a strided read of a
source's storage into a view of the destination; bad parts fail before a write."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastckpt import CheckpointError
from fastckpt.planning.mapping import Assignment, Rope, RowSelection, Select, Span
from fastckpt.planning.views import check_parts, dense_strides, read_shape, source_view, target_view


def copy(src: torch.Tensor, dst: torch.Tensor, asg: Assignment) -> None:
    """What the copy engine does with the views: read the source's storage through
    source_view, write the destination region target_view, in row-major order."""
    offset, shape, strides = source_view(src.storage_offset(), tuple(src.shape), src.stride(), asg)
    storage = torch.as_strided(
        src, (src.untyped_storage().nbytes() // src.element_size(),), (1,), 0
    )
    piece = torch.as_strided(storage, shape, strides, offset)
    region = target_view(dst, asg)
    assert tuple(region.shape) == tuple(piece.shape)
    assert region.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr()  # a view
    region.copy_(piece)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def meta_to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf ``permute``."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.view(heads, rows // heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def hf_to_meta(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.view(heads, 2, rows // heads // 2, *rest).transpose(1, 2).reshape(rows, *rest)


dims = st.integers(1, 5)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), shape=st.lists(dims, min_size=1, max_size=3), seed=st.integers(0, 99))
def test_stack_and_unstack(n, shape, seed):
    g = torch.Generator().manual_seed(seed)
    experts = [torch.randn(*shape, generator=g) for _ in range(n)]
    stacked = torch.stack(experts)
    out = torch.full_like(stacked, float("nan"))
    asgs = [Assignment("t", f"e.{e}", into=Select(0, e)) for e in range(n)]
    assert check_parts("t", stacked.shape, asgs, {f"e.{e}": shape for e in range(n)}) == []
    for e, a in enumerate(asgs):
        copy(experts[e], out, a)
    assert same(out, stacked)
    for e in range(n):  # and back: one stacked source feeds n targets
        piece = torch.empty(shape)
        copy(stacked, piece, Assignment(f"e.{e}", "t", part=Select(0, e)))
        assert same(piece, experts[e])


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(dims, min_size=1, max_size=4),
    other=st.lists(dims, min_size=1, max_size=2),
    dim=st.integers(0, 2),
    seed=st.integers(0, 99),
)
def test_concatenate_and_split(sizes, other, dim, seed):
    dim = dim % (len(other) + 1)
    g = torch.Generator().manual_seed(seed)
    shapes = [tuple(other[:dim]) + (s,) + tuple(other[dim:]) for s in sizes]
    parts = [torch.randn(*s, generator=g) for s in shapes]
    fused = torch.cat(parts, dim)
    out = torch.full_like(fused, float("nan"))
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    asgs = [
        Assignment("t", f"p{k}", into=Span(dim, starts[k], sizes[k])) for k in range(len(sizes))
    ]
    assert (
        check_parts("t", fused.shape, asgs, {f"p{k}": shapes[k] for k in range(len(sizes))}) == []
    )
    for k, a in enumerate(asgs):
        copy(parts[k], out, a)
    assert same(out, fused)
    for k, ref in enumerate(torch.split(fused, sizes, dim)):
        piece = torch.empty(shapes[k])
        copy(fused, piece, Assignment(f"p{k}", "t", part=Span(dim, starts[k], sizes[k])))
        assert same(piece, ref)


def test_chunk_like_transformers_gate_up():
    fused = torch.randn(12, 5)  # gate_up_proj rows: gate then up
    for k, ref in enumerate(fused.chunk(2, 0)):
        piece = torch.empty(6, 5)
        copy(fused, piece, Assignment(f"c{k}", "gate_up", part=Span(0, 6 * k, 6)))
        assert same(piece, ref)


@settings(max_examples=30, deadline=None)
@given(r=dims, c=dims, seed=st.integers(0, 99))
def test_transpose(r, c, seed):
    w = torch.randn(r, c, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(c, r)
    copy(w, out, Assignment("t", "s", transpose=True))
    assert same(out, w.t())


@settings(max_examples=40, deadline=None)
@given(
    heads=st.integers(1, 4),
    half=st.integers(1, 4),
    cols=st.sampled_from([None, 1, 3, 8]),
    seed=st.integers(0, 99),
)
def test_rope_permutation_matches_the_llama_conversion_both_ways(heads, half, cols, seed):
    rows = heads * 2 * half
    shape = (rows,) if cols is None else (rows, cols)
    meta = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    hf = torch.empty(shape)
    copy(meta, hf, Assignment("q_proj.weight", "wq.weight", rope=Rope(heads, to_halves=True)))
    assert same(hf, meta_to_hf(meta, heads))
    back = torch.empty(shape)
    copy(hf, back, Assignment("wq.weight", "q_proj.weight", rope=Rope(heads, to_halves=False)))
    assert same(back, meta)
    assert same(hf_to_meta(meta_to_hf(meta, heads), heads), meta)  # the reference round-trips too


def test_conv1d_fused_qkv_split_and_transposed_into_linears():
    """GPT-2 c_attn (Conv1D, [in, 3*out]) -> three nn.Linear weights [out, in]."""
    c = 6
    c_attn = torch.randn(c, 3 * c)
    for k, ref in enumerate(c_attn.split(c, dim=1)):
        out = torch.empty(c, c)
        a = Assignment(f"l{k}.weight", "c_attn.weight", part=Span(1, k * c, c), transpose=True)
        assert read_shape(c_attn.shape, a) == (c, c)
        copy(c_attn, out, a)
        assert same(out, ref.t())


def test_meta_wq_wk_wv_into_a_fused_qkv_with_rope_on_q_and_k():
    heads, kv_heads, hd, hidden = 4, 2, 6, 10
    wq, wk, wv = (torch.randn(h * hd, hidden) for h in (heads, kv_heads, kv_heads))
    fused = torch.full(((heads + 2 * kv_heads) * hd, hidden), float("nan"))
    nq, nk = heads * hd, kv_heads * hd
    asgs = [
        Assignment("qkv", "wq", into=Span(0, 0, nq), rope=Rope(heads)),
        Assignment("qkv", "wk", into=Span(0, nq, nk), rope=Rope(kv_heads)),
        Assignment("qkv", "wv", into=Span(0, nq + nk, nk)),
    ]
    check_parts("qkv", fused.shape, asgs, {"wq": wq.shape, "wk": wk.shape, "wv": wv.shape})
    for src, a in zip((wq, wk, wv), asgs, strict=True):
        copy(src, fused, a)
    ref = torch.cat([meta_to_hf(wq, heads), meta_to_hf(wk, kv_heads), wv])
    assert same(fused, ref)


def test_a_source_that_is_a_view_of_a_larger_storage():
    """Offsets and strides come from the source: a tensor inside a bigger storage."""
    storage = torch.randn(200)
    src = torch.as_strided(storage, (3, 4, 5), (40, 5, 1), 17)  # experts x rows x cols
    for e in range(3):
        out = torch.empty(5, 4)
        copy(src, out, Assignment("t", "s", part=Select(0, e), transpose=True))
        assert same(out, src[e].t())


def test_rows_then_part():
    w = torch.randn(10, 4)
    out = torch.empty(3, 4)
    copy(w, out, Assignment("t", "s", rows=RowSelection(2, 8), part=Span(0, 1, 3)))
    assert same(out, w[2:8][1:4])


def test_a_smaller_source_fills_the_first_rows_of_a_larger_target():
    w = torch.randn(5, 3)
    big = torch.zeros(8, 3)
    a = Assignment("emb", "emb", into=Span(0, 0, 5))
    assert check_parts("emb", big.shape, [a], {"emb": w.shape}, partial=True) == [Span(0, 5, 3)]
    copy(w, big, a)
    assert same(big[:5], w) and same(big[5:], torch.zeros(3, 3))
    with pytest.raises(
        CheckpointError, match=r"emb: its parts \(emb\) add up to 5 along dim 0, the target has 8"
    ):
        check_parts("emb", big.shape, [a], {"emb": w.shape})


def test_dense_strides():
    assert dense_strides((2, 3, 4)) == (12, 4, 1)
    assert dense_strides(()) == ()
    assert torch.empty(2, 0, 3).stride() == dense_strides((2, 0, 3))


# -- bad parts: errors name the keys, before anything is written -------------------


def experts(indices, n=4, shape=(2, 3)):
    asgs = [
        Assignment("moe.w", f"experts.{i}.w", "experts.{e}.w -> moe.w stack[e]", into=Select(0, i))
        for i in indices
    ]
    return asgs, {a.source: shape for a in asgs}, (n,) + shape


def test_a_missing_expert():
    asgs, shapes, target = experts([0, 1, 3])
    with pytest.raises(
        CheckpointError,
        match=r"moe.w: no source for index 2 of dim 0 \(3 of 4 stacked: "
        r"experts.0.w, experts.1.w, experts.3.w\)",
    ):
        check_parts("moe.w", target, asgs, shapes)
    assert check_parts("moe.w", target, asgs, shapes, partial=True) == [Span(0, 2, 1)]


def test_a_duplicated_expert():
    a0 = Assignment("moe.w", "a.w", into=Select(0, 1))
    a1 = Assignment("moe.w", "b.w", into=Select(0, 1))
    with pytest.raises(CheckpointError, match="moe.w: index 1 is given twice, by a.w and b.w"):
        check_parts("moe.w", (2, 3), [a1, a0])


def test_an_expert_index_beyond_the_target():
    asgs, shapes, target = experts([0, 1, 2, 3, 4])
    with pytest.raises(
        CheckpointError, match="moe.w: experts.4.w is stacked at index 4, dim 0 has 4 entries"
    ):
        check_parts("moe.w", target, asgs, shapes)


def test_an_expert_of_the_wrong_shape():
    asgs, shapes, target = experts([0, 1, 2, 3])
    shapes["experts.2.w"] = (3, 3)
    with pytest.raises(
        CheckpointError,
        match=r"experts.2.w -> moe.w \(experts.{e}.w -> moe.w stack\[e\]\): "
        r"the source piece is \[3, 3\], its place in the target \[4, 2, 3\] is \[2, 3\]",
    ):
        check_parts("moe.w", target, asgs, shapes)


def test_parts_that_do_not_add_up():
    gate = Assignment("gate_up", "gate", into=Span(0, 0, 4))
    up = Assignment("gate_up", "up", into=Span(0, 4, 4))
    with pytest.raises(
        CheckpointError,
        match=r"gate_up: its parts \(gate, up\) add up to 8 along dim 0, the target has 10",
    ):
        check_parts("gate_up", (10, 3), [up, gate])
    with pytest.raises(CheckpointError, match="gate and up overlap at 3 along dim 0"):
        check_parts("gate_up", (8, 3), [gate, Assignment("gate_up", "up", into=Span(0, 3, 5))])
    with pytest.raises(CheckpointError, match=r"up fills \[4:9\] of dim 0, which has 8"):
        check_parts("gate_up", (8, 3), [gate, Assignment("gate_up", "up", into=Span(0, 4, 5))])


def test_mixed_kinds_and_several_whole_sources():
    with pytest.raises(CheckpointError, match="mix stacking and concatenation"):
        check_parts(
            "t",
            (2, 3),
            [Assignment("t", "a", into=Select(0, 0)), Assignment("t", "b", into=Span(0, 1, 1))],
        )
    with pytest.raises(CheckpointError, match=r"t: several sources for one target \(a, b\)"):
        check_parts("t", (2, 3), [Assignment("t", "a"), Assignment("t", "b", into=Span(0, 1, 1))])


def test_a_transpose_of_a_tensor_that_is_not_2d():
    a = Assignment("conv.weight", "c.weight", "c.{p} -> conv.{p} transpose", transpose=True)
    with pytest.raises(
        CheckpointError,
        match=r"c.weight -> conv.weight \(c.{p} -> conv.{p} transpose\): "
        r"transpose needs a 2-D tensor, the source piece is \[2, 3, 4\]",
    ):
        check_parts("conv.weight", (4, 3, 2), [a], {"c.weight": (2, 3, 4)})
    with pytest.raises(CheckpointError, match="transpose needs a 2-D tensor"):
        source_view(0, (5,), (1,), a)


def test_rope_rows_that_do_not_split_into_heads():
    a = Assignment("q", "wq", rope=Rope(4))
    with pytest.raises(
        CheckpointError,
        match=r"wq -> q: the rotary permutation needs rows divisible by 2 x heads "
        r"\(4 heads\), the tensor has 12",
    ):
        source_view(0, (12, 3), (3, 1), a)
    with pytest.raises(CheckpointError, match="divisible by 2 x heads"):
        target_view(torch.empty(12, 3), a)


def test_regions_out_of_range():
    with pytest.raises(
        CheckpointError, match=r"s -> t: part \[5\] is out of range: dim 0 has 3 entries"
    ):
        source_view(0, (3, 2), (2, 1), Assignment("t", "s", part=Select(0, 5)))
    with pytest.raises(CheckpointError, match=r"part \[dim 2: 0:1\] names dim 2 of a 2-D tensor"):
        source_view(0, (3, 2), (2, 1), Assignment("t", "s", part=Span(2, 0, 1)))
    with pytest.raises(CheckpointError, match=r"into \[1:4\] is out of range: dim 0 has 3 entries"):
        target_view(torch.empty(3, 2), Assignment("t", "s", into=Span(0, 1, 3)))
    with pytest.raises(CheckpointError, match=r"rows\[0:12\] is beyond the source's 10 rows"):
        source_view(0, (10, 2), (2, 1), Assignment("t", "s", rows=RowSelection(0, 12)))


def mixtral_pieces(n_experts: int, inner: int, hidden: int) -> list[Assignment]:
    """w1 (gate) and w3 (up) of each expert into gate_up_proj [E, 2I, H], as transformers
    does: MergeModulelist(dim=0) then Concatenate(dim=1)."""
    out = []
    for e in range(n_experts):
        for k, w in enumerate(("w1", "w3")):
            out.append(
                Assignment(
                    "gate_up", f"experts.{e}.{w}", into=(Select(0, e), Span(0, k * inner, inner))
                )
            )
    return out


def test_stack_then_concatenate_like_mixtral_gate_up():
    n, inner, hidden = 3, 4, 5
    g = torch.Generator().manual_seed(0)
    w = {
        f"experts.{e}.{k}": torch.randn(inner, hidden, generator=g)
        for e in range(n)
        for k in ("w1", "w3")
    }
    ref = torch.cat(
        [
            torch.stack([w[f"experts.{e}.w1"] for e in range(n)]),
            torch.stack([w[f"experts.{e}.w3"] for e in range(n)]),
        ],
        dim=1,
    )
    out = torch.full_like(ref, float("nan"))
    asgs = mixtral_pieces(n, inner, hidden)
    assert check_parts("gate_up", ref.shape, asgs, {k: v.shape for k, v in w.items()}) == []
    for a in asgs:
        copy(w[a.source], out, a)
    assert same(out, ref)


def test_nested_pieces_missing_or_twice():
    asgs = mixtral_pieces(3, 4, 5)
    with pytest.raises(
        CheckpointError, match=r"gate_up: its parts \(.*\) fill 100 of its 120 elements \[3, 8, 5\]"
    ):
        check_parts("gate_up", (3, 8, 5), asgs[:-1])
    twice = asgs[:-1] + [Assignment("gate_up", "dup", into=(Select(0, 0), Span(0, 0, 4)))]
    with pytest.raises(
        CheckpointError,
        match=r"gate_up: (dup and experts.0.w1|experts.0.w1 and dup) fill the same region",
    ):
        check_parts("gate_up", (3, 8, 5), twice)
    with pytest.raises(
        CheckpointError, match=r"gate_up: experts.9.w1 is stacked at index 9, dim 0 has 3 entries"
    ):
        check_parts(
            "gate_up",
            (3, 8, 5),
            [Assignment("gate_up", "experts.9.w1", into=(Select(0, 9), Span(0, 0, 4)))],
        )
