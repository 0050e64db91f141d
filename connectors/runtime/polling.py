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
  are committed atomically, in one Kafka transaction; memory follows only committed
  transactions. Polls hand their records and state to one committer
  (:class:`GroupCommit`): while a transaction is in flight, the polls that finish
  meanwhile wait and go together in the next one, and each stream waits for its own
  commit before it polls again. State lives in a compacted topic, read at start and
  again after a failed transaction (a commit that timed out may have succeeded; one
  re-read covers every poll of it), recreating lost topics when allowed;
- gap markers (``kind: gap``, to every partition) and a new resync epoch when rows may
  have been missed; dead letters; metrics; health (``exchange``: an answer of the
  documented shape arrived lately; ``auth``: the guard lets requests through).

Requests run in worker threads; every commit goes through the runtime's
transactional producer, which serialises them (the auth guard's own commits share it).
Record timestamps: the Kafka timestamp of every record is its poll's receive time (as
for streaming sources).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
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
#: The longest a busy committer holds a group open for more polls (:class:`GroupCommit`).
#: Measured with ``python -m bench --only poller`` (every stream at ``interval_s: 0``,
#: ~100 polls/s, 2 shared cores): a transaction costs the poller about the same CPU
#: whatever it holds, and one per poll (~100/s) took ~0.5 core. Committing whatever
#: queued behind the transaction in flight: 60-80 transactions/s, ~0.5 core. Held
#: 10 ms: 35/s, 0.37 core; 25 ms: 25/s, 0.35; 35 ms: 19/s, 0.28 — and held a fixed
#: 45 ms, the five ticker streams could no longer keep their budget (86 % of it), so
#: a hold also ends before the first of its polls' streams could poll again (then
#: 35 ms and 50 ms measured the same: ~19/s, ~0.28 core, 95 % of the budget used).
COMMIT_GATHER_S = 0.035


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
    #: The longest a busy committer holds a group of polls open (0: never).
    commit_gather_s: float = COMMIT_GATHER_S


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


