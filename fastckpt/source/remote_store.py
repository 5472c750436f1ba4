"""Ranged reads of one object in an object store or on an HTTP server (``obstore``).

Why obstore (the ``remote`` extra): one small wheel (the Rust ``object_store``
crate, no Python dependencies) speaks S3, GCS, Azure and plain HTTP, signs
requests itself, takes credentials, endpoints and regions from each cloud's
standard environment (``AWS_ENDPOINT_URL``, ``AWS_REGION``, instance and
workload identities, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``;
AWS profiles through boto3: fastckpt.source.remote_config),
retries with backoff, and runs every request on its own threads without the
GIL. bench/RESULTS.md has the comparison with boto3 and s3fs.

Nothing here ever puts an error's own text (which may quote a signed request
or a server's body) into the message: errors name the URL and what went wrong.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from fastckpt.errors import CheckpointError
from fastckpt.source.remote_config import store_spec

_T = TypeVar("_T")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass(frozen=True)
class Settings:
    """Limits of the remote reads; each can be set from the environment."""

    timeout: float  # seconds one request may take (a stalled server fails after it)
    connect_timeout: float
    retries: int  # per request, on 5xx, throttling and dropped connections
    retry_seconds: float  # total time spent retrying one request
    concurrency: int  # requests in flight
    part: int  # largest single ranged GET, bytes
    gap: int  # holes up to this size between two needed runs are fetched, not split

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            timeout=_env_float("FASTCKPT_REMOTE_TIMEOUT", 60.0),
            connect_timeout=_env_float("FASTCKPT_REMOTE_CONNECT_TIMEOUT", 10.0),
            retries=int(_env_float("FASTCKPT_REMOTE_RETRIES", 5)),
            retry_seconds=_env_float("FASTCKPT_REMOTE_RETRY_SECONDS", 60.0),
            concurrency=max(1, int(_env_float("FASTCKPT_REMOTE_CONCURRENCY", 32))),
            part=max(1 << 16, int(_env_float("FASTCKPT_REMOTE_PART_BYTES", 8 << 20))),
            gap=int(_env_float("FASTCKPT_REMOTE_GAP_BYTES", 64 << 10)),
        )


def _obstore() -> Any:
    try:
        import obstore
        import obstore.store
    except ImportError:
        raise CheckpointError(
            "reading s3://, gs://, az:// and http(s):// checkpoints needs the 'remote' extra: "
            "pip install 'fastckpt[remote]' (it installs obstore)"
        ) from None
    return obstore


def run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Runs a coroutine to its end from synchronous code, even under a running event loop
    (a notebook): then on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    out: list[Any] = []

    def target() -> None:
        try:
            out.append((True, asyncio.run(coro)))
        except BaseException as e:  # re-raised on the caller's thread
            out.append((False, e))

    t = threading.Thread(target=target, name="fastckpt-remote")
    t.start()
    t.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


OBJECTS_AT_ONCE = 8  # objects whose requests ``each`` has in flight together


def each(calls: Sequence[Callable[[], _T]]) -> list[_T]:
    """The results of ``calls``, run on up to ``OBJECTS_AT_ONCE`` threads: requests to
    different objects (a folder's shards, a DCP directory's files) in flight together, not
    one object's after another's. The first error is raised, after every call has ended."""
    if len(calls) <= 1:
        return [c() for c in calls]
    threads = min(OBJECTS_AT_ONCE, len(calls))
    with ThreadPoolExecutor(threads, thread_name_prefix="fastckpt-remote") as ex:
        futures = [ex.submit(c) for c in calls]
    return [f.result() for f in futures]


def failure(url: str, e: BaseException) -> Exception:
    """The exception to raise for a failed request: the URL and the kind of failure only."""
    name = type(e).__name__
    text = str(e)
    if name == "NotFoundError" or isinstance(e, FileNotFoundError):
        return FileNotFoundError(f"{url}: no such checkpoint file or folder")
    if name in ("PermissionDeniedError", "UnauthenticatedError"):
        return CheckpointError(
            f"{url}: access denied ({'403' if '403' in text else '401'}): check the credentials "
            "the environment gives for this store"
        )
    if name == "PreconditionError":
        return CheckpointError(
            f"{url}: the object changed during the load (its ETag no longer matches); "
            "refused: load again"
        )
    if isinstance(e, CheckpointError):
        return e
    if name == "NotSupportedError" and "Range" in text:
        return CheckpointError(
            f"{url}: the server does not answer range requests (it sent the whole object "
            "for a part): fastckpt reads remote files by ranges; download the file instead"
        )
    status = re.search(r"\b(?:status|Status)[^0-9]{0,20}([1-5]\d\d)\b", text)
    if status:
        why = f"the server answered HTTP {status.group(1)}"
    elif re.search(r"timed? ?out|Timeout|deadline", text, re.IGNORECASE):
        why = "the server did not answer in time (FASTCKPT_REMOTE_TIMEOUT)"
    elif re.search(r"body error|IncompleteBody|Interrupted|UnexpectedEof", text):
        why = "the connection was closed before the whole response arrived (retried)"
    elif re.search(r"connect|Connection|dns|resolve", text, re.IGNORECASE):
        why = "cannot connect to the server"
    else:
        why = f"the request failed ({name})"
    return CheckpointError(f"{url}: cannot read: {why}")


class Store:
    """One bucket / container / HTTP server, and the key prefix of a URL in it."""

    def __init__(self, url: str, settings: Settings | None = None):
        ob = _obstore()
        self.settings = settings or Settings.from_env()
        spec = store_spec(url)
        client = {
            "timeout": f"{self.settings.timeout}s",
            "connect_timeout": f"{self.settings.connect_timeout}s",
        }
        if spec.allow_http:
            client["allow_http"] = "true"  # the URL or the environment said http
        retry = {
            "max_retries": self.settings.retries,
            "retry_timeout": timedelta(seconds=self.settings.retry_seconds),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=5),
                "base": 2.0,
            },
        }
        extra: dict[str, Any] = {}
        if spec.config:
            extra["config"] = spec.config
        if spec.credential_provider is not None:
            extra["credential_provider"] = spec.credential_provider
        try:
            self.store = ob.store.from_url(
                spec.root, client_options=client, retry_config=retry, **extra
            )
        except Exception as e:
            raise CheckpointError(
                f"{url}: cannot set up a client for it ({type(e).__name__})"
            ) from None
        self.spec = spec
        self.root = spec.named
        self.key_of_path = spec.key

    def url(self, key: str) -> str:
        return f"{self.root}/{key}"

    def head(self, key: str) -> Meta:
        ob = _obstore()
        try:
            m = ob.head(self.store, key)
        except Exception as e:
            raise failure(self.url(key), e) from None
        return Meta(int(m["size"]), m.get("e_tag"))

    def get_all(self, key: str) -> bytes:
        ob = _obstore()
        try:
            return bytes(ob.get(self.store, key).bytes())
        except Exception as e:
            raise failure(self.url(key), e) from None

    def list_files(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of the objects directly under ``prefix`` (``a/b/``)."""
        ob = _obstore()
        try:
            found = ob.list_with_delimiter(self.store, prefix or None)
        except Exception as e:
            raise failure(self.url(prefix), e) from None
        return [(str(m["path"]), int(m["size"])) for m in found["objects"]]


