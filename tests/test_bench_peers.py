"""Every bench peer runs here and loads exactly the file's values: fastsafetensors and
runai-model-streamer (skipped when not installed: `make bench-deps`), torch DCP's
HuggingFaceStorageReader and transformers' from_pretrained on a Hugging Face folder."""

from __future__ import annotations

import importlib.util
import json

import pytest
from safetensors.torch import load_file

from fastckpt.bench import contenders_for, hf_folder_of, read_layout
from fastckpt.bench.worker import Contender
from fastckpt.bench.workloads import Workload, bert_config, bert_layout, ensure_files
from tests.conftest import assert_same_bytes

TINY = Workload(
    "bert-tiny", bert_layout(2, 64, 120, 128), hf_config=bert_config(2, 64, 120, 128)
)

PEERS = {
    "fastsafetensors": "fastsafetensors",
    "runai-model-streamer": "runai_model_streamer",
    "torch.dcp HuggingFaceStorageReader": "torch.distributed.checkpoint",
    "transformers from_pretrained": "transformers",
}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    files = ensure_files(TINY, tmp_path_factory.mktemp("cache"), "small")
    return files["safetensors"]


def spec_for(contender: str, path) -> dict:
    info = read_layout(path)
    return {
        "contender": contender,
        "path": str(path),
        "device": "cpu",
        "nbytes": TINY.nbytes,
        "hf_folder": hf_folder_of(info["files"]),
        **info,
    }


@pytest.mark.parametrize("contender", sorted(PEERS))
def test_peer_loads_every_tensor_bit_for_bit(hf_folder, contender):
    if importlib.util.find_spec(PEERS[contender]) is None:
        pytest.skip(f"{PEERS[contender]} is not installed (make bench-deps)")
    expected = load_file(str(hf_folder))
    c = Contender(spec_for(contender, hf_folder))
    for _ in range(2):  # a worker serves several rounds with the same contender
        c.prepare()
        assert c.run() > 0
        got = c.built.state_dict() if c.builds_model else dict(c.model.named_parameters())
        assert set(expected) <= set(got)
        for name, want in expected.items():
            assert_same_bytes(got[name].detach(), want)
        assert c.finish() in (True, None)  # verified on the first round only
    assert c.checked


def test_peers_that_need_a_hugging_face_folder(tmp_path, hf_folder):
    folder = str(hf_folder.parent)
    assert hf_folder_of([str(hf_folder)]) == folder
    names, notes = contenders_for("safetensors", "cpu", False, hf_folder=folder, hf_config=True)
    assert "torch.dcp HuggingFaceStorageReader" in names
    if importlib.util.find_spec("transformers") is not None:
        assert names.index("transformers from_pretrained") > names.index("fastckpt")
    # a file among other safetensors files is not a whole folder: DCP would read them all
    other = tmp_path / "x"
    other.mkdir()
    for n in ("a", "b"):
        (other / f"{n}.safetensors").write_bytes(hf_folder.read_bytes())
    assert hf_folder_of([str(other / "a.safetensors")]) is None
    names, notes = contenders_for("safetensors", "cpu", False, hf_folder=None, hf_config=False)
    assert not {"torch.dcp HuggingFaceStorageReader", "transformers from_pretrained"} & set(names)
    assert any("not a whole Hugging Face folder" in n for n in notes)
    names, notes = contenders_for("safetensors", "cpu", False, hf_folder=folder, hf_config=False)
    assert "transformers from_pretrained" not in names
    assert any("no config.json" in n for n in notes)


def test_bert_workload_folder_has_a_config_transformers_reads(hf_folder):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_folder.parent)
    assert cfg.model_type == "bert" and cfg.num_hidden_layers == 2 and cfg.hidden_size == 64
    assert json.loads((hf_folder.parent / "config.json").read_text())["vocab_size"] == 120
