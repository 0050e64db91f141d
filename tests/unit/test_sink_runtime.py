"""The generic pieces of the command sink, without a broker or an exchange.

The pure rules (:mod:`connectors.runtime.ledger`: ledger entries and their bytes,
claims, control, risk limits, expiry) are fed values; the sink's decisions
(:class:`~connectors.runtime.sink.CommandSink`: what is committed before a call, when
the handler is asked to reconcile, what is never sent again) run with a toy handler,
an in-memory stand-in for Kafka transactions and the guard topic. Nothing here opens
a socket.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from connectors.robicoin import commands as robicoin_commands
from connectors.runtime import ledger
from connectors.runtime.authguard import AuthGuard, GuardSpec, WriterEntry, writer_record
from connectors.runtime.guarded import GuardedCalls
from connectors.runtime.ledger import (
    Ambiguous,
    CommandRefused,
    Control,
    Decision,
    Exposure,
    Facts,
    Ledger,
    Risk,
    RiskLimits,
    expired,
)
from connectors.runtime.metrics import Metrics
from connectors.runtime.polling import RateClass
from connectors.runtime.ratelimit import RateLimit, RateLimiter
from connectors.runtime.records import OutRecord
from connectors.runtime.sink import Calls, CommandSink, CommandTopics, SinkSettings, Stopping

NOW = 1_750_953_177_042


@dataclass(frozen=True)
class Order:
    """A toy command: ``buy`` adds exposure and is not idempotent; ``cancel`` is both
    harmless to repeat and free of exposure."""

    command_id: str
    action: str = "buy"
    market: str = "btc-usd"
    amount: str = "1"
    created_at_ms: int = NOW
    expires_at_ms: int | None = None


def buy_facts(cmd: Order) -> Facts:
    return Facts({"market": cmd.market}, {"amount": cmd.amount})


# -- ledger entries ------------------------------------------------------------------------


def test_entries_are_compact_json_with_sorted_keys() -> None:
    entry = Ledger.pending(Order("c-1"), buy_facts(Order("c-1")), pending_at_ms=NOW)
    rec = ledger.record("orders.ledger", "c-1", entry, now_ms=NOW + 5)
    assert rec.key == b"c-1" and rec.topic == "orders.ledger"
    assert rec.timestamp_ms == NOW + 5 and rec.channel == "ledger"
    assert rec.value == (
        b'{"action":"buy","amount":"1","market":"btc-usd",'
        b'"pending_at_ms":1750953177042,"state":"pending"}'
    )


def test_a_robicoin_ledger_written_before_the_split_reads_and_decides_the_same() -> None:
    """Entries as the order sink wrote them before the runtime existed: a create's
    pending entry gets its outcome with the same bytes as then (an existing ledger
    resumes), and a delete keeps the data_id it was pending with."""
    cmd = robicoin_commands.CreateOrder(
        "c-7", "btc-try", "sell", "0.5", "2150000.5", False, "0", NOW, None
    )
    old_pending = (
        b'{"action":"create","amount":"0.5","pair":"btc-try","pending_at_ms":1750953177042,'
        b'"price":"2150000.5","side":"sell","state":"pending"}'
    )
    facts = Facts({"pair": "btc-try"}, {"side": "sell", "amount": "0.5", "price": "2150000.5"})
    assert ledger.encode(Ledger.pending(cmd, facts, NOW)) == old_pending
    book = Ledger.read({b"c-7": old_pending})
    final = book.final("c-7", cmd, facts, Decision("accepted", attempts=1), NOW + 900)
    assert ledger.encode(final) == (
        b'{"action":"create","amount":"0.5","decided_at_ms":1750953177942,'
        b'"outcome":"accepted","pair":"btc-try","pending_at_ms":1750953177042,'
        b'"price":"2150000.5","side":"sell","state":"final"}'
    )
    delete = robicoin_commands.DeleteOrder("d-1", "btc-try", 18, NOW, None)
    pending = (
        b'{"action":"delete","data_id":18,"pair":"btc-try","pending_at_ms":1,"state":"pending"}'
    )
    book = Ledger.read({b"d-1": pending})
    failed = Decision("failed", "unauthorized", "HTTP 401", attempts=1)
    entry = book.final(
        "d-1", delete, Facts({"pair": "btc-try"}, at_pending={"data_id": 18}), failed, 2
    )
    assert entry["data_id"] == 18 and entry["pending_at_ms"] == 1


def test_an_outcome_keeps_the_identity_rewrites_the_shape_and_adds_what_it_learned() -> None:
    book = Ledger()
    cmd = Order("c-1", amount="2")
    book.put("c-1", {"state": "pending", "action": "sell", "market": "eth-usd", "amount": "1"})
    decision = Decision("accepted", "reconciled", reconciled=True, learned={"order_id": 5})
    entry = book.final("c-1", cmd, buy_facts(cmd), decision, decided_at_ms=9)
    assert entry == {
        "state": "final",
        "outcome": "accepted",
        "decided_at_ms": 9,
        "action": "sell",  # what the pending entry said stays
        "market": "eth-usd",
        "amount": "2",  # the shape is written again
        "order_id": 5,
    }


def test_an_outcome_without_a_pending_entry_has_no_pending_only_fields() -> None:
    cmd = Order("c-2", action="cancel")
    facts = Facts({"market": "btc-usd"}, at_pending={"order_id": 3})
    entry = Ledger().final("c-2", cmd, facts, Decision("expired", "too_old"), decided_at_ms=4)
    assert entry == {
        "state": "final",
        "outcome": "expired",
        "decided_at_ms": 4,
        "action": "cancel",
        "market": "btc-usd",
    }
    # A refused command (nothing parsed) records only its outcome.
    refused = Ledger().final("c-3", None, None, Decision("rejected", "bad_decimal"), 4)
    assert refused == {"state": "final", "outcome": "rejected", "decided_at_ms": 4}


def test_unreadable_entries_count_as_decided_and_deleted_ones_are_gone() -> None:
    book = Ledger.read(
        {
            b"a": b"not json",
            b"b": b"[1, 2]",
            b"c": b'{"state":"pending","pending_at_ms":5}',
            b"d": None,
        }
    )
    assert book.get("a") == {"state": "final", "outcome": "unknown"}
    assert book.get("b") == {"state": "final", "outcome": "unknown"}
    assert "d" not in book and len(book) == 3
    assert book.pending_ids() == ["c"]


def test_claimed_counts_other_accepted_commands_of_the_same_shape_since_a_time() -> None:
    book = Ledger()
    cmd = Order("me")
    facts = buy_facts(cmd)
    same = {"state": "final", "outcome": "accepted", "action": "buy", "market": "btc-usd"}
    book.put("a", {**same, "amount": "1", "decided_at_ms": 100})
    book.put("b", {**same, "amount": "1", "decided_at_ms": 99})  # before the window
    book.put("c", {**same, "amount": "2", "decided_at_ms": 100})  # another shape
    book.put("d", {**same, "amount": "1", "outcome": "failed", "decided_at_ms": 100})
    book.put("e", {**same, "amount": "1", "state": "pending", "decided_at_ms": 100})
    book.put("f", {**same, "amount": "1", "action": "cancel", "decided_at_ms": 100})
    book.put("me", {**same, "amount": "1", "decided_at_ms": 100})  # itself
    assert book.claimed("me", "buy", facts, since_ms=100) == 1
    assert book.claimed("me", "buy", facts, since_ms=0) == 2


# -- decisions, refusals, expiry -------------------------------------------------------------


def test_a_decision_holds_its_outcome_as_plain_text_and_checks_what_it_found() -> None:
    assert Decision(ledger.Outcome.ACCEPTED).outcome == "accepted"
    assert type(Decision(ledger.Outcome.ACCEPTED).outcome) is str
    with pytest.raises(ValueError):
        Decision("maybe")
    with pytest.raises(ValueError):
        Decision("accepted", found="perhaps")


def test_unsigned_and_forged_commands_are_not_trusted_with_their_id() -> None:
    assert CommandRefused("bad_pair", "x", "c-1").trusted
    for reason in ("unsigned", "bad_signature"):
        refused = robicoin_commands.Rejected(reason, "x", "c-1")
        assert isinstance(refused, CommandRefused) and not refused.trusted
    assert robicoin_commands.Rejected("bad_pair", "x", "c-1").trusted


def test_expiry_by_deadline_age_and_a_clock_in_the_future() -> None:
    assert expired(Order("c", expires_at_ms=NOW + 10), NOW + 9, None) is None
    assert expired(Order("c", expires_at_ms=NOW + 10), NOW + 10, None) == "expires_at_passed"
    assert expired(Order("c"), NOW + 5_000, 5_000) is None
    assert expired(Order("c"), NOW + 5_001, 5_000) == "too_old"
    assert expired(Order("c"), NOW - 5_001, 5_000) == "created_in_future"
    assert expired(Order("c"), NOW + 10**9, None) is None  # no maximum age


# -- control and risk ----------------------------------------------------------------------


def test_control_takes_each_change_in_order_and_ignores_what_is_not_a_boolean() -> None:
    control = Control()
    control.apply([{"trading_enabled": False, "by": "alice"}, {"paused": True}])
    assert (control.trading_enabled, control.paused) == (False, True)
    control.apply([{"trading_enabled": "yes", "paused": 0}, {"reason": "no fields"}])
    assert (control.trading_enabled, control.paused) == (False, True)
    control.apply([{"paused": False}, {"trading_enabled": True}, {"trading_enabled": False}])
    assert (control.trading_enabled, control.paused) == (False, False)


def test_risk_limits_refuse_value_amount_and_rate() -> None:
    risk = Risk(
        RiskLimits(
            max_notional=Decimal("1000"),
            max_amount={"btc-usd": Decimal("0.5")},
            max_per_minute=2,
        )
    )
    big = risk.check(Exposure("eth-usd", Decimal("1"), Decimal("1000.01")), now_s=0.0)
    assert big is not None and (big.outcome, big.reason) == ("rejected", "risk_max_notional")
    assert big.message == "order value 1000.01 above 1000"
    much = risk.check(Exposure("btc-usd", Decimal("0.51"), Decimal("1")), now_s=0.0)
    assert much is not None and much.reason == "risk_max_amount"
    assert much.message == "amount above 0.5 for btc-usd"
    ok = Exposure("btc-usd", Decimal("0.5"), Decimal("1000"))
    assert risk.check(ok, now_s=0.0) is None
    assert risk.check(ok, now_s=30.0) is None
    fast = risk.check(ok, now_s=59.0)
    assert fast is not None and fast.reason == "risk_rate"
    assert risk.check(ok, now_s=60.5) is None  # the first one left the minute
    assert Risk(RiskLimits()).check(Exposure("x", Decimal(10**9), Decimal(10**9)), 0.0) is None


# -- the sink's decisions, with a toy handler ---------------------------------------------------


class Journal:
    """Stands in for Kafka transactions and the guard topic; keeps what happened, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.records: list[OutRecord] = []

    def commit(self, batch: Sequence[OutRecord], offsets: Any = None, consumer: Any = None) -> None:
        self.records.extend(batch)
        for r in batch:
            self.events.append(f"commit {r.channel}")

    def state(self) -> dict[bytes, bytes | None]:
        return {r.key: r.value for r in self.records if r.channel == "auth_guard" and r.key}


