"""The shipped JSON Schemas accept exactly what the Robicoin poller writes."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import MagicMock
from zoneinfo import ZoneInfo

import pytest
from jsonschema import Draft202012Validator

from connectors.robicoin import protocol
from connectors.robicoin.config import (
    CredentialSettings,
    RobicoinConfig,
    RobicoinSettings,
    SnapshotStream,
    Streams,
    TickerStream,
)
from connectors.robicoin.protocol import Row
from connectors.robicoin.schemas import SCHEMA_CHANNELS as ALL_SCHEMAS
from connectors.robicoin.schemas import load_schema
from connectors.robicoin.streams import RobicoinPolling, Stream, schema_id, with_change
from connectors.runtime import records
from connectors.runtime.config import Secret
from connectors.runtime.polling import PollingSource
from connectors.runtime.records import OutRecord

#: The poller's topics (the sink's command and result schemas are tested with it).
SCHEMA_CHANNELS = tuple(c for c in ALL_SCHEMAS if not c.startswith("order-"))

FIXTURES = Path(__file__).parents[1] / "fixtures" / "robicoin"
IST = ZoneInfo("Europe/Istanbul")
RECEIVE_MS = 1750953177042
EPOCH = 1750953170001
CHANGES = ("opened", "changed", "closed", "out_of_window", "unchanged")
FIXTURE_OF = {
    "ticker": "spec_ticker.json",
    "order": "spec_order.json",
    "balance": "spec_balance.json",
    "transaction": "spec_transaction.json",
    "open-order": "spec_open_order.json",
}


def _no_float(text: str) -> Any:
    raise AssertionError(f"a JSON number with a fraction reached a record: {text}")


def exact_json(value: bytes) -> dict[str, Any]:
    """Decode a record value, failing on any fractional JSON number (money as text)."""
    decoded: dict[str, Any] = json.loads(value, parse_float=_no_float)
    return decoded


def validator(channel: str) -> Draft202012Validator:
    return Draft202012Validator(load_schema(channel))


def errors(channel: str, record: Any) -> list[str]:
    return [e.message for e in validator(channel).iter_errors(record)]


def rows_of(name: str) -> list[Any]:
    return protocol.data_rows(protocol.decode((FIXTURES / name).read_text(encoding="utf-8")))


def envelope(channel: str, row: Row, kind: str = "event") -> dict[str, Any]:
    """The decoded value ``PollingSource._event`` writes for ``row``."""
    value = records.envelope(
        exchange=protocol.EXCHANGE,
        channel=channel,
        kind=kind,
        symbol=row.key,
        event_time_ms=row.event_time_ms,
        receive_time_ms=RECEIVE_MS,
        resync_epoch=EPOCH,
        data=row.data,
    )
    return exact_json(value)


def parsed_rows(channel: str) -> list[Row]:
    """The spec's example rows, parsed as the poller parses them."""
    rows = rows_of(FIXTURE_OF[channel])
    if channel == "ticker":
        out = []
        for window in protocol.TICKER_WINDOWS:
            for raw in rows:
                t = protocol.parse_ticker(raw, window)
                out.append(Row("ticker", t.pair, None, t.data()))
        return out
    if channel == "order":
        return [protocol.parse_order(r, IST) for r in rows]
    if channel == "balance":
        return [protocol.parse_balance(r) for r in rows]
    if channel == "transaction":
        return [protocol.parse_transaction(r, IST) for r in rows]
    assert channel == "open-order"
    return [
        with_change(protocol.parse_open_order(r, IST), change) for r in rows for change in CHANGES
    ]


def spec_records(channel: str) -> list[dict[str, Any]]:
    out = [envelope(channel, row) for row in parsed_rows(channel)]
    assert out
    return out


def first(channel: str) -> dict[str, Any]:
    return copy.deepcopy(spec_records(channel)[0])


def gap_record(channel: str, previous_newest: str | None = "2018-02-19 21:11:44") -> dict[str, Any]:
    """The decoded value ``PollingSource._gap_markers`` writes."""
    value = records.envelope(
        exchange=protocol.EXCHANGE,
        channel=channel,
        kind="gap",
        symbol=None,
        event_time_ms=None,
        receive_time_ms=RECEIVE_MS,
        resync_epoch=EPOCH + 1,
        data={
            "reason": "window_overflow",
            "detail": "the exchange returned a full window of 25 rows, all newer than the "
            f"last row written ({previous_newest}); rows in between may be missing",
            "previous_newest": previous_newest,
        },
    )
    return exact_json(value)


# -- the schemas themselves ------------------------------------------------------------


def test_channels_match_the_poller() -> None:
    poller = make_poller()
    assert {s.channel for s in poller.streams} == set(SCHEMA_CHANNELS)
    assert set(FIXTURE_OF) == set(SCHEMA_CHANNELS)


