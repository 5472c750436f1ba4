"""The ``fastckpt`` command line (typer)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

import fastckpt
from fastckpt.dtypes import short_name

app = typer.Typer(
    name="fastckpt",
    help="Stream PyTorch checkpoints into models: inspect, diff, convert, bench.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _fail(message: str) -> typer.Exit:
    Console(stderr=True).print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(2)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="checkpoint file, shard index or model folder"),
    key: str = typer.Option(None, help="container key of the state dict ('' for the whole tree)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """List tensors: names, shapes, dtypes, sizes, shared storages, totals.

    Example: fastckpt inspect pytorch_model.bin --json
    """
    try:
        ckpt = fastckpt.open(path, key=key)
    except (fastckpt.CheckpointError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    with ckpt:
        infos = [ckpt.info(k) for k in ckpt.keys()]
        total = sum(i.nbytes for i in infos)
        if as_json:
            doc = {
                "path": str(path),
                "format": ckpt.format,
                "files": [str(f) for f in ckpt.files],
                "key": ".".join(ckpt.prefix),
                "metadata": ckpt.metadata,
                "tensors": [
                    {
                        "name": i.name,
                        "shape": list(i.shape),
                        "dtype": short_name(i.dtype),
                        "nbytes": i.nbytes,
                        "contiguous": i.is_contiguous,
                        "shares_storage_with": list(i.shares_storage_with),
                    }
                    for i in infos
                ],
                "total_tensors": len(infos),
                "total_bytes": total,
            }
            typer.echo(json.dumps(doc, indent=2))
            return
        table = Table(title=f"{path} ({ckpt.format}, {len(ckpt.files)} file(s))")
        for col in ("name", "shape", "dtype", "size", "shares storage with"):
            table.add_column(col, justify="right" if col == "size" else "left")
        for i in infos:
            table.add_row(
                i.name,
                str(list(i.shape)),
                short_name(i.dtype),
                human_bytes(i.nbytes),
                ", ".join(i.shares_storage_with),
            )
        console.print(table)
        picked = f" under key '{'.'.join(ckpt.prefix)}'" if ckpt.prefix else ""
        console.print(f"{len(infos)} tensors{picked}, {human_bytes(total)}")


@app.command()
def demo() -> None:
    """Write a small checkpoint and show what fastckpt sees in it."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.pt"
        emb = torch.randn(100, 16)
        torch.save({"model": {"embed.weight": emb, "head.weight": emb, "proj.weight": torch.randn(16, 8).t()}, "epoch": 3}, path)
        console.print(f"[bold]fastckpt inspect {path.name}[/bold]")
        inspect(path, key=None, as_json=False)


# -- diff (fastckpt.diff; owned by the diff/freeze/resume work) -----------------------
def _suggestions(a: Path, b: Path) -> str:
    """Suggested rules for loading A into B, from the suggestion helpers when they are installed."""
    try:
        from fastckpt.suggest import suggest_rules
    except ImportError:
        suggest_rules = None
    if suggest_rules is None:
        return "# suggestions need fastckpt.suggest, which this build does not have"
    with fastckpt.open(a) as ca, fastckpt.open(b) as cb:
        return str(suggest_rules(ca, cb))


@app.command()
def diff(
    a: Path = typer.Argument(..., help="checkpoint file, shard index or model folder"),
    b: Path = typer.Argument(..., help="checkpoint to compare against"),
    rules: Path = typer.Option(None, "--rules", help="rules file mapping A's names onto B's"),
    values: bool = typer.Option(False, "--values", help="compare values too (streamed)"),
    atol: float = typer.Option(0.0, "--atol", help="with --values: tensors within atol count as equal"),
    suggest: bool = typer.Option(False, "--suggest", help="print suggested rules for A -> B"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Names, shapes, dtypes (and with --values, values) that differ. Exit 0 equal, 1 different, 2 error.

    Example: fastckpt diff before/model.safetensors after/model.safetensors --values
    """
    try:
        report = fastckpt.diff(a, b, rules=rules, values=values, atol=atol)
        suggestion = _suggestions(a, b) if suggest else None
    except (fastckpt.CheckpointError, FileNotFoundError, ImportError, ValueError) as e:
        raise _fail(str(e)) from None
    if as_json:
        doc = report.to_dict()
        if suggestion is not None:
            doc["suggested_rules"] = suggestion
        typer.echo(json.dumps(doc, indent=2))
    else:
        console.print(report)
        if suggestion is not None:
            console.print("[bold]suggested rules[/bold]")
            console.print(suggestion, highlight=False, markup=False)
    raise typer.Exit(0 if report.equal else 1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