@dataclass(frozen=True)
class Meta:
    size: int
    etag: str | None


class Object:
    """One object of a store, its size and ETag fixed when it was opened: every later read
    is checked against them (If-Match where the server keeps ETags, and the size each
    response reports), so an object replaced during a load is refused."""

    def __init__(self, store: Store, key: str):
        self.store = store
        self.key = key
        self.url = store.url(key)
        meta = store.head(key)
        self.size = meta.size
        self.etag = meta.etag
        self.fetched = 0  # bytes received
        self.requests = 0

    def check_unchanged(self) -> None:
        """Refuses the load when the object is no longer the one that was opened."""
        meta = self.store.head(self.key)
        if meta.size != self.size or (self.etag and meta.etag and meta.etag != self.etag):
            raise CheckpointError(
                f"{self.url}: the object changed since it was opened (size or ETag differs); "
                "refused before anything was written: open it again"
            )

    def read_into(
        self, pieces: Sequence[tuple[int, int, memoryview]], max_buffered: int | None = None
    ) -> None:
        """Bytes [start, end) of the object into each piece's buffer (``end - start`` bytes
        long), cut into parts of at most ``settings.part`` bytes, many in flight: at most
        ``settings.concurrency``, and no more than ``max_buffered`` bytes of responses held
        at once (each part's body is received whole, then copied into its buffer; parts
        are cut smaller where one would exceed it, down to 1 MiB)."""
        part, in_flight = self.store.settings.part, self.store.settings.concurrency
        if max_buffered is not None:
            part = min(part, max(max_buffered, 1 << 20))
            in_flight = max(1, min(in_flight, max_buffered // part))
        parts = [
            (at, min(end, at + part), out[at - start : min(end, at + part) - start])
            for start, end, out in pieces
            for at in range(start, end, part)
        ]
        if parts:
            run_sync(self._read_all(parts, in_flight))

    async def _read_all(self, parts: list[tuple[int, int, memoryview]], in_flight: int) -> None:
        gate = asyncio.Semaphore(in_flight)

        async def one(start: int, end: int, out: memoryview) -> None:
            async with gate:
                await self._read_one(start, end, out)

        tasks = [asyncio.ensure_future(one(*p)) for p in parts]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    async def _read_one(self, start: int, end: int, out: memoryview) -> None:
        """Bytes [start, end) of the object into ``out``."""
        ob = _obstore()
        options: dict[str, Any] = {"range": (start, end)}
        if self.etag:
            options["if_match"] = self.etag
        try:
            result = await ob.get_async(self.store.store, self.key, options=options)
            meta = result.meta
            etag = meta.get("e_tag")
            if int(meta["size"]) != self.size or (self.etag and etag and etag != self.etag):
                raise CheckpointError(
                    f"{self.url}: the object changed during the load (size or ETag differs "
                    "from when it was opened); refused: load again"
                )
            # The body whole, gathered by obstore's own threads, then one copy: streaming it
            # in 1 MiB chunks, each a hop through the event loop, made a 256 MiB load 1.3x
            # slower (bench/RESULTS.md).
            body = memoryview(await result.bytes_async())
        except Exception as e:
            raise failure(self.url, e) from None
        if len(body) != end - start:
            raise CheckpointError(
                f"{self.url}: asked for bytes {start} to {end}, received a different count"
            )
        out[:] = body
        self.requests += 1
        self.fetched += end - start
