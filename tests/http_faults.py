"""A loopback HTTP server that answers badly on purpose, or forwards to a simulator.

Modes (switch at any time with ``mode = ...``; a request already being answered keeps
the mode it started with):

- ``trickle``: status and headers at once, then the body one byte every 100 ms
  (``Content-Length`` far larger than will ever come);
- ``slow_headers``: the status line, then the headers one byte every 100 ms;
- ``endless``: a 200 whose body never ends, sent as fast as the client reads it;
- ``unavailable``: a 503 at once (a WebSocket handshake it refuses);
- ``forward``: the request goes to ``upstream`` and its answer comes back as it is.

Beside the mode, :meth:`FaultyHttp.replace_next` queues whole answers for one path: the
next request to that path gets the queued answer (whatever the mode, and without
reaching ``upstream``); every other request is answered by the mode as before.
``statuses`` counts the status of every answer sent (the mode's, the upstream's or a
replacement's), ``replaced`` the replacements sent.

Every slow answer is bounded: it ends when the client goes away, when the server stops
or after ``max_answer_s``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import requests

TRICKLE_STEP_S = 0.1
#: Not copied from the upstream answer (this server writes its own, or the body is
#: re-sent whole and already decoded).
HOP_HEADERS = (
    "content-length",
    "transfer-encoding",
    "connection",
    "server",
    "date",
    "content-encoding",
)


@dataclass(frozen=True)
class Replacement:
    """One whole answer served instead of the mode's: ``body`` byte for byte."""

    status: int
    body: bytes
    content_type: str


class FaultyHttp:
    def __init__(self, upstream: str | None = None, mode: str = "forward") -> None:
        self.upstream = upstream.rstrip("/") if upstream else None
        self.mode = mode
        self.max_answer_s = 120.0
        self.requests_seen = 0
        self.forwarded_ok = 0
        self.replaced = 0
        self.statuses: Counter[int] = Counter()
        self._replacements: dict[str, deque[Replacement]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner._answer(self, "GET")

            def do_POST(self) -> None:
                owner._answer(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultyHttp:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def replace_next(
        self,
        path: str,
        body: bytes,
        *,
        status: int = 200,
        content_type: str = "application/json",
        n: int = 1,
    ) -> None:
        """Answer the next ``n`` requests to ``path`` (the request path without its
        query, e.g. ``/api/v1/ticker``) with ``status`` and ``body``, after any answers
        already queued for it. Those requests never reach ``upstream``."""
        if n < 1:
            raise ValueError("n must be >= 1")
        answer = Replacement(status, bytes(body), content_type)
        with self._lock:
            self._replacements.setdefault(path, deque()).extend([answer] * n)

    def pending(self, path: str | None = None) -> int:
        """Replacements queued and not sent yet (for ``path``, or for every path)."""
        with self._lock:
            queues = (
                self._replacements.values()
                if path is None
                else [self._replacements.get(path, deque())]
            )
            return sum(len(q) for q in queues)

    def _take_replacement(self, raw_path: str) -> Replacement | None:
        path = urlsplit(raw_path).path
        with self._lock:
            queue = self._replacements.get(path)
            if not queue:
                return None
            self.replaced += 1
            self.statuses[queue[0].status] += 1
            return queue.popleft()

    def _count(self, status: int) -> None:
        with self._lock:
            self.statuses[status] += 1

    def _slow(self, write: Any, data: bytes) -> None:
        """Write ``data`` one byte per step, within the bounds above."""
        end = time.monotonic() + self.max_answer_s
        for i in range(len(data)):
            if self._stop.is_set() or time.monotonic() > end:
                return
            write(data[i : i + 1])
            if self._stop.wait(TRICKLE_STEP_S):
                return

    def _answer(self, h: BaseHTTPRequestHandler, method: str) -> None:
        with self._lock:
            self.requests_seen += 1
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        mode = self.mode
        h.close_connection = True
        replacement = self._take_replacement(h.path)
        try:
            if replacement is not None:
                h.send_response(replacement.status)
                h.send_header("Content-Type", replacement.content_type)
                h.send_header("Content-Length", str(len(replacement.body)))
                h.end_headers()
                h.wfile.write(replacement.body)
                h.wfile.flush()
            elif mode == "trickle":
                self._count(200)
                h.send_response(200)
                h.send_header("Content-Type", "application/json")
                h.send_header("Content-Length", "100000")
                h.end_headers()
                h.wfile.flush()
                self._slow(lambda b: (h.wfile.write(b), h.wfile.flush()), b'{"x":"' + b"1" * 99990)
            elif mode == "slow_headers":
                self._count(200)
                h.wfile.write(b"HTTP/1.1 200 OK\r\n")
                h.wfile.flush()
                self._slow(lambda b: (h.wfile.write(b), h.wfile.flush()), b"X-Slow: " + b"a" * 4000)
            elif mode == "unavailable":
                self._count(503)
                h.send_response(503)
                h.send_header("Content-Length", "0")
                h.end_headers()
            elif mode == "endless":
                self._count(200)
                h.send_response(200)
                h.send_header("Content-Type", "application/json")
                h.send_header("Connection", "close")
                h.end_headers()
                chunk = b"[" + b'"0.00000001",' * 5000
                end = time.monotonic() + self.max_answer_s
                while not self._stop.is_set() and time.monotonic() < end:
                    h.wfile.write(chunk)
            else:
                self._forward(h, method, body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _forward(self, h: BaseHTTPRequestHandler, method: str, body: bytes) -> None:
        assert self.upstream is not None, "forward mode needs an upstream"
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("host", "connection")}
        answer = requests.request(
            method, self.upstream + h.path, headers=headers, data=body or None, timeout=10
        )
        with self._lock:
            self.statuses[answer.status_code] += 1
            if answer.status_code < 300:
                self.forwarded_ok += 1
        h.send_response(answer.status_code)
        for k, v in answer.headers.items():
            if k.lower() not in HOP_HEADERS:
                h.send_header(k, v)
        h.send_header("Content-Length", str(len(answer.content)))
        h.end_headers()
        h.wfile.write(answer.content)
        h.wfile.flush()