@dataclass
class ToyHandler:
    """A command handler whose answers come from a script."""

    journal: Journal
    answers: list[Decision | Ambiguous] = field(default_factory=list)
    reconciled: list[tuple[str, int, Ambiguous | None]] = field(default_factory=list)
    name: str = "toy-orders"
    exchange: str = "toy"
    actions: tuple[str, ...] = ("buy", "cancel")
    result_schema: str = "toy.order-result/v1"
    transactional_id: str = "toy-orders-1"
    topics: CommandTopics = field(default_factory=lambda: CommandTopics("c", "r", "l", "d", "ctl"))
    settings: SinkSettings = field(
        default_factory=lambda: SinkSettings(
            group_id="g", rate=RateClass(RateLimit(100, 0.001), 0.0), command_max_age_s=0
        )
    )

    def guard_spec(self) -> GuardSpec:
        return GuardSpec("guard", "fp", limit=2)

    def attach(self, ctx: Any) -> None: ...

    def close(self) -> None: ...

    def parse(self, raw: bytes | None) -> Order:
        return Order(**json.loads(raw or b"{}"))

    def exposure(self, cmd: Order) -> Exposure | None:
        if cmd.action != "buy":
            return None
        return Exposure(cmd.market, Decimal(cmd.amount), Decimal(cmd.amount))

    def facts(self, cmd: Order) -> Facts:
        return buy_facts(cmd)

    def idempotent(self, cmd: Order) -> bool:
        return cmd.action == "cancel"

    def exchange_time_ms(self) -> int:
        return NOW

    def execute(self, cmd: Order, pending_at_ms: int, calls: Calls) -> Decision | Ambiguous:
        return calls.call(self._send)

    def _send(self) -> Decision | Ambiguous:
        self.journal.events.append("sent")
        return self.answers.pop(0)

    def reconcile(
        self, cmd: Order, pending_at_ms: int, ambiguous: Ambiguous | None, calls: Calls
    ) -> Decision:
        self.reconciled.append((cmd.command_id, pending_at_ms, ambiguous))
        return Decision("accepted", "reconciled", reconciled=True, found="found")

    def result(
        self,
        cmd: Order | None,
        command_id: str,
        decision: Decision,
        received_at_ms: int,
        decided_at_ms: int,
        source: Mapping[str, Any],
    ) -> Mapping[str, Any]:
        return {"command_id": command_id, "outcome": decision.outcome}


