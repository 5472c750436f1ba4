"""Conversions in the rules text and the builder: stack / unstack, concatenate /
split, transpose and the rotary permutation, each applied by load_into and checked
against torch (or from_pretrained) byte for byte; bad parts are errors naming the
keys before anything is written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastckpt
from fastckpt import CheckpointError, Rules
from fastckpt.planning.mapping import Rope, Select, Span
from tests.conftest import same_bytes

TEXT = """\
l.{i}.experts.{e}.w1.weight -> l.{i}.gate_up stack[e] cat[0:8]
l.{i}.experts.{e}.w3.weight -> l.{i}.gate_up stack[e] cat[8:16]
l.{i}.experts.{e}.w2.weight -> l.{i}.down stack[e]
c.weight -> fc.weight transpose
qkv.weight -> q.weight, k.weight split[0:4|4:8]
wq.weight -> q_proj.weight rope[2]
q_proj.weight -> wq.weight unrope[2]
fused.weight -> a.weight dtype=bf16 split[:,0:3] transpose
"""


def test_the_text_round_trips_and_the_builder_writes_the_same():
    rules = Rules.parse(TEXT)
    assert str(rules) == TEXT
    assert Rules.parse(str(rules)) == rules
    built = (
        Rules()
        .convert("l.{i}.experts.{e}.w1.weight", "l.{i}.gate_up", stack="e", cat=slice(0, 8))
        .convert("l.{i}.experts.{e}.w3.weight", "l.{i}.gate_up", stack="e", cat=slice(8, 16))
        .convert("l.{i}.experts.{e}.w2.weight", "l.{i}.down", stack="e")
        .convert("c.weight", "fc.weight", transpose=True)
        .convert("qkv.weight", ["q.weight", "k.weight"], splits=[(0, 4), (4, 8)])
        .convert("wq.weight", "q_proj.weight", rope=2)
        .convert("q_proj.weight", "wq.weight", unrope=2)
        .convert("fused.weight", "a.weight", split=(1, slice(0, 3)), transpose=True, dtype="bf16")
    )
    assert built == rules


def test_the_plan_carries_the_regions():
    rules = Rules.parse(TEXT)
    src = ["l.3.experts.5.w1.weight", "l.3.experts.5.w3.weight", "c.weight", "wq.weight",
           "fused.weight", "qkv.weight"]  # fmt: skip
    plan = rules.plan(src, None)
    got = {(a.target, a.source): a for a in plan.assignments}
    a = got["l.3.gate_up", "l.3.experts.5.w1.weight"]
    assert (a.into, a.part) == ((Select(0, 5), Span(0, 0, 8)), None)
    assert got["l.3.gate_up", "l.3.experts.5.w3.weight"].into == (Select(0, 5), Span(0, 8, 8))
    assert got["fc.weight", "c.weight"].transpose
    assert got["q_proj.weight", "wq.weight"].rope == Rope(2, to_halves=True)
    f = got["a.weight", "fused.weight"]
    assert (f.part, f.transpose, f.dtype) == ((Span(1, 0, 3),), True, torch.bfloat16)
    assert got["q.weight", "qkv.weight"].part == (Span(0, 0, 4),)
    assert got["k.weight", "qkv.weight"].part == (Span(0, 4, 4),)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "a.{x}.w -> b stack[e]",
            r"<string>:1:\d+: 'stack\[e\]': the source pattern has no one-segment capture \{e\}",
        ),
        ("a -> b cat[0-8]", r"<string>:1:8: cat\[0-8\]: expected a range A:B with A <= B"),
        ("a -> b cat[8:2]", r"expected a range A:B with A <= B"),
        ("a -> b pick[e]", r"pick\[e\]: expected an index"),
        ("a -> b rope[0]", r"rope\[0\]: expected the number of heads"),
        ("a -> b rope[2] unrope[2]", r"a second rotary permutation"),
        ("a -> b rope[2] transpose", r"transpose must come before rope"),
        ("a -> b cat[1,0:2]", r"only ':' may come before the last index"),
        ("a -> b stack[]", r"'stack\[\]': empty \[...\]"),
        ("a -> b stack[e", r"expected one \[...\] at the end"),
    ],
)
def test_bad_conversions_name_the_line_and_column(line, message):
    with pytest.raises(CheckpointError, match=message):
        Rules.parse(line)


class Moe(nn.Module):
    """Stacked experts, the layout transformers v5 keeps: gate_up [E, 2I, H], down [E, H, I]."""

    def __init__(self, layers=2, experts=3, hidden=5, inner=8):
        super().__init__()
        self.l = nn.ModuleList(nn.Module() for _ in range(layers))
        for m in self.l:
            m.gate_up = nn.Parameter(torch.randn(experts, 2 * inner, hidden))
            m.down = nn.Parameter(torch.randn(experts, hidden, inner))


def per_expert_file(path, layers=2, experts=3, hidden=5, inner=8):
    g = torch.Generator().manual_seed(7)
    state = {}
    for i in range(layers):
        for e in range(experts):
            for w, shape in (
                ("w1", (inner, hidden)),
                ("w3", (inner, hidden)),
                ("w2", (hidden, inner)),
            ):
                state[f"l.{i}.experts.{e}.{w}.weight"] = torch.randn(*shape, generator=g)
    save_file(state, path)
    return state


STACK = """\
l.{i}.experts.{e}.w1.weight -> l.{i}.gate_up stack[e] cat[0:8]
l.{i}.experts.{e}.w3.weight -> l.{i}.gate_up stack[e] cat[8:16]
l.{i}.experts.{e}.w2.weight -> l.{i}.down stack[e]
"""


def test_stack_and_concatenate_experts(tmp_path):
    state = per_expert_file(tmp_path / "e.safetensors")
    model = Moe()
    report = fastckpt.load_into(model, tmp_path / "e.safetensors", rules=STACK)
    assert sorted(report.loaded) == ["l.0.down", "l.0.gate_up", "l.1.down", "l.1.gate_up"]
    assert report.rule_for["l.1.down"] == "l.{i}.experts.{e}.w2.weight -> l.{i}.down stack[e]"
    for i in range(2):
        w = {
            k: torch.stack([state[f"l.{i}.experts.{e}.{k}.weight"] for e in range(3)])
            for k in ("w1", "w2", "w3")
        }
        same_bytes(
            {"gate_up": torch.cat([w["w1"], w["w3"]], dim=1), "down": w["w2"]},
            {"gate_up": model.l[i].gate_up.detach(), "down": model.l[i].down.detach()},
        )


def test_and_back_by_unstack(tmp_path):
    model = Moe()
    save_file(
        {k: v.detach() for k, v in model.state_dict().items()}, tmp_path / "stacked.safetensors"
    )
    flat = nn.Module()
    flat.l = nn.ModuleList(nn.Module() for _ in range(2))
    rules = Rules()
    for i in range(2):
        flat.l[i].experts = nn.ModuleList(nn.Module() for _ in range(3))
        for ex in flat.l[i].experts:
            ex.w1, ex.w3, ex.w2 = (
                nn.Linear(5, 8, bias=False),
                nn.Linear(5, 8, bias=False),
                nn.Linear(8, 5, bias=False),
            )
        rules = rules.unstack(
            f"l.{i}.gate_up",
            [f"l.{i}.experts.{{e}}.w1.weight", f"l.{i}.experts.{{e}}.w3.weight"],
            3,
            splits=[(0, 8), (8, 16)],
        )
        rules = rules.unstack(f"l.{i}.down", f"l.{i}.experts.{{e}}.w2.weight", 3)
    report = fastckpt.load_into(flat, tmp_path / "stacked.safetensors", rules=rules)
    assert report.missing == [] and report.unexpected == []
    for i in range(2):
        for e, ex in enumerate(flat.l[i].experts):
            same_bytes(
                {
                    "w1": model.l[i].gate_up[e, :8],
                    "w3": model.l[i].gate_up[e, 8:],
                    "w2": model.l[i].down[e],
                },
                {"w1": ex.w1.weight, "w3": ex.w3.weight, "w2": ex.w2.weight},
            )


def test_a_missing_or_extra_expert_is_an_error_before_any_write(tmp_path):
    state = per_expert_file(tmp_path / "e.safetensors")
    del state["l.1.experts.1.w2.weight"]
    save_file(state, tmp_path / "missing.safetensors")
    model = Moe()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        CheckpointError,
        match=r"missing.safetensors: l.1.down: no source for index 1 of dim 0 \(2 of 3 stacked: "
        r"l.1.experts.0.w2.weight, l.1.experts.2.w2.weight\)",
    ):
        fastckpt.load_into(model, tmp_path / "missing.safetensors", rules=STACK)
    state = per_expert_file(tmp_path / "e.safetensors")
    state["l.0.experts.3.w2.weight"] = state["l.0.experts.0.w2.weight"].clone()
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"l.0.down: l.0.experts.3.w2.weight is stacked at index 3, dim 0 has 3 entries",
    ):
        fastckpt.load_into(model, tmp_path / "extra.safetensors", rules=STACK)
    with pytest.raises(
        CheckpointError,
        match=r"l.0.experts.0.w3.weight -> l.0.gate_up \(l.{i}.experts.{e}.w3.weight -> "
        r"l.{i}.gate_up stack\[e\] cat\[9:16\]\): the source piece is \[8, 5\], its place "
        r"in the target \[3, 16, 5\] is \[7, 5\]",
    ):
        fastckpt.load_into(model, tmp_path / "e.safetensors", rules=STACK.replace("8:16", "9:16"))
    no_up = "".join(line + "\n" for line in STACK.splitlines() if ".w3." not in line)
    with pytest.raises(
        CheckpointError, match=r"l.0.gate_up: its parts \(.*\) fill 120 of its 240 elements"
    ):
        fastckpt.load_into(model, tmp_path / "e.safetensors", rules=no_up)
    same_bytes(before, {k: v.detach() for k, v in model.state_dict().items()})


class Conv1DGPT(nn.Module):
    """GPT-2's Conv1D keeps weights as [in, out]; this one has nn.Linear ([out, in])."""

    def __init__(self, hidden=6):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.proj = nn.Linear(hidden, hidden)


