"""The ``fastckpt`` command line (typer)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

import fastckpt
from fastckpt.dtypes import short_name
from fastckpt.source.checkpoint import TensorInfo
from fastckpt.source.urls import is_url
from fastckpt.tools.listing import Listing, collapse, print_line, split_numbers

app = typer.Typer(
    name="fastckpt",
    help="Stream PyTorch checkpoints into models: inspect, diff, convert, bench.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


def _fail(message: str) -> typer.Exit:
    # soft_wrap: the message stays one line, whatever the terminal width (scripts grep it)
    Console(stderr=True).print(
        f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True
    )
    return typer.Exit(2)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _name_filter(pattern: str | None) -> Callable[[str], bool]:
    """``--filter``: a regular expression searched in each name, as grep does."""
    if pattern is None:
        return lambda name: True
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise _fail(f"--filter {pattern!r}: not a regular expression ({e})") from None
    return lambda name: regex.search(name) is not None


_FILTER_HELP = "only names matching this regular expression (searched, as grep does)"


@app.command()
def inspect(
    # A str, not a Path: a URL (s3://bucket/key) must reach fastckpt.open unchanged.
    path: str = typer.Argument(..., help="checkpoint file, shard index, model folder or URL"),
    key: str = typer.Option(None, help="container key of the state dict ('' for the whole tree)"),
    name_filter: str = typer.Option(None, "--filter", help=_FILTER_HELP),
    group: bool = typer.Option(
        False, "--group", help="one row per name pattern with layer numbers as ranges"
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """List tensors: names, shapes, dtypes, sizes, shared storages, totals.

    Names are printed whole; piped output is plain text, one tensor per line.

    Example: fastckpt inspect model_folder --filter 'layer\\.1\\.' --json

    Example: fastckpt inspect model_folder --group
    """
    match = _name_filter(name_filter)
    try:
        ckpt = fastckpt.open(path, key=key)
    except (fastckpt.CheckpointError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    with ckpt:
        names = ckpt.keys()
        infos = [ckpt.info(k) for k in names if match(k)]
        total = sum(i.nbytes for i in infos)
        if as_json:
            doc = {
                "path": str(path),
                "format": ckpt.format,
                "files": [str(f) for f in ckpt.files],
                "key": ".".join(ckpt.prefix),
                "metadata": ckpt.metadata,
                "filter": name_filter,
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
        title = f"{path} ({ckpt.format}, {len(ckpt.files)} file(s))"
        listing = _grouped_tensors(infos, title) if group else _tensors(infos, title)
        listing.print(console)
        picked = f" under key '{'.'.join(ckpt.prefix)}'" if ckpt.prefix else ""
        matching = f" matching {name_filter!r} (of {len(names)})" if name_filter else ""
        print_line(console, f"{len(infos)} tensors{matching}{picked}, {human_bytes(total)}")
        if not group and len(infos) > 2000 and console.is_terminal:
            print_line(console, "(--group prints one row per name pattern)", style="dim")


def _tensors(infos: list[TensorInfo], title: str) -> Listing:
    return Listing(
        columns=("name", "shape", "dtype", "size", "shares storage with"),
        rows=[
            (
                i.name,
                str(list(i.shape)),
                short_name(i.dtype),
                human_bytes(i.nbytes),
                ", ".join(i.shares_storage_with),
            )
            for i in infos
        ],
        title=title,
        right=frozenset({"size"}),
    )


def _grouped_tensors(infos: list[TensorInfo], title: str) -> Listing:
    """One row per (name with its numbers as slots, shape, dtype): the numbers as ranges."""
    groups: dict[tuple[Any, ...], list[TensorInfo]] = {}
    for i in infos:
        template, _ = split_numbers(i.name)
        groups.setdefault((template, tuple(i.shape), i.dtype), []).append(i)
    rows = []
    for (template, shape, dtype), members in groups.items():
        by_numbers = {split_numbers(m.name)[1]: m for m in members}
        for name, numbers in collapse(template, list(by_numbers)):
            mine = [by_numbers[n] for n in numbers]
            size = human_bytes(sum(m.nbytes for m in mine))
            rows.append((name, str(len(mine)), str(list(shape)), short_name(dtype), size))
    return Listing(
        columns=("name", "tensors", "shape", "dtype", "total size"),
        rows=rows,
        title=title,
        right=frozenset({"tensors", "total size"}),
    )


def _error_text(e: BaseException) -> str:
    # KeyError's str() adds quotes around its message.
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


# Errors that are the user's input, not a bug: one line on stderr, exit status 2.
_INPUT_ERRORS = (
    fastckpt.CheckpointError, FileNotFoundError, IsADirectoryError, ValueError, KeyError
)


@app.command("convert")
def convert_command(
    # str, not Path: a URL (s3://bucket/key) must reach fastckpt.open unchanged.
    src: str = typer.Argument(..., help="checkpoint file, shard index, model folder or URL"),
    dst: Path = typer.Argument(
        ..., help="a .safetensors file, or a folder (model.safetensors or shards + index)"
    ),
    rules: Path = typer.Option(None, "--rules", help="rules file: renames, row slices, ignores"),
    dtype: str = typer.Option(None, "--dtype", help="cast floating tensors: bf16, fp16 or fp32"),
    max_shard_size: str = typer.Option(
        None, "--max-shard-size", help="split into shards of at most this size (2GB, 500MB)"
    ),
    key: str = typer.Option(None, help="container key of the state dict ('' for the whole tree)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing destination"),
    max_host_bytes: str = typer.Option(
        "256MiB", "--max-host-bytes", help="memory a piece of a tensor may take (256MiB, 1GB)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print a JSON report instead of a table"),
) -> None:
    """Convert any readable checkpoint to safetensors, streamed and written atomically.

    Example: fastckpt convert pytorch_model.bin out/ --dtype bf16 --max-shard-size 2GB
    """
    from fastckpt.tools.convert import convert

    try:
        report = convert(
            src,
            dst,
            rules,
            dtype=dtype,
            max_shard_size=max_shard_size,
            key=key,
            overwrite=overwrite,
            progress=not as_json and console.is_terminal,
            max_host_bytes=max_host_bytes,
        )
    except _INPUT_ERRORS as e:
        raise _fail(_error_text(e)) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    rows = [
        ("files", ", ".join(report.files)),
        ("tensors", str(report.tensors)),
        ("bytes", human_bytes(report.total_bytes)),
        ("renamed", str(len(report.renamed))),
        ("row-sliced", str(len(report.sliced))),
        ("cast", str(len(report.cast))),
    ]
    if report.ignored:
        rows.append(("ignored", str(len(report.ignored))))
    if report.copied:
        rows.append(("copied", ", ".join(report.copied)))
    rows.append(("seconds", f"{report.seconds:.2f}"))
    Listing(columns=("what", "value"), rows=rows, title=f"{src} -> {dst}", header=False).print(
        console
    )


def _bench_ranks(
    ranks: int, size: str, repeat: int, cache_dir: Path | None, markdown: bool, as_json: bool,
    read: str = "own",
) -> None:  # fmt: skip
    import sys
    import tempfile

    from rich.table import Table

    from fastckpt.bench.sharded import run_sharded_bench, summary

    layers, hidden = (4, 512) if size == "small" else (16, 2048)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        with Console(stderr=True).status(f"benchmarking {ranks} ranks"):
            result = run_sharded_bench(
                ranks, layers, hidden, repeat, Path(tmp), replicated=read == "once"
            )
    rows = summary(result)
    if as_json:
        typer.echo(json.dumps(result | {"summary": rows}, indent=2))
        return
    title = (
        f"{ranks} gloo CPU ranks, {'replicated' if read == 'once' else 'FSDP2'}, "
        f"{layers} x Linear({hidden}, {hidden}) fp32, "
        f"{result['file_bytes'] / 1e6:.1f} MB, cold cache, median of {repeat} (slowest rank)"
    )
    head = ["contender", "seconds", "x fastckpt", "MB fetched / rank", "MB shard / rank",
            "MB private peak / rank", "wrong shards"]  # fmt: skip
    fast = next(r["seconds"] for r in rows if r["contender"] == "fastckpt")
    cells = [
        [r["contender"], f"{r['seconds']:.3f}", f"{r['seconds'] / fast:.1f}",
         f"{r['fetched_per_rank'] / 1e6:.1f}", f"{r['local_bytes'] / 1e6:.1f}",
         f"{r['private_peak'] / 1e6:.1f}", str(r["wrong"])]
        for r in rows
    ]
    if markdown:
        typer.echo(f"`fastckpt {' '.join(sys.argv[1:])}`: {title}\n")
        typer.echo("| " + " | ".join(head) + " |")
        typer.echo("|" + "---|" * len(head))
        for c in cells:
            typer.echo("| " + " | ".join(c) + " |")
    else:
        table = Table(*head, title=title)
        for c in cells:
            table.add_row(*c)
        console.print(table)
    if any(r["wrong"] for r in rows):
        raise typer.Exit(1)


def _bench_remote(url: str, device: str, repeat: int, markdown: bool, as_json: bool) -> None:
    import sys

    from rich.table import Table

    from fastckpt.bench.remote import run_remote_bench

    try:
        with Console(stderr=True).status(f"benchmarking {url}"):
            result = run_remote_bench(url, repeat=repeat, device=device)
    except _INPUT_ERRORS as e:
        raise _fail(_error_text(e)) from None
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    title = (
        f"{url}: {result['format']}, {result['files']} file(s), {result['bytes'] / 1e6:.1f} MB, "
        f"{result['tensors']} tensors, median of {repeat}"
    )
    head = ["contender", "seconds", "MB/s", "x ceiling speed"]
    cells = [
        [r["contender"], f"{r['seconds']:.3f}", f"{r['mb_per_s']:.0f}",
         f"{r['x_ceiling_speed']:.2f}"]
        for r in result["rows"]
    ]  # fmt: skip
    if markdown:
        typer.echo(f"`fastckpt {' '.join(sys.argv[1:])}`: {title}\n")
        typer.echo("| " + " | ".join(head) + " |")
        typer.echo("|" + "---|" * len(head))
        for c in cells:
            typer.echo("| " + " | ".join(c) + " |")
    else:
        table = Table(*head, title=title)
        for c in cells:
            table.add_row(*c)
        console.print(table)
    for note in result["notes"]:
        print_line(console, note, style="dim")


@app.command("bench")
def bench_command(
    path: str = typer.Argument(
        None, help="checkpoint to load (default: generated BERT-large and many-small files); "
        "a URL (s3://, https://, ...): fastckpt against the raw ranged-GET ceiling and "
        "download + load_file"
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    cold: bool = typer.Option(False, "--cold", help="evict the file from the page cache per run"),
    repeat: int = typer.Option(3, "--repeat", help="timed runs per contender"),
    fresh: bool = typer.Option(
        False, "--fresh", help="each timed run is the first load of a new process"
    ),
    pairs: int = typer.Option(
        0, "--pairs", help="N > 0: then N rounds of (peer, fastckpt) back to back in one "
        "process, against the ceiling and the file's main peer (steady-state ratios)"
    ),
    memory: bool = typer.Option(
        False, "--memory", help="a 5.4 GB file (--size small: 67 MB) loaded by fastckpt "
        "alone: private memory stays flat"
    ),
    size: str = typer.Option("full", "--size", help="default workload size: small or full"),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="where default checkpoints live"),
    markdown: bool = typer.Option(False, "--markdown", help="print Markdown tables"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    plot_to: Path = typer.Option(
        None, "--plot", help="also draw the tables into FILE.png or FILE.svg (needs "
        "matplotlib: pip install 'fastckpt[plot]')"
    ),
    casts: bool = typer.Option(
        False, "--casts", help="the cast workloads (bf16/fp16/fp8 <-> fp32/bf16) instead"
    ),
    ranks: int = typer.Option(
        0, "--ranks", help="N > 0: an FSDP2 model on N gloo CPU ranks, against torch DCP and "
        "rank-0 broadcast (cold cache, --size small: 4 x 512, full: 16 x 2048 Linear layers)"
    ),
    read: str = typer.Option(
        "own", "--read", help="with --ranks: 'once' loads a replicated model on every rank, "
        "read=\"own\" against read=\"once\" (each byte read by one rank) and rank-0 broadcast"
    ),
) -> None:
    """Time fastckpt load_into against torch.load, safetensors and the memcpy/read ceilings.

    Each contender runs in its own process, in alternation; exit status 1 if one failed.
    With --fresh every timed run is a new process's first load (what a user who
    loads once waits for); without it, a long-lived process per contender.
    --pairs N adds the steady-state ratios of N paired rounds in one process;
    fastckpt's phase times (plan, prepare, copy) are printed under each table.

    Example: fastckpt bench --size small --repeat 5 --json
    """
    import sys

    from fastckpt.bench import run_bench
    from fastckpt.bench.report import markdown as to_markdown
    from fastckpt.bench.report import print_tables

    err = Console(stderr=True)
    if read not in ("own", "once"):
        raise _fail(f"--read must be 'own' or 'once', not {read!r}")
    if plot_to is not None and plot_to.suffix.lower() not in (".png", ".svg"):
        raise _fail(f"--plot writes .png or .svg, not {plot_to.name!r}")
    if ranks > 0:
        _bench_ranks(ranks, size, repeat, cache_dir, markdown, as_json, read)
        return
    if path is not None and is_url(path):
        _bench_remote(path, device, repeat, markdown, as_json)
        return
    try:
        with err.status("benchmarking") as status:
            result = run_bench(
                path, device=device, cold=cold, repeat=repeat, size=size, cache_dir=cache_dir,
                on_run=lambda what: status.update(f"benchmarking {what}"), fresh=fresh,
                casts=casts, pairs=pairs, memory=memory,
            )
    except _INPUT_ERRORS as e:
        raise _fail(_error_text(e)) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    elif markdown:
        typer.echo(to_markdown(result, "fastckpt " + " ".join(sys.argv[1:])))
    else:
        print_tables(result, console)
    if plot_to is not None:
        from fastckpt.bench.plot import plot

        try:
            err.print(f"drew {plot(result, plot_to)}", highlight=False)
        except _INPUT_ERRORS as e:
            raise _fail(_error_text(e)) from None
    if result.failed:
        for line in result.failed:
            err.print(f"[red]failed:[/red] {line}", highlight=False)
        raise typer.Exit(1)


@app.command("demo")
def demo_command(
    bench: bool = typer.Option(True, "--bench/--no-bench", help="run the small benchmark first"),
    repeat: int = typer.Option(3, "--repeat", help="timed runs per bench contender"),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="where bench checkpoints live"),
) -> None:
    """Show what fastckpt does: a small benchmark, then the stories of docs/STORIES.md.

    Example: fastckpt demo --no-bench
    """
    from fastckpt.cli.demo import run_demo

    run_demo(console, bench=bench, repeat=repeat, cache_dir=cache_dir)


# -- diff -----------------------
def _suggested_rules_file(a: str, b: str) -> str:
    """The rules for loading A into B (fastckpt.suggest.renames, the strict-mode error's
    engine) as a file to save and edit."""
    from fastckpt.suggest.renames import suggest_rules

    with fastckpt.open(a) as ca, fastckpt.open(b) as cb:
        sa = {k: tuple(ca.info(k).shape) for k in ca.keys()}
        sb = {k: tuple(cb.info(k).shape) for k in cb.keys()}
    s = suggest_rules(sa, sb)
    header = f"fastckpt diff --suggest: rules loading {a} into {b}"
    if not s and not s.notes:
        return f"# {header}\n# the names already match: no rules needed\n"
    if not s:
        return s.as_file(header + "\n# no rule found that fills more model names than none")
    return s.as_file(header)


@app.command()
def diff(
    # str, not Path: a URL (s3://bucket/key) must reach fastckpt.open unchanged.
    a: str = typer.Argument(..., help="checkpoint file, shard index, model folder or URL"),
    b: str = typer.Argument(..., help="checkpoint (or URL) to compare against"),
    rules: Path = typer.Option(None, "--rules", help="rules file mapping A's names onto B's"),
    values: bool = typer.Option(False, "--values", help="compare values too (streamed)"),
    atol: float = typer.Option(
        0.0, "--atol", help="with --values: tensors within atol count as equal"
    ),
    suggest: bool = typer.Option(
        False,
        "--suggest",
        help="print rules that load A into B as a rules file on stdout (the table goes to stderr)",
    ),
    name_filter: str = typer.Option(None, "--filter", help=_FILTER_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Names, shapes, dtypes (and with --values, values) that differ.

    Exit 0 equal, 1 different, 2 error (with --filter: among the matching names).

    Example: fastckpt diff before/model.safetensors after/model.safetensors --values

    Example: fastckpt diff pretrained.pt finetuned.pt --suggest > port.rules
    """
    match = _name_filter(name_filter)
    try:
        report = fastckpt.diff(a, b, rules=rules, values=values, atol=atol)
        suggestion = _suggested_rules_file(a, b) if suggest else None
    except (fastckpt.CheckpointError, FileNotFoundError, ImportError, ValueError) as e:
        raise _fail(str(e)) from None
    if name_filter is not None:
        report = report.select(match)
    if as_json:
        doc = report.to_dict()
        if suggestion is not None:
            doc["suggested_rules"] = suggestion
        typer.echo(json.dumps(doc, indent=2))
    elif suggestion is not None:
        # stdout is the rules file alone, so `--suggest > port.rules` saves it.
        _print_diff(report, Console(stderr=True))
        typer.echo(suggestion, nl=False)
    else:
        _print_diff(report, console)
    raise typer.Exit(0 if report.equal else 1)


def _print_diff(report: fastckpt.DiffReport, out: Console) -> None:
    report.listing().print(out)
    print_line(out, report.summary_line())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
