"""Robicoin REST API v1 as pure functions: endpoints, answers → typed rows, cursors.

No network, no Kafka, no clock: callers pass ``now`` and the response text. Every
decimal keeps the exchange's exact text (ticker values are JSON *numbers*; they are
decoded from their literal text, never through float).

Answer classification, in one place (:func:`classify`)::

    200 + JSON object with "data" or "success" ...... ok
    429, 5xx .......................................... retriable (back off, try again)
    401, 403, or any other 4xx to a request that
      carried nothing but the credentials ............. unauthorized (stop calling!)
    404, 405 .......................................... not found (wrong base URL: config)
    other 4xx ......................................... rejected (this call only)

Ten unauthorized answers block the caller's IP, so "unauthorized" is decided
conservatively: a poll request carries nothing but the four auth fields, so a 400
to it can only be about them.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from connectors.runtime import wire

# Canonical row text and fingerprints, and snapshot change detection, are the polling
# runtime's (any REST exchange needs them); named here too, where the cursor uses them.
from connectors.runtime.cursors import diff_keys as diff_keys
from connectors.runtime.cursors import row_fingerprint as row_fingerprint
from connectors.runtime.cursors import row_text as row_text
from connectors.runtime.errors import BadMessage
from connectors.runtime.records import Event

EXCHANGE = "robicoin"
TICKER_WINDOWS = ("24h", "1min", "1hour", "1day", "1month")
#: Both ``order`` and ``transaction`` answer with at most this many rows.
WINDOW_ROWS = 25


class EndpointClass(StrEnum):
    """The spec's two rate-limit classes."""

    TICKER = "ticker"
    OTHER = "other"


@dataclass(frozen=True)
class Endpoint:
    name: str
    method: str
    path: str
    klass: EndpointClass
    #: True when the request carries only the four auth fields.
    auth_only: bool = True

    @property
    def signed(self) -> bool:
        return self.method == "POST"

    @property
    def family(self) -> str:
        """The name without the ticker window: a small, fixed metric label."""
        return self.name.split(":", 1)[0]


def ticker_endpoint(window: str) -> Endpoint:
    if window not in TICKER_WINDOWS:
        raise ValueError(f"unknown ticker window {window!r} (known: {', '.join(TICKER_WINDOWS)})")
    path = "ticker" if window == "24h" else f"ticker/{window}"
    return Endpoint(f"ticker:{window}", "GET", path, EndpointClass.TICKER, auth_only=False)


ORDER = Endpoint("order", "POST", "order", EndpointClass.OTHER)
BALANCE = Endpoint("balance", "POST", "balance", EndpointClass.OTHER)
TRANSACTION = Endpoint("transaction", "POST", "transaction", EndpointClass.OTHER)
OPEN_ORDER = Endpoint("open-order", "POST", "open-order", EndpointClass.OTHER)
CREATE_ORDER = Endpoint("create-order", "POST", "create-order", EndpointClass.OTHER, False)
DELETE_ORDER = Endpoint("delete-order", "POST", "delete-order", EndpointClass.OTHER, False)


# -- decoding --------------------------------------------------------------------------

#: JSON with every number kept as its text (:func:`connectors.runtime.wire.loads`);
#: raises ``BadMessage("invalid_json")``.
decode = wire.loads

#: Robicoin's dead-letter reasons name the kind of mistake in a row.
FIELDS = wire.Fields(
    missing_reason="bad_field",
    row_reason="bad_row",
    field_reason="bad_field",
    decimal_reason="bad_decimal",
    time_reason="bad_time",
)
#: The exact decimal text of a value (a JSON string or number); ``bad_decimal``.
decimal_text = FIELDS.decimal
#: ``YYYY-MM-DD HH:MM:SS`` in a zone → Unix milliseconds (UTC); ``bad_time``.
local_time_ms = FIELDS.local_time_ms


