"""The stories of docs/STORIES.md end to end through the public API, at small sizes
with the same key names. Story 3 (freeze + diff) lives in test_freeze.py and
test_diff.py, story 4 (resume) in test_resume.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import fastckpt
from fastckpt.suggest.renames import suggest_rules
from tests.conftest import assert_same_bytes, tiny_hf_config
from tests.test_rules_deltalm import (
    VOCAB_MODEL,
    expected_source,
    model_shapes,
    pretrained_shapes,
)

ROOT = Path(__file__).resolve().parents[1]

# -- story 1: pretrained DeltaLM into fairseq DeltaLM ---------------------------------


def rules_from_docs() -> str:
    """The DeltaLM rules of docs/RULES.md, with the vocabulary scaled down."""
    doc = (ROOT / "docs" / "RULES.md").read_text(encoding="utf-8")
    section = doc.split("## Example: pretrained DeltaLM", 1)[1]
    block = section.split("```\n", 2)[1]
    assert "rows[:250001]" in block
    return block.replace("250001", str(VOCAB_MODEL))


class FairseqDeltaLM(nn.Module):
    """A module whose state_dict has the fairseq DeltaLM names (model_shapes()):
    the output projection is the target embedding (one Parameter, two names) and
    encoder.version / decoder.version are buffers."""

    TIED = ("decoder.output_projection.weight", "decoder.embed_tokens.weight")

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        for name, shape in model_shapes().items():
            *path, leaf = name.split(".")
            owner: nn.Module = self
            for seg in path:
                if not hasattr(owner, seg):
                    owner.add_module(seg, nn.Module())
                owner = getattr(owner, seg)
            if leaf == "version":
                owner.register_buffer("version", torch.tensor([3.0]))
            elif name == self.TIED[0]:
                owner.register_parameter(leaf, self.get_parameter(self.TIED[1]))
            else:
                owner.register_parameter(leaf, nn.Parameter(torch.randn(shape, generator=g)))


@pytest.fixture
def deltalm(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=g) for k, s in pretrained_shapes().items()}
    path = tmp_path / "deltalm-base.pt"
    # The pretrained file: tensors under "weights", beside non-tensor entries.
    torch.save({"weights": weights, "args": {"arch": "deltalm_base"}, "epoch": 7}, path)
    rules = tmp_path / "deltalm.rules"
    rules.write_text(rules_from_docs(), encoding="utf-8")
    return path, rules, weights


def test_story1_deltalm_port_loads_every_target_from_the_right_source(deltalm):
    path, rules, weights = deltalm
    model = FairseqDeltaLM()
    assert model.decoder.output_projection.weight is model.decoder.embed_tokens.weight
    report = fastckpt.load_into(model, path, rules)

    state = model.state_dict()
    assert sorted(state) == sorted(model_shapes())
    for target, value in state.items():
        exp = expected_source(target)
        if exp is None:  # a version buffer keeps the model's value
            assert torch.equal(value, torch.tensor([3.0])), target
            continue
        source, cut = exp
        want = weights[source][:VOCAB_MODEL] if cut else weights[source]
        assert_same_bytes(value, want)
    emb = weights["tgt_embedding.embed_tokens.weight"][:VOCAB_MODEL]
    assert_same_bytes(model.decoder.output_projection.weight.detach(), emb)

    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert not any(n.endswith(".version") for n in report.missing)
    assert sorted(report.ignored) == ["decoder.version", "encoder.version"]
    assert report.unused_rules == []
    # The tied pair is written once, through one of its names, from the cut rows.
    tied = {"decoder.embed_tokens.weight", FairseqDeltaLM.TIED[0]}
    assert len(report.sliced) == 2 and "encoder.embed_tokens.weight" in report.sliced
    assert (set(report.sliced) - {"encoder.embed_tokens.weight"}) <= tied
    assert [set(pair) for pair in report.tied] == [tied]
    assert report.rule_for["decoder.layers.0.fc4.bias"] == (
        "decoder.layers.{i}.ffn_2.fc2.{p} -> decoder.layers.{i}.fc4.{p}"
    )
    assert report.rule_for["encoder.embed_tokens.weight"] == (
        f"src_embedding.embed_tokens.weight -> encoder.embed_tokens.weight rows[:{VOCAB_MODEL}]"
    )
    # attention and layer-norm tensors keep their names: no rule
    assert "encoder.layers.1.self_attn.q_proj.weight" in report.loaded
    assert "encoder.layers.1.self_attn.q_proj.weight" not in report.rule_for
    text = str(report)
    assert "renamed" in text and "sliced" in text and "tied" in text


def test_story1_a_typo_in_the_rules_is_refused_naming_what_stays_uninitialised(deltalm):
    path, rules, _ = deltalm
    typo = rules.read_text().replace("ffn_2.fc2.{p} ->", "ffn2.fc2.{p} ->")
    rules.write_text(typo)
    model = FairseqDeltaLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(fastckpt.StrictLoadError) as err:
        fastckpt.load_into(model, path, rules)
    report = err.value.report
    assert report.missing == ["decoder.layers.0.fc4.weight", "decoder.layers.0.fc4.bias"]
    assert sorted(report.unexpected) == [
        "decoder.layers.0.ffn_2.fc2.bias",
        "decoder.layers.0.ffn_2.fc2.weight",
    ]
    assert report.unused_rules == [
        "decoder.layers.{i}.ffn2.fc2.{p} -> decoder.layers.{i}.fc4.{p}"
    ]
    text = str(err.value)
    assert text.startswith(
        f"{path}: checkpoint does not match the model: 2 missing, 2 unexpected, "
        "0 shape mismatches; nothing was loaded\n"
        "  missing from the checkpoint (2):\n"
    )
    assert "decoder.layers.0.fc4.weight" in text and "decoder.layers.0.fc4.bias" in text
    assert (
        "  rules that matched nothing (a typo?) (1):\n"
        "    decoder.layers.{i}.ffn2.fc2.{p} -> decoder.layers.{i}.fc4.{p}\n"
    ) in text
    for k, v in model.state_dict().items():  # nothing was modified
        assert_same_bytes(v, before[k])


# -- story 2: "Error(s) in loading state_dict" -------------------------------------


def tiny_bert_config():
    transformers = pytest.importorskip("transformers")
    return transformers, tiny_hf_config(vocab_size=60, max_position_embeddings=24)


def tf_ddp_name(k: str) -> str:
    k = k.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(
        ".LayerNorm.bias", ".LayerNorm.beta"
    )
    return "module." + k


def suggested_rules_from_message(text: str) -> str:
    m = re.search(r"\n  suggested rules \([^\n]*\):\n((?:    [^\n]*\n)+)  pass them", text)
    assert m, text
    return "".join(line[4:] + "\n" for line in m.group(1).splitlines())


def test_story2_ddp_tf_pretraining_checkpoint_into_bert_model(tmp_path):
    transformers, config = tiny_bert_config()
    torch.manual_seed(0)
    trained = transformers.BertForPreTraining(config)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    saved = {tf_ddp_name(k): v for k, v in trained.state_dict().items()}
    path = tmp_path / "pytorch_model.bin"
    torch.save(saved, path)

    model = transformers.BertModel(config, add_pooling_layer=True)
    with pytest.raises(fastckpt.StrictLoadError) as err:
        fastckpt.load_into(model, path)
    text = str(err.value)
    rules_text = suggested_rules_from_message(text)
    shapes_a = {k: tuple(v.shape) for k, v in saved.items()}
    shapes_b = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert rules_text == suggest_rules(shapes_a, shapes_b).rules_text
    assert rules_text == (
        "ignore module.cls.**\n"
        "module.bert.{p*}.gamma -> {p*}.weight\n"
        "module.bert.{p*}.beta -> {p*}.bias\n"
        "module.bert.{rest*} -> {rest*}\n"
    )
    n = len(model.state_dict())
    assert (
        f"strip prefix 'module.bert.' and rename 'gamma' -> 'weight', 'beta' -> 'bias': "
        f"matches {n}/{n} keys" in text
    )

    report = fastckpt.load_into(model, path, rules_text)
    assert report.missing == [] and report.unexpected == []
    for name, value in model.state_dict().items():
        assert_same_bytes(value, trained.state_dict()[f"bert.{name}"])


def test_story2_strict_false_alone_warns_naming_the_uninitialised(tmp_path):
    transformers, config = tiny_bert_config()
    torch.manual_seed(1)
    source = transformers.BertModel(config)
    # The LayerNorms are left out of the file: renamed to gamma/beta they would load,
    # since a transformers model applies transformers' own legacy renames.
    saved = {k: v for k, v in source.state_dict().items() if ".LayerNorm." not in k}
    save_file(saved, tmp_path / "tf.safetensors")
    model = transformers.BertModel(config)
    layer_norms = [k for k in model.state_dict() if ".LayerNorm." in k]
    assert len(layer_norms) == 2 * (1 + 2 * config.num_hidden_layers)
    with pytest.warns(fastckpt.UninitializedWarning) as caught:
        report = fastckpt.load_into(model, tmp_path / "tf.safetensors", strict=False)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert sorted(report.missing) == sorted(layer_norms)
    assert f"{len(layer_norms)}" in message
    assert "LayerNorm.weight" in message and "LayerNorm.bias" in message
    for name, value in model.state_dict().items():
        if name not in layer_norms:
            assert_same_bytes(value, source.state_dict()[name])


# -- story 5: big checkpoint, small host ------------------------------------------

PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    import torch
    from torch import nn
    import fastckpt

    path, tensors, numel, budget = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    def rss_anon():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no RssAnon")

    model = nn.Module()
    for i in range(tensors):
        model.register_parameter(f"w{i}", nn.Parameter(torch.empty(numel).fill_(-1.0)))
    torch.set_num_threads(1)
    base = rss_anon()
    peak = base
    done = threading.Event()

    def sample():
        global peak
        while not done.is_set():
            peak = max(peak, rss_anon())
            time.sleep(0.0005)

    t = threading.Thread(target=sample)
    t.start()
    report = fastckpt.load_into(model, path, max_host_bytes=budget)
    done.set()
    t.join()
    peak = max(peak, rss_anon())
    with torch.no_grad():
        assert all(float(p[0]) == i == float(p[-1]) for i, p in enumerate(model.parameters()))
    print(peak - base, report.bytes)
    """
)


@pytest.mark.parametrize("fmt", ["torch-zip", "safetensors"])
def test_story5_peak_private_memory_is_bounded_by_the_staging_budget(tmp_path, fmt):
    tensors, numel = 64, 1 << 20  # 64 x 4 MB = 256 MB, 8x the staging budget
    budget = 32 << 20
    state = {f"w{i}": torch.full((numel,), float(i)) for i in range(tensors)}
    if fmt == "safetensors":
        path = tmp_path / "big.safetensors"
        save_file(state, path)
    else:
        path = tmp_path / "big.pt"
        torch.save(state, path)
    del state
    assert path.stat().st_size >= 8 * budget
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path), str(tensors), str(numel), str(budget)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    extra, loaded = map(int, out.stdout.split())
    assert loaded == tensors * numel * 4
    assert extra <= budget + (32 << 20), f"peak extra RssAnon {extra / 2**20:.1f} MiB"
