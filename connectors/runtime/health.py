"""``/metrics``, ``/healthz`` and ``/readyz`` on one small HTTP server thread.

``/healthz`` answers 200 while the connector's event loop keeps beating (a stuck
loop fails it, so Kubernetes restarts the pod). ``/readyz`` answers 200 only when
every named check is true; the body lists each check so an operator sees why not.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from connectors.runtime.errors import ConfigError
from connectors.runtime.metrics import Metrics


class HealthState:
    """Readiness checks and the loop heartbeat, shared between the loop and HTTP thread."""

    def __init__(self, heartbeat_timeout_s: float = 30.0) -> None:
        self._checks: dict[str, Callable[[], bool]] = {}
        self._flags: dict[str, bool] = {}
        self._lock = threading.Lock()
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._heartbeat = time.monotonic()

    def beat(self) -> None:
        self._heartbeat = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self._heartbeat < self.heartbeat_timeout_s

    def set(self, name: str, value: bool) -> None:
        with self._lock:
            self._flags[name] = value

    def add_check(self, name: str, check: Callable[[], bool]) -> None:
        with self._lock:
            self._checks[name] = check

    def checks(self) -> dict[str, bool]:
        with self._lock:
            out = dict(self._flags)
            checks = dict(self._checks)
        for name, check in checks.items():
            try:
                out[name] = bool(check())
            except Exception:
                out[name] = False
        return out

    def ready(self) -> bool:
        checks = self.checks()
        return bool(checks) and all(checks.values())


class HealthServer:
    """Serves the endpoints from a daemon thread; ``port=0`` picks a free port."""

    def __init__(
        self,
        state: HealthState,
        metrics: Metrics,
        host: str = "0.0.0.0",
        port: int = 8080,
        on_scrape: Callable[[], None] | None = None,
    ) -> None:
        self.state = state
        self.metrics = metrics
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    if on_scrape is not None:
                        on_scrape()
                    self._send(200, generate_latest(outer.metrics.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = outer.state.alive()
                    self._send(200 if ok else 503, b"ok\n" if ok else b"event loop stalled\n")
                elif path == "/readyz":
                    checks = outer.state.checks()
                    ok = bool(checks) and all(checks.values())
                    body = json.dumps({"ready": ok, "checks": checks}).encode()
                    self._send(200 if ok else 503, body, "application/json")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the logs

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:  # in use, or a host this machine does not have
            raise ConfigError(
                f"runtime.health_port: cannot listen on {host}:{port}: "
                f"{exc.strerror or type(exc).__name__}"
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
