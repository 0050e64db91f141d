"""Robicoin's order commands, as a handler for the command sink.

Everything about the sink's lifecycle (consumer group, control topic, ledger,
transactions, the auth guard, stop, metrics, health) is the runtime's
(:mod:`connectors.runtime.sink`); this module says only what is Robicoin:

- commands are parsed and checked by :mod:`connectors.robicoin.commands` (pure);
  a create adds exposure (kill switch, risk limits), a delete does not;
- ``create-order`` returns no order id and takes no client id, so an ambiguous
  failure (timeout, reset after sending, 5xx, an answer of no known shape) is
  reconciled: open-order and transaction are read and the order looked for (pair,
  side, amount, price, time window). Found → ``accepted``; provably absent →
  ``failed`` (``not_placed``); otherwise ``unknown``, never retried automatically;
- ``delete-order`` is idempotent on ``data_id``: ambiguous failures are retried, and a
  delete found pending at restart is sent again. Any answer but the documented
  ``success`` is decided by reading open-order;
- exchange facts: the account's rate-limit class (shared with the poller in
  wall-clock slots), its credentials and their auth guard, the HTTP client
  (:mod:`connectors.robicoin.client`), its clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import requests

from connectors.robicoin import commands as cmds
from connectors.robicoin import protocol, signing
from connectors.robicoin.client import (
    Answer,
    Credentials,
    RequestFailed,
    RobicoinClient,
    connector_client,
)
from connectors.robicoin.config import credential_fingerprint
from connectors.robicoin.protocol import EndpointClass
from connectors.robicoin.sink_config import OrderSinkConfig
from connectors.runtime.authguard import GuardSpec
from connectors.runtime.backoff import Backoff
from connectors.runtime.context import RuntimeContext
from connectors.runtime.errors import AuthError, BadMessage, ConfigError, RejectedError
from connectors.runtime.ledger import Ambiguous, Decision, Exposure, Facts, RiskLimits
from connectors.runtime.logs import redact, register_secret
from connectors.runtime.polling import RateClass
from connectors.runtime.ratelimit import RateLimit, Share
from connectors.runtime.sink import Calls, CommandSink, CommandTopics, SinkSettings

log = logging.getLogger(__name__)

NAME = "robicoin-orders"
#: Exchange times have one-second resolution and clocks differ a little.
RECONCILE_SLACK_MS = 2_000
RECONCILE_READS = 5


def _learned(data_id: int | None) -> dict[str, Any]:
    """What an outcome adds to the ledger entry: the order's ``data_id`` when known."""
    return {} if data_id is None else {"data_id": data_id}


