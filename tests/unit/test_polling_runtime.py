"""The generic pieces of the polling runtime, without a broker or an exchange.

Pure rules (:mod:`connectors.runtime.cursors`) are fed rows and stored state; the
guarded request path (:mod:`connectors.runtime.guarded`) runs against an in-memory
stand-in for the guard topic; :meth:`PollingSource.records_of` is checked on the
records a toy exchange's answer becomes. Nothing here opens a socket.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from connectors.runtime import cursors
from connectors.runtime.authguard import AuthGuard, GuardRefused, GuardSpec, reset_records, view_of
from connectors.runtime.backoff import Backoff
from connectors.runtime.cursors import (
    Gap,
    Incremental,
    Poll,
    Request,
    Rule,
    Schedule,
    Snapshot,
    Stateless,
    Step,
)
from connectors.runtime.errors import AuthError, BadMessage, RejectedError, RetriableError
from connectors.runtime.guarded import GuardedCalls, Outcome, ResetWatcher
from connectors.runtime.logs import register_secret
from connectors.runtime.metrics import Metrics
from connectors.runtime.polling import PollingSource, PollSettings, RateClass
from connectors.runtime.ratelimit import RateLimit, RateLimiter
from connectors.runtime.records import Event, OutRecord

# -- a toy exchange's rows -----------------------------------------------------------------


def parse(row: Any) -> Event:
    """``{"id": 7, "pair": "btc-usd", "price": "1.5"}`` → an Event keyed by pair."""
    if not isinstance(row, dict) or not isinstance(row.get("pair"), str):
        raise BadMessage("bad_row", "expected an object with a pair")
    if not isinstance(row.get("price"), str):
        raise BadMessage("bad_decimal", "price")
    return Event("trade", row["pair"], row.get("t"), {"pair": row["pair"], "price": row["price"]})


@dataclass(frozen=True)
class AfterId:
    """A toy cursor: rows carry increasing ids; new = id above the last one written;
    a gap when the oldest row shown is more than one past it (rows were skipped)."""

    def load(self, stored: Mapping[str, Any]) -> int:
        last = stored.get("last", 0)
        if not isinstance(last, int):
            raise ValueError("last must be an integer")
        return last

    def advance(self, cursor: int, rows: Sequence[Any]) -> Step:
        new = sorted((r for r in rows if r["id"] > cursor), key=lambda r: int(r["id"]))
        last = max([cursor, *(int(r["id"]) for r in rows)])
        gap = None
        if new and cursor and new[0]["id"] > cursor + 1:
            gap = Gap("window_overflow", "rows skipped", {"previous_newest": cursor}, "skipped")
        return Step(new, {"last": last}, gap)


def row(i: int, pair: str = "btc-usd", price: str = "1.5") -> dict[str, Any]:
    return {"id": i, "pair": pair, "price": price}


# -- schedule ------------------------------------------------------------------------------


def test_polls_start_an_interval_apart_start_to_start() -> None:
    schedule = Schedule(2.0, Backoff(initial_s=0.5, cap_s=30.0, rng=random.Random(1)))
    assert schedule.polled() == 2.0
    # A poll that took 0.7 s waits the rest of the interval, one that overran none.
    assert Schedule.wait(start=100.0, delay=2.0, now=100.7) == pytest.approx(1.3)
    assert Schedule.wait(start=100.0, delay=2.0, now=103.0) == 0.0


def test_failures_back_off_and_a_good_poll_starts_over() -> None:
    backoff = Backoff(initial_s=0.5, cap_s=4.0, rng=random.Random(7))
    schedule = Schedule(2.0, backoff)
    delays = [schedule.failed() for _ in range(6)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(0.05 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert backoff.attempt == 6
    schedule.polled()
    assert backoff.attempt == 0
    assert schedule.failed() <= 0.5


def test_a_refused_request_waits_at_least_one_interval() -> None:
    schedule = Schedule(2.0, Backoff(initial_s=0.5, cap_s=30.0, rng=random.Random(3)))
    delays = [schedule.refused() for _ in range(8)]
    assert all(d >= 2.0 for d in delays)
    assert max(delays) > 2.0  # and it grows while the refusals go on


# -- stateless -------------------------------------------------------------------------------


def test_stateless_writes_every_row_and_dead_letters_the_bad_ones() -> None:
    bad = {"pair": "eth-usd", "price": 1.5}
    poll = Stateless(parse).apply("ticker", [row(1), bad, "nope", row(2)], {})
    assert [e.data for e in poll.events] == [
        {"pair": "btc-usd", "price": "1.5"},
        {"pair": "btc-usd", "price": "1.5"},
    ]
    assert [d.error.reason for d in poll.dead] == ["bad_decimal", "bad_row"]
    assert poll.dead[0].raw == '{"pair":"eth-usd","price":1.5}'  # canonical row text
    assert poll.state == {} and poll.gap is None


# -- incremental -------------------------------------------------------------------------------


def test_incremental_writes_new_rows_once_behind_its_cursor() -> None:
    rule = Incremental(parse, AfterId())
    first = rule.apply("trades", [row(2), row(1)], {})
    assert [e.key for e in first.events] == ["btc-usd", "btc-usd"]
    assert first.state == {"cursor/trades": {"last": 2}}
    state = dict(first.state)
    again = rule.apply("trades", [row(3, "eth-usd"), row(2), row(1)], state)
    assert [e.key for e in again.events] == ["eth-usd"]
    assert again.state == {"cursor/trades": {"last": 3}}
    assert again.gap is None
    # Another stream's cursor is its own.
    other = rule.apply("fills", [row(2)], state)
    assert len(other.events) == 1 and "cursor/fills" in other.state


def test_incremental_passes_the_cursor_rules_gap_on() -> None:
    rule = Incremental(parse, AfterId())
    poll = rule.apply("trades", [row(9), row(8)], {"cursor/trades": {"last": 3}})
    assert poll.gap is not None
    assert poll.gap.data() == {
        "reason": "window_overflow",
        "detail": "rows skipped",
        "previous_newest": 3,
    }
    assert list(poll.gap.data()) == ["reason", "detail", "previous_newest"]  # record order
    assert len(poll.events) == 2


def test_an_unreadable_cursor_starts_the_stream_afresh() -> None:
    rule = Incremental(parse, AfterId())
    poll = rule.apply("trades", [row(5)], {"cursor/trades": {"last": "five"}})
    assert len(poll.events) == 1
    assert poll.state == {"cursor/trades": {"last": 5}}


def test_incremental_dead_letters_new_rows_that_do_not_parse() -> None:
    rule = Incremental(parse, AfterId())
    poll = rule.apply("trades", [{"id": 2, "pair": 7}, row(1)], {})
    assert len(poll.events) == 1
    assert [d.error.reason for d in poll.dead] == ["bad_row"]
    assert poll.state == {"cursor/trades": {"last": 2}}  # the bad row is behind the cursor


# -- snapshot ----------------------------------------------------------------------------------


def order(i: int, price: str = "1.5") -> dict[str, Any]:
    return {"id": i, "pair": "btc-usd", "price": price}


def marked(event: Event, change: str) -> Event:
    return Event(event.channel, event.key, event.event_time_ms, {**event.data, "change": change})


def vanished(data: Mapping[str, Any]) -> Event:
    return Event("trade", str(data["pair"]), None, dict(data))


def changes(poll: Poll) -> list[str]:
    return [e.data["change"] for e in poll.events]


def test_snapshot_reports_rows_that_appear_change_and_disappear() -> None:
    rule = Snapshot(parse, cursors.field_key("id"), mark=marked, vanished=vanished)
    state: dict[str, Any] = {}
    poll = rule.apply("open", [order(1), order(2)], state)
    assert changes(poll) == ["opened", "opened"]
    state.update(poll.state)
    same = rule.apply("open", [order(1), order(2)], state)
    assert same.events == [] and same.state == {}  # nothing changed: nothing written
    poll = rule.apply("open", [order(2, "1.6"), order(3)], state)
    assert changes(poll) == ["changed", "opened", "closed"]
    closed = poll.events[-1]
    assert closed.data == {"pair": "btc-usd", "price": "1.5", "change": "closed"}
    assert set(poll.state["snapshot/open"]) == {"2", "3"}


def test_a_full_window_tells_scrolled_out_from_closed() -> None:
    rule = Snapshot(parse, cursors.field_key("id"), window=2, mark=marked, vanished=vanished)
    state = dict(rule.apply("open", [order(1), order(2)], {}).state)
    poll = rule.apply("open", [order(3), order(4)], state)  # a full window of newer ids
    assert sorted(changes(poll)) == ["opened", "opened", "out_of_window", "out_of_window"]
    poll = rule.apply("open", [order(4)], state)  # not full: 1 and 2 are gone
    assert sorted(changes(poll)) == ["closed", "closed", "opened"]


def test_every_poll_also_writes_the_unchanged_rows() -> None:
    rule = Snapshot(parse, cursors.field_key("id"), every_poll=True, mark=marked)
    state = dict(rule.apply("open", [order(1)], {}).state)
    poll = rule.apply("open", [order(1), order(2)], state)
    assert sorted(changes(poll)) == ["opened", "unchanged"]


def test_without_vanished_a_row_that_left_is_not_reported() -> None:
    rule = Snapshot(parse, cursors.field_key("id"))
    state = dict(rule.apply("wallets", [order(1), order(2)], {}).state)
    poll = rule.apply("wallets", [order(2)], state)
    assert poll.events == []
    assert set(poll.state["snapshot/wallets"]) == {"2"}


def test_a_bad_row_is_dead_lettered_once_per_version() -> None:
    rule = Snapshot(parse, cursors.field_key("id"))
    bad = {"id": 1, "pair": "btc-usd", "price": 2}
    first = rule.apply("open", [bad], {})
    assert [d.error.reason for d in first.dead] == ["bad_decimal"] and first.events == []
    state = dict(first.state)
    assert state["snapshot/open"]["1"]["data"] is None
    assert rule.apply("open", [bad], state).dead == []
    assert len(rule.apply("open", [{**bad, "price": 3}], state).dead) == 1


def test_snapshot_keys_are_short_plain_values_or_fingerprints() -> None:
    key = cursors.field_key("currency")
    assert key({"currency": "try"}) == "try"
    assert key({"currency": 18}) == "18"
    assert key({"currency": True}).startswith("?")
    assert key({"currency": "x" * 65}).startswith("?")
    assert key({"currency": "two\nlines"}).startswith("?")
    assert key("not a row") == f"?{cursors.row_fingerprint(None)}"
    secret = "snapshot-key-secret-0451"
    register_secret(secret)
    assert key({"currency": secret}) == f"?{cursors.row_fingerprint(secret)}"


def test_row_fingerprints_ignore_key_order_and_keep_number_text() -> None:
    assert cursors.row_fingerprint({"a": "1.10", "b": 1}) == cursors.row_fingerprint(
        {"b": 1, "a": "1.10"}
    )
    assert cursors.row_fingerprint({"a": "1.10"}) != cursors.row_fingerprint({"a": "1.1"})


# -- the guarded request path ------------------------------------------------------------------

SPEC = GuardSpec("guard", "fp", limit=2)


class Store:
    """Stands in for the guard topic: what the guards committed, by key."""

    def __init__(self) -> None:
        self.records: list[OutRecord] = []

    def commit(self, batch: Sequence[OutRecord]) -> None:
        self.records.extend(batch)

    def state(self) -> dict[bytes, bytes | None]:
        return {r.key: r.value for r in self.records if r.key is not None}

    def counted(self) -> int:
        return view_of(self.state(), SPEC).failures


def guard_on(store: Store, writer: str = "poller") -> AuthGuard:
    return AuthGuard(SPEC, writer, store.state(), store.state, store.commit, lambda: 1)


def limiter() -> RateLimiter:
    return RateLimiter(RateLimit(100, 0.001), margin=0.0)


class Exchange:
    """Answers from a script; counts what was sent."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.sent = 0

    def __call__(self) -> str:
        self.sent += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"connector": "c", **labels})
    return 0.0 if value is None else value


