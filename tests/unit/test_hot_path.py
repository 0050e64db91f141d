"""The source's hot path (commit e2798e7): what its speed-ups must not change.

- ``wire.loads_fast`` (msgspec) reads every JSON text as ``wire.loads`` does, and refuses
  what it refuses with the same reason;
- the ``Fields`` readers take its ``int`` as they take a ``JsonNumber``;
- ``records.Envelopes`` writes the bytes ``json.dumps`` (compact, UTF-8) would;
- ``FastHistogram`` exposes the series of a prometheus_client ``Histogram``;
- ``Delivery``'s per-slice bookkeeping: buffered, age of the oldest unacknowledged
  record, failures, metrics, and memory that stays bounded.

Pure: no broker (tests/e2e/test_delivery_slices.py sends through a real one).
"""

from __future__ import annotations

import json
import queue
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from connectors.runtime import records, wire
from connectors.runtime.errors import BadMessage, FatalError
from connectors.runtime.kafka import SLICE_S, Delivery
from connectors.runtime.metrics import LAG_BUCKETS, LATENCY_BUCKETS, FastHistogram, Metrics
from connectors.runtime.producer import DeliveryReport, SendFuture
from connectors.testing import T

# -- loads_fast is loads -------------------------------------------------------------------

Norm = tuple[Any, ...]


def norm(value: Any) -> Norm:
    """A decoded value with its numbers as their text: ``loads`` gives ``JsonNumber`` for
    every number, ``loads_fast`` an ``int`` for integers (whose ``str`` is the literal).
    A float, or any other type, is kept apart and never equals a number."""
    if value is None:
        return ("null",)
    if type(value) is bool:
        return ("bool", value)
    if type(value) is int or type(value) is wire.JsonNumber:
        return ("number", str(value))
    if type(value) is str:
        return ("string", value)
    if type(value) is list:
        return ("list", tuple(norm(v) for v in value))
    if type(value) is dict:
        return ("object", tuple((k, norm(v)) for k, v in value.items()))
    return ("unexpected", type(value).__name__, repr(value))


def outcome(decode: Callable[[Any], Any], text: str | bytes) -> Norm:
    """What a decoder makes of ``text``: the value, or the reason it refused it.
    Anything but ``BadMessage`` escapes (a crash is a failure of its own)."""
    try:
        return ("ok", norm(decode(text)))
    except BadMessage as exc:
        return ("refused", exc.reason)


def _writable(value: Norm) -> bool:
    """Every string and key of a normalised value can be written as UTF-8."""
    for item in value:
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, tuple) and not _writable(item):
            return False
    return True


def assert_same(text: str | bytes) -> Norm:
    """``loads_fast`` gives what ``loads`` gives, except that it refuses what could never
    be written into a record: bytes that are not UTF-8, a string holding a lone
    surrogate (``loads`` reads both). Returns what ``loads_fast`` gave."""
    want = outcome(wire.loads, text)
    if isinstance(text, bytes):
        # Frames are UTF-8 (RFC 6455): what loads would read after guessing another
        # encoding or dropping a byte-order mark is read as the UTF-8 text it is.
        try:
            want = outcome(wire.loads, text.decode("utf-8"))
        except UnicodeDecodeError:
            want = ("refused", "invalid_json")
    if want[0] == "ok" and not _writable(want):
        want = ("refused", "invalid_json")
    assert outcome(wire.loads_fast, text) == want, f"loads_fast differs from loads on {text!r}"
    return want


WS = st.sampled_from(["", "", " ", "\n", "\t ", "\r\n"])
#: Every number the grammar allows: -0, -0.0, 1E+8, leading-zero fractions, long digit runs.
number_literals = st.one_of(
    st.from_regex(wire.JSON_NUMBER, fullmatch=True),
    st.integers().map(str),
    st.integers(min_value=2**63 - 2, max_value=2**64 + 2).map(str),
    st.integers(min_value=-(2**64) - 2, max_value=-(2**63) + 2).map(str),
    st.integers(min_value=10**19, max_value=10**60).map(lambda n: f"-{n}"),
    st.sampled_from(["-0", "-0.0", "0.0", "-0e0", "-0E-0", "1e400", "-1e-400", "1E+8", "0e0"]),
)


def _number(literal: str) -> tuple[str, Norm]:
    return literal, ("number", literal)


def _string(text: str, ascii_only: bool) -> tuple[str, Norm]:
    return json.dumps(text, ensure_ascii=ascii_only), ("string", text)


def _surrogate(code: int) -> tuple[str, Norm]:
    return f'"a\\u{code:04x}b"', ("string", f"a{chr(code)}b")


