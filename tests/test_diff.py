"""diff: names, shapes, dtypes, streamed values; the CLI; story 3's freeze check."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

import fastckpt
from fastckpt.cli.app import app
from fastckpt.planning.mapping import Assignment, MappingPlan, RowSelection
from fastckpt.suggest.renames import suggest_rules
from tests.conftest import tf_names

diff_mod = importlib.import_module("fastckpt.tools.diff")


def _layers(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        out[f"encoder.layers.{i}.fc1.weight"] = torch.randn(6, 4, generator=g)
        out[f"encoder.layers.{i}.fc2.weight"] = torch.randn(4, 6, generator=g)
    out["embed.weight"] = torch.randn(10, 4, generator=g)
    return out


@pytest.fixture
def pair(tmp_path):
    a = _layers(12, 0)
    b = {k: v.clone() for k, v in a.items()}
    for i in range(12):
        b[f"encoder.layers.{i}.fc1.weight"][0, 0] += 0.5
    b["embed.weight"] = torch.zeros(9, 4)
    b["head.weight"] = torch.zeros(2)
    b["encoder.layers.3.fc2.weight"] = b["encoder.layers.3.fc2.weight"].half()
    del b["encoder.layers.11.fc2.weight"]
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    return tmp_path / "a.safetensors", tmp_path / "b.safetensors", a, b


def test_names_shapes_dtypes(pair):
    pa, pb, _, _ = pair
    r = fastckpt.diff(pa, pb)
    assert r.only_in_a == ["encoder.layers.11.fc2.weight"]
    assert r.only_in_b == ["head.weight"]
    assert [(d.a, d.a_shape, d.b_shape) for d in r.shape_mismatch] == [
        ("embed.weight", (10, 4), (9, 4))
    ]
    assert [(d.a, d.a_dtype, d.b_dtype) for d in r.dtype_mismatch] == [
        ("encoder.layers.3.fc2.weight", torch.float32, torch.float16)
    ]
    assert not r.equal
    assert r.changed == []  # values not compared


def test_streamed_values_in_small_chunks(pair, monkeypatch):
    pa, pb, a, b = pair
    monkeypatch.setattr(diff_mod, "CHUNK_ELEMENTS", 5)  # many chunks, rows split across them
    r = fastckpt.diff(pa, pb, values=True)
    changed = {d.a: d for d in r.changed}
    assert sorted(changed) == sorted(f"encoder.layers.{i}.fc1.weight" for i in range(12))
    d = changed["encoder.layers.0.fc1.weight"]
    want = (a[d.a] - b[d.a]).abs().max().item()
    assert d.max_abs_diff == pytest.approx(want, rel=0, abs=0)
    x, y = a[d.a][0, 0].double(), b[d.a][0, 0].double()
    assert d.max_rel_diff == pytest.approx(float((x - y).abs() / max(x.abs(), y.abs())))
    same = {d.a for d in r.unchanged}
    assert "encoder.layers.0.fc2.weight" in same
    assert all(d.bit_equal for d in r.unchanged)


def test_grouped_table_collapses_layer_numbers(pair):
    pa, pb, _, _ = pair
    text = str(fastckpt.diff(pa, pb, values=True))
    assert "encoder.layers.{0..11}.fc1.weight" in text
    assert "encoder.layers.{0..2,4..10}.fc2.weight" in text
    line = next(ln for ln in text.splitlines() if "{0..11}.fc1" in ln)
    assert "changed" in line and "max abs 0.5" in line
    assert text.splitlines()[-1] == (
        "DIFFERENT: 24 in both, 1 only in a, 1 only in b, 1 shape, 1 dtype differences, "
        "12 changed, 10 equal"
    )


def test_atol_and_nan_handling():
    a = {"x": torch.tensor([1.0, float("nan"), float("inf"), 0.0])}
    b = {"x": torch.tensor([1.0 + 1e-6, float("nan"), float("inf"), -0.0])}
    r = fastckpt.diff(a, b, values=True)
    assert not r.equal and r.changed[0].max_abs_diff == 2.0**-20  # float32 spacing at 1.0
    assert fastckpt.diff(a, b, values=True, atol=1e-5).equal
    r = fastckpt.diff({"x": torch.tensor([1.0])}, {"x": torch.tensor([float("nan")])}, values=True)
    assert r.changed[0].max_abs_diff == float("inf")
    assert json.dumps(r.to_dict())  # inf is written as a string, still valid JSON


def test_model_against_checkpoint_and_rules_object(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4))
    save_file(
        {
            "net.0.weight": model[0].weight.detach().clone(),
            "net.0.bias": model[0].bias.detach().clone(),
            "emb": torch.arange(20.0).reshape(5, 4),
        },
        tmp_path / "c.safetensors",
    )
    assert fastckpt.diff(tmp_path / "c.safetensors", model).only_in_b == ["0.weight", "0.bias"]

    class StripNet:  # a test double for a rules object
        def plan(self, source_keys, target_keys):
            return MappingPlan(
                assignments=[
                    Assignment(k.removeprefix("net."), k, rule="net.{r*} -> {r*}")
                    for k in source_keys
                    if k.startswith("net.")
                ],
                ignored_sources=["emb"],
            )

    r = fastckpt.diff(tmp_path / "c.safetensors", model, rules=StripNet(), values=True)
    assert r.equal and len(r.unchanged) == 2

    class Rows:
        def plan(self, source_keys, target_keys):
            return MappingPlan(
                [
                    Assignment("emb", "emb", rows=RowSelection(1, 3)),
                    Assignment("emb2", "emb", rows=RowSelection(index=(4, 0))),
                ]
            )

    target = {
        "emb": torch.arange(4.0, 12.0).reshape(2, 4),
        "emb2": torch.cat([torch.arange(16.0, 20.0), torch.arange(4.0)]).reshape(2, 4),
    }
    r = fastckpt.diff(tmp_path / "c.safetensors", target, rules=Rows(), values=True)
    assert r.changed == [] and len(r.unchanged) == 2
    assert sorted(r.only_in_a) == ["net.0.bias", "net.0.weight"]


def test_story3_frozen_body_unchanged_head_changed(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg)
    model.save_pretrained(tmp_path / "before")
    fastckpt.freeze(model, "bert.*")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 40, (4, 6))
    model(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path / "after")
    r = fastckpt.diff(tmp_path / "before", tmp_path / "after", values=True)
    assert sorted(d.a for d in r.changed) == ["classifier.bias", "classifier.weight"]
    assert all(d.bit_equal for d in r.compared if d.a.startswith("bert."))
    assert len(r.unchanged) == len(r.compared) - 2
    text = str(r)
    assert "bert.encoder.layer.{0..1}.attention.self.query.weight" in text

    runner = CliRunner()
    res = runner.invoke(
        app, ["diff", str(tmp_path / "before"), str(tmp_path / "after"), "--values", "--json"]
    )
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert not doc["equal"]
    assert sorted(t["a"] for t in doc["tensors"] if t["status"] == "changed") == [
        "classifier.bias",
        "classifier.weight",
    ]
    res = runner.invoke(
        app, ["diff", str(tmp_path / "before"), str(tmp_path / "before"), "--values"]
    )
    assert res.exit_code == 0, res.output
    assert "EQUAL" in res.stdout


def test_cli_errors_exit_2(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["diff", str(tmp_path / "nope.safetensors"), str(tmp_path)])
    assert res.exit_code == 2
    assert "no such checkpoint file or folder" in res.output


# -- diff --suggest: the strict-mode suggestion as a rules file ----------------------


def _ddp_pair(tmp_path):
    g = torch.Generator().manual_seed(3)
    plain = {
        "enc.layers.0.LayerNorm.weight": torch.randn(4, generator=g),
        "enc.layers.0.LayerNorm.bias": torch.randn(4, generator=g),
        "enc.layers.0.fc.weight": torch.randn(4, 4, generator=g),
        "enc.layers.1.LayerNorm.weight": torch.randn(4, generator=g),
        "enc.layers.1.LayerNorm.bias": torch.randn(4, generator=g),
        "enc.layers.1.fc.weight": torch.randn(4, 4, generator=g),
    }
    ddp = tf_names(plain, prefix="module.")
    ddp["module.head.weight"] = torch.randn(2, 4, generator=g)  # the model has no head
    save_file(ddp, tmp_path / "ddp.safetensors")
    save_file(plain, tmp_path / "plain.safetensors")
    return tmp_path / "ddp.safetensors", tmp_path / "plain.safetensors", ddp, plain


SUGGESTED = """\
# fastckpt diff --suggest: rules loading {a} into {b}
# strip prefix 'module.' and rename 'gamma' -> 'weight', 'beta' -> 'bias': matches 6/6 keys
# ignore module.head.**: skips 1 checkpoint keys nothing uses
ignore module.head.**
module.{{p*}}.gamma -> {{p*}}.weight
module.{{p*}}.beta -> {{p*}}.bias
module.{{rest*}} -> {{rest*}}
"""


def test_cli_suggest_prints_a_rules_file_that_makes_the_checkpoints_equal(tmp_path):
    pa, pb, _, _ = _ddp_pair(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["diff", str(pa), str(pb), "--suggest"])
    assert res.exit_code == 1, res.output  # they differ (by name) without the rules
    assert res.stdout == SUGGESTED.format(a=pa, b=pb)
    assert "only in a" in res.stderr  # the table goes to stderr, stdout stays a rules file
    # The same text the strict-mode error suggests.
    sug = suggest_rules(
        {k: tuple(v.shape) for k, v in load_file(pa).items()},
        {k: tuple(v.shape) for k, v in load_file(pb).items()},
    )
    assert res.stdout.endswith(sug.rules_text)
    # Saved and passed back with --rules, A equals B bit for bit.
    rules_file = tmp_path / "port.rules"
    rules_file.write_text(res.stdout)
    res2 = runner.invoke(app, ["diff", str(pa), str(pb), "--rules", str(rules_file), "--values"])
    assert res2.exit_code == 0, res2.output
    assert "EQUAL" in res2.stdout


def test_cli_suggest_json_and_nothing_to_suggest(tmp_path):
    pa, pb, _, _ = _ddp_pair(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["diff", str(pa), str(pb), "--suggest", "--json"])
    assert res.exit_code == 1
    assert json.loads(res.stdout)["suggested_rules"] == SUGGESTED.format(a=pa, b=pb)
    res = runner.invoke(app, ["diff", str(pb), str(pb), "--suggest"])
    assert res.exit_code == 0
    assert res.stdout == (
        f"# fastckpt diff --suggest: rules loading {pb} into {pb}\n"
        "# the names already match: no rules needed\n"
    )


def test_cli_suggest_lists_targets_without_a_source(tmp_path):
    save_file({"x.a": torch.zeros(4), "x.b": torch.ones(4)}, tmp_path / "a.safetensors")
    save_file({"y.c": torch.zeros(4)}, tmp_path / "b.safetensors")
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    res = CliRunner().invoke(app, ["diff", str(pa), str(pb), "--suggest"])
    assert res.exit_code == 1
    assert res.stdout == (
        f"# fastckpt diff --suggest: rules loading {pa} into {pb}\n"
        "# no rule found that fills more model names than none\n"
        "# no source found for y.c [4]\n"
    )


def test_cli_suggest_error_exit_2(tmp_path):
    res = CliRunner().invoke(app, ["diff", str(tmp_path / "nope.pt"), str(tmp_path), "--suggest"])
    assert res.exit_code == 2
    assert "no such checkpoint file or folder" in res.stderr
