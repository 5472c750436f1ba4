"""Remote loads against a server on 127.0.0.1 (started here), one load per fresh process.

    .venv/bin/python bench/bench_remote.py --mb 256 [--s3fs-python /path/to/python]
    .venv/bin/python bench/bench_remote.py --mb 256 --server range   # s3:// at the Range server
    .venv/bin/python bench/bench_remote.py --mb 256 --http           # http:// at the Range server
    .venv/bin/python bench/bench_remote.py --mb 64 --ranks 2         # FSDP2 shards from s3://

Servers: ``moto`` (its S3 application re-reads the whole object for every ranged GET, so
ratios against it measure moto) or ``range`` (tests/remote_servers.py's threaded HTTP
server with Range support: it answers the path-style GET and HEAD of S3 from memory and
ignores the signature, enough for every row here). ``--http``: the same server named by
an http:// URL; the download row is then ``urllib`` (a plain download).

Rows (each a new interpreter, the same object, the same endpoint):
- ceiling (obstore / boto3 / s3fs): raw concurrent ranged GETs of the whole object, 8 MiB
  parts, 32 in flight (s3fs: cat_ranges), bytes dropped: what the client and server allow;
- ceiling + copy into fresh memory (obstore): the same GETs, each body copied into a
  ``torch.empty`` buffer of the object's size, never touched before, as a model built the
  usual way is: the least any loader that writes the bytes into a model does;
- fastckpt: ``fastckpt.load_into(model, "s3://...")``;
- download + load: boto3 ``download_file`` (s3transfer, 10 threads) to a local file, then
  ``safetensors.torch.load_file`` and ``model.load_state_dict``;
- runai-model-streamer, when it and its S3 backend are installed: each tensor it yields
  copied into the model's parameter.
Peak RSS is the child's ``ru_maxrss``. Raw mode (``raw CLIENT URL``) needs only the client.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUCKET = "bench"
PART = 8 << 20
INFLIGHT = 32


def _rss_mb() -> float:
    """Peak resident memory of this process (VmHWM: ru_maxrss survives exec on Linux and
    would report the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def raw(client: str, url: str) -> dict[str, float]:
    bucket, key = url.split("://", 1)[1].split("/", 1)
    if client in ("obstore", "obstore-1get", "obstore-copy"):
        # Imported before the clock starts: importing fastckpt imports torch (seconds here).
        import torch

        from fastckpt.source.remote_store import Store
    started = time.perf_counter()
    if client in ("obstore", "obstore-1get", "obstore-copy"):
        import asyncio

        import obstore

        st = Store(url)  # the client fastckpt uses, configured as fastckpt configures it
        store, key = st.store, st.key_of_path
        size = obstore.head(store, key)["size"]
        part = size if client == "obstore-1get" else PART
        into = torch.empty(size if client == "obstore-copy" else 0, dtype=torch.uint8)
        whole = memoryview(into.numpy())

        async def all_parts() -> int:
            gate = asyncio.Semaphore(INFLIGHT)

            async def one(s: int) -> int:
                async with gate:
                    r = await obstore.get_async(
                        store, key, options={"range": (s, min(size, s + part))}
                    )
                    body = memoryview(await r.bytes_async())
                    if client == "obstore-copy":
                        whole[s : s + len(body)] = body
                    return len(body)

            return sum(await asyncio.gather(*(one(s) for s in range(0, size, part))))

        got = asyncio.run(all_parts())
    elif client == "boto3":
        from concurrent.futures import ThreadPoolExecutor

        import boto3
        from botocore.config import Config

        s3 = boto3.client("s3", config=Config(max_pool_connections=INFLIGHT))
        size = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]

        def one(s: int) -> int:
            r = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={s}-{min(size, s + PART) - 1}")
            return len(r["Body"].read())

        with ThreadPoolExecutor(INFLIGHT) as ex:
            got = sum(ex.map(one, range(0, size, PART)))
    elif client == "s3fs":
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        size = fs.size(f"{bucket}/{key}")
        starts = list(range(0, size, PART))
        chunks = fs.cat_ranges([f"{bucket}/{key}"] * len(starts), starts,
                               [min(size, s + PART) for s in starts])  # fmt: skip
        got = sum(len(c) for c in chunks)
    else:
        raise SystemExit(f"unknown client {client}")
    return {"seconds": time.perf_counter() - started, "bytes": got, "rss_mb": _rss_mb()}


def _model(spec: dict[str, list[int]]):
    import torch
    from torch import nn

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, shape in spec.items():
                self.register_parameter(name, nn.Parameter(torch.empty(shape)))

    return M()


