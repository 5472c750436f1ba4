"""freeze by name patterns (story 3) and its summary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastckpt


class SequentialHead(nn.Module):
    """Story 3: an nn.Sequential head, so its parameters are linear.0.weight, linear.2.weight."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.linear = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))


def test_freeze_sequential_head_by_name():
    model = SequentialHead()
    summary = fastckpt.freeze(model, ["body.*", "linear.0.weight"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["linear.0.bias", "linear.2.weight", "linear.2.bias"]
    assert summary.frozen == ["body.weight", "body.bias", "linear.0.weight"]
    assert summary.by_module["body"].frozen_elements == 72
    assert summary.by_module["linear"].trainable_params == 3
    assert summary.by_module["linear"].trainable_elements == 4 + 8 + 2
    assert summary.trainable_elements == 14 and summary.frozen_elements == 72 + 32


def test_module_name_without_wildcard_and_unfreeze_after_freeze():
    model = SequentialHead()
    fastckpt.freeze(model, "linear", unfreeze=["linear.2"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["body.weight", "body.bias", "linear.2.weight", "linear.2.bias"]


def test_pattern_matching_nothing_is_an_error_with_close_names():
    model = SequentialHead()
    with pytest.raises(ValueError) as err:
        fastckpt.freeze(model, ["body.*", "linaer.0.*"])
    assert str(err.value) == (
        "freeze pattern 'linaer.0.*' matches no parameter (a typo?); "
        "closest names: linear.0, linear.2, linear"
    )
    assert all(p.requires_grad for p in model.parameters())  # nothing changed


def test_rules_object_patterns():
    class Rules:
        freeze_patterns = ("*",)
        unfreeze_patterns = ("linear.2.*",)

        def plan(self, a, b):  # pragma: no cover - not used by freeze
            raise AssertionError

    model = SequentialHead()
    summary = fastckpt.freeze(model, Rules())
    assert summary.trainable == ["linear.2.weight", "linear.2.bias"]


def test_summary_prints_a_table():
    model = SequentialHead()
    text = str(fastckpt.freeze(model, "body.*"))
    assert "trainable parameters" in text
    lines = [ln for ln in text.splitlines() if "body" in ln or "linear" in ln or "total" in ln]
    assert [ln.split("│")[1].strip() for ln in lines] == ["body", "linear", "total"]
    assert [c.strip() for c in lines[0].split("│")[2:6]] == ["0", "2", "0", "72"]
    assert [c.strip() for c in lines[1].split("│")[2:6]] == ["4", "0", "46", "0"]


def test_bert_story3_freeze_body():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg)
    summary = fastckpt.freeze(model, "bert.*")
    assert summary.by_module["bert"].trainable_params == 0
    assert summary.trainable == ["classifier.weight", "classifier.bias"]
    assert torch.is_grad_enabled()


class Deep(nn.Module):
    """Parameters several segments below a prefix: bert.encoder.layer.{0..11}.dense.*."""

    def __init__(self):
        super().__init__()
        self.bert = nn.Module()
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(
            nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)) for _ in range(12)
        )
        self.classifier = nn.Linear(2, 3)


def test_rules_file_freeze_lines_are_globs(tmp_path):
    """A rules file's freeze/unfreeze lines drive fastckpt.freeze, with glob meaning:
    `*` crosses dots (here `bert.*` reaches 4 segments down), `[01]` is a class."""
    rules_file = tmp_path / "finetune.rules"
    rules_file.write_text(
        "module.{rest*} -> {rest*}\n"
        "freeze bert.*\n"
        "unfreeze bert.encoder.layer.1[01].*\n"
        "freeze classifier.b?as   # unfreeze lines apply after all freeze lines\n"
    )
    rules = fastckpt.Rules.from_file(rules_file)
    assert rules.freeze_patterns == ["bert.*", "classifier.b?as"]
    assert rules.unfreeze_patterns == ["bert.encoder.layer.1[01].*"]
    model = Deep()
    summary = fastckpt.freeze(model, rules)
    assert summary.trainable == [
        "bert.encoder.layer.10.0.weight",
        "bert.encoder.layer.10.0.bias",
        "bert.encoder.layer.10.1.weight",
        "bert.encoder.layer.10.1.bias",
        "bert.encoder.layer.11.0.weight",
        "bert.encoder.layer.11.0.bias",
        "bert.encoder.layer.11.1.weight",
        "bert.encoder.layer.11.1.bias",
        "classifier.weight",
    ]
    assert summary.by_module["bert"].frozen_params == 10 * 4


def test_rules_file_freeze_typo_is_an_error(tmp_path):
    rules = fastckpt.Rules.parse("freeze bret.*\n")
    model = Deep()
    with pytest.raises(ValueError, match=r"^freeze pattern 'bret\.\*' matches no parameter"):
        fastckpt.freeze(model, rules)
    assert all(p.requires_grad for p in model.parameters())


def test_captures_are_refused_in_freeze_lines():
    with pytest.raises(fastckpt.CheckpointError) as e:
        fastckpt.Rules.parse("freeze bert.{x}.weight", source="r.rules")
    assert str(e.value) == (
        "r.rules:1:13: a freeze pattern is a glob: captures like {name} have no meaning there"
    )