def toy_sink(
    *answers: Decision | Ambiguous, guard_failures: int = 0
) -> tuple[CommandSink[Order], ToyHandler, Journal, Metrics]:
    journal, metrics = Journal(), Metrics()
    handler = ToyHandler(journal, list(answers))
    sink = CommandSink(handler, clock=lambda: NOW / 1000)
    spec = handler.guard_spec()
    if guard_failures:  # another process spent the budget
        journal.commit([writer_record(spec, "poller", WriterEntry(0, guard_failures, 0, 1))])
    guard = AuthGuard(spec, "sink", journal.state(), journal.state, journal.commit, lambda: 1)
    sink.ctx = SimpleNamespace(  # type: ignore[assignment]
        name="c", metrics=metrics, transactions=journal
    )
    sink._guard = guard
    sink._calls = GuardedCalls(guard, metrics, "c")
    sink._limiter = RateLimiter(RateLimit(100, 0.001), margin=0.0)
    sink._m_in_flight = metrics.commands_in_flight.labels("c")
    sink._m_trading = metrics.trading_enabled.labels("c")
    sink._m_paused = metrics.paused.labels("c")
    return sink, handler, journal, metrics


class Switch:
    """The control topic, as the sink's reader hands it over."""

    def __init__(self, *changes: dict[str, Any]) -> None:
        self.pending = list(changes)

    def changes(self, timeout_ms: int) -> list[dict[str, Any]]:
        out, self.pending = self.pending, []
        return out


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"connector": "c", **labels})
    return 0.0 if value is None else value


