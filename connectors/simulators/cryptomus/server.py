"""The Cryptomus simulator's server: one port, WebSocket streams and the REST calls they need.

Why it exists: connector tests, the demo and the benchmarks need an exchange that
*enforces* the rules the real one enforces (:mod:`.rules`), publishes what a market does
(:mod:`.market`), and lets a test see what the client did (:mod:`.control`).

One port serves both protocols: ``process_request`` answers the plain HTTP GET endpoints
(token, market list, depth scales) with JSON and lets the ``/ws`` handshake through only
with a good token. The server closes a connection after 60 s without a client request
(server updates do not count) and relies on the client's application-level ``ping``, so
websockets' own keepalive pings are disabled.

:class:`CryptomusSimulator` runs inside the caller's event loop, which owns all its state
(no locks); :class:`~connectors.simulators.harness.Harness` gives it a loop of its own
in a daemon thread for synchronous callers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import http
import logging
import math
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from connectors.simulators.cryptomus.control import CryptomusControl, Knobs
from connectors.simulators.cryptomus.market import DEFAULT_MARKETS, Market, MarketSpec, dumps
from connectors.simulators.cryptomus.rules import (
    DEFAULT_API_KEY,
    DEFAULT_USER_ID,
    UPDATE_TYPES,
    WS_PATH,
    Call,
    Exchange,
    NotJson,
    RequestError,
    Session,
)
from connectors.simulators.harness import check_non_negative

logger = logging.getLogger(__name__)

#: A frame and the number of trades in it (0 for anything but a trade update).
Frame = tuple[str, int]


@dataclasses.dataclass
class Connection:
    """One open WebSocket: the exchange's session plus the socket and its tasks."""

    session: Session
    ws: ServerConnection
    last_request: float
    send_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)

    @property
    def connection_id(self) -> int:
        return self.session.connection_id

    def abort(self) -> bool:
        """Drop the TCP connection without a close frame; False if it was already going."""
        transport = self.ws.transport
        if transport is None or transport.is_closing():
            return False
        transport.abort()
        return True

    async def send(self, text: str) -> bool:
        """Send ``text`` as is (after any frame being sent); False if it closed first."""
        async with self.send_lock:
            try:
                await self.ws.send(text)
            except ConnectionClosed:
                return False
        return True


async def _wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


def _json_response(status: http.HTTPStatus, payload: object) -> Response:
    body = dumps(payload).encode("utf-8")
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", "application/json"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


