"""Where a remote checkpoint's store, credentials, region and endpoint come from.

- AWS profiles (``AWS_PROFILE``, ``AWS_CONFIG_FILE``, ``AWS_SHARED_CREDENTIALS_FILE``)
  against moto's S3 server on 127.0.0.1: the profile's keys sign the requests (the
  server records which key id), its region and ``endpoint_url`` are used.
- gs:// and az:// have no emulator here (no network; fake-gcs-server and Azurite are not
  on PyPI): the URL -> store configuration is checked offline, and the plain ranged GETs
  obstore sends for them (GCS's XML API, Azure's Get Blob) are served by the Range HTTP
  server standing in at the endpoint the environment names (``GOOGLE_BASE_URL``,
  ``AZURE_STORAGE_ENDPOINT``). Neither was exercised against the real clouds.
- No credential ever appears in an error, a report or a log.
"""

from __future__ import annotations

import logging
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import fastckpt
from fastckpt.errors import CheckpointError
from fastckpt.source.remote_config import store_spec

pytest.importorskip("obstore", reason="the 'remote' extra (obstore) is not installed")

KEY_ID = "AKIDPROFILEFASTCKPT"
SECRET = "profile-secret-never-printed-0042"
TOKEN = "bearer-token-never-printed-0042"
AZ_KEY = "c2VjcmV0LWF6dXJlLWtleS1uZXZlci1wcmludGVk"  # base64, as an account key is

CLOUD_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
    "GOOGLE_BASE_URL", "GOOGLE_BEARER_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_SERVICE_ACCOUNT", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT",
    "AZURE_STORAGE_USE_EMULATOR",
)  # fmt: skip


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No cloud settings but the test's own; a HOME without ~/.aws; short timeouts."""
    for k in CLOUD_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for k, v in (("TIMEOUT", "3"), ("CONNECT_TIMEOUT", "2"), ("RETRIES", "1"),
                 ("RETRY_SECONDS", "3")):  # fmt: skip
        monkeypatch.setenv(f"FASTCKPT_REMOTE_{k}", v)
    return monkeypatch


def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"emb.weight": torch.randn(64, 32), "fc.weight": torch.randn(16, 32)}


@pytest.fixture
def st_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(state(), str(path))
    return path


def assert_tensors(ckpt: fastckpt.Checkpoint) -> None:
    for k, v in state().items():
        assert torch.equal(ckpt.tensor(k).view(torch.uint8), v.view(torch.uint8)), k


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (SECRET, KEY_ID, TOKEN, AZ_KEY):
            assert secret not in text


# -- URL -> store configuration (offline) -------------------------------------------------
def test_store_spec_parses_buckets_containers_and_accounts():
    s = store_spec("s3://bkt/a/b.safetensors", {})
    assert (s.kind, s.config["bucket"], s.key, s.named) == (
        "s3",
        "bkt",
        "a/b.safetensors",
        "s3://bkt",
    )
    assert not s.allow_http
    assert store_spec("s3://bkt/k", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}).allow_http
    g = store_spec("gcs://bkt/dir/", {"GOOGLE_BASE_URL": "http://127.0.0.1:4443"})
    assert (g.kind, g.config["bucket"], g.key, g.named, g.allow_http) == (
        "gcs", "bkt", "dir/", "gcs://bkt", True,
    )  # fmt: skip
    env = {"AZURE_STORAGE_ACCOUNT_NAME": "acct"}
    a = store_spec("az://cont/dir/model.safetensors", env)
    assert (a.config["account_name"], a.config["container_name"], a.key) == (
        "acct", "cont", "dir/model.safetensors",
    )  # fmt: skip
    assert a.named == "az://cont" and a.root == "az://cont"
    b = store_spec("az://acct2/cont2/dir/m.safetensors", {})  # no account in the environment
    assert (b.config["account_name"], b.config["container_name"], b.key, b.named) == (
        "acct2", "cont2", "dir/m.safetensors", "az://acct2/cont2",
    )  # fmt: skip
    c = store_spec("abfss://cont3@acct3.dfs.core.windows.net/x/y.bin", {})
    assert (c.config["account_name"], c.config["container_name"], c.key) == (
        "acct3",
        "cont3",
        "x/y.bin",
    )
    assert c.named == "abfss://cont3@acct3.dfs.core.windows.net"
    assert store_spec("az://c/k", {**env, "AZURE_STORAGE_USE_EMULATOR": "true"}).allow_http
    assert store_spec(
        "az://c/k", {**env, "AZURE_STORAGE_ENDPOINT": "http://127.0.0.1:1"}
    ).allow_http
    h = store_spec("https://host:8443/org/model/resolve/main/model.safetensors", {})
    assert (h.kind, h.root, h.key, h.allow_http) == (
        "http", "https://host:8443", "org/model/resolve/main/model.safetensors", False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "url, words",
    [
        ("abfs://nocontainer.dfs.core.windows.net/k", "CONTAINER@ACCOUNT"),
        ("az://acct-only", "names no container"),
        ("s3:///key", "names no bucket"),
    ],
)
def test_store_spec_refuses_malformed_urls(url, words):
    with pytest.raises(CheckpointError, match=words) as e:
        store_spec(url, {})
    assert url in str(e.value)