def decide(sink: CommandSink[Order], cmd: Order, control: Any = None) -> Decision:
    reader: Any = control or Switch()  # what ControlReader.changes hands over
    return sink._decide(cmd, NOW, reader)


def test_pending_is_committed_before_the_exchange_is_called() -> None:
    sink, _, journal, metrics = toy_sink(Decision("accepted", attempts=1))
    out = decide(sink, Order("c-1"))
    assert out.outcome == "accepted"
    # the ledger's pending entry, the guard's reservation, the call, its success
    assert journal.events == ["commit ledger", "commit auth_guard", "sent", "commit auth_guard"]
    assert sink._ledger.get("c-1") == {
        "state": "pending",
        "action": "buy",
        "market": "btc-usd",
        "amount": "1",
        "pending_at_ms": NOW,
    }
    assert metric(metrics, "connector_commands_in_flight") == 1


def test_an_answer_of_unknown_effect_is_reconciled_and_never_sent_again() -> None:
    ambiguous = Ambiguous(attempts=1, exchange_ms=30_000, why="read timeout")
    sink, handler, journal, metrics = toy_sink(ambiguous)
    out = decide(sink, Order("c-1"))
    assert (out.outcome, out.reason) == ("accepted", "reconciled")
    assert journal.events.count("sent") == 1
    assert handler.reconciled == [("c-1", NOW, ambiguous)]
    assert metric(metrics, "connector_reconciliations_total", outcome="found") == 1


def test_a_command_found_pending_is_reconciled_unless_it_is_idempotent() -> None:
    sink, handler, journal, _ = toy_sink(Decision("accepted", attempts=1))
    entry = {"state": "pending", "pending_at_ms": 1234}
    out = sink._resume(Order("c-1"), entry)
    assert out.reason == "reconciled" and handler.reconciled == [("c-1", 1234, None)]
    assert "sent" not in journal.events
    out = sink._resume(Order("c-2", action="cancel"), entry)
    assert out.outcome == "accepted" and journal.events.count("sent") == 1
    assert len(handler.reconciled) == 1


def test_the_kill_switch_stops_exposure_and_lets_the_rest_through() -> None:
    sink, _, journal, metrics = toy_sink(Decision("accepted", attempts=1))
    off = Switch({"trading_enabled": False, "by": "alice"})
    out = decide(sink, Order("c-1"), off)
    assert (out.outcome, out.reason) == ("rejected", "kill_switch")
    assert journal.events == [] and sink._ledger.get("c-1") is None
    assert metric(metrics, "connector_trading_enabled") == 0
    assert decide(sink, Order("c-2", action="cancel"), off).outcome == "accepted"


def test_an_expired_command_is_never_sent() -> None:
    sink, _, journal, _ = toy_sink(Decision("accepted", attempts=1))
    out = decide(sink, Order("c-1", expires_at_ms=NOW))
    assert (out.outcome, out.reason) == ("expired", "expires_at_passed")
    assert journal.events == []


def test_a_guard_spent_elsewhere_leaves_the_command_in_kafka_unclaimed() -> None:
    sink, _, journal, metrics = toy_sink(Decision("accepted", attempts=1), guard_failures=2)
    with pytest.raises(Stopping):
        decide(sink, Order("c-1"))
    assert "sent" not in journal.events and sink._ledger.get("c-1") is None
    assert metric(metrics, "connector_auth_guard_tripped") == 1


def test_no_call_leaves_once_stop_was_requested() -> None:
    sink, _, journal, _ = toy_sink(Decision("accepted", attempts=1))
    sink._stop.set()
    send: Callable[[], str] = lambda: "sent"  # noqa: E731
    with pytest.raises(Stopping):
        sink.call(send)
    with pytest.raises(Stopping):
        sink.sleep(5.0)
    assert journal.events == []
