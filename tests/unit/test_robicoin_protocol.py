"""Pure Robicoin protocol: signing, exact decimals, local times, classification, cursors."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.robicoin import protocol
from connectors.robicoin.protocol import Cursor, Verdict
from connectors.robicoin.signing import auth_fields, hash_matches, sign
from connectors.runtime.errors import BadMessage

FIXTURES = Path(__file__).parents[1] / "fixtures" / "robicoin"
IST = ZoneInfo("Europe/Istanbul")


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text(encoding="utf-8")


def rows_of(name: str) -> list[Any]:
    return protocol.data_rows(protocol.decode(fixture(name)))


# -- signing -----------------------------------------------------------------------------


def test_signing_matches_the_spec_test_vector() -> None:
    assert sign("PUBKEY", "42", 1524922783, "SECRET") == "cc7c90d68f4e112488b26cc28b4143e3"


def test_auth_fields_carry_the_hash_for_the_given_time() -> None:
    fields = auth_fields("PUBKEY", "42", "SECRET", 1524922783)
    assert fields == {
        "public_key": "PUBKEY",
        "public_id": "42",
        "time": "1524922783",
        "hash": "cc7c90d68f4e112488b26cc28b4143e3",
    }
    assert hash_matches("PUBKEY", "42", "1524922783", "SECRET", fields["hash"])
    assert not hash_matches("PUBKEY", "42", "1524922784", "SECRET", fields["hash"])
    assert not hash_matches("PUBKEY", "42", "1524922783", "secret", fields["hash"])


# -- exact numbers -----------------------------------------------------------------------


def test_ticker_numbers_keep_their_exact_text() -> None:
    rows = rows_of("spec_ticker.json")
    first = protocol.parse_ticker(rows[0], "24h")
    assert first.data() == {
        "pair": "btc-try",
        "window": "24h",
        "high": "20950.00",
        "low": "20500.00",
        "last": "20659.95",
        "bid": "20556.51",
        "ask": "20659.95",
        "volume": "142.95",
        "average": "20761.68",
    }
    second = protocol.parse_ticker(rows[1], "1min")
    # These would change through float: 1234567.1234567890 / 142.95 / 1e-07.
    assert second.high == "1234567.12345678901234"
    assert second.volume == "142.95000000000001"
    assert second.bid == "1e-7"
    assert second.low == "7"
    assert str(float(second.high)) != second.high
    assert Decimal(second.volume) == Decimal("142.95000000000001")


@pytest.mark.parametrize("bad", ['"abc"', "NaN", "Infinity", "true", "null", '"1,5"', '""'])
def test_a_ticker_value_that_is_not_a_decimal_is_refused(bad: str) -> None:
    text = (
        '{"data":[{"type":"btc-try","high":1,"last":1,"bid":1,"volume":1,"low":1,'
        f'"ask":1,"avarage":{bad}}}]}}'
    )
    with pytest.raises((BadMessage, ValueError)):
        protocol.parse_ticker(protocol.data_rows(protocol.decode(text))[0], "24h")


# -- times -------------------------------------------------------------------------------


def test_istanbul_local_time_becomes_the_right_utc_instant() -> None:
    # 2018-02-19 21:11:44 in Istanbul (UTC+3) is 18:11:44 UTC.
    assert protocol.local_time_ms("2018-02-19 21:11:44", IST, "t") == 1519063904000
    # Before 2016 Istanbul observed DST: 2015-07-01 12:00 was UTC+3 (EEST), 09:00 UTC.
    assert protocol.local_time_ms("2015-07-01 12:00:00", IST, "t") == 1435741200000
    # ... and 2015-01-01 12:00 was UTC+2 (EET), 10:00 UTC.
    assert protocol.local_time_ms("2015-01-01 12:00:00", IST, "t") == 1420106400000


def test_the_zone_is_configurable() -> None:
    assert protocol.local_time_ms("2018-02-19 21:11:44", ZoneInfo("UTC"), "t") == 1519074704000


@pytest.mark.parametrize("bad", ["2018-02-19T21:11:44", "2018-02-30 10:00:00", "", None, 17])
def test_bad_times_are_refused(bad: Any) -> None:
    with pytest.raises(BadMessage):
        protocol.local_time_ms(bad, IST, "created_at")


# -- rows --------------------------------------------------------------------------------


def test_transactions_parse_with_both_times_and_null_txid() -> None:
    # 02:55:38 in Istanbul is 23:55:38 UTC the day before.
    trade, withdraw = (protocol.parse_transaction(r, IST) for r in rows_of("spec_transaction.json"))
    assert trade.key == "btc-try"
    assert trade.data == {
        "zone": "maker",
        "pair": "btc-try",
        "amount": "3.00000000",
        "price": "5500.00000000",
        "total": "16500.00000000",
        "fee": "16.50000000",
        "status": "approved",
        "txid": None,
        "created_at": "2018-02-19 02:55:38",
        "created_at_ms": 1518998138000,
        "updated_at": "2018-02-19 02:55:38",
        "updated_at_ms": 1518998138000,
    }
    assert trade.event_time_ms == 1518998138000
    assert withdraw.data["txid"] == "0x162da82adc089cf6480f08d5745bc9c08c"
    assert withdraw.key == "eth-eth"


def test_orders_balances_and_open_orders_parse() -> None:
    order = protocol.parse_order(rows_of("spec_order.json")[0], IST)
    assert (order.key, order.data["side"], order.data["price"]) == (
        "btc-try",
        "sell",
        "12000.00000000",
    )
    balances = [protocol.parse_balance(r) for r in rows_of("spec_balance.json")]
    assert [b.key for b in balances] == ["try", "btc", "eth"]
    assert balances[0].data["reserved_balance"] == "10000.00000000"
    assert balances[2].data["status"] == "passive"
    open_order = protocol.parse_open_order(rows_of("spec_open_order.json")[0], IST)
    assert open_order.data["data_id"] == 18
    assert open_order.data["created_at_ms"] == 1519065259000


def test_malformed_rows_are_refused_one_by_one_with_a_reason() -> None:
    reasons = []
    for row in rows_of("malformed_rows.json"):
        with pytest.raises(BadMessage) as info:
            protocol.parse_transaction(row, IST)
        reasons.append(info.value.reason)
    # A decimal comma, a foreign time format, NaN, a row that is not an object.
    assert reasons == ["bad_decimal", "bad_time", "bad_decimal", "bad_row"]


def test_a_money_field_sent_as_a_json_number_keeps_its_exact_text() -> None:
    row = rows_of("spec_transaction.json")[0] | {"amount": protocol.decode("3.10000000000000001")}
    assert protocol.parse_transaction(row, IST).data["amount"] == "3.10000000000000001"


@pytest.mark.parametrize("text", ['{"error": "x"}', "[]", '{"data": {}}', '"data"'])
def test_an_answer_without_a_data_list_is_a_bad_message(text: str) -> None:
    with pytest.raises(BadMessage):
        protocol.data_rows(protocol.decode(text))


# -- classification ----------------------------------------------------------------------

TICKER = protocol.ticker_endpoint("24h")


@pytest.mark.parametrize(
    ("endpoint", "status", "body", "outcome"),
    [
        (protocol.BALANCE, 200, '{"data": []}', Verdict.OK),
        (protocol.BALANCE, 429, "", Verdict.RATE_LIMITED),
        (protocol.BALANCE, 500, "", Verdict.RETRIABLE),
        (protocol.BALANCE, 503, "<html>", Verdict.RETRIABLE),
        (protocol.BALANCE, 401, "", Verdict.UNAUTHORIZED),
        (protocol.BALANCE, 403, '{"error": "IP blocked"}', Verdict.UNAUTHORIZED),
        # A poll carries nothing but the credentials: any other 4xx is about them.
        (protocol.BALANCE, 400, '{"error": "bad request"}', Verdict.UNAUTHORIZED),
        (protocol.BALANCE, 404, "", Verdict.NOT_FOUND),
        (protocol.CREATE_ORDER, 400, '{"error": "amount too small"}', Verdict.REJECTED),
        (protocol.CREATE_ORDER, 400, '{"error": "Invalid hash"}', Verdict.UNAUTHORIZED),
        (protocol.DELETE_ORDER, 404, '{"error": "Order not found"}', Verdict.NOT_FOUND),
        (TICKER, 400, "", Verdict.REJECTED),
        (TICKER, 429, "", Verdict.RATE_LIMITED),
    ],
)
def test_answers_are_classified_in_one_place(
    endpoint: protocol.Endpoint, status: int, body: str, outcome: Verdict
) -> None:
    assert protocol.classify(endpoint, status, body) is outcome


def test_error_messages_are_short_and_single_line() -> None:
    assert protocol.error_message('{"error": "Unauthorized"}') == "Unauthorized"
    assert protocol.error_message("<html>\n<b>oops</b>\n</html>") == "<html> <b>oops</b> </html>"
    assert len(protocol.error_message("x" * 500)) == 80


# -- cursors -----------------------------------------------------------------------------


def tx(second: int, amount: str = "1.00000000", zone: str = "maker") -> dict[str, Any]:
    stamp = f"2026-01-01 10:{second // 60:02d}:{second % 60:02d}"
    return {
        "zone": zone,
        "type": "btc-try",
        "amount": amount,
        "price": "100.00000000",
        "total": "100.00000000",
        "fee": "0.10000000",
        "status": "approved",
        "txid": None,
        "updated_at": stamp,
        "created_at": stamp,
    }


def window(history: list[dict[str, Any]], size: int = 25) -> list[dict[str, Any]]:
    """What the exchange shows: the last ``size`` rows, newest first."""
    return list(reversed(history[-size:]))


def test_first_poll_emits_the_window_oldest_first() -> None:
    history = [tx(i) for i in range(5)]
    step = protocol.advance(Cursor(), window(history), "created_at")
    assert step.new_rows == history
    assert step.cursor.newest == "2026-01-01 10:00:04"
    assert not step.gap


def test_only_new_rows_are_emitted_and_rows_of_the_same_second_are_counted() -> None:
    history = [tx(1), tx(2, "1.5"), tx(2, "2.5")]
    first = protocol.advance(Cursor(), window(history), "created_at")
    # Later in the same second: a row identical to one already written, and a new one.
    history += [tx(2, "1.5"), tx(3)]
    second = protocol.advance(first.cursor, window(history), "created_at")
    assert second.new_rows == [tx(2, "1.5"), tx(3)]
    third = protocol.advance(second.cursor, window(history), "created_at")
    assert third.new_rows == []


def test_cursor_survives_a_json_round_trip() -> None:
    history = [tx(1), tx(1), tx(2)]
    step = protocol.advance(Cursor(), window(history), "created_at")
    restored = Cursor.from_json(json.loads(json.dumps(step.cursor.to_json())))
    assert restored == step.cursor
    assert protocol.advance(restored, window(history), "created_at").new_rows == []


def test_a_burst_larger_than_the_window_is_a_gap() -> None:
    history = [tx(i) for i in range(10)]
    step = protocol.advance(Cursor(), window(history), "created_at")
    history += [tx(20, f"{i}.0") for i in range(1, 41)]  # 40 transactions in one second
    burst = protocol.advance(step.cursor, window(history), "created_at")
    assert burst.gap
    assert len(burst.new_rows) == 25


def test_a_full_window_that_reaches_back_past_the_cursor_is_not_a_gap() -> None:
    history = [tx(i) for i in range(10)]
    step = protocol.advance(Cursor(), window(history), "created_at")
    history += [tx(20, f"{i}.0") for i in range(1, 24)]  # 23 new: the window still overlaps
    after = protocol.advance(step.cursor, window(history), "created_at")
    assert not after.gap
    assert after.new_rows == history[10:]


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[int]]:
    """A transaction history (seconds never go back, identical rows allowed) and the
    indexes at which it is polled (the first one inside the first window)."""
    rows: list[dict[str, Any]] = []
    second = 0
    for _ in range(draw(st.integers(1, 120))):
        second += draw(st.sampled_from([0, 0, 1, 2]))
        rows.append(tx(second, draw(st.sampled_from(["1.0", "2.0", "3.0"]))))
    polls = sorted(set(draw(st.lists(st.integers(1, len(rows)), min_size=1, max_size=30))))
    polls = [p for p in polls if p > polls[0] - 1]
    if polls[0] > 25:
        polls.insert(0, draw(st.integers(1, 25)))
    if polls[-1] != len(rows):
        polls.append(len(rows))
    return rows, polls


@settings(max_examples=300, deadline=None)
@given(histories())
def test_without_a_gap_flag_every_row_is_emitted_exactly_once(
    case: tuple[list[dict[str, Any]], list[int]],
) -> None:
    history, polls = case
    cursor = Cursor()
    emitted: list[dict[str, Any]] = []
    gaps = 0
    for upto in polls:
        # Persist and restore the cursor at every poll: restarts must not matter.
        cursor = Cursor.from_json(json.loads(json.dumps(cursor.to_json())))
        step = protocol.advance(cursor, window(history[:upto]), "created_at")
        emitted.extend(step.new_rows)
        gaps += step.gap
        cursor = step.cursor
    if gaps == 0:
        assert emitted == history
    else:
        # With a gap some rows may be missing, but nothing is ever written twice
        # beyond what the history itself repeats.
        assert len(emitted) <= len(history)


def test_diff_keys_reports_opened_changed_closed_and_scrolled_out() -> None:
    previous = {str(i): "a" for i in range(10, 35)}  # 25 open orders, ids 10..34
    current = {str(i): "a" for i in range(11, 36)}  # 35 opened, 10 scrolled out
    current["20"] = "b"
    changes = protocol.diff_keys(previous, current, window_full=True)
    assert sorted(changes) == [("10", "out_of_window"), ("20", "changed"), ("35", "opened")]
    # Not a full window: a missing order really closed.
    assert protocol.diff_keys({"1": "a"}, {}, window_full=False) == [("1", "closed")]


def test_a_row_without_a_usable_time_is_new_once_and_never_moves_the_cursor() -> None:
    history = [tx(1), tx(2)]
    step = protocol.advance(Cursor(), window(history), "created_at")
    broken = tx(3) | {"created_at": "19.02.2018 02:55"}
    history += [broken]
    once = protocol.advance(step.cursor, window(history), "created_at")
    assert once.new_rows == [broken]
    assert once.cursor.newest == step.cursor.newest
    history += [tx(4)]
    later = protocol.advance(
        Cursor.from_json(json.loads(json.dumps(once.cursor.to_json()))),
        window(history),
        "created_at",
    )
    # Later rows are still new; the broken one is not handed out again.
    assert later.new_rows == [tx(4)]