class CryptomusSimulator:
    """A Cryptomus exchange on loopback: WebSocket streams and the REST calls they need.

    Runs in the caller's event loop; ``control`` and every method that is not ``async``
    must be used from that loop.
    """

    name: Final = "cryptomus"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        accounts: Mapping[str, str] | None = None,
        markets: Sequence[MarketSpec] | None = None,
        idle_timeout_s: float = 60.0,
        token_ttl_s: float = 300.0,
        updates_per_second: float = 5.0,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
        log_maxlen: int = 200_000,
    ) -> None:
        check_non_negative("idle_timeout_s", idle_timeout_s)
        check_non_negative("token_ttl_s", token_ttl_s)
        check_non_negative("updates_per_second", updates_per_second)
        self.host = host
        self._requested_port = port
        self.port = port
        self.market = Market(
            markets if markets is not None else DEFAULT_MARKETS, random.Random(seed), clock
        )
        self.exchange = Exchange(
            accounts=accounts if accounts is not None else {DEFAULT_USER_ID: DEFAULT_API_KEY},
            market=self.market,
            token_ttl_s=token_ttl_s,
            clock=clock,
            log_maxlen=log_maxlen,
        )
        self.knobs = Knobs(idle_timeout_s, updates_per_second)
        self.connections: dict[int, Connection] = {}
        self._next_connection_id = 1
        self._server: Server | None = None
        self.control = CryptomusControl(self.exchange, self.knobs, self.connections)

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}{WS_PATH}"

    async def start(self) -> None:
        """Bind the port (``port=0`` picks a free one) and start serving."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self.knobs.renew()
        self._server = await serve(
            self._handle_connection,
            self.host,
            self._requested_port,
            process_request=self._process_request,
            ping_interval=None,
            compression=None,
            close_timeout=2,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info("cryptomus simulator listening on %s", self.base_url)

    async def stop(self) -> None:
        """Close every connection (code 1001) and release the port."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()

    async def __aenter__(self) -> CryptomusSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def banner(self) -> Iterable[str]:
        yield "Cryptomus simulator running (Ctrl-C to stop)"
        yield f"  REST base URL : {self.base_url}"
        yield f"  WebSocket URL : {self.ws_url}?token=<token>"
        for user_id, api_key in self.exchange.accounts.items():
            yield f"  user id       : {user_id}"
            yield f"  api key       : {api_key}"
        yield f"  markets       : {', '.join(self.market.markets)}"

    # ---- HTTP side -------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer REST GETs with JSON; gate the ``/ws`` handshake on the token."""
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        if url.path == WS_PATH:
            admitted = self.exchange.admit(request.headers, query)
            if isinstance(admitted, str):
                connection.username = admitted
                return None
            return _json_response(*admitted)
        return _json_response(*self.exchange.http_get(url.path, query, request.headers))

    # ---- WebSocket side --------------------------------------------------------------

    async def _handle_connection(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        conn = Connection(
            session=Session(self._next_connection_id, getattr(ws, "username", "")),
            ws=ws,
            last_request=loop.time(),
        )
        self._next_connection_id += 1
        self.connections[conn.connection_id] = conn
        self.exchange.counters.connections_accepted += 1
        conn.tasks = [
            asyncio.create_task(self._guarded(conn, self._emit_loop(conn))),
            asyncio.create_task(self._guarded(conn, self._idle_watchdog(conn))),
        ]
        try:
            async for message in ws:
                conn.last_request = loop.time()
                self.exchange.counters.client_requests += 1
                if not await self._on_message(conn, message):
                    break
        except ConnectionClosed:
            pass
        finally:
            self.connections.pop(conn.connection_id, None)
            for task in conn.tasks:
                task.cancel()
            await asyncio.gather(*conn.tasks, return_exceptions=True)

    @staticmethod
    async def _guarded(conn: Connection, work: Coroutine[Any, Any, None]) -> None:
        """Run a per-connection task; a closed socket ends it, a bug is logged, not lost."""
        try:
            await work
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("simulator task failed on connection %d", conn.connection_id)

    async def _on_message(self, conn: Connection, message: str | bytes) -> bool:
        """Handle one client frame; False when the connection was closed for it."""
        try:
            call = self.exchange.decode(conn.session, message)
            await self._dispatch(conn, call)
        except NotJson:
            await conn.ws.close(1003, "invalid json")
            return False
        except RequestError as exc:
            await self._send(conn, self.exchange.error_reply(exc))
        return True

    async def _dispatch(self, conn: Connection, call: Call) -> None:
        """Apply a well-formed request; :class:`RequestError` answers an error."""
        if call.method == "ping":
            await self._send(conn, self.exchange.pong(call))
            return
        kind, action = self.exchange.route(call)
        if action == "unsubscribe":
            await self._send(conn, self.exchange.unsubscribe(conn.session, call, kind))
            return
        subscription, reply = self.exchange.subscribe(conn.session, call, kind)
        # Under the send lock: the emitter must not send a partial depth update for a
        # book before the client has its snapshot.
        async with conn.send_lock:
            conn.session.subscriptions[kind] = subscription
            await conn.ws.send(reply)
            if kind == "depth":
                for key in sorted(subscription.keys):
                    frame = self.market.depth_frame(conn.session.feed, key, True)
                    await self.send_update(conn, kind, frame)

    async def _send(self, conn: Connection, text: str) -> None:
        async with conn.send_lock:
            await conn.ws.send(text)

    async def send_update(self, conn: Connection, kind: str, frame: Frame) -> None:
        """Send one update frame (caller holds the send lock) and log/count it."""
        await conn.ws.send(frame[0])
        self.exchange.record_update(conn.connection_id, kind, frame)

    def next_update(self, conn: Connection, kind: str) -> Frame:
        """The next update of ``kind`` for ``conn``, round-robin over its subscribed keys."""
        sub = conn.session.subscriptions[kind]
        keys = sorted(sub.keys)
        key = keys[sub.cursor % len(keys)]
        sub.cursor += 1
        return self.market.build_update(conn.session.feed, kind, key)

    # ---- background tasks ------------------------------------------------------------

    async def _idle_watchdog(self, conn: Connection) -> None:
        """Close the connection once no client request arrived for the idle timeout."""
        loop = asyncio.get_running_loop()
        while True:
            changed = self.knobs.changed
            remaining = conn.last_request + self.knobs.idle_timeout_s - loop.time()
            if remaining <= 0:
                self.exchange.counters.idle_closes += 1
                logger.info("closing idle connection %d", conn.connection_id)
                await conn.ws.close(1000, "idle timeout")
                return
            await _wait_event(changed, remaining if math.isfinite(remaining) else None)

    async def _emit_loop(self, conn: Connection) -> None:
        """Emit one update per subscribed type per tick, ``updates_per_second`` ticks/s."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while True:
                changed = self.knobs.changed
                rate = self.knobs.updates_per_second
                if self.knobs.paused or rate <= 0:
                    await changed.wait()
                    next_at = loop.time()
                    continue
                next_at += 1.0 / rate
                now = loop.time()
                if next_at < now - 1.0:  # fell far behind (slow client): drop the backlog
                    next_at = now
                if next_at > now and await _wait_event(changed, next_at - now):
                    next_at = loop.time()
                    continue
                await self._emit_tick(conn)
        except ConnectionClosed:
            return

    async def _emit_tick(self, conn: Connection) -> None:
        async with conn.send_lock:
            for kind in UPDATE_TYPES:
                sub = conn.session.subscriptions.get(kind)
                if sub is None or not sub.keys:
                    continue
                await self.send_update(conn, kind, self.next_update(conn, kind))
