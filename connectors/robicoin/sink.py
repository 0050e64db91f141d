"""Robicoin order-command sink: Kafka commands → create-order / delete-order, effect-once.

create-order returns no order id and takes no client id, so an ambiguous failure
(timeout, reset after sending, 5xx) leaves the outcome unknown. The design:

1. A ledger in a compacted topic keyed by ``command_id``. ``pending`` is committed
   *before* the exchange is called; the outcome after. A command id with a final
   entry is never sent again (``duplicate``).
2. After an ambiguous failure, and for every command found ``pending`` when it is
   consumed again (a crash between the call and the outcome), the sink reconciles:
   it reads open-order and transaction and looks for the order (pair, side, amount,
   price, time window). Found → ``accepted``; provably absent → ``failed``
   (``not_placed``); otherwise ``unknown``, which is never retried automatically.
3. The outcome, the result record and the consumed offset are one Kafka transaction,
   so a command is done exactly when its result is visible.

Concurrency: commands are handled strictly one at a time, so the whole loop
(consumer, exchange calls, transactions) runs in one worker thread with blocking
calls; the event loop only runs the runtime (health, signals) and waits for it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import requests
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from connectors.robicoin import commands as cmds
from connectors.robicoin import protocol, signing
from connectors.robicoin.client import (
    Answer,
    Credentials,
    RequestFailed,
    RobicoinClient,
)
from connectors.robicoin.config import credential_fingerprint
from connectors.robicoin.sink_config import OrderSinkConfig
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
from connectors.runtime.kafka import OutRecord, group_poll, group_reachable
from connectors.runtime.logs import redact, register_secret
from connectors.runtime.ratelimit import RateLimit, RateLimiter, Share
from connectors.runtime.state import read_state

log = logging.getLogger(__name__)

NAME = "robicoin-orders"
COMPACTED = {"cleanup.policy": "compact"}
#: Exchange times have one-second resolution and clocks differ a little.
RECONCILE_SLACK_MS = 2_000
RECONCILE_READS = 5


class _Stopping(Exception):
    """Stop was requested mid-command, or the auth guard refused before a call: leave
    the command (pending or not started) for next time."""


@dataclass(frozen=True)
class Outcome:
    outcome: str
    reason: str | None = None
    message: str | None = None
    reconciled: bool = False
    attempts: int = 0
    exchange_ms: int | None = None
    data_id: int | None = None


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


class RobicoinOrderSink:
    def __init__(
        self,
        config: OrderSinkConfig,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        s = config.robicoin
        self.settings = s
        self._clock = clock
        self._zone = ZoneInfo(s.timezone)
        creds = s.credentials.resolve(required=True)
        assert creds is not None
        self.credentials: Credentials = creds
        for value in signing.secret_values(creds.public_key, creds.public_id, creds.private_key):
            register_secret(value)
        hmac_secret = s.command_auth.resolve()
        if hmac_secret:
            register_secret(hmac_secret.decode("utf-8", "replace"))
        self.policy = cmds.Policy(
            pairs=frozenset(s.pairs),
            max_decimals=s.max_decimals,
            hmac_secret=hmac_secret,
            require_signature=s.command_auth.required,
        )
        self.fingerprint = credential_fingerprint(creds)
        self.transactional_id = s.transactional_id or f"{NAME}-{self.fingerprint}"
        self._session = session
        self._max_notional = Decimal(s.risk.max_notional) if s.risk.max_notional else None
        self._max_amount = {p: Decimal(v) for p, v in s.risk.max_amount.items()}
        self.trading_enabled = s.risk.trading_enabled
        self.paused = False
        self._ledger: dict[str, dict[str, Any]] = {}
        self._recent_creates: collections.deque[float] = collections.deque()
        self._committed: dict[TopicPartition, int] = {}
        self._stop = threading.Event()
        self._guard: AuthGuard | None = None
        self._assigned = False
        self._group_ok = True

    # -- wiring ----------------------------------------------------------------------

    def topics(self) -> dict[str, dict[str, str]]:
        t = self.settings.topics
        return {
            t.commands: {},
            t.results: {},
            t.dead_letter: {},
            t.ledger: dict(COMPACTED),
            t.control: dict(COMPACTED),
            self.settings.auth_guard.topic: dict(COMPACTED),
        }

    def guard_spec(self) -> GuardSpec:
        g = self.settings.auth_guard
        return GuardSpec(g.topic, self.fingerprint, g.limit)

    async def run(self, ctx: RuntimeContext) -> None:
        self.ctx = ctx
        m = ctx.metrics
        name = ctx.name
        self._m_trading = m.trading_enabled.labels(name)
        self._m_paused = m.paused.labels(name)
        self._m_in_flight = m.commands_in_flight.labels(name)
        # The paging alerts watch these; they exist at 0 so the first one counts.
        for action in ("create", "delete"):
            m.commands.labels(name, action, cmds.Outcome.UNKNOWN.value)
        for found in ("found", "not_found", "undecided"):
            m.reconciliations.labels(name, found)
        ctx.health.add_check("consumer", lambda: self._assigned)
        # Idle or paused, the sink writes nothing, so a failed commit cannot tell it
        # that Kafka is gone: its group coordinator can (lost ~request_timeout_ms after
        # the broker stops answering).
        ctx.health.add_check("kafka_group", lambda: self._group_ok)
        ctx.health.add_check("auth", lambda: not (self._guard and self._guard.blocked))
        worker = asyncio.ensure_future(asyncio.to_thread(self._run_blocking))
        stop = asyncio.ensure_future(ctx.stop.wait())
        try:
            await asyncio.wait({worker, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._stop.set()
            stop.cancel()
            # Every wait in the worker has its own deadline (HTTP calls, Kafka commits,
            # reads); this one bounds their sum, so SIGTERM ends the process in time.
            grace = self.config.runtime.drain_timeout_s
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
        m = self.ctx.metrics
        self.client = RobicoinClient(
            s.base_url,
            self.credentials,
            session=self._session,
            timeout_s=s.request_timeout_s,
            connect_timeout_s=s.connect_timeout_s,
            clock=self._clock,
            on_answer=self._on_answer,
        )
        self.limiter = RateLimiter(
            RateLimit(s.rate_limit.other.count, s.rate_limit.other.window_s),
            margin=s.rate_limit.margin_for(shared=s.rate_limit.share.slots > 1),
            share=Share(s.rate_limit.share.slots, s.rate_limit.share.slot),
            on_wait=m.rate_limit_observer(self.ctx.name, "other"),
            clock=self._clock,
        )
        self._load_ledger()
        spec = self.guard_spec()
        self._guard = AuthGuard(
            spec,
            self.transactional_id,
            read_state(self.ctx.kafka, spec.topic),
            functools.partial(read_state, self.ctx.kafka, spec.topic),
            self.ctx.transactions.commit,
            self._now_ms,
        )
        publish(self._guard, m, self.ctx.name)
        if self._guard.blocked:
            report_blocked(self._guard, m, self.ctx.name, "Commands wait in Kafka.")
        control = ControlReader(self.ctx, s.topics.control)
        consumer = self._consumer()
        try:
            self._apply_control(control.changes(timeout_ms=500))
            self._loop(consumer, control)
        finally:
            self._assigned = False
            consumer.close(autocommit=False)
            control.close()
            self.client.close()

    def _consumer(self) -> KafkaConsumer:
        c = self.settings.consumer
        consumer = KafkaConsumer(
            **self.ctx.kafka.client_config(KafkaConsumer),
            group_id=c.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_poll_records=20,
            max_poll_interval_ms=c.max_poll_interval_ms,
            session_timeout_ms=c.session_timeout_ms,
            heartbeat_interval_ms=c.heartbeat_interval_ms,
        )
        consumer.subscribe([self.settings.topics.commands])
        return consumer

    def _load_ledger(self) -> None:
        state = read_state(self.ctx.kafka, self.settings.topics.ledger)
        self._ledger = {}
        for key, raw in state.items():
            if raw is None:
                continue
            try:
                self._ledger[key.decode()] = json.loads(raw)
            except ValueError:
                # Unreadable: treat the command as decided so it is never sent again.
                self._ledger[key.decode()] = {"state": "final", "outcome": "unknown"}
        pending = [k for k, v in self._ledger.items() if v.get("state") == "pending"]
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
            if self.paused or (self._guard is not None and self._guard.blocked):
                self._hold(consumer)
                if self._guard is not None and self._guard.blocked:
                    self._check_guard_reset()
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
                    if self._stop.is_set() or self.paused or self._guard_blocked():
                        # Not handled: read it again when work resumes.
                        consumer.seek(tp, rec.offset)
                        break
                    try:
                        self._handle(rec, consumer, control)
                    except _Stopping:
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

    # -- control ---------------------------------------------------------------------

    def _apply_control(self, changes: list[dict[str, Any]]) -> None:
        for change in changes:
            who = str(change.get("by", "?"))[:60]
            why = str(change.get("reason", ""))[:200]
            if isinstance(change.get("trading_enabled"), bool):
                if change["trading_enabled"] != self.trading_enabled:
                    log.warning(
                        "kill switch: trading %s by %s (%s)",
                        "enabled" if change["trading_enabled"] else "DISABLED",
                        who,
                        why,
                    )
                self.trading_enabled = change["trading_enabled"]
            if isinstance(change.get("paused"), bool):
                if change["paused"] != self.paused:
                    log.warning(
                        "sink %s by %s (%s)", "paused" if change["paused"] else "resumed", who, why
                    )
                self.paused = change["paused"]
        self._m_trading.set(1 if self.trading_enabled else 0)
        self._m_paused.set(1 if self.paused else 0)

    # -- one command -----------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _handle(self, rec: Any, consumer: KafkaConsumer, control: ControlReader) -> None:
        received_ms = self._now_ms()
        tp = TopicPartition(rec.topic, rec.partition)
        offsets = {tp: rec.offset + 1}
        source = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset}
        try:
            cmd = cmds.parse_command(rec.value, self.policy)
        except BadMessage as exc:
            self._dead_letter(rec, exc, received_ms, offsets, consumer)
            return
        except cmds.Rejected as exc:
            out = Outcome("rejected", exc.reason, exc.detail)
            # An unsigned or forged command must not claim a command id, and a bad
            # command must not overwrite the ledger entry of a real one with its id.
            claim = (
                exc.command_id is not None
                and exc.reason not in ("unsigned", "bad_signature")
                and exc.command_id not in self._ledger
            )
            self._finish(
                None, exc.command_id or "", out, received_ms, source, offsets, consumer, claim
            )
            return
        entry = self._ledger.get(cmd.command_id)
        if entry is not None and entry.get("state") == "final":
            out = Outcome("duplicate", f"already_{entry.get('outcome', 'decided')}")
            self._finish(cmd, cmd.command_id, out, received_ms, source, offsets, consumer, False)
            return
        if entry is not None:  # pending: an earlier run died around the exchange call
            out = self._resume(cmd, entry)
        else:
            out = self._decide(cmd, received_ms, control)
        self._finish(cmd, cmd.command_id, out, received_ms, source, offsets, consumer, True)

    def _decide(self, cmd: cmds.Command, received_ms: int, control: ControlReader) -> Outcome:
        reason = cmds.expired(cmd, received_ms, self._max_age_ms())
        if reason is not None:
            return Outcome("expired", reason, "not executed: the command is too old")
        if isinstance(cmd, cmds.CreateOrder):
            # The kill switch is read right before each new order, so a flip takes
            # effect by the next command.
            self._apply_control(control.changes(timeout_ms=25))
            if not self.trading_enabled:
                return Outcome("rejected", "kill_switch", "trading is disabled by the kill switch")
            risk = self._risk(cmd)
            if risk is not None:
                return risk
        self._admit()
        pending_at = self._pending(cmd)
        if isinstance(cmd, cmds.CreateOrder):
            return self._create(cmd, pending_at)
        return self._delete(cmd)

    def _max_age_ms(self) -> int | None:
        age = self.settings.command_max_age_s
        return int(age * 1000) if age > 0 else None

    def _risk(self, cmd: cmds.CreateOrder) -> Outcome | None:
        value = cmds.notional(cmd)
        if self._max_notional is not None and value > self._max_notional:
            return Outcome(
                "rejected", "risk_max_notional", f"order value {value} above {self._max_notional}"
            )
        cap = self._max_amount.get(cmd.pair)
        if cap is not None and Decimal(cmd.amount) > cap:
            return Outcome("rejected", "risk_max_amount", f"amount above {cap} for {cmd.pair}")
        per_minute = self.settings.risk.max_orders_per_minute
        now = time.monotonic()
        while self._recent_creates and now - self._recent_creates[0] > 60:
            self._recent_creates.popleft()
        if per_minute and len(self._recent_creates) >= per_minute:
            return Outcome(
                "rejected", "risk_rate", f"more than {per_minute} new orders in a minute"
            )
        self._recent_creates.append(now)
        return None

    def _pending(self, cmd: cmds.Command) -> int:
        """Commit the ledger's ``pending`` entry; returns its time (exchange clock)."""
        pending_at = int((self._clock() + self.client.clock_offset_s) * 1000)
        entry: dict[str, Any] = {
            "state": "pending",
            "action": "create" if isinstance(cmd, cmds.CreateOrder) else "delete",
            "pair": cmd.pair,
            "pending_at_ms": pending_at,
        }
        if isinstance(cmd, cmds.CreateOrder):
            entry.update(side=cmd.side, amount=cmd.amount, price=cmd.price)
        else:
            entry["data_id"] = cmd.data_id
        self.ctx.transactions.commit([self._ledger_record(cmd.command_id, entry)])
        self._ledger[cmd.command_id] = entry
        self._m_in_flight.inc()
        return pending_at

    def _ledger_record(self, command_id: str, entry: Mapping[str, Any]) -> OutRecord:
        return OutRecord(
            topic=self.settings.topics.ledger,
            key=command_id.encode(),
            value=json.dumps(entry, separators=(",", ":"), sort_keys=True).encode(),
            timestamp_ms=self._now_ms(),
            channel="ledger",
        )

    # -- exchange calls --------------------------------------------------------------

    def _on_answer(self, endpoint: protocol.Endpoint, outcome: str, elapsed: float) -> None:
        self.ctx.metrics.observe_request(self.ctx.name, endpoint.family, outcome, elapsed)

    def _signed(self, endpoint: protocol.Endpoint, fields: Mapping[str, str] | None) -> Answer:
        """One signed call through the auth guard and the rate limiter."""
        guard = self._guard
        assert guard is not None
        if self._stop.is_set():
            raise _Stopping
        try:
            guard.before_request()
        except GuardRefused:
            # No request was sent: another process with these credentials spent the
            # budget. The command waits in Kafka like every other until a reset.
            report_blocked(guard, self.ctx.metrics, self.ctx.name, "Commands wait in Kafka.")
            raise _Stopping from None
        try:
            with self.limiter.slot_blocking():
                answer = self.client.call(endpoint, fields)
        except (AuthError, RequestFailed, RejectedError) as exc:
            guard.settle(exc)
            if isinstance(exc, AuthError):
                self.ctx.metrics.auth_failures.labels(self.ctx.name).inc()
                report_blocked(guard, self.ctx.metrics, self.ctx.name, "Commands wait in Kafka.")
            raise
        guard.settle(None)
        publish(guard, self.ctx.metrics, self.ctx.name)
        return answer

    def _create(self, cmd: cmds.CreateOrder, pending_at: int) -> Outcome:
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        attempts = 0
        spent = 0.0
        while True:
            attempts += 1
            started = time.monotonic()
            try:
                answer = self._signed(protocol.CREATE_ORDER, cmds.create_fields(cmd))
            except RequestFailed as exc:
                spent += time.monotonic() - started
                if exc.maybe_executed:
                    log.warning("create %s: outcome unknown (%s); reconciling", cmd.command_id, exc)
                    return self._reconcile(cmd, pending_at, attempts, int(spent * 1000))
                if attempts >= self.settings.max_send_attempts:
                    return Outcome(
                        "failed",
                        "exchange_unavailable",
                        str(exc),
                        False,
                        attempts,
                        int(spent * 1000),
                    )
                self._sleep(backoff.next_delay())
                continue
            except AuthError as exc:
                return Outcome("failed", "unauthorized", str(exc), False, attempts)
            except RejectedError as exc:
                return Outcome(
                    "failed",
                    "exchange_rejected",
                    exc.message,
                    False,
                    attempts,
                    int((time.monotonic() - started) * 1000),
                )
            spent += time.monotonic() - started
            payload = answer.payload
            if isinstance(payload, dict) and isinstance(payload.get("success"), str):
                return Outcome(
                    "accepted", None, payload["success"], False, attempts, int(spent * 1000)
                )
            if isinstance(payload, dict) and isinstance(payload.get("error"), str):
                return Outcome(
                    "failed",
                    "exchange_rejected",
                    payload["error"],
                    False,
                    attempts,
                    int(spent * 1000),
                )
            log.warning("create %s: unexpected answer; reconciling", cmd.command_id)
            return self._reconcile(cmd, pending_at, attempts, int(spent * 1000))

    def _delete(self, cmd: cmds.DeleteOrder) -> Outcome:
        """delete-order is idempotent on data_id: ambiguous failures are simply retried.
        Any other answer but the documented ``success`` (any 4xx that is not an auth
        failure, whatever its text; a 2xx without ``success``) decides nothing by
        itself: open-order does (:meth:`_confirm_delete`)."""
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        attempts = 0
        spent = 0.0
        while True:
            attempts += 1
            started = time.monotonic()
            try:
                answer = self._signed(protocol.DELETE_ORDER, cmds.delete_fields(cmd))
            except RequestFailed as exc:
                spent += time.monotonic() - started
                if attempts >= self.settings.max_send_attempts + 5:
                    return Outcome(
                        "unknown",
                        "exchange_unavailable",
                        str(exc),
                        False,
                        attempts,
                        int(spent * 1000),
                    )
                self._sleep(backoff.next_delay())
                continue
            except AuthError as exc:
                # Never "not found": no further signed request after an auth failure.
                return Outcome("failed", "unauthorized", str(exc), False, attempts)
            except RejectedError as exc:  # NotFoundError (404/405) included
                spent += time.monotonic() - started
                refusal = f"HTTP {exc.status}: {exc.message}"
                return self._confirm_delete(cmd, exc.message, refusal, attempts, spent)
            spent += time.monotonic() - started
            payload = answer.payload
            message = payload.get("success") if isinstance(payload, dict) else None
            if not isinstance(message, str):
                text = redact(protocol.error_message(answer.text))
                return self._confirm_delete(cmd, text, f"HTTP 2xx: {text}", attempts, spent)
            return Outcome(
                "accepted", None, message, False, attempts, int(spent * 1000), cmd.data_id
            )

    def _confirm_delete(
        self, cmd: cmds.DeleteOrder, message: str, refusal: str, attempts: int, spent: float
    ) -> Outcome:
        """A delete the exchange did not confirm: read open-order (signed, guarded,
        rate-limited) to learn whether the order is still there. Gone → ``accepted``
        (``already_gone``: a retry after a lost answer, a resume after a crash, or an
        order filled or cancelled before); still open → ``failed`` with the exchange's
        (redacted) ``message``; cannot tell → ``unknown``. It never sends the delete
        again: the exchange has answered it."""
        exchange_ms = int(spent * 1000)
        read = self._read_account(f"checking delete {cmd.command_id}", protocol.OPEN_ORDER)
        m = self.ctx.metrics.reconciliations
        if read is None:
            m.labels(self.ctx.name, "undecided").inc()
            why = f"delete-order answered {refusal}; open-order could not be read"
            return self._unknown_delete(cmd, why, attempts, exchange_ms)
        check = cmds.find_open(cmd, read[0])
        if check.state is cmds.OpenState.GONE:
            m.labels(self.ctx.name, "not_found").inc()
            log.info("delete %s: %s (%s): already gone", cmd.command_id, refusal, check.detail)
            return Outcome(
                "accepted", "already_gone", message, True, attempts, exchange_ms, cmd.data_id
            )
        if check.state is cmds.OpenState.OPEN:
            m.labels(self.ctx.name, "found").inc()
            log.warning("delete %s refused: %s (%s)", cmd.command_id, refusal, check.detail)
            return Outcome(
                "failed", "exchange_rejected", message, True, attempts, exchange_ms, cmd.data_id
            )
        m.labels(self.ctx.name, "undecided").inc()
        why = f"delete-order answered {refusal}; {check.detail}"
        return self._unknown_delete(cmd, why, attempts, exchange_ms)

    def _unknown_delete(
        self, cmd: cmds.DeleteOrder, why: str, attempts: int, exchange_ms: int
    ) -> Outcome:
        log.error(
            "delete %s: outcome UNKNOWN (%s). It is not retried; check order %d by hand.",
            cmd.command_id,
            why,
            cmd.data_id,
        )
        return Outcome("unknown", "undecided", why, True, attempts, exchange_ms, cmd.data_id)

    def _resume(self, cmd: cmds.Command, entry: Mapping[str, Any]) -> Outcome:
        """A command found pending: the previous run may or may not have called."""
        if isinstance(cmd, cmds.DeleteOrder):
            # Sending it again is safe: a delete the previous run did make is then
            # refused, and open-order shows the order gone (already_gone).
            log.warning("delete %s was pending at restart; sending it again", cmd.command_id)
            return self._delete(cmd)
        pending_at = int(entry.get("pending_at_ms") or self._now_ms())
        log.warning("command %s was pending at restart; reconciling", cmd.command_id)
        return self._reconcile(cmd, pending_at, 0, None)

    def _read_account(self, what: str, *endpoints: protocol.Endpoint) -> list[list[Any]] | None:
        """The data rows of each signed ``endpoints`` read, retried on transient
        failures up to ``RECONCILE_READS`` times; None when they could not be read."""
        backoff = Backoff(self.settings.backoff_initial_s, self.settings.backoff_max_s)
        for _ in range(RECONCILE_READS):
            try:
                return [
                    protocol.data_rows(self._signed(endpoint, None).payload)
                    for endpoint in endpoints
                ]
            except RequestFailed as exc:
                log.warning("%s: %s; retrying", what, exc)
                self._sleep(backoff.next_delay())
            except (AuthError, RejectedError, BadMessage) as exc:
                log.error("%s: %s", what, exc)
                return None
        return None

    def _reconcile(
        self, cmd: cmds.CreateOrder, pending_at: int, attempts: int, exchange_ms: int | None
    ) -> Outcome:
        """Decide an ambiguous create from the exchange's own state; never resend."""
        self._sleep(self.settings.reconcile_settle_s)
        rows = self._read_account(
            f"reconciling {cmd.command_id}", protocol.OPEN_ORDER, protocol.TRANSACTION
        )
        m = self.ctx.metrics.reconciliations
        if rows is None:
            m.labels(self.ctx.name, "undecided").inc()
            return self._unknown(cmd, "could not read the exchange's state", attempts, exchange_ms)
        now = int((self._clock() + self.client.clock_offset_s) * 1000)
        since = pending_at - RECONCILE_SLACK_MS
        placement = cmds.find_placed(
            cmd, rows[0], rows[1], since, now + RECONCILE_SLACK_MS, self._zone
        )
        claimed = self._claimed(cmd, since)
        matches = len(placement.open_matches) + placement.fill_matches
        if matches > claimed:
            m.labels(self.ctx.name, "found").inc()
            data_id = placement.open_matches[0] if len(placement.open_matches) == 1 else None
            log.warning("reconciled %s: the order was placed", cmd.command_id)
            return Outcome(
                "accepted",
                "reconciled",
                "found on the exchange after an ambiguous call",
                True,
                attempts,
                exchange_ms,
                data_id,
            )
        if not placement.saturated:
            m.labels(self.ctx.name, "not_found").inc()
            log.warning("reconciled %s: the order was not placed", cmd.command_id)
            return Outcome(
                "failed",
                "not_placed",
                "the call's outcome was unknown and the exchange shows no such order: not placed",
                True,
                attempts,
                exchange_ms,
            )
        m.labels(self.ctx.name, "undecided").inc()
        return self._unknown(cmd, "the exchange's last-25 windows are full", attempts, exchange_ms)

    def _unknown(
        self, cmd: cmds.CreateOrder, why: str, attempts: int, exchange_ms: int | None
    ) -> Outcome:
        log.error(
            "command %s: outcome UNKNOWN (%s). It is not retried; check the account and "
            "resolve it by hand.",
            cmd.command_id,
            why,
        )
        return Outcome("unknown", "undecided", why, True, attempts, exchange_ms)

    def _claimed(self, cmd: cmds.CreateOrder, since: int) -> int:
        """Orders of the same shape already attributed to other accepted commands."""
        n = 0
        for cid, e in self._ledger.items():
            if (
                cid != cmd.command_id
                and e.get("state") == "final"
                and e.get("outcome") == "accepted"
                and e.get("action") == "create"
                and (e.get("pair"), e.get("side"), e.get("amount"), e.get("price"))
                == (cmd.pair, cmd.side, cmd.amount, cmd.price)
                and int(e.get("decided_at_ms") or 0) >= since
            ):
                n += 1
        return n

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopping

    # -- results ---------------------------------------------------------------------

    def _finish(
        self,
        cmd: cmds.Command | None,
        command_id: str,
        out: Outcome,
        received_ms: int,
        source: dict[str, Any],
        offsets: dict[TopicPartition, int],
        consumer: KafkaConsumer,
        record_in_ledger: bool,
    ) -> None:
        """Ledger outcome + result + consumed offset, in one transaction."""
        decided_ms = self._now_ms()
        action = None
        if isinstance(cmd, cmds.CreateOrder):
            action = "create"
        elif isinstance(cmd, cmds.DeleteOrder):
            action = "delete"
        result = cmds.result(
            command=cmd,
            command_id=command_id,
            action=action,
            outcome=out.outcome,
            reason=out.reason,
            message=out.message,
            pair=cmd.pair if cmd is not None else None,
            reconciled=out.reconciled,
            attempts=out.attempts,
            command_created_at_ms=cmd.created_at_ms if cmd is not None else None,
            received_at_ms=received_ms,
            decided_at_ms=decided_ms,
            exchange_ms=out.exchange_ms,
            source=source,
            data_id=out.data_id,
        )
        batch = [
            OutRecord(
                topic=self.settings.topics.results,
                key=command_id.encode() or None,
                value=json.dumps(result, separators=(",", ":")).encode(),
                headers=[
                    ("content-type", records.CONTENT_TYPE),
                    ("schema", b"robicoin.order-result/v1"),
                ],
                timestamp_ms=decided_ms,
                channel="result",
            )
        ]
        entry: dict[str, Any] | None = None
        if record_in_ledger and command_id and out.outcome != "duplicate":
            entry = dict(self._ledger.get(command_id) or {})
            was_pending = entry.get("state") == "pending"
            entry.update(state="final", outcome=out.outcome, decided_at_ms=decided_ms)
            if cmd is not None:
                entry.setdefault("action", action)
                entry.setdefault("pair", cmd.pair)
                if isinstance(cmd, cmds.CreateOrder):
                    entry.update(side=cmd.side, amount=cmd.amount, price=cmd.price)
            if out.data_id is not None:
                entry["data_id"] = out.data_id
            batch.append(self._ledger_record(command_id, entry))
        else:
            was_pending = False
        self.ctx.transactions.commit(batch, offsets, consumer)
        if entry is not None:
            self._ledger[command_id] = entry
            if was_pending:
                self._m_in_flight.dec()
        for tp, off in offsets.items():
            self._committed[tp] = off
        m = self.ctx.metrics
        m.commands.labels(self.ctx.name, action or "unknown", out.outcome).inc()
        if cmd is not None:
            m.command_latency.labels(self.ctx.name, action or "unknown").observe(
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
            topic=self.settings.topics.dead_letter,
            raw=rec.value if rec.value is not None else b"",
            reason=exc.reason,
            detail=exc.detail,
            exchange=protocol.EXCHANGE,
            receive_time_ms=received_ms,
            source=NAME,
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

    # -- guard -----------------------------------------------------------------------

    _last_guard_check = 0.0

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
            report_blocked(guard, self.ctx.metrics, self.ctx.name, "Commands wait in Kafka.")
            raise _Stopping

    def _check_guard_reset(self) -> None:
        assert self._guard is not None
        now = time.monotonic()
        if now - self._last_guard_check < self.settings.auth_guard.recheck_s:
            return
        self._last_guard_check = now
        try:
            state = read_state(self.ctx.kafka, self._guard.spec.topic)
        except RetriableError as exc:
            log.warning("cannot re-read the auth guard: %s", exc)
            return
        reopen_if_reset(self._guard, state, self.ctx.metrics, self.ctx.name)


def create(config: OrderSinkConfig) -> RobicoinOrderSink:
    if not isinstance(config, OrderSinkConfig):
        raise ConfigError("robicoin-orders needs an OrderSinkConfig")
    return RobicoinOrderSink(config)
