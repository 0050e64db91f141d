"""The exact-JSON wire layer every exchange uses: exchange text in, exact values out.

Pure (the standard library, msgspec and :mod:`connectors.runtime.errors` only): no network, no
Kafka, no clock. One place for each rule that used to be written per exchange:

- :func:`loads` decodes JSON keeping every number's literal text (:class:`JsonNumber`):
  ``0.00000001`` stays ``"0.00000001"`` (``Decimal`` would print ``1E-8``, a float would
  round). Money never passes through float. :func:`loads_fast` is the same for the hot
  path (msgspec's C decoder; integers arrive as ``int``, whose text is their literal).
- The decimal grammars, by what they are for: :func:`is_json_decimal` (a value the
  exchange sends: RFC 8259's number grammar, whether the exchange wrote it as a number
  or in a string) and :func:`is_plain_decimal` (what an order command may carry and the
  exchange's order form takes: no exponent, no leading zeros).
- :class:`Fields`: the field readers of every protocol module, each raising
  :class:`~connectors.runtime.errors.BadMessage` with the reason its exchange reports for
  that kind of mistake (the reasons are user-visible, see
  :data:`~connectors.runtime.errors.DEAD_LETTER_REASONS`, defined beside ``BadMessage``,
  which enforces them).
- :func:`schema_id`: the ``schema`` header of every record.

Sample::

    >>> value = loads('{"price": 107100.01, "qty": "0.000254"}')
    >>> value["price"], type(value["price"]).__name__
    ('107100.01', 'JsonNumber')
    >>> Fields.uniform("invalid_payload").decimal(value["qty"], "qty")
    '0.000254'
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeGuard
from zoneinfo import ZoneInfo

import msgspec

from connectors.runtime.errors import DEAD_LETTER_REASONS, BadMessage

#: Deepest nesting :func:`loads` accepts with ``strict=True`` (a valid command is flat).
STRICT_MAX_DEPTH = 16
#: The latest time accepted anywhere, in Unix milliseconds (9999-12-31T23:59:59.999Z).
MAX_TIME_MS = 253_402_300_799_999
#: Schema version of every record format (the ``/v1`` of ``cryptomus.trade/v1``).
SCHEMA_VERSION = "v1"

#: RFC 8259's number grammar: optional minus, no leading zeros, optional fraction and
#: exponent, ASCII digits only (no ``+``, no ``.5``, no ``1.``).
JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
#: A decimal without exponent or leading zeros; groups: sign, integer part, fraction.
PLAIN_DECIMAL = re.compile(r"(-?)(0|[1-9][0-9]*)(?:\.([0-9]+))?")
_DIGITS = re.compile(r"[0-9]+")
#: ``YYYY-MM-DD HH:MM:SS``: how some exchanges write a local time.
LOCAL_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80


# -- decoding --------------------------------------------------------------------------


class JsonNumber(str):
    """The exact text of a JSON number as the exchange wrote it (``1e3`` stays ``1e3``).

    Only the decoders make them, after checking the number grammar: a ``JsonNumber`` is
    always RFC 8259 number text, so the readers below do not check it again."""

    __slots__ = ()


class _DuplicateKey(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def loads(text: str | bytes, *, strict: bool = False) -> Any:
    """Decode JSON with every number kept as a :class:`JsonNumber`.

    Anything that is not JSON, including ``NaN``/``Infinity`` and input nested too deep
    for the parser, raises ``BadMessage("invalid_json")``. ``strict`` also refuses what
    two JSON parsers could read differently (duplicate keys, unpaired surrogate escapes,
    nesting deeper than :data:`STRICT_MAX_DEPTH`): for messages whose signed form and
    executed form must be the same (order commands).
    """
    try:
        value = json.loads(
            text,
            parse_float=JsonNumber,
            parse_int=JsonNumber,
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_keys if strict else None,
        )
    except _DuplicateKey as exc:
        key = json.dumps(exc.args[0])
        key = key if len(key) <= 60 else key[:57] + "..."
        raise BadMessage("invalid_json", f"duplicate key {key}") from None
    except RecursionError:
        raise BadMessage("invalid_json", _too_deep(strict)) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BadMessage("invalid_json", f"not JSON: {exc}") from None
    if strict:
        _check_strict(value)
    return value


#: msgspec's decoder with float literals handed over as their text; integers come out
#: as ``int`` (msgspec has no hook for them).
_FAST = msgspec.json.Decoder(float_hook=JsonNumber)
#: An integer literal ``-0``: the one integer whose text ``int`` does not keep.
_NEGATIVE_ZERO = re.compile(r"-0(?![.eE0-9])")
_NEGATIVE_ZERO_BYTES = re.compile(rb"-0(?![.eE0-9])")


def loads_fast(text: str | bytes) -> Any:
    """:func:`loads` (not strict) for the hot path: the same values, about twice as fast.

    Float literals are :class:`JsonNumber`; integers are ``int`` (``str()`` gives their
    literal back: JSON integers have no leading zeros or plus sign), which every
    :class:`Fields` reader takes as a JSON number. Whatever msgspec refuses (invalid
    JSON, integers beyond its range) and text holding an integer ``-0`` go through
    :func:`loads`, so the values and the errors are those of :func:`loads`, with one
    difference: text that cannot be written back as UTF-8 is refused
    (``invalid_json``): bytes that are not UTF-8 (an encoded surrogate included) and a
    string holding a lone surrogate, escaped or not. Nothing read here could go into
    a Kafka record. Bytes are read as UTF-8 (what a WebSocket text frame is): a
    byte-order mark is refused, as :func:`loads` refuses it in text.
    """
    if isinstance(text, bytes):
        if b"-0" not in text or not _NEGATIVE_ZERO_BYTES.search(text):
            try:
                return _FAST.decode(text)
            except (msgspec.MsgspecError, RecursionError):
                pass
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadMessage(
                "invalid_json", f"not UTF-8: {exc.reason} at byte {exc.start}"
            ) from None
    elif "-0" not in text or not _NEGATIVE_ZERO.search(text):
        try:
            return _FAST.decode(text)
        except (msgspec.MsgspecError, RecursionError, UnicodeEncodeError):
            pass
    value = loads(text)
    _check_texts(value)
    return value


def _check_texts(value: Any) -> None:
    """Refuse a string (or key) holding a lone surrogate anywhere in ``value``."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key)
                stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)