# -- AWS profiles against moto ---------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_server():
    pytest.importorskip("moto", reason="moto[server] (the test extra) is not installed")
    from tests.remote_servers import S3Server

    server = S3Server()
    yield server
    server.stop()


def write_profile(tmp_path, endpoint: str, name: str = "ckpt") -> None:
    (tmp_path / "config").write_text(
        f"[profile {name}]\nregion = eu-west-3\nendpoint_url = {endpoint}\n"
    )
    (tmp_path / "credentials").write_text(
        f"[{name}]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"
    )


@pytest.fixture
def profile_env(clean_env, tmp_path, s3_server, st_file):
    pytest.importorskip("boto3", reason="AWS profiles are read with boto3 (remote-aws extra)")
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="eu-west-3",
                          aws_access_key_id="setup", aws_secret_access_key="setup")  # fmt: skip
    try:
        client.create_bucket(
            Bucket="prof", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"}
        )
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    client.put_object(Bucket="prof", Key="m/model.safetensors", Body=st_file.read_bytes())
    write_profile(tmp_path, s3_server.endpoint)
    clean_env.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    clean_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    clean_env.setenv("AWS_PROFILE", "ckpt")
    s3_server.fault = None
    s3_server.counters.reset()
    yield s3_server
    s3_server.fault = None


def test_aws_profile_gives_keys_region_and_endpoint(profile_env, caplog, capfd):
    url = "s3://prof/m/model.safetensors"
    spec = store_spec(url)
    assert spec.config == {"bucket": "prof", "region": "eu-west-3",
                           "endpoint": profile_env.endpoint}  # fmt: skip
    assert spec.allow_http and spec.credentials_from == "AWS profile 'ckpt'"
    caplog.set_level(logging.DEBUG)
    with fastckpt.open(url) as ckpt:
        assert_tensors(ckpt)
    model = torch.nn.Module()
    model.emb = torch.nn.Embedding(64, 32)
    report = fastckpt.load_into(model, url, strict=False)
    assert torch.equal(model.emb.weight.detach(), state()["emb.weight"])
    # The profile's key id signed the requests (SigV4: Credential=KEYID/date/region/s3/...).
    assert profile_env.counters.auth
    assert all(
        f"Credential={KEY_ID}/" in a and "/eu-west-3/s3/" in a for a in profile_env.counters.auth
    )
    out, err = capfd.readouterr()
    assert_no_secret(str(report), repr(report), caplog.text, out, err)
    assert SECRET not in "".join(profile_env.counters.auth)  # signed, never sent


def test_aws_profile_denied_names_the_url_not_the_keys(profile_env, caplog):
    caplog.set_level(logging.DEBUG)
    profile_env.fault = ("status", 403, -1)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="s3://prof/m/model.safetensors: access denied") as e:
        fastckpt.open("s3://prof/m/model.safetensors")
    assert time.monotonic() - started < 20
    assert_no_secret(str(e.value), repr(e.value), caplog.text)


