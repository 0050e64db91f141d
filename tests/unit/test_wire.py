"""The one wire layer (connectors/runtime/wire.py): exact JSON, decimal grammars, field
readers, schema ids, and the one dead-letter reason vocabulary. Pure: no broker."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from connectors.cryptomus import protocol as cryptomus
from connectors.robicoin import protocol as robicoin
from connectors.runtime import records, wire
from connectors.runtime.errors import DEAD_LETTER_REASONS, BadMessage

ROOT = Path(__file__).resolve().parents[2]


def reason_of(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(BadMessage) as info:
        call(*args, **kwargs)
    return info.value.reason


# -- decoding ------------------------------------------------------------------------------


def test_numbers_keep_their_text() -> None:
    value = wire.loads('{"a": 0.00000001, "b": 1e3, "c": [20659.950, -0]}')
    assert value == {"a": "0.00000001", "b": "1e3", "c": ["20659.950", "-0"]}
    assert all(isinstance(v, wire.JsonNumber) for v in (value["a"], value["b"], *value["c"]))
    assert not isinstance(wire.loads('"1.5"'), wire.JsonNumber)
    assert wire.loads(b'{"x": 1}') == {"x": "1"}


@pytest.mark.parametrize(
    "text",
    ["not json", "NaN", '{"p": Infinity}', "", b"\xff\xfe\x00", "[" * 100_000, '{"a":1,}'],
)
def test_anything_but_json_is_invalid_json(text: str | bytes) -> None:
    assert reason_of(wire.loads, text) == "invalid_json"


def test_strict_refuses_what_two_parsers_could_read_differently() -> None:
    assert wire.loads('{"a": 1, "a": 2}') == {"a": "2"}  # lenient: the last one wins
    for text in ('{"a": 1, "a": 2}', '["\\ud800"]', "[" * 18 + "]" * 18):
        assert reason_of(wire.loads, text, strict=True) == "invalid_json"
    assert wire.loads("[" * 17 + "]" * 17, strict=True) is not None  # depth 16 below the top


# -- grammars ------------------------------------------------------------------------------

JSON_DECIMALS = ["0", "-0", "7", "20950.00", "142.95000000000001", "1e-7", "1E+8", "-0.5"]
NOT_JSON_DECIMALS = [
    "",
    "+1",
    ".5",
    "+.5",
    "1.",
    "01",
    "1e",
    "--1",
    " 1",
    "1 ",
    "\u0661\u0662",
    "0x1",
]


@pytest.mark.parametrize("text", JSON_DECIMALS)
def test_exchange_decimals_follow_the_json_number_grammar(text: str) -> None:
    assert wire.is_json_decimal(text)
    assert wire.is_json_decimal(wire.JsonNumber(text))


@pytest.mark.parametrize("text", [*NOT_JSON_DECIMALS, "1.5\n", None, 1.5, 2])
def test_anything_else_is_not_an_exchange_decimal(text: Any) -> None:
    assert not wire.is_json_decimal(text)


@pytest.mark.parametrize("text", NOT_JSON_DECIMALS)
def test_both_exchanges_refuse_the_same_decimals(text: str) -> None:
    """One rule for exchange data: Cryptomus no longer takes ``+.5``, ``1.`` or ``01``."""
    assert reason_of(cryptomus.dec, text, "price") == "invalid_payload"
    assert reason_of(robicoin.decimal_text, text, "price") == "bad_decimal"


def test_plain_decimals_have_no_exponent_and_no_leading_zero() -> None:
    for text in ("0", "12", "-1.50", "0.00000001"):
        assert wire.is_plain_decimal(text)
    for text in ("1e3", "01", "+1", ".5", "1.", "", "\u0661"):
        assert not wire.is_plain_decimal(text)
    assert not wire.is_plain_decimal(wire.JsonNumber("1.5"))  # a number is not text


def test_short_bounds_what_it_shows() -> None:
    assert wire.short("abc") == "abc"
    assert wire.short(17) == "17"
    assert len(wire.short("x" * 1000)) == 80
    assert len(wire.short(list(range(100_000)))) <= 80


# -- field readers -------------------------------------------------------------------------

CRYPTOMUS = wire.Fields.uniform("invalid_payload")
ROBICOIN = robicoin.FIELDS


def test_each_exchange_keeps_its_reasons() -> None:
    cases: list[tuple[str, Any, tuple[Any, ...]]] = [
        ("decimal", "abc", ()),
        ("text", "", ()),
        ("one_of", "up", (("buy", "sell"),)),
        ("integer", "-1", ()),
        ("boolean", "yes", ()),
        ("unix_ms", "-5", ()),
        ("local_time_ms", "2018-02-30 10:00:00", (ZoneInfo("UTC"),)),
    ]
    robicoin_reasons = {}
    for method, value, extra in cases:
        args = (value, *extra, "f") if method == "local_time_ms" else (value, "f", *extra)
        assert reason_of(getattr(CRYPTOMUS, method), *args) == "invalid_payload"
        robicoin_reasons[method] = reason_of(getattr(ROBICOIN, method), *args)
    assert robicoin_reasons == {
        "decimal": "bad_decimal",
        "text": "bad_field",
        "one_of": "bad_field",
        "integer": "bad_field",
        "boolean": "bad_field",
        "unix_ms": "bad_time",
        "local_time_ms": "bad_time",
    }
    assert reason_of(ROBICOIN.row, [], "order row") == "bad_row"
    assert reason_of(CRYPTOMUS.need, {}, "symbol") == "invalid_payload"
    assert reason_of(CRYPTOMUS.need, [], "symbol") == "invalid_payload"


def test_readers_return_exact_values() -> None:
    assert CRYPTOMUS.decimal(wire.JsonNumber("107100.01"), "p") == "107100.01"
    assert type(CRYPTOMUS.decimal(wire.JsonNumber("1"), "p")) is str
    assert CRYPTOMUS.opt_decimal(None, "p") is None
    assert CRYPTOMUS.unix_ms(wire.JsonNumber("1750953177.5"), "t") == 1750953177500
    assert CRYPTOMUS.unix_ms("1750953177", "t") == 1750953177000
    assert CRYPTOMUS.integer("3", "i") == 3 and CRYPTOMUS.integer(wire.JsonNumber("0"), "i") == 0
    assert ROBICOIN.local_time_ms("2018-02-19 21:11:44", ZoneInfo("Europe/Istanbul"), "t") == (
        1519063904000
    )


def test_a_text_must_be_a_json_string() -> None:
    assert reason_of(CRYPTOMUS.text, wire.JsonNumber("5"), "t") == "invalid_payload"
    assert reason_of(ROBICOIN.integer, "18", "data_id", strings=False) == "bad_field"
    assert ROBICOIN.integer(wire.JsonNumber("18"), "data_id", strings=False) == 18


@pytest.mark.parametrize("value", ["1e999999999999999999", "1e5000", "253402300800"])
def test_a_time_beyond_year_9999_is_refused_not_a_crash(value: str) -> None:
    assert reason_of(CRYPTOMUS.unix_ms, wire.JsonNumber(value), "t") == "invalid_payload"


def test_a_reader_with_an_unknown_reason_is_refused() -> None:
    with pytest.raises(ValueError, match="not a dead-letter reason"):
        wire.Fields.uniform("oops")


# -- one record type, one schema id --------------------------------------------------------


def test_one_record_type() -> None:
    assert cryptomus.Event is records.Event is robicoin.Row


def test_schema_ids_come_from_one_place() -> None:
    assert wire.schema_id("cryptomus", "trade") == "cryptomus.trade/v1"
    assert wire.schema_id("robicoin", "open-order", "v2") == "robicoin.open-order/v2"


# -- the dead-letter reason vocabulary -----------------------------------------------------


def test_bad_message_refuses_a_reason_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="DEAD_LETTER_REASONS"):
        BadMessage("something_new", "detail")
    assert BadMessage("invalid_json", "x").reason == "invalid_json"


def reasons_in_source() -> set[str]:
    """Every string literal given as a reason in connectors/: ``BadMessage("r", ...)``
    and the arguments of ``Fields(...)`` / ``Fields.uniform(...)``."""
    found: set[str] = set()
    for path in (ROOT / "connectors").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "BadMessage" and node.args:
                args = node.args[:1]
            elif name in ("Fields", "uniform"):
                args = [*node.args, *(k.value for k in node.keywords)]
            else:
                continue
            found |= {
                a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)
            }
    return found


def test_every_reason_the_code_gives_is_in_the_vocabulary_and_used() -> None:
    used = reasons_in_source()
    assert used <= set(DEAD_LETTER_REASONS), sorted(used - set(DEAD_LETTER_REASONS))
    unused = set(DEAD_LETTER_REASONS) - used
    assert not unused, f"reasons no code gives any more: {sorted(unused)}"


def test_the_readme_lists_exactly_the_vocabulary() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(
        r"<!-- dead-letter-reasons:[^>]*-->\n(.*?)<!-- /dead-letter-reasons -->", readme, re.S
    )
    assert block, "README has no dead-letter reasons table"
    rows = re.findall(r"^\| `([a-z_0-9]+)` \| (.+) \|$", block.group(1), re.M)
    assert rows == list(DEAD_LETTER_REASONS.items())
