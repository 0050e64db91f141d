"""The Cryptomus WebSocket source: exchange frames in, Kafka records out.

One connection at a time. Each connection gets a fresh one-time token, subscribes
every channel in one request per data type, pings every ``ping_interval_s``, and is
dropped and re-opened (jittered back-off) when the server closes it, a pong is late,
nothing arrives for ``stale_after_s``, or Kafka stops acknowledging (back-pressure).
Every new subscription starts a new *resync epoch*: a ``kind: resync`` marker goes to
each key of each channel so consumers rebuild order books from the next full reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import requests
import websockets
from websockets.asyncio.client import connect as ws_connect

from connectors.cryptomus import protocol
from connectors.cryptomus.config import CryptomusConfig
from connectors.cryptomus.rest import CryptomusRest
from connectors.runtime import records
from connectors.runtime.app import RuntimeContext
from connectors.runtime.backoff import Backoff
from connectors.runtime.errors import (
    AuthError,
    BadMessage,
    ConfigError,
    FatalError,
    RetriableError,
)
from connectors.runtime.kafka import OutRecord
from connectors.runtime.logs import register_secret

log = logging.getLogger(__name__)
_T = TypeVar("_T")

NAME = "cryptomus-ws"
SCHEMA_VERSION = "v1"
#: Why a connection ended (the ``reason`` label of ``connector_reconnects_total``).
RECONNECT_REASONS = (
    "stale",
    "ping_timeout",
    "kafka_unavailable",
    "connection_lost",
    "server_closed",
    "error",
    "connection_error",
)


def encode_event(event: protocol.Event, receive_time_ms: int, epoch: int) -> bytes:
    """The record value of one exchange event (schema ``cryptomus.<channel>/v1``)."""
    return records.envelope(
        exchange=protocol.EXCHANGE,
        channel=event.channel,
        kind="event",
        symbol=event.key,
        event_time_ms=event.event_time_ms,
        receive_time_ms=receive_time_ms,
        resync_epoch=epoch,
        data=event.data,
    )


def encode_marker(
    channel: str, key: str, reason: str, connection_id: str, receive_time_ms: int, epoch: int
) -> bytes:
    """The record value of a resync marker: state built from ``key`` must be rebuilt."""
    return records.envelope(
        exchange=protocol.EXCHANGE,
        channel=channel,
        kind="resync",
        symbol=key,
        event_time_ms=None,
        receive_time_ms=receive_time_ms,
        resync_epoch=epoch,
        data={"reason": reason, "connection_id": connection_id},
    )


def _headers(channel: str, kind: str) -> list[tuple[str, bytes]]:
    return records.headers(
        protocol.EXCHANGE, channel, kind, f"{protocol.EXCHANGE}.{channel}/{SCHEMA_VERSION}"
    )


class CryptomusSource:
    def __init__(
        self,
        config: CryptomusConfig,
        session: requests.Session | None = None,
        connect: Callable[..., Any] = ws_connect,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.settings = config.cryptomus
        user_id, api_key = self.settings.credentials.resolve()
        register_secret(user_id.reveal())
        register_secret(api_key.reveal())
        self.rest = CryptomusRest(
            self.settings.api_url,
            self.settings.scales_url,
            user_id,
            api_key,
            self.settings.http_timeout_s,
            session,
        )
        self._connect = connect
        self._clock = clock
        self._monotonic = monotonic
        self._headers = {ch: _headers(ch, "event") for ch in protocol.CHANNELS}
        self._marker_headers = {ch: _headers(ch, "resync") for ch in protocol.CHANNELS}
        self._topic = {ch: self.settings.topics.for_channel(ch) for ch in protocol.CHANNELS}
        self.epoch = 0
        self.last_message: float | None = None
        self.plan: dict[str, list[str]] = {}
        self.markets: list[protocol.Market] = []
        self.connection_id = "-"
        self._ws: Any = None
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[protocol.Reply]] = {}
        self._pings: dict[str, float] = {}
        self._lag: dict[str, Any] = {}
        #: This connection's subscriptions were answered / an update arrived on it.
        self._subscribed = False
        self._data_seen = False
        #: Time not connected-and-subscribed: finished outages, and when this one began.
        self._down_s = 0.0
        self._down_since: float | None = None

    def topics(self) -> dict[str, dict[str, str]]:
        names = [self._topic[ch] for ch in self.settings.channels]
        names.append(self.settings.topics.dead_letter)
        return {name: {} for name in names}

    # -- start-up ---------------------------------------------------------------------

    async def _prepare(self) -> None:
        self.markets, self.plan = await self._load_plan()
        log.info(
            "subscription plan: %s",
            ", ".join(f"{ch}={len(p)} params" for ch, p in self.plan.items()),
        )

    async def _load_plan(self) -> tuple[list[protocol.Market], dict[str, list[str]]]:
        """Market list (expands/validates markets) and depth scale indices → params."""
        markets = await asyncio.to_thread(self.rest.markets)
        listed = {m.symbol for m in markets}
        chosen = self.settings.market_list or sorted(listed)
        scales: dict[str, list[int]] = {}
        if "depth" in self.settings.channels:
            if self.settings.depth_scale_indices:
                scales = {m: list(self.settings.depth_scale_indices) for m in chosen}
            else:
                for market in chosen:
                    if market in listed:
                        found = await asyncio.to_thread(self.rest.scales, market)
                        scales[market] = sorted(found)
        plan = protocol.plan_subscriptions(
            self.settings.channels,
            self.settings.market_list,
            markets,
            scales,
            self.settings.balance_currencies or None,
        )
        return markets, plan

    async def _sleep(self, ctx: RuntimeContext, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.stop.wait(), timeout=seconds)

    async def _unless_stopped(self, ctx: RuntimeContext, call: Awaitable[_T]) -> _T | None:
        """``call``'s result, or None as soon as stop is requested: a REST call that
        has not answered yet (it has its own deadline) must not hold up SIGTERM."""
        work = asyncio.ensure_future(call)
        stop = asyncio.ensure_future(ctx.stop.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if work.done():
            return work.result()
        work.cancel()
        return None

    # -- main loop ----------------------------------------------------------------------

    async def run(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx
        m = ctx.metrics
        m.track_last_message(ctx.name, lambda: self.last_message)
        self.rest.on_answer = partial(m.observe_request, ctx.name)
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
                await self._unless_stopped(ctx, self._prepare())
                break
            except RetriableError as exc:
                delay = backoff.next_delay()
                log.warning("cannot load markets (%s); retrying in %.1fs", exc, delay)
                await self._sleep(ctx, delay)
        backoff.reset()
        reason = "start"
        while not ctx.stop.is_set():
            if not ctx.delivery.drained() and ctx.delivery.must_pause():
                await self._wait_for_kafka(ctx)
                continue
            opened = self._monotonic()
            self._subscribed = self._data_seen = False
            try:
                ended = await self._session(ctx, reason)
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
            streamed = self._subscribed and self._data_seen
            if streamed or self._monotonic() - opened >= s.healthy_after_s:
                backoff.reset()
            if ended == "kafka_unavailable":
                await self._wait_for_kafka(ctx)
                continue
            # Attempts are spaced start to start: time already spent in this one (a token
            # call cut at its deadline) counts towards the wait.
            spent = self._monotonic() - opened
            delay = max(backoff.next_delay() - spent, s.backoff_initial_s / 10)
            log.info("reconnecting in %.2fs (previous connection ended: %s)", delay, ended)
            await self._sleep(ctx, delay)

    async def _wait_for_kafka(self, ctx: RuntimeContext) -> None:
        """Stay disconnected until Kafka acknowledged everything we buffered."""
        log.warning(
            "Kafka is not acknowledging (%d records buffered); exchange reading paused",
            ctx.delivery.buffered,
        )
        while not ctx.stop.is_set() and not ctx.delivery.drained():
            await self._sleep(ctx, 0.2)
        if not ctx.stop.is_set():
            log.info("Kafka caught up; reconnecting to the exchange")

    def _disconnected_s(self) -> float:
        since = self._down_since
        return self._down_s + (0.0 if since is None else max(0.0, self._monotonic() - since))

    def _fresh(self) -> bool:
        return (
            self.last_message is not None
            and self._monotonic() - self.last_message < self.settings.stale_after_s
        )

    async def _session(self, ctx: RuntimeContext, reason: str) -> str:
        """One connection from token to close; returns why it ended."""
        s = self.settings
        try:
            token = await self._unless_stopped(ctx, asyncio.to_thread(self.rest.ws_token))
        except AuthError:
            ctx.metrics.auth_failures.labels(ctx.name).inc()
            raise
        if token is None:
            return "stopped"
        register_secret(token)
        separator = "&" if "?" in s.ws_url else "?"
        url = f"{s.ws_url}{separator}token={token}"
        self.connection_id = uuid.uuid4().hex[:12]
        async with self._connect(
            url,
            ping_interval=None,  # the exchange wants application-level pings
            open_timeout=s.connect_timeout_s,
            close_timeout=2,
            max_size=s.max_frame_bytes,
            compression=None,
        ) as ws:
            self._ws = ws
            self._pending.clear()
            self._pings.clear()
            ctx.metrics.connections.labels(ctx.name).inc()
            ctx.health.set("connected", True)
            self.last_message = self._monotonic()
            log.info("connected (connection %s)", self.connection_id)
            reader = asyncio.create_task(self._read(ws))
            try:
                # The marker goes out before subscribing: snapshots start arriving
                # before the subscribe answers, and they belong to the new epoch.
                self._start_epoch(reason)
                await self._subscribe_all(ws)
                self._subscribed = True
                if self._down_since is not None:
                    self._down_s += max(0.0, self._monotonic() - self._down_since)
                    self._down_since = None
                ctx.health.set("subscribed", True)
                ctx.metrics.connected.labels(ctx.name).set(1)
                return await self._supervise(ws, reader)
            finally:
                if not reader.done():
                    reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
                for fut in self._pending.values():
                    fut.cancel()
                self._pending.clear()
                self._ws = None

    async def _supervise(self, ws: Any, reader: asyncio.Task[str]) -> str:
        s = self.settings
        next_ping = self._monotonic() + s.ping_interval_s
        every = s.market_refresh_s
        next_refresh = self._monotonic() + every if every > 0 else float("inf")
        refresh: asyncio.Task[tuple[list[protocol.Market], dict[str, list[str]]]] | None = None
        try:
            while True:
                done, _ = await asyncio.wait({reader}, timeout=0.25)
                if done:
                    return reader.result()
                now = self._monotonic()
                if self.ctx.stop.is_set():
                    await ws.close(1000, "connector stopping")
                    return "stop"
                if self.last_message is not None and now - self.last_message > s.stale_after_s:
                    log.warning("no message for %.0fs; reconnecting", now - self.last_message)
                    await ws.close(1000, "stale")
                    return "stale"
                if self._pings and now - min(self._pings.values()) > s.ping_timeout_s:
                    log.warning("no pong within %.1fs; reconnecting", s.ping_timeout_s)
                    await ws.close(1000, "ping timeout")
                    return "ping_timeout"
                if self.ctx.delivery.must_pause():
                    await ws.close(1000, "kafka unavailable")
                    return "kafka_unavailable"
                if now >= next_ping:
                    req_id = next(self._ids)
                    self._pings[str(req_id)] = now
                    await ws.send(protocol.ping(req_id))
                    next_ping = now + s.ping_interval_s
                if refresh is None and now >= next_refresh:
                    refresh = asyncio.create_task(self._load_plan())
                if refresh is not None and refresh.done():
                    await self._apply_refresh(ws, refresh)
                    refresh, next_refresh = None, now + every
        finally:
            if refresh is not None and not refresh.done():
                refresh.cancel()

    async def _apply_refresh(
        self,
        ws: Any,
        refresh: asyncio.Task[tuple[list[protocol.Market], dict[str, list[str]]]],
    ) -> None:
        """Move changed subscriptions in place: unsubscribe, then subscribe the new list
        (subscribing a type again is refused by the server)."""
        try:
            markets, plan = refresh.result()
        except (RetriableError, ConfigError) as exc:
            log.warning("market refresh failed, keeping the current subscriptions: %s", exc)
            return
        changed = [ch for ch in plan if plan[ch] != self.plan.get(ch)]
        if not changed:
            self.markets = markets
            return
        keys = {
            ch: sorted(
                set(protocol.marker_keys(ch, self.plan[ch], self.markets))
                | set(protocol.marker_keys(ch, plan[ch], markets))
            )
            for ch in changed
        }
        self.markets, self.plan = markets, plan
        log.info("subscriptions changed for %s", ", ".join(changed))
        self._start_epoch("subscription_change", keys)
        for channel in changed:
            for build in (
                partial(protocol.unsubscribe, channel=channel),
                partial(protocol.subscribe, channel=channel, params=plan[channel]),
            ):
                reply = await self._request(ws, build)
                if not reply.ok:
                    self._count_error(reply)
                    raise RetriableError(f"{channel} subscription change refused")

    async def _request(self, ws: Any, build: Callable[[int], str]) -> protocol.Reply:
        req_id = next(self._ids)
        fut: asyncio.Future[protocol.Reply] = asyncio.get_running_loop().create_future()
        self._pending[str(req_id)] = fut
        await ws.send(build(req_id))
        try:
            return await asyncio.wait_for(fut, timeout=self.settings.request_timeout_s)
        except TimeoutError:
            raise RetriableError("no answer to a request in time") from None
        finally:
            self._pending.pop(str(req_id), None)

    async def _subscribe_all(self, ws: Any) -> None:
        """One subscribe per data type, sent together, then every answer checked."""
        replies = await asyncio.gather(
            *(
                self._request(ws, partial(protocol.subscribe, channel=ch, params=params))
                for ch, params in self.plan.items()
            )
        )
        for (channel, params), reply in zip(self.plan.items(), replies, strict=True):
            if reply.ok:
                continue
            self._count_error(reply)
            log.warning(
                "%s subscription refused (%s); unsubscribing and retrying",
                channel,
                reply.error.message if reply.error else "",
            )
            await self._request(ws, partial(protocol.unsubscribe, channel=channel))
            again = await self._request(
                ws, partial(protocol.subscribe, channel=channel, params=params)
            )
            if not again.ok:
                self._count_error(again)
                raise RetriableError(
                    f"{channel} subscription refused: code "
                    f"{again.error.code if again.error else '?'}"
                )

    def _count_error(self, reply: protocol.Reply) -> None:
        code = str(reply.error.code) if reply.error and reply.error.code in (1, 2) else "other"
        self.ctx.metrics.exchange_errors.labels(self.ctx.name, code).inc()

    def _start_epoch(self, reason: str, keys: dict[str, list[str]] | None = None) -> None:
        """New subscription → new epoch; a resync marker to every key of every channel
        (or of the channels in ``keys``), so it lands in each key's partition."""
        now_ms = int(self._clock() * 1000)
        self.epoch = max(self.epoch + 1, now_ms)
        if reason != "start":
            self.ctx.metrics.gaps.labels(self.ctx.name, reason).inc()
        if keys is None:
            keys = {
                ch: protocol.marker_keys(ch, params, self.markets)
                for ch, params in self.plan.items()
            }
        for channel, channel_keys in keys.items():
            topic = self._topic[channel]
            hdrs = self._marker_headers[channel]
            for key in channel_keys:
                value = encode_marker(channel, key, reason, self.connection_id, now_ms, self.epoch)
                self.ctx.delivery.send(OutRecord(topic, value, key.encode(), hdrs, now_ms, channel))
        log.info("resync epoch %d (%s)", self.epoch, reason)

    # -- hot path ------------------------------------------------------------------------

    async def _read(self, ws: Any) -> str:
        delivery = self.ctx.delivery
        limit = self.config.kafka.max_buffered_records
        try:
            async for raw in ws:
                self.last_message = self._monotonic()
                self._handle(raw)
                if delivery.buffered >= limit:
                    await ws.close(1000, "kafka unavailable")
                    return "kafka_unavailable"
        except websockets.exceptions.ConnectionClosedError:
            return "connection_lost"
        return "server_closed"

    def _handle(self, raw: str | bytes) -> None:
        now_ms = int(self._clock() * 1000)
        try:
            frame = protocol.parse_frame(raw)
        except BadMessage as exc:
            self._dead_letter(raw, exc, now_ms)
            return
        if isinstance(frame, protocol.Update):
            self._data_seen = True
            self._produce(frame, now_ms)
        else:
            self._on_reply(frame)

    def _produce(self, update: protocol.Update, now_ms: int) -> None:
        ctx = self.ctx
        channel = update.channel
        topic = self._topic[channel]
        hdrs = self._headers[channel]
        lag = self._lag.get(channel)
        if lag is None:  # labels() takes a lock and walks a dict: once per channel
            lag = self._lag[channel] = ctx.metrics.event_lag.labels(ctx.name, channel)
        for event in update.events:
            value = encode_event(event, now_ms, self.epoch)
            if event.event_time_ms is not None:
                lag.observe(max(0.0, (now_ms - event.event_time_ms) / 1000))
            ctx.delivery.send(
                OutRecord(
                    topic,
                    value,
                    event.key.encode(),
                    hdrs,
                    event.event_time_ms if event.event_time_ms is not None else now_ms,
                    channel,
                )
            )

    def _on_reply(self, reply: protocol.Reply) -> None:
        if reply.method == "pong":
            if reply.id in self._pings:
                sent = self._pings.pop(reply.id)
            elif self._pings:  # a server that does not echo ids: match the oldest ping
                oldest = min(self._pings, key=self._pings.__getitem__)
                sent = self._pings.pop(oldest)
            else:
                return
            self.ctx.metrics.ping_rtt.labels(self.ctx.name).observe(self._monotonic() - sent)
            return
        fut = self._pending.get(reply.id) if reply.id is not None else None
        if fut is not None and not fut.done():
            fut.set_result(reply)
            return
        if not reply.ok:
            self._count_error(reply)
            log.warning(
                "error answer from the exchange: code %s: %s",
                reply.error.code if reply.error else "?",
                reply.error.message if reply.error else "",
            )

    def _dead_letter(self, raw: str | bytes, exc: BadMessage, now_ms: int) -> None:
        ctx = self.ctx
        ctx.metrics.dead_letters.labels(ctx.name, exc.reason).inc()
        log.warning("dead-lettered a frame: %s", exc)
        ctx.delivery.send(
            records.dead_letter(
                topic=self.settings.topics.dead_letter,
                raw=raw,
                reason=exc.reason,
                detail=exc.detail,
                exchange=protocol.EXCHANGE,
                receive_time_ms=now_ms,
                source=f"{NAME}/{self.connection_id}",
            )
        )
