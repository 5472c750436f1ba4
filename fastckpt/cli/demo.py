"""``fastckpt demo``: the benchmark on its small default, then the stories of docs/STORIES.md.

Each step calls the public API only (``load_into``, rules, ``diff``). A step whose
piece is not part of this build prints a note and the walk-through goes on.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.panel import Panel
from torch import nn

import fastckpt
from fastckpt.tools.listing import print_line

# Story 1, scaled down: DeltaLM's pretrained names -> the fairseq model's names.
DELTALM_RULES = """\
# DeltaLM pretrained file -> fairseq DeltaLM model (docs/STORIES.md story 1)
src_embedding.embed_tokens.weight -> encoder.embed_tokens.weight rows[:101]
src_embedding.emb_layer_norm.{p} -> encoder.layernorm_embedding.{p}
src_embedding.{rest*} -> encoder.{rest*}
tgt_embedding.embed_tokens.weight -> decoder.embed_tokens.weight, decoder.output_projection.weight rows[:101]
tgt_embedding.emb_layer_norm.{p} -> decoder.layernorm_embedding.{p}
tgt_embedding.{rest*} -> decoder.{rest*}
encoder.layers.{i}.ffn.{w}.{p} -> encoder.layers.{i}.{w}.{p}
decoder.layers.{i}.ffn_1.{w}.{p} -> decoder.layers.{i}.{w}.{p}
decoder.layers.{i}.ffn_2.fc1.{p} -> decoder.layers.{i}.fc3.{p}
decoder.layers.{i}.ffn_2.fc2.{p} -> decoder.layers.{i}.fc4.{p}
ignore-target **.version
"""  # noqa: E501 - rules lines are one line each, whatever their length

HIDDEN, FILE_VOCAB, MODEL_VOCAB = 16, 104, 101


class _Side(nn.Module):
    def __init__(self, decoder: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(MODEL_VOCAB, HIDDEN)
        self.embed_positions = nn.Embedding(32, HIDDEN)
        self.layernorm_embedding = nn.LayerNorm(HIDDEN)
        layer = nn.Module()
        layer.fc1 = nn.Linear(HIDDEN, 32)
        layer.fc2 = nn.Linear(32, HIDDEN)
        if decoder:
            layer.fc3 = nn.Linear(HIDDEN, 32)
            layer.fc4 = nn.Linear(32, HIDDEN)
            self.output_projection = nn.Linear(HIDDEN, MODEL_VOCAB, bias=False)
        self.layers = nn.ModuleList([layer])
        self.register_buffer("version", torch.tensor([3.0]))


class TinyDeltaLM(nn.Module):
    """Same key names as the fairseq DeltaLM model of story 1, tiny sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _Side(decoder=False)
        self.decoder = _Side(decoder=True)


def _pretrained_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    w: dict[str, torch.Tensor] = {}
    for side, prefix in (("src_embedding", "encoder"), ("tgt_embedding", "decoder")):
        w[f"{side}.embed_tokens.weight"] = r(FILE_VOCAB, HIDDEN)
        w[f"{side}.embed_positions.weight"] = r(32, HIDDEN)
        w[f"{side}.emb_layer_norm.weight"] = r(HIDDEN)
        w[f"{side}.emb_layer_norm.bias"] = r(HIDDEN)
        ffns = ["ffn"] if prefix == "encoder" else ["ffn_1", "ffn_2"]
        for ffn in ffns:
            for fc, shape in (("fc1", (32, HIDDEN)), ("fc2", (HIDDEN, 32))):
                w[f"{prefix}.layers.0.{ffn}.{fc}.weight"] = r(*shape)
                w[f"{prefix}.layers.0.{ffn}.{fc}.bias"] = r(shape[0])
    return w


