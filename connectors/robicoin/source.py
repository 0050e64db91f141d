"""Robicoin REST poller: polls each enabled stream on its own schedule, inside the
exchange's rate limits, and writes what is new in one Kafka transaction with the
cursor that covers it.

One asyncio task per stream (each ticker window is a stream). Requests run in worker
threads; two rate limiters (ticker class, everything else) decide when a request may
start; every commit goes through the runtime's transactional producer, which
serialises them. In-memory state (cursors, last snapshots) only changes after its
transaction committed; after a failed commit it is re-read from Kafka, because a
commit that timed out may have succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import requests

from connectors.robicoin import protocol, signing
from connectors.robicoin.client import (
    Answer,
    Credentials,
    NotFoundError,
    RequestFailed,
    RobicoinClient,
)
from connectors.robicoin.config import RobicoinConfig, credential_fingerprint
from connectors.robicoin.protocol import EXCHANGE, Cursor, Endpoint, Row
from connectors.runtime import records
from connectors.runtime.app import RuntimeContext
from connectors.runtime.authguard import (
    AuthGuard,
    GuardRefused,
    GuardSpec,
    publish,
    reopen_if_reset,
    report_blocked,
)
from connectors.runtime.backoff import Backoff
from connectors.runtime.errors import (
    AuthError,
    BadMessage,
    ConfigError,
    FatalError,
    RejectedError,
    RetriableError,
)
from connectors.runtime.kafka import OutRecord, ensure_topics
from connectors.runtime.logs import redact, register_secret
from connectors.runtime.ratelimit import RateLimit, RateLimiter, Share
from connectors.runtime.state import read_state

log = logging.getLogger(__name__)

NAME = "robicoin-poller"
COMPACTED = {"cleanup.policy": "compact"}


def schema_id(channel: str) -> str:
    return f"robicoin.{channel}/v1"


@dataclass(frozen=True)
class Stream:
    """One polled stream: ``channel`` names the topic and schema."""

    name: str
    channel: str
    endpoint: Endpoint
    interval_s: float
    topic: str


class RobicoinPoller:
    def __init__(
        self,
        config: RobicoinConfig,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        s = config.robicoin
        self.settings = s
        self._clock = clock
        self._zone = ZoneInfo(s.timezone)
        self.credentials: Credentials | None = s.credentials.resolve(
            required=bool(s.private_streams)
        )
        if self.credentials is not None:
            c = self.credentials
            for secret in signing.secret_values(c.public_key, c.public_id, c.private_key):
                register_secret(secret)
        self.fingerprint = (
            credential_fingerprint(self.credentials) if self.credentials is not None else None
        )
        self.transactional_id = s.transactional_id or (
            f"{NAME}-{self.fingerprint}" if self.fingerprint else f"{NAME}-public"
        )
        self._session = session
        self.streams = self._plan()
        self._state: dict[str, Any] = {}
        self._epoch = 0
        self._guard: AuthGuard | None = None
        #: Partitions of the topics that get gap markers (looked up in ``run``).
        self._partitions: dict[str, list[int]] = {}
        self._signed_lock = asyncio.Lock()
        self._reload_lock = asyncio.Lock()
        self._guard_reopened = asyncio.Event()
        self._last_ok: float | None = None

    # -- plan ------------------------------------------------------------------------

    def _plan(self) -> list[Stream]:
        s = self.settings
        t = s.topics
        out: list[Stream] = []
        if s.streams.ticker.enabled:
            for window in s.streams.ticker.windows:
                out.append(
                    Stream(
                        f"ticker:{window}",
                        "ticker",
                        protocol.ticker_endpoint(window),
                        s.streams.ticker.interval_s,
                        t.ticker,
                    )
                )
        for name, endpoint, topic in (
            ("order", protocol.ORDER, t.order),
            ("balance", protocol.BALANCE, t.balance),
            ("transaction", protocol.TRANSACTION, t.transaction),
            ("open_order", protocol.OPEN_ORDER, t.open_order),
        ):
            stream = getattr(s.streams, name)
            if stream.enabled:
                channel = name.replace("_", "-")
                out.append(Stream(name, channel, endpoint, stream.interval_s, topic))
        return out

    def topics(self) -> dict[str, dict[str, str]]:
        t = self.settings.topics
        out: dict[str, dict[str, str]] = {s.topic: {} for s in self.streams}
        out[t.dead_letter] = {}
        out[t.state] = dict(COMPACTED)
        if self.credentials is not None:
            out[self.settings.auth_guard.topic] = dict(COMPACTED)
        return out

    def guard_spec(self) -> GuardSpec | None:
        if self.fingerprint is None:
            return None
        g = self.settings.auth_guard
        return GuardSpec(g.topic, self.fingerprint, g.limit)

    # -- run -------------------------------------------------------------------------

    async def run(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx
        s = self.settings
        m = ctx.metrics
        self._limiters = {
            protocol.EndpointClass.TICKER: RateLimiter(
                RateLimit(s.rate_limit.ticker.count, s.rate_limit.ticker.window_s),
                margin=s.rate_limit.margin_for(shared=False),
                on_wait=m.rate_limit_observer(ctx.name, "ticker"),
            ),
            protocol.EndpointClass.OTHER: RateLimiter(
                RateLimit(s.rate_limit.other.count, s.rate_limit.other.window_s),
                margin=s.rate_limit.margin_for(shared=s.rate_limit.share.slots > 1),
                share=Share(s.rate_limit.share.slots, s.rate_limit.share.slot),
                on_wait=m.rate_limit_observer(ctx.name, "other"),
            ),
        }
        self.client = RobicoinClient(
            s.base_url,
            self.credentials,
            session=self._session,
            timeout_s=s.request_timeout_s,
            connect_timeout_s=s.connect_timeout_s,
            clock=self._clock,
            on_answer=self._on_answer,
        )
        m.track_last_message(ctx.name, lambda: self._last_ok)
        ctx.health.add_check("exchange", self._exchange_fresh)
        await self._load_state()
        # Gap markers go to every partition; looked up once here, not on the event
        # loop while a commit holds the producer.
        self._partitions = {
            st.topic: await asyncio.to_thread(ctx.transactions.partitions, st.topic)
            for st in self.streams
            if st.name in ("order", "transaction")
        }
        if self._guard is not None:
            ctx.health.add_check("auth", lambda: not self._guard_blocked())
            if self._guard.blocked:
                report_blocked(self._guard, ctx.metrics, ctx.name)
        log.info(
            "%s: polling %s (transactional id %s)",
            ctx.name,
            ", ".join(st.name for st in self.streams),
            self.transactional_id,
        )
        tasks = [asyncio.create_task(self._poll_loop(st), name=st.name) for st in self.streams]
        if self._guard is not None:
            tasks.append(asyncio.create_task(self._watch_guard(), name="auth-guard"))
        try:
            stop = asyncio.create_task(ctx.stop.wait())
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop:
                    task.result()  # a fatal error in a stream ends the connector
        finally:
            for task in [*tasks, stop]:
                task.cancel()
            await asyncio.gather(*tasks, stop, return_exceptions=True)
            self.client.close()

    def _on_answer(self, endpoint: Endpoint, outcome: str, elapsed: float) -> None:
        self.ctx.metrics.observe_request(self.ctx.name, endpoint.family, outcome, elapsed)

    def _exchange_fresh(self) -> bool:
        if self._last_ok is None:
            return False
        longest = max([st.interval_s for st in self.streams] + [1.0])
        return time.monotonic() - self._last_ok < max(30.0, 3 * longest)

    # -- state -----------------------------------------------------------------------

    async def _load_state(self) -> None:
        """Read cursors, snapshots and the auth guard back from Kafka."""
        s = self.settings
        state = await asyncio.to_thread(read_state, self.ctx.kafka, s.topics.state)
        self._state = {}
        for key, raw in state.items():
            if raw is None:
                continue
            try:
                self._state[key.decode()] = json.loads(raw)
            except ValueError:
                log.error("state record %r is unreadable; starting that stream afresh", key)
        self._epoch = int(self._state.get("epoch", 0) or 0)
        if not self._epoch:
            # The first epoch is written with the first commit and kept across restarts:
            # a restart is seamless (cursors), only a gap starts a new epoch.
            self._epoch = int(self._clock() * 1000)
        spec = self.guard_spec()
        if spec is not None:
            guard_state = await asyncio.to_thread(read_state, self.ctx.kafka, spec.topic)
            if self._guard is None:
                self._guard = AuthGuard(
                    spec,
                    self.transactional_id,
                    guard_state,
                    functools.partial(read_state, self.ctx.kafka, spec.topic),
                    self.ctx.transactions.commit,
                    self._now_ms,
                )
            else:
                # Keep this process's verdict; adopt what Kafka holds.
                self._guard.refresh(guard_state)
            publish(self._guard, self.ctx.metrics, self.ctx.name)

    async def _reload_state(self) -> None:
        async with self._reload_lock:
            log.warning("%s: re-reading state from Kafka after a failed commit", self.ctx.name)
            # A broker that lost its data (restarted empty) has no topics any more:
            # create them again when allowed. The state read back is then empty, so the
            # poller starts afresh in a new epoch (every record's resync_epoch changes);
            # without permission to create topics it stops with that error (exit 1).
            topics = self.topics()
            try:
                await asyncio.to_thread(ensure_topics, self.ctx.kafka, topics, topics)
            except ConfigError as exc:
                raise FatalError(f"Kafka lost this connector's topics: {exc}") from None
            await asyncio.to_thread(self.ctx.transactions.start)
            await self._load_state()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _state_record(self, key: str, value: Any) -> OutRecord:
        return OutRecord(
            topic=self.settings.topics.state,
            key=key.encode(),
            value=json.dumps(value, separators=(",", ":"), sort_keys=True).encode(),
            timestamp_ms=self._now_ms(),
            channel="state",
        )

    async def _commit(self, out: Sequence[OutRecord], state: Mapping[str, Any]) -> None:
        """Records and state in one transaction; memory follows only after the commit."""
        if not out and not state:
            return
        if self._state.get("epoch") != self._epoch:
            state = {**state, "epoch": self._epoch}
        batch = list(out) + [self._state_record(k, v) for k, v in state.items()]
        await asyncio.to_thread(self.ctx.transactions.commit, batch)
        self._state.update(state)

    # -- auth guard ------------------------------------------------------------------

    def _guard_blocked(self) -> bool:
        return self._guard is not None and self._guard.blocked

    async def _watch_guard(self) -> None:
        """While the guard refuses, look for an operator reset in Kafka."""
        assert self._guard is not None
        while True:
            await asyncio.sleep(self.settings.auth_guard.recheck_s)
            if not self._guard.blocked:
                continue
            try:
                state = await asyncio.to_thread(read_state, self.ctx.kafka, self._guard.spec.topic)
            except RetriableError as exc:
                log.warning("cannot re-read the auth guard: %s", exc)
                continue
            if reopen_if_reset(self._guard, state, self.ctx.metrics, self.ctx.name):
                self._guard_reopened.set()

    async def _wait_for_guard(self) -> None:
        while self._guard_blocked() and not self.ctx.stop.is_set():
            self._guard_reopened.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._guard_reopened.wait(), timeout=1.0)

    async def _request(self, stream: Stream) -> Answer | None:
        """One rate-limited request; signed ones pass the auth guard first.

        Signed requests are sent one at a time: if the key is revoked, exactly one
        request learns it, and none is already on its way behind it.
        """
        limiter = self._limiters[stream.endpoint.klass]
        guard = self._guard
        if not stream.endpoint.signed or guard is None:
            async with limiter.slot():
                return await asyncio.to_thread(self.client.call, stream.endpoint)
        async with self._signed_lock:
            if guard.blocked:
                return None
            try:
                await asyncio.to_thread(guard.before_request)
            except GuardRefused:
                # Another process with these credentials spent the budget.
                report_blocked(guard, self.ctx.metrics, self.ctx.name)
                return None
            answer: Answer | None = None
            error: Exception | None = None
            async with limiter.slot():
                try:
                    answer = await asyncio.to_thread(self.client.call, stream.endpoint)
                except (AuthError, RequestFailed, RejectedError) as exc:
                    error = exc
            # Any answer that is not an auth failure (even a malformed body) proves the
            # credentials were accepted.
            await asyncio.to_thread(guard.settle, error)
            publish(guard, self.ctx.metrics, self.ctx.name)
            if isinstance(error, AuthError):
                self.ctx.metrics.auth_failures.labels(self.ctx.name).inc()
                report_blocked(guard, self.ctx.metrics, self.ctx.name)
                return None
            if error is not None:
                raise error
            return answer

    # -- polling ---------------------------------------------------------------------

    async def _poll_loop(self, stream: Stream) -> None:
        s = self.settings
        backoff = Backoff(initial_s=s.backoff_initial_s, cap_s=s.backoff_max_s)
        loop = asyncio.get_running_loop()
        while not self.ctx.stop.is_set():
            if stream.endpoint.signed:
                await self._wait_for_guard()
            started = loop.time()
            delay = stream.interval_s
            try:
                await self._poll_once(stream)
                backoff.reset()
            except RequestFailed as exc:
                delay = backoff.next_delay()
                log.warning("%s: %s; retrying in %.1fs", stream.name, exc, delay)
                started = loop.time()
            except NotFoundError as exc:
                raise FatalError(
                    f"{stream.name}: HTTP {exc.status} at {self.settings.base_url}: "
                    "check robicoin.base_url"
                ) from None
            except RejectedError as exc:
                log.error("%s: the exchange refused the request: %s", stream.name, exc)
                self.ctx.metrics.exchange_errors.labels(self.ctx.name, str(exc.status)).inc()
                delay = max(delay, backoff.next_delay())
            except RetriableError as exc:  # a Kafka commit failed
                delay = backoff.next_delay()
                log.warning("%s: %s; retrying in %.1fs", stream.name, exc, delay)
                await self._retry_reload()
                started = loop.time()
            wait = started + delay - loop.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ctx.stop.wait(), timeout=wait)

    async def _retry_reload(self) -> None:
        try:
            await self._reload_state()
        except RetriableError as exc:
            log.warning("state reload failed (%s); will retry", exc)

    async def _poll_once(self, stream: Stream) -> None:
        answer = await self._request(stream)
        if answer is None:
            return
        now_ms = self._now_ms()
        if answer.error is not None:
            await self._commit([self._dead_letter(stream, answer.text, answer.error, now_ms)], {})
            return
        try:
            rows = protocol.data_rows(answer.payload)
        except BadMessage as exc:
            await self._commit([self._dead_letter(stream, answer.text, exc, now_ms)], {})
            return
        # Only an answer of the documented shape counts as the exchange being there:
        # a run of HTML pages or error bodies must turn the poller not ready.
        self._last_ok = time.monotonic()
        handler = getattr(self, f"_handle_{stream.name.split(':')[0]}")
        out, state = handler(stream, rows, now_ms)
        await self._commit(out, state)

    # -- per stream ------------------------------------------------------------------

    def _dead_letter(self, stream: Stream, raw: str, exc: BadMessage, now_ms: int) -> OutRecord:
        self.ctx.metrics.dead_letters.labels(self.ctx.name, exc.reason).inc()
        log.warning("%s: dead-lettered: %s", stream.name, exc)
        return records.dead_letter(
            topic=self.settings.topics.dead_letter,
            raw=raw,
            reason=exc.reason,
            detail=exc.detail,
            exchange=EXCHANGE,
            receive_time_ms=now_ms,
            source=stream.endpoint.name,
        )

    def _event(self, stream: Stream, row: Row, now_ms: int, kind: str = "event") -> OutRecord:
        value = records.envelope(
            exchange=EXCHANGE,
            channel=stream.channel,
            kind=kind,
            symbol=row.key,
            event_time_ms=row.event_time_ms,
            receive_time_ms=now_ms,
            resync_epoch=self._epoch,
            data=row.data,
        )
        if row.event_time_ms is not None and kind == "event":
            lag = max(0.0, (now_ms - row.event_time_ms) / 1000)
            self.ctx.metrics.event_lag.labels(self.ctx.name, stream.channel).observe(lag)
        return OutRecord(
            topic=stream.topic,
            value=value,
            key=row.key.encode(),
            headers=records.headers(EXCHANGE, stream.channel, kind, schema_id(stream.channel)),
            timestamp_ms=now_ms,
            channel=stream.channel,
        )

    def _parse_each(
        self, stream: Stream, rows: Sequence[Any], parse: Callable[[Any], Row], now_ms: int
    ) -> tuple[list[Row], list[OutRecord]]:
        good: list[Row] = []
        dead: list[OutRecord] = []
        for raw in rows:
            try:
                good.append(parse(raw))
            except BadMessage as exc:
                dead.append(self._dead_letter(stream, protocol.row_text(raw), exc, now_ms))
        return good, dead

    def _handle_ticker(
        self, stream: Stream, rows: Sequence[Any], now_ms: int
    ) -> tuple[list[OutRecord], dict[str, Any]]:
        window = stream.name.split(":", 1)[1]

        def parse(raw: Any) -> Row:
            t = protocol.parse_ticker(raw, window)
            return Row(t.pair, None, t.data())

        good, out = self._parse_each(stream, rows, parse, now_ms)
        return [self._event(stream, r, now_ms) for r in good] + out, {}

    def _incremental(
        self,
        stream: Stream,
        rows: Sequence[Any],
        now_ms: int,
        parse: Callable[[Any], Row],
    ) -> tuple[list[OutRecord], dict[str, Any]]:
        key = f"cursor/{stream.name}"
        try:
            cursor = Cursor.from_json(self._state.get(key) or {})
        except ValueError:
            log.error("%s: stored cursor unreadable; starting afresh", stream.name)
            cursor = Cursor()
        # Market orders leave the list (filled, cancelled): only transactions are append-only.
        step = protocol.advance(cursor, rows, "created_at", append_only=stream.name != "order")
        out: list[OutRecord] = []
        state: dict[str, Any] = {key: step.cursor.to_json()}
        if step.gap:
            out.extend(self._gap_markers(stream, cursor, len(rows), now_ms))
            state["epoch"] = self._epoch
        good, dead = self._parse_each(stream, step.new_rows, parse, now_ms)
        out.extend(self._event(stream, r, now_ms) for r in good)
        out.extend(dead)
        return out, state

    def _gap_markers(
        self, stream: Stream, cursor: Cursor, rows: int, now_ms: int
    ) -> list[OutRecord]:
        """A full window with nothing already written: rows may have been missed."""
        self.ctx.metrics.gaps.labels(self.ctx.name, "window_overflow").inc()
        self._epoch = max(self._epoch + 1, now_ms)
        log.warning(
            "%s: a full window of %d rows that does not show where the rows already written "
            "end: some rows may have been missed (poll more often); writing gap markers",
            stream.name,
            rows,
        )
        data = {
            "reason": "window_overflow",
            "detail": (
                f"the exchange returned a full window of {rows} rows, none older than the "
                f"last row written ({cursor.newest}) and not enough of those written to "
                "tell where they end; rows in between may be missing"
            ),
            "previous_newest": cursor.newest,
        }
        value = records.envelope(
            exchange=EXCHANGE,
            channel=stream.channel,
            kind="gap",
            symbol=None,
            event_time_ms=None,
            receive_time_ms=now_ms,
            resync_epoch=self._epoch,
            data=data,
        )
        hdrs = records.headers(EXCHANGE, stream.channel, "gap", schema_id(stream.channel))
        # Every partition gets one: each consumer must learn about the gap.
        return [
            OutRecord(stream.topic, value, None, hdrs, now_ms, stream.channel, partition=p)
            for p in self._partitions[stream.topic]
        ]

    def _handle_transaction(
        self, stream: Stream, rows: Sequence[Any], now_ms: int
    ) -> tuple[list[OutRecord], dict[str, Any]]:
        return self._incremental(
            stream, rows, now_ms, lambda r: protocol.parse_transaction(r, self._zone)
        )

    def _handle_order(
        self, stream: Stream, rows: Sequence[Any], now_ms: int
    ) -> tuple[list[OutRecord], dict[str, Any]]:
        return self._incremental(
            stream, rows, now_ms, lambda r: protocol.parse_order(r, self._zone)
        )

    def _snapshot(
        self,
        stream: Stream,
        rows: Sequence[Any],
        now_ms: int,
        parse: Callable[[Any], Row],
        key_of: Callable[[Any], str],
        every_poll: bool,
        window: int | None,
    ) -> tuple[list[OutRecord], dict[str, Any]]:
        """Full answers (balance, open-order): write what changed since the last one.

        State per key: the row's fingerprint and its parsed data (a closed order is
        reported with the data it last had).
        """
        key = f"snapshot/{stream.name}"
        previous: dict[str, Any] = self._state.get(key) or {}
        current: dict[str, Any] = {}
        parsed: dict[str, Row] = {}
        out: list[OutRecord] = []
        for raw in rows:
            k = key_of(raw)
            fp = protocol.row_fingerprint(raw)
            try:
                parsed[k] = parse(raw)
                current[k] = {"fp": fp, "data": parsed[k].data}
            except BadMessage as exc:
                current[k] = {"fp": fp, "data": None}
                if previous.get(k, {}).get("fp") != fp:  # dead-letter each version once
                    out.append(self._dead_letter(stream, protocol.row_text(raw), exc, now_ms))
        changes = protocol.diff_keys(
            {k: v["fp"] for k, v in previous.items()},
            {k: v["fp"] for k, v in current.items()},
            window_full=window is not None and len(rows) >= window,
        )
        reported: set[str] = set()
        for k, change in changes:
            reported.add(k)
            if k in parsed:
                row = parsed[k]
            elif change in ("closed", "out_of_window") and previous[k].get("data"):
                data = previous[k]["data"]
                if stream.name != "open_order":
                    continue  # a wallet that disappeared: nothing to report
                row = Row(str(data["pair"]), None, data)
            else:
                continue
            out.append(self._event(stream, self._with_change(stream, row, change), now_ms))
        if every_poll:
            for k, row in parsed.items():
                if k not in reported:
                    out.append(
                        self._event(stream, self._with_change(stream, row, "unchanged"), now_ms)
                    )
        return out, ({key: current} if current != previous else {})

    @staticmethod
    def _with_change(stream: Stream, row: Row, change: str) -> Row:
        if stream.name != "open_order":
            return row
        data = {**row.data, "change": change}
        event_time = row.event_time_ms if change == "opened" else None
        return Row(row.key, event_time, data)

    def _handle_balance(
        self, stream: Stream, rows: Sequence[Any], now_ms: int
    ) -> tuple[list[OutRecord], dict[str, Any]]:
        every = self.settings.streams.balance.emit == "every_poll"
        return self._snapshot(
            stream, rows, now_ms, protocol.parse_balance, _currency_key, every, None
        )

    def _handle_open_order(
        self, stream: Stream, rows: Sequence[Any], now_ms: int
    ) -> tuple[list[OutRecord], dict[str, Any]]:
        every = self.settings.streams.open_order.emit == "every_poll"
        return self._snapshot(
            stream,
            rows,
            now_ms,
            lambda r: protocol.parse_open_order(r, self._zone),
            _data_id_key,
            every,
            protocol.WINDOW_ROWS,
        )


def _currency_key(row: Any) -> str:
    return _state_key(row, "currency")


def _data_id_key(row: Any) -> str:
    return _state_key(row, "data_id")


def _state_key(row: Any, field: str) -> str:
    """A row's key in the snapshot state. Only a short plain value is used as it is:
    anything else an exchange sends there (an object, a long text that may echo the
    request) is stored by its fingerprint, never copied into the state topic."""
    value = row.get(field) if isinstance(row, dict) else None
    if isinstance(value, str | int) and not isinstance(value, bool):
        text = str(value)
        if len(text) <= 64 and text.isprintable() and redact(text) == text:
            return text
    return f"?{protocol.row_fingerprint(value)}"


def create(config: RobicoinConfig) -> RobicoinPoller:
    if not isinstance(config, RobicoinConfig):
        raise ConfigError("robicoin-poller needs a RobicoinConfig")
    return RobicoinPoller(config)
