"""The sans-I/O stream session, driven with recorded Cryptomus frames and no socket.

Every frame here is either from the exchange's documentation (``tests/fixtures``) or
the same shape with another id; the clock is a number the test passes in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from connectors.cryptomus.protocol import CryptomusDialect
from connectors.runtime.errors import BadMessage, RetriableError
from connectors.runtime.session import Plan, Session

FIXTURES = Path(__file__).parents[1] / "fixtures" / "cryptomus"
PLAN = Plan(
    {"trade": ["all"], "depth": ["BTC_USDT:0"]},
    {"trade": ["BTC_USDT", "ETH_USDT"], "depth": ["BTC_USDT"]},
)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def answer(req_id: int, method: str | None = None, error: dict | None = None) -> str:
    body = {"id": req_id, "data": None if error else {"status": "success"}, "error": error}
    if method:
        body["method"] = method
    return json.dumps(body)


def started(now: float = 100.0) -> tuple[Session, list[dict]]:
    session = Session(CryptomusDialect(), PLAN, request_timeout_s=10)
    session.subscribe(now)
    return session, [json.loads(f) for f in session.data_to_send()]


def test_one_subscribe_per_channel_then_subscribed_when_every_answer_is_yes() -> None:
    session, sent = started()
    assert [(r["method"], r["params"]) for r in sent] == [
        ("trade_subscribe", ["all"]),
        ("depth_subscribe", ["BTC_USDT:0"]),
    ]
    assert not session.subscribed
    session.receive(answer(sent[0]["id"], "trade_subscribe"), 101)
    assert not session.subscribed
    session.receive(answer(sent[1]["id"], "depth_subscribe"), 101)
    assert session.subscribed and session.data_to_send() == []


def test_updates_arrive_before_the_answer_and_are_records_at_once() -> None:
    session, _ = started()
    events = session.receive(fixture("trade_update.json"), 100.5)
    assert [(e.channel, e.key, e.data["price"]) for e in events] == [
        ("trade", "BTC_USDT", "107100.01")
    ]
    assert session.data_seen


def test_a_refused_subscribe_is_retried_once_after_an_unsubscribe() -> None:
    session, sent = started()
    refused = {"code": 1, "message": "already subscribed"}
    session.receive(answer(sent[0]["id"], "trade_subscribe", refused), 101)
    assert [e.error.code for e in session.errors if e.error] == [1]
    (unsub,) = [json.loads(f) for f in session.data_to_send()]
    assert unsub["method"] == "trade_unsubscribe"
    session.receive(answer(unsub["id"]), 102)
    (again,) = [json.loads(f) for f in session.data_to_send()]
    assert (again["method"], again["params"]) == ("trade_subscribe", ["all"])
    session.receive(answer(again["id"], "trade_subscribe", refused), 103)
    with pytest.raises(RetriableError, match="trade subscription refused: code 1"):
        session.check(103)


def test_an_unanswered_request_fails_the_connection_after_its_deadline() -> None:
    session, sent = started(now=100)
    session.receive(answer(sent[0]["id"], "trade_subscribe"), 101)
    session.check(109.9)  # still within request_timeout_s
    with pytest.raises(RetriableError, match="no answer"):
        session.check(110.1)


def test_pongs_give_round_trip_times_even_without_an_echoed_id() -> None:
    session, _ = started()
    session.ping(200.0)
    (ping,) = [json.loads(f) for f in session.data_to_send()]
    assert ping["method"] == "ping"
    assert session.oldest_ping() == 200.0
    session.receive(fixture("pong.json"), 200.25)  # the documentation's pong has id 0
    assert session.rtts == [pytest.approx(0.25)]
    assert session.oldest_ping() is None


def test_data_of_a_channel_not_subscribed_is_refused() -> None:
    session, _ = started()
    with pytest.raises(BadMessage) as refused:
        session.receive(fixture("lastprice_update.json"), 101)
    assert refused.value.reason == "not_subscribed"


def test_a_changed_plan_moves_only_the_changed_channels_and_names_their_keys() -> None:
    session, sent = started()
    for request in sent:
        session.receive(answer(request["id"], request["method"]), 101)
    new = Plan(
        {"trade": ["all"], "depth": ["BTC_USDT:0", "SOL_USDT:0"]},
        {"trade": ["BTC_USDT", "ETH_USDT"], "depth": ["BTC_USDT", "SOL_USDT"]},
    )
    assert session.change_plan(new, 200) == {"depth": ["BTC_USDT", "SOL_USDT"]}
    (unsub,) = [json.loads(f) for f in session.data_to_send()]
    assert unsub["method"] == "depth_unsubscribe"
    assert not session.subscribed
    session.receive(answer(unsub["id"]), 201)
    (sub,) = [json.loads(f) for f in session.data_to_send()]
    assert (sub["method"], sub["params"]) == ("depth_subscribe", ["BTC_USDT:0", "SOL_USDT:0"])
    session.receive(answer(sub["id"], "depth_subscribe"), 202)
    assert session.subscribed


def test_a_refused_move_fails_the_connection() -> None:
    session, sent = started()
    for request in sent:
        session.receive(answer(request["id"], request["method"]), 101)
    new = Plan({"trade": ["BTC_USDT"], "depth": ["BTC_USDT:0"]}, PLAN.keys)
    session.change_plan(new, 200)
    (unsub,) = [json.loads(f) for f in session.data_to_send()]
    session.receive(answer(unsub["id"], None, {"code": 2, "message": "no"}), 201)
    with pytest.raises(RetriableError, match="subscription change refused"):
        session.check(201)