def test_a_success_proves_the_credentials_and_leaves_nothing_counted() -> None:
    store, metrics = Store(), Metrics()
    calls = GuardedCalls(guard_on(store), metrics, "c")
    exchange = Exchange("ok", "ok")
    assert calls.call_blocking(limiter(), exchange) == "ok"
    assert store.counted() == 0
    assert calls.guard is not None and calls.guard.verified
    writes = len(store.records)
    assert calls.call_blocking(limiter(), exchange) == "ok"
    assert len(store.records) == writes  # verified: no more reservations
    assert exchange.sent == 2


def test_an_unauthorized_answer_counts_stops_signed_calls_and_is_reported() -> None:
    store, metrics = Store(), Metrics()
    calls = GuardedCalls(guard_on(store), metrics, "c")
    exchange = Exchange(AuthError("HTTP 401"), "never sent")
    with pytest.raises(AuthError):
        calls.call_blocking(limiter(), exchange)
    assert store.counted() == 1
    assert metric(metrics, "connector_auth_failures_total") == 1
    assert metric(metrics, "connector_auth_guard_tripped") == 1
    with pytest.raises(GuardRefused):
        calls.call_blocking(limiter(), exchange)
    assert exchange.sent == 1  # the refusal sent nothing


def test_an_answer_that_says_nothing_takes_the_reservation_back() -> None:
    store, metrics = Store(), Metrics()
    calls = GuardedCalls(guard_on(store), metrics, "c")
    for error in (RetriableError("HTTP 503"), RejectedError(400, "bad price")):
        with pytest.raises(type(error)):
            calls.call_blocking(limiter(), Exchange(error))
        assert store.counted() == 0
    assert metric(metrics, "connector_auth_failures_total") == 0


