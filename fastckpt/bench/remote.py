"""``fastckpt bench URL``: a remote checkpoint (s3://, gs://, az://, http(s)://) loaded
several ways, side by side in one process, in alternation:

- ``ceiling``: raw concurrent ranged GETs of every file, whole, with the client fastckpt
  uses (obstore, the same part size and requests in flight), each copied into one buffer
  touched beforehand: what the client and the server allow, with the one copy any
  loader makes;
- ``fastckpt``: ``load_into(model, URL)``;
- ``download+load``: each file downloaded whole to a temporary file (one streamed GET),
  then ``safetensors.torch.load_file`` and ``model.load_state_dict`` (safetensors only);
- ``runai``: Run:ai Model Streamer's ``SafetensorsStreamer`` over the same URLs, each
  tensor it yields copied into the model (safetensors at s3://, gs://, az://; only when
  ``runai-model-streamer`` and its backend for the scheme are installed).

The model is built from the checkpoint's own names, shapes and dtypes (empty tensors),
so any file can be benched. Round 0 is a warm-up, and checks that every contender's
values equal fastckpt's (so fastckpt's equal the downloaded file's), byte for byte; a
peer that fails there is left out with a note saying why.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastckpt.load.execute import load_into
from fastckpt.source.checkpoint import open as open_checkpoint
from fastckpt.source.remote_store import Object, Store, run_sync

CONTENDERS = ("ceiling", "fastckpt", "download+load", "runai")


def _model(layout: list[tuple[str, tuple[int, ...], torch.dtype]], device: str) -> nn.Module:
    """A module tree with one empty parameter per checkpoint name (``a.b.c`` -> a.b, c)."""
    root = nn.Module()
    for name, shape, dtype in layout:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        t = torch.empty(shape, dtype=dtype, device=device)
        mod.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
    return root


def _objects(urls: list[str]) -> list[Object]:
    return [Object(Store(u), Store(u).key_of_path) for u in urls]


def _ceiling(urls: list[str], into: torch.Tensor) -> int:
    """Each file's bytes, whole, into ``into`` (bytes, as large as the largest file)."""
    total = 0
    with into.numpy().data as whole:
        for obj in _objects(urls):
            obj.read_into([(0, obj.size, whole[: obj.size])])
            total += obj.size
    return total


def _download_and_load(urls: list[str], model: nn.Module, tmp: Path) -> None:
    import obstore
    from safetensors.torch import load_file

    async def save(obj: Object, path: Path) -> None:
        result = await obstore.get_async(obj.store.store, obj.key)
        with path.open("wb") as f:
            async for chunk in result.stream(min_chunk_size=8 << 20):
                f.write(memoryview(chunk))

    state: dict[str, torch.Tensor] = {}
    for i, obj in enumerate(_objects(urls)):
        path = tmp / f"{i}.safetensors"
        run_sync(save(obj, path))
        state.update(load_file(str(path)))
        path.unlink()
    model.load_state_dict(state, strict=True)


def _runai(urls: list[str], model: nn.Module) -> None:
    from runai_model_streamer import SafetensorsStreamer

    into = dict(model.named_parameters())
    with torch.no_grad(), SafetensorsStreamer() as streamer:
        streamer.stream_files(urls)
        for name, tensor in streamer.get_tensors():
            into[name].copy_(tensor)


def _runai_usable(urls: list[str], fmt: str) -> str | None:
    """Why Run:ai cannot be benched here (None: it can)."""
    if fmt != "safetensors":
        return f"runai: safetensors only (this is {fmt})"
    if not all(u.split("://", 1)[0] in ("s3", "gs", "az") for u in urls):
        return "runai: s3://, gs:// and az:// only"
    try:
        import runai_model_streamer  # noqa: F401
    except ImportError:
        return "runai: not installed (pip install runai-model-streamer runai-model-streamer-s3)"
    return None


def _same_values(got: nn.Module, want: nn.Module, contender: str) -> None:
    theirs = want.state_dict()
    for k, v in got.state_dict().items():
        if not torch.equal(v.cpu().view(torch.uint8), theirs[k].cpu().view(torch.uint8)):
            raise AssertionError(f"{contender} and fastckpt differ at {k}")


def run_remote_bench(url: str, *, repeat: int = 3, device: str = "cpu") -> dict[str, Any]:
    """Seconds per contender (median of ``repeat``), MB/s and the ratio to the ceiling."""
    if repeat < 1:
        raise ValueError(f"--repeat must be at least 1, not {repeat}")
    with open_checkpoint(url) as ckpt:
        names = ckpt.keys()
        layout = [(n, tuple(ckpt.info(n).shape), ckpt.info(n).dtype) for n in names]
        urls = [str(f) for f in ckpt.files]
        fmt = ckpt.format
    sizes = [o.size for o in _objects(urls)]
    nbytes = sum(sizes)
    # The ceiling's buffer is allocated and touched once: the least a copy can cost (a
    # fresh buffer per round would be a new mapping, faulted in page by page, each time,
    # while a model's smaller tensors may reuse pages the allocator kept).
    into = torch.ones(max(sizes), dtype=torch.uint8)
    names_run = [c for c in CONTENDERS if c != "download+load" or fmt == "safetensors"]
    notes = [] if fmt == "safetensors" else [f"download+load: safetensors only (this is {fmt})"]
    why_not = _runai_usable(urls, fmt)
    if why_not:
        names_run.remove("runai")
        notes.append(why_not)
    times: dict[str, list[float]] = {c: [] for c in names_run}
    fetched = 0
    with tempfile.TemporaryDirectory(prefix="fastckpt-bench-remote-") as tmp:
        for round_ in range(repeat + 1):  # round 0: warm-up and the value check
            order = names_run[round_ % len(names_run) :] + names_run[: round_ % len(names_run)]
            for c in order:
                if c not in names_run:  # a peer that failed in round 0
                    continue
                model = _model(layout, device) if c != "ceiling" else None
                gc.collect()
                started = time.perf_counter()
                if c == "ceiling":
                    _ceiling(urls, into)
                elif c == "fastckpt":
                    assert model is not None
                    fetched = load_into(model, url).fetched
                elif c == "download+load":
                    assert model is not None
                    _download_and_load(urls, model, Path(tmp))
                else:
                    assert model is not None
                    try:
                        _runai(urls, model)
                    except Exception as e:  # a peer's failure is reported, not raised
                        names_run.remove(c)
                        notes.append(f"runai: failed: {type(e).__name__}: {str(e)[:200]}")
                        continue
                seconds = time.perf_counter() - started
                if round_ == 0 and model is not None and c != "fastckpt":
                    check = _model(layout, device)
                    load_into(check, url)
                    _same_values(model, check, c)
                    del check
                if round_ > 0:
                    times[c].append(seconds)
                del model
    ceiling = statistics.median(times["ceiling"])
    rows = [
        {
            "contender": c,
            "seconds": statistics.median(times[c]),
            "mb_per_s": nbytes / 1e6 / statistics.median(times[c]),
            "x_ceiling_speed": ceiling / statistics.median(times[c]),
        }
        for c in names_run
    ]
    return {
        "url": url,
        "format": fmt,
        "files": len(urls),
        "bytes": nbytes,
        "fetched": fetched,
        "tensors": len(layout),
        "repeat": repeat,
        "device": device,
        "rows": rows,
        "notes": notes,
    }