async def wait_for_event(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until ``event`` is set, at most ``timeout_s``. Not ``asyncio.wait_for``: on
    Python 3.11 it returns normally when the task is cancelled just as the event is set,
    and a task that loses its cancellation at a stop never ends."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()


@dataclass(eq=False)
class Submission:
    """One poll's output waiting for its transaction: its records, the state entries
    that cover them, the future its stream task awaits, and ``due``: the event-loop
    time its stream could poll again anyway (None: no sooner than any other)."""

    key: str
    records: Sequence[OutRecord]
    state: Mapping[str, Any]
    done: asyncio.Future[None]
    due: float | None = None


class GroupCommit:
    """Group commit: the records and state of several polls in one transaction.

    :meth:`submit` hands one poll's output over and returns once the transaction that
    holds it committed, or raises what that transaction raised (every poll of a failed
    transaction sees its failure). :meth:`run` (the committer task) commits whatever is
    waiting, all of it together, through ``commit`` (one transaction for a group, in the
    order the polls were submitted); while it is in flight, new submissions wait for the
    next one.

    Gathering: a transaction costs the same CPU whether it holds one poll or ten, so
    while busy — the last transaction ended less than ``gather_s`` ago — a group is
    held open for more polls, at most ``gather_s``, and never past the first ``due`` of
    its polls less the time a commit takes: a stream waits for its commit only while it
    could not poll again anyway. When idle (or ``gather_s`` is 0) a group starts at
    once, so a lone poll waits no longer than without grouping.

    Bounded: a key (a stream) has at most one submission waiting or in flight — its task
    awaits it before polling again, and :meth:`submit` refuses a second one — so the
    queue never holds more than one submission per stream.

    :meth:`exclusive` keeps transactions out while held (a state re-read): it waits for
    the one in flight, and no group starts until it is released.
    """

    #: The first estimate of a commit's duration (then: a running average).
    COMMIT_ESTIMATE_S = 0.005
    #: A shorter hold is not worth a wake-up: commit at once.
    MIN_HOLD_S = 0.002

    def __init__(
        self,
        commit: Callable[[Sequence[Submission]], Awaitable[None]],
        gather_s: float = 0.0,
    ) -> None:
        self._commit = commit
        self.gather_s = gather_s
        self._pending: list[Submission] = []
        #: Keys with a submission waiting or in flight.
        self._keys: set[str] = set()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        #: Event-loop time the last transaction ended (None: none yet).
        self._last_end: float | None = None
        self.commit_s = self.COMMIT_ESTIMATE_S
        #: Transactions committed, and the polls they held.
        self.groups = 0
        self.polls = 0

    @property
    def waiting(self) -> int:
        """Submissions waiting for a transaction (not counting the ones in flight)."""
        return len(self._pending)

    async def submit(
        self,
        key: str,
        records: Sequence[OutRecord],
        state: Mapping[str, Any],
        due: float | None = None,
    ) -> None:
        if key in self._keys:
            raise RuntimeError(f"{key}: a second submission before the first was committed")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._keys.add(key)
        self._pending.append(Submission(key, records, state, done, due))
        self._wake.set()
        await done

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._lock:
            yield

    def hold_until(self, now: float, opened: float) -> float:
        """Until when the group waiting now stays open (``opened``: when the committer
        took it up); ``now`` or earlier: commit at once."""
        if self.gather_s <= 0 or self._last_end is None or opened - self._last_end >= self.gather_s:
            return now  # idle: no added latency
        until = opened + self.gather_s
        for sub in self._pending:
            if sub.due is not None:
                # Twice a commit's time: the estimate is an average, not a bound.
                until = min(until, sub.due - 2 * self.commit_s)
        return until if until - now >= self.MIN_HOLD_S else now

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        opened = loop.time()
        while (wait := self.hold_until(loop.time(), opened) - loop.time()) > 0:
            self._wake.clear()  # a new submission may bring an earlier due
            await wait_for_event(self._wake, wait)

    async def run(self) -> None:
        """The committer task, until cancelled; then whatever it will not commit is
        cancelled too (nobody waits for it for ever)."""
        try:
            await self._run()
        finally:
            self._settle(self._pending, None, cancel=True)
            self._pending = []

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            await self._gather(loop)
            async with self._lock:
                self._wake.clear()
                group: list[Submission] = []
                for sub in self._pending:
                    if sub.done.cancelled():  # its task stopped before anything began
                        self._keys.discard(sub.key)
                    else:
                        group.append(sub)
                self._pending = []
                if not group:
                    continue
                began = loop.time()
                try:
                    await self._commit(group)
                except Exception as exc:
                    self._last_end = loop.time()
                    self._settle(group, exc)
                    continue
                except BaseException:
                    self._settle(group, None, cancel=True)
                    raise
                self._last_end = loop.time()
                self.commit_s += (self._last_end - began - self.commit_s) / 8
                self.groups += 1
                self.polls += len(group)
                self._settle(group, None)

    def _settle(
        self, group: Sequence[Submission], error: Exception | None, cancel: bool = False
    ) -> None:
        for sub in group:
            self._keys.discard(sub.key)
            if sub.done.done():
                continue
            if cancel:
                sub.done.cancel()
            elif error is not None:
                sub.done.set_exception(error)
            else:
                sub.done.set_result(None)


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
        self._committer = GroupCommit(self._commit_group, gather_s=self.settings.commit_gather_s)
        self._shares: dict[str, float] = {}
        #: Kafka failures seen (failed transactions, the guard's failed commits), and how
        #: many of them the last successful state re-read covers: state may be behind
        #: Kafka while ``_reloaded < _failures``, and no stream polls then.
        self._failures = 0
        self._reloaded = 0
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
        self._shares = self._budget_shares()
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
        tasks.append(asyncio.create_task(self._committer.run(), name="commit"))
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

    def _budget_shares(self) -> dict[str, float]:
        """Per stream, the shortest time between two of its requests when its rate-limit
        class runs at full budget: the streams of a class take turns."""
        sharing: dict[str, int] = {}
        for st in self.streams:
            sharing[st.request.rate_class] = sharing.get(st.request.rate_class, 0) + 1
        return {
            st.name: sharing[st.request.rate_class]
            / self._limiters[st.request.rate_class].requests_per_second
            for st in self.streams
        }

    def _due(self, stream: PolledStream, started: float, sent_at: float | None) -> float:
        """When ``stream`` could poll again anyway (event-loop time): ``interval_s`` after
        this poll started, and not before its share of the rate-limit budget after this
        request went out. A group commit holds a poll no longer than that."""
        due = started + stream.interval_s
        if sent_at is not None:
            due = max(due, sent_at + self._shares.get(stream.name, 0.0))
        return due

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

    def _stale(self) -> bool:
        """A Kafka failure since the last state re-read: memory may be behind Kafka."""
        return self._reloaded < self._failures

    async def _refresh_state(self) -> bool:
        """After Kafka failed: re-read state unless a re-read that started after every
        failure seen so far already did (the polls of one failed transaction, or several
        failures in a row, cost one re-read). No transaction runs meanwhile, so what is
        read is everything committed. False when the re-read failed (logged)."""
        async with self._committer.exclusive():
            if not self._stale():
                return True
            covers = self._failures
            try:
                await self._reload_state()
            except RetriableError as exc:
                log.warning("state reload failed (%s); will retry", exc)
                return False
            self._reloaded = covers
            return True

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

    async def _commit(
        self, stream: PolledStream, out: Sequence[OutRecord], state: Mapping[str, Any], due: float
    ) -> None:
        """One poll's records and state, committed atomically (with other polls' in one
        transaction); returns once committed, or raises what the transaction raised.
        ``due``: when its stream could poll again anyway (:meth:`_due`)."""
        if not out and not state:
            return
        await self._committer.submit(stream.name, out, state, due)

    async def _commit_group(self, group: Sequence[Submission]) -> None:
        """The committer's transaction: the records of every poll of the group in the
        order they were submitted, then the state entries that cover them; memory
        follows only after the commit."""
        out: list[OutRecord] = []
        state: dict[str, Any] = {}
        for sub in group:
            out.extend(sub.records)
            state.update(sub.state)  # each stream its own entries; "epoch" set below
        if self._state.get("epoch") != self._epoch or "epoch" in state:
            state["epoch"] = self._epoch
        out.extend(self._state_record(k, v) for k, v in state.items())
        try:
            await asyncio.to_thread(self.ctx.transactions.commit, out)
        except RetriableError:
            self._failures += 1  # once per failed transaction, however many polls it held
            raise
        self._state.update(state)

    # -- auth guard ------------------------------------------------------------------

    def _guard_blocked(self) -> bool:
        return self._guard is not None and self._guard.blocked

    async def _wait_for_guard(self) -> None:
        while self._guard_blocked() and not self.ctx.stop.is_set():
            self._guard_reopened.clear()
            await wait_for_event(self._guard_reopened, 1.0)

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
            if self._stale() and not await self._refresh_state():
                # Never poll on state that may be behind Kafka (a re-read failed).
                delay, from_now = schedule.failed(), True
            else:
                delay, from_now = await self._poll_and_schedule(stream, schedule)
            if from_now:
                started = loop.time()
            wait = Schedule.wait(started, delay, loop.time())
            if wait > 0:
                await wait_for_event(self.ctx.stop, wait)

    async def _poll_and_schedule(
        self, stream: PolledStream, schedule: Schedule
    ) -> tuple[float, bool]:
        """One poll, and the delay until the next: counted from the poll's start, or from
        now (True) after a failure."""
        try:
            error = await self._poll_once(stream)
        except RetriableError as exc:  # a Kafka transaction failed
            delay = schedule.failed()
            log.warning("%s: %s; retrying in %.1fs", stream.name, exc, delay)
            await self._refresh_state()
            return delay, True
        if error is None:
            return schedule.polled(), False
        if isinstance(error, RejectedError):
            problem = self.exchange.misconfigured(error)
            if problem is not None:
                raise FatalError(f"{stream.name}: {problem}")
            log.error("%s: the exchange refused the request: %s", stream.name, error)
            self.ctx.metrics.exchange_errors.labels(self.ctx.name, str(error.status)).inc()
            return schedule.refused(), False
        # no usable answer (network, 5xx, 429)
        delay = schedule.failed()
        log.warning("%s: %s; retrying in %.1fs", stream.name, error, delay)
        return delay, True

    async def _poll_once(self, stream: PolledStream) -> RetriableError | RejectedError | None:
        """One request and its transaction. Returns the exchange's failure (the loop
        backs off); raises RetriableError when a Kafka transaction failed."""
        assert self._calls is not None
        request = stream.request
        started = asyncio.get_running_loop().time()
        try:
            outcome = await self._calls.call(
                self._limiters[request.rate_class],
                functools.partial(self.exchange.call, request),
                signed=request.signed,
            )
        except RetriableError:  # the auth guard's own transaction failed
            self._failures += 1
            raise
        if outcome.error is not None:
            return outcome.error
        answer = outcome.value
        if outcome.refused or answer is None:
            return None
        now_ms = self._now_ms()
        due = self._due(stream, started, outcome.sent_at)
        if answer.error is not None:
            dead = self._dead_letter(stream, Dead(answer.text, answer.error), now_ms)
            await self._commit(stream, [dead], {}, due)
            return None
        try:
            rows = stream.rows(answer.payload)
        except BadMessage as exc:
            dead = self._dead_letter(stream, Dead(answer.text, exc), now_ms)
            await self._commit(stream, [dead], {}, due)
            return None
        # Only an answer of the documented shape counts as the exchange being there:
        # a run of HTML pages or error bodies must turn the poller not ready.
        self._last_ok = self._monotonic()
        out, state = self.records_of(stream, rows, now_ms)
        await self._commit(stream, out, state, due)
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