def data_rows(payload: Any) -> list[Mapping[str, Any]]:
    """The ``data`` list of an answer; raises :class:`BadMessage` for anything else.

    >>> data_rows(decode('{"data": [{"type": "btc-try"}]}'))
    [{'type': 'btc-try'}]
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise BadMessage("bad_answer", "expected an object with a 'data' list")
    return list(payload["data"])


# -- typed rows ------------------------------------------------------------------------


@dataclass(frozen=True)
class Ticker:
    """``{"type": "btc-try", "high": 20950.00, "last": 20659.95, "bid": 20556.51,
    "volume": 142.95, "low": 20500.00, "ask": 20659.95, "avarage": 20761.68}``"""

    pair: str
    window: str
    high: str
    low: str
    last: str
    bid: str
    ask: str
    volume: str
    average: str

    def data(self) -> dict[str, str]:
        return {
            "pair": self.pair,
            "window": self.window,
            "high": self.high,
            "low": self.low,
            "last": self.last,
            "bid": self.bid,
            "ask": self.ask,
            "volume": self.volume,
            "average": self.average,
        }


def parse_ticker(row: Mapping[str, Any], window: str) -> Ticker:
    row = FIELDS.row(row, "ticker row")
    # The exchange spells it "avarage"; accept the dictionary spelling too.
    average = row.get("avarage", row.get("average"))
    return Ticker(
        pair=FIELDS.text(row.get("type"), "type"),
        window=window,
        high=decimal_text(row.get("high"), "high"),
        low=decimal_text(row.get("low"), "low"),
        last=decimal_text(row.get("last"), "last"),
        bid=decimal_text(row.get("bid"), "bid"),
        ask=decimal_text(row.get("ask"), "ask"),
        volume=decimal_text(row.get("volume"), "volume"),
        average=decimal_text(average, "avarage"),
    )


#: A parsed row: the record's channel, key, time and data (one record type for every
#: exchange, :class:`connectors.runtime.records.Event`).
Row = Event


def _times(row: Mapping[str, Any], zone: ZoneInfo, names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        out[name] = FIELDS.text(row.get(name), name)
        out[f"{name}_ms"] = local_time_ms(row.get(name), zone, name)
    return out


_SIDES = ("buy", "sell")


def _order_fields(row: Mapping[str, Any], zone: ZoneInfo) -> dict[str, Any]:
    """What a market order and an account open order have in common, in record order."""
    data: dict[str, Any] = {
        "pair": FIELDS.text(row.get("type"), "type"),
        "side": FIELDS.one_of(row.get("side"), "side", _SIDES),
        "amount": decimal_text(row.get("amount"), "amount"),
        "price": decimal_text(row.get("price"), "price"),
        "total": decimal_text(row.get("total"), "total"),
        "status": FIELDS.text(row.get("status"), "status"),
    }
    data.update(_times(row, zone, ("created_at",)))
    return data


def parse_order(row: Mapping[str, Any], zone: ZoneInfo) -> Row:
    """A market open order (``/order``)::

    {"type": "btc-try", "side": "sell", "amount": "1.00000000", "price": "12000.00000000",
     "total": "12000.00000000", "status": "active", "created_at": "2018-02-19 21:11:44"}
    """
    data = _order_fields(FIELDS.row(row, "order row"), zone)
    return Row("order", data["pair"], data["created_at_ms"], data)


def parse_balance(row: Mapping[str, Any]) -> Row:
    """``{"currency": "try", "balance": "9172.30000000",
    "reserved_balance": "10000.00000000", "status": "active"}``"""
    row = FIELDS.row(row, "balance row")
    data = {
        "currency": FIELDS.text(row.get("currency"), "currency"),
        "balance": decimal_text(row.get("balance"), "balance"),
        "reserved_balance": decimal_text(row.get("reserved_balance"), "reserved_balance"),
        "status": FIELDS.text(row.get("status"), "status"),
    }
    return Row("balance", data["currency"], None, data)


def parse_transaction(row: Mapping[str, Any], zone: ZoneInfo) -> Row:
    """An account movement (``/transaction``); ``txid`` is null for trades::

    {"zone": "maker", "type": "btc-try", "amount": "3.00000000", "price": "5500.00000000",
     "total": "16500.00000000", "fee": "16.50000000", "status": "approved", "txid": null,
     "updated_at": "2018-02-19 02:55:38", "created_at": "2018-02-19 02:55:38"}
    """
    row = FIELDS.row(row, "transaction row")
    txid = row.get("txid")
    if txid is not None and not wire.is_text(txid):
        raise BadMessage(
            FIELDS.field_reason, f"txid: expected a string or null, got {wire.short(txid)}"
        )
    data: dict[str, Any] = {
        "zone": FIELDS.text(row.get("zone"), "zone"),
        "pair": FIELDS.text(row.get("type"), "type"),
        "amount": decimal_text(row.get("amount"), "amount"),
        "price": decimal_text(row.get("price"), "price"),
        "total": decimal_text(row.get("total"), "total"),
        "fee": decimal_text(row.get("fee"), "fee"),
        "status": FIELDS.text(row.get("status"), "status"),
        "txid": txid,
    }
    data.update(_times(row, zone, ("created_at", "updated_at")))
    return Row("transaction", data["pair"], data["created_at_ms"], data)


def parse_open_order(row: Mapping[str, Any], zone: ZoneInfo) -> Row:
    """An account open order (``/open-order``)::

    {"data_id": 18, "type": "btc-try", "side": "buy", "amount": "0.50000000",
     "price": "10000.00000000", "total": "5000.00000000", "status": "active",
     "created_at": "2018-02-19 21:34:19"}
    """
    row = FIELDS.row(row, "open-order row")
    data: dict[str, Any] = {
        "data_id": FIELDS.integer(row.get("data_id"), "data_id", strings=False),
        **_order_fields(row, zone),
    }
    return Row("open-order", data["pair"], data["created_at_ms"], data)


# -- answers ---------------------------------------------------------------------------


class Verdict(StrEnum):
    """What :func:`classify` says the caller does with an answer (the values are the
    ``outcome`` label of the request metrics)."""

    OK = "ok"
    RETRIABLE = "retriable"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    REJECTED = "rejected"


_AUTH_WORDS = ("unauthor", "auth", "hash", "signature", "permission", "yetki", "blocked", "ip ")


def classify(endpoint: Endpoint, status: int, body: str) -> Verdict:
    """What the caller does with an answer (see the module docstring)."""
    if 200 <= status < 300:
        return Verdict.OK
    if status == 429:
        return Verdict.RATE_LIMITED
    if status >= 500 or status < 200:
        return Verdict.RETRIABLE
    if status in (401, 403):
        return Verdict.UNAUTHORIZED
    if status in (404, 405):
        return Verdict.NOT_FOUND
    if endpoint.signed and endpoint.auth_only:
        return Verdict.UNAUTHORIZED
    if endpoint.signed and any(word in body.lower() for word in _AUTH_WORDS):
        return Verdict.UNAUTHORIZED
    return Verdict.REJECTED


def error_message(body: str) -> str:
    """A short, log-safe description of an error answer (the caller redacts secrets)."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        for key in ("error", "message", "success"):
            if isinstance(payload.get(key), str):
                return _cut(payload[key])
    return _cut(" ".join(body.split())) or "(empty body)"