def test_a_budget_spent_by_another_process_refuses_before_sending() -> None:
    store = Store()
    for _run in range(2):  # two runs of the sink, each refused once
        sink = guard_on(store, writer="sink")
        sink.before_request()
        sink.settle(AuthError("HTTP 401"))
    assert store.counted() == 2
    calls = GuardedCalls(guard_on(store), Metrics(), "c")
    exchange = Exchange("ok")
    with pytest.raises(GuardRefused):
        calls.call_blocking(limiter(), exchange)
    assert exchange.sent == 0


def test_the_async_path_reports_outcomes_instead_of_raising() -> None:
    store, metrics = Store(), Metrics()

    async def scenario() -> list[Outcome[str]]:
        calls = GuardedCalls(guard_on(store), metrics, "c")
        lim = limiter()
        exchange = Exchange("ok", RetriableError("timeout"), AuthError("401"))
        public = Exchange(RejectedError(404, "no such path"))
        return [
            await calls.call(lim, public, signed=False),
            await calls.call(lim, exchange, signed=True),
            await calls.call(lim, exchange, signed=True),
            await calls.call(lim, exchange, signed=True),
            await calls.call(lim, exchange, signed=True),  # refused: nothing sent
        ]

    public, ok, failed, unauthorized, refused = asyncio.run(scenario())
    assert isinstance(public.error, RejectedError) and public.error.status == 404
    assert ok == Outcome("ok")
    assert isinstance(failed.error, RetriableError) and not failed.refused
    assert unauthorized.refused and unauthorized.error is None
    assert refused == Outcome(refused=True)
    assert store.counted() == 1
    assert metric(metrics, "connector_auth_failures_total") == 1


