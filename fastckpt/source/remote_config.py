"""From a URL and the environment to a store's configuration: which bucket, container
and account, where the keys start, and where the credentials come from.

- ``s3://bucket/key``: obstore reads ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``, web identity and instance
  roles itself. Profiles (``AWS_PROFILE``, ``~/.aws/config`` and ``~/.aws/credentials``,
  ``AWS_CONFIG_FILE``, ``AWS_SHARED_CREDENTIALS_FILE``: SSO, ``credential_process``,
  assumed roles) are botocore's: when no keys are in the environment and a profile or
  one of those files is there, boto3's session gives the credentials (obstore's
  ``Boto3CredentialProvider``, refreshed as they expire), the profile's region and its
  ``endpoint_url``. boto3 is the ``remote-aws`` extra (botocore is 30 MB: not in
  ``remote``); without it an explicit ``AWS_PROFILE`` is refused by name.
- ``gs://bucket/key`` (or ``gcs://``): obstore reads ``GOOGLE_APPLICATION_CREDENTIALS``
  (application default credentials), ``GOOGLE_SERVICE_ACCOUNT`` (a key file, whose
  ``gcs_base_url`` points at an emulator), ``GOOGLE_BEARER_TOKEN``, ``GOOGLE_BASE_URL``
  and the GCE metadata server.
- ``az://container/key`` (or ``azure://``) with the account in
  ``AZURE_STORAGE_ACCOUNT_NAME``; without that variable ``az://account/container/key``;
  ``abfs[s]://container@account.dfs.core.windows.net/key``. obstore reads
  ``AZURE_STORAGE_ACCOUNT_KEY``, ``AZURE_STORAGE_SAS_TOKEN``, ``AZURE_STORAGE_TOKEN``,
  ``AZURE_CLIENT_ID``/``AZURE_TENANT_ID``/``AZURE_CLIENT_SECRET``, managed identity,
  ``AZURE_STORAGE_ENDPOINT`` and ``AZURE_STORAGE_USE_EMULATOR`` (Azurite).
- ``http(s)://host/path``: no credentials.

An ``http://`` endpoint (a local server or an emulator) is allowed when the environment
names one. Nothing here puts a credential into a message: errors name the URL, and a
profile by its name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastckpt.errors import CheckpointError

_AZURE_ACCOUNT_VARS = ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT")


@dataclass
class StoreSpec:
    """What ``obstore.store.from_url`` is given for one URL, and how objects are named."""

    kind: str  # "s3", "gcs", "azure" or "http"
    root: str  # the URL obstore's from_url is given (bucket / container, no key)
    named: str  # the URL's own root, to name objects in messages: f"{named}/{key}"
    key: str  # the key (prefix) the URL names inside the store
    config: dict[str, str] = field(default_factory=dict)  # never a secret
    allow_http: bool = False
    credential_provider: Any = None  # boto3's, for an AWS profile
    credentials_from: str = "environment"  # where the credentials come from, for reports


def _http(value: str | None) -> bool:
    return bool(value) and str(value).startswith("http://")


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def store_spec(url: str, env: Mapping[str, str] | None = None) -> StoreSpec:
    """The store configuration for ``url`` (see the module docstring)."""
    env = os.environ if env is None else env
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host, path = parts.netloc, parts.path.lstrip("/")
    if scheme in ("http", "https"):
        root = f"{scheme}://{host}"
        return StoreSpec("http", root, root, path, allow_http=scheme == "http")
    if not host:
        raise CheckpointError(f"{url}: names no bucket or container")
    if scheme == "s3":
        spec = StoreSpec("s3", f"s3://{host}", f"s3://{host}", path)
        spec.config["bucket"] = host
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        spec.allow_http = _http(endpoint)  # an endpoint the environment chose
        _aws_profile(url, spec, env)
        return spec
    if scheme in ("gs", "gcs"):
        spec = StoreSpec("gcs", f"gs://{host}", f"{scheme}://{host}", path)
        spec.config["bucket"] = host
        spec.allow_http = _http(env.get("GOOGLE_BASE_URL"))
        return spec
    if scheme in ("az", "azure", "abfs", "abfss"):
        return _azure(url, scheme, host, path, env)
    raise CheckpointError(f"{url}: not a URL fastckpt reads (s3://, gs://, az://, https://)")


def _azure(url: str, scheme: str, host: str, path: str, env: Mapping[str, str]) -> StoreSpec:
    if scheme in ("abfs", "abfss"):
        container, _, account_host = host.partition("@")
        if not container or not account_host:
            raise CheckpointError(
                f"{url}: an abfs:// URL is abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/KEY"
            )
        account = account_host.split(".", 1)[0]
        named = f"{scheme}://{host}"
    else:
        account = next((env[v] for v in _AZURE_ACCOUNT_VARS if env.get(v)), "")
        if account:  # az://container/key
            container, named = host, f"{scheme}://{host}"
        else:  # az://account/container/key
            account = host
            container, _, path = path.partition("/")
            if not container:
                raise CheckpointError(
                    f"{url}: names no container: az://CONTAINER/KEY with the account in "
                    "AZURE_STORAGE_ACCOUNT_NAME, or az://ACCOUNT/CONTAINER/KEY"
                )
            named = f"{scheme}://{host}/{container}"
    spec = StoreSpec("azure", f"az://{container}", named, path)
    spec.config.update(account_name=account, container_name=container)
    endpoint = env.get("AZURE_STORAGE_ENDPOINT") or env.get("AZURE_ENDPOINT")
    spec.allow_http = _http(endpoint) or _true(env.get("AZURE_STORAGE_USE_EMULATOR"))
    return spec


def _aws_profile(url: str, spec: StoreSpec, env: Mapping[str, str]) -> None:
    """Credentials, region and endpoint from an AWS profile, when the environment has no
    keys and a profile or a config / credentials file is there (botocore reads them)."""
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return  # the environment's keys come first, as in every AWS SDK
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE")
    files = (
        env.get("AWS_CONFIG_FILE") or "~/.aws/config",
        env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
    )
    if not profile and not any(Path(f).expanduser().is_file() for f in files):
        return
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        if profile:
            raise CheckpointError(
                f"{url}: AWS_PROFILE={profile} is read with boto3: pip install "
                "'fastckpt[remote-aws]' (or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            ) from None
        return  # the files are left to whoever wrote them; obstore's own chain runs
    import botocore.exceptions

    try:
        session = boto3.Session(profile_name=profile)
        credentials = session.get_credentials()
        if credentials is None:
            if profile:
                raise CheckpointError(f"{url}: AWS profile {profile!r} gives no credentials")
            return  # no credentials there: instance roles and the like, read by obstore
        provider = Boto3CredentialProvider(session)
        region = session.region_name
        endpoint = session.client("s3").meta.endpoint_url  # builds a client; sends nothing
    except botocore.exceptions.ProfileNotFound:
        raise CheckpointError(
            f"{url}: AWS profile {profile!r} is not in the AWS config files"
        ) from None
    except CheckpointError:
        raise
    except Exception as e:  # botocore's own text may quote a file's contents: not kept
        raise CheckpointError(
            f"{url}: cannot read the AWS profile {profile or 'default'!r} ({type(e).__name__})"
        ) from None
    spec.credential_provider = provider
    spec.credentials_from = f"AWS profile {profile or 'default'!r}"
    if region and not (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
        spec.config["region"] = region
    if endpoint and not urlsplit(endpoint).hostname.endswith(".amazonaws.com"):  # type: ignore[union-attr]
        spec.config["endpoint"] = endpoint  # the profile's endpoint_url
        spec.allow_http = spec.allow_http or _http(endpoint)
