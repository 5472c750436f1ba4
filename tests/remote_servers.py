"""Servers on 127.0.0.1 for the remote-checkpoint tests, started and stopped by fixtures.

- ``S3Server``: moto's S3 application (the one ``ThreadedMotoServer`` serves) behind a
  small WSGI layer that counts the body bytes of every GET and can inject faults.
- ``RangeServer``: Python's own threaded HTTP server with a handler for ``Range`` and
  ``If-Match`` (nginx is not used: CI may not have it), the same counters and faults.

Faults (``server.fault``): ``("status", code, n)`` answers ``code`` to the next ``n``
object requests (n < 0: all), ``("stall", seconds)`` stalls each one that long, ``("cut",
n)`` (RangeServer) drops the connection halfway through the body of the next ``n`` GETs,
``("no-range",)`` (RangeServer) answers every GET with the whole object, as a server
without range support does.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit


@dataclass
class Counters:
    body_bytes: int = 0  # bytes of GET bodies sent for objects
    gets: int = 0
    ranges: list[str] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)  # Authorization headers of object requests
    by_key: dict[str, int] = field(default_factory=dict)  # body bytes per SigV4 access key id
    in_flight: int = 0  # GETs being answered now (RangeServer)
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, auth: str, n: int) -> None:
        """``n`` body bytes sent for a request signed with ``auth`` (lock held)."""
        self.body_bytes += n
        m = re.search(r"Credential=([^/]+)/", auth)
        if m:
            self.by_key[m.group(1)] = self.by_key.get(m.group(1), 0) + n

    def reset(self) -> None:
        with self.lock:
            self.body_bytes = 0
            self.gets = 0
            self.ranges = []
            self.auth = []
            self.by_key = {}
            self.most_in_flight = self.in_flight


class _Faults:
    fault: Any = None
    _lock = threading.Lock()

    def take_fault(self, head: bool = False) -> Any:
        """The fault for this request, if any (counting down a status or cut fault; a HEAD,
        which has no body, is never cut)."""
        with self._lock:
            f = self.fault
            if f is None or (head and f[0] == "cut"):
                return None
            if f[0] in ("status", "cut"):
                n = f[-1]
                if n == 0:
                    return None
                if n > 0:
                    self.fault = (*f[:-1], n - 1)
            return f


class S3Server(_Faults):
    def __init__(self) -> None:
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        self.counters = Counters()
        self.fault = None
        inner = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            "127.0.0.1", 0, self._wrap(inner), threaded=True, request_handler=Quiet
        )
        self.port = self._server.server_port
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _wrap(self, inner: Any) -> Any:
        counters = self.counters

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            method = environ["REQUEST_METHOD"]
            path = environ.get("PATH_INFO", "")
            is_object = path.count("/") >= 2 and not environ.get("QUERY_STRING")
            fault = self.take_fault() if is_object and method in ("GET", "HEAD") else None
            if fault is not None and fault[0] == "stall":
                time.sleep(fault[1])
            elif fault is not None:
                code = fault[1]
                start_response(f"{code} Injected", [("Content-Length", "0")])
                return [b""]
            body = inner(environ, start_response)
            if method != "GET" or not is_object:
                return body
            with counters.lock:
                counters.gets += 1
                counters.ranges.append(environ.get("HTTP_RANGE", ""))
                counters.auth.append(environ.get("HTTP_AUTHORIZATION", ""))

            auth = environ.get("HTTP_AUTHORIZATION", "")

            def counted() -> Any:
                for chunk in body:
                    with counters.lock:
                        counters.add(auth, len(chunk))
                    yield chunk
                close = getattr(body, "close", None)
                if close is not None:
                    close()

            return counted()

        return app

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(5)


class RangeServer(_Faults):
    """Serves ``files`` (path -> bytes) with ``Range``, ``ETag`` and ``If-Match``."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.counters = Counters()
        self.fault = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # As object stores and nginx do: without it a small response (headers, then
            # the body in a second write) waits ~40 ms for the client's delayed ACK.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._answer(head=True)

            def do_GET(self) -> None:
                c = outer.counters
                with c.lock:
                    c.in_flight += 1
                    c.most_in_flight = max(c.most_in_flight, c.in_flight)
                try:
                    self._answer(head=False)
                finally:
                    with c.lock:
                        c.in_flight -= 1

            def _answer(self, head: bool) -> None:
                fault = outer.take_fault(head)
                if fault is not None and fault[0] == "stall":
                    time.sleep(fault[1])
                elif fault is not None and fault[0] == "status":
                    self.send_response(fault[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                # A request line may name the whole URL (absolute form, RFC 9112 3.2.2, as
                # Run:ai's S3 client sends it): the path is the part after the host.
                path = urlsplit(self.path).path if "://" in self.path else self.path
                data = outer.files.get(unquote(path))  # as a server decodes %2F
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                etag = outer.etag(data)
                want = self.headers.get("If-Match")
                if want is not None and want != etag:
                    self.send_response(412)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end, code = 0, len(data), 200
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if m and not (fault is not None and fault[0] == "no-range"):
                    start = int(m.group(1))
                    end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
                    if start >= len(data) or start >= end:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    code = 206
                self.send_response(code)
                self.send_header("Content-Length", str(end - start))
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Last-Modified", "Mon, 07 Dec 2026 00:00:00 GMT")
                if code == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                with outer.counters.lock:
                    outer.counters.gets += 1
                    outer.counters.ranges.append(self.headers.get("Range", ""))
                    outer.counters.auth.append(self.headers.get("Authorization", ""))
                    outer.counters.add(self.headers.get("Authorization", ""), end - start)
                try:
                    if fault is not None and fault[0] == "cut":
                        self.wfile.write(data[start : start + (end - start) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    self.wfile.write(data[start:end])
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self._etags: dict[int, tuple[bytes, str]] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def etag(self, data: bytes) -> str:
        """md5 of the object, computed once per object (not per request: a hash of the whole
        object per ranged GET would make the server's cost per request that of moto's)."""
        with self._lock:
            hit = self._etags.get(id(data))
            if hit is None or hit[0] is not data:
                hit = (data, '"' + hashlib.md5(data).hexdigest() + '"')
                self._etags[id(data)] = hit
            return hit[1]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
