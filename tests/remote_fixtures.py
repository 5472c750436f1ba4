"""The servers of the remote-checkpoint tests (tests/remote_servers.py) as pytest fixtures,
and the upload of a folder to either: one definition for tests/test_remote*.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.remote_servers import RangeServer, S3Server

BUCKET = "ckpts"
SECRET = "fastckpt-test-secret-key-1234"


@pytest.fixture(scope="module")
def s3_server():
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    import boto3

    for k, v in {
        "AWS_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "FASTCKPT_REMOTE_TIMEOUT": "3",
        "FASTCKPT_REMOTE_CONNECT_TIMEOUT": "2",
        "FASTCKPT_REMOTE_RETRY_SECONDS": "6",
        "FASTCKPT_REMOTE_RETRIES": "3",
    }.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    s3_server.fault = None
    s3_server.counters.reset()
    s3_server.client = client
    yield s3_server
    s3_server.fault = None


@pytest.fixture
def http_server(monkeypatch):
    monkeypatch.setenv("FASTCKPT_REMOTE_TIMEOUT", "5")
    server = RangeServer()
    yield server
    server.stop()


def upload(server, prefix: str, folder: Path, skip: tuple[str, ...] = ()) -> str:
    """The folder's files, those of its subfolders too, under ``prefix`` (S3 or the Range
    server); the folder's URL."""
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if not f.is_file() or rel in skip:
            continue
        if isinstance(server, RangeServer):
            server.files[f"/{prefix}/{rel}"] = f.read_bytes()
        else:
            server.client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=f.read_bytes())
    server.counters.reset()
    if isinstance(server, RangeServer):
        return f"{server.url}/{prefix}/"
    return f"s3://{BUCKET}/{prefix}/"


def tensor_bytes(folder: Path) -> dict[str, bytes]:
    """Each tensor's bytes, by name, of the safetensors files ``convert`` wrote in ``folder``."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= {k: v.view(torch.uint8).numpy().tobytes() for k, v in load_file(f).items()}
    return out


def rank_env(folder: Path, url: str, monkeypatch) -> None:
    """FOLDER/env.json for the ranks a test starts: the server's environment and ``url``
    (FASTCKPT_TEST_URL), holes never fetched (FASTCKPT_REMOTE_GAP_BYTES=0), so that the
    bytes sent to a rank are exactly its shard's runs."""
    monkeypatch.setenv("FASTCKPT_TEST_URL", url)
    monkeypatch.setenv("FASTCKPT_REMOTE_GAP_BYTES", "0")
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "FASTCKPT_"))}
    (folder / "env.json").write_text(json.dumps(env))
