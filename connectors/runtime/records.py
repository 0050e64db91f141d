"""The JSON envelope every source writes, and the dead-letter record.

Envelope (one JSON object per Kafka record, UTF-8)::

    {"exchange": "cryptomus", "channel": "trade", "kind": "event",
     "symbol": "BTC_USDT", "event_time_ms": 1750953177000,
     "receive_time_ms": 1750953177042, "resync_epoch": 1750953170001,
     "data": {"price": "107100.01", "quantity": "0.000254", "side": "buy"}}

``kind`` is ``event`` for exchange data and ``resync`` for a marker that says the
stream was interrupted (reconnect, Kafka outage, subscription change): state built
from earlier records (an order book) must be rebuilt. Every decimal in ``data`` is
a JSON string holding the exchange's exact text (the readers of
:mod:`connectors.runtime.wire` return text; no float is ever made).

The record types, in the order data flows: an exchange's protocol parses its text into
:class:`Event` values (pure, no Kafka), the source encodes each one as an envelope and
hands it over as an :class:`OutRecord`, which the producer writes. This module imports
no Kafka client: pure modules use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from connectors.runtime.logs import redact, redact_bytes

CONTENT_TYPE = b"application/json"


@dataclass(slots=True)
class Event:
    """One piece of exchange data, parsed, before it becomes an envelope.

    ``channel`` names its topic and schema (``trade``, ``open-order``); ``key`` is the
    record key and the envelope's ``symbol`` (a market, a currency, a pair);
    ``event_time_ms`` is the exchange's own time of it (None when the exchange gives
    none); ``data`` holds decimals as exact strings.

    Not frozen: one is made per record on the hot path, and a frozen dataclass costs
    four times as much to build. Nothing changes an event after its parser made it.
    """

    channel: str
    key: str
    event_time_ms: int | None
    data: dict[str, Any]


@dataclass(frozen=True)
class OutRecord:
    """One Kafka record to write, whatever writes it (a tracked producer, a transaction)."""

    topic: str
    #: None is a tombstone (deletes the key in a compacted topic).
    value: bytes | None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp_ms: int | None = None
    channel: str = "-"
    #: Explicit partition (markers sent to every partition); None = by key.
    partition: int | None = None


def _text(value: Any) -> str:
    """msgspec's ``enc_hook``: a str subclass (a decoded ``wire.JsonNumber``) is written
    as its text; anything else msgspec cannot write is a bug."""
    if isinstance(value, str):
        return str(value)
    raise TypeError(f"cannot write a {type(value).__name__} into a record")


#: msgspec's encoder writes what ``json.dumps(..., ensure_ascii=False,
#: separators=(",", ":"))`` writes, byte for byte, about ten times as fast.
_json = msgspec.json.Encoder(enc_hook=_text)


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
    return Envelopes(exchange).encode(
        channel, kind, symbol, event_time_ms, receive_time_ms, resync_epoch, data
    )


class Envelopes:
    """The envelopes of one exchange, joined from pre-built byte parts.

    The fixed head of each (channel, kind) and the JSON text of recent symbols are built
    once; per record only the times, the epoch and ``data`` are written. The bytes are
    exactly what :func:`json.dumps` of the envelope object would give (compact, UTF-8).
    """

    #: Symbols whose JSON text is kept (a hostile exchange sending ever new symbols
    #: cannot grow it: the cache is emptied when full).
    MAX_SYMBOLS = 4096

    def __init__(self, exchange: str) -> None:
        self._exchange = _json.encode(exchange)
        self._heads: dict[tuple[str, str], bytes] = {}
        self._symbols: dict[str | None, bytes] = {None: b"null"}

    def _head(self, channel: str, kind: str) -> bytes:
        head = b"".join(
            (
                b'{"exchange":',
                self._exchange,
                b',"channel":',
                _json.encode(channel),
                b',"kind":',
                _json.encode(kind),
                b',"symbol":',
            )
        )
        self._heads[channel, kind] = head
        return head

    def _symbol(self, symbol: str) -> bytes:
        if len(self._symbols) >= self.MAX_SYMBOLS:
            self._symbols = {None: b"null"}
        text = self._symbols[symbol] = _json.encode(symbol)
        return text

    def encode(
        self,
        channel: str,
        kind: str,
        symbol: str | None,
        event_time_ms: int | None,
        receive_time_ms: int,
        resync_epoch: int,
        data: Mapping[str, Any],
    ) -> bytes:
        head = self._heads.get((channel, kind)) or self._head(channel, kind)
        sym = self._symbols.get(symbol) or self._symbol(symbol)  # type: ignore[arg-type]
        return b"".join(
            (
                head,
                sym,
                b',"event_time_ms":',
                b"null" if event_time_ms is None else b"%d" % event_time_ms,
                b',"receive_time_ms":%d,"resync_epoch":%d,"data":'
                % (receive_time_ms, resync_epoch),
                _json.encode(data),
                b"}",
            )
        )


def headers(exchange: str, channel: str, kind: str, schema: str) -> list[tuple[str, bytes]]:
    return [
        ("exchange", exchange.encode()),
        ("channel", channel.encode()),
        ("kind", kind.encode()),
        ("schema", schema.encode()),
        ("content-type", CONTENT_TYPE),
    ]


#: The most of an unusable message a dead letter keeps. Anything a producer could
#: write (Kafka allows records of many MiB) must still fit in one dead letter with its
#: headers, far below the producer's ``max_request_size`` (1 MiB by default).
DEAD_LETTER_MAX_VALUE = 64 * 1024


def dead_letter(
    *,
    topic: str,
    raw: str | bytes,
    reason: str,
    detail: str,
    exchange: str,
    receive_time_ms: int,
    source: str,
    key: bytes | None = None,
    extra_headers: Sequence[tuple[str, bytes]] = (),
    max_value: int = DEAD_LETTER_MAX_VALUE,
) -> OutRecord:
    """The unusable message as it came, with why it was refused in the headers.

    Registered secrets are masked in the value and in every header (an exchange's error
    body may echo the request's credentials). A value longer than ``max_value`` bytes
    keeps only its first ``max_value`` bytes; the headers ``original-size``,
    ``original-sha256`` (of the whole message as it came) and ``truncated`` say so.
    """
    value = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else bytes(raw)
    size = len(value)
    digest = hashlib.sha256(value).hexdigest()
    value = redact_bytes(value)
    truncated = len(value) > max_value
    if truncated:
        value = value[:max_value]
    return OutRecord(
        topic=topic,
        value=value,
        key=None if key is None else redact_bytes(key[:max_value]),
        headers=[
            ("error.reason", reason.encode()),
            ("error.detail", redact(detail[:1000]).encode("utf-8", "replace")),
            ("exchange", exchange.encode()),
            ("source", source.encode()),
            ("receive-time-ms", str(receive_time_ms).encode()),
            ("original-size", str(size).encode()),
            ("original-sha256", digest.encode()),
            ("truncated", b"true" if truncated else b"false"),
            *((name, redact_bytes(v[:1000])) for name, v in extra_headers),
        ],
        timestamp_ms=receive_time_ms,
        channel="dead_letter",
    )