def test_gpt2_conv1d_fused_qkv_into_linears_and_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=6, n_layer=1, n_head=2, vocab_size=20, n_positions=8)
    gpt = transformers.GPT2Model(cfg)
    sd = {k: v.detach().contiguous() for k, v in gpt.state_dict().items()}
    save_file(sd, tmp_path / "gpt2.safetensors")
    text = """\
h.0.attn.c_attn.weight -> q.weight, k.weight, v.weight split[:,0:6|6:12|12:18] transpose
h.0.attn.c_attn.bias -> q.bias, k.bias, v.bias split[0:6|6:12|12:18]
h.0.attn.c_proj.weight -> proj.weight transpose
h.0.attn.c_proj.bias -> proj.bias
ignore **
"""
    model = Conv1DGPT()
    report = fastckpt.load_into(model, tmp_path / "gpt2.safetensors", rules=text, strict=False)
    assert report.missing == []
    w, b = sd["h.0.attn.c_attn.weight"], sd["h.0.attn.c_attn.bias"]
    for k, lin in enumerate((model.q, model.k, model.v)):
        same_bytes({"w": w[:, 6 * k : 6 * k + 6].t(), "b": b[6 * k : 6 * k + 6]},
                   {"w": lin.weight.detach(), "b": lin.bias.detach()})  # fmt: skip
    same_bytes({"w": sd["h.0.attn.c_proj.weight"].t()}, {"w": model.proj.weight.detach()})
    # Linear -> Conv1D: three sources concatenated along dim 1, transposed
    save_file(
        {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        tmp_path / "lin.safetensors",
    )
    back = "\n".join(
        [f"{n}.weight -> h.0.attn.c_attn.weight transpose cat[:,{6 * k}:{6 * k + 6}]"
         for k, n in enumerate("qkv")]
        + [f"{n}.bias -> h.0.attn.c_attn.bias cat[{6 * k}:{6 * k + 6}]"
           for k, n in enumerate("qkv")]
        + ["proj.weight -> h.0.attn.c_proj.weight transpose", "proj.bias -> h.0.attn.c_proj.bias"]
    )  # fmt: skip
    gpt2 = transformers.GPT2Model(cfg)
    with pytest.warns(fastckpt.UninitializedWarning):
        fastckpt.load_into(gpt2, tmp_path / "lin.safetensors", rules=back, strict=False)
    for k in ("h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias", "h.0.attn.c_proj.weight"):
        same_bytes({k: sd[k]}, {k: gpt2.state_dict()[k]})


def meta_layout(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def test_meta_llama_into_llama_for_causal_lm_and_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg)
    sd = hf.state_dict()
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
            "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}  # fmt: skip
    for i in range(2):
        p = f"model.layers.{i}"
        meta[f"layers.{i}.attention.wq.weight"] = meta_layout(sd[f"{p}.self_attn.q_proj.weight"], 4)
        meta[f"layers.{i}.attention.wk.weight"] = meta_layout(sd[f"{p}.self_attn.k_proj.weight"], 2)
        meta[f"layers.{i}.attention.wv.weight"] = sd[f"{p}.self_attn.v_proj.weight"]
        meta[f"layers.{i}.attention.wo.weight"] = sd[f"{p}.self_attn.o_proj.weight"]
        for a, b in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            meta[f"layers.{i}.feed_forward.{a}.weight"] = sd[f"{p}.mlp.{b}.weight"]
        meta[f"layers.{i}.attention_norm.weight"] = sd[f"{p}.input_layernorm.weight"]
        meta[f"layers.{i}.ffn_norm.weight"] = sd[f"{p}.post_attention_layernorm.weight"]
    save_file({k: v.contiguous() for k, v in meta.items()}, tmp_path / "consolidated.safetensors")
    rules = """\
tok_embeddings.weight -> model.embed_tokens.weight
norm.weight -> model.norm.weight
output.weight -> lm_head.weight
layers.{i}.attention.wq.weight -> model.layers.{i}.self_attn.q_proj.weight rope[4]
layers.{i}.attention.wk.weight -> model.layers.{i}.self_attn.k_proj.weight rope[2]
layers.{i}.attention.wv.weight -> model.layers.{i}.self_attn.v_proj.weight
layers.{i}.attention.wo.weight -> model.layers.{i}.self_attn.o_proj.weight
layers.{i}.feed_forward.w1.weight -> model.layers.{i}.mlp.gate_proj.weight
layers.{i}.feed_forward.w2.weight -> model.layers.{i}.mlp.down_proj.weight
layers.{i}.feed_forward.w3.weight -> model.layers.{i}.mlp.up_proj.weight
layers.{i}.attention_norm.weight -> model.layers.{i}.input_layernorm.weight
layers.{i}.ffn_norm.weight -> model.layers.{i}.post_attention_layernorm.weight
"""
    fresh = transformers.LlamaForCausalLM(cfg)
    fastckpt.load_into(fresh, tmp_path / "consolidated.safetensors", rules=rules)
    same_bytes(sd, fresh.state_dict())
    # and back: the model's state into Meta's layout
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "hf.safetensors")
    holder = nn.Module()
    for k, v in meta.items():
        holder.register_buffer(k.replace(".", "_"), torch.zeros_like(v))
    inverse = Rules()
    for i in range(2):
        inverse = inverse.convert(
            f"model.layers.{i}.self_attn.q_proj.weight", f"layers_{i}_attention_wq_weight", unrope=4
        )
        inverse = inverse.convert(
            f"model.layers.{i}.self_attn.k_proj.weight", f"layers_{i}_attention_wk_weight", unrope=2
        )
    inverse = inverse.ignore("**")
    with pytest.warns(fastckpt.UninitializedWarning):
        fastckpt.load_into(holder, tmp_path / "hf.safetensors", rules=inverse, strict=False)
    for i in range(2):
        for w in ("wq", "wk"):
            same_bytes({w: meta[f"layers.{i}.attention.{w}.weight"]},
                       {w: getattr(holder, f"layers_{i}_attention_{w}_weight")})  # fmt: skip