@pytest.mark.parametrize("channel", SCHEMA_CHANNELS)
def test_schema_is_valid_draft_2020_12(channel: str) -> None:
    schema = load_schema(channel)
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"https://exchange-connectors.dev/schemas/robicoin.{channel}.v1.json"
    assert schema["title"] and schema["description"]
    assert f"`{schema_id(channel)}`" in schema["description"]
    if channel in ("order", "transaction"):
        assert "kind: gap" in schema["description"]
        assert "reconcile" in schema["description"]


@pytest.mark.parametrize("channel", SCHEMA_CHANNELS)
def test_objects_are_closed_and_fields_documented(channel: str) -> None:
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object":
                assert node.get("additionalProperties") is False, path
                assert set(node.get("required", [])) == set(node.get("properties", {})), path
                for name, prop in node.get("properties", {}).items():
                    assert prop.get("description"), f"{path}.{name} has no description"
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(load_schema(channel), channel)


def test_load_schema_is_cached_and_rejects_unknown() -> None:
    assert load_schema("open-order") is load_schema("open-order")
    with pytest.raises(KeyError):
        load_schema("open_order")
    with pytest.raises(KeyError):
        load_schema("nope")


# -- the spec's example rows -------------------------------------------------------------


@pytest.mark.parametrize("channel", SCHEMA_CHANNELS)
def test_spec_rows_validate(channel: str) -> None:
    for record in spec_records(channel):
        assert errors(channel, record) == []


def test_ticker_keeps_exact_number_text_and_every_window() -> None:
    ticker = spec_records("ticker")
    assert {r["data"]["window"] for r in ticker} == set(protocol.TICKER_WINDOWS)
    eth = next(r for r in ticker if r["symbol"] == "eth-try")
    assert eth["data"]["bid"] == "1e-7"
    assert eth["data"]["low"] == "7"
    assert eth["data"]["volume"] == "142.95000000000001"
    assert eth["data"]["high"] == "1234567.12345678901234"
    assert ticker[0]["data"]["high"] == "20950.00"
    assert "avarage" not in ticker[0]["data"]


def test_times_and_event_times_follow_the_channel_rules() -> None:
    order = first("order")
    assert order["data"]["created_at"] == "2018-02-19 21:11:44"
    assert order["event_time_ms"] == order["data"]["created_at_ms"] == 1519063904000
    withdraw = spec_records("transaction")[1]
    assert withdraw["symbol"] == "eth-eth"
    assert withdraw["data"]["txid"] == "0x162da82adc089cf6480f08d5745bc9c08c"
    assert withdraw["event_time_ms"] == withdraw["data"]["created_at_ms"]
    for record in spec_records("open-order"):
        opened = record["data"]["change"] == "opened"
        expected = record["data"]["created_at_ms"] if opened else None
        assert record["event_time_ms"] == expected


@pytest.mark.parametrize("channel", ["order", "transaction"])
@pytest.mark.parametrize("previous_newest", ["2018-02-19 21:11:44", None])
def test_gap_marker_validates(channel: str, previous_newest: str | None) -> None:
    assert errors(channel, gap_record(channel, previous_newest)) == []


# -- what the poller itself writes --------------------------------------------------------


def make_poller(emit: str = "changes") -> PollingSource:
    settings = RobicoinSettings(
        credentials=CredentialSettings(
            public_key=Secret("schema-test-public-key"),
            public_id=Secret("4242"),
            private_key=Secret("schema-test-private-key"),
        ),
        streams=Streams(
            ticker=TickerStream(windows=list(protocol.TICKER_WINDOWS)),
            balance=SnapshotStream(emit=emit),  # type: ignore[arg-type]
            open_order=SnapshotStream(emit=emit),  # type: ignore[arg-type]
        ),
    )
    poller = PollingSource(RobicoinPolling(RobicoinConfig(robicoin=settings)))
    # Only what the record-building code paths touch: metrics and partition numbers.
    poller.ctx = SimpleNamespace(  # type: ignore[assignment]
        name="robicoin-poller", metrics=MagicMock()
    )
    poller._partitions = {s.topic: [0, 1, 2] for s in poller.streams}
    poller._epoch = EPOCH
    return poller


def stream_of(poller: PollingSource, name: str) -> Stream:
    stream = next(s for s in poller.streams if s.name == name)
    assert isinstance(stream, Stream)
    return stream


def check_written(poller: PollingSource, out: list[OutRecord]) -> list[dict[str, Any]]:
    """Validate every record written to a channel topic; returns the decoded values."""
    topics = {s.topic for s in poller.streams}
    values = []
    for rec in out:
        assert rec.topic in topics, rec.topic
        value = exact_json(rec.value)
        channel = value["channel"]
        assert dict(rec.headers)["schema"] == schema_id(channel).encode()
        assert rec.key == (None if value["symbol"] is None else value["symbol"].encode())
        assert errors(channel, value) == [], value
        values.append(value)
    return values