def _too_deep(strict: bool) -> str:
    if strict:
        return f"nested deeper than {STRICT_MAX_DEPTH} levels"
    return "nested too deeply to decode"


def _check_strict(value: Any) -> None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > STRICT_MAX_DEPTH:
            raise BadMessage("invalid_json", _too_deep(True))
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadMessage("invalid_json", "a string holds an unpaired surrogate escape") from None


# -- grammars ----------------------------------------------------------------------------


def is_text(value: Any) -> TypeGuard[str]:
    """A JSON string (a decoded number is a ``str`` subclass, and is not text)."""
    return isinstance(value, str) and not isinstance(value, JsonNumber)


def is_json_decimal(value: Any) -> TypeGuard[str]:
    """An exact decimal an exchange sent: a JSON number, or a string holding one."""
    return isinstance(value, str) and JSON_NUMBER.fullmatch(value) is not None


_match_number = JSON_NUMBER.fullmatch


def _decimal_text(value: Any) -> str | None:
    """The exact text of a JSON number (decoded, or an ``int`` from :func:`loads_fast`)
    or of a string holding one; None for anything else. The hot path's check: the
    type tests come first, the grammar only for strings."""
    kind = type(value)
    if kind is JsonNumber or kind is int:
        return str(value)
    if kind is str:
        return value if _match_number(value) is not None else None
    if isinstance(value, str) and not isinstance(value, JsonNumber):
        return str(value) if _match_number(value) is not None else None
    return None


def is_plain_decimal(value: Any) -> TypeGuard[str]:
    """A decimal string without exponent or leading zeros (``-1.50``, ``0``, ``12``)."""
    return is_text(value) and PLAIN_DECIMAL.fullmatch(value) is not None


def short(value: Any) -> str:
    """An untrusted value for an error detail: text as it is, anything else as its
    ``repr`` (bounded work), cut to 80 characters."""
    text = value if isinstance(value, str) else _int_text(value) or _repr.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _int_text(value: Any) -> str | None:
    """An integer read by :func:`loads_fast` shown as the literal it was written as."""
    if type(value) is not int:
        return None
    try:
        return str(value)
    except ValueError:  # more digits than Python converts
        return None


def schema_id(exchange: str, channel: str, version: str = SCHEMA_VERSION) -> str:
    """The ``schema`` header of a record: ``schema_id("cryptomus", "trade")`` is
    ``cryptomus.trade/v1`` (the JSON Schema shipped as ``<exchange>/schemas/<channel>.json``)."""
    return f"{exchange}.{channel}/{version}"


