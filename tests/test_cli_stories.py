"""CLI checks across the pieces: torch zip -> safetensors, a HF folder to shards, a rules
file, the fastckpt bench row, and the demo's walk-through."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fastckpt.cli.app import app
from tests.conftest import assert_same_bytes
from tests.test_convert import tiny_bert

runner = CliRunner()


def test_torch_zip_to_safetensors_bit_identical_with_tied_and_views(tmp_path):
    emb = torch.randn(20, 8)
    state = {
        "embed.weight": emb,
        "head.weight": emb,  # tied: one storage, two names
        "proj.weight": torch.randn(8, 6).t(),  # non-contiguous view
        "half": torch.randn(5).half(),
        "slice": emb[3:7],  # a view into the shared storage
    }
    src = tmp_path / "model.pt"
    torch.save({"model": state, "epoch": 3}, src)
    dst = tmp_path / "model.safetensors"
    result = runner.invoke(app, ["convert", str(src), str(dst), "--json"])
    assert result.exit_code == 0, result.output
    back = load_file(str(dst))
    assert set(back) == set(state)
    for k, v in state.items():
        assert_same_bytes(back[k], v)
    # every name gets its own bytes (safetensors forbids shared storage)
    assert back["embed.weight"].data_ptr() != back["head.weight"].data_ptr()


def test_torch_zip_bert_folder_to_sharded_safetensors_loads_with_transformers(tmp_path):
    from transformers import BertModel

    model = tiny_bert()
    src = tmp_path / "hf"
    model.save_pretrained(src, safe_serialization=False)  # pytorch_model.bin
    dst = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(src), str(dst), "--max-shard-size", "50KB"])
    assert result.exit_code == 0, result.output
    back = BertModel.from_pretrained(dst)
    for k, v in model.state_dict().items():
        assert_same_bytes(back.state_dict()[k], v)


def test_convert_with_a_rules_file(tmp_path):
    from safetensors.torch import save_file

    emb = torch.randn(10, 4)
    save_file(
        {"module.embed.weight": emb, "module.cls.bias": torch.ones(2)},
        str(tmp_path / "s.safetensors"),
    )
    rules = tmp_path / "r.rules"
    rules.write_text("ignore module.cls.**\nmodule.embed.weight -> embed.weight rows[:7]\n")
    dst = tmp_path / "o.safetensors"
    result = runner.invoke(
        app, ["convert", str(tmp_path / "s.safetensors"), str(dst), "--rules", str(rules), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ignored"] == ["module.cls.bias"]
    back = load_file(str(dst))
    assert list(back) == ["embed.weight"]
    assert_same_bytes(back["embed.weight"], emb[:7])


def test_demo_walkthrough_runs_every_step():
    result = runner.invoke(app, ["demo", "--no-bench"])
    assert result.exit_code == 0, result.output
    assert "skipped" not in result.output
    assert "note: this step needs" not in result.output
    assert "decoder.output_projection == first 101 rows of tgt_embedding.embed_tokens: yes" in (
        " ".join(result.output.split())
    )
    assert "module." in result.output  # the strict error names the prefix to strip