class Walkthrough:
    def __init__(self, console: Console, folder: Path):
        self.console = console
        self.folder = folder

    def step(self, title: str, story: str, body: Callable[[], None]) -> None:
        self.console.rule(f"[bold]{title}[/bold]")
        self.console.print(story, style="dim")
        body()

    # -- story 1 -------------------------------------------------------------------
    def rename_and_slice(self) -> None:
        path = self.folder / "deltalm-base.pt"
        weights = _pretrained_weights()
        torch.save({"weights": weights, "args": {"arch": "deltalm_base"}}, path)
        rules_path = self.folder / "deltalm.rules"
        rules_path.write_text(DELTALM_RULES)
        self.console.print(Panel(DELTALM_RULES.rstrip(), title=str(rules_path.name)))
        model = TinyDeltaLM()
        report = fastckpt.load_into(model, path, rules=rules_path)  # type: ignore[attr-defined]
        self.console.print(str(report), highlight=False, markup=False)
        cut = weights["tgt_embedding.embed_tokens.weight"][:MODEL_VOCAB]
        same = torch.equal(model.decoder.output_projection.weight.detach(), cut) and torch.equal(
            model.decoder.embed_tokens.weight.detach(), cut
        )
        mark = "[green]yes[/green]" if same else "[red]NO[/red]"
        self.console.print(
            f"decoder.output_projection == first {MODEL_VOCAB} rows of "
            f"tgt_embedding.embed_tokens: {mark}"
        )

    # -- story 2 -------------------------------------------------------------------
    def strict_error(self) -> None:
        from safetensors.torch import save_file

        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        path = self.folder / "ddp.safetensors"
        save_file({f"module.{k}": v.clone() for k, v in model.state_dict().items()}, str(path))
        self.console.print(f"checkpoint saved under DistributedDataParallel: {path.name}")
        self.console.print(">>> fastckpt.load_into(model, 'ddp.safetensors')", style="bold")
        try:
            fastckpt.load_into(model, path)  # type: ignore[attr-defined]
        except fastckpt.CheckpointError as e:
            self.console.print(str(e), highlight=False, markup=False)
        else:
            self.console.print("[red]expected a strict-mode error, got none[/red]")
            return
        self.console.print(
            ">>> fastckpt.load_into(model, 'ddp.safetensors', rules='module.{rest*} -> {rest*}')",
            style="bold",
            markup=False,
        )
        report = fastckpt.load_into(model, path, rules="module.{rest*} -> {rest*}\n")  # type: ignore[attr-defined]
        self.console.print(str(report), highlight=False, markup=False)

    # -- story 3 -------------------------------------------------------------------
    def diff(self) -> None:
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = nn.Module()
        model.body = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        model.classifier = nn.Linear(8, 2)
        before, after = self.folder / "before.safetensors", self.folder / "after.safetensors"
        save_file({k: v.clone() for k, v in model.state_dict().items()}, str(before))
        with torch.no_grad():  # "fine-tuning" with the body frozen: only the head moves
            model.classifier.weight.add_(0.01)
        save_file({k: v.clone() for k, v in model.state_dict().items()}, str(after))
        self.console.print(
            ">>> fastckpt.diff('before.safetensors', 'after.safetensors', values=True)",
            style="bold",
            markup=False,
        )
        result = fastckpt.diff(before, after, values=True)  # type: ignore[attr-defined]
        self.console.print(result)


def run_demo(
    console: Console, *, bench: bool = True, repeat: int = 3, cache_dir: Path | None = None
) -> None:
    """Runs the demo: the small bench, then the scripted stories."""
    if bench:
        from fastckpt.bench import run_bench
        from fastckpt.bench.report import print_tables

        console.rule("[bold]fastckpt bench --size small[/bold]")
        with console.status("benchmarking") as status:
            result = run_bench(
                size="small",
                repeat=repeat,
                cache_dir=cache_dir,
                on_run=lambda what: status.update(f"benchmarking {what}"),
            )
        print_tables(result, console)
    with tempfile.TemporaryDirectory(prefix="fastckpt-demo-") as tmp:
        walk = Walkthrough(console, Path(tmp))
        walk.step(
            "rename + slice",
            "Story 1: a pretrained DeltaLM file (tensors under 'weights', vocab 104) into the "
            "fairseq model (other names, vocab 101, a tied output projection).",
            walk.rename_and_slice,
        )
        walk.step(
            "strict error",
            "Story 2: a checkpoint saved under DDP ('module.' prefix) into the plain model. "
            "strict=True refuses before touching any parameter and suggests the rule.",
            walk.strict_error,
        )
        walk.step(
            "diff",
            "Story 3: the body was frozen during fine-tuning; diff shows it unchanged and the "
            "head changed.",
            walk.diff,
        )
    print_line(console, f"The stories in full, and those the demo does not play: {stories_path()}")


def stories_path() -> str:
    """docs/STORIES.md of this source tree, or its place in the repository when installed."""
    here = Path(__file__).resolve().parents[2] / "docs" / "STORIES.md"
    return str(here) if here.is_file() else "docs/STORIES.md in the fastckpt repository"