def test_poller_ticker_and_balance_records_validate() -> None:
    poller = make_poller()
    for window in protocol.TICKER_WINDOWS:
        out, _ = poller.records_of(
            stream_of(poller, f"ticker:{window}"), rows_of("spec_ticker.json"), RECEIVE_MS
        )
        assert len(check_written(poller, out)) == 2
    out, _ = poller.records_of(
        stream_of(poller, "balance"), rows_of("spec_balance.json"), RECEIVE_MS
    )
    assert [v["symbol"] for v in check_written(poller, out)] == ["try", "btc", "eth"]


def as_answer(rows: list[Any]) -> list[Any]:
    """Rows as the client hands them over: decoded from JSON text, numbers kept as text."""
    return protocol.data_rows(protocol.decode(json.dumps({"data": rows})))


def full_window(newest: str, template: dict[str, Any]) -> list[Any]:
    """25 distinct rows, newest first, all at or before ``newest``'s minute."""
    rows = []
    for i in range(protocol.WINDOW_ROWS):
        row = dict(template)
        row["created_at"] = f"{newest[:-2]}{59 - i:02d}"
        if "updated_at" in row:
            row["updated_at"] = row["created_at"]
        rows.append(row)
    return as_answer(rows)


@pytest.mark.parametrize(
    ("name", "fixture"), [("order", "spec_order.json"), ("transaction", "spec_transaction.json")]
)
def test_poller_incremental_records_and_gap_markers_validate(name: str, fixture: str) -> None:
    poller = make_poller()
    stream = stream_of(poller, name)
    rows = rows_of(fixture)
    handler = poller.records_of
    out, state = handler(stream, rows, RECEIVE_MS)
    assert [v["kind"] for v in check_written(poller, out)] == ["event"] * len(rows)
    poller._state.update(state)
    # A full window of rows all newer than the cursor: gap markers, then the rows.
    later = full_window("2018-02-20 10:00:00", rows[0])
    out, _ = handler(stream, later, RECEIVE_MS + 1000)
    values = check_written(poller, out)
    gaps = [v for v in values if v["kind"] == "gap"]
    assert len(gaps) == 3  # one per partition
    assert gaps[0]["resync_epoch"] > EPOCH
    assert gaps[0]["data"]["previous_newest"] == rows[0]["created_at"]
    assert sum(v["kind"] == "event" for v in values) == protocol.WINDOW_ROWS


@pytest.mark.parametrize("emit", ["changes", "every_poll"])
def test_poller_open_order_changes_validate(emit: str) -> None:
    poller = make_poller(emit)
    stream = stream_of(poller, "open_order")
    rows = rows_of("spec_open_order.json")  # data_id 18 and 17
    seen: list[str] = []

    def poll(answer: list[Any]) -> None:
        out, state = poller.records_of(stream, answer, RECEIVE_MS)
        seen.extend(v["data"]["change"] for v in check_written(poller, out))
        poller._state.update(state)

    poll(rows)  # both opened
    changed = {**rows[0], "data_id": 18, "amount": "0.25000000", "total": "2500.00000000"}
    poll(as_answer([changed]))  # 18 changed, 17 closed
    template = {**rows[0], "created_at": "2018-02-20 10:00:00"}
    window = as_answer([{**template, "data_id": 100 + i} for i in range(protocol.WINDOW_ROWS)])
    poll(window)  # 18 out of window, 25 opened
    poll(window)  # nothing, or all unchanged
    expected = {"opened", "changed", "closed", "out_of_window"}
    if emit == "every_poll":
        expected.add("unchanged")
    assert set(seen) == expected


# -- negative cases ------------------------------------------------------------------------

DECIMAL_FIELD = {
    "ticker": "last",
    "order": "price",
    "balance": "balance",
    "transaction": "amount",
    "open-order": "price",
}


@pytest.mark.parametrize("channel", SCHEMA_CHANNELS)
def test_decimal_as_json_number_is_rejected(channel: str) -> None:
    field = DECIMAL_FIELD[channel]
    record = first(channel)
    record["data"][field] = float(record["data"][field])
    assert errors(channel, record)
    record["data"][field] = int(float(record["data"][field]))
    assert errors(channel, record)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "1,5",
        "NaN",
        "Infinity",
        "0x10",
        "1.2.3",
        " 1",
        "1 ",
        "1\n",
        "1e",
        "+1",
        "01",
        "1.",
        ".5",
    ],
)
def test_non_decimal_text_is_rejected(bad: str) -> None:
    record = first("ticker")
    record["data"]["last"] = bad
    assert errors("ticker", record)


