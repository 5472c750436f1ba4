"""Remote loads against an S3 server on 127.0.0.1 (moto, started here), one load per fresh process.

    .venv/bin/python bench/bench_remote.py --mb 256 [--s3fs-python /path/to/python]

Rows (each a new interpreter, the same object, the same endpoint):
- ceiling (obstore / boto3 / s3fs): raw concurrent ranged GETs of the whole object, 8 MiB
  parts, 32 in flight (s3fs: cat_ranges), bytes dropped: what the client and server allow;
- fastckpt: ``fastckpt.load_into(model, "s3://...")``;
- download + load: boto3 ``download_file`` (s3transfer, 10 threads) to a local file, then
  ``safetensors.torch.load_file`` and ``model.load_state_dict``;
- runai-model-streamer, when it and its S3 backend are installed.
Peak RSS is the child's ``ru_maxrss``. Raw mode (``raw CLIENT URL``) needs only the client.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    bucket, key = url[len("s3://") :].split("/", 1)
    started = time.perf_counter()
    if client in ("obstore", "obstore-1get"):
        import asyncio

        import obstore
        from obstore.store import from_url

        store = from_url(f"s3://{bucket}", client_options={"allow_http": "true"})
        size = obstore.head(store, key)["size"]
        part = size if client == "obstore-1get" else PART

        async def all_parts() -> int:
            gate = asyncio.Semaphore(INFLIGHT)

            async def one(s: int) -> int:
                async with gate:
                    r = await obstore.get_async(
                        store, key, options={"range": (s, min(size, s + part))}
                    )
                    return len(await r.bytes_async())

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
        from runai_model_streamer import SafetensorsStreamer

        sd = {}
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(url)
            for name, tensor in streamer.get_tensors():
                sd[name] = tensor.clone()
        model.load_state_dict(sd)
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--max-host-mb", type=int, default=256)
    ap.add_argument("--s3fs-python", default=None, help="an interpreter with s3fs installed")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    import boto3
    import torch
    from safetensors.torch import save_file

    from tests.remote_servers import S3Server

    server = S3Server()
    env = dict(os.environ, AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID="bench",
               AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
               AWS_DEFAULT_REGION="us-east-1", RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING="0",
               AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    n = max(1, args.mb // 16)
    spec = {f"w{i}": [1024, 4096] for i in range(n)}  # 16 MiB of float32 each
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_file({k: torch.randn(v) for k, v in spec.items()}, str(path))
        size = path.stat().st_size
        s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip
        s3.create_bucket(Bucket=BUCKET)
        s3.upload_file(str(path), BUCKET, "model.safetensors")
    url = f"s3://{BUCKET}/model.safetensors"
    rows: list[tuple[str, dict[str, float] | str]] = []
    for client in ("obstore", "boto3", "obstore-1get"):
        rows.append(
            (
                f"ceiling: raw ranged GETs ({client})",
                _child(sys.executable, ["raw", client, url], env),
            )
        )
    if args.s3fs_python:
        rows.append(
            (
                "ceiling: raw ranged GETs (s3fs cat_ranges)",
                _child(args.s3fs_python, ["raw", "s3fs", url], env),
            )
        )
    spec_json = json.dumps(spec)
    for method in ("none", "fastckpt", "fastckpt-64m", "download+load", "runai"):
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
    server.stop()
    print(f"object: {size / 2**20:.0f} MiB safetensors ({n} tensors), moto S3 on 127.0.0.1; "
          f"max_host_bytes={args.max_host_mb} MiB")  # fmt: skip
    print("| method | seconds | MB/s | peak RSS MB |\n|---|---|---|---|")
    for name, r in rows:
        if isinstance(r, str):
            print(f"| {name} | skipped: {r} | | |")
        else:
            rate = size / 1e6 / r["seconds"]
            print(f"| {name} | {r['seconds']:.2f} | {rate:.0f} | {r['rss_mb']:.0f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "raw":
        print(json.dumps(raw(sys.argv[2], sys.argv[3])))
    elif len(sys.argv) > 1 and sys.argv[1] == "load":
        print(json.dumps(load(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5]))))
    else:
        main()
