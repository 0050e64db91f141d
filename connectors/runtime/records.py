"""The JSON envelope every source writes, and the dead-letter record.

Envelope (one JSON object per Kafka record, UTF-8)::

    {"exchange": "cryptomus", "channel": "trade", "kind": "event",
     "symbol": "BTC_USDT", "event_time_ms": 1750953177000,
     "receive_time_ms": 1750953177042, "resync_epoch": 1750953170001,
     "data": {"price": "107100.01", "quantity": "0.000254", "side": "buy"}}

``kind`` is ``event`` for exchange data and ``resync`` for a marker that says the
stream was interrupted (reconnect, Kafka outage, subscription change): state built
from earlier records (an order book) must be rebuilt. Every decimal in ``data`` is
a JSON string holding the exchange's exact text; this module refuses floats.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from connectors.runtime.kafka import OutRecord

CONTENT_TYPE = b"application/json"

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def envelope(
    *,
    exchange: str,
    channel: str,
    kind: str,
    symbol: str | None,
    event_time_ms: int | None,
    receive_time_ms: int,
    resync_epoch: int,
    data: Mapping[str, Any],
) -> bytes:
    """Encode one envelope; ``data`` must already hold decimals as strings."""
    body = {
        "exchange": exchange,
        "channel": channel,
        "kind": kind,
        "symbol": symbol,
        "event_time_ms": event_time_ms,
        "receive_time_ms": receive_time_ms,
        "resync_epoch": resync_epoch,
        "data": data,
    }
    return _encoder.encode(body).encode("utf-8")


def headers(exchange: str, channel: str, kind: str, schema: str) -> list[tuple[str, bytes]]:
    return [
        ("exchange", exchange.encode()),
        ("channel", channel.encode()),
        ("kind", kind.encode()),
        ("schema", schema.encode()),
        ("content-type", CONTENT_TYPE),
    ]


def dead_letter(
    *,
    topic: str,
    raw: str | bytes,
    reason: str,
    detail: str,
    exchange: str,
    receive_time_ms: int,
    source: str,
) -> OutRecord:
    """The unusable message as it came, with why it was refused in the headers."""
    value = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    return OutRecord(
        topic=topic,
        value=value,
        key=None,
        headers=[
            ("error.reason", reason.encode()),
            ("error.detail", detail[:1000].encode("utf-8", "replace")),
            ("exchange", exchange.encode()),
            ("source", source.encode()),
            ("receive-time-ms", str(receive_time_ms).encode()),
        ],
        timestamp_ms=receive_time_ms,
        channel="dead_letter",
    )
