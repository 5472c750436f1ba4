"""MoE conversion: a Mixtral folder written by save_pretrained (per-expert tensors)
loaded into the same model by fastckpt.load_into (no rules: transformers' own
conversions as strided copies) and by from_pretrained, warm page cache, alternating.

    .venv/bin/python bench/bench_moe.py --dir /tmp/moe --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers.initialization import no_init_weights

import fastckpt


def config(layers: int, hidden: int, inner: int, experts: int) -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=experts,
        num_experts_per_tok=2,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_moe"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inner", type=int, default=1792)
    ap.add_argument("--experts", type=int, default=8)
    args = ap.parse_args()
    cfg = config(args.layers, args.hidden, args.inner, args.experts)
    folder = args.dir
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        transformers.MixtralForCausalLM(cfg).save_pretrained(folder, max_shard_size="200MB")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    model = transformers.MixtralForCausalLM(cfg)
    ours, built, theirs = [], [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        fastckpt.load_into(model, folder)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()  # what from_pretrained also does: build the model, then load
        with no_init_weights():
            fresh = transformers.MixtralForCausalLM(cfg)
        fastckpt.load_into(fresh, folder)
        built.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = transformers.MixtralForCausalLM.from_pretrained(folder)
        theirs.append(time.perf_counter() - t)
    a, b = ref.state_dict(), model.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    print(f"folder {size / 1e6:.0f} MB, {len(a)} model tensors, equal to from_pretrained")
    rows = (
        ("load_into (built)", ours),
        ("no-init build+load", built),
        ("from_pretrained", theirs),
    )
    for label, times in rows:
        runs = [round(x, 3) for x in times]
        print(f"{label:20s} median {statistics.median(times):.3f} s (all {runs})")


if __name__ == "__main__":
    main()