scalars = st.one_of(
    number_literals.map(_number),
    st.builds(_string, st.text(), st.booleans()),
    st.integers(min_value=0xD800, max_value=0xDFFF).map(_surrogate),  # lone surrogates
    st.sampled_from([("true", ("bool", True)), ("false", ("bool", False)), ("null", ("null",))]),
)


@st.composite
def _array(draw: st.DrawFn, items: st.SearchStrategy[tuple[str, Norm]]) -> tuple[str, Norm]:
    parts = draw(st.lists(items, max_size=5))
    inner = ",".join(draw(WS) + text + draw(WS) for text, _ in parts)
    return f"[{inner or draw(WS)}]", ("list", tuple(want for _, want in parts))


@st.composite
def _object(draw: st.DrawFn, items: st.SearchStrategy[tuple[str, Norm]]) -> tuple[str, Norm]:
    keys = draw(st.lists(st.text(max_size=8), max_size=5, unique=True))
    parts = [(key, draw(items)) for key in keys]
    inner = ",".join(
        f"{draw(WS)}{json.dumps(k, ensure_ascii=draw(st.booleans()))}{draw(WS)}:{draw(WS)}{t}"
        for k, (t, _) in parts
    )
    return "{" + (inner or draw(WS)) + "}", ("object", tuple((k, w) for k, (_, w) in parts))


#: (JSON text, what it decodes to): every JSON value the grammar can write.
json_documents = st.recursive(
    scalars, lambda inner: st.one_of(_array(inner), _object(inner)), max_leaves=25
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=json_documents, pad=st.tuples(WS, WS), as_bytes=st.booleans())
def test_loads_fast_reads_every_json_text_as_loads_does(
    doc: tuple[str, Norm], pad: tuple[str, str], as_bytes: bool
) -> None:
    text, want = doc
    text = pad[0] + text + pad[1]
    data: str | bytes = text.encode("utf-8") if as_bytes else text
    assert outcome(wire.loads, data) == ("ok", want)
    fast = ("ok", want) if _writable(want) else ("refused", "invalid_json")
    assert outcome(wire.loads_fast, data) == fast


def test_float_literals_are_json_numbers_with_their_exact_text() -> None:
    text = '{"a": 0.00000001, "b": [1e3, 1E+8, -0.0, 20659.950, 1e400], "c": "1.5"}'
    for decode in (wire.loads, wire.loads_fast):
        value = decode(text)
        assert value["b"] == ["1e3", "1E+8", "-0.0", "20659.950", "1e400"]
        assert value["a"] == "0.00000001"
        assert all(type(v) is wire.JsonNumber for v in [value["a"], *value["b"]])
        assert type(value["c"]) is str  # a string holding a number stays a string
    assert type(wire.loads_fast('{"n": 7}')["n"]) is int


#: Characters JSON is made of, so random text is often nearly JSON.
JSONISH = st.text(
    alphabet=st.sampled_from(
        [*'[]{}",:-+.eE0123456789 \t\ntrufalsn\\u/', "é", "\x00", "\x1f", "\ufeff", "\U0001f600"]
    ),
    max_size=40,
)


@settings(max_examples=1500, deadline=None)
@given(text=st.one_of(st.text(max_size=60), JSONISH))
def test_loads_fast_agrees_with_loads_on_any_text(text: str) -> None:
    assert_same(text)


@pytest.mark.parametrize("text", ['"\ud800"', '["a\udfffb", 1]', "\ud800", "[\udc00]"])
def test_a_str_holding_a_raw_lone_surrogate(text: str) -> None:
    """Text no UTF-8 decoder makes, but a ``str`` any caller of ``parse_frame`` may
    pass: refused, never a crash (``loads`` reads a string holding it)."""
    assert assert_same(text) == ("refused", "invalid_json")


@settings(max_examples=1500, deadline=None)
@given(raw=st.one_of(st.binary(max_size=60), JSONISH.map(lambda t: t.encode())))
def test_loads_fast_agrees_with_loads_on_any_bytes(raw: bytes) -> None:
    assert_same(raw)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=json_documents, data=st.data())
def test_loads_fast_agrees_with_loads_on_nearly_json(
    doc: tuple[str, Norm], data: st.DataObject
) -> None:
    """Valid JSON with one character cut, doubled or replaced: the edge of the grammar."""
    text = doc[0]
    at = data.draw(st.integers(0, len(text)))
    edit = data.draw(st.sampled_from(["cut", "double", "replace", "insert"]))
    char = data.draw(st.sampled_from([*'[]{},:"\\-+.eE0 \x00\x7f', "NaN", "-0", "\\ud800"]))
    if edit == "cut":
        text = text[:at] + text[at + 1 :]
    elif edit == "double":
        text = text[:at] + text[at : at + 1] * 2 + text[at + 1 :]
    elif edit == "replace":
        text = text[:at] + char + text[at + 1 :]
    else:
        text = text[:at] + char + text[at:]
    assert_same(text)
    assert_same(text.encode("utf-8", "surrogatepass"))


