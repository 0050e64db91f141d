"""The streaming source: every WebSocket exchange's connection lifecycle, written once.

An exchange brings a :class:`StreamExchange`: its facts (channels → topics, the
envelope's ``exchange`` name), two blocking calls (load the subscription plan; get the
URL of one connection, e.g. with a one-time token) and a pure
:class:`~connectors.runtime.session.Dialect`. This module does the rest:

- one connection at a time: connect, start a resync epoch (a ``kind: resync`` marker to
  every key of every channel, before subscribing: snapshots arrive before the answer),
  subscribe, read;
- supervise it: application pings every ``ping_interval_s``, a pong late by
  ``ping_timeout_s``, nothing at all for ``stale_after_s``, an unanswered request, a
  refused subscription — each ends the connection with a reason;
- Kafka back-pressure: reading stops (the connection is closed) when Kafka stops
  acknowledging, and resumes once everything buffered was acknowledged;
- reconnect with jittered back-off, reset by a connection that streamed data;
- re-read the plan every ``plan_refresh_s`` and move changed subscriptions in place;
- encode records (:mod:`connectors.runtime.records`), dead-letter unusable frames,
  metrics and health.

Record timestamps: the Kafka timestamp of every record is its receive time (the
exchange's own time is ``event_time_ms`` in the value): present on every record,
never in the broker's future, and what a replay reproduces.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import websockets
from websockets.asyncio.client import connect as ws_connect

from connectors.runtime import records, wire
from connectors.runtime.backoff import Backoff
from connectors.runtime.context import RuntimeContext
from connectors.runtime.errors import (
    AuthError,
    BadMessage,
    ConfigError,
    FatalError,
    RetriableError,
)
from connectors.runtime.records import Event, OutRecord
from connectors.runtime.session import Dialect, Plan, Session
from connectors.runtime.settings import StreamSettings

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Why a connection ended (the ``reason`` label of ``connector_reconnects_total`` and of
#: the resync marker that starts the next connection).
RECONNECT_REASONS = (
    "stale",
    "ping_timeout",
    "kafka_unavailable",
    "connection_lost",
    "server_closed",
    "error",
    "connection_error",
)


class StreamExchange(Protocol):
    """What one WebSocket exchange gives the streaming runtime."""

    @property
    def exchange(self) -> str:
        """The envelope's ``exchange`` field and the prefix of schema ids."""
        ...

    @property
    def settings(self) -> StreamSettings: ...

    @property
    def dialect(self) -> Dialect: ...

    @property
    def topics(self) -> Mapping[str, str]:
        """channel → topic, for every enabled channel."""
        ...

    @property
    def dead_letter_topic(self) -> str: ...

    def attach(self, ctx: RuntimeContext) -> None:
        """Called once when the connector starts (e.g. to count REST answers)."""
        ...

    def load_plan(self) -> Plan:
        """Blocking (runs in a worker thread): what to subscribe. Raises
        RetriableError (retried), ConfigError or AuthError (the connector stops)."""
        ...

    def connect_url(self) -> str:
        """Blocking: the URL of one new connection (e.g. with a one-time token).
        Raises RetriableError or AuthError."""
        ...


def encode_event(exchange: str, event: Event, receive_time_ms: int, epoch: int) -> bytes:
    """The record value of one exchange event (schema ``<exchange>.<channel>/v1``)."""
    return records.envelope(
        exchange=exchange,
        channel=event.channel,
        kind="event",
        symbol=event.key,
        event_time_ms=event.event_time_ms,
        receive_time_ms=receive_time_ms,
        resync_epoch=epoch,
        data=event.data,
    )


def encode_marker(
    exchange: str,
    channel: str,
    key: str,
    reason: str,
    connection_id: str,
    receive_time_ms: int,
    epoch: int,
) -> bytes:
    """The record value of a resync marker: state built from ``key`` must be rebuilt."""
    return records.envelope(
        exchange=exchange,
        channel=channel,
        kind="resync",
        symbol=key,
        event_time_ms=None,
        receive_time_ms=receive_time_ms,
        resync_epoch=epoch,
        data={"reason": reason, "connection_id": connection_id},
    )


def _headers(exchange: str, channel: str, kind: str) -> list[tuple[str, bytes]]:
    # One list per channel and kind, handed to the producer as it is (never changed).
    return records.headers(exchange, channel, kind, wire.schema_id(exchange, channel))


