"""The Robicoin simulator's server: strict HTTP on loopback, plus the market's own life.

Why it exists: the connector's tests, the demo, the benchmarks and the order sink need an
exchange that *enforces* what the real one enforces (:mod:`.rules`), whose market and
accounts move on their own (:mod:`.market`), and that lets a test see exactly what a
client did and what it was served (:mod:`.control`).

Concurrency: a ``ThreadingHTTPServer`` (one daemon thread per connection) and one
background thread for market and account activity; all state sits behind the exchange's
one lock. :class:`RobicoinSimulator` is thread-safe and a context manager.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from connectors.simulators.harness import check_non_negative
from connectors.simulators.robicoin.control import RobicoinControl
from connectors.simulators.robicoin.market import PAIRS, Market
from connectors.simulators.robicoin.rules import (
    API_PREFIX,
    DEFAULT_PRIVATE_KEY,
    DEFAULT_PUBLIC_ID,
    DEFAULT_PUBLIC_KEY,
    Exchange,
    Outcome,
    Request,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 1 << 20


class RobicoinSimulator:
    """A Robicoin exchange on loopback. Thread-safe; ``with`` starts and stops it."""

    name: Final = "robicoin"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        pairs: Sequence[str] = PAIRS,
        seed: int | None = None,
        transactions_per_second: float = 2.0,
        market_orders_per_second: float = 4.0,
        zone: str = "Europe/Istanbul",
        time_tolerance_s: float = 30.0,
        block_after: int = 10,
        ticker_limit: tuple[int, float] = (10, 0.100),
        other_limit: tuple[int, float] = (1, 0.100),
        accounts: Mapping[str, tuple[str, str]] | None = None,
        clock: Callable[[], float] = time.time,
        initial_transactions: int = 5,
    ) -> None:
        for name, value in (
            ("transactions_per_second", transactions_per_second),
            ("market_orders_per_second", market_orders_per_second),
            ("time_tolerance_s", time_tolerance_s),
        ):
            check_non_negative(name, value)
        for name, (count, window) in (("ticker_limit", ticker_limit), ("other_limit", other_limit)):
            if count < 1 or not window > 0:
                raise ValueError(f"{name} must be (count >= 1, window > 0)")
        if block_after < 1 or initial_transactions < 0:
            raise ValueError("block_after must be >= 1 and initial_transactions >= 0")
        if not pairs or len(set(pairs)) != len(pairs):
            raise ValueError("pairs must be a non-empty list without duplicates")
        self.host = host
        self._requested_port = port
        self._port = port
        self._tps = transactions_per_second
        self._market_rate = market_orders_per_second
        self.market = Market(
            pairs,
            rng=random.Random(seed),
            clock=clock,
            zone=ZoneInfo(zone),
            initial_transactions=initial_transactions,
        )
        self.exchange = Exchange(
            self.market,
            clock=clock,
            time_tolerance_s=time_tolerance_s,
            block_after=block_after,
            limits={"ticker": ticker_limit, "other": other_limit},
        )
        for key, (public_id, private_key) in (
            accounts
            if accounts is not None
            else {DEFAULT_PUBLIC_KEY: (DEFAULT_PUBLIC_ID, DEFAULT_PRIVATE_KEY)}
        ).items():
            self.market.add_account(key, public_id, private_key)
        if not self.market.accounts:
            raise ValueError("at least one account is required")
        self.market.default_key = (
            DEFAULT_PUBLIC_KEY
            if DEFAULT_PUBLIC_KEY in self.market.accounts
            else next(iter(self.market.accounts))
        )
        self.control = RobicoinControl(self.exchange)

        self._httpd: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._port}{API_PREFIX}"

    def start(self) -> RobicoinSimulator:
        """Bind (port 0 picks a free one), serve, and start the activity thread."""
        if self._httpd is not None:
            raise RuntimeError("simulator already started")
        self._stop.clear()
        httpd = _Server((self.host, self._requested_port), self.exchange)
        self._httpd = httpd
        self._port = int(httpd.server_address[1])
        self._threads = [
            threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="robicoin-sim-http",
                daemon=True,
            ),
            threading.Thread(target=self._activity_loop, name="robicoin-sim-activity", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        logger.info("robicoin simulator listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving, close every open connection and release the port."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stop.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._threads = []

    def __enter__(self) -> RobicoinSimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def banner(self) -> Iterable[str]:
        with self.exchange.lock:
            accounts = [
                (a.public_key, a.public_id, a.private_key) for a in self.market.accounts.values()
            ]
            pairs = list(self.market.pairs)
        yield "Robicoin simulator running (Ctrl-C to stop)"
        yield f"  base URL    : {self.base_url}"
        for public_key, public_id, private_key in accounts:
            yield f"  public_key  : {public_key}"
            yield f"  public_id   : {public_id}"
            yield f"  private_key : {private_key}   (simulator credentials)"
        yield f"  pairs       : {', '.join(pairs)}"

    # ---- background activity ---------------------------------------------------------

    def _activity_loop(self) -> None:
        market, lock = self.market, self.exchange.lock
        next_market = math.inf
        next_tx: dict[str, float] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            with lock:
                if next_market == math.inf:
                    next_market = market.next_arrival(now, self._market_rate)
                for key in market.accounts:
                    if key not in next_tx:
                        next_tx[key] = market.next_arrival(now, self._tps)
            due = min([next_market, *next_tx.values()])
            if self._stop.wait(min(max(0.0, due - now), 0.25)):
                return
            now = time.monotonic()
            try:
                with lock:
                    if now >= next_market:
                        next_market = market.next_arrival(now, self._market_rate)
                        if not market.paused:
                            market.market_tick()
                    for key, at in next_tx.items():
                        if now >= at:
                            next_tx[key] = market.next_arrival(now, self._tps)
                            if not market.paused:
                                market.account_tick(market.accounts[key])
            except Exception:  # keep the simulator alive; a test will see the log
                logger.exception("robicoin simulator activity failed")


# --------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------


class _BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], exchange: Exchange) -> None:
        self.exchange = exchange
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), slow on some machines.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            if open_:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def close_connections(self) -> None:
        """Keep-alive connections would outlive ``shutdown()``: end them too."""
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "robicoin-simulator"
    timeout = 120  # an idle keep-alive connection is closed after this
    # Headers and body go out in two writes: without TCP_NODELAY the body waits for the
    # client's delayed ACK (~40 ms), which would make 10 requests per 100 ms impossible.
    disable_nagle_algorithm = True
    arrival = 0.0

    def handle(self) -> None:
        # A client that gave up (timeout, reset) is normal here, not a server error.
        with contextlib.suppress(ConnectionError):
            super().handle()

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        self._server().track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._server().track(self.connection, False)

    def _server(self) -> _Server:
        server = self.server
        assert isinstance(server, _Server)
        return server

    def parse_request(self) -> bool:
        # Called right after the request line is read: that is the arrival time.
        self.arrival = time.monotonic()
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("robicoin simulator %s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _handle(self) -> None:
        body, body_error = b"", None
        try:
            body = self._read_body()
        except _BodyError as exc:
            body_error = (exc.status, exc.message)
            self.close_connection = True
        except (OSError, ValueError):
            self.close_connection = True
            return
        raw_path = self.path
        path = raw_path.split("?", 1)[0] if raw_path.startswith("/") else urlsplit(raw_path).path
        request = Request(
            method=self.command,
            path=path,
            ip=self.client_address[0],
            arrival=self.arrival,
            content_type=self.headers.get("Content-Type"),
            body=body,
            body_error=body_error,
        )
        try:
            outcome = self._server().exchange.handle(request)
        except Exception:
            logger.exception("robicoin simulator failed on %s %s", self.command, path)
            outcome = Outcome(500, '{"error":"Internal server error"}', close=True)
        if outcome.delay > 0:
            time.sleep(outcome.delay)
        if outcome.drop:
            self.close_connection = True
            return
        data = outcome.body.encode("utf-8")
        self.send_response(outcome.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in outcome.headers:
            self.send_header(name, value)
        if outcome.close or self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_body(self) -> bytes:
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None:
            if encoding.strip().lower() != "chunked":
                raise _BodyError(400, "unsupported Transfer-Encoding")
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not length.strip().isdigit():
            raise _BodyError(400, "invalid Content-Length")
        size = int(length)
        if size > MAX_BODY_BYTES:
            raise _BodyError(413, "request body too large")
        data = self.rfile.read(size)
        if len(data) != size:
            raise ValueError("connection closed inside the body")
        return data

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1026)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise _BodyError(400, "malformed chunked body") from exc
            if size == 0:
                while self.rfile.readline(1026) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise _BodyError(413, "request body too large")
            chunks.append(self.rfile.read(size))
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _BodyError(400, "malformed chunked body")


# --------------------------------------------------------------------------------------