def test_transpose_of_a_tensor_that_is_not_2d_names_the_keys(tmp_path):
    save_file({"c.weight": torch.zeros(2, 3, 4)}, tmp_path / "c.safetensors")
    model = nn.Module()
    model.register_buffer("w", torch.zeros(4, 3, 2))
    with pytest.raises(
        CheckpointError,
        match=r"c.weight -> w \(c.weight -> w transpose\): transpose needs a 2-D tensor, "
        r"the source piece is \[2, 3, 4\]",
    ):
        fastckpt.load_into(model, tmp_path / "c.safetensors", rules="c.weight -> w transpose")


def test_a_smaller_source_fills_the_first_rows_of_a_grown_vocabulary(tmp_path):
    """Into a larger target: the rule places the 50 rows, rows 50:60 are reported."""
    small = torch.randn(50, 4)
    save_file({"emb.weight": small, "head.weight": torch.randn(3, 4)}, tmp_path / "v.safetensors")
    model = nn.Module()
    model.emb = nn.Embedding(60, 4)
    model.head = nn.Linear(4, 3, bias=False)
    grown = model.emb.weight.detach()[50:].clone()
    with pytest.raises(fastckpt.StrictLoadError, match="emb.weight"):
        fastckpt.load_into(model, tmp_path / "v.safetensors")  # no rule: a shape mismatch
    report = fastckpt.load_into(
        model, tmp_path / "v.safetensors", rules="emb.weight -> emb.weight cat[0:50]"
    )
    assert report.partly_loaded == [("emb.weight", "rows 50:60")]
    assert "emb.weight (rows 50:60 not loaded)" in str(report)
    same_bytes(
        {"a": small, "b": grown},
        {"a": model.emb.weight.detach()[:50], "b": model.emb.weight.detach()[50:]},
    )
    # a part beyond the source is an error naming its rows
    with pytest.raises(
        CheckpointError,
        match=r"the source piece is \[50, 4\], its place in the target \[60, 4\] is \[55, 4\]",
    ):
        fastckpt.load_into(
            model, tmp_path / "v.safetensors", rules="emb.weight -> emb.weight cat[0:55]"
        )
    with pytest.raises(CheckpointError, match=r"rows\[0:55\] is beyond the source's 50 rows"):
        fastckpt.load_into(
            model, tmp_path / "v.safetensors", rules="emb.weight -> emb.weight rows[:55] cat[0:55]"
        )


def test_a_stack_capture_that_is_not_a_number_is_an_error():
    with pytest.raises(
        CheckpointError,
        match=r"experts.gate.w: stack\[e\] needs a number where \{e\} matches, not 'gate'",
    ):
        Rules.parse("experts.{e}.w -> t stack[e]").plan(["experts.gate.w"], None)