def _cut(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


# -- incremental polling without ids ---------------------------------------------------


@dataclass(frozen=True)
class Cursor:
    """Where a ``last N rows`` stream stands.

    ``newest``: the newest row time written so far (None: no row yet; with
    ``tail == ()`` an answer was read and was empty). ``tail``: the fingerprints of the
    rows at that time in the last answer, oldest first, in the exchange's order (rows
    may be identical: two equal fills in one second); ``tail_complete``: that answer
    showed every row of that second (it reached back past it, or was not full).
    ``seen``: the same rows counted by fingerprint, as the previous version stored
    them (a cursor stored by it has no ``tail``; it is still read, and it is still
    written so that a downgrade reads this one). ``timeless``: fingerprints of recent
    rows without a usable time, already handed out once (to the dead-letter topic).

    Stored form (the state topic)::

        {"newest": "2026-01-01 10:00:04", "seen": {"3f2a...": 2},
         "tail": ["3f2a...", "3f2a..."], "tail_complete": false}
    """

    newest: str | None = None
    seen: Mapping[str, int] = field(default_factory=dict)
    timeless: tuple[str, ...] = ()
    tail: tuple[str, ...] | None = None
    tail_complete: bool = False

    #: Rows without a usable time remembered (a bounded list, newest last).
    TIMELESS_KEPT = 100

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"newest": self.newest, "seen": dict(sorted(self.seen.items()))}
        if self.timeless:
            out["timeless"] = list(self.timeless)
        if self.tail is not None:
            out["tail"] = list(self.tail)
            out["tail_complete"] = self.tail_complete
        return out

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Cursor:
        newest = value.get("newest")
        seen = value.get("seen") or {}
        timeless = value.get("timeless") or []
        tail = value.get("tail")
        complete = value.get("tail_complete", False)
        if newest is not None and not isinstance(newest, str):
            raise ValueError("cursor.newest must be a string")
        if not isinstance(seen, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and v > 0 for k, v in seen.items()
        ):
            raise ValueError("cursor.seen must map fingerprints to counts")
        if not isinstance(timeless, list) or not all(isinstance(k, str) for k in timeless):
            raise ValueError("cursor.timeless must be a list of fingerprints")
        if tail is not None and (
            not isinstance(tail, list) or not all(isinstance(k, str) for k in tail)
        ):
            raise ValueError("cursor.tail must be a list of fingerprints")
        if not isinstance(complete, bool):
            raise ValueError("cursor.tail_complete must be a boolean")
        return cls(
            newest, dict(seen), tuple(timeless), None if tail is None else tuple(tail), complete
        )


