"""MoE conversion: a Mixtral folder written by save_pretrained (per-expert tensors)
loaded into the same transformers v5 model (fused ``gate_up_proj``/``down_proj``), three ways:

- ``fastckpt``: build the model on the meta device, ``load_into(model, folder, device="cpu")``
  (transformers' own conversions as strided copies, no rules, nothing materialised);
- ``torch.cat``: build the same way, read every shard with ``safetensors.load_file``,
  ``torch.stack``/``torch.cat`` the experts in Python, ``load_state_dict``;
- ``from_pretrained``: transformers' own conversion.

Each load runs in a fresh process (the figure users live with), the three alternating,
warm page cache; timed from the model's construction (after one untimed construction on
meta that imports transformers' modeling code, the same for all three) to a loaded
model. Per load: seconds, and the peak growth of private memory (RssAnon + RssShmem)
beyond the model's own bytes, sampled from /proc/self/status every 2 ms. The loaded state is checked
against from_pretrained's, byte for byte.

    .venv/bin/python bench/bench_moe.py --dir /tmp/moe --layers 6 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from fastckpt.bench.sharded import PeakPrivate

# fastckpt as it was before issue 26's changes, one and both undone in the child:
# "eager table": transformers' own conversion table (every model type's regexes
# compiled) built inside the timing, as before hf_mapping_table; "no populate": fresh
# destinations fault page by page among the copies (load.execute._populate_fresh off).
WAYS = ("fastckpt", "fastckpt[no populate]", "fastckpt[eager table, no populate]", "torch.cat",
        "from_pretrained")  # fmt: skip


def config(layers: int, hidden: int, inner: int, experts: int) -> transformers.MixtralConfig:
    return transformers.MixtralConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, num_local_experts=experts,
        num_experts_per_tok=2,
    )  # fmt: skip


def _cat_state(folder: Path, experts: int) -> dict[str, torch.Tensor]:
    """The fused state dict, materialised: every per-expert tensor read, then stacked."""
    from safetensors.torch import load_file

    flat: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        flat.update(load_file(f))
    out: dict[str, torch.Tensor] = {}
    layers = sorted({int(k.split(".")[2]) for k in flat if ".block_sparse_moe." in k})
    for i in layers:
        moe = f"model.layers.{i}.block_sparse_moe"
        w = {
            p: [flat.pop(f"{moe}.experts.{e}.{p}.weight") for e in range(experts)]
            for p in ("w1", "w2", "w3")
        }
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([a, b]) for a, b in zip(w["w1"], w["w3"], strict=True)]
        )
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(w["w2"])
        out[f"model.layers.{i}.mlp.gate.weight"] = flat.pop(f"{moe}.gate.weight")
    out.update(flat)
    return out


def child(way: str, folder: Path, experts: int, check: Path | None) -> dict[str, float]:
    from transformers.initialization import no_init_weights

    import fastckpt

    cfg = transformers.MixtralConfig.from_pretrained(folder)
    # The first model built in a process imports the modeling code and sets up
    # transformers' lazy machinery (seconds, the same for every way): done once, untimed.
    with torch.device("meta"):
        transformers.MixtralForCausalLM(cfg)
    started = time.perf_counter()
    with PeakPrivate() as peak:
        if way == "from_pretrained":
            model = transformers.MixtralForCausalLM.from_pretrained(folder)
        elif way.startswith("fastckpt"):
            with torch.device("meta"):
                model = transformers.MixtralForCausalLM(cfg)
            if "eager table" in way:
                from transformers.conversion_mapping import get_model_conversion_mapping

                get_model_conversion_mapping(model)
            if "no populate" in way:
                import fastckpt.load.execute

                fastckpt.load.execute._populate_fresh = lambda *args: None
            fastckpt.load_into(model, folder, device="cpu")
        else:
            with no_init_weights():
                model = transformers.MixtralForCausalLM(cfg)
            model.load_state_dict(_cat_state(folder, experts))
    seconds = time.perf_counter() - started
    state = model.state_dict()
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    if check is not None:
        if way == "from_pretrained":
            torch.save({k: v.clone() for k, v in state.items()}, check)
        else:
            ref = torch.load(check, weights_only=True)
            assert set(ref) == set(state), way
            for k, v in state.items():
                assert torch.equal(v.view(torch.uint8), ref[k].view(torch.uint8)), (way, k)
    return {"seconds": seconds, "over_model": (peak.peak - peak.base - model_bytes) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_moe"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inner", type=int, default=1792)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--child", choices=WAYS)
    ap.add_argument("--check", type=Path)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dir, args.experts, args.check)))
        return
    folder = args.dir
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        cfg = config(args.layers, args.hidden, args.inner, args.experts)
        transformers.MixtralForCausalLM(cfg).save_pretrained(folder, max_shard_size="200MB")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    for f in folder.glob("*.safetensors"):  # warm: every contender finds the pages cached
        f.read_bytes()
    check = folder / "reference.pt"

    def run(way: str, checked: bool) -> dict[str, float]:
        cmd = [sys.executable, __file__, "--dir", str(folder), "--experts", str(args.experts)]
        cmd += ["--child", way] + (["--check", str(check)] if checked else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    # First round: from_pretrained writes the reference the other two are checked against.
    results: dict[str, list[dict[str, float]]] = {w: [] for w in WAYS}
    for r in range(args.repeat):
        for way in ("from_pretrained", *(w for w in WAYS if w != "from_pretrained")):
            results[way].append(run(way, checked=(r == 0)))
    check.unlink(missing_ok=True)
    print(f"folder {size / 1e6:.0f} MB; one load per fresh process, {args.repeat} rounds; "
          "fastckpt and torch.cat equal to from_pretrained byte for byte")  # fmt: skip
    print("| way | median s | all runs (s) | peak private MB above the model |")
    print("|---|---|---|---|")
    base = statistics.median(r["seconds"] for r in results["from_pretrained"])
    for way in WAYS:
        secs = [r["seconds"] for r in results[way]]
        mem = [r["over_model"] for r in results[way]]
        print(f"| {way} | {statistics.median(secs):.3f} ({base / statistics.median(secs):.2f}x "
              f"from_pretrained) | {', '.join(f'{s:.3f}' for s in secs)} | "
              f"{statistics.median(mem):.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
