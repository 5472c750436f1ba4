"""One benchmark contender in its own process (so peak memory figures do not mix).

Started by the harness as ``python -m fastckpt.bench.worker SPEC.json``; it talks
JSON lines over stdin/stdout:

    harness -> {"cmd": "prepare"}   worker allocates and touches the destination
    worker  -> {"ready": true}      the harness samples RssAnon from now on
    harness -> {"cmd": "go"}        worker times one load
    worker  -> {"seconds": ..., "cpu_seconds": ..., "minor_faults": ..., "peak_rss": ...,
                "verified": ..., "phases": {...}}    (phases: fastckpt's LoadReport.phases)
    harness -> {"cmd": "quit"}

Peak total RSS comes from the kernel (VmHWM, reset through /proc/self/clear_refs
before each run); peak private memory (RssAnon) is sampled by the harness from
outside, so the sampling never competes for this process's GIL.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# A contender that cannot be imported, or says it cannot run here, is skipped; any
# other failure (an AttributeError included: a bug, or a peer's API that moved) is
# an error, shown with its traceback.
SKIP_ERRORS = (ImportError, NotImplementedError)


# Contender name (as shown in the table) -> Contender method that performs one load.
METHODS = {
    "fastckpt": "_load_fastckpt",
    "torch.load(mmap)+load_state_dict": "_load_torch_load",
    "safetensors.load_file+load_state_dict": "_load_load_file",
    "safe_open+copy_": "_load_safe_open",
    "fastsafetensors": "_load_fastsafetensors",
    "runai-model-streamer": "_load_runai",
    "torch-cast-in-memory": "_load_cast_in_memory",
    "torch.dcp HuggingFaceStorageReader": "_load_dcp_hf",
    "transformers from_pretrained": "_load_from_pretrained",
    "ceiling:memcpy": "_load_ceiling_memcpy",
    "ceiling:read": "_load_ceiling_read",
    "ceiling:h2d": "_load_ceiling_h2d",
}


class FlatModel(nn.Module):
    """A module tree whose state_dict names and shapes are a checkpoint's."""

    def __init__(self, layout: list[tuple[str, tuple[int, ...], torch.dtype]]):
        super().__init__()
        self._layout = layout
        for name, _shape, dtype in layout:
            *parents, leaf = name.split(".")
            owner: nn.Module = self
            for part in parents:
                child = owner._modules.get(part)
                if child is None:
                    child = nn.Module()
                    owner.add_module(part, child)
                owner = child
            owner.register_parameter(leaf, nn.Parameter(torch.empty(0, dtype=dtype), False))

    def materialize(self, device: str) -> None:
        """Fresh, touched memory for every parameter: like a model that was just built."""
        params = dict(self.named_parameters())
        for name, shape, dtype in self._layout:
            params[name].data = torch.zeros(shape, dtype=dtype, device=device)

    def release(self) -> None:
        for p in self.parameters():
            p.data = torch.empty(0, dtype=p.dtype)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _fresh_process_malloc() -> None:
    """Make glibc behave for every run as in a fresh process.

    glibc raises its mmap threshold after large blocks are freed, so a long-lived
    process serves the next run's tensors from a heap that is already resident:
    later runs would look faster and use less new private memory than a real
    first load. A fixed threshold (set through mallopt) turns that off.
    """
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD


def _trim() -> None:
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _state_dict_at(obj: object, prefix: list[str]) -> dict:
    for part in prefix:
        obj = obj[part]  # type: ignore[index]
    return obj  # type: ignore[return-value]