def test_the_reset_watcher_reopens_after_an_operator_reset_at_most_once_per_recheck() -> None:
    store, metrics = Store(), Metrics()
    guard = guard_on(store)
    guard.before_request()
    guard.settle(AuthError("HTTP 401"))
    now = [0.0]
    reads = [0]

    def read() -> dict[bytes, bytes | None]:
        reads[0] += 1
        return store.state()

    watcher = ResetWatcher(guard, read, metrics, "c", recheck_s=5.0, monotonic=lambda: now[0])
    assert watcher.look_if_due() is False and reads[0] == 1  # the first look is at once
    store.commit(reset_records(SPEC, view_of(store.state(), SPEC), now_ms=2))
    now[0] = 4.9
    assert watcher.look_if_due() is False and reads[0] == 1  # not due yet
    now[0] = 5.0
    assert watcher.look_if_due() is True
    assert not guard.blocked
    now[0] = 20.0
    assert watcher.look_if_due() is False and reads[0] == 2  # open: nothing to read


def test_a_watcher_that_cannot_read_kafka_keeps_refusing() -> None:
    store = Store()
    guard = guard_on(store)
    guard.before_request()
    guard.settle(AuthError("HTTP 401"))

    def down() -> dict[bytes, bytes | None]:
        raise RetriableError("Kafka not reachable")

    assert ResetWatcher(guard, down, Metrics(), "c", recheck_s=1.0).look() is False
    assert guard.blocked