@dataclass(frozen=True)
class Advance:
    """The result of comparing one poll with the cursor."""

    new_rows: list[Any]
    cursor: Cursor
    #: True when rows may have been missed between the two polls: the window was full,
    #: held nothing older than the cursor's second, and where the rows already written
    #: end in it could not be told for sure (see :func:`advance`).
    gap: bool


def _row_time(row: Any, time_field: str) -> str | None:
    value = row.get(time_field) if isinstance(row, dict) else None
    if not isinstance(value, str) or not wire.LOCAL_TIME.fullmatch(value):
        return None
    return value


def _counted(seen: Mapping[str, int], fps: Sequence[str]) -> list[bool]:
    """Which of ``fps`` (oldest first) were written before, by count: among identical
    rows the older ones are the ones already written."""
    at: Counter[str] = Counter()
    old = []
    for fp in fps:
        at[fp] += 1
        old.append(at[fp] <= seen.get(fp, 0))
    return old


def _overlaps(before: Sequence[str], now: Sequence[str]) -> list[int]:
    """Every ``j`` > 0, longest first, for which the last ``j`` rows of ``before`` are
    the first ``j`` rows of ``now`` (both oldest first)."""
    longest = min(len(before), len(now))
    return [j for j in range(longest, 0, -1) if list(before[len(before) - j :]) == list(now[:j])]


#: The largest chance that new rows merely repeat the rows written last which an
#: overlap may have and still be trusted (see :func:`coincidence`).
COINCIDENCE = 1e-6


def coincidence(before: Sequence[str], now: Sequence[str], j: int) -> float:
    """The chance that the first ``j`` rows of ``now`` are *new* rows that happen to
    repeat the last ``j`` rows of ``before``, judged by how often each of them occurs
    among that second's rows (the previous answer's plus the ones new if the overlap is
    right): rows that recur (equal fills) are weak evidence, distinct ones strong.

    >>> round(coincidence(["a", "b", "c"], ["b", "c", "d"], 2), 3)  # 4 rows, b and c once
    0.062
    """
    rows = Counter([*before, *now[j:]])
    total = sum(rows.values())
    chance = 1.0
    for fp in now[:j]:
        chance *= rows[fp] / total
    return chance


