"""Robicoin order commands: Kafka value → validated command, and command → result record.

Pure: no network, no Kafka, no clock (callers pass ``now_ms``). The order sink reads one
JSON object per record (key = pair) and calls ``create-order`` or ``delete-order``::

    {"command_id": "c-0001", "action": "create", "pair": "btc-try", "side": "buy",
     "amount": "1500.00", "price": "2150000.5", "use_rbc": false, "stop_limit": "0",
     "created_at": 1750953177042, "expires_at": 1750953237042,
     "signature": "<64 lowercase hex>"}

    {"command_id": "c-0002", "action": "delete", "pair": "btc-try", "data_id": 18,
     "created_at": 1750953177042}

Money is never a float: ``amount``, ``price`` and ``stop_limit`` must be JSON *strings*
(a JSON number is refused, ``number_not_string``); their text goes to the exchange as is.

What :func:`parse_command` raises, grouped by what the sink does::

    BadMessage   no usable command_id (empty, invalid_utf8, invalid_json,
                 not_an_object, invalid_command_id): dead-letter it, count it, go on
    Rejected     command_id known, anything else wrong (REJECT_REASONS): write a
                 ``rejected`` result for it, never call the exchange

A message two JSON parsers could read differently (duplicate keys, unpaired surrogate
escapes, nesting deeper than :data:`MAX_DEPTH`) is ``invalid_json``. The signature
(HMAC-SHA256, see :func:`canonical_bytes`) is checked first once the ``command_id`` is
known: the contents of a command that fails it are not trusted, not even to explain what
else is wrong with it.

Also here, pure as well: the exchange form fields (:func:`create_fields`,
:func:`delete_fields`), :func:`notional`, the reconciliation match of
a create whose outcome is unknown (:func:`find_placed`), the check of a delete the
exchange did not plainly confirm (:func:`find_open`) and the shape of result records
(:func:`result`, schema ``schemas/order-result.json``). What is not Robicoin's
(outcomes, expiry, the ledger) is the command sink's (:mod:`connectors.runtime.ledger`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Context, Decimal, Inexact
from enum import StrEnum
from typing import Any, ClassVar, TypeAlias
from zoneinfo import ZoneInfo

from connectors.robicoin.protocol import (
    EXCHANGE,
    WINDOW_ROWS,
    parse_open_order,
    parse_transaction,
)
from connectors.runtime import wire
from connectors.runtime.errors import BadMessage, ConfigError
from connectors.runtime.ledger import CommandRefused, Outcome
from connectors.runtime.ledger import expired as expired
from connectors.runtime.wire import JsonNumber
from connectors.runtime.wire import is_text as _is_text

#: ``schema`` header values of the command and result topics.
COMMAND_SCHEMA = wire.schema_id(EXCHANGE, "order-command")
RESULT_SCHEMA = wire.schema_id(EXCHANGE, "order-result")

#: Reasons :func:`parse_command` gives with :class:`~connectors.runtime.errors.BadMessage`.
BAD_MESSAGE_REASONS = frozenset(
    {"empty", "invalid_utf8", "invalid_json", "not_an_object", "invalid_command_id"}
)
#: Reasons of a command whose contents cannot be trusted (it claims no command id).
UNTRUSTED_REASONS = frozenset({"unsigned", "bad_signature"})
#: Reasons :class:`Rejected` carries (a fixed set: safe as a metric label).
REJECT_REASONS = frozenset(
    {
        "bad_action",
        "missing_field",
        "unknown_field",
        "bad_pair",
        "pair_not_allowed",
        "bad_side",
        "number_not_string",
        "bad_decimal",
        "not_positive",
        "negative",
        "too_many_decimals",
        "too_large",
        "bad_data_id",
        "bad_time",
        "bad_flag",
        "unsigned",
        "bad_signature",
    }
)

#: Decimals the exchange shows (it rounds a buy's coin quantity down to this).
EXCHANGE_DECIMALS = 8
#: Most integer digits accepted in ``amount``, ``price`` and ``stop_limit``.
MAX_INTEGER_DIGITS = 20
#: Deepest JSON nesting accepted at all (a valid command is flat).
MAX_DEPTH = wire.STRICT_MAX_DEPTH
#: Latest accepted Unix millisecond time (9999-12-31T23:59:59.999Z).
MAX_MS = wire.MAX_TIME_MS
#: Longest ``message`` written into a result.
MAX_MESSAGE = 1000

_COMMAND_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")
_PAIR = re.compile(r"[a-z0-9]{1,16}-[a-z0-9]{1,16}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_MILLIS = re.compile(r"0|[1-9][0-9]{0,14}")
_DATA_ID = re.compile(r"[1-9][0-9]{0,17}")
_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")

_COMMON = frozenset({"command_id", "action", "pair", "created_at", "expires_at", "signature"})
_CREATE = _COMMON | {"side", "amount", "price", "use_rbc", "stop_limit"}
_DELETE = _COMMON | {"data_id"}
_CREATE_REQUIRED = ("pair", "side", "amount", "price", "created_at")
_DELETE_REQUIRED = ("pair", "data_id", "created_at")

#: Exact arithmetic: 100 digits hold any product of two accepted decimals.
_EXACT = Context(prec=100, traps=[Inexact])
_TRUNCATE = Context(prec=100, rounding=ROUND_DOWN)
_Q8 = Decimal(1).scaleb(-EXCHANGE_DECIMALS)


# -- types -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateOrder:
    """A validated create command. ``amount`` is TRY to spend for a buy, coin for a sell
    (the exchange's meaning); decimals keep the producer's exact text."""

    action: ClassVar[str] = "create"
    command_id: str
    pair: str
    side: str
    amount: str
    price: str
    use_rbc: bool
    stop_limit: str
    created_at_ms: int
    expires_at_ms: int | None


@dataclass(frozen=True)
class DeleteOrder:
    """A validated delete command (``data_id`` from the exchange's ``open-order``)."""

    action: ClassVar[str] = "delete"
    command_id: str
    pair: str
    data_id: int
    created_at_ms: int
    expires_at_ms: int | None


Command: TypeAlias = CreateOrder | DeleteOrder


class Rejected(CommandRefused):
    """A command with a usable ``command_id`` that must not be sent.

    ``reason`` is one of :data:`REJECT_REASONS`; ``detail`` is human text that never
    holds a secret or an expected signature. An unsigned or forged command
    (:data:`UNTRUSTED_REASONS`) is not ``trusted``.
    """

    def __init__(self, reason: str, detail: str, command_id: str | None) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(reason, detail, command_id, trusted=reason not in UNTRUSTED_REASONS)


@dataclass(frozen=True)
class Policy:
    """What the sink accepts. ``hmac_secret`` is hidden from ``repr``."""

    pairs: frozenset[str]
    max_decimals: int = 8
    hmac_secret: bytes | None = field(default=None, repr=False)
    require_signature: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pairs, frozenset) or not self.pairs:
            raise ConfigError("pairs: expected a non-empty frozenset of pairs")
        bad = sorted(
            repr(p) for p in self.pairs if not isinstance(p, str) or not _PAIR.fullmatch(p)
        )
        if bad:
            raise ConfigError(f"pairs: not a pair like btc-try: {', '.join(bad)}")
        if (
            isinstance(self.max_decimals, bool)
            or not isinstance(self.max_decimals, int)
            or not 0 <= self.max_decimals <= EXCHANGE_DECIMALS
        ):
            raise ConfigError(f"max_decimals: expected an integer 0..{EXCHANGE_DECIMALS}")
        if self.hmac_secret is not None and (
            not isinstance(self.hmac_secret, bytes) or not self.hmac_secret
        ):
            raise ConfigError("hmac_secret: expected non-empty bytes")
        if self.require_signature and self.hmac_secret is None:
            raise ConfigError("require_signature needs an hmac_secret")


# -- canonical form and signing ----------------------------------------------------------


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    """The bytes the HMAC covers: ``obj`` without its top-level ``signature``, as JSON
    with sorted keys, no whitespace (``","`` and ``":"``), non-ASCII written as is, UTF-8.

    Strings are escaped as Python's ``json.dumps(..., ensure_ascii=False)`` does; a
    number (:class:`~connectors.runtime.wire.JsonNumber`, as decoded) is written
    back as the literal text received, a Python ``int`` as its digits. Floats and
    Decimals are refused (money is a string, times are integers).

    >>> canonical_bytes({"b": "1.50", "a": JsonNumber("1e3"), "signature": "x"})
    b'{"a":1e3,"b":"1.50"}'
    """
    if not isinstance(obj, Mapping):
        raise TypeError("a command is a JSON object (a mapping)")
    out: list[str] = []
    _write({k: v for k, v in obj.items() if k != "signature"}, out, 0)
    return "".join(out).encode("utf-8")


def _write(value: Any, out: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, JsonNumber):
        if not wire.is_json_decimal(value):
            raise ValueError(f"not a JSON number literal: {_show(value)}")
        out.append(str(value))
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif value is None:
        out.append("null")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError("object keys must be strings")
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _write(value[key], out, depth + 1)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out, depth + 1)
        out.append("]")
    else:
        raise TypeError(
            f"cannot sign a {type(value).__name__}: write decimals as strings, times as int"
        )


