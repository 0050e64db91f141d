"""Pure protocol tests from the documentation's own frames (tests/fixtures/cryptomus)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors.cryptomus import protocol
from connectors.cryptomus.signing import sign
from connectors.runtime.errors import BadMessage, ConfigError
from connectors.testing.topics import strings_in

FIXTURES = Path(__file__).parents[1] / "fixtures" / "cryptomus"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def decimals_in_text(raw: str) -> set[str]:
    """Every decimal literal in the frame, quoted or bare, except ids and timestamps."""
    quoted = set(re.findall(r'"(-?\d+\.\d+|0)"', raw))
    bare = set(re.findall(r"(?<=[:\s])(-?\d+\.\d+)(?=[,\s}])", raw))
    return quoted | bare


@pytest.mark.parametrize(
    ("name", "channel", "key", "event_time_ms"),
    [
        ("lastprice_update.json", "lastprice", "BTC_USDT", 1750953362000),
        ("ticker_update.json", "ticker", "BTC_USDT", 1750953144000),
        ("depth_update.json", "depth", "BTC_USDT", 1750952911000),
        ("trade_update.json", "trade", "BTC_USDT", 1750953177000),
        ("order_created.json", "order", "TRX_USDT", 1750696376000),
        ("balance_update.json", "balance", "USDT", None),
        ("deal_update.json", "deal", "TRX_USDT", 1750774869000),
    ],
)
def test_update_fixture_keeps_every_decimal_byte_exact(
    name: str, channel: str, key: str, event_time_ms: int | None
) -> None:
    raw = fixture(name)
    frame = protocol.parse_frame(raw)
    assert isinstance(frame, protocol.Update)
    assert frame.channel == channel
    (event,) = frame.events
    assert event.key == key
    assert event.event_time_ms == event_time_ms
    out = strings_in(event.data)
    expected = decimals_in_text(raw)
    assert expected, "fixture has decimals"
    missing = expected - set(out)
    assert not missing, f"decimals lost or rewritten: {missing}"
    # No float anywhere: the encoded record must not change a digit either.
    encoded = json.dumps(event.data)
    for literal in expected:
        assert f'"{literal}"' in encoded


def test_trade_numbers_become_exact_strings() -> None:
    frame = protocol.parse_frame(fixture("trade_update.json"))
    assert isinstance(frame, protocol.Update)
    (trade,) = frame.events
    assert trade.data == {"price": "107100.01", "quantity": "0.000254", "side": "buy"}
    assert type(trade.data["price"]) is str


def test_depth_partial_update_keeps_zero_removal() -> None:
    frame = protocol.parse_frame(fixture("depth_update.json"))
    assert isinstance(frame, protocol.Update)
    data = frame.events[0].data
    assert data["full_reload"] is False
    assert data["scale_index"] == 0
    assert data["asks"] == [["107043.93", "0.304313"]]
    assert data["bids"] == [["106976.11", "0"]]


def test_order_fields_are_normalized() -> None:
    frame = protocol.parse_frame(fixture("order_created.json"))
    assert isinstance(frame, protocol.Update)
    data = frame.events[0].data
    assert data["event"] == "created"
    assert data["order_id"] == "01JYET5DQ772MPYHHE417FQF1J"
    assert data["side"] == "sell"
    assert data["price"] == "0.2200000000000000"
    assert data["client_order_id"] is None
    assert data["created_at_ms"] == 1750696376000


@pytest.mark.parametrize(
    "name",
    [
        "order_updated_malformed.json",
        "order_finished_malformed.json",
        "balance_subscribe_malformed.json",
    ],
)
def test_documentation_syntax_slips_are_invalid_json(name: str) -> None:
    with pytest.raises(BadMessage) as info:
        protocol.parse_frame(fixture(name))
    assert info.value.reason == "invalid_json"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not json at all", "invalid_json"),
        ("[1,2,3]", "invalid_frame"),
        ('{"id":1,"method":"candles_update","data":{},"error":null}', "unknown_method"),
        ('{"id":1,"method":"surprise","data":{},"error":null}', "unknown_method"),
        (
            '{"id":0,"method":"lastprice_update","data":{"symbol":"BTC_USDT",'
            '"timestamp":1750953362,"price":1.5e400.3},"error":null}',
            "invalid_json",
        ),
        (
            '{"id":0,"method":"lastprice_update","data":{"symbol":"BTC_USDT",'
            '"timestamp":1750953362,"price":"abc"},"error":null}',
            "invalid_payload",
        ),
        (
            '{"id":0,"method":"lastprice_update","data":{"symbol":"BTC_USDT",'
            '"timestamp":1750953362,"price":NaN},"error":null}',
            "invalid_json",
        ),
        (
            '{"id":0,"method":"ticker_update","data":{"symbol":"BTC_USDT","timestamp":1},'
            '"error":null}',
            "invalid_payload",
        ),
        ('{"id":0,"method":"trade_update","data":null,"error":null}', "invalid_payload"),
        (
            '{"id":0,"method":"depth_update","data":{"symbol":"X","timestamp":1,'
            '"full_reload":"yes","scale_index":0,"asks":[],"bids":[]},"error":null}',
            "invalid_payload",
        ),
    ],
)
def test_bad_frames_are_refused_with_a_reason(raw: str, reason: str) -> None:
    with pytest.raises(BadMessage) as info:
        protocol.parse_frame(raw)
    assert info.value.reason == reason


def test_replies_accept_int_and_string_ids_and_missing_method() -> None:
    pong = protocol.parse_frame(fixture("pong.json"))
    assert isinstance(pong, protocol.Reply) and pong.method == "pong" and pong.id == "0"
    sub = protocol.parse_frame(fixture("subscribe_ok.json"))
    assert isinstance(sub, protocol.Reply) and sub.ok and sub.data == {"status": "success"}
    unsub = protocol.parse_frame(fixture("unsubscribe_ok.json"))
    assert isinstance(unsub, protocol.Reply) and unsub.method is None and unsub.ok
    err = protocol.parse_frame(
        '{"id":"7","method":"trade_subscribe","data":null,"error":{"code":2,"message":"x"}}'
    )
    assert isinstance(err, protocol.Reply)
    assert err.id == "7" and not err.ok and err.error is not None and err.error.code == 2


def test_requests_match_the_documented_shape() -> None:
    assert json.loads(protocol.DIALECT.ping(0)) == {"id": 0, "method": "ping", "params": []}
    assert json.loads(protocol.DIALECT.subscribe(3, "depth", ["BTC_USDT:0", "ETH_USDT:1"])) == {
        "id": 3,
        "method": "depth_subscribe",
        "params": ["BTC_USDT:0", "ETH_USDT:1"],
    }
    assert json.loads(protocol.DIALECT.unsubscribe(4, "order")) == {
        "id": 4,
        "method": "order_unsubscribe",
        "params": ["all"],
    }


def test_rest_answers() -> None:
    assert protocol.parse_token(fixture("token.json")) == (
        "168b34a3a12370740ff1654f0d0c4726ff1bba8c4675edc0d7553f15e5a2a094"
    )
    assert protocol.parse_markets(fixture("markets.json")) == [
        protocol.Market("BTC_USDT", "BTC", "USDT")
    ]
    assert protocol.parse_scales(fixture("scales.json")) == {0: "0.01"}


def test_signing_test_vector() -> None:
    body = b'{"market":"TRX_USDT","quantity":"20"}'
    assert sign(body, "fixture-api-key") == "7a25ed96c474b99df63c8caad23459bc"


MARKETS = [
    protocol.Market("BTC_USDT", "BTC", "USDT"),
    protocol.Market("ETH_USDT", "ETH", "USDT"),
]


def test_plan_with_all_markets_uses_all_and_expands_depth() -> None:
    plan = protocol.plan_subscriptions(
        ["trade", "depth", "balance"], None, MARKETS, {"BTC_USDT": [0, 1], "ETH_USDT": [0]}, None
    )
    assert plan == {
        "trade": ["all"],
        "depth": ["BTC_USDT:0", "BTC_USDT:1", "ETH_USDT:0"],
        "balance": ["all"],
    }
    assert protocol.marker_keys("balance", ["all"], MARKETS) == ["BTC", "ETH", "USDT"]
    assert protocol.marker_keys("depth", plan["depth"], MARKETS) == ["BTC_USDT", "ETH_USDT"]


def test_plan_with_listed_markets_validates_them() -> None:
    plan = protocol.plan_subscriptions(["ticker", "balance"], ["ETH_USDT"], MARKETS, {}, None)
    assert plan == {"ticker": ["ETH_USDT"], "balance": ["ETH"]}
    with pytest.raises(ConfigError, match="DOGE_USDT"):
        protocol.plan_subscriptions(["ticker"], ["DOGE_USDT"], MARKETS, {}, None)


decimal_text = st.from_regex(r"\A(0|[1-9][0-9]{0,12})\.[0-9]{1,18}\Z")


@given(price=decimal_text, quantity=decimal_text)
def test_any_trade_number_survives_exactly(price: str, quantity: str) -> None:
    raw = (
        '{"id":0,"method":"trade_update","data":{"symbol":"BTC_USDT","timestamp":1750953177,'
        f'"trades":[{{"price":{price},"quantity":{quantity},"timestamp":1750953177,'
        '"direction":"sell"}]},"error":null}'
    )
    frame = protocol.parse_frame(raw)
    assert isinstance(frame, protocol.Update)
    assert frame.events[0].data["price"] == price
    assert frame.events[0].data["quantity"] == quantity
