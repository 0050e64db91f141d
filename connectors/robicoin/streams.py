"""Robicoin's polled streams, as definitions for the polling runtime.

Everything about the polling lifecycle (schedules, rate-limit slots, the auth guard,
transactions, state, gap markers, dead letters, metrics, health) is the runtime's
(:mod:`connectors.runtime.polling`); this module says only what is Robicoin:

- ``ticker`` (one stream per window): public GET, the ticker rate-limit class; every
  row is a record (:class:`~connectors.runtime.cursors.Stateless`).
- ``order`` and ``transaction``: "the last 25 rows", no ids, second-resolution times;
  :class:`LastRows` finds the new rows with :func:`protocol.advance`
  (:class:`~connectors.runtime.cursors.Incremental`; ``order`` is not append-only).
- ``balance`` and ``open_order``: full answers keyed by currency / ``data_id``
  (:class:`~connectors.runtime.cursors.Snapshot`); open orders carry their change,
  are reported when they close, and may scroll out of the last-25 window.
- exchange facts: the two rate-limit classes, credentials and their auth guard, the
  HTTP client (:mod:`connectors.robicoin.client`), 404 = wrong base URL.
"""

from __future__ import annotations

import dataclasses
import functools
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
    RobicoinClient,
    connector_client,
)
from connectors.robicoin.config import RobicoinConfig, RobicoinSettings, credential_fingerprint
from connectors.robicoin.protocol import EXCHANGE, Cursor, Endpoint, EndpointClass
from connectors.runtime import wire
from connectors.runtime.authguard import GuardSpec
from connectors.runtime.context import RuntimeContext
from connectors.runtime.cursors import (
    Gap,
    Incremental,
    Request,
    Rule,
    Snapshot,
    Stateless,
    Step,
    field_key,
)
from connectors.runtime.errors import ConfigError, RejectedError
from connectors.runtime.logs import register_secret
from connectors.runtime.polling import PollingSource, PollSettings, RateClass
from connectors.runtime.ratelimit import RateLimit, Share
from connectors.runtime.records import Event

NAME = "robicoin-poller"


def schema_id(channel: str) -> str:
    """The ``schema`` header of a Robicoin record (``robicoin.ticker/v1``)."""
    return wire.schema_id(EXCHANGE, channel)


def request(endpoint: Endpoint) -> Request:
    """The runtime's view of a Robicoin endpoint: POSTs are signed."""
    return Request(endpoint.name, endpoint, endpoint.signed, endpoint.klass.value)


@dataclass(frozen=True)
class Stream:
    """One polled stream (:class:`~connectors.runtime.cursors.PolledStream`):
    ``channel`` names the topic and schema, ``name`` the state entries."""

    name: str
    channel: str
    request: Request
    interval_s: float
    topic: str
    rule: Rule

    def rows(self, payload: Any) -> Sequence[Any]:
        return protocol.data_rows(payload)


# -- rules -------------------------------------------------------------------------------


def parse_ticker(window: str, row: Any) -> Event:
    t = protocol.parse_ticker(row, window)
    return Event("ticker", t.pair, None, t.data())


@dataclass(frozen=True)
class LastRows:
    """The cursor of a "last 25 rows, newest first, no ids" answer
    (:class:`~connectors.runtime.cursors.CursorRule`, stored as
    :meth:`protocol.Cursor.to_json`). Market orders leave the list (filled,
    cancelled): only transactions are ``append_only``."""

    append_only: bool
    time_field: str = "created_at"

    def load(self, stored: Mapping[str, Any]) -> Cursor:
        return Cursor.from_json(stored)

    def advance(self, cursor: Cursor, rows: Sequence[Any]) -> Step:
        step = protocol.advance(cursor, rows, self.time_field, append_only=self.append_only)
        gap = None
        if step.gap:
            n = len(rows)
            gap = Gap(
                reason="window_overflow",
                detail=(
                    f"the exchange returned a full window of {n} rows, none older than the "
                    f"last row written ({cursor.newest}) and not enough of those written to "
                    "tell where they end; rows in between may be missing"
                ),
                extra={"previous_newest": cursor.newest},
                note=(
                    f"a full window of {n} rows that does not show where the rows already "
                    "written end: some rows may have been missed (poll more often)"
                ),
            )
        return Step(step.new_rows, step.cursor.to_json(), gap)