def sign(obj: Mapping[str, Any], secret: bytes) -> str:
    """Lowercase hex HMAC-SHA256 of :func:`canonical_bytes` (what ``signature`` holds)."""
    if not isinstance(secret, bytes) or not secret:
        raise ValueError("secret: expected non-empty bytes")
    return hmac.new(secret, canonical_bytes(obj), hashlib.sha256).hexdigest()


# -- parsing -----------------------------------------------------------------------------


def _decode(raw: bytes | None) -> Any:
    """JSON with exact number text; duplicate keys, lone surrogates and deep nesting are
    refused (two parsers could disagree about such a message)."""
    if raw is None or len(raw) == 0:
        raise BadMessage("empty", "the record has no value")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadMessage("invalid_utf8", f"not UTF-8 at byte {exc.start}") from None
    return wire.loads(text, strict=True)


def _show(value: Any) -> str:
    """A short, single-line rendering of an untrusted value for error details."""
    if isinstance(value, JsonNumber):
        text = str(value)
    elif isinstance(value, str | bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, dict):
        text = "an object"
    elif isinstance(value, list):
        text = "an array"
    else:
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def parse_command(raw: bytes | None, policy: Policy) -> Command:
    """A Kafka record value → :class:`CreateOrder` or :class:`DeleteOrder`.

    Raises :class:`~connectors.runtime.errors.BadMessage` when there is no usable
    ``command_id`` and :class:`Rejected` for everything else (see the module docstring).
    """
    obj = _decode(raw)
    if not isinstance(obj, dict):
        raise BadMessage("not_an_object", f"expected a JSON object, got {_show(obj)}")
    command_id = obj.get("command_id")
    if not _is_text(command_id) or not _COMMAND_ID.fullmatch(command_id):
        shown = "missing" if "command_id" not in obj else _show(command_id)
        raise BadMessage(
            "invalid_command_id", f"command_id: expected 1-100 of [A-Za-z0-9._:-], got {shown}"
        )
    _check_signature(obj, command_id, policy)
    return _fields(obj, command_id, policy)