@pytest.mark.parametrize(
    "good", ["0", "-0.5", "7", "1e-7", "1E+5", "20950.00", "142.95000000000001"]
)
def test_decimal_text_the_parser_accepts_is_accepted(good: str) -> None:
    assert protocol.decimal_text(good, "x") == good
    record = first("ticker")
    record["data"]["last"] = good
    assert errors("ticker", record) == []


@pytest.mark.parametrize("channel", SCHEMA_CHANNELS)
def test_missing_field_is_rejected(channel: str) -> None:
    record = first(channel)
    for name in list(record["data"]):
        broken = copy.deepcopy(record)
        del broken["data"][name]
        assert errors(channel, broken), name
    for name in list(record):
        broken = copy.deepcopy(record)
        del broken[name]
        assert errors(channel, broken), name


@pytest.mark.parametrize("channel", SCHEMA_CHANNELS)
def test_extra_field_is_rejected(channel: str) -> None:
    record = first(channel)
    record["data"]["surprise"] = "1"
    assert errors(channel, record)
    record = first(channel)
    record["extra"] = 1
    assert errors(channel, record)
    if channel in ("order", "transaction"):
        gap = gap_record(channel)
        gap["data"]["surprise"] = "1"
        assert errors(channel, gap)


@pytest.mark.parametrize("channel", SCHEMA_CHANNELS)
def test_wrong_exchange_or_channel_is_rejected(channel: str) -> None:
    record = first(channel)
    record["exchange"] = "cryptomus"
    assert errors(channel, record)
    record = first(channel)
    record["channel"] = "ticker" if channel != "ticker" else "order"
    assert errors(channel, record)


@pytest.mark.parametrize("channel", ["ticker", "balance", "open-order"])
def test_gap_marker_on_a_channel_without_gaps_is_rejected(channel: str) -> None:
    gap = gap_record("order")
    gap["channel"] = channel
    assert errors(channel, gap)


def test_gap_marker_rules() -> None:
    gap = gap_record("transaction")
    gap["symbol"] = "btc-try"
    assert errors("transaction", gap)
    gap = gap_record("transaction")
    gap["event_time_ms"] = RECEIVE_MS
    assert errors("transaction", gap)
    gap = gap_record("transaction")
    gap["data"]["reason"] = "start"
    assert errors("transaction", gap)
    gap = gap_record("transaction")
    gap["data"]["previous_newest"] = "2018-02-19T21:11:44"
    assert errors("transaction", gap)
    assert errors("order", gap_record("transaction"))


def test_unknown_open_order_change_is_rejected() -> None:
    record = first("open-order")
    record["data"]["change"] = "cancelled"
    assert errors("open-order", record)
    del record["data"]["change"]
    assert errors("open-order", record)


def test_event_time_rules() -> None:
    for channel in ("ticker", "balance"):
        record = first(channel)
        record["event_time_ms"] = RECEIVE_MS
        assert errors(channel, record)
    for channel in ("order", "transaction"):
        record = first(channel)
        for bad in (None, -1, 1.5, "1519063904000"):
            record["event_time_ms"] = bad
            assert errors(channel, record), bad
    opened, closed = (
        r for r in spec_records("open-order")[:3] if r["data"]["change"] in ("opened", "closed")
    )
    opened["event_time_ms"] = None
    assert errors("open-order", opened)
    closed["event_time_ms"] = closed["data"]["created_at_ms"]
    assert errors("open-order", closed)


def test_enumerations_and_formats_are_enforced() -> None:
    ticker = first("ticker")
    ticker["data"]["window"] = "1week"
    assert errors("ticker", ticker)
    order = first("order")
    order["data"]["side"] = "BUY"
    assert errors("order", order)
    order = first("order")
    order["data"]["created_at"] = "2018-02-19T21:11:44Z"
    assert errors("order", order)
    transaction = first("transaction")
    transaction["data"]["txid"] = 7
    assert errors("transaction", transaction)
    open_order = first("open-order")
    open_order["data"]["data_id"] = "18"
    assert errors("open-order", open_order)
    balance = first("balance")
    balance["kind"] = "resync"
    assert errors("balance", balance)


# -- packaging -----------------------------------------------------------------------------


def test_every_schema_file_is_package_data() -> None:
    package = resources.files("connectors.robicoin.schemas")
    shipped = {p.name for p in package.iterdir() if p.name.endswith(".json")}
    assert shipped == {f"{c}.json" for c in ALL_SCHEMAS}
    for channel in SCHEMA_CHANNELS:
        text = package.joinpath(f"{channel}.json").read_text(encoding="utf-8")
        assert json.loads(text) == load_schema(channel)


def test_pyproject_declares_schema_package_data() -> None:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "**/schemas/*.json" in pyproject["tool"]["setuptools"]["package-data"]["connectors"]