class RobicoinOrders:
    """The :class:`~connectors.runtime.sink.CommandHandler` of Robicoin orders."""

    name = NAME
    exchange = protocol.EXCHANGE
    actions = ("create", "delete")
    result_schema = cmds.RESULT_SCHEMA

    def __init__(
        self,
        config: OrderSinkConfig,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        s = self.source = config.robicoin
        self._session = session
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
        t = s.topics
        self.topics = CommandTopics(t.commands, t.results, t.ledger, t.dead_letter, t.control)
        r, c = s.rate_limit, s.consumer
        self.settings = SinkSettings(
            group_id=c.group_id,
            # The account's "1 per 100 ms", shared with the poller in wall-clock slots.
            rate=RateClass(
                RateLimit(r.other.count, r.other.window_s),
                r.margin_for(shared=r.share.slots > 1),
                Share(r.share.slots, r.share.slot),
            ),
            rate_class=EndpointClass.OTHER.value,
            max_poll_interval_ms=c.max_poll_interval_ms,
            session_timeout_ms=c.session_timeout_ms,
            heartbeat_interval_ms=c.heartbeat_interval_ms,
            command_max_age_s=s.command_max_age_s,
            trading_enabled=s.risk.trading_enabled,
            risk=RiskLimits(
                max_notional=Decimal(s.risk.max_notional) if s.risk.max_notional else None,
                max_amount={p: Decimal(v) for p, v in s.risk.max_amount.items()},
                max_per_minute=s.risk.max_orders_per_minute,
            ),
            guard_recheck_s=s.auth_guard.recheck_s,
            drain_timeout_s=config.runtime.drain_timeout_s,
        )
        self.client: RobicoinClient | None = None

    def guard_spec(self) -> GuardSpec:
        g = self.source.auth_guard
        return GuardSpec(g.topic, self.fingerprint, g.limit)

    def attach(self, ctx: RuntimeContext) -> None:
        self.client = connector_client(
            ctx, self.source, self.credentials, self._session, self._clock
        )

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    # -- what the runtime asks -------------------------------------------------------

    def parse(self, raw: bytes | None) -> cmds.Command:
        return cmds.parse_command(raw, self.policy)

    def exposure(self, cmd: cmds.Command) -> Exposure | None:
        if not isinstance(cmd, cmds.CreateOrder):
            return None  # cancelling reduces risk: the kill switch lets deletes run
        return Exposure(cmd.pair, Decimal(cmd.amount), cmds.notional(cmd))

    def facts(self, cmd: cmds.Command) -> Facts:
        if isinstance(cmd, cmds.CreateOrder):
            return Facts(
                {"pair": cmd.pair}, {"side": cmd.side, "amount": cmd.amount, "price": cmd.price}
            )
        return Facts({"pair": cmd.pair}, at_pending={"data_id": cmd.data_id})

    def idempotent(self, cmd: cmds.Command) -> bool:
        # A delete the previous run did make is refused the second time, and open-order
        # then shows the order gone (already_gone).
        return isinstance(cmd, cmds.DeleteOrder)

    def exchange_time_ms(self) -> int:
        return int((self._clock() + self._client().clock_offset_s) * 1000)

    def execute(self, cmd: cmds.Command, pending_at_ms: int, calls: Calls) -> Decision | Ambiguous:
        if isinstance(cmd, cmds.CreateOrder):
            return self._create(cmd, calls)
        return self._delete(cmd, calls)

    def reconcile(
        self, cmd: cmds.Command, pending_at_ms: int, ambiguous: Ambiguous | None, calls: Calls
    ) -> Decision:
        if isinstance(cmd, cmds.DeleteOrder):
            # Idempotent: the runtime sends a pending delete again rather than asking
            # (and _delete never answers Ambiguous); should it ask, the same holds.
            return self._delete(cmd, calls)
        attempts = ambiguous.attempts if ambiguous is not None else 0
        exchange_ms = ambiguous.exchange_ms if ambiguous is not None else None
        return self._reconcile(cmd, pending_at_ms, attempts, exchange_ms, calls)

    def result(
        self,
        cmd: cmds.Command | None,
        command_id: str,
        decision: Decision,
        received_at_ms: int,
        decided_at_ms: int,
        source: Mapping[str, Any],
    ) -> dict[str, Any]:
        return cmds.result(
            command=cmd,
            command_id=command_id,
            action=cmd.action if cmd is not None else None,
            outcome=decision.outcome,
            reason=decision.reason,
            message=decision.message,
            pair=cmd.pair if cmd is not None else None,
            reconciled=decision.reconciled,
            attempts=decision.attempts,
            command_created_at_ms=cmd.created_at_ms if cmd is not None else None,
            received_at_ms=received_at_ms,
            decided_at_ms=decided_at_ms,
            exchange_ms=decision.exchange_ms,
            source=source,
            data_id=decision.learned.get("data_id"),
        )

    # -- exchange calls --------------------------------------------------------------

    def _client(self) -> RobicoinClient:
        assert self.client is not None, "attach() first"
        return self.client

    def _signed(
        self, calls: Calls, endpoint: protocol.Endpoint, fields: Mapping[str, str] | None
    ) -> Answer:
        """One signed call through the runtime (auth guard, rate limiter, stop)."""
        client = self._client()
        return calls.call(lambda: client.call(endpoint, fields))

    def _create(self, cmd: cmds.CreateOrder, calls: Calls) -> Decision | Ambiguous:
        s = self.source
        backoff = Backoff(s.backoff_initial_s, s.backoff_max_s)
        attempts = 0
        spent = 0.0
        while True:
            attempts += 1
            started = time.monotonic()
            try:
                answer = self._signed(calls, protocol.CREATE_ORDER, cmds.create_fields(cmd))
            except RequestFailed as exc:
                spent += time.monotonic() - started
                if exc.maybe_executed:
                    return Ambiguous(attempts, int(spent * 1000), str(exc))
                if attempts >= s.max_send_attempts:
                    return Decision(
                        "failed",
                        "exchange_unavailable",
                        str(exc),
                        False,
                        attempts,
                        int(spent * 1000),
                    )
                calls.sleep(backoff.next_delay())
                continue
            except AuthError as exc:
                return Decision("failed", "unauthorized", str(exc), False, attempts)
            except RejectedError as exc:
                return Decision(
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
                return Decision(
                    "accepted", None, payload["success"], False, attempts, int(spent * 1000)
                )
            if isinstance(payload, dict) and isinstance(payload.get("error"), str):
                return Decision(
                    "failed",
                    "exchange_rejected",
                    payload["error"],
                    False,
                    attempts,
                    int(spent * 1000),
                )
            return Ambiguous(attempts, int(spent * 1000), "an unexpected answer")

    def _delete(self, cmd: cmds.DeleteOrder, calls: Calls) -> Decision:
        """delete-order is idempotent on data_id: ambiguous failures are simply retried.
        Any other answer but the documented ``success`` (any 4xx that is not an auth
        failure, whatever its text; a 2xx without ``success``) decides nothing by
        itself: open-order does (:meth:`_confirm_delete`)."""
        s = self.source
        backoff = Backoff(s.backoff_initial_s, s.backoff_max_s)
        attempts = 0
        spent = 0.0
        while True:
            attempts += 1
            started = time.monotonic()
            try:
                answer = self._signed(calls, protocol.DELETE_ORDER, cmds.delete_fields(cmd))
            except RequestFailed as exc:
                spent += time.monotonic() - started
                if attempts >= s.max_send_attempts + 5:
                    return Decision(
                        "unknown",
                        "exchange_unavailable",
                        str(exc),
                        False,
                        attempts,
                        int(spent * 1000),
                    )
                calls.sleep(backoff.next_delay())
                continue
            except AuthError as exc:
                # Never "not found": no further signed request after an auth failure.
                return Decision("failed", "unauthorized", str(exc), False, attempts)
            except RejectedError as exc:  # NotFoundError (404/405) included
                spent += time.monotonic() - started
                refusal = f"HTTP {exc.status}: {exc.message}"
                return self._confirm_delete(cmd, exc.message, refusal, attempts, spent, calls)
            spent += time.monotonic() - started
            payload = answer.payload
            message = payload.get("success") if isinstance(payload, dict) else None
            if not isinstance(message, str):
                text = redact(protocol.error_message(answer.text))
                return self._confirm_delete(cmd, text, f"HTTP 2xx: {text}", attempts, spent, calls)
            return Decision(
                "accepted", None, message, False, attempts, int(spent * 1000), _learned(cmd.data_id)
            )

    def _confirm_delete(
        self,
        cmd: cmds.DeleteOrder,
        message: str,
        refusal: str,
        attempts: int,
        spent: float,
        calls: Calls,
    ) -> Decision:
        """A delete the exchange did not confirm: read open-order (signed, guarded,
        rate-limited) to learn whether the order is still there. Gone → ``accepted``
        (``already_gone``: a retry after a lost answer, a resume after a crash, or an
        order filled or cancelled before); still open → ``failed`` with the exchange's
        (redacted) ``message``; cannot tell → ``unknown``. It never sends the delete
        again: the exchange has answered it."""
        exchange_ms = int(spent * 1000)
        read = self._read_account(calls, f"checking delete {cmd.command_id}", protocol.OPEN_ORDER)
        if read is None:
            why = f"delete-order answered {refusal}; open-order could not be read"
            return self._unknown_delete(cmd, why, attempts, exchange_ms)
        check = cmds.find_open(cmd, read[0])
        learned = _learned(cmd.data_id)
        if check.state is cmds.OpenState.GONE:
            log.info("delete %s: %s (%s): already gone", cmd.command_id, refusal, check.detail)
            return Decision(
                "accepted",
                "already_gone",
                message,
                True,
                attempts,
                exchange_ms,
                learned,
                "not_found",
            )
        if check.state is cmds.OpenState.OPEN:
            log.warning("delete %s refused: %s (%s)", cmd.command_id, refusal, check.detail)
            return Decision(
                "failed",
                "exchange_rejected",
                message,
                True,
                attempts,
                exchange_ms,
                learned,
                "found",
            )
        why = f"delete-order answered {refusal}; {check.detail}"
        return self._unknown_delete(cmd, why, attempts, exchange_ms)

    def _unknown_delete(
        self, cmd: cmds.DeleteOrder, why: str, attempts: int, exchange_ms: int
    ) -> Decision:
        log.error(
            "delete %s: outcome UNKNOWN (%s). It is not retried; check order %d by hand.",
            cmd.command_id,
            why,
            cmd.data_id,
        )
        return Decision(
            "unknown",
            "undecided",
            why,
            True,
            attempts,
            exchange_ms,
            _learned(cmd.data_id),
            "undecided",
        )

    def _read_account(
        self, calls: Calls, what: str, *endpoints: protocol.Endpoint
    ) -> list[list[Any]] | None:
        """The data rows of each signed ``endpoints`` read, retried on transient
        failures up to ``RECONCILE_READS`` times; None when they could not be read."""
        backoff = Backoff(self.source.backoff_initial_s, self.source.backoff_max_s)
        for _ in range(RECONCILE_READS):
            try:
                return [
                    protocol.data_rows(self._signed(calls, endpoint, None).payload)
                    for endpoint in endpoints
                ]
            except RequestFailed as exc:
                log.warning("%s: %s; retrying", what, exc)
                calls.sleep(backoff.next_delay())
            except (AuthError, RejectedError, BadMessage) as exc:
                log.error("%s: %s", what, exc)
                return None
        return None

    def _reconcile(
        self,
        cmd: cmds.CreateOrder,
        pending_at: int,
        attempts: int,
        exchange_ms: int | None,
        calls: Calls,
    ) -> Decision:
        """Decide an ambiguous create from the exchange's own state; never resend."""
        calls.sleep(self.source.reconcile_settle_s)
        rows = self._read_account(
            calls, f"reconciling {cmd.command_id}", protocol.OPEN_ORDER, protocol.TRANSACTION
        )
        if rows is None:
            return self._unknown(cmd, "could not read the exchange's state", attempts, exchange_ms)
        now = self.exchange_time_ms()
        since = pending_at - RECONCILE_SLACK_MS
        placement = cmds.find_placed(
            cmd, rows[0], rows[1], since, now + RECONCILE_SLACK_MS, self._zone
        )
        claimed = calls.claimed(cmd, self.facts(cmd), since)
        matches = len(placement.open_matches) + placement.fill_matches
        if matches > claimed:
            data_id = placement.open_matches[0] if len(placement.open_matches) == 1 else None
            log.warning("reconciled %s: the order was placed", cmd.command_id)
            return Decision(
                "accepted",
                "reconciled",
                "found on the exchange after an ambiguous call",
                True,
                attempts,
                exchange_ms,
                _learned(data_id),
                "found",
            )
        if not placement.saturated:
            log.warning("reconciled %s: the order was not placed", cmd.command_id)
            return Decision(
                "failed",
                "not_placed",
                "the call's outcome was unknown and the exchange shows no such order: not placed",
                True,
                attempts,
                exchange_ms,
                found="not_found",
            )
        return self._unknown(cmd, "the exchange's last-25 windows are full", attempts, exchange_ms)

    def _unknown(
        self, cmd: cmds.CreateOrder, why: str, attempts: int, exchange_ms: int | None
    ) -> Decision:
        log.error(
            "command %s: outcome UNKNOWN (%s). It is not retried; check the account and "
            "resolve it by hand.",
            cmd.command_id,
            why,
        )
        return Decision("unknown", "undecided", why, True, attempts, exchange_ms, found="undecided")


def create(config: OrderSinkConfig) -> CommandSink[cmds.Command]:
    if not isinstance(config, OrderSinkConfig):
        raise ConfigError("robicoin-orders needs an OrderSinkConfig")
    return CommandSink(RobicoinOrders(config))
