"""The command sink: every exchange's order-command lifecycle, written once.

An exchange brings a :class:`CommandHandler`: its facts (topics, timings, rate-limit
class, where its auth guard lives, the result schema), a parser of command records,
and the calls that execute a command and reconcile one whose outcome is unknown.
This module does the rest, effect-once:

1. commands are consumed in a consumer group (read-committed), strictly one at a
   time; a record that cannot be parsed is dead-lettered, a command refused by the
   handler gets a ``rejected`` result;
2. a ``command_id`` whose ledger entry is final is a ``duplicate``; a command past
   its ``expires_at`` or ``command_max_age_s`` is ``expired``; a command that adds
   exposure is checked against the kill switch (read from the control topic right
   before) and the risk limits;
3. the ledger's ``pending`` entry (:mod:`connectors.runtime.ledger`) is committed in
   its own transaction *before* the exchange is called, after a re-read of the auth
   guard while the credentials are unproven in this process;
4. the handler executes the command through :class:`Calls` (guard, rate limit,
   stop); an answer that leaves the effect unknown (:class:`~.ledger.Ambiguous`), and
   a command found ``pending`` when consumed again (a crash around the call), is
   reconciled by the handler from the exchange's state, unless the handler says the
   command is idempotent (then it is sent again). Nothing else is ever sent twice;
5. the outcome (ledger), the result record and the consumed offset are one Kafka
   transaction: a command is done exactly when its result is visible.

Also here: pause and the kill switch from the control topic, the consumer-lag gauge,
health (``consumer``: partitions assigned; ``kafka_group``: the group coordinator
answers; ``auth``: the guard lets requests through), and stop: SIGTERM interrupts
waits, leaves a command in flight pending (reconciled at the next start) and ends
within ``runtime.drain_timeout_s``.

Concurrency: commands are handled strictly one at a time, so the whole loop
(consumer, exchange calls, transactions) runs in one worker thread with blocking
calls; the event loop only runs the runtime (health, signals) and waits for it.
Record timestamps: a result's and a ledger entry's are the time they were decided
(written); a dead letter's is the time its record was received.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from connectors.runtime import ledger, records
from connectors.runtime.authguard import AuthGuard, GuardRefused, GuardSpec, publish, report_blocked
from connectors.runtime.backoff import Backoff
from connectors.runtime.context import RuntimeContext
from connectors.runtime.errors import BadMessage, FatalError, RetriableError
from connectors.runtime.guarded import GuardedCalls, ResetWatcher, guard_reader, open_guard
from connectors.runtime.kafka import group_poll, group_reachable
from connectors.runtime.ledger import (
    Ambiguous,
    Command,
    CommandRefused,
    Control,
    Decision,
    Exposure,
    Facts,
    Ledger,
    Outcome,
    Risk,
    RiskLimits,
)
from connectors.runtime.polling import RateClass
from connectors.runtime.ratelimit import RateLimiter
from connectors.runtime.records import OutRecord
from connectors.runtime.state import read_state

log = logging.getLogger(__name__)

COMPACTED = {"cleanup.policy": "compact"}
#: Why nothing is sent while the auth guard refuses (ends the guard's log line).
GUARD_NOTE = "Commands wait in Kafka."
T = TypeVar("T")
C = TypeVar("C", bound=Command)


class Stopping(Exception):
    """Stop was requested mid-command, or the auth guard refused before a call: the
    command is left (pending or not started) for next time. Handlers let it pass."""


@dataclass(frozen=True)
class CommandTopics:
    commands: str
    results: str
    #: Compacted, keyed by command_id: pending before the exchange call, outcome after.
    ledger: str
    dead_letter: str
    #: Compacted: ``{"trading_enabled": false}`` / ``{"paused": true}`` from operators.
    control: str


@dataclass(frozen=True)
class SinkSettings:
    """The timing and limits of one command sink (from the exchange's config)."""

    group_id: str
    rate: RateClass
    #: The ``endpoint_class`` label of the sink's rate-limit waits.
    rate_class: str = "other"
    max_poll_interval_ms: int = 300_000
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    #: A command older than this when consumed is ``expired``; 0 = never.
    command_max_age_s: float = 60.0
    #: The kill switch's position at start (the control topic can flip it).
    trading_enabled: bool = True
    risk: RiskLimits = field(default_factory=RiskLimits)
    #: While the auth guard refuses, re-read it this often (an operator reset).
    guard_recheck_s: float = 5.0
    #: Bound on the worker's stop after SIGTERM (``runtime.drain_timeout_s``).
    drain_timeout_s: float = 10.0


class Calls(Protocol):
    """What the runtime lends a handler while it runs one command (worker thread)."""

    def call(self, send: Callable[[], T]) -> T:
        """One signed exchange call: through the auth guard and the rate limiter.
        Raises :class:`Stopping` before sending when stopping or when the guard
        refuses; otherwise returns or raises what ``send`` did (the guard recorded it)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait; raises :class:`Stopping` when stop is requested meanwhile."""
        ...

    def claimed(self, cmd: Command, facts: Facts, since_ms: int) -> int:
        """Other commands of the same action and facts accepted since ``since_ms``:
        orders a reconciliation finds may be theirs (:meth:`.ledger.Ledger.claimed`)."""
        ...


class CommandHandler(Protocol[C]):
    """What one exchange gives the command sink: facts, and validate / execute /
    reconcile. Everything blocking runs in the sink's worker thread."""

    @property
    def name(self) -> str:
        """The connector's name: the dead letters' ``source``."""
        ...

    @property
    def exchange(self) -> str:
        """The dead letters' ``exchange``."""
        ...

    @property
    def topics(self) -> CommandTopics: ...

    @property
    def settings(self) -> SinkSettings: ...

    @property
    def transactional_id(self) -> str:
        """One per account: Kafka fences an older instance with the same id."""
        ...

    @property
    def actions(self) -> Sequence[str]:
        """Every :attr:`~.ledger.Command.action` (their metrics exist from the start)."""
        ...

    @property
    def result_schema(self) -> str:
        """The ``schema`` header of result records."""
        ...

    def guard_spec(self) -> GuardSpec:
        """Where the auth guard of its credentials lives."""
        ...

    def attach(self, ctx: RuntimeContext) -> None:
        """Called once in the worker thread before the first command (open the client)."""
        ...

    def close(self) -> None: ...

    def parse(self, raw: bytes | None) -> C:
        """A record value → a command. Pure. Raises BadMessage (no usable command id:
        dead-lettered) or :class:`~.ledger.CommandRefused` (a ``rejected`` result)."""
        ...

    def exposure(self, cmd: C) -> Exposure | None:
        """What ``cmd`` adds to the account's risk; None (e.g. a cancel): the kill
        switch and the risk limits do not apply to it."""
        ...

    def facts(self, cmd: C) -> Facts:
        """What the ledger records about ``cmd`` (and reconciliation matches on)."""
        ...

    def idempotent(self, cmd: C) -> bool:
        """Whether sending ``cmd`` twice does no harm (a cancel by id): found pending
        at start, it is sent again instead of reconciled."""
        ...

    def exchange_time_ms(self) -> int:
        """Now on the exchange's clock (the ledger's ``pending_at_ms``: reconciliation
        compares it with the exchange's own times)."""
        ...

    def execute(self, cmd: C, pending_at_ms: int, calls: Calls) -> Decision | Ambiguous:
        """Send ``cmd`` (retrying what certainly did not reach the exchange) and say
        how it ended, or that its effect is unknown (never send it again then)."""
        ...

    def reconcile(
        self, cmd: C, pending_at_ms: int, ambiguous: Ambiguous | None, calls: Calls
    ) -> Decision:
        """Decide a command of unknown effect from the exchange's state: after
        ``ambiguous``, or found pending since ``pending_at_ms`` at start (None)."""
        ...

    def result(
        self,
        cmd: C | None,
        command_id: str,
        decision: Decision,
        received_at_ms: int,
        decided_at_ms: int,
        source: Mapping[str, Any],
    ) -> Mapping[str, Any]:
        """The result record's value (JSON-ready); ``cmd`` is None for a refused one."""
        ...


class ControlReader:
    """Follows the compacted control topic (kill switch, pause)."""

    def __init__(self, ctx: RuntimeContext, topic: str) -> None:
        self._consumer = KafkaConsumer(
            **ctx.kafka.client_config(KafkaConsumer),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            fetch_max_wait_ms=100,
        )
        parts = self._consumer.partitions_for_topic(topic) or {0}
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning(*tps)

    def changes(self, timeout_ms: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for recs in self._consumer.poll(timeout_ms=timeout_ms).values():
            for rec in recs:
                try:
                    value = json.loads(rec.value or b"{}")
                except ValueError:
                    log.error("control record at offset %d is not JSON; ignored", rec.offset)
                    continue
                if isinstance(value, dict):
                    out.append(value)
        return out

    def close(self) -> None:
        self._consumer.close()


class CommandSink(Generic[C]):
    """The connector the runtime runs for any :class:`CommandHandler`."""

    def __init__(
        self,
        handler: CommandHandler[C],
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.handler = handler
        self.settings = handler.settings
        self._clock = clock
        self._monotonic = monotonic
        self.control = Control(trading_enabled=self.settings.trading_enabled)
        self._risk = Risk(self.settings.risk)
        self._ledger = Ledger()
        self._committed: dict[TopicPartition, int] = {}
        self._stop = threading.Event()
        self._guard: AuthGuard | None = None
        self._assigned = False
        self._group_ok = True

    @property
    def transactional_id(self) -> str:
        return self.handler.transactional_id

    def topics(self) -> dict[str, dict[str, str]]:
        t = self.handler.topics
        return {
            t.commands: {},
            t.results: {},
            t.dead_letter: {},
            t.ledger: dict(COMPACTED),
            t.control: dict(COMPACTED),
            self.guard_spec().topic: dict(COMPACTED),
        }

    def guard_spec(self) -> GuardSpec:
        return self.handler.guard_spec()

    # -- run -------------------------------------------------------------------------

    async def run(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx
        m = ctx.metrics
        name = ctx.name
        self._m_trading = m.trading_enabled.labels(name)
        self._m_paused = m.paused.labels(name)
        self._m_in_flight = m.commands_in_flight.labels(name)
        # The paging alerts watch these; they exist at 0 so the first one counts.
        for action in self.handler.actions:
            m.commands.labels(name, action, Outcome.UNKNOWN.value)
        for found in ledger.FOUND:
            m.reconciliations.labels(name, found)
        ctx.health.add_check("consumer", lambda: self._assigned)
        # Idle or paused, the sink writes nothing, so a failed commit cannot tell it
        # that Kafka is gone: its group coordinator can (lost ~request_timeout_ms after
        # the broker stops answering).
        ctx.health.add_check("kafka_group", lambda: self._group_ok)
        ctx.health.add_check("auth", lambda: not self._guard_blocked())
        worker = asyncio.ensure_future(asyncio.to_thread(self._run_blocking))
        stop = asyncio.ensure_future(ctx.stop.wait())
        try:
            await asyncio.wait({worker, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._stop.set()
            stop.cancel()
            # Every wait in the worker has its own deadline (HTTP calls, Kafka commits,
            # reads); this one bounds their sum, so SIGTERM ends the process in time.
            grace = self.settings.drain_timeout_s
            done, _ = await asyncio.wait({worker}, timeout=grace)
        if not done:
            raise FatalError(
                f"the command worker did not stop within runtime.drain_timeout_s "
                f"({grace:g} s); a command it was handling stays pending in the ledger "
                "and is reconciled at the next start"
            )
        worker.result()

    # -- the loop (worker thread) ------------------------------------------------------

    def _run_blocking(self) -> None:
        s = self.settings
        ctx = self.ctx
        m = ctx.metrics
        self.handler.attach(ctx)
        try:
            self._limiter = RateLimiter(
                s.rate.limit,
                margin=s.rate.margin,
                share=s.rate.share,
                on_wait=m.rate_limit_observer(ctx.name, s.rate_class),
                clock=self._clock,
            )
            self._load_ledger()
            spec = self.guard_spec()
            self._guard = open_guard(ctx, spec, self.transactional_id, self._now_ms)
            self._calls = GuardedCalls(self._guard, m, ctx.name, note=GUARD_NOTE)
            self._watcher = ResetWatcher(
                self._guard, guard_reader(ctx, spec), m, ctx.name, s.guard_recheck_s
            )
            publish(self._guard, m, ctx.name)
            if self._guard.blocked:
                report_blocked(self._guard, m, ctx.name, GUARD_NOTE)
            control = ControlReader(ctx, self.handler.topics.control)
            consumer = self._consumer()
            try:
                self._apply_control(control.changes(timeout_ms=500))
                self._loop(consumer, control)
            finally:
                self._assigned = False
                consumer.close(autocommit=False)
                control.close()
        finally:
            self.handler.close()

    def _consumer(self) -> KafkaConsumer:
        s = self.settings
        consumer = KafkaConsumer(
            **self.ctx.kafka.client_config(KafkaConsumer),
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=20,
            max_poll_interval_ms=s.max_poll_interval_ms,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
        )
        consumer.subscribe([self.handler.topics.commands])
        return consumer

    def _load_ledger(self) -> None:
        self._ledger = Ledger.read(read_state(self.ctx.kafka, self.handler.topics.ledger))
        pending = self._ledger.pending_ids()
        self._m_in_flight.set(len(pending))
        if pending:
            log.warning(
                "%d command(s) are pending from an earlier run; they are reconciled when "
                "consumed again",
                len(pending),
            )

    def _loop(self, consumer: KafkaConsumer, control: ControlReader) -> None:
        idle = Backoff(initial_s=0.2, cap_s=2.0)
        while not self._stop.is_set():
            self._apply_control(control.changes(timeout_ms=0))
            if self.control.paused or self._guard_blocked():
                self._hold(consumer)
                if self._guard_blocked():
                    self._watcher.look_if_due()
                continue
            try:
                batch = group_poll(consumer, 200, self._stop.wait)
            except KafkaError as exc:
                log.warning("consumer poll failed: %r", exc)
                time.sleep(idle.next_delay())
                continue
            self._assigned = bool(consumer.assignment())
            self._group_ok = group_reachable(consumer)
            self._refresh_committed(consumer)
            for tp, recs in batch.items():
                for rec in recs:
                    if self._stop.is_set() or self.control.paused or self._guard_blocked():
                        # Not handled: read it again when work resumes.
                        consumer.seek(tp, rec.offset)
                        break
                    try:
                        self._handle(rec, consumer, control)
                    except Stopping:
                        consumer.seek(tp, rec.offset)
                        break
                    except RetriableError as exc:
                        # A Kafka transaction failed; the ledger may or may not hold
                        # what was written. Re-read it and handle the record again.
                        log.warning("command at %s:%d: %s; retrying", tp, rec.offset, exc)
                        consumer.seek(tp, rec.offset)
                        time.sleep(idle.next_delay())
                        self._reload_after_failure()
                        break
            self._update_lag(consumer)

    def _guard_blocked(self) -> bool:
        return self._guard is not None and self._guard.blocked

    def _hold(self, consumer: KafkaConsumer) -> None:
        """Paused: keep the group membership and the high-water marks fresh (for the
        lag gauge), hand nothing out, and read the same records again later."""
        try:
            batch = group_poll(consumer, 500, self._stop.wait)
        except KafkaError as exc:
            log.warning("consumer poll failed: %r", exc)
            time.sleep(0.5)
            return
        self._assigned = bool(consumer.assignment())
        self._group_ok = group_reachable(consumer)
        self._refresh_committed(consumer)
        for tp, recs in batch.items():
            if recs:
                consumer.seek(tp, recs[0].offset)
        self._update_lag(consumer)
        if batch:
            # Put back: the next poll would fetch them again at once. Rest first, so
            # holding is not a fetch loop at full speed.
            self._stop.wait(0.5)

    def _reload_after_failure(self) -> None:
        try:
            self.ctx.transactions.start()
            self._load_ledger()
        except RetriableError as exc:
            log.warning("ledger reload failed: %s", exc)

    def _refresh_committed(self, consumer: KafkaConsumer) -> None:
        for tp in consumer.assignment():
            if tp not in self._committed:
                try:
                    offset = consumer.committed(tp)
                except KafkaError:
                    continue
                self._committed[tp] = offset or 0

    def _update_lag(self, consumer: KafkaConsumer) -> None:
        lag = self.ctx.metrics.consumer_lag
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is None or tp not in self._committed:
                continue
            lag.labels(self.ctx.name, tp.topic, str(tp.partition)).set(
                max(0, high - self._committed[tp])
            )

    def _apply_control(self, changes: list[dict[str, Any]]) -> None:
        self.control.apply(changes)
        self._m_trading.set(1 if self.control.trading_enabled else 0)
        self._m_paused.set(1 if self.control.paused else 0)

    # -- one command -----------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _handle(self, rec: Any, consumer: KafkaConsumer, control: ControlReader) -> None:
        received_ms = self._now_ms()
        tp = TopicPartition(rec.topic, rec.partition)
        offsets = {tp: rec.offset + 1}
        source = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
        done = functools.partial(
            self._finish, received_ms=received_ms, source=source, offsets=offsets, consumer=consumer
        )
        try:
            cmd = self.handler.parse(rec.value)
        except BadMessage as exc:
            self._dead_letter(rec, exc, received_ms, offsets, consumer)
            return
        except CommandRefused as exc:
            out = Decision(Outcome.REJECTED, exc.reason, exc.detail)
            # An unsigned or forged command must not claim a command id, and a bad
            # command must not overwrite the ledger entry of a real one with its id.
            claim = (
                exc.command_id is not None and exc.trusted and exc.command_id not in self._ledger
            )
            done(None, exc.command_id or "", out, claim)
            return
        entry = self._ledger.get(cmd.command_id)
        if entry is not None and entry.get("state") == ledger.FINAL:
            out = Decision(Outcome.DUPLICATE, f"already_{entry.get('outcome', 'decided')}")
            done(cmd, cmd.command_id, out, False)
            return
        if entry is not None:  # pending: an earlier run died around the exchange call
            out = self._resume(cmd, entry)
        else:
            out = self._decide(cmd, received_ms, control)
        done(cmd, cmd.command_id, out, True)

    def _decide(self, cmd: C, received_ms: int, control: ControlReader) -> Decision:
        reason = ledger.expired(cmd, received_ms, self._max_age_ms())
        if reason is not None:
            return Decision(Outcome.EXPIRED, reason, "not executed: the command is too old")
        exposure = self.handler.exposure(cmd)
        if exposure is not None:
            # The kill switch is read right before each new order, so a flip takes
            # effect by the next command.
            self._apply_control(control.changes(timeout_ms=25))
            if not self.control.trading_enabled:
                return Decision(
                    Outcome.REJECTED, "kill_switch", "trading is disabled by the kill switch"
                )
            risk = self._risk.check(exposure, self._monotonic())
            if risk is not None:
                return risk
        self._admit()
        pending_at = self._pending(cmd)
        return self._settle(cmd, pending_at, self.handler.execute(cmd, pending_at, self))

    def _resume(self, cmd: C, entry: Mapping[str, Any]) -> Decision:
        """A command found pending: the previous run may or may not have called."""
        pending_at = int(entry.get("pending_at_ms") or self._now_ms())
        if self.handler.idempotent(cmd):
            # Sending it again is safe: if the previous run did make the call, the
            # exchange's answer says so (e.g. the order is already gone).
            log.warning(
                "%s %s was pending at restart; sending it again", cmd.action, cmd.command_id
            )
            return self._settle(cmd, pending_at, self.handler.execute(cmd, pending_at, self))
        log.warning("command %s was pending at restart; reconciling", cmd.command_id)
        return self._counted(self.handler.reconcile(cmd, pending_at, None, self))

    def _settle(self, cmd: C, pending_at: int, done: Decision | Ambiguous) -> Decision:
        """An answer of unknown effect is reconciled, never sent again."""
        if isinstance(done, Ambiguous):
            log.warning(
                "%s %s: outcome unknown (%s); reconciling", cmd.action, cmd.command_id, done.why
            )
            return self._counted(self.handler.reconcile(cmd, pending_at, done, self))
        return self._counted(done)

    def _counted(self, out: Decision) -> Decision:
        if out.found is not None:
            self.ctx.metrics.reconciliations.labels(self.ctx.name, out.found).inc()
        return out

    def _max_age_ms(self) -> int | None:
        age = self.settings.command_max_age_s
        return int(age * 1000) if age > 0 else None

    def _admit(self) -> None:
        """Before a command claims the ledger: until the credentials were accepted in
        this process, re-read the shared guard (the poller may have spent the budget
        since this sink started) and leave the command in Kafka if it refuses."""
        guard = self._guard
        assert guard is not None
        if guard.verified:
            return
        guard.refresh()
        publish(guard, self.ctx.metrics, self.ctx.name)
        if guard.blocked:
            report_blocked(guard, self.ctx.metrics, self.ctx.name, GUARD_NOTE)
            raise Stopping

    def _pending(self, cmd: C) -> int:
        """Commit the ledger's ``pending`` entry; returns its time (exchange clock)."""
        pending_at = self.handler.exchange_time_ms()
        entry = Ledger.pending(cmd, self.handler.facts(cmd), pending_at)
        self.ctx.transactions.commit([self._ledger_record(cmd.command_id, entry)])
        self._ledger.put(cmd.command_id, entry)
        self._m_in_flight.inc()
        return pending_at

    def _ledger_record(self, command_id: str, entry: Mapping[str, Any]) -> OutRecord:
        return ledger.record(self.handler.topics.ledger, command_id, entry, self._now_ms())

    # -- Calls (lent to the handler) -------------------------------------------------

    def call(self, send: Callable[[], T]) -> T:
        if self._stop.is_set():
            raise Stopping
        try:
            return self._calls.call_blocking(self._limiter, send)
        except GuardRefused:
            # No request was sent: another process with these credentials spent the
            # budget (reported). The command waits in Kafka like every other.
            raise Stopping from None

    def sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Stopping

    def claimed(self, cmd: Command, facts: Facts, since_ms: int) -> int:
        return self._ledger.claimed(cmd.command_id, cmd.action, facts, since_ms)

    # -- results ---------------------------------------------------------------------

    def _finish(
        self,
        cmd: C | None,
        command_id: str,
        out: Decision,
        record_in_ledger: bool,
        *,
        received_ms: int,
        source: dict[str, Any],
        offsets: dict[TopicPartition, int],
        consumer: KafkaConsumer,
    ) -> None:
        """Ledger outcome + result + consumed offset, in one transaction."""
        decided_ms = self._now_ms()
        result = self.handler.result(cmd, command_id, out, received_ms, decided_ms, source)
        batch = [
            OutRecord(
                topic=self.handler.topics.results,
                key=command_id.encode() or None,
                value=json.dumps(result, separators=(",", ":")).encode(),
                headers=[
                    ("content-type", records.CONTENT_TYPE),
                    ("schema", self.handler.result_schema.encode()),
                ],
                timestamp_ms=decided_ms,
                channel="result",
            )
        ]
        entry: dict[str, Any] | None = None
        was_pending = False
        if record_in_ledger and command_id and out.outcome != Outcome.DUPLICATE:
            previous = self._ledger.get(command_id)
            was_pending = previous is not None and previous.get("state") == ledger.PENDING
            facts = self.handler.facts(cmd) if cmd is not None else None
            entry = self._ledger.final(command_id, cmd, facts, out, decided_ms)
            batch.append(self._ledger_record(command_id, entry))
        self.ctx.transactions.commit(batch, offsets, consumer)
        if entry is not None:
            self._ledger.put(command_id, entry)
            if was_pending:
                self._m_in_flight.dec()
        for tp, off in offsets.items():
            self._committed[tp] = off
        m = self.ctx.metrics
        action = cmd.action if cmd is not None else "unknown"
        m.commands.labels(self.ctx.name, action, out.outcome).inc()
        if cmd is not None:
            m.command_latency.labels(self.ctx.name, action).observe(
                max(0.0, (decided_ms - cmd.created_at_ms) / 1000)
            )
        log.info(
            "command %s: %s%s",
            command_id or "?",
            out.outcome,
            f" ({out.reason})" if out.reason else "",
        )

    def _dead_letter(
        self,
        rec: Any,
        exc: BadMessage,
        received_ms: int,
        offsets: dict[TopicPartition, int],
        consumer: KafkaConsumer,
    ) -> None:
        dl = records.dead_letter(
            topic=self.handler.topics.dead_letter,
            raw=rec.value if rec.value is not None else b"",
            reason=exc.reason,
            detail=exc.detail,
            exchange=self.handler.exchange,
            receive_time_ms=received_ms,
            source=self.handler.name,
            key=rec.key,
            extra_headers=[
                ("source.topic", rec.topic.encode()),
                ("source.partition", str(rec.partition).encode()),
                ("source.offset", str(rec.offset).encode()),
            ],
        )
        self.ctx.transactions.commit([dl], offsets, consumer)
        for tp, off in offsets.items():
            self._committed[tp] = off
        self.ctx.metrics.dead_letters.labels(self.ctx.name, exc.reason).inc()
        log.warning("dead-lettered the record at %s:%d: %s", rec.topic, rec.offset, exc.reason)