def _check_signature(obj: dict[str, Any], command_id: str, policy: Policy) -> None:
    signature = obj.get("signature")
    if "signature" not in obj:
        if policy.require_signature:
            raise Rejected("unsigned", "a signature is required and there is none", command_id)
        return
    if policy.hmac_secret is None:
        # Untrusted like a forged one: nothing here can tell them apart.
        raise Rejected(
            "bad_signature",
            "the command is signed but no HMAC secret is configured to check it",
            command_id,
        )
    if not _is_text(signature) or not _SIGNATURE.fullmatch(signature):
        raise Rejected("bad_signature", "signature: expected 64 lowercase hex digits", command_id)
    expected = sign(obj, policy.hmac_secret)
    if not hmac.compare_digest(expected, signature):
        raise Rejected(
            "bad_signature",
            "signature does not match the command (HMAC-SHA256 of its canonical form)",
            command_id,
        )


def _fields(obj: dict[str, Any], cid: str, policy: Policy) -> Command:
    if "action" not in obj:
        raise Rejected("missing_field", "missing: action", cid)
    action = obj["action"]
    if not _is_text(action) or action not in ("create", "delete"):
        raise Rejected("bad_action", f"action: expected create or delete, got {_show(action)}", cid)
    create = action == "create"
    unknown = sorted(set(obj) - (_CREATE if create else _DELETE))
    if unknown:
        names = ", ".join(_show(n) for n in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise Rejected("unknown_field", f"not a field of a {action} command: {names}", cid)
    missing = [n for n in (_CREATE_REQUIRED if create else _DELETE_REQUIRED) if n not in obj]
    if missing:
        raise Rejected("missing_field", f"missing: {', '.join(missing)}", cid)
    created_at = _millis(obj["created_at"], "created_at", cid)
    expires_at = _millis(obj["expires_at"], "expires_at", cid) if "expires_at" in obj else None
    if expires_at is not None and expires_at <= created_at:
        raise Rejected("bad_time", "expires_at must be later than created_at", cid)
    pair = obj["pair"]
    if not _is_text(pair) or not _PAIR.fullmatch(pair):
        raise Rejected("bad_pair", f"pair: expected a pair like btc-try, got {_show(pair)}", cid)
    if pair not in policy.pairs:
        raise Rejected("pair_not_allowed", f"pair {pair} is not in the allowed pairs", cid)
    if not create:
        return DeleteOrder(cid, pair, _data_id(obj["data_id"], cid), created_at, expires_at)
    side = obj["side"]
    if not _is_text(side) or side not in ("buy", "sell"):
        raise Rejected("bad_side", f"side: expected buy or sell, got {_show(side)}", cid)
    amount = _decimal(obj["amount"], "amount", cid, policy.max_decimals, zero_ok=False)
    price = _decimal(obj["price"], "price", cid, policy.max_decimals, zero_ok=False)
    stop_limit = _decimal(
        obj.get("stop_limit", "0"), "stop_limit", cid, policy.max_decimals, zero_ok=True
    )
    use_rbc = obj.get("use_rbc", False)
    if not isinstance(use_rbc, bool):
        raise Rejected("bad_flag", f"use_rbc: expected true or false, got {_show(use_rbc)}", cid)
    return CreateOrder(cid, pair, side, amount, price, use_rbc, stop_limit, created_at, expires_at)


def _millis(value: Any, name: str, cid: str) -> int:
    if not isinstance(value, JsonNumber) or not _MILLIS.fullmatch(value) or int(value) > MAX_MS:
        raise Rejected(
            "bad_time",
            f"{name}: expected Unix milliseconds (a JSON integer), got {_show(value)}",
            cid,
        )
    return int(value)


def _data_id(value: Any, cid: str) -> int:
    if not isinstance(value, str) or not _DATA_ID.fullmatch(value):
        raise Rejected(
            "bad_data_id", f"data_id: expected a positive integer, got {_show(value)}", cid
        )
    return int(value)


def _decimal(value: Any, name: str, cid: str, max_decimals: int, *, zero_ok: bool) -> str:
    """Plain decimal text (no exponent, no leading zeros), returned unchanged."""
    if isinstance(value, JsonNumber):
        raise Rejected(
            "number_not_string",
            f"{name}: write decimals as JSON strings, got the number {_show(value)}",
            cid,
        )
    match = wire.PLAIN_DECIMAL.fullmatch(value) if _is_text(value) else None
    if match is None:
        hint = " (no exponent)" if _is_text(value) and "e" in value.lower() else ""
        raise Rejected(
            "bad_decimal", f"{name}: expected a plain decimal string{hint}, got {_show(value)}", cid
        )
    sign_, integer, fraction = match[1], match[2], match[3] or ""
    if len(integer) > MAX_INTEGER_DIGITS:
        raise Rejected("too_large", f"{name}: more than {MAX_INTEGER_DIGITS} integer digits", cid)
    if len(fraction) > max_decimals:
        raise Rejected("too_many_decimals", f"{name}: more than {max_decimals} decimal places", cid)
    if sign_:
        code = "negative" if zero_ok else "not_positive"
        raise Rejected(code, f"{name}: must be {'>= 0' if zero_ok else '> 0'}", cid)
    if not zero_ok and Decimal(value) == 0:
        raise Rejected("not_positive", f"{name}: must be > 0", cid)
    return str(value)


# -- what the sink sends -----------------------------------------------------------------


def create_fields(cmd: CreateOrder) -> dict[str, str]:
    """The ``create-order`` form fields (auth fields are added by the client)."""
    return {
        "side": cmd.side,
        "type": cmd.pair,
        "amount": cmd.amount,
        "price": cmd.price,
        "use_rbc": "1" if cmd.use_rbc else "0",
        "stop_limit": cmd.stop_limit,
    }


def delete_fields(cmd: DeleteOrder) -> dict[str, str]:
    """The ``delete-order`` form fields (auth fields are added by the client)."""
    return {"data_id": str(cmd.data_id), "type": cmd.pair}


def notional(cmd: CreateOrder) -> Decimal:
    """Value in the quote currency (TRY), exact: a buy's amount already is; a sell's is
    amount * price."""
    amount = Decimal(cmd.amount)
    if cmd.side == "buy":
        return amount
    return _EXACT.multiply(amount, Decimal(cmd.price))


# -- reconciliation ----------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """What ``open-order`` and ``transaction`` say about a create of unknown outcome.

    ``open_matches``: ``data_id`` of every matching open order; ``fill_matches``: matching
    own trades. ``saturated``: a match may be hidden, so "no match" does not mean "not
    placed" (the caller must answer unknown): an answer was a full window of 25 rows none
    of which is older than the command, or held rows that could not be read
    (``unreadable`` of them; one may be the order). Only :attr:`absent` allows the
    answer "not placed".
    """

    open_matches: list[int]
    fill_matches: int
    saturated: bool
    unreadable: int = 0

    @property
    def found(self) -> bool:
        return bool(self.open_matches) or self.fill_matches > 0

    @property
    def absent(self) -> bool:
        return not self.found and not self.saturated


def find_placed(
    cmd: CreateOrder,
    open_orders: Sequence[Any],
    transactions: Sequence[Any],
    since_ms: int,
    until_ms: int,
    zone: ZoneInfo,
) -> Placement:
    """Look for ``cmd`` in raw ``open-order`` / ``transaction`` rows (as decoded by
    :func:`~connectors.robicoin.protocol.decode`) created in ``[since_ms, until_ms]``.

    Row times have second resolution, so the window is widened by 1 s on each side.
    An open order matches on pair, side, price (as Decimal), time and amount: a sell's
    amount equal; a buy's amount equal to the TRY amount, or to TRY / price rounded
    down to 8 decimals (the coin quantity the exchange shows), or its total equal to the
    TRY amount. A ``maker``/``taker`` transaction matches on pair, price and time (the
    order may have filled at once).
    """
    if since_ms > until_ms:
        raise ValueError("since_ms must not be after until_ms")
    lo, hi = since_ms - 1000, until_ms + 1000
    price = Decimal(cmd.price)
    amount = Decimal(cmd.amount)
    amounts = {amount}
    if cmd.side == "buy":
        amounts.add(_TRUNCATE.divide(amount, price).quantize(_Q8, ROUND_DOWN, _TRUNCATE))
    unreadable = 0
    open_matches: list[int] = []
    open_times: list[int] = []
    for raw in open_orders:
        try:
            row = parse_open_order(raw, zone).data
        except BadMessage:
            unreadable += 1
            continue
        open_times.append(row["created_at_ms"])
        if (
            row["pair"] == cmd.pair
            and row["side"] == cmd.side
            and Decimal(row["price"]) == price
            and lo <= row["created_at_ms"] <= hi
            and (
                Decimal(row["amount"]) in amounts
                or (cmd.side == "buy" and Decimal(row["total"]) == amount)
            )
        ):
            open_matches.append(row["data_id"])
    fill_matches = 0
    fill_times: list[int] = []
    for raw in transactions:
        try:
            row = parse_transaction(raw, zone).data
        except BadMessage:
            unreadable += 1
            continue
        fill_times.append(row["created_at_ms"])
        if (
            row["zone"] in ("maker", "taker")
            and row["pair"] == cmd.pair
            and Decimal(row["price"]) == price
            and lo <= row["created_at_ms"] <= hi
        ):
            fill_matches += 1

    def full(rows: Sequence[Any], times: list[int]) -> bool:
        # Unreadable rows count as recent: only a row provably older than the window
        # shows that the answer reaches back past the command.
        return len(rows) >= WINDOW_ROWS and all(t >= lo for t in times)

    saturated = full(open_orders, open_times) or full(transactions, fill_times) or unreadable > 0
    return Placement(open_matches, fill_matches, saturated, unreadable)


class OpenState(StrEnum):
    """Whether ``open-order`` shows the order a delete names."""

    OPEN = "open"
    GONE = "gone"
    UNDECIDED = "undecided"


@dataclass(frozen=True)
class OpenCheck:
    """What :func:`find_open` concluded, and why (``detail``: human text, no secret)."""

    state: OpenState
    detail: str


def find_open(cmd: DeleteOrder, open_orders: Sequence[Any]) -> OpenCheck:
    """Is the order ``(cmd.data_id, cmd.pair)`` among raw ``open-order`` rows (as decoded
    by :func:`~connectors.robicoin.protocol.decode`)?

    A delete answered with anything but the documented ``success`` is decided here, not
    from the status: the spec says only "40x" for errors and documents no error bodies,
    so ``400 {"error": "Order not found."}`` may mean "already gone" as well as "no".

    ``OPEN``: a row has this ``data_id`` and pair. ``GONE``: no row has, and the answer
    shows every open order (fewer than 25 rows, all readable). ``UNDECIDED``: not found,
    but it could be hidden: the answer is a full window of 25 (``open-order`` lists only
    the last 25 open orders) or holds a row whose ``data_id`` or pair cannot be read.

    >>> cmd = DeleteOrder("d-1", "btc-try", 18, 0, None)
    >>> find_open(cmd, [{"data_id": JsonNumber("18"), "type": "btc-try"}]).state
    <OpenState.OPEN: 'open'>
    >>> find_open(cmd, [{"data_id": JsonNumber("19"), "type": "btc-try"}]).state
    <OpenState.GONE: 'gone'>
    """
    unreadable = 0
    for raw in open_orders:
        data_id = raw.get("data_id") if isinstance(raw, dict) else None
        pair = raw.get("type") if isinstance(raw, dict) else None
        if not isinstance(data_id, JsonNumber) or not data_id.isdigit() or not _is_text(pair):
            unreadable += 1
            continue
        # Compared as text: int() of a hostile 5,000-digit id would raise.
        if (data_id.lstrip("0") or "0") == str(cmd.data_id) and pair == cmd.pair:
            return OpenCheck(
                OpenState.OPEN, f"open-order still lists order {cmd.data_id} on {cmd.pair}"
            )
    if unreadable:
        return OpenCheck(
            OpenState.UNDECIDED,
            f"open-order does not list order {cmd.data_id} on {cmd.pair}, but {unreadable} "
            "of its rows could not be read (one may be it)",
        )
    if len(open_orders) >= WINDOW_ROWS:
        return OpenCheck(
            OpenState.UNDECIDED,
            f"open-order does not list order {cmd.data_id} on {cmd.pair}, but it shows only "
            f"the last {WINDOW_ROWS} open orders and is full: the order may still be open",
        )
    return OpenCheck(OpenState.GONE, f"open-order does not list order {cmd.data_id} on {cmd.pair}")


# -- results -----------------------------------------------------------------------------


#: Outcomes for which the exchange was never called.
NEVER_SENT = frozenset({Outcome.REJECTED, Outcome.EXPIRED, Outcome.DUPLICATE})
#: Outcomes that must say why.
NEEDS_REASON = frozenset({Outcome.REJECTED, Outcome.FAILED, Outcome.EXPIRED, Outcome.UNKNOWN})


def _count(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def result(
    *,
    command_id: str,
    outcome: Outcome | str,
    received_at_ms: int,
    decided_at_ms: int,
    source: Mapping[str, Any],
    command: Command | None = None,
    action: str | None = None,
    reason: str | None = None,
    message: str | None = None,
    pair: str | None = None,
    reconciled: bool = False,
    attempts: int = 0,
    command_created_at_ms: int | None = None,
    exchange_ms: int | None = None,
    data_id: int | None = None,
) -> dict[str, Any]:
    """The one place that shapes an ``order-result`` record (a JSON-ready dict).

    Pass the parsed ``command`` when there is one: ``action``, ``pair``,
    ``command_created_at_ms`` and a delete's ``data_id`` are then taken from it (given
    explicitly as well, they must agree). Without one (only ``rejected`` and
    ``duplicate``), they are None unless given. ``source`` is ``{"topic", "partition",
    "offset"}`` of the command record; ``exchange_ms`` the time spent inside exchange
    calls; ``data_id`` of a create: the open order reconciliation identified.
    Arguments that would make a record the schema refuses raise ``ValueError`` (a bug
    in the caller); the rules are the schema's ``allOf``.

    >>> result(command_id="c-1", outcome="rejected", reason="bad_decimal",
    ...        received_at_ms=5, decided_at_ms=7,
    ...        source={"topic": "t", "partition": 0, "offset": 9})["latency_ms"]
    {'end_to_end': None, 'in_sink': 2, 'exchange': None}
    """
    outcome = Outcome(outcome)
    if not isinstance(command_id, str) or not _COMMAND_ID.fullmatch(command_id):
        raise ValueError("command_id: not a valid command id")
    if command is not None:
        if command.command_id != command_id:
            raise ValueError("command.command_id differs from command_id")
        derived: dict[str, Any] = {
            "action": "create" if isinstance(command, CreateOrder) else "delete",
            "pair": command.pair,
            "command_created_at_ms": command.created_at_ms,
            "data_id": command.data_id if isinstance(command, DeleteOrder) else data_id,
        }
        given = {
            "action": action,
            "pair": pair,
            "command_created_at_ms": command_created_at_ms,
            "data_id": data_id,
        }
        for name, value in given.items():
            if value is not None and value != derived[name]:
                raise ValueError(f"{name} differs from the command's")
        action, pair = derived["action"], derived["pair"]
        command_created_at_ms, data_id = derived["command_created_at_ms"], derived["data_id"]
    if reason is not None and (not isinstance(reason, str) or not _REASON.fullmatch(reason)):
        raise ValueError(f"reason: expected a short snake_case code, got {reason!r}")
    if outcome in NEEDS_REASON and reason is None:
        raise ValueError(f"a {outcome} result needs a reason")
    if action is None:
        if outcome not in (Outcome.REJECTED, Outcome.DUPLICATE):
            raise ValueError(f"a {outcome} result needs the parsed command's action")
        if pair is not None or command_created_at_ms is not None or data_id is not None:
            raise ValueError("pair, command_created_at_ms and data_id need an action")
    elif action not in ("create", "delete"):
        raise ValueError(f"action: expected create, delete or None, got {action!r}")
    else:
        if not isinstance(pair, str) or not pair:
            raise ValueError("pair: required with an action")
        _count(command_created_at_ms, "command_created_at_ms")
    if not isinstance(reconciled, bool):
        raise ValueError("reconciled: expected a bool")
    attempts = _count(attempts, "attempts")
    if exchange_ms is not None:
        _count(exchange_ms, "exchange_ms")
    if outcome in NEVER_SENT and (attempts or exchange_ms is not None or reconciled):
        raise ValueError(f"a {outcome} command was never sent")
    # A reconciled outcome may follow a restart that found the call pending: the call
    # was made (or not) by the previous run, and this run made none.
    if outcome in (Outcome.ACCEPTED, Outcome.FAILED) and not reconciled and attempts < 1:
        raise ValueError(f"a {outcome} result needs attempts >= 1 or reconciliation")
    if reason == "already_gone" and not (outcome is Outcome.ACCEPTED and action == "delete"):
        raise ValueError("already_gone is for an accepted delete only")
    if data_id is not None:
        _count(data_id, "data_id", 1)
        if action == "create" and not (reconciled and outcome is Outcome.ACCEPTED):
            raise ValueError("a create's data_id comes from a reconciliation that found it")
    elif action == "delete":
        raise ValueError("a delete result carries the command's data_id")
    received_at_ms = _count(received_at_ms, "received_at_ms")
    decided_at_ms = _count(decided_at_ms, "decided_at_ms")
    if not isinstance(source, Mapping) or set(source) != {"topic", "partition", "offset"}:
        raise ValueError("source: expected {topic, partition, offset}")
    if not isinstance(source["topic"], str) or not source["topic"]:
        raise ValueError("source.topic: expected a topic name")
    if message is not None:
        message = str(message)
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
    created = command_created_at_ms
    return {
        "command_id": command_id,
        "action": action,
        "outcome": outcome.value,
        "reason": reason,
        "message": message,
        "pair": pair,
        "reconciled": reconciled,
        "attempts": attempts,
        "command_created_at_ms": created,
        "received_at_ms": received_at_ms,
        "decided_at_ms": decided_at_ms,
        "latency_ms": {
            "end_to_end": None if created is None else decided_at_ms - created,
            # Wall clocks can step back; a negative time in the sink means zero.
            "in_sink": max(0, decided_at_ms - received_at_ms),
            "exchange": exchange_ms,
        },
        "source": {
            "topic": source["topic"],
            "partition": _count(source["partition"], "source.partition"),
            "offset": _count(source["offset"], "source.offset"),
        },
        "data_id": data_id,
    }
