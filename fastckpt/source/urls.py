"""Which paths are URLs: a module of its own, so that opening a local file does not
import the remote store (its clients and settings load with the first URL)."""

from __future__ import annotations

SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://", "abfss://", "azure://",
           "http://", "https://")  # fmt: skip


def is_url(path: object) -> bool:
    return isinstance(path, str) and path.startswith(SCHEMES)