def test_missing_profile_is_named(profile_env, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(CheckpointError, match="AWS profile 'no-such-profile'") as e:
        fastckpt.open("s3://prof/m/model.safetensors")
    assert_no_secret(str(e.value))


def test_env_keys_win_over_the_profile(profile_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEYID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", profile_env.endpoint)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert store_spec("s3://prof/m/model.safetensors").credential_provider is None
    with fastckpt.open("s3://prof/m/model.safetensors") as ckpt:
        assert_tensors(ckpt)
    assert profile_env.counters.auth
    assert all("Credential=ENVKEYID/" in a for a in profile_env.counters.auth)


def test_profile_without_boto3_names_the_extra(clean_env, monkeypatch):
    clean_env.setenv("AWS_PROFILE", "ckpt")
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 fails
    with pytest.raises(CheckpointError, match=r"fastckpt\[remote-aws\]"):
        store_spec("s3://prof/m/model.safetensors")


# -- gs:// and az:// through the Range server at the endpoint the environment names ----------
@pytest.fixture
def http_server():
    from tests.remote_servers import RangeServer

    server = RangeServer()
    yield server
    server.stop()


def test_gs_with_a_base_url_and_bearer_token(clean_env, http_server, st_file, caplog):
    http_server.files["/bkt/dir/model.safetensors"] = st_file.read_bytes()
    clean_env.setenv("GOOGLE_BASE_URL", http_server.url)
    clean_env.setenv("GOOGLE_BEARER_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    with fastckpt.open("gs://bkt/dir/") as ckpt:
        assert str(ckpt.files[0]) == "gs://bkt/dir/model.safetensors"
        assert_tensors(ckpt)
    assert http_server.counters.auth and all(
        a == f"Bearer {TOKEN}" for a in http_server.counters.auth
    )
    http_server.fault = ("status", 403, -1)
    with pytest.raises(CheckpointError, match="gs://bkt/dir/model.safetensors") as e:
        fastckpt.open("gs://bkt/dir/model.safetensors")
    assert_no_secret(str(e.value), caplog.text)


@pytest.mark.parametrize("account_in_env", [True, False])
def test_az_with_an_endpoint_and_account_key(clean_env, http_server, st_file, account_in_env):
    http_server.files["/cont/dir/model.safetensors"] = st_file.read_bytes()
    clean_env.setenv("AZURE_STORAGE_ENDPOINT", http_server.url)
    clean_env.setenv("AZURE_STORAGE_ACCOUNT_KEY", AZ_KEY)
    if account_in_env:
        clean_env.setenv("AZURE_STORAGE_ACCOUNT_NAME", "acct")
        url = "az://cont/dir/model.safetensors"
    else:
        url = "az://acct/cont/dir/model.safetensors"
    with fastckpt.open(url) as ckpt:
        assert str(ckpt.files[0]) == url
        assert_tensors(ckpt)
    # Shared-key signed for the account; the key itself is never sent.
    assert all(a.startswith("SharedKey acct:") for a in http_server.counters.auth)
    http_server.fault = ("status", 403, -1)
    with pytest.raises(CheckpointError, match=url) as e:
        fastckpt.open(url)
    assert_no_secret(str(e.value), "".join(http_server.counters.auth))


@pytest.mark.parametrize(
    "scheme_url, var",
    [("gs://bkt/m.safetensors", "GOOGLE_BASE_URL"),
     ("az://cont/m.safetensors", "AZURE_STORAGE_ENDPOINT")],
)  # fmt: skip
def test_unreachable_endpoint_names_the_url_in_bounded_time(clean_env, scheme_url, var):
    from tests.conftest import free_port

    clean_env.setenv(var, f"http://127.0.0.1:{free_port()}")
    clean_env.setenv("GOOGLE_BEARER_TOKEN", TOKEN)
    clean_env.setenv("AZURE_STORAGE_ACCOUNT_NAME", "acct")
    clean_env.setenv("AZURE_STORAGE_ACCOUNT_KEY", AZ_KEY)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=scheme_url) as e:
        fastckpt.open(scheme_url)
    assert time.monotonic() - started < 20
    assert_no_secret(str(e.value))