class Contender:
    def __init__(self, spec: dict):
        self.spec = spec
        self.name: str = spec["contender"]
        self.files: list[str] = spec["files"]
        self.path: str = spec["path"]
        self.device: str = spec["device"]
        self.prefix: list[str] = spec.get("prefix", [])
        self.nbytes: int = spec["nbytes"]
        layout = [(n, tuple(s), getattr(torch, d)) for n, s, d in spec["layout"]]
        self.is_ceiling = self.name.startswith("ceiling:")
        # from_pretrained builds its own model: no destination is allocated for it.
        self.builds_model = self.name == "transformers from_pretrained"
        self.hf_folder: str | None = spec.get("hf_folder")
        self.model = None if self.is_ceiling else FlatModel(layout)
        self.built: nn.Module | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.checked = False
        self.phases: dict[str, float] = {}  # the last fastckpt load's LoadReport.phases
        # torch's copy_ (the memcpy ceiling, load_state_dict's copies) on as many
        # threads as fastckpt's copy engine, so a ratio compares the same cores.
        from fastckpt.load.execute import _default_threads

        torch.set_num_threads(_default_threads())

    # -- lifecycle ------------------------------------------------------------
    def prepare(self) -> None:
        if self.builds_model:
            pass
        elif self.model is not None:
            self.model.materialize(self.device)
        if self.name == "torch-cast-in-memory":  # read before the run: only the cast is timed
            from safetensors.torch import load_file

            for f in self.files:
                self.buffers.update(load_file(f))
        elif self.name == "ceiling:memcpy":
            self.buffers["src"] = torch.ones(self.nbytes, dtype=torch.uint8)
            self.buffers["dst"] = torch.zeros(self.nbytes, dtype=torch.uint8)
        elif self.name == "ceiling:h2d":
            self.buffers["src"] = torch.ones(self.nbytes, dtype=torch.uint8).pin_memory()
            self.buffers["dst"] = torch.zeros(self.nbytes, dtype=torch.uint8, device=self.device)
        elif self.name == "ceiling:read":
            self.buffers["buf"] = torch.zeros(16 << 20, dtype=torch.uint8)
        _sync(self.device)
        _reset_peak_rss()

    def run(self) -> float:
        return self.timed_run()["seconds"]

    def timed_run(self) -> dict:
        """One load: wall seconds, CPU seconds of every thread of this process, and
        minor page faults (first touches of mappings and fresh memory) during it."""
        fn = getattr(self, METHODS[self.name])
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        fn()
        _sync(self.device)
        seconds = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "minor_faults": after.ru_minflt - before.ru_minflt,
            "phases": dict(self.phases),
        }

    def finish(self, verify: bool = True) -> bool | None:
        """Checks the first load against the file (outside the timing); frees the destination."""
        verified: bool | None = None
        if verify and self.model is not None and not self.checked:
            verified = self._verify()
            self.checked = True
        if self.model is not None:
            self.model.release()
        self.built = None
        self.buffers.clear()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        _trim()
        return verified

    def _verify(self) -> bool:
        assert self.model is not None
        names = list(dict(self.model.named_parameters()))
        sample = {names[0], names[len(names) // 2], names[-1]}
        if self.builds_model:
            assert self.built is not None
            params = self.built.state_dict()
            if not sample <= set(params):
                return False
        else:
            params = dict(self.model.named_parameters())
        expected = self._reference(sample)
        return all(
            torch.equal(params[n].detach().cpu(), expected[n].to(params[n].dtype)) for n in sample
        )

    def _reference(self, names: set[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in self.files:
            if f.endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(f, "pt") as st:
                    out.update({n: st.get_tensor(n) for n in names if n in st.keys()})
            else:
                sd = _state_dict_at(torch.load(f, mmap=True, weights_only=True), self.prefix)
                out.update({n: sd[n].clone() for n in names if n in sd})
        return out

    # -- contenders -------------------------------------------------------------
    def _load_fastckpt(self) -> None:
        import fastckpt

        report = fastckpt.load_into(self.model, self.path, strict=True)  # type: ignore[attr-defined, arg-type]
        self.phases = dict(getattr(report, "phases", {}))

    def _load_torch_load(self) -> None:
        assert self.model is not None
        state: dict = {}
        for f in self.files:
            state.update(
                _state_dict_at(
                    torch.load(f, mmap=True, weights_only=True, map_location="cpu"), self.prefix
                )
            )
        self.model.load_state_dict(state)

    def _load_load_file(self) -> None:
        from safetensors.torch import load_file

        assert self.model is not None
        state: dict = {}
        for f in self.files:
            state.update(load_file(f, device=self.device))
        self.model.load_state_dict(state)

    def _load_safe_open(self) -> None:
        from safetensors import safe_open

        assert self.model is not None
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for f in self.files:
                with safe_open(f, "pt", device="cpu") as st:
                    for k in st.keys():
                        params[k].copy_(st.get_tensor(k))

    def _load_fastsafetensors(self) -> None:
        from fastsafetensors import fastsafe_open  # type: ignore[import-not-found]

        assert self.model is not None
        params = dict(self.model.named_parameters())
        with torch.no_grad(), fastsafe_open(self.files, nogds=True, device=self.device) as st:
            for k in st.keys():
                params[k].copy_(st.get_tensor(k))

    def _load_runai(self) -> None:
        from runai_model_streamer import SafetensorsStreamer  # type: ignore[import-not-found]

        assert self.model is not None
        params = dict(self.model.named_parameters())
        with torch.no_grad(), SafetensorsStreamer() as streamer:
            streamer.stream_files(self.files)
            for k, t in streamer.get_tensors():
                params[k].copy_(t)

    def _load_cast_in_memory(self) -> None:
        assert self.model is not None
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, t in self.buffers.items():
                params[k].copy_(t)

    def _load_dcp_hf(self) -> None:
        """torch.distributed.checkpoint in one process: the HF safetensors reader fills
        the model's state_dict tensors in place."""
        import os
        import warnings

        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        assert self.model is not None and self.hf_folder is not None
        reader = HuggingFaceStorageReader(self.hf_folder, thread_count=os.cpu_count() or 1)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(self.model.state_dict(), storage_reader=reader)

    def _load_from_pretrained(self) -> None:
        """What a transformers user writes: the model built and filled from the folder."""
        from transformers import AutoModel

        assert self.hf_folder is not None
        if self.device == "cpu":
            self.built = AutoModel.from_pretrained(self.hf_folder)
        else:  # straight onto the GPU, as device_map does it (needs accelerate)
            self.built = AutoModel.from_pretrained(self.hf_folder, device_map=self.device)

    def _load_ceiling_memcpy(self) -> None:
        self.buffers["dst"].copy_(self.buffers["src"])

    def _load_ceiling_h2d(self) -> None:
        self.buffers["dst"].copy_(self.buffers["src"], non_blocking=True)

    def _load_ceiling_read(self) -> None:
        buf = self.buffers["buf"].numpy()
        for f in self.files:
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):  # type: ignore[arg-type]  # ndarray: a buffer (PEP 688)
                    pass


def _reply(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def serve(spec: dict, stdin=sys.stdin) -> None:
    contender: Contender | None = None
    handlers: dict[str, Callable[[], dict]] = {}

    def prepare() -> dict:
        nonlocal contender
        if contender is None:
            contender = Contender(spec)
        contender.prepare()
        return {"ready": True}

    def go() -> dict:
        assert contender is not None
        reply = contender.timed_run()
        reply["peak_rss"] = _status("VmHWM")
        # A fresh worker of a timed round skips the check: round 0 made it, and its
        # reads (a clone of the file's tensors) would count as the load's memory.
        reply["verified"] = contender.finish(verify=spec.get("verify", True))
        return reply

    handlers = {"prepare": prepare, "go": go}
    for line in stdin:
        cmd = json.loads(line)["cmd"]
        if cmd == "quit":
            break
        try:
            _reply(handlers[cmd]())
        except SKIP_ERRORS as e:
            _reply({"skipped": f"{type(e).__name__}: {e}"})
            if contender is not None:
                contender.finish(verify=False)
        except Exception as e:
            _reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
            if contender is not None:
                contender.finish(verify=False)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    _fresh_process_malloc()
    serve(spec)


if __name__ == "__main__":
    main()