def with_change(row: Event, change: str) -> Event:
    """An account open order's record: its ``change``, and its own time only when it
    opened (a change or a close happened at some unknown time since the last poll)."""
    data = {**row.data, "change": change}
    event_time = row.event_time_ms if change == "opened" else None
    return dataclasses.replace(row, event_time_ms=event_time, data=data)


def closed_open_order(data: Mapping[str, Any]) -> Event:
    """An open order that left the answer, reported with the data it last had."""
    return Event("open-order", str(data["pair"]), None, dict(data))


def plan(s: RobicoinSettings, zone: ZoneInfo) -> list[Stream]:
    """The enabled streams, in a fixed order (ticker windows first)."""
    t = s.topics
    out: list[Stream] = []
    if s.streams.ticker.enabled:
        for window in s.streams.ticker.windows:
            out.append(
                Stream(
                    f"ticker:{window}",
                    "ticker",
                    request(protocol.ticker_endpoint(window)),
                    s.streams.ticker.interval_s,
                    t.ticker,
                    Stateless(functools.partial(parse_ticker, window)),
                )
            )
    rules: dict[str, tuple[Endpoint, str, Rule]] = {
        "order": (
            protocol.ORDER,
            t.order,
            Incremental(
                functools.partial(protocol.parse_order, zone=zone), LastRows(append_only=False)
            ),
        ),
        "balance": (
            protocol.BALANCE,
            t.balance,
            Snapshot(
                protocol.parse_balance,
                field_key("currency"),
                every_poll=s.streams.balance.emit == "every_poll",
            ),
        ),
        "transaction": (
            protocol.TRANSACTION,
            t.transaction,
            Incremental(
                functools.partial(protocol.parse_transaction, zone=zone),
                LastRows(append_only=True),
            ),
        ),
        "open_order": (
            protocol.OPEN_ORDER,
            t.open_order,
            Snapshot(
                functools.partial(protocol.parse_open_order, zone=zone),
                field_key("data_id"),
                every_poll=s.streams.open_order.emit == "every_poll",
                window=protocol.WINDOW_ROWS,
                mark=with_change,
                vanished=closed_open_order,
            ),
        ),
    }
    for name, (endpoint, topic, rule) in rules.items():
        stream = getattr(s.streams, name)
        if stream.enabled:
            channel = name.replace("_", "-")
            out.append(Stream(name, channel, request(endpoint), stream.interval_s, topic, rule))
    return out


# -- the exchange --------------------------------------------------------------------------


class RobicoinPolling:
    """The :class:`~connectors.runtime.polling.PollExchange` of Robicoin."""

    exchange = EXCHANGE

    def __init__(
        self,
        config: RobicoinConfig,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        s = self.source = config.robicoin
        self._session = session
        self._clock = clock
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
        self.streams = plan(s, ZoneInfo(s.timezone))
        self.settings = PollSettings(
            backoff_initial_s=s.backoff_initial_s,
            backoff_max_s=s.backoff_max_s,
            guard_recheck_s=s.auth_guard.recheck_s,
        )
        r = s.rate_limit
        self.rate_classes = {
            EndpointClass.TICKER.value: RateClass(
                RateLimit(r.ticker.count, r.ticker.window_s), r.margin_for(shared=False)
            ),
            # The account's budget, shared with the order sink in wall-clock slots.
            EndpointClass.OTHER.value: RateClass(
                RateLimit(r.other.count, r.other.window_s),
                r.margin_for(shared=r.share.slots > 1),
                Share(r.share.slots, r.share.slot),
            ),
        }
        self.dead_letter_topic = s.topics.dead_letter
        self.state_topic = s.topics.state
        self.client: RobicoinClient | None = None

    def guard_spec(self) -> GuardSpec | None:
        if self.fingerprint is None:
            return None
        g = self.source.auth_guard
        return GuardSpec(g.topic, self.fingerprint, g.limit)

    def attach(self, ctx: RuntimeContext) -> None:
        self.client = connector_client(
            ctx, self.source, self.credentials, self._session, self._clock
        )

    def call(self, request: Request) -> Answer:
        assert self.client is not None, "attach() first"
        return self.client.call(request.target)

    def misconfigured(self, error: RejectedError) -> str | None:
        if isinstance(error, NotFoundError):
            return f"HTTP {error.status} at {self.source.base_url}: check robicoin.base_url"
        return None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def create(config: RobicoinConfig) -> PollingSource:
    if not isinstance(config, RobicoinConfig):
        raise ConfigError("robicoin-poller needs a RobicoinConfig")
    return PollingSource(RobicoinPolling(config))