def num(text: str) -> Norm:
    return ("number", text)


def ok(*value: Any) -> Norm:
    return ("ok", value)


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("-0", ("ok", ("number", "-0"))),  # int("-0") would print "0": the fallback
        ("[-0, -0.0, -0e1, 0]", ok("list", (num("-0"), num("-0.0"), num("-0e1"), num("0")))),
        (b'{"q":-0}', ("ok", ("object", (("q", ("number", "-0")),)))),
        ("9" * 5000, ("ok", ("number", "9" * 5000))),
        ("-" + "9" * 5000, ("ok", ("number", "-" + "9" * 5000))),
        ("18446744073709551616", ("ok", ("number", "18446744073709551616"))),  # 2**64
        ("-9223372036854775809", ("ok", ("number", "-9223372036854775809"))),  # -2**63 - 1
        ('"\\ud800"', ("refused", "invalid_json")),  # a lone surrogate escape
        (
            '["\\udc00x", "\\ud83d\\ude00"]',
            ("refused", "invalid_json"),
        ),
        ('{"a": 1, "a": 2}', ("ok", ("object", (("a", ("number", "2")),)))),  # last wins
        (b'"\xff"', ("refused", "invalid_json")),  # invalid UTF-8
        (b'{"s": "\xc3\x28"}', ("refused", "invalid_json")),
        (b'"\xc0\xaf"', ("refused", "invalid_json")),  # overlong
        ("NaN", ("refused", "invalid_json")),
        ('{"p": -Infinity}', ("refused", "invalid_json")),
        ("[1, NaN]", ("refused", "invalid_json")),
        ("[" * 100_000, ("refused", "invalid_json")),
        ("[" * 100_000 + "]" * 100_000, ("refused", "invalid_json")),
        ('{"a":' * 50_000 + "1" + "}" * 50_000, ("refused", "invalid_json")),
        ('"a\tb"', ("refused", "invalid_json")),  # a raw control character in a string
        ("01", ("refused", "invalid_json")),
        ("1.", ("refused", "invalid_json")),
        ("+1", ("refused", "invalid_json")),
        ("", ("refused", "invalid_json")),
        ("\ufeff1", ("refused", "invalid_json")),
    ],
)
def test_regressions(text: str | bytes, want: Norm) -> None:
    assert assert_same(text) == want


@pytest.mark.parametrize("raw", [b'"\xed\xa0\x80"', b'{"symbol": "TRX\xed\xb3\xbfUSDT"}'])
def test_utf8_encoded_surrogates_are_invalid_json(raw: bytes) -> None:
    """Frames arrive as bytes (websockets no longer decodes them): a surrogate code
    point written in UTF-8 (ED A0 80 .. ED BF BF) is not UTF-8, so the frame is a dead
    letter (websockets' strict decoder refused it before), not a symbol no envelope can
    hold."""
    assert assert_same(raw) == ("refused", "invalid_json")


def verdict(decode: Callable[[Any], Any], text: str | bytes) -> Norm:
    """Read or refused (the value of a deep document is not compared: walking it
    would hit the recursion limit itself)."""
    try:
        decode(text)
    except BadMessage as exc:
        return ("refused", exc.reason)
    return ("ok",)


def test_nesting_too_deep_for_either_decoder_is_invalid_json() -> None:
    """Deep nesting is a dead letter, never a crash. ``loads_fast`` may read a few
    levels deeper than ``loads`` (msgspec's limit is its own): what either reads is
    the same value."""
    shapes: dict[str, Callable[[int], str]] = {
        "array": lambda d: "[" * d + "]" * d,
        "object": lambda d: '{"a":' * d + "0" + "}" * d,
    }
    for nested in shapes.values():
        for depth in (10, 200, 100_000):
            fast, slow = outcome(wire.loads_fast, nested(depth)), outcome(wire.loads, nested(depth))
            assert fast[0] in ("ok", "refused") and slow[0] in ("ok", "refused")
            if fast[0] == slow[0] == "ok":
                assert fast == slow
        assert outcome(wire.loads_fast, nested(100_000)) == ("refused", "invalid_json")


# -- Fields readers take loads_fast's ints ---------------------------------------------------

