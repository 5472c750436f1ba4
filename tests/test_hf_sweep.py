"""Every architecture of the installed transformers, loaded as from_pretrained loads it.

For each model type (one class: see tests/hf_sweep_models.py), a tiny model is saved
with ``save_pretrained``; ``fastckpt.load_into`` then loads the folder, with no
rules, into (a) the model built normally and (b) the model built on the meta device
with ``device="cpu"``. Every tensor of both, parameters and buffers (non-persistent
ones included), must equal ``from_pretrained``'s byte for byte, and so must the
logits of the causal LMs. A new transformers release shows here what it broke: a
model type that no longer builds fails until it is listed in ``SKIP`` with why.

The sweep of every model type takes minutes: all but ``FAST`` is marked ``slow`` and
runs with ``pytest -m slow tests/test_hf_sweep.py`` (everything:
FASTCKPT_FULL_SWEEP=1). ``FAST`` runs always: one model type per distinct chain of
conversion ops transformers declares, plus ``ALWAYS`` (tests/hf_sweep_models.py).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import fastckpt

transformers = pytest.importorskip("transformers")

from tests.hf_sweep_models import (  # noqa: E402
    ALWAYS,
    SKIP,
    XFAIL,
    build,
    converting_types,
    model_types,
    tiny,
)

TYPES = model_types()
FAST = converting_types(TYPES)


def _full(config: pytest.Config) -> bool:
    return os.environ.get("FASTCKPT_FULL_SWEEP") == "1" or "slow" in (
        config.getoption("markexpr") or ""
    )


def _params() -> list[object]:
    out: list[object] = []
    for model_type in TYPES:
        marks = [] if model_type in FAST else [pytest.mark.slow]
        if model_type in XFAIL:
            marks.append(pytest.mark.xfail(reason=XFAIL[model_type], strict=True))
        out.append(pytest.param(model_type, marks=marks, id=model_type))
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _everything(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict and every buffer (non-persistent ones have no other way out)."""
    out = dict(model.state_dict())
    out.update(model.named_buffers())
    return out


def _same(want: torch.nn.Module, got: torch.nn.Module, how: str) -> None:
    a, b = _everything(want), _everything(got)
    assert sorted(a) == sorted(b), how
    differ = [
        k
        for k in a
        if a[k].dtype != b[k].dtype
        or a[k].shape != b[k].shape
        or not torch.equal(_bytes(a[k]), _bytes(b[k]))
    ]
    assert differ == [], f"{how}: {len(differ)} tensors differ from from_pretrained's"


def _logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    ids = torch.arange(6).remainder(min(vocab, 32)).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids).logits  # type: ignore[no-any-return]


def _reference_logits(model: torch.nn.Module, vocab: int) -> torch.Tensor | None:
    """The logits of a causal LM on a few tokens; None for other models, and where the
    tiny model's own forward fails (a concern of transformers, not of loading)."""
    if not type(model).__name__.endswith("ForCausalLM"):
        return None
    try:
        return _logits(model, vocab)
    except Exception:
        return None


@pytest.mark.parametrize("model_type", _params())
def test_loads_byte_identical_to_from_pretrained(model_type, tmp_path, request):
    if model_type not in FAST and not _full(request.config):
        pytest.skip("the full sweep: pytest -m slow tests/test_hf_sweep.py")
    if model_type in SKIP:
        pytest.skip(SKIP[model_type])
    cls, config = tiny(model_type, TYPES[model_type])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own notes on tiny configs
        build(cls, config, seed=0).save_pretrained(tmp_path)
        reference, info = cls.from_pretrained(
            tmp_path, dtype=torch.float32, output_loading_info=True
        )
        reference.eval()
        lost = info["missing_keys"] or info["mismatched_keys"]
        assert not lost, f"transformers' own save_pretrained/from_pretrained loses {lost}"

        built = build(cls, config, seed=1)
        report = fastckpt.load_into(built, tmp_path)  # strict, no rules
        assert report.unexpected == [] and report.missing == []
        _same(reference, built, "built normally")

        with torch.device("meta"):
            on_meta = cls._from_config(config, dtype=torch.float32).eval()
        report = fastckpt.load_into(on_meta, tmp_path, device="cpu")
        assert report.unexpected == [] and report.missing == []
        _same(reference, on_meta, "built on meta, device='cpu'")

        vocab = getattr(config.get_text_config(), "vocab_size", 0) or 0
        want = _reference_logits(reference, vocab)
        if want is not None:
            assert torch.equal(_bytes(want), _bytes(_logits(on_meta, vocab)))


def test_every_skip_and_xfail_names_a_model_type_of_this_transformers():
    """Entries for model types this transformers no longer has are stale."""
    stale = sorted((set(SKIP) | set(XFAIL) | ALWAYS) - set(TYPES))
    assert stale == []