def load(
    method: str, url: str, spec: dict[str, list[int]], max_host_bytes: int
) -> dict[str, float]:
    if method == "fastckpt-64m":  # fewer, larger GETs (a server whose cost is per request)
        os.environ["FASTCKPT_REMOTE_PART_BYTES"] = str(64 << 20)
        method = "fastckpt"
    model = _model(spec)
    started = time.perf_counter()
    fetched = 0
    if method == "none":  # the interpreter, torch and the model: what every row starts from
        pass
    elif method == "fastckpt":
        import fastckpt

        report = fastckpt.load_into(model, url, max_host_bytes=max_host_bytes)
        fetched = report.fetched
    elif method == "download+load" and url.startswith("http"):
        import shutil
        import urllib.request

        from safetensors.torch import load_file

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "model.safetensors")
            with urllib.request.urlopen(url) as r, open(local, "wb") as f:
                shutil.copyfileobj(r, f, 8 << 20)
            model.load_state_dict(load_file(local))
    elif method == "download+load":
        import boto3
        from boto3.s3.transfer import TransferConfig
        from safetensors.torch import load_file

        bucket, key = url[len("s3://") :].split("/", 1)
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "model.safetensors")
            boto3.client("s3").download_file(
                bucket, key, local, Config=TransferConfig(max_concurrency=10)
            )
            model.load_state_dict(load_file(local))
    elif method == "runai":
        import torch
        from runai_model_streamer import SafetensorsStreamer

        into = dict(model.named_parameters())  # each tensor copied into place as it comes
        with torch.no_grad(), SafetensorsStreamer() as streamer:
            streamer.stream_file(url)
            for name, tensor in streamer.get_tensors():
                into[name].copy_(tensor)
    else:
        raise SystemExit(f"unknown method {method}")
    return {"seconds": time.perf_counter() - started, "fetched": fetched, "rss_mb": _rss_mb()}


def _child(python: str, args: list[str], env: dict[str, str]) -> dict[str, float] | str:
    r = subprocess.run([python, __file__, *args], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=900)  # fmt: skip
    lines = r.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        # (obstore's raw row can abort at interpreter exit, after its result is printed)
        return json.loads(lines[-1])  # type: ignore[no-any-return]
    return (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1][:300]