class StreamingSource:
    """The connector the runtime runs for any :class:`StreamExchange`."""

    def __init__(
        self,
        exchange: StreamExchange,
        connect: Callable[..., Any] = ws_connect,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.exchange = exchange
        self.settings = exchange.settings
        self._connect = connect
        self._clock = clock
        self._monotonic = monotonic
        name = exchange.exchange
        self._topic = dict(exchange.topics)
        self._headers = {ch: _headers(name, ch, "event") for ch in self._topic}
        self._marker_headers = {ch: _headers(name, ch, "resync") for ch in self._topic}
        self._envelopes = records.Envelopes(name)
        self.epoch = 0
        self.last_message: float | None = None
        self.plan = Plan({}, {})
        self.connection_id = "-"
        self.session: Session | None = None
        self._lag: dict[str, Any] = {}
        #: This connection's subscriptions were all answered (health and metrics told).
        self._announced = False
        #: Time not connected-and-subscribed: finished outages, and when this one began.
        self._down_s = 0.0
        self._down_since: float | None = None

    def topics(self) -> dict[str, dict[str, str]]:
        names = [*self._topic.values(), self.exchange.dead_letter_topic]
        return {name: {} for name in names}

    # -- helpers -----------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ctx.stop.wait(), timeout=seconds)

    async def _unless_stopped(self, call: Awaitable[_T]) -> _T | None:
        """``call``'s result, or None as soon as stop is requested: a REST call that
        has not answered yet (it has its own deadline) must not hold up SIGTERM."""
        work = asyncio.ensure_future(call)
        stop = asyncio.ensure_future(self.ctx.stop.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if work.done():
            return work.result()
        work.cancel()
        return None

    def _disconnected_s(self) -> float:
        since = self._down_since
        return self._down_s + (0.0 if since is None else max(0.0, self._monotonic() - since))

    def _fresh(self) -> bool:
        return (
            self.last_message is not None
            and self._monotonic() - self.last_message < self.settings.stale_after_s
        )

    # -- main loop ----------------------------------------------------------------------

    async def run(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx
        self.exchange.attach(ctx)
        m = ctx.metrics
        m.track_last_message(ctx.name, lambda: self.last_message)
        self._down_since = self._monotonic()
        m.disconnected_seconds.track(ctx.name, self._disconnected_s)
        # Series that alerts use exist at 0 from the start, so rate()/increase() see
        # the first reconnect instead of a series born at 1.
        m.connected.labels(ctx.name).set(0)
        for why in RECONNECT_REASONS:
            m.reconnects.labels(ctx.name, why)
        for flag in ("connected", "subscribed"):
            ctx.health.set(flag, False)
        ctx.health.add_check("fresh", self._fresh)
        s = self.settings
        backoff = Backoff(initial_s=s.backoff_initial_s, cap_s=s.backoff_max_s)
        while not ctx.stop.is_set():
            try:
                plan = await self._unless_stopped(asyncio.to_thread(self.exchange.load_plan))
                if plan is not None:
                    self.plan = plan
                    log.info(
                        "subscription plan: %s",
                        ", ".join(f"{ch}={len(p)} params" for ch, p in plan.subscriptions.items()),
                    )
                break
            except RetriableError as exc:
                delay = backoff.next_delay()
                log.warning("cannot load the subscription plan (%s); retrying in %.1fs", exc, delay)
                await self._sleep(delay)
        backoff.reset()
        reason = "start"
        while not ctx.stop.is_set():
            if not ctx.delivery.drained() and ctx.delivery.must_pause():
                await self._wait_for_kafka()
                continue
            opened = self._monotonic()
            self.session = None
            try:
                ended = await self._connection(reason)
            except (AuthError, FatalError):
                raise
            except RetriableError as exc:
                log.warning("connection attempt failed: %s", exc)
                ended = "error"
            except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
                log.warning("connection failed: %s", type(exc).__name__)
                ended = "connection_error"
            finally:
                ctx.health.set("connected", False)
                ctx.health.set("subscribed", False)
                m.connected.labels(ctx.name).set(0)
                if self._down_since is None:
                    self._down_since = self._monotonic()
            if ctx.stop.is_set():
                break
            m.reconnects.labels(ctx.name, ended).inc()
            reason = ended
            # A connection that was subscribed and streamed data proved the exchange
            # works, however short it was: start the back-off again. Failed handshakes,
            # refused subscriptions and connections that die before any data keep
            # growing it. A long quiet connection (private channels) counts too.
            session = self.session
            streamed = session is not None and session.subscribed and session.data_seen
            if streamed or self._monotonic() - opened >= s.healthy_after_s:
                backoff.reset()
            if ended == "kafka_unavailable":
                await self._wait_for_kafka()
                continue
            # Attempts are spaced start to start: time already spent in this one (a token
            # call cut at its deadline) counts towards the wait.
            spent = self._monotonic() - opened
            delay = max(backoff.next_delay() - spent, s.backoff_initial_s / 10)
            log.info("reconnecting in %.2fs (previous connection ended: %s)", delay, ended)
            await self._sleep(delay)

    async def _wait_for_kafka(self) -> None:
        """Stay disconnected until Kafka acknowledged everything we buffered."""
        delivery = self.ctx.delivery
        log.warning(
            "Kafka is not acknowledging (%d records buffered); exchange reading paused",
            delivery.buffered,
        )
        while not self.ctx.stop.is_set() and not delivery.drained():
            await self._sleep(0.2)
        if not self.ctx.stop.is_set():
            log.info("Kafka caught up; reconnecting to the exchange")

    async def _connection(self, reason: str) -> str:
        """One connection from its URL to its close; returns why it ended."""
        ctx, s = self.ctx, self.settings
        try:
            url = await self._unless_stopped(asyncio.to_thread(self.exchange.connect_url))
        except AuthError:
            ctx.metrics.auth_failures.labels(ctx.name).inc()
            raise
        if url is None:
            return "stopped"
        self.connection_id = uuid.uuid4().hex[:12]
        async with self._connect(
            url,
            ping_interval=None,  # supervision uses the exchange's application pings
            open_timeout=s.connect_timeout_s,
            close_timeout=2,
            max_size=s.max_frame_bytes,
            compression=None,
        ) as ws:
            session = self.session = Session(self.exchange.dialect, self.plan, s.request_timeout_s)
            self._announced = False
            ctx.metrics.connections.labels(ctx.name).inc()
            ctx.health.set("connected", True)
            self.last_message = self._monotonic()
            log.info("connected (connection %s)", self.connection_id)
            # The marker goes out before subscribing: snapshots start arriving
            # before the subscribe answers, and they belong to the new epoch.
            self._start_epoch(reason, self.plan.keys)
            session.subscribe(self._monotonic())
            await self._flush(ws, session)
            reader = asyncio.create_task(self._read(ws, session))
            try:
                return await self._supervise(ws, session, reader)
            finally:
                if not reader.done():
                    reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

    async def _flush(self, ws: Any, session: Session) -> None:
        for frame in session.data_to_send():
            await ws.send(frame)

    def _on_subscribed(self) -> None:
        """The first time this connection's subscriptions are all answered yes."""
        ctx = self.ctx
        self._announced = True
        if self._down_since is not None:
            self._down_s += max(0.0, self._monotonic() - self._down_since)
            self._down_since = None
        ctx.health.set("subscribed", True)
        ctx.metrics.connected.labels(ctx.name).set(1)

    async def _supervise(self, ws: Any, session: Session, reader: asyncio.Task[str]) -> str:
        s, ctx = self.settings, self.ctx
        next_ping = self._monotonic() + s.ping_interval_s
        every = s.plan_refresh_s
        next_refresh = self._monotonic() + every if every > 0 else float("inf")
        refresh: asyncio.Task[Plan] | None = None
        try:
            while True:
                done, _ = await asyncio.wait({reader}, timeout=0.25)
                self._account(session)
                if done:
                    return reader.result()
                now = self._monotonic()
                session.check(now)
                if not self._announced and session.subscribed:
                    self._on_subscribed()
                if ctx.stop.is_set():
                    await ws.close(1000, "connector stopping")
                    return "stop"
                if self.last_message is not None and now - self.last_message > s.stale_after_s:
                    log.warning("no message for %.0fs; reconnecting", now - self.last_message)
                    await ws.close(1000, "stale")
                    return "stale"
                oldest = session.oldest_ping()
                if oldest is not None and now - oldest > s.ping_timeout_s:
                    log.warning("no pong within %.1fs; reconnecting", s.ping_timeout_s)
                    await ws.close(1000, "ping timeout")
                    return "ping_timeout"
                if ctx.delivery.must_pause():
                    await ws.close(1000, "kafka unavailable")
                    return "kafka_unavailable"
                if now >= next_ping:
                    session.ping(now)
                    next_ping = now + s.ping_interval_s
                if refresh is None and now >= next_refresh:
                    refresh = asyncio.create_task(asyncio.to_thread(self.exchange.load_plan))
                if refresh is not None and refresh.done():
                    self._apply_refresh(session, refresh, now)
                    refresh, next_refresh = None, now + every
                await self._flush(ws, session)
        finally:
            if refresh is not None and not refresh.done():
                refresh.cancel()

    def _apply_refresh(self, session: Session, refresh: asyncio.Task[Plan], now: float) -> None:
        """Move changed subscriptions in place, with markers for the changed channels."""
        try:
            plan = refresh.result()
        except (RetriableError, ConfigError) as exc:
            log.warning("plan refresh failed, keeping the current subscriptions: %s", exc)
            return
        changed = self.plan.changed(plan)
        self.plan = plan
        if not changed:
            session.plan = plan
            return
        keys = session.change_plan(plan, now)
        log.info("subscriptions changed for %s", ", ".join(changed))
        self._start_epoch("subscription_change", keys)

    def _account(self, session: Session) -> None:
        """Metrics and logs for what the session saw since the last look."""
        ctx = self.ctx
        if session.rtts:
            rtt = ctx.metrics.ping_rtt.labels(ctx.name)
            for seconds in session.rtts:
                rtt.observe(seconds)
            session.rtts.clear()
        if session.errors:
            known = self.exchange.dialect.known_error_codes
            for reply in session.errors:
                code = reply.error.code if reply.error else None
                label = str(code) if code in known else "other"
                ctx.metrics.exchange_errors.labels(ctx.name, label).inc()
                log.warning(
                    "error answer from the exchange: code %s: %s",
                    code if code is not None else "?",
                    reply.error.message if reply.error else "",
                )
            session.errors.clear()

    def _start_epoch(self, reason: str, keys: Mapping[str, Any]) -> None:
        """New subscription → new epoch; a resync marker to every key of the channels in
        ``keys``, so it lands in each key's partition."""
        ctx = self.ctx
        now_ms = int(self._clock() * 1000)
        self.epoch = max(self.epoch + 1, now_ms)
        if reason != "start":
            ctx.metrics.gaps.labels(ctx.name, reason).inc()
        name = self.exchange.exchange
        for channel, channel_keys in keys.items():
            topic = self._topic[channel]
            hdrs = self._marker_headers[channel]
            for key in channel_keys:
                value = encode_marker(
                    name, channel, key, reason, self.connection_id, now_ms, self.epoch
                )
                ctx.delivery.send(OutRecord(topic, value, key.encode(), hdrs, now_ms, channel))
        log.info("resync epoch %d (%s)", self.epoch, reason)

    # -- hot path ------------------------------------------------------------------------

    async def _read(self, ws: Any, session: Session) -> str:
        delivery = self.ctx.delivery
        limit = self.ctx.kafka.max_buffered_records
        # Frames as bytes: the decoder reads UTF-8 itself (and refuses what is not),
        # so websockets does not decode each text frame into a str first.
        recv = functools.partial(ws.recv, decode=False)
        try:
            while True:
                raw = await recv()
                self.last_message = now = self._monotonic()
                now_ms = int(self._clock() * 1000)
                try:
                    events = session.receive(raw, now)
                except BadMessage as exc:
                    self._dead_letter(raw, exc, now_ms)
                    continue
                if events:
                    self._produce(events, now_ms)
                else:  # an answer: maybe the last subscription, maybe a request to send
                    if not self._announced and session.subscribed:
                        self._on_subscribed()
                    if session.has_data_to_send:
                        await self._flush(ws, session)
                if delivery.buffered >= limit:
                    await ws.close(1000, "kafka unavailable")
                    return "kafka_unavailable"
        except websockets.exceptions.ConnectionClosedOK:
            return "server_closed"
        except websockets.exceptions.ConnectionClosedError:
            return "connection_lost"

    def _produce(self, events: Sequence[Event], now_ms: int) -> None:
        """Encode and hand over one frame's events (all of one channel)."""
        ctx = self.ctx
        send = ctx.delivery.send_parts
        encode = self._envelopes.encode
        epoch = self.epoch
        channel = events[0].channel
        topic = self._topic[channel]
        hdrs = self._headers[channel]
        lag = self._lag.get(channel)
        if lag is None:
            lag = self._lag[channel] = ctx.metrics.event_lag.labels(ctx.name, channel)
        for event in events:
            key = event.key
            event_time = event.event_time_ms
            value = encode(channel, "event", key, event_time, now_ms, epoch, event.data)
            if event_time is not None:
                lag.observe(max(0.0, (now_ms - event_time) / 1000))
            send(topic, value, key.encode(), hdrs, now_ms, channel)

    def _dead_letter(self, raw: str | bytes, exc: BadMessage, now_ms: int) -> None:
        ctx = self.ctx
        ctx.metrics.dead_letters.labels(ctx.name, exc.reason).inc()
        log.warning("dead-lettered a frame: %s", exc)
        ctx.delivery.send(
            records.dead_letter(
                topic=self.exchange.dead_letter_topic,
                raw=raw,
                reason=exc.reason,
                detail=exc.detail,
                exchange=self.exchange.exchange,
                receive_time_ms=now_ms,
                source=f"{ctx.name}/{self.connection_id}",
            )
        )
