"""A transformers Mixtral folder (per-expert tensors, as save_pretrained writes it) into the
v5 model (fused experts) under FSDP2 on 2 gloo CPU ranks, each rank in a fresh process with
its own evicted copy of the folder:

- ``fastckpt``: the model built on meta, ``fully_shard`` per layer and root, ``to_empty``,
  ``fastckpt.load_into(model, folder)`` (no rules: transformers' own conversions);
- ``from_pretrained``: ``from_pretrained(folder)`` on every rank, then ``fully_shard``;
- ``dcp-hf``: ``dcp.load`` with ``HuggingFaceStorageReader`` into the sharded model's state
  dict, where it can read the folder (it cannot rename or fuse experts: it reports why).

Per contender: seconds of the slowest rank (barrier to barrier), bytes of its copy each rank
fetched (page cache, cold start), peak private memory per rank, and a digest of the logits
on 5 tokens (all contenders must agree).

    python bench/bench_moe_sharded.py [--repeat 3] [--folder DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

CONTENDERS = ("fastckpt", "from_pretrained", "dcp-hf")
CONFIG = {
    "vocab_size": 8000, "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
    "num_attention_heads": 8, "num_key_value_heads": 2, "num_local_experts": 8,
    "num_experts_per_tok": 2, "max_position_embeddings": 64,
}  # fmt: skip


def write(folder: Path) -> None:
    import transformers

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**CONFIG))
    model.save_pretrained(folder / "model")


def rank_main(rank: int, world: int, port: str, folder: Path, contender: str) -> dict:
    import torch.distributed as dist
    import transformers
    from torch.distributed.fsdp import fully_shard

    from fastckpt.bench import evict
    from fastckpt.bench.sharded import PeakPrivate, _cached_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    own = folder / f"rank{rank}"
    files = sorted(own.glob("*.safetensors"))
    config = transformers.MixtralConfig.from_pretrained(own)

    def shard(model: torch.nn.Module) -> None:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)

    if contender != "from_pretrained":
        with torch.device("meta"):
            model = transformers.MixtralForCausalLM(config)
        shard(model)
        model.to_empty(device="cpu")
        with torch.no_grad():  # the shards' pages are resident before the baseline is taken
            for param in model.parameters():
                param.to_local().zero_()
    evict([str(f) for f in files])
    dist.barrier()
    error = ""
    with PeakPrivate() as mem:
        start = time.perf_counter()
        if contender == "fastckpt":
            import fastckpt

            fastckpt.load_into(model, own)
        elif contender == "from_pretrained":
            model = transformers.MixtralForCausalLM.from_pretrained(own)
            shard(model)
        else:
            import torch.distributed.checkpoint as dcp

            try:
                state = model.state_dict()
                dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(own)))
            except BaseException as e:  # DCP's CheckpointException is a BaseException
                if isinstance(e, KeyboardInterrupt):
                    raise
                # reported, not hidden: it cannot rename or fuse experts
                why = [ln for ln in str(e).splitlines() if ln.strip().startswith("RuntimeError")]
                error = f"{type(e).__name__}: {(why or [str(e)])[0].strip()[:160]}"
        dist.barrier()
        seconds = time.perf_counter() - start
    fetched = sum(_cached_bytes(f) for f in files)
    digest = ""
    if not error:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 5, 7, 3, 2]])).logits
        digest = hashlib.sha256(logits.contiguous().view(torch.uint8).numpy()).hexdigest()[:16]
    dist.destroy_process_group()
    return {"seconds": seconds, "fetched": fetched, "private_peak": mem.peak - mem.base,
            "logits": digest, "error": error}  # fmt: skip


def main() -> None:
    from fastckpt.bench.sharded import _free_port

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--folder", type=Path, default=Path("/tmp/fastckpt-bench-moe-sharded"))
    args = ap.parse_args()
    folder, ranks = args.folder, 2
    if not (folder / "model" / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        write(folder)
    for r in range(ranks):
        shutil.copytree(folder / "model", folder / f"rank{r}", dirs_exist_ok=True)
    size = sum(f.stat().st_size for f in (folder / "model").glob("*.safetensors"))
    runs: dict[str, list[list[dict]]] = {c: [] for c in CONTENDERS}
    for _ in range(args.repeat):
        for contender in CONTENDERS:
            port = _free_port()
            procs = [
                subprocess.Popen(
                    [sys.executable, __file__, "--rank", str(r), str(ranks), port, str(folder),
                     contender],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )
                for r in range(ranks)
            ]  # fmt: skip
            outs = [p.communicate(timeout=1200) for p in procs]
            for p, (_, err) in zip(procs, outs, strict=True):
                if p.returncode != 0:
                    raise RuntimeError(f"{contender}: a rank failed:\n{err[-3000:]}")
            runs[contender].append([json.loads(out.splitlines()[-1]) for out, _ in outs])
    print(f"{time.strftime('%Y-%m-%d')}: Mixtral v5, {size / 1e6:.1f} MB of safetensors, "
          f"{ranks} gloo ranks, FSDP2, cold cache, each rank its own copy, median of "
          f"{args.repeat} (slowest rank per run)")  # fmt: skip
    print("| contender | seconds | MB fetched / rank | MB private peak / rank | logits |")
    print("|---|---|---|---|---|")
    for contender, rs in runs.items():
        slowest = statistics.median(max(r["seconds"] for r in run) for run in rs)
        fetched = max(r["fetched"] for run in rs for r in run) / 1e6
        peak = max(r["private_peak"] for run in rs for r in run) / 1e6
        error = next((r["error"] for run in rs for r in run if r["error"]), "")
        logits = error or ",".join(sorted({r["logits"] for run in rs for r in run}))
        print(f"| {contender} | {slowest:.2f} | {fetched:.1f} | {peak:.1f} | {logits} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank":
        rank, world, port, folder, contender = sys.argv[2:7]
        print(json.dumps(rank_main(int(rank), int(world), port, Path(folder), contender)))
    else:
        main()
