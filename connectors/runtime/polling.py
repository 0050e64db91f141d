"""The polling source: every REST exchange's polling lifecycle, written once.

An exchange brings a :class:`PollExchange`: its facts (the envelope's ``exchange``
name, topics, rate-limit classes, where its auth guard lives), one blocking ``call``
per request, and its streams (:class:`~connectors.runtime.cursors.PolledStream`: the
request, the rows of an answer, the rule for what is new). This module does the rest:

- one asyncio task per stream, polled every ``interval_s`` start to start; failures
  back off (full jitter), refusals wait at least an interval
  (:class:`~connectors.runtime.cursors.Schedule`);
- a rate-limit slot per request class; signed requests one at a time through the
  auth guard, and a watcher that notices an operator reset
  (:mod:`connectors.runtime.guarded`);
- exactly once: a poll's records and the stream's new state (cursor, snapshot, epoch)
  are one Kafka transaction; memory follows only committed transactions. State lives
  in a compacted topic, read at start and again after a failed transaction (a commit
  that timed out may have succeeded), recreating lost topics when allowed;
- gap markers (``kind: gap``, to every partition) and a new resync epoch when rows may
  have been missed; dead letters; metrics; health (``exchange``: an answer of the
  documented shape arrived lately; ``auth``: the guard lets requests through).

Requests run in worker threads; every commit goes through the runtime's
transactional producer, which serialises them. Record timestamps: the Kafka timestamp
of every record is its poll's receive time (as for streaming sources).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from connectors.runtime import records, wire
from connectors.runtime.authguard import AuthGuard, GuardSpec, publish, report_blocked
from connectors.runtime.backoff import Backoff
from connectors.runtime.context import RuntimeContext
from connectors.runtime.cursors import Dead, Gap, Poll, PolledStream, Request, Schedule
from connectors.runtime.errors import (
    BadMessage,
    ConfigError,
    FatalError,
    RejectedError,
    RetriableError,
)
from connectors.runtime.guarded import GuardedCalls, ResetWatcher, guard_reader, open_guard
from connectors.runtime.kafka import ensure_topics
from connectors.runtime.ratelimit import RateLimit, RateLimiter, Share
from connectors.runtime.records import Event, OutRecord
from connectors.runtime.state import read_state

log = logging.getLogger(__name__)

COMPACTED = {"cleanup.policy": "compact"}
#: The exchange counts as there while an answer of the documented shape arrived within
#: max(FRESH_MIN_S, FRESH_INTERVALS * the longest interval).
FRESH_MIN_S = 30.0
FRESH_INTERVALS = 3


@dataclass(frozen=True)
class RateClass:
    """One rate-limit class: the exchange's limit, the margin added to its window, and
    this process's share of wall-clock slots when the budget is shared
    (:mod:`connectors.runtime.ratelimit`). Its name is the ``endpoint_class`` label."""

    limit: RateLimit
    margin: float
    share: Share = field(default_factory=Share)


@dataclass(frozen=True)
class PollSettings:
    """The timing of one polling source (from the exchange's config)."""

    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: While the auth guard refuses, re-read it this often (an operator reset).
    guard_recheck_s: float = 5.0


class Answered(Protocol):
    """A successful answer as the exchange's client hands it over: ``payload`` decoded
    (exact numbers), or ``error`` set when the body is unusable (then ``text`` is
    dead-lettered)."""

    @property
    def payload(self) -> Any: ...

    @property
    def text(self) -> str: ...

    @property
    def error(self) -> BadMessage | None: ...


class PollExchange(Protocol):
    """What one REST exchange gives the polling runtime."""

    @property
    def exchange(self) -> str:
        """The envelope's ``exchange`` field and the prefix of schema ids."""
        ...

    @property
    def streams(self) -> Sequence[PolledStream]: ...

    @property
    def settings(self) -> PollSettings: ...

    @property
    def rate_classes(self) -> Mapping[str, RateClass]:
        """Every :attr:`~connectors.runtime.cursors.Request.rate_class` its streams use."""
        ...

    @property
    def dead_letter_topic(self) -> str: ...

    @property
    def state_topic(self) -> str:
        """Compacted: cursors, last snapshots, the resync epoch."""
        ...

    @property
    def transactional_id(self) -> str:
        """One per account: Kafka fences an older instance with the same id."""
        ...

    def guard_spec(self) -> GuardSpec | None:
        """Where the auth guard of its credentials lives (None: no credentials)."""
        ...

    def attach(self, ctx: RuntimeContext) -> None:
        """Called once when the connector starts (open the HTTP client, count answers)."""
        ...

    def call(self, request: Request) -> Answered:
        """Blocking (a worker thread): send one request. Raises RetriableError (no
        usable answer: back off), RejectedError (a 4xx to this request), AuthError
        (the credentials were refused), FatalError (cannot go on)."""
        ...

    def misconfigured(self, error: RejectedError) -> str | None:
        """When a refusal means the configuration is wrong rather than this one request
        (e.g. a 404: the base URL), what to tell the operator; the connector stops."""
        ...

    def close(self) -> None: ...


class PollingSource:
    """The connector the runtime runs for any :class:`PollExchange`."""

    def __init__(
        self,
        exchange: PollExchange,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.exchange = exchange
        self.streams = list(exchange.streams)
        self.settings = exchange.settings
        self._clock = clock
        self._monotonic = monotonic
        name = exchange.exchange
        self._headers = {
            (st.channel, kind): records.headers(
                name, st.channel, kind, wire.schema_id(name, st.channel)
            )
            for st in self.streams
            for kind in ("event", "gap")
        }
        self._state: dict[str, Any] = {}
        self._epoch = 0
        self._guard: AuthGuard | None = None
        self._calls: GuardedCalls | None = None
        #: Partitions of the topics that get gap markers (looked up in ``run``).
        self._partitions: dict[str, list[int]] = {}
        self._limiters: dict[str, RateLimiter] = {}
        self._reload_lock = asyncio.Lock()
        self._guard_reopened = asyncio.Event()
        self._last_ok: float | None = None

    @property
    def transactional_id(self) -> str:
        return self.exchange.transactional_id

    def topics(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {s.topic: {} for s in self.streams}
        out[self.exchange.dead_letter_topic] = {}
        out[self.exchange.state_topic] = dict(COMPACTED)
        spec = self.exchange.guard_spec()
        if spec is not None:
            out[spec.topic] = dict(COMPACTED)
        return out

    def guard_spec(self) -> GuardSpec | None:
        return self.exchange.guard_spec()

    # -- run -------------------------------------------------------------------------

    async def run(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx
        m = ctx.metrics
        self._limiters = {
            name: RateLimiter(
                rc.limit,
                margin=rc.margin,
                share=rc.share,
                on_wait=m.rate_limit_observer(ctx.name, name),
            )
            for name, rc in self.exchange.rate_classes.items()
        }
        self._calls = GuardedCalls(None, m, ctx.name)
        self.exchange.attach(ctx)
        try:
            await self._run(ctx)
        finally:
            self.exchange.close()

    async def _run(self, ctx: RuntimeContext) -> None:
        m = ctx.metrics
        m.track_last_message(ctx.name, lambda: self._last_ok)
        ctx.health.add_check("exchange", self._exchange_fresh)
        await self._load_state()
        # Gap markers go to every partition; looked up once here, not on the event
        # loop while a commit holds the producer.
        self._partitions = {
            st.topic: await asyncio.to_thread(ctx.transactions.partitions, st.topic)
            for st in self.streams
            if st.rule.gaps
        }
        if self._guard is not None:
            ctx.health.add_check("auth", lambda: not self._guard_blocked())
            if self._guard.blocked:
                report_blocked(self._guard, m, ctx.name)
        log.info(
            "%s: polling %s (transactional id %s)",
            ctx.name,
            ", ".join(st.name for st in self.streams),
            self.transactional_id,
        )
        tasks = [asyncio.create_task(self._poll_loop(st), name=st.name) for st in self.streams]
        if self._guard is not None:
            spec = self._guard.spec
            watcher = ResetWatcher(
                self._guard,
                guard_reader(ctx, spec),
                m,
                ctx.name,
                self.settings.guard_recheck_s,
            )
            tasks.append(asyncio.create_task(watcher.run(self._guard_reopened), name="auth-guard"))
        stop = asyncio.create_task(ctx.stop.wait())
        try:
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop:
                    task.result()  # a fatal error in a stream ends the connector
        finally:
            for task in [*tasks, stop]:
                task.cancel()
            await asyncio.gather(*tasks, stop, return_exceptions=True)

    def _exchange_fresh(self) -> bool:
        if self._last_ok is None:
            return False
        longest = max([st.interval_s for st in self.streams] + [1.0])
        return self._monotonic() - self._last_ok < max(FRESH_MIN_S, FRESH_INTERVALS * longest)

    # -- state -----------------------------------------------------------------------

    async def _load_state(self) -> None:
        """Read cursors, snapshots and the auth guard back from Kafka."""
        ctx = self.ctx
        state = await asyncio.to_thread(read_state, ctx.kafka, self.exchange.state_topic)
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
            self._epoch = self._now_ms()
        spec = self.exchange.guard_spec()
        if spec is not None:
            if self._guard is None:
                self._guard = await asyncio.to_thread(
                    open_guard, ctx, spec, self.transactional_id, self._now_ms
                )
                assert self._calls is not None
                self._calls.guard = self._guard
            else:
                # Keep this process's verdict; adopt what Kafka holds.
                await asyncio.to_thread(self._guard.refresh)
            publish(self._guard, ctx.metrics, ctx.name)

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

    async def _retry_reload(self) -> None:
        try:
            await self._reload_state()
        except RetriableError as exc:
            log.warning("state reload failed (%s); will retry", exc)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _state_record(self, key: str, value: Any) -> OutRecord:
        return OutRecord(
            topic=self.exchange.state_topic,
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

    async def _wait_for_guard(self) -> None:
        while self._guard_blocked() and not self.ctx.stop.is_set():
            self._guard_reopened.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._guard_reopened.wait(), timeout=1.0)

    # -- polling ---------------------------------------------------------------------

    async def _poll_loop(self, stream: PolledStream) -> None:
        s = self.settings
        schedule = Schedule(
            stream.interval_s, Backoff(initial_s=s.backoff_initial_s, cap_s=s.backoff_max_s)
        )
        loop = asyncio.get_running_loop()
        while not self.ctx.stop.is_set():
            if stream.request.signed:
                await self._wait_for_guard()
            started = loop.time()
            try:
                error = await self._poll_once(stream)
            except RetriableError as exc:  # a Kafka transaction failed
                delay = schedule.failed()
                log.warning("%s: %s; retrying in %.1fs", stream.name, exc, delay)
                await self._retry_reload()
                started = loop.time()
            else:
                if error is None:
                    delay = schedule.polled()
                elif isinstance(error, RejectedError):
                    problem = self.exchange.misconfigured(error)
                    if problem is not None:
                        raise FatalError(f"{stream.name}: {problem}")
                    log.error("%s: the exchange refused the request: %s", stream.name, error)
                    self.ctx.metrics.exchange_errors.labels(self.ctx.name, str(error.status)).inc()
                    delay = schedule.refused()
                else:  # no usable answer (network, 5xx, 429)
                    delay = schedule.failed()
                    log.warning("%s: %s; retrying in %.1fs", stream.name, error, delay)
                    started = loop.time()
            wait = Schedule.wait(started, delay, loop.time())
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.ctx.stop.wait(), timeout=wait)

    async def _poll_once(self, stream: PolledStream) -> RetriableError | RejectedError | None:
        """One request and its transaction. Returns the exchange's failure (the loop
        backs off); raises RetriableError when a Kafka transaction failed."""
        assert self._calls is not None
        request = stream.request
        outcome = await self._calls.call(
            self._limiters[request.rate_class],
            functools.partial(self.exchange.call, request),
            signed=request.signed,
        )
        if outcome.error is not None:
            return outcome.error
        answer = outcome.value
        if outcome.refused or answer is None:
            return None
        now_ms = self._now_ms()
        if answer.error is not None:
            await self._commit(
                [self._dead_letter(stream, Dead(answer.text, answer.error), now_ms)], {}
            )
            return None
        try:
            rows = stream.rows(answer.payload)
        except BadMessage as exc:
            await self._commit([self._dead_letter(stream, Dead(answer.text, exc), now_ms)], {})
            return None
        # Only an answer of the documented shape counts as the exchange being there:
        # a run of HTML pages or error bodies must turn the poller not ready.
        self._last_ok = self._monotonic()
        out, state = self.records_of(stream, rows, now_ms)
        await self._commit(out, state)
        return None

    # -- records ---------------------------------------------------------------------

    def records_of(
        self, stream: PolledStream, rows: Sequence[Any], now_ms: int
    ) -> tuple[list[OutRecord], dict[str, Any]]:
        """The records one answer's rows become, and the state entries to commit with
        them (the stream's rule applied to what is stored now)."""
        poll: Poll = stream.rule.apply(stream.name, rows, self._state)
        out: list[OutRecord] = []
        state = dict(poll.state)
        if poll.gap is not None:
            out.extend(self._gap_markers(stream, poll.gap, now_ms))
            state["epoch"] = self._epoch
        out.extend(self._event(stream, event, now_ms) for event in poll.events)
        out.extend(self._dead_letter(stream, dead, now_ms) for dead in poll.dead)
        return out, state

    def _event(self, stream: PolledStream, event: Event, now_ms: int) -> OutRecord:
        value = records.envelope(
            exchange=self.exchange.exchange,
            channel=stream.channel,
            kind="event",
            symbol=event.key,
            event_time_ms=event.event_time_ms,
            receive_time_ms=now_ms,
            resync_epoch=self._epoch,
            data=event.data,
        )
        if event.event_time_ms is not None:
            lag = max(0.0, (now_ms - event.event_time_ms) / 1000)
            self.ctx.metrics.event_lag.labels(self.ctx.name, stream.channel).observe(lag)
        return OutRecord(
            topic=stream.topic,
            value=value,
            key=event.key.encode(),
            headers=self._headers[stream.channel, "event"],
            timestamp_ms=now_ms,
            channel=stream.channel,
        )

    def _gap_markers(self, stream: PolledStream, gap: Gap, now_ms: int) -> list[OutRecord]:
        """Rows may have been missed: a new epoch, and a marker to every partition (each
        consumer must learn about the gap)."""
        self.ctx.metrics.gaps.labels(self.ctx.name, gap.reason).inc()
        self._epoch = max(self._epoch + 1, now_ms)
        log.warning("%s: %s; writing gap markers", stream.name, gap.note or gap.detail)
        value = records.envelope(
            exchange=self.exchange.exchange,
            channel=stream.channel,
            kind="gap",
            symbol=None,
            event_time_ms=None,
            receive_time_ms=now_ms,
            resync_epoch=self._epoch,
            data=gap.data(),
        )
        hdrs = self._headers[stream.channel, "gap"]
        return [
            OutRecord(stream.topic, value, None, hdrs, now_ms, stream.channel, partition=p)
            for p in self._partitions[stream.topic]
        ]

    def _dead_letter(self, stream: PolledStream, dead: Dead, now_ms: int) -> OutRecord:
        exc = dead.error
        self.ctx.metrics.dead_letters.labels(self.ctx.name, exc.reason).inc()
        log.warning("%s: dead-lettered: %s", stream.name, exc)
        return records.dead_letter(
            topic=self.exchange.dead_letter_topic,
            raw=dead.raw,
            reason=exc.reason,
            detail=exc.detail,
            exchange=self.exchange.exchange,
            receive_time_ms=now_ms,
            source=stream.request.name,
        )