def _start_server(kind: str, data: bytes, env: dict[str, str]) -> tuple[Any, str, str]:
    """The server, the s3:// URL and the http:// URL of the object ``data``."""
    from tests.remote_servers import RangeServer, S3Server

    if kind == "moto":
        import boto3

        server: Any = S3Server()
        s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="model.safetensors", Body=data)
        endpoint = server.endpoint
    else:
        server = RangeServer()
        server.files[f"/{BUCKET}/model.safetensors"] = data
        server.etag(data)  # its md5, once, before any row is timed
        endpoint = server.url
    env["AWS_ENDPOINT_URL"] = endpoint
    return server, f"s3://{BUCKET}/model.safetensors", f"{endpoint}/{BUCKET}/model.safetensors"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--max-host-mb", type=int, default=256)
    ap.add_argument("--s3fs-python", default=None, help="an interpreter with s3fs installed")
    ap.add_argument("--server", choices=("moto", "range"), default="moto")
    ap.add_argument("--http", action="store_true", help="http:// at the Range server")
    ap.add_argument("--ranks", type=int, default=0, help="N gloo ranks, FSDP2 shards (s3://)")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import torch
    from safetensors.torch import save_file

    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench",
               AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
               AWS_DEFAULT_REGION="us-east-1", RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0",
               AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    n = max(1, args.mb // 16)
    spec = {f"w{i}": [1024, 4096] for i in range(n)}  # 16 MiB of float32 each
    if args.ranks:
        spec = {f"w{i}": [2048, 2048] for i in range(n)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        torch.manual_seed(0)
        save_file({k: torch.randn(v) for k, v in spec.items()}, str(path))
        data = path.read_bytes()
    size = len(data)
    server_kind = "range" if args.http else args.server
    server, s3_url, http_url = _start_server(server_kind, data, env)
    if args.ranks:
        _ranks(args.ranks, server, s3_url, spec, env, args.max_host_mb << 20)
        server.stop()
        return
    url = http_url if args.http else s3_url
    rows: list[tuple[str, dict[str, float] | str]] = []
    clients = ("obstore", "obstore-copy")
    if not args.http:
        clients += ("boto3", "obstore-1get")
    for client in clients:
        rows.append(
            (
                f"ceiling: raw ranged GETs ({client})",
                _child(sys.executable, ["raw", client, url], env),
            )
        )
    if args.s3fs_python and not args.http:
        rows.append(
            (
                "ceiling: raw ranged GETs (s3fs cat_ranges)",
                _child(args.s3fs_python, ["raw", "s3fs", url], env),
            )
        )
    spec_json = json.dumps(spec)
    methods = ("none", "fastckpt", "fastckpt-64m", "download+load")
    if not args.http:
        methods += ("runai",)
    for method in methods:
        rows.append(
            (
                method,
                _child(
                    sys.executable,
                    ["load", method, url, spec_json, str(args.max_host_mb << 20)],
                    env,
                ),
            )
        )
    # The first ceiling again, last: the load of this shared machine moves between rows.
    rows.append((rows[0][0] + ", again", _child(sys.executable, ["raw", "obstore", url], env)))
    rows.append((rows[1][0] + ", again", _child(sys.executable, ["raw", "obstore-copy", url], env)))
    server.stop()
    where = "http:// at the Range server" if args.http else f"s3:// at {server_kind}"
    print(f"object: {size / 2**20:.0f} MiB safetensors ({n} tensors), {where} on 127.0.0.1; "
          f"max_host_bytes={args.max_host_mb} MiB")  # fmt: skip

    def fastest(client: str) -> float:
        row = f"ceiling: raw ranged GETs ({client})"
        got = [r["seconds"] for name, r in rows if name.startswith(row) and isinstance(r, dict)]
        return min(got) if got else float("nan")

    best, copied = fastest("obstore"), fastest("obstore-copy")
    print("x ceiling: the faster obstore ceiling's seconds / the row's; x copy ceiling: the same "
          "for the ceiling that copies into fresh memory")  # fmt: skip
    print("| method | seconds | MB/s | x ceiling | x copy ceiling | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        if isinstance(r, str):
            print(f"| {name} | skipped: {r} | | | | |")
        elif name == "none":
            print(f"| {name} | {r['seconds']:.2f} | | | | {r['rss_mb']:.0f} |")
        else:
            rate = size / 1e6 / r["seconds"]
            print(f"| {name} | {r['seconds']:.2f} | {rate:.0f} | {best / r['seconds']:.2f} | "
                  f"{copied / r['seconds']:.2f} | {r['rss_mb']:.0f} |")  # fmt: skip


def _ranks(
    world: int, server: Any, url: str, spec: dict[str, list[int]], env: dict[str, str],
    max_host_bytes: int,
) -> None:  # fmt: skip
    """``world`` gloo ranks load their FSDP2 shards of ``url``; each signs with its own key
    id, so the server counts the bytes it sent to each rank."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server.counters.reset()
    procs = []
    for rank in range(world):
        e = dict(env, AWS_ACCESS_KEY_ID=f"rank{rank}", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                 OMP_NUM_THREADS="1", FASTCKPT_REMOTE_GAP_BYTES="0")  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "rank", url, json.dumps(spec), str(max_host_bytes)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, cwd=REPO,
        ))  # fmt: skip
    results = []
    for rank, p in enumerate(procs):
        out, err = p.communicate(timeout=900)
        lines = out.strip().splitlines()
        if not lines or not lines[-1].startswith("{"):
            raise SystemExit(f"rank {rank} failed: {err.strip()[-2000:]}")
        results.append(json.loads(lines[-1]))
    total = sum(int(math.prod(v)) * 4 for v in spec.values())
    print(f"{world} gloo ranks, FSDP2 (fully_shard, Shard(0)), {len(spec)} x Linear "
          f"{spec[next(iter(spec))]} fp32 = {total / 2**20:.0f} MiB, {url}, "
          f"max_host_bytes={max_host_bytes >> 20} MiB, FASTCKPT_REMOTE_GAP_BYTES=0")  # fmt: skip
    print("| rank | seconds | MiB sent by the server | MiB its shard | ratio | values ok |")
    print("|---|---|---|---|---|---|")
    for rank, r in enumerate(results):
        sent = server.counters.by_key.get(f"rank{rank}", 0)
        mine = r["local_bytes"]
        print(f"| {rank} | {r['seconds']:.2f} | {sent / 2**20:.2f} | {mine / 2**20:.2f} | "
              f"{sent / mine:.3f} | {r['ok']} |")  # fmt: skip


def rank_main(url: str, spec: dict[str, list[int]], max_host_bytes: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    import fastckpt

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    with torch.device("meta"):
        model = _model(spec)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    dist.barrier()
    started = time.perf_counter()
    report = fastckpt.load_into(model, url, max_host_bytes=max_host_bytes)
    dist.barrier()
    seconds = time.perf_counter() - started
    local = 0
    ok = True
    gen = torch.Generator().manual_seed(0)
    for name, shape in spec.items():  # the file's values, regenerated in the file's order
        full = torch.randn(shape, generator=gen)
        t = model.get_parameter(name)
        assert isinstance(t, DTensor)
        mine = t.to_local()
        local += mine.numel() * mine.element_size()
        want = DTensor.from_local(full, mesh, [torch.distributed.tensor.Replicate()])
        want = want.redistribute(mesh, t.placements).to_local()
        ok = ok and torch.equal(mine.view(torch.uint8), want.view(torch.uint8))
    dist.destroy_process_group()
    return {"seconds": seconds, "fetched": report.fetched, "local_bytes": local, "ok": ok}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "raw":
        print(json.dumps(raw(sys.argv[2], sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "rank":
        sys.path.insert(0, str(REPO))
        print(json.dumps(rank_main(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "load":
        print(json.dumps(load(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]))))
    else:
        main()