# -- field readers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Fields:
    """Readers for the fields of one exchange's messages.

    Each raises :class:`~connectors.runtime.errors.BadMessage` with the reason that
    exchange reports for that kind of mistake: the reasons are dead-letter headers and
    metric labels, so they stay what each exchange always said (Cryptomus says
    ``invalid_payload`` for all of them, Robicoin names the kind: ``bad_decimal``, ...).
    """

    #: :meth:`need`: a required field is absent, or its parent is not an object.
    missing_reason: str
    #: :meth:`row`: a row or payload that is not an object.
    row_reason: str
    #: :meth:`text`, :meth:`one_of`, :meth:`integer`, :meth:`boolean`.
    field_reason: str
    #: :meth:`decimal`.
    decimal_reason: str
    #: :meth:`unix_ms`, :meth:`local_time_ms`.
    time_reason: str

    def __post_init__(self) -> None:
        for f in fields(self):
            reason = getattr(self, f.name)
            if reason not in DEAD_LETTER_REASONS:
                raise ValueError(f"Fields.{f.name}: {reason!r} is not a dead-letter reason")

    @classmethod
    def uniform(cls, reason: str) -> Fields:
        """Readers that report every mistake with the one ``reason``."""
        return cls(reason, reason, reason, reason, reason)

    def need(self, obj: Any, key: str) -> Any:
        """``obj[key]``; ``obj`` must be an object holding ``key``."""
        if type(obj) is dict:  # the hot path: decoded JSON objects
            try:
                return obj[key]
            except KeyError:
                raise BadMessage(self.missing_reason, f"missing field {key!r}") from None
        if not isinstance(obj, Mapping):
            raise BadMessage(self.missing_reason, f"expected an object holding {key!r}")
        if key not in obj:
            raise BadMessage(self.missing_reason, f"missing field {key!r}")
        return obj[key]

    def row(self, value: Any, what: str) -> dict[str, Any]:
        """``value`` itself, which must be a JSON object (``what``: ``"order row"``)."""
        if not isinstance(value, dict):
            raise BadMessage(self.row_reason, f"{what} is not an object")
        return value

    def decimal(self, value: Any, name: str) -> str:
        """The exact decimal text of ``value`` (a JSON number, or a string holding one)."""
        text = _decimal_text(value)
        if text is None:
            raise BadMessage(self.decimal_reason, f"{name}: expected a decimal, got {short(value)}")
        return text

    def opt_decimal(self, value: Any, name: str) -> str | None:
        return None if value is None else self.decimal(value, name)

    def text(self, value: Any, name: str) -> str:
        """A non-empty JSON string."""
        if type(value) is str and value:
            return value
        if not is_text(value) or not value:
            raise BadMessage(
                self.field_reason, f"{name}: expected a non-empty string, got {short(value)}"
            )
        return value

    def opt_text(self, value: Any, name: str) -> str | None:
        return None if value is None else self.text(value, name)

    def one_of(self, value: Any, name: str, allowed: Iterable[str]) -> str:
        """A non-empty JSON string among ``allowed``."""
        text = self.text(value, name)
        if text not in allowed:
            raise BadMessage(self.field_reason, f"{name}: unexpected value {short(value)}")
        return text

    def integer(self, value: Any, name: str, *, strings: bool = True) -> int:
        """A non-negative integer written as a JSON number or, with ``strings``, as a
        string of digits."""
        if type(value) is int and value >= 0:  # from loads_fast (bool is not int here)
            return value
        ok = isinstance(value, JsonNumber) or (strings and isinstance(value, str))
        if not ok or not _DIGITS.fullmatch(value):
            raise BadMessage(self.field_reason, f"{name}: expected an integer, got {short(value)}")
        return int(value)

    def boolean(self, value: Any, name: str) -> bool:
        if not isinstance(value, bool):
            raise BadMessage(
                self.field_reason, f"{name}: expected true or false, got {short(value)}"
            )
        return value

    def unix_ms(self, value: Any, name: str) -> int:
        """Unix seconds (an integer or a decimal, as a number or a string) → integer
        milliseconds, from 0 to :data:`MAX_TIME_MS`."""
        if type(value) is int and 0 <= value * 1000 <= MAX_TIME_MS:
            return value * 1000
        if is_json_decimal(value):
            try:
                ms = Decimal(value) * 1000
            except ArithmeticError:  # an exponent beyond any context
                ms = Decimal(-1)
            if 0 <= ms <= MAX_TIME_MS:
                return int(ms)
        raise BadMessage(self.time_reason, f"{name}: expected Unix seconds, got {short(value)}")

    def opt_unix_ms(self, value: Any, name: str) -> int | None:
        return None if value is None else self.unix_ms(value, name)

    def local_time_ms(self, value: Any, zone: ZoneInfo, name: str) -> int:
        """``YYYY-MM-DD HH:MM:SS`` in ``zone`` → Unix milliseconds (UTC).

        >>> Fields.uniform("bad_time").local_time_ms(
        ...     "2018-02-19 21:11:44", ZoneInfo("Europe/Istanbul"), "t")
        1519063904000
        """
        if not isinstance(value, str) or not LOCAL_TIME.fullmatch(value):
            raise BadMessage(
                self.time_reason, f"{name}: expected YYYY-MM-DD HH:MM:SS, got {short(value)}"
            )
        try:
            local = datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=zone)
        except ValueError:
            raise BadMessage(
                self.time_reason, f"{name}: not a valid time: {short(value)}"
            ) from None
        return int(local.astimezone(UTC).timestamp()) * 1000