READERS = [
    wire.Fields.uniform("invalid_payload"),
    wire.Fields("bad_field", "bad_row", "bad_field", "bad_decimal", "bad_time"),
]


def read(call: Callable[[], Any]) -> Norm:
    try:
        return ("ok", type(call()).__name__, call())
    except BadMessage as exc:
        return ("refused", exc.reason)


def reads(fields: wire.Fields, value: Any) -> dict[str, Norm]:
    return {
        "decimal": read(lambda: fields.decimal(value, "price")),
        "opt_decimal": read(lambda: fields.opt_decimal(value, "price")),
        "integer": read(lambda: fields.integer(value, "id")),
        "integer(strings=False)": read(lambda: fields.integer(value, "id", strings=False)),
        "unix_ms": read(lambda: fields.unix_ms(value, "ts")),
        "opt_unix_ms": read(lambda: fields.opt_unix_ms(value, "ts")),
        "text": read(lambda: fields.text(value, "symbol")),
        "boolean": read(lambda: fields.boolean(value, "flag")),
    }


integer_literals = st.one_of(
    st.integers().map(str),
    st.integers(min_value=0, max_value=wire.MAX_TIME_MS // 1000 + 2).map(str),
    st.integers(min_value=-(2**64), max_value=2**64).map(str),
    st.sampled_from(["0", "-0", "253402300799", "253402300800", "18446744073709551615"]),
)


@settings(max_examples=500, deadline=None)
@given(literal=integer_literals)
def test_readers_take_an_int_from_loads_fast_as_the_json_number_from_loads(literal: str) -> None:
    slow, fast = wire.loads(f"[{literal}]")[0], wire.loads_fast(f"[{literal}]")[0]
    for fields in READERS:
        assert reads(fields, fast) == reads(fields, slow)
    assert wire.Fields.uniform("invalid_payload").decimal(fast, "p") == literal


def test_readers_examples() -> None:
    fields = READERS[1]
    fast = wire.loads_fast('{"p": 1750953177, "q": 7, "n": -3, "z": -0}')
    assert fields.unix_ms(fast["p"], "ts") == 1750953177000
    assert fields.decimal(fast["q"], "q") == "7" and fields.decimal(fast["z"], "z") == "-0"
    assert fields.integer(fast["q"], "id", strings=False) == 7
    assert read(lambda: fields.integer(fast["n"], "id")) == ("refused", "bad_field")
    assert read(lambda: fields.unix_ms(fast["n"], "ts")) == ("refused", "bad_time")
    assert fields.unix_ms(wire.MAX_TIME_MS // 1000, "ts") == wire.MAX_TIME_MS // 1000 * 1000
    assert read(lambda: fields.unix_ms(wire.MAX_TIME_MS // 1000 + 1, "ts"))[0] == "refused"


@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_never_a_number(value: bool) -> None:
    fields = READERS[1]
    decoded = wire.loads_fast(f'{{"b": {json.dumps(value)}}}')["b"]
    assert decoded is value
    assert read(lambda: fields.decimal(decoded, "p")) == ("refused", "bad_decimal")
    assert read(lambda: fields.opt_decimal(decoded, "p")) == ("refused", "bad_decimal")
    assert read(lambda: fields.integer(decoded, "id")) == ("refused", "bad_field")
    assert read(lambda: fields.integer(decoded, "id", strings=False)) == ("refused", "bad_field")
    assert read(lambda: fields.unix_ms(decoded, "ts")) == ("refused", "bad_time")
    assert read(lambda: fields.opt_unix_ms(decoded, "ts")) == ("refused", "bad_time")
    assert fields.boolean(decoded, "flag") is value


@pytest.mark.parametrize("literal", ["-" + "1234567890" * 5, "1" + "0" * 50])
def test_a_refused_long_integer_is_named_as_written_whichever_decoder_read_it(
    literal: str,
) -> None:
    """The detail is the dead letter's ``error.detail`` header: the number as the
    exchange wrote it, whichever decoder read the frame."""
    fields = READERS[1]
    details = []
    for decode in (wire.loads, wire.loads_fast):
        value = decode(f"[{literal}]")[0]
        with pytest.raises(BadMessage) as info:
            if literal.startswith("-"):
                fields.integer(value, "id")
            else:
                fields.unix_ms(value, "ts")
        details.append(info.value.detail)
    assert details[0].endswith(literal)
    assert details[1] == details[0]


# -- envelopes ---------------------------------------------------------------------------


def reference(
    exchange: str,
    channel: str,
    kind: str,
    symbol: str | None,
    event_time_ms: int | None,
    receive_time_ms: int,
    resync_epoch: int,
    data: Any,
) -> bytes:
    obj = {
        "exchange": exchange,
        "channel": channel,
        "kind": kind,
        "symbol": symbol,
        "event_time_ms": event_time_ms,
        "receive_time_ms": receive_time_ms,
        "resync_epoch": resync_epoch,
        "data": data,
    }
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


#: Values a protocol puts in ``data``: text, decimals as JsonNumber or str, ints of any
#: size, booleans, null, nested (never a float).
data_values = st.recursive(
    st.one_of(
        st.text(),
        st.from_regex(wire.JSON_NUMBER, fullmatch=True).map(wire.JsonNumber),
        st.integers(),
        st.booleans(),
        st.none(),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
data_objects = st.dictionaries(st.text(max_size=12), data_values, max_size=6)
times = st.one_of(st.none(), st.integers(min_value=0, max_value=wire.MAX_TIME_MS), st.integers())
#: Everything but lone surrogates (they cannot be UTF-8); controls, quotes, U+2028, astral.
texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    exchange=texts,
    heads=st.lists(st.tuples(texts, st.sampled_from(["event", "resync"])), min_size=1, max_size=3),
    rows=st.lists(
        st.tuples(st.one_of(st.none(), texts), times, st.integers(), st.integers(), data_objects),
        min_size=1,
        max_size=6,
    ),
    pick=st.randoms(use_true_random=False),
)
def test_envelopes_are_byte_identical_to_json_dumps(
    exchange: str,
    heads: list[tuple[str, str]],
    rows: list[tuple[str | None, int | None, int, int, dict[str, Any]]],
    pick: random.Random,
) -> None:
    envelopes = records.Envelopes(exchange)
    for symbol, event_time, receive_time, epoch, data in rows * 2:  # cached parts reused
        channel, kind = pick.choice(heads)
        want = reference(exchange, channel, kind, symbol, event_time, receive_time, epoch, data)
        got = envelopes.encode(channel, kind, symbol, event_time, receive_time, epoch, data)
        assert got == want
        assert (
            records.envelope(
                exchange=exchange,
                channel=channel,
                kind=kind,
                symbol=symbol,
                event_time_ms=event_time,
                receive_time_ms=receive_time,
                resync_epoch=epoch,
                data=data,
            )
            == want
        )


def test_decimals_are_written_as_strings_of_their_exact_text() -> None:
    data = {"price": wire.JsonNumber("0.00000001"), "qty": wire.JsonNumber("1E+8"), "id": 7}
    value = records.Envelopes("cryptomus").encode("trade", "event", "BTC_USDT", None, 5, 6, data)
    assert value.endswith(b'"data":{"price":"0.00000001","qty":"1E+8","id":7}}')
    decoded = json.loads(value)
    assert decoded["data"] == {"price": "0.00000001", "qty": "1E+8", "id": 7}
    assert decoded["event_time_ms"] is None and decoded["symbol"] == "BTC_USDT"


def test_the_symbol_cache_stays_bounded_and_right() -> None:
    envelopes = records.Envelopes("ex")
    limit = records.Envelopes.MAX_SYMBOLS
    symbols = [f'S\u00e9{i}\u2028"{i % 7}' for i in range(2 * limit + 123)]
    rng = random.Random(14)
    for i, symbol in enumerate(symbols):
        for sym in (symbol, symbols[rng.randrange(i + 1)], None):
            got = envelopes.encode("trade", "event", sym, i, i + 1, 2, {"i": i})
            assert got == reference("ex", "trade", "event", sym, i, i + 1, 2, {"i": i})
        assert len(envelopes._symbols) <= limit


# -- FastHistogram is Histogram ----------------------------------------------------------


def exposed(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """Every sample, in order, ``_created`` left out: a ``Histogram`` stamps its
    creation time there, and ``FastHistogram`` does not expose that series."""
    return [
        (s.name, dict(s.labels), s.value)
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    ]


def text_of(registry: CollectorRegistry) -> list[str]:
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


def both_histograms(
    buckets: Sequence[float], observations: Sequence[tuple[str, float]]
) -> tuple[CollectorRegistry, CollectorRegistry]:
    ref, fast = CollectorRegistry(), CollectorRegistry()
    slow = Histogram("lat_seconds", "Doc.", ["connector", "channel"], buckets=buckets, registry=ref)
    quick = FastHistogram("lat_seconds", "Doc.", ["connector", "channel"], buckets, fast)
    for label, value in observations:
        slow.labels("c", label).observe(value)
        quick.labels("c", label).observe(value)
    return ref, fast


#: Non-negative bounds, as every histogram here has (a ``Histogram`` whose first bound is
#: negative leaves ``_sum`` out, as OpenMetrics says; ``FastHistogram`` does not).
bucket_lists = st.lists(
    st.floats(min_value=0, max_value=1e6), min_size=1, max_size=12, unique=True
).map(sorted)


@settings(max_examples=400, deadline=None)
@given(buckets=bucket_lists, data=st.data())
def test_fast_histogram_exposes_what_a_histogram_exposes(
    buckets: list[float], data: st.DataObject
) -> None:
    values = st.one_of(
        st.sampled_from(buckets),  # on a bound: le is inclusive
        st.floats(min_value=-2e6, max_value=2e6, allow_nan=False),
        st.sampled_from([0.0, -0.0]),
    )
    observations = data.draw(st.lists(st.tuples(st.sampled_from(["a", "b", 'é\n"']), values)))
    ref, fast = both_histograms(buckets, observations)
    assert exposed(fast) == exposed(ref)
    assert text_of(fast) == text_of(ref)


@pytest.mark.parametrize("buckets", [LATENCY_BUCKETS, LAG_BUCKETS])
def test_fast_histogram_with_the_connector_buckets(buckets: tuple[float, ...]) -> None:
    observations = [("trade", float(b)) for b in buckets]  # each exactly on a bound
    observations += [("trade", 0.0), ("trade", 1e9), ("book", buckets[3] * 1.0000001)]
    ref, fast = both_histograms(buckets, observations)
    assert exposed(fast) == exposed(ref)
    assert text_of(fast) == text_of(ref)
    get = fast.get_sample_value
    first = {"connector": "c", "channel": "trade", "le": str(float(buckets[0]))}
    assert get("lat_seconds_bucket", first) == 2  # 0.0 and the first bound itself
    assert get("lat_seconds_count", {"connector": "c", "channel": "trade"}) == len(buckets) + 2
    assert get("lat_seconds_bucket", {"connector": "c", "channel": "book", "le": "+Inf"}) == 1


# -- Delivery's slices -------------------------------------------------------------------


class Clock:
    """Injected time: moves only when a test moves it. Steps are powers of two so
    ages come out exact."""

    def __init__(self, now: float = 4096.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Sent:
    topic: str
    value: bytes | None
    key: bytes | None
    report: DeliveryReport


class RecordingProducer:
    """The producer interface, keeping each record's report for the test to settle."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []
        self.refuse: Exception | None = None

    def send(
        self,
        topic: str,
        *,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
        partition: int | None = None,
    ) -> SendFuture:
        raise AssertionError("the hot path uses send_reported")

    def send_reported(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes]] | None,
        timestamp_ms: int | None,
        partition: int | None,
        report: DeliveryReport,
    ) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.sent.append(Sent(topic, value, key, report))

    def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


CONNECTOR = "hot"


def make(
    clock: Clock | None = None, max_buffered: int = 1_000_000, stall_after_s: float = 30.0
) -> tuple[Delivery, RecordingProducer, Metrics, Clock]:
    clock = clock or Clock()
    producer, metrics = RecordingProducer(), Metrics()
    delivery = Delivery(producer, metrics, CONNECTOR, max_buffered, stall_after_s, clock=clock)
    return delivery, producer, metrics, clock


def send(delivery: Delivery, channel: str, n: int = 1, clock: Clock | None = None) -> None:
    for i in range(n):
        delivery.send_parts(f"t.{channel}", b"v%d" % i, b"k", [], None, channel)
        if clock is not None:
            clock.now += 2**-9  # about 2 ms: a new slice per record


def metric(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"connector": CONNECTOR, **labels})


def produced(metrics: Metrics, channel: str, outcome: str = "produced") -> float:
    value = metric(metrics, "connector_records_total", channel=channel, outcome=outcome)
    return value or 0.0


def test_buffered_counts_what_is_neither_acked_nor_failed_in_any_order() -> None:
    delivery, producer, metrics, clock = make()
    send(delivery, "trade", 5, clock)
    send(delivery, "book", 3)  # three in one slice
    assert delivery.buffered == 8 and not delivery.drained()
    assert metric(metrics, "connector_buffered_records") == 8
    reports = [s.report for s in producer.sent]
    for i in (7, 2, 4, 0, 5):  # out of order, across channels and slices
        reports[i].ack(None)
    assert delivery.buffered == 3 and delivery.acked_records == 5
    assert metric(metrics, "connector_buffered_records") == 3
    assert produced(metrics, "trade") == 3 and produced(metrics, "book") == 2
    assert metric(metrics, "connector_produce_latency_seconds_count") == 5
    for i in (6, 1, 3):
        reports[i].ack(None)
    assert delivery.drained() and delivery.buffered == 0
    assert metric(metrics, "connector_buffered_records") == 0
    assert produced(metrics, "trade") == 5 and produced(metrics, "book") == 3
    assert metric(metrics, "connector_produce_latency_seconds_count") == 8
    assert delivery.failure is None and delivery.healthy()


def test_produced_counts_are_cumulative_across_scrapes_and_latency_is_measured() -> None:
    delivery, producer, metrics, clock = make()
    send(delivery, "trade", 4)  # one slice, sent at clock.now
    sent_at = clock.now
    clock.now = sent_at + 2**-8  # 3.9 ms later
    producer.sent[0].report.ack(None)
    assert produced(metrics, "trade") == 1
    assert produced(metrics, "trade") == 1  # a second scrape adds nothing
    producer.sent[1].report.ack(None)
    producer.sent[2].report.ack(None)
    assert produced(metrics, "trade") == 3
    bucket = "connector_produce_latency_seconds_bucket"
    assert metric(metrics, bucket, le="0.0025") == 0
    assert metric(metrics, bucket, le="0.005") == 3
    assert metric(metrics, "connector_produce_latency_seconds_sum") == pytest.approx(3 * 2**-8)
    assert delivery.last_ack == sent_at + 2**-8
    producer.sent[3].report.ack(None)
    assert produced(metrics, "trade") == 4 and produced(metrics, "book") == 0


def test_oldest_unacked_age_follows_the_oldest_waiting_record() -> None:
    delivery, producer, _, clock = make(stall_after_s=5.0)
    start = clock.now
    assert delivery.oldest_unacked_age() == 0.0
    send(delivery, "trade")  # 0: at start
    clock.now = start + 0.5
    send(delivery, "book")  # 1: at start + 0.5
    clock.now = start + 1.0
    send(delivery, "trade")  # 2: at start + 1
    reports = [s.report for s in producer.sent]
    clock.now = start + 2.0
    reports[1].ack(None)  # a newer one acked first, on the other channel
    assert delivery.oldest_unacked_age() == 2.0  # record 0's age, not record 2's
    reports[2].ack(None)
    assert delivery.oldest_unacked_age() == 2.0
    clock.now = start + 6.0
    assert delivery.oldest_unacked_age() == 6.0 and delivery.must_pause()
    assert not delivery.healthy()
    reports[0].ack(None)
    assert delivery.oldest_unacked_age() == 0.0 and not delivery.must_pause()
    send(delivery, "book")  # 3: at start + 6
    clock.now = start + 7.0
    send(delivery, "trade")  # 4: at start + 7
    clock.now = start + 7.5
    producer.sent[4].report.ack(None)
    assert delivery.oldest_unacked_age() == 1.5  # book's record, the other channel
    producer.sent[3].report.ack(None)
    assert delivery.oldest_unacked_age() == 0.0 and delivery.drained()


def test_the_age_is_right_to_the_millisecond_within_a_slice() -> None:
    delivery, producer, _, clock = make()
    start = clock.now
    send(delivery, "trade")
    clock.now = start + 2**-11  # 0.49 ms: the same slice
    send(delivery, "trade")
    producer.sent[0].report.ack(None)
    clock.now = start + 3.0
    age = delivery.oldest_unacked_age()
    assert 3.0 - 2**-11 <= age <= 3.0 and age - (3.0 - 2**-11) <= SLICE_S
    producer.sent[1].report.ack(None)
    assert delivery.oldest_unacked_age() == 0.0


def test_must_pause_when_the_buffer_is_full() -> None:
    delivery, producer, _, _ = make(max_buffered=3)
    send(delivery, "trade", 2)
    assert not delivery.must_pause()
    send(delivery, "trade")
    assert delivery.must_pause()
    producer.sent[1].report.ack(None)
    assert not delivery.must_pause()


def test_settled_slices_of_one_channel_are_forgotten() -> None:
    delivery, producer, _, clock = make()
    for _ in range(20_000):
        send(delivery, "trade", 1, clock)
        producer.sent.pop().report.ack(None)
    assert delivery.acked_records == 20_000 and delivery.drained()
    assert len(delivery._slices) <= 2


def test_settled_slices_are_forgotten_when_two_channels_alternate() -> None:
    delivery, producer, _, clock = make()
    for i in range(20_000):
        send(delivery, "trade" if i % 2 else "book", 1, clock)
        producer.sent.pop().report.ack(None)
    assert delivery.oldest_unacked_age() == 0.0
    assert len(delivery._slices) <= 4


def test_settled_slices_are_forgotten_after_a_channel_goes_quiet() -> None:
    """One dead letter (or one update on a rare channel), then hours of trades: the
    record was acknowledged, so nothing may be kept for it, and nothing may pile up
    behind it (memory, and the time ``oldest_unacked_age`` takes on every loop turn)."""
    delivery, producer, _, clock = make()
    send(delivery, "dead_letter", 1, clock)
    producer.sent.pop().report.ack(None)
    for _ in range(20_000):  # 40 s of a busy channel, a new slice every ~2 ms
        send(delivery, "trade", 1, clock)
        producer.sent.pop().report.ack(None)
    assert delivery.drained() and delivery.oldest_unacked_age() == 0.0
    assert len(delivery._slices) <= 4, f"{len(delivery._slices)} settled slices kept"


def test_acks_from_another_thread_while_sending() -> None:
    delivery, producer, metrics, clock = make()
    reports: queue.Queue[DeliveryReport | None] = queue.Queue()
    rng = random.Random(7)

    def acker() -> None:
        held: list[DeliveryReport] = []
        while True:
            report = reports.get()
            if report is None:
                break
            held.append(report)
            if len(held) >= 16:  # settle a batch out of order
                rng.shuffle(held)
                for r in held:
                    r.ack(None)
                held.clear()
        for r in held:
            r.ack(None)

    thread = threading.Thread(target=acker)
    thread.start()
    n = 20_000
    for i in range(n):
        send(delivery, ("trade", "book")[i % 3 == 0], 1, clock if i % 5 == 0 else None)
        reports.put(producer.sent.pop().report)
    reports.put(None)
    thread.join(T(30))
    assert not thread.is_alive()
    assert delivery.acked_records == n and delivery.drained()
    assert delivery.oldest_unacked_age() == 0.0
    assert produced(metrics, "book") == len(range(0, n, 3))
    assert produced(metrics, "trade") == n - len(range(0, n, 3))
    assert metric(metrics, "connector_produce_latency_seconds_count") == n
    assert metric(metrics, "connector_buffered_records") == 0


def test_a_failure_is_counted_kept_and_stops_the_next_send() -> None:
    delivery, producer, metrics, _ = make()
    send(delivery, "trade", 3)
    send(delivery, "book", 1)
    error = RuntimeError("broker said no")
    failer = threading.Thread(target=producer.sent[1].report.fail, args=(error,))
    failer.start()
    failer.join()
    assert delivery.failure is error and delivery.failed_records == 1
    assert delivery.buffered == 3 and not delivery.healthy()
    assert produced(metrics, "trade", "failed") == 1 and produced(metrics, "book", "failed") == 0
    with pytest.raises(FatalError, match="broker said no"):
        send(delivery, "book")
    assert len(producer.sent) == 4  # the record after the failure never reached Kafka
    assert delivery.buffered == 3
    producer.sent[0].report.ack(None)
    producer.sent[2].report.ack(None)
    producer.sent[3].report.ack(None)
    assert delivery.drained()
    assert not delivery.flush(1.0), "a failed record is never reported as delivered"
    assert produced(metrics, "trade") == 2 and produced(metrics, "book") == 1
    assert delivery.failure is error and delivery.failed_records == 1


def test_a_record_the_producer_refuses_is_failed_not_buffered() -> None:
    delivery, producer, metrics, _ = make()
    send(delivery, "trade", 2)
    producer.refuse = ValueError("queue full")
    with pytest.raises(FatalError, match="queue full"):
        send(delivery, "trade")
    assert delivery.failed_records == 1 and delivery.buffered == 2
    assert produced(metrics, "trade", "failed") == 1
    for s in producer.sent:
        s.report.ack(None)
    assert delivery.drained() and delivery.oldest_unacked_age() == 0.0
    producer.refuse = None
    with pytest.raises(FatalError):
        send(delivery, "trade")


def test_json_number_envelopes_round_trip_through_loads_fast() -> None:
    """The two halves together: a frame read by loads_fast, written as an envelope."""
    frame = wire.loads_fast(b'{"p": 107100.01, "q": "0.000254", "id": 18446744073709551616}')
    fields = READERS[1]
    data = {
        "price": fields.decimal(frame["p"], "p"),
        "quantity": fields.decimal(frame["q"], "q"),
        "id": fields.integer(frame["id"], "id"),
    }
    value = records.envelope(
        exchange="x",
        channel="trade",
        kind="event",
        symbol="BTC_USDT",
        event_time_ms=None,
        receive_time_ms=1,
        resync_epoch=0,
        data=data,
    )
    assert json.loads(value)["data"] == {
        "price": "107100.01",
        "quantity": "0.000254",
        "id": 18446744073709551616,
    }
