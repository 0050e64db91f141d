"""The shipped JSON Schemas accept exactly what the Cryptomus source writes."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from connectors.cryptomus import protocol
from connectors.cryptomus.schemas import SCHEMA_CHANNELS, load_schema
from connectors.runtime.streaming import encode_event, encode_marker

FIXTURES = Path(__file__).parents[1] / "fixtures" / "cryptomus"
UPDATE_FIXTURES = [*sorted(p.name for p in FIXTURES.glob("*_update.json")), "order_created.json"]
RECEIVE_MS = 1750953177042
EPOCH = 1750953170001


def _no_float(text: str) -> Any:
    raise AssertionError(f"a JSON number with a fraction reached a record: {text}")


def exact_json(value: bytes) -> dict[str, Any]:
    """Decode a record value, failing on any fractional JSON number (money as text)."""
    decoded: dict[str, Any] = json.loads(value, parse_float=_no_float)
    return decoded


def validator(channel: str) -> Draft202012Validator:
    return Draft202012Validator(load_schema(channel))


def event_records(fixture: str) -> list[dict[str, Any]]:
    """The decoded record values the streaming runtime writes for one frame."""
    update = protocol.parse_frame((FIXTURES / fixture).read_text())
    assert isinstance(update, protocol.Update)
    out = []
    for event in update.events:
        out.append(exact_json(encode_event("cryptomus", event, RECEIVE_MS, EPOCH)))
    assert out
    return out


def marker_record(channel: str, key: str = "BTC_USDT", reason: str = "start") -> dict[str, Any]:
    """The decoded record value the streaming runtime writes for a marker."""
    value = encode_marker("cryptomus", channel, key, reason, "0123456789ab", RECEIVE_MS, EPOCH)
    return exact_json(value)


def errors(channel: str, record: Any) -> list[str]:
    return [e.message for e in validator(channel).iter_errors(record)]


def test_channels_match_protocol() -> None:
    assert set(SCHEMA_CHANNELS) == set(protocol.CHANNELS)


@pytest.mark.parametrize("channel", SCHEMA_CHANNELS)
def test_schema_is_valid_draft_2020_12(channel: str) -> None:
    schema = load_schema(channel)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://exchange-connectors.dev/schemas/cryptomus.{channel}.v1.json"
    assert schema["title"] and schema["description"]
    assert "resync" in schema["description"] and "full_reload" in schema["description"]


@pytest.mark.parametrize("channel", SCHEMA_CHANNELS)
def test_objects_are_closed_and_fields_documented(channel: str) -> None:
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert node.get("additionalProperties") is False, path
                for name, prop in node.get("properties", {}).items():
                    assert prop.get("description"), f"{path}.{name} has no description"
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(load_schema(channel), channel)


def test_load_schema_is_cached_and_rejects_unknown() -> None:
    assert load_schema("trade") is load_schema("trade")
    with pytest.raises(KeyError):
        load_schema("nope")


def test_every_channel_has_a_fixture() -> None:
    channels = {event_records(f)[0]["channel"] for f in UPDATE_FIXTURES}
    assert channels == set(SCHEMA_CHANNELS)


@pytest.mark.parametrize("fixture", UPDATE_FIXTURES)
def test_produced_events_validate(fixture: str) -> None:
    for record in event_records(fixture):
        assert errors(record["channel"], record) == []


@pytest.mark.parametrize("channel", SCHEMA_CHANNELS)
def test_resync_marker_validates(channel: str) -> None:
    key = "USDT" if channel == "balance" else "BTC_USDT"
    assert errors(channel, marker_record(channel, key, reason="connection_lost")) == []


@pytest.mark.parametrize("channel", SCHEMA_CHANNELS)
def test_marker_of_another_channel_is_rejected(channel: str) -> None:
    other = "trade" if channel != "trade" else "depth"
    assert errors(channel, marker_record(other))


def test_trade_event_without_any_timestamp_validates() -> None:
    frame = {
        "id": 0,
        "method": "trade_update",
        "data": {
            "symbol": "BTC_USDT",
            "trades": [{"price": 1.5, "quantity": 2, "direction": "sell"}],
        },
        "error": None,
    }
    update = protocol.parse_frame(json.dumps(frame))
    assert isinstance(update, protocol.Update)
    assert update.events[0].event_time_ms is None
    record = exact_json(encode_event("cryptomus", update.events[0], RECEIVE_MS, EPOCH))
    assert record["data"] == {"price": "1.5", "quantity": "2", "side": "sell"}
    assert errors("trade", record) == []


def test_order_with_every_optional_field_set_validates() -> None:
    frame = json.loads((FIXTURES / "order_created.json").read_text())
    frame["data"]["type"] = "finished"
    frame["data"]["info"].update(
        clientOid="my-1",
        updateTs=1750696377,
        finishTs=1750696378.5,
        state="done",
        internalState="x",
        price=None,
        quantity=None,
    )
    update = protocol.parse_frame(json.dumps(frame))
    assert isinstance(update, protocol.Update)
    event = update.events[0]
    record = exact_json(encode_event("cryptomus", event, RECEIVE_MS, EPOCH))
    assert record["event_time_ms"] == 1750696378500
    assert errors("order", record) == []


# -- negative cases --------------------------------------------------------------------


def first(fixture: str) -> dict[str, Any]:
    return copy.deepcopy(event_records(fixture)[0])


@pytest.mark.parametrize(
    ("fixture", "field"),
    [
        ("lastprice_update.json", "price"),
        ("ticker_update.json", "price"),
        ("trade_update.json", "price"),
        ("order_created.json", "price"),
        ("deal_update.json", "filled_price"),
        ("balance_update.json", "amount"),
    ],
)
def test_price_as_json_number_is_rejected(fixture: str, field: str) -> None:
    record = first(fixture)
    record["data"][field] = float(record["data"][field])
    assert errors(record["channel"], record)


def test_depth_level_as_numbers_or_wrong_length_is_rejected() -> None:
    record = first("depth_update.json")
    record["data"]["asks"] = [[107043.93, "0.304313"]]
    assert errors("depth", record)
    record["data"]["asks"] = [["107043.93", "0.304313", "1"]]
    assert errors("depth", record)
    record["data"]["asks"] = [["107043.93"]]
    assert errors("depth", record)


@pytest.mark.parametrize("bad", ["", "1,5", "NaN", "Infinity", "0x10", "1.2.3", " 1", "1e"])
def test_non_decimal_text_is_rejected(bad: str) -> None:
    record = first("lastprice_update.json")
    record["data"]["price"] = bad
    assert errors("lastprice", record)


@pytest.mark.parametrize("fixture", UPDATE_FIXTURES)
def test_unknown_data_field_is_rejected(fixture: str) -> None:
    record = first(fixture)
    record["data"]["surprise"] = "1"
    assert errors(record["channel"], record)


@pytest.mark.parametrize("channel", SCHEMA_CHANNELS)
def test_unknown_marker_field_is_rejected(channel: str) -> None:
    record = marker_record(channel)
    record["data"]["surprise"] = "1"
    assert errors(channel, record)
    record = marker_record(channel)
    record["extra"] = 1
    assert errors(channel, record)


@pytest.mark.parametrize("fixture", UPDATE_FIXTURES)
def test_wrong_channel_const_is_rejected(fixture: str) -> None:
    record = first(fixture)
    channel = record["channel"]
    record["channel"] = "trade" if channel != "trade" else "depth"
    assert errors(channel, record)


@pytest.mark.parametrize("fixture", UPDATE_FIXTURES)
def test_missing_resync_epoch_is_rejected(fixture: str) -> None:
    record = first(fixture)
    del record["resync_epoch"]
    assert errors(record["channel"], record)


@pytest.mark.parametrize("channel", SCHEMA_CHANNELS)
def test_marker_missing_resync_epoch_or_with_event_time_is_rejected(channel: str) -> None:
    record = marker_record(channel)
    del record["resync_epoch"]
    assert errors(channel, record)
    record = marker_record(channel)
    record["event_time_ms"] = RECEIVE_MS
    assert errors(channel, record)


def test_event_time_rules() -> None:
    balance = first("balance_update.json")
    assert balance["event_time_ms"] is None
    balance["event_time_ms"] = RECEIVE_MS
    assert errors("balance", balance)
    ticker = first("ticker_update.json")
    ticker["event_time_ms"] = None
    assert errors("ticker", ticker)
    ticker["event_time_ms"] = -1
    assert errors("ticker", ticker)
    ticker["event_time_ms"] = 1.5
    assert errors("ticker", ticker)


def test_enumerations_are_enforced() -> None:
    trade = first("trade_update.json")
    trade["data"]["side"] = "BUY"
    assert errors("trade", trade)
    order = first("order_created.json")
    order["data"]["event"] = "cancelled"
    assert errors("order", order)
    deal = first("deal_update.json")
    deal["data"]["trade_role"] = "both"
    assert errors("deal", deal)
    other = first("lastprice_update.json")
    other["exchange"] = "robicoin"
    assert errors("lastprice", other)
    other = first("lastprice_update.json")
    other["kind"] = "snapshot"
    assert errors("lastprice", other)


# -- packaging ---------------------------------------------------------------------------


def test_every_schema_file_is_package_data() -> None:
    package = resources.files("connectors.cryptomus.schemas")
    shipped = {p.name for p in package.iterdir() if p.name.endswith(".json")}
    assert shipped == {f"{c}.json" for c in SCHEMA_CHANNELS}
    for channel in SCHEMA_CHANNELS:
        text = package.joinpath(f"{channel}.json").read_text(encoding="utf-8")
        assert json.loads(text) == load_schema(channel)


def test_pyproject_declares_schema_package_data() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "**/schemas/*.json" in pyproject["tool"]["setuptools"]["package-data"]["connectors"]