# -- records of one answer -----------------------------------------------------------------------


@dataclass(frozen=True)
class ToyStream:
    name: str
    channel: str
    topic: str
    interval_s: float
    request: Request
    rule: Rule

    def rows(self, payload: Any) -> Sequence[Any]:
        return list(payload["rows"])


class ToyExchange:
    exchange = "toy"
    settings = PollSettings()
    rate_classes = {"all": RateClass(RateLimit(1, 0.1), 0.0)}
    dead_letter_topic = "toy.dlq"
    state_topic = "toy.state"
    transactional_id = "toy-poller"

    def __init__(self) -> None:
        self.streams = [
            ToyStream(
                "trades",
                "trade",
                "toy.trades",
                1.0,
                Request("trades", "/trades", True, "all"),
                Incremental(parse, AfterId()),
            )
        ]

    def guard_spec(self) -> GuardSpec | None:
        return SPEC

    def attach(self, ctx: Any) -> None: ...

    def call(self, request: Request) -> Any: ...

    def misconfigured(self, error: RejectedError) -> str | None:
        return None

    def close(self) -> None: ...


def toy_source(epoch: int) -> tuple[PollingSource, Metrics]:
    metrics = Metrics()
    source = PollingSource(ToyExchange())
    source.ctx = SimpleNamespace(name="c", metrics=metrics)  # type: ignore[assignment]
    source._partitions = {"toy.trades": [0, 1, 2]}
    source._epoch = epoch
    return source, metrics


def test_records_carry_the_envelope_receive_time_and_schema() -> None:
    source, metrics = toy_source(epoch=10)
    stream = source.streams[0]
    out, state = source.records_of(stream, [{**row(1), "t": 990}, {"id": 2}], now_ms=1000)
    event, dead = out
    assert event.topic == "toy.trades" and event.key == b"btc-usd"
    assert event.timestamp_ms == 1000  # Kafka timestamp = poll time
    assert json.loads(event.value or b"") == {
        "exchange": "toy",
        "channel": "trade",
        "kind": "event",
        "symbol": "btc-usd",
        "event_time_ms": 990,
        "receive_time_ms": 1000,
        "resync_epoch": 10,
        "data": {"pair": "btc-usd", "price": "1.5"},
    }
    assert dict(event.headers)["schema"] == b"toy.trade/v1"
    assert dead.topic == "toy.dlq"
    assert dict(dead.headers)["source"] == b"trades"
    assert dict(dead.headers)["error.reason"] == b"bad_row"
    assert state == {"cursor/trades": {"last": 2}}
    assert metric(metrics, "connector_dead_letters_total", reason="bad_row") == 1


def test_a_gap_starts_an_epoch_and_marks_every_partition_before_the_rows() -> None:
    source, metrics = toy_source(epoch=10)
    stream = source.streams[0]
    source._state["cursor/trades"] = {"last": 3}
    out, state = source.records_of(stream, [row(9), row(8)], now_ms=5000)
    markers = out[:3]
    assert [m.partition for m in markers] == [0, 1, 2]
    assert all(m.key is None and dict(m.headers)["kind"] == b"gap" for m in markers)
    marker = json.loads(markers[0].value or b"")
    assert marker["kind"] == "gap" and marker["symbol"] is None
    assert marker["data"] == {
        "reason": "window_overflow",
        "detail": "rows skipped",
        "previous_newest": 3,
    }
    assert marker["resync_epoch"] == 5000  # max(epoch + 1, now)
    rows_after = [json.loads(r.value or b"") for r in out[3:]]
    assert [r["resync_epoch"] for r in rows_after] == [5000, 5000]
    assert state == {"cursor/trades": {"last": 9}, "epoch": 5000}
    assert metric(metrics, "connector_gaps_total", reason="window_overflow") == 1


def test_the_toy_exchange_declares_its_topics() -> None:
    source = PollingSource(ToyExchange())
    assert source.transactional_id == "toy-poller"
    assert source.topics() == {
        "toy.trades": {},
        "toy.dlq": {},
        "toy.state": {"cleanup.policy": "compact"},
        "guard": {"cleanup.policy": "compact"},
    }