def advance(
    cursor: Cursor,
    rows: Sequence[Any],
    time_field: str,
    window: int = WINDOW_ROWS,
    *,
    append_only: bool = True,
) -> Advance:
    """Which rows of a newest-first ``last N`` answer are new, oldest first.

    ``YYYY-MM-DD HH:MM:SS`` text sorts like the time it names, so times are compared as
    text (same zone throughout). Rows newer than the cursor's second are new; rows older
    than it were written before (or left the window unseen: that is what the gap flag
    is for). Rows *at* the cursor's second ``T`` are told apart as follows:

    * The answer reaches back past ``T``, or is not full: it shows every row of ``T``,
      and so did the previous answer (``tail_complete``). The old ones are those the
      cursor holds, counted by fingerprint. Order is not needed.
    * The answer is full and starts at ``T``: it may have cut rows of ``T``. The rows
      already written are the longest run that ends the previous answer's ``T`` rows and
      starts this one's (``append_only``: rows are only ever added, newest first, so the
      rows written last must be where the new ones start). Found, unique and too long
      to be a coincidence (:func:`coincidence`), it is trusted: every row after it is
      new, whatever it equals. Otherwise the answer cannot say how many rows arrived
      (more than a window of new rows may merely repeat the rows written last, e.g. a
      run of equal fills that went on; no overlap: everything shown is new) and it is a
      **gap**: the rows after the longest overlap are written (never a row twice), and
      the caller says that rows may be missing.

    ``append_only=False`` (the market's open orders: rows leave the list, older ones
    scroll in) uses the longest overlap when there is one and counting otherwise.

    A row without a usable time cannot be placed: it is new once (the caller
    dead-letters it) and never moves the cursor.
    """
    timed: list[tuple[str, str, Any]] = []
    timeless = list(cursor.timeless)
    new: list[Any] = []
    for r in reversed(rows):  # oldest first
        t = _row_time(r, time_field)
        fp = row_fingerprint(r)
        if t is None:
            if fp not in timeless:
                timeless.append(fp)
                new.append(r)
        else:
            timed.append((t, fp, r))
    kept = tuple(timeless[-Cursor.TIMELESS_KEPT :])
    full = len(rows) >= window
    times = [t for t, _, _ in timed]

    def after(answer_newest: str) -> Cursor:
        tail = tuple(fp for t, fp, _ in timed if t == answer_newest)
        complete = not full or any(t < answer_newest for t in times)
        return Cursor(answer_newest, dict(Counter(tail)), kept, tail, complete)

    if cursor.newest is None:
        # The first answer, or the first with rows after empty ones (``tail == ()``):
        # then a full window may have cut rows that arrived since.
        new.extend(r for _, _, r in timed)
        first = max(times, default=None)
        empty = Cursor(timeless=kept, tail=())
        gap = cursor.tail is not None and full and bool(timed)
        return Advance(new, after(first) if first else empty, gap)

    newest = cursor.newest
    at_t = [fp for t, fp, _ in timed if t == newest]
    reaches_back = any(t < newest for t in times)
    gap = False
    if reaches_back or not full:
        # Every row of T is on screen now, and was last time: count.
        seen = cursor.seen if cursor.tail is None else Counter(cursor.tail)
        old_at_t = _counted(seen, at_t)
    elif cursor.tail is None:
        # A cursor stored by the previous version: no order known; count, and as that
        # version did, call a full window that starts at T a gap.
        old_at_t = _counted(cursor.seen, at_t)
        gap = True
    else:
        fits = _overlaps(cursor.tail, at_t)
        if fits:
            j = fits[0]
            old_at_t = [i < j for i in range(len(at_t))]
            chance = coincidence(cursor.tail, at_t, j)
            gap = len(fits) > 1 or chance > COINCIDENCE
        elif append_only:
            old_at_t = [False] * len(at_t)  # nothing written is left on screen
            gap = True
        else:
            old_at_t = _counted(Counter(cursor.tail), at_t)
            gap = not any(old_at_t)
    flags = iter(old_at_t)
    for t, _, r in timed:
        if t > newest or (t == newest and not next(flags)):
            new.append(r)
    answer_newest = max(times, default=newest)
    if answer_newest > newest:
        moved = after(answer_newest)
    elif at_t:
        moved = after(newest)
    else:  # nothing of T on screen any more (orders left): keep what is known of T
        moved = Cursor(newest, cursor.seen, kept, cursor.tail, cursor.tail_complete)
    return Advance(new, moved, gap)
