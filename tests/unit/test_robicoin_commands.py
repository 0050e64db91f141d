"""Pure order commands: parsing, signatures, exchange fields, reconciliation, results."""

from __future__ import annotations

import copy
import json
from datetime import datetime
from decimal import Decimal, localcontext
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from connectors.robicoin import protocol
from connectors.robicoin.commands import (
    BAD_MESSAGE_REASONS,
    REJECT_REASONS,
    CreateOrder,
    DeleteOrder,
    OpenState,
    Outcome,
    Placement,
    Policy,
    Rejected,
    canonical_bytes,
    create_fields,
    delete_fields,
    expired,
    find_open,
    find_placed,
    notional,
    parse_command,
    result,
    sign,
)
from connectors.robicoin.schemas import load_schema
from connectors.runtime.errors import BadMessage, ConfigError
from connectors.runtime.wire import JsonNumber

IST = ZoneInfo("Europe/Istanbul")
NOW = 1750953177042
PAIRS = frozenset({"btc-try", "eth-try"})
POLICY = Policy(pairs=PAIRS)
SECRET = b"s3cret-k3y-\x00\xff-shared"
SIGNED = Policy(pairs=PAIRS, hmac_secret=SECRET, require_signature=True)
OPTIONAL_SIG = Policy(pairs=PAIRS, hmac_secret=SECRET)
SOURCE = {"topic": "robicoin.order-commands", "partition": 2, "offset": 41}

COMMAND_SCHEMA = Draft202012Validator(load_schema("order-command"))
RESULT_SCHEMA = Draft202012Validator(load_schema("order-result"))


def create(**changes: Any) -> dict[str, Any]:
    """A valid create command; a change to ``...`` removes the field."""
    cmd: dict[str, Any] = {
        "command_id": "c-1",
        "action": "create",
        "pair": "btc-try",
        "side": "buy",
        "amount": "1500.00",
        "price": "2150000.5",
        "created_at": NOW - 1000,
    }
    cmd.update(changes)
    return {k: v for k, v in cmd.items() if v is not ...}


def delete(**changes: Any) -> dict[str, Any]:
    cmd: dict[str, Any] = {
        "command_id": "d-1",
        "action": "delete",
        "pair": "eth-try",
        "data_id": 18,
        "created_at": NOW - 1000,
    }
    cmd.update(changes)
    return {k: v for k, v in cmd.items() if v is not ...}


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode("utf-8")


def rejected(raw: bytes | dict[str, Any], policy: Policy = POLICY) -> Rejected:
    with pytest.raises(Rejected) as info:
        parse_command(raw if isinstance(raw, bytes) else encode(raw), policy)
    assert info.value.reason in REJECT_REASONS
    return info.value


def bad_message(raw: bytes | None, policy: Policy = POLICY) -> BadMessage:
    with pytest.raises(BadMessage) as info:
        parse_command(raw, policy)
    assert info.value.reason in BAD_MESSAGE_REASONS
    return info.value


def exact(raw: bytes) -> Any:
    """Decode the way a schema validator should see exact JSON: 1.0 is not an integer."""
    return json.loads(raw, parse_float=Decimal)


def schema_errors(obj: Any) -> list[str]:
    return [e.message for e in COMMAND_SCHEMA.iter_errors(exact(encode(obj)))]


# -- valid commands ------------------------------------------------------------------------


def test_a_create_command_parses_with_defaults() -> None:
    cmd = parse_command(encode(create()), POLICY)
    assert cmd == CreateOrder(
        command_id="c-1",
        pair="btc-try",
        side="buy",
        amount="1500.00",
        price="2150000.5",
        use_rbc=False,
        stop_limit="0",
        created_at_ms=NOW - 1000,
        expires_at_ms=None,
    )
    assert schema_errors(create()) == []


def test_a_create_command_with_every_option() -> None:
    raw = create(
        command_id="A.b_c:d-9",
        side="sell",
        amount="0.00000001",
        price="99999999999999999999.12345678",
        use_rbc=True,
        stop_limit="2100000.25",
        expires_at=NOW + 60_000,
    )
    cmd = parse_command(encode(raw), POLICY)
    assert isinstance(cmd, CreateOrder)
    assert (cmd.side, cmd.amount, cmd.price, cmd.use_rbc, cmd.stop_limit) == (
        "sell",
        "0.00000001",
        "99999999999999999999.12345678",
        True,
        "2100000.25",
    )
    assert cmd.expires_at_ms == NOW + 60_000
    assert schema_errors(raw) == []


@pytest.mark.parametrize("data_id", [18, "18", 999_999_999_999_999_999])
def test_a_delete_command_parses(data_id: Any) -> None:
    cmd = parse_command(encode(delete(data_id=data_id)), POLICY)
    assert cmd == DeleteOrder("d-1", "eth-try", int(data_id), NOW - 1000, None)
    assert schema_errors(delete(data_id=data_id)) == []


def test_whitespace_and_key_order_do_not_matter() -> None:
    text = f'\n {{ "created_at" : {NOW} ,\t"price":"1","amount":"2","side":"sell",'
    text += '"pair":"btc-try","action":"create","command_id":"x"}\r\n'
    cmd = parse_command(text.encode(), POLICY)
    assert isinstance(cmd, CreateOrder) and cmd.amount == "2"


def test_decimal_text_is_kept_exactly() -> None:
    cmd = parse_command(encode(create(amount="10.10000000", price="0.1")), POLICY)
    assert isinstance(cmd, CreateOrder)
    assert (cmd.amount, cmd.price) == ("10.10000000", "0.1")


# -- rejections ----------------------------------------------------------------------------

LONG = "1" + "0" * 20  # 21 integer digits
REJECTIONS: list[tuple[str, dict[str, Any]]] = [
    ("bad_action", create(action="update")),
    ("bad_action", create(action="CREATE")),
    ("bad_action", create(action=1)),
    ("bad_action", create(action=None)),
    ("missing_field", create(action=...)),
    ("missing_field", create(amount=...)),
    ("missing_field", create(side=..., price=...)),
    ("missing_field", create(created_at=...)),
    ("missing_field", delete(data_id=...)),
    ("missing_field", delete(pair=...)),
    ("unknown_field", create(extra=1)),
    ("unknown_field", create(data_id=18)),
    ("unknown_field", create(Amount="1")),
    ("unknown_field", delete(side="buy")),
    ("unknown_field", delete(amount="1")),
    ("bad_pair", create(pair="BTC-TRY")),
    ("bad_pair", create(pair="btctry")),
    ("bad_pair", create(pair="btc-try ")),
    ("bad_pair", create(pair="btc-try\n")),
    ("bad_pair", create(pair=5)),
    ("bad_pair", create(pair=None)),
    ("bad_pair", delete(pair=["btc-try"])),
    ("pair_not_allowed", create(pair="xrp-try")),
    ("pair_not_allowed", delete(pair="ltc-try")),
    ("bad_side", create(side="BUY")),
    ("bad_side", create(side="long")),
    ("bad_side", create(side=True)),
    ("bad_side", create(side=None)),
    ("number_not_string", create(amount=1.5)),
    ("number_not_string", create(amount=1500)),
    ("number_not_string", create(price=2150000.5)),
    ("number_not_string", create(stop_limit=0)),
    ("bad_decimal", create(amount="1e5")),
    ("bad_decimal", create(amount="1E-5")),
    ("bad_decimal", create(amount="1.")),
    ("bad_decimal", create(amount=".5")),
    ("bad_decimal", create(amount="01")),
    ("bad_decimal", create(amount="00.5")),
    ("bad_decimal", create(amount=" 1")),
    ("bad_decimal", create(amount="1 ")),
    ("bad_decimal", create(amount="1\n")),
    ("bad_decimal", create(amount="1,5")),
    ("bad_decimal", create(amount="1_000")),
    ("bad_decimal", create(amount="+1")),
    ("bad_decimal", create(amount="")),
    ("bad_decimal", create(amount="NaN")),
    ("bad_decimal", create(amount="Infinity")),
    ("bad_decimal", create(amount="0x10")),
    ("bad_decimal", create(amount="\u0661\u0662")),  # Arabic-Indic digits
    ("bad_decimal", create(amount="\uff11")),  # fullwidth 1
    ("bad_decimal", create(amount=True)),
    ("bad_decimal", create(amount=None)),
    ("bad_decimal", create(price={"value": "1"})),
    ("bad_decimal", create(stop_limit="")),
    ("bad_decimal", create(stop_limit=None)),
    ("not_positive", create(amount="0")),
    ("not_positive", create(amount="0.00000000")),
    ("not_positive", create(amount="-1")),
    ("not_positive", create(price="-0")),
    ("not_positive", create(price="0.0")),
    ("negative", create(stop_limit="-1")),
    ("negative", create(stop_limit="-0.5")),
    ("too_many_decimals", create(amount="0.123456789")),
    ("too_many_decimals", create(amount="1.000000000")),
    ("too_many_decimals", create(stop_limit="1.123456789")),
    ("too_large", create(amount=LONG)),
    ("too_large", create(price=LONG + ".5")),
    ("too_large", create(stop_limit=LONG)),
    ("bad_data_id", delete(data_id=0)),
    ("bad_data_id", delete(data_id=-1)),
    ("bad_data_id", delete(data_id=1.5)),
    ("bad_data_id", delete(data_id=18.0)),
    ("bad_data_id", delete(data_id="018")),
    ("bad_data_id", delete(data_id="0")),
    ("bad_data_id", delete(data_id="1e3")),
    ("bad_data_id", delete(data_id="18 ")),
    ("bad_data_id", delete(data_id="\u0661\u0668")),
    ("bad_data_id", delete(data_id="abc")),
    ("bad_data_id", delete(data_id="")),
    ("bad_data_id", delete(data_id=True)),
    ("bad_data_id", delete(data_id=None)),
    ("bad_data_id", delete(data_id=10**18)),
    ("bad_time", create(created_at=str(NOW))),
    ("bad_time", create(created_at=1.75e12)),
    ("bad_time", create(created_at=float(NOW))),
    ("bad_time", create(created_at=-1)),
    ("bad_time", create(created_at=None)),
    ("bad_time", create(created_at=True)),
    ("bad_time", create(created_at=253_402_300_800_000)),
    ("bad_time", create(expires_at=None)),
    ("bad_time", create(expires_at="soon")),
    ("bad_time", delete(expires_at=NOW - 1000)),
    ("bad_time", delete(expires_at=NOW - 2000)),
    ("bad_flag", create(use_rbc=1)),
    ("bad_flag", create(use_rbc="true")),
    ("bad_flag", create(use_rbc="1")),
    ("bad_flag", create(use_rbc=None)),
]
#: Rejections that need the sink's configuration: the schema cannot see them.
CONFIG_ONLY = {"pair_not_allowed"}


@pytest.mark.parametrize(("reason", "command"), REJECTIONS)
def test_invalid_commands_are_rejected_with_a_precise_reason(
    reason: str, command: dict[str, Any]
) -> None:
    exc = rejected(command)
    assert exc.reason == reason, exc.detail
    assert exc.command_id == command["command_id"]
    assert exc.detail and "\n" not in exc.detail
    assert str(exc) == f"{reason}: {exc.detail}"
    # The schema refuses it too, unless only the sink's configuration can tell.
    expires = command.get("expires_at")
    expires_before = reason == "bad_time" and type(expires) is int and expires < NOW
    if reason not in CONFIG_ONLY and not expires_before:
        assert schema_errors(command), command


def test_every_rejection_reason_is_tested() -> None:
    tested = {reason for reason, _ in REJECTIONS} | {"unsigned", "bad_signature"}
    assert tested == REJECT_REASONS


def test_max_decimals_comes_from_the_policy() -> None:
    two = Policy(pairs=PAIRS, max_decimals=2)
    assert rejected(create(amount="1.234"), two).reason == "too_many_decimals"
    assert rejected(create(stop_limit="1.001"), two).reason == "too_many_decimals"
    assert isinstance(parse_command(encode(create(amount="1.23")), two), CreateOrder)
    whole = Policy(pairs=PAIRS, max_decimals=0)
    assert rejected(create(price="1.0"), whole).reason == "too_many_decimals"
    assert isinstance(parse_command(encode(create(amount="7", price="9")), whole), CreateOrder)


def test_the_first_problem_is_reported_and_unknown_fields_come_first() -> None:
    exc = rejected(create(extra="x", amount=1.5, pair="nope"))
    assert exc.reason == "unknown_field"
    assert '"extra"' in exc.detail
    exc = rejected(create(amount=..., price=...))
    assert exc.reason == "missing_field"
    assert "amount" in exc.detail and "price" in exc.detail


def test_details_are_short_and_single_line() -> None:
    exc = rejected(create(amount="1\n" + "9" * 500))
    assert exc.reason == "bad_decimal"
    assert len(exc.detail) < 200 and "\n" not in exc.detail
    exc = rejected(create(**{"x" * 300: 1, "\nforged log line": 2}))
    assert exc.reason == "unknown_field"
    assert len(exc.detail) < 300 and "\n" not in exc.detail


def test_rejected_only_takes_known_reasons() -> None:
    with pytest.raises(ValueError):
        Rejected("whatever", "detail", "c-1")


# -- messages without a usable command_id: dead-letter ---------------------------------------


@pytest.mark.parametrize(
    ("reason", "raw"),
    [
        ("empty", None),
        ("empty", b""),
        ("invalid_utf8", b"\xff"),
        ("invalid_utf8", b'{"command_id": "c-\xc3"}'),
        ("invalid_utf8", '{"command_id": "\ud800"}'.encode("utf-8", "surrogatepass")),
        ("invalid_json", b"{"),
        ("invalid_json", b" "),
        ("invalid_json", b"NaN"),
        ("invalid_json", b'{"command_id": "c-1", "amount": NaN}'),
        ("invalid_json", b'{"command_id": "c-1", "amount": Infinity}'),
        ("invalid_json", b"{'command_id': 'c-1'}"),
        ("invalid_json", b'{"command_id": "c-1"} {"command_id": "c-2"}'),
        ("invalid_json", '\ufeff{"command_id": "c-1"}'.encode()),
        ("invalid_json", b'{"command_id": "c-1", "command_id": "c-2"}'),
        ("invalid_json", b'{"command_id": "c-1", "amount": "1", "amount": "9"}'),
        ("invalid_json", b'{"command_id": "c-1", "note": "\\ud800"}'),
        ("invalid_json", b'{"command_id": "c-1", "x": ' + b"[" * 17 + b"]" * 17 + b"}"),
        ("invalid_json", b"[" * 100_000 + b"]" * 100_000),
        ("not_an_object", b"[]"),
        ("not_an_object", b"1"),
        ("not_an_object", b'"c-1"'),
        ("not_an_object", b"null"),
        ("not_an_object", b'[{"command_id": "c-1"}]'),
        ("invalid_command_id", b"{}"),
        ("invalid_command_id", encode(create(command_id=...))),
        ("invalid_command_id", encode(create(command_id=""))),
        ("invalid_command_id", encode(create(command_id=7))),
        ("invalid_command_id", encode(create(command_id=None))),
        ("invalid_command_id", encode(create(command_id="a b"))),
        ("invalid_command_id", encode(create(command_id="c-1\n"))),
        ("invalid_command_id", encode(create(command_id="c/1"))),
        ("invalid_command_id", encode(create(command_id="ç-1"))),
        ("invalid_command_id", encode(create(command_id="x" * 101))),
    ],
)
def test_messages_without_a_usable_command_id_are_bad_messages(
    reason: str, raw: bytes | None
) -> None:
    exc = bad_message(raw)
    assert exc.reason == reason, exc.detail
    assert len(exc.detail) < 200


def test_a_command_id_of_100_characters_is_fine() -> None:
    cmd = parse_command(encode(create(command_id="x" * 100)), POLICY)
    assert cmd.command_id == "x" * 100


# -- signatures ----------------------------------------------------------------------------


def signed(obj: dict[str, Any], secret: bytes = SECRET) -> dict[str, Any]:
    return {**obj, "signature": sign(obj, secret)}


def test_sign_then_verify_round_trip() -> None:
    for obj in (create(), delete(), create(use_rbc=True, expires_at=NOW + 5000)):
        cmd = parse_command(encode(signed(obj)), SIGNED)
        assert cmd.command_id == obj["command_id"]
        assert schema_errors(signed(obj)) == []
    # A signature is also checked when it is optional.
    assert isinstance(parse_command(encode(signed(create())), OPTIONAL_SIG), CreateOrder)
    assert isinstance(parse_command(encode(create()), OPTIONAL_SIG), CreateOrder)


def test_canonical_form_is_sorted_compact_utf8_with_exact_numbers() -> None:
    obj = protocol.decode('{"b": "ç", "a": 1.50e3, "c": [true, null, -0], "signature": "x"}')
    assert canonical_bytes(obj) == '{"a":1.50e3,"b":"ç","c":[true,null,-0]}'.encode()
    plain = create(use_rbc=False)
    assert canonical_bytes(plain) == json.dumps(
        plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def test_canonical_form_refuses_floats_and_decimals() -> None:
    for bad in (1.5, Decimal("1.5"), object()):
        with pytest.raises(TypeError):
            canonical_bytes(create(amount=bad))
    with pytest.raises(ValueError):
        canonical_bytes({"x": JsonNumber("1.5.5")})
    with pytest.raises(ValueError):
        sign(create(), b"")


def test_a_signature_over_reordered_reformatted_json_verifies() -> None:
    obj = create(expires_at=NOW + 60_000, use_rbc=True)
    signature = sign(obj, SECRET)
    items = sorted(obj.items(), reverse=True)
    text = "{\n" + ",\n".join(f"  {json.dumps(k)} :  {json.dumps(v)}" for k, v in items)
    text += f',\n  "signature": "{signature}"\n}}\n'
    assert isinstance(parse_command(text.encode(), SIGNED), CreateOrder)
    # \u escapes and raw UTF-8 are the same text.
    escaped = signed(create(command_id="c-2", note="çok"))
    for ensure_ascii in (True, False):
        raw = json.dumps(escaped, ensure_ascii=ensure_ascii).encode()
        # Verified (else it would be bad_signature), then refused for the unknown field.
        assert rejected(raw, SIGNED).reason == "unknown_field"


def test_number_text_is_signed_as_written() -> None:
    obj = create()
    signature = sign(obj, SECRET)
    text = json.dumps({**obj, "signature": signature})
    # The same instant written as another number literal is another message.
    other = text.replace(str(obj["created_at"]), f"{obj['created_at']}.0")
    assert rejected(other.encode(), SIGNED).reason == "bad_signature"


@pytest.mark.parametrize(
    "tamper",
    [
        {"amount": "15000.00"},
        {"price": "2150000.50"},
        {"side": "sell"},
        {"pair": "eth-try"},
        {"created_at": NOW},
        {"use_rbc": False},
        {"stop_limit": "0"},
    ],
)
def test_a_tampered_command_fails_the_signature(tamper: dict[str, Any]) -> None:
    tampered = {**signed(create()), **tamper}
    exc = rejected(tampered, SIGNED)
    assert exc.reason == "bad_signature"
    assert exc.command_id == "c-1"


def test_the_wrong_secret_fails_the_signature() -> None:
    assert rejected(signed(create(), b"other"), SIGNED).reason == "bad_signature"


@pytest.mark.parametrize(
    "signature", ["", "ab", "A" * 64, "g" * 64, "0" * 63, "0" * 65, 12, None, True, ["x"]]
)
def test_a_malformed_signature_is_a_bad_signature(signature: Any) -> None:
    exc = rejected(create(signature=signature), OPTIONAL_SIG)
    assert exc.reason == "bad_signature"


def test_an_uppercase_signature_is_refused() -> None:
    good = signed(create())
    assert rejected({**good, "signature": good["signature"].upper()}, SIGNED).reason == (
        "bad_signature"
    )


def test_a_missing_signature_is_unsigned_when_required() -> None:
    exc = rejected(create(), SIGNED)
    assert exc.reason == "unsigned"
    assert exc.command_id == "c-1"


def test_a_signed_command_without_a_configured_secret_is_refused() -> None:
    exc = rejected(signed(create()), POLICY)
    assert exc.reason == "bad_signature"
    assert "no HMAC secret" in exc.detail


def test_an_unverified_command_says_nothing_about_its_contents() -> None:
    # Garbage that would be rejected for several reasons: the signature decides first.
    junk = create(amount=1.5, pair="XRP", extra={"a": 1}, action="nuke")
    for raw, policy, reason in (
        (junk, SIGNED, "unsigned"),
        ({**junk, "signature": "0" * 64}, SIGNED, "bad_signature"),
        ({**junk, "signature": "0" * 64}, OPTIONAL_SIG, "bad_signature"),
    ):
        exc = rejected(raw, policy)
        assert exc.reason == reason
        for word in ("1.5", "XRP", "extra", "nuke", "amount", "pair"):
            assert word not in exc.detail


def test_the_secret_and_the_expected_signature_never_appear_in_details() -> None:
    secret_forms = [SECRET.decode("latin-1"), SECRET.hex(), SECRET.decode("utf-8", "replace")]
    cases = [
        signed(create(), b"other"),
        {**signed(create()), "amount": "1"},
        create(signature="0" * 64),
        create(signature="nope"),
        create(),
    ]
    for raw in cases:
        exc = rejected(raw, SIGNED)
        body = {**raw}
        body.pop("signature", None)
        expected = sign(body, SECRET)
        for text in (exc.detail, str(exc), repr(exc)):
            assert expected not in text
            for form in secret_forms:
                assert form not in text
            assert "s3cret" not in text


def test_policy_hides_the_secret_and_checks_itself() -> None:
    assert "s3cret" not in repr(SIGNED) and "hmac_secret" not in repr(SIGNED)
    for bad in (
        {"pairs": frozenset()},
        {"pairs": {"btc-try"}},
        {"pairs": frozenset({"BTC-TRY"})},
        {"pairs": PAIRS, "max_decimals": 9},
        {"pairs": PAIRS, "max_decimals": -1},
        {"pairs": PAIRS, "max_decimals": True},
        {"pairs": PAIRS, "hmac_secret": b""},
        {"pairs": PAIRS, "hmac_secret": "text"},
        {"pairs": PAIRS, "require_signature": True},
    ):
        with pytest.raises(ConfigError):
            Policy(**bad)


# -- exchange fields, value, expiry --------------------------------------------------------


def test_create_fields_are_the_spec_names() -> None:
    cmd = parse_command(encode(create(use_rbc=True, stop_limit="2000000")), POLICY)
    assert isinstance(cmd, CreateOrder)
    assert create_fields(cmd) == {
        "side": "buy",
        "type": "btc-try",
        "amount": "1500.00",
        "price": "2150000.5",
        "use_rbc": "1",
        "stop_limit": "2000000",
    }
    plain = parse_command(encode(create()), POLICY)
    assert isinstance(plain, CreateOrder)
    assert create_fields(plain)["use_rbc"] == "0"
    assert create_fields(plain)["stop_limit"] == "0"


def test_delete_fields_are_the_spec_names() -> None:
    cmd = parse_command(encode(delete(data_id="18")), POLICY)
    assert isinstance(cmd, DeleteOrder)
    assert delete_fields(cmd) == {"data_id": "18", "type": "eth-try"}


def test_notional_is_the_quote_value_computed_exactly() -> None:
    buy = parse_command(encode(create(amount="1500.00", price="3")), POLICY)
    assert isinstance(buy, CreateOrder)
    assert notional(buy) == Decimal("1500")
    big = "99999999999999999999.99999999"
    sell = parse_command(encode(create(side="sell", amount=big, price=big)), POLICY)
    assert isinstance(sell, CreateOrder)
    assert (
        notional(sell)
        == Decimal("9999999999999999999999999998000000000000.0000000000000001")
        != Decimal(big) * Decimal(big)  # the default 28-digit context rounds
    )
    small = parse_command(encode(create(side="sell", amount="0.5", price="0.1")), POLICY)
    assert isinstance(small, CreateOrder)
    assert notional(small) == Decimal("0.05")


def test_expired() -> None:
    cmd = parse_command(encode(create(created_at=NOW, expires_at=NOW + 10_000)), POLICY)
    assert expired(cmd, NOW, None) is None
    assert expired(cmd, NOW + 9_999, None) is None
    assert expired(cmd, NOW + 10_000, None) == "expires_at_passed"
    assert expired(cmd, NOW + 5_000, 5_000) is None
    assert expired(cmd, NOW + 5_001, 5_000) == "too_old"
    assert expired(cmd, NOW + 20_000, 5_000) == "expires_at_passed"
    forever = parse_command(encode(delete(created_at=NOW)), POLICY)
    assert expired(forever, NOW + 10**9, None) is None
    assert expired(forever, NOW - 5_000, 5_000) is None
    assert expired(forever, NOW - 5_001, 5_000) == "created_in_future"
    with pytest.raises(ValueError):
        expired(forever, NOW, -1)


# -- reconciliation ------------------------------------------------------------------------

SINCE = 1750953170000  # 2025-06-26 18:52:50 in Istanbul
UNTIL = SINCE + 3000


def local(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, IST).strftime("%Y-%m-%d %H:%M:%S")


def answer(rows: list[dict[str, Any]]) -> list[Any]:
    """Rows as the client hands them over (numbers kept as text)."""
    return protocol.data_rows(protocol.decode(json.dumps({"data": rows})))


def open_row(**changes: Any) -> dict[str, Any]:
    row = {
        "data_id": 18,
        "type": "btc-try",
        "side": "sell",
        "amount": "0.50000000",
        "price": "2150000.50000000",
        "total": "1075000.25000000",
        "status": "active",
        "created_at": local(SINCE + 1000),
    }
    row.update(changes)
    return row


def tx_row(**changes: Any) -> dict[str, Any]:
    row = {
        "zone": "taker",
        "type": "btc-try",
        "amount": "0.50000000",
        "price": "2150000.50000000",
        "total": "1075000.25000000",
        "fee": "1075.00000000",
        "status": "approved",
        "txid": None,
        "updated_at": local(SINCE + 1000),
        "created_at": local(SINCE + 1000),
    }
    row.update(changes)
    return row


def order(**changes: Any) -> CreateOrder:
    cmd = parse_command(encode(create(**{"side": "sell", "amount": "0.5", **changes})), POLICY)
    assert isinstance(cmd, CreateOrder)
    return cmd


BUY = order(side="buy", amount="1000", price="3")


def placed(cmd: CreateOrder, opens: list[Any], txs: list[Any] | None = None) -> Placement:
    return find_placed(cmd, answer(opens), answer(txs or []), SINCE, UNTIL, IST)


def test_a_sell_is_found_by_exact_amount() -> None:
    p = placed(order(), [open_row(data_id=7, price="1"), open_row()])
    assert p == Placement([18], 0, False, 0)
    assert p.found and not p.absent


def test_a_buy_is_found_by_coin_quantity_rounded_down() -> None:
    coin = open_row(side="buy", price="3.00000000", amount="333.33333333", total="999.99999999")
    assert placed(BUY, [coin]).open_matches == [18]
    rounded_up = {**coin, "amount": "333.33333334", "total": "1000.00000002"}
    assert not placed(BUY, [rounded_up]).found


def test_a_buy_is_found_by_its_total_or_its_try_amount() -> None:
    by_total = open_row(side="buy", price="3", amount="333.3", total="1000.00000000")
    assert placed(BUY, [by_total]).open_matches == [18]
    by_try = open_row(side="buy", price="3", amount="1000.00000000", total="3000")
    assert placed(BUY, [by_try]).open_matches == [18]


def test_coin_quantity_is_rounded_down_exactly_beyond_28_digits() -> None:
    # Decimal's default 28-digit context rounds this quotient *up* in the last place.
    cmd = order(side="buy", amount="12345678901234567890.12345678", price="1.1")
    floor = open_row(side="buy", price="1.1", amount="11223344455667788991.02132434", total="1")
    assert placed(cmd, [floor]).open_matches == [18]
    above = {**floor, "amount": "11223344455667788991.02132435"}
    assert not placed(cmd, [above]).found
    # A quotient longer than 28 digits does not raise (the default context would).
    huge = order(side="buy", amount="99999999999999999999.99999999", price="0.00000003")
    assert placed(huge, [floor]).absent


@pytest.mark.parametrize(
    "row",
    [
        open_row(price="2150000.49"),
        open_row(side="buy"),
        open_row(type="eth-try"),
        open_row(amount="0.49999999"),
        open_row(created_at=local(SINCE - 2000)),
        open_row(created_at=local(UNTIL + 2000)),
    ],
)
def test_other_open_orders_do_not_match(row: dict[str, Any]) -> None:
    p = placed(order(), [row])
    assert not p.found
    assert p.absent


def test_the_window_is_widened_by_one_second() -> None:
    edge_rows = [
        open_row(data_id=1, created_at=local(SINCE - 1000)),
        open_row(data_id=2, created_at=local(UNTIL + 1000)),
        open_row(data_id=3, created_at=local(SINCE - 1001)),
        open_row(data_id=4, created_at=local(UNTIL + 2000)),
    ]
    assert placed(order(), edge_rows).open_matches == [1, 2]


def test_a_filled_order_is_found_in_transactions() -> None:
    p = placed(order(), [], [tx_row(), tx_row(zone="maker"), tx_row(zone="deposit")])
    assert p.fill_matches == 2 and p.found
    assert not placed(order(), [], [tx_row(price="2150000.4")]).found
    assert not placed(order(), [], [tx_row(type="eth-try")]).found
    assert not placed(order(), [], [tx_row(created_at=local(SINCE - 5000))]).found


def test_a_full_recent_window_is_saturated() -> None:
    recent = [open_row(data_id=100 + i, price="1") for i in range(protocol.WINDOW_ROWS)]
    p = placed(order(), recent)
    assert p.saturated and not p.found and not p.absent
    # One row from before the window proves the answer reaches back far enough.
    reaching = [*recent[:-1], open_row(data_id=1, price="1", created_at=local(SINCE - 60_000))]
    assert placed(order(), reaching).absent
    # Fewer rows than the window: everything is shown.
    assert placed(order(), recent[:-1]).absent
    fills = [tx_row(price="1") for _ in range(protocol.WINDOW_ROWS)]
    assert placed(order(), [], fills).saturated
    # Saturated but found: found wins.
    assert placed(order(), [*recent[:-1], open_row()]).found


def test_unreadable_rows_make_the_answer_inconclusive() -> None:
    broken = {k: v for k, v in open_row().items() if k != "data_id"}
    p = placed(order(), [broken], [{"zone": "taker"}, "junk"])
    assert p.unreadable == 3
    assert p.saturated and not p.found and not p.absent


def test_find_placed_needs_an_ordered_window() -> None:
    with pytest.raises(ValueError):
        find_placed(order(), [], [], UNTIL, SINCE, IST)


# -- is the order a delete names still open? ----------------------------------------------


def delete_cmd(data_id: int = 18, pair: str = "btc-try") -> DeleteOrder:
    cmd = parse_command(encode(delete(data_id=data_id, pair=pair)), POLICY)
    assert isinstance(cmd, DeleteOrder)
    return cmd


def others(n: int) -> list[dict[str, Any]]:
    return [open_row(data_id=100 + i) for i in range(n)]


@pytest.mark.parametrize(
    ("rows", "state"),
    [
        ([], OpenState.GONE),
        ([open_row()], OpenState.OPEN),
        ([*others(3), open_row()], OpenState.OPEN),
        (others(3), OpenState.GONE),
        # Same id on another pair: not the order the delete names.
        ([open_row(type="eth-try")], OpenState.GONE),
        # open-order lists only the last 25: a full list may hide the order ...
        (others(24), OpenState.GONE),
        (others(25), OpenState.UNDECIDED),
        # ... but not one it shows.
        ([*others(24), open_row()], OpenState.OPEN),
        # A row whose id or pair cannot be read may be the order.
        ([*others(2), open_row(data_id="18")], OpenState.UNDECIDED),
        ([*others(2), open_row(data_id=None)], OpenState.UNDECIDED),
        ([open_row(type=None)], OpenState.UNDECIDED),
        ([*others(2), "not a row"], OpenState.UNDECIDED),
        # Other fields do not matter: only the id and the pair name the order.
        ([open_row(created_at="garbage", price="x")], OpenState.OPEN),
    ],
)
def test_find_open_decides_a_delete_only_from_what_open_order_shows(
    rows: list[Any], state: OpenState
) -> None:
    check = find_open(delete_cmd(), answer(rows))
    assert check.state is state, check.detail
    assert "18" in check.detail and "btc-try" in check.detail


def test_find_open_survives_an_id_too_long_for_int() -> None:
    """A hostile exchange answer: int() of a 5,000-digit id raises in Python."""
    text = '{"data": [{"data_id": ' + "9" * 5000 + ', "type": "btc-try"}]}'
    rows = protocol.data_rows(protocol.decode(text))
    assert find_open(delete_cmd(), rows).state is OpenState.GONE
    plain = protocol.data_rows(protocol.decode('{"data": [{"data_id": 18, "type": "btc-try"}]}'))
    assert find_open(delete_cmd(), plain).state is OpenState.OPEN


def test_find_open_matches_the_pair_the_delete_names() -> None:
    rows = answer([open_row(type="eth-try")])
    assert find_open(delete_cmd(pair="eth-try"), rows).state is OpenState.OPEN
    assert find_open(delete_cmd(data_id=19, pair="eth-try"), rows).state is OpenState.GONE


# -- results ---------------------------------------------------------------------------------


def build(**kwargs: Any) -> dict[str, Any]:
    record = result(
        **{"received_at_ms": NOW, "decided_at_ms": NOW + 250, "source": SOURCE, **kwargs}
    )
    assert [e.message for e in RESULT_SCHEMA.iter_errors(record)] == []
    # What a consumer decodes: exact integers, no floats anywhere.
    assert json.loads(json.dumps(record), parse_float=Decimal) == record
    return record


CREATED = {"command_id": "c-1", "action": "create", "pair": "btc-try"}
DELETED = {"command_id": "d-1", "action": "delete", "pair": "eth-try", "data_id": 18}
WHEN = {"command_created_at_ms": NOW - 1000}


def test_result_records_validate_against_the_schema() -> None:
    accepted = build(
        **CREATED, **WHEN, outcome="accepted", message="Order saved successfully.",
        attempts=1, exchange_ms=120,
    )  # fmt: skip
    assert accepted == {
        "command_id": "c-1",
        "action": "create",
        "outcome": "accepted",
        "reason": None,
        "message": "Order saved successfully.",
        "pair": "btc-try",
        "reconciled": False,
        "attempts": 1,
        "command_created_at_ms": NOW - 1000,
        "received_at_ms": NOW,
        "decided_at_ms": NOW + 250,
        "latency_ms": {"end_to_end": 1250, "in_sink": 250, "exchange": 120},
        "source": SOURCE,
        "data_id": None,
    }
    exc = rejected(create(amount=1.5))
    bad = build(command_id=exc.command_id, outcome=Outcome.REJECTED, reason=exc.reason,
                message=exc.detail)  # fmt: skip
    assert (bad["action"], bad["pair"], bad["latency_ms"]["end_to_end"]) == (None, None, None)
    build(**CREATED, **WHEN, outcome="rejected", reason="kill_switch", message="off")
    build(**CREATED, **WHEN, outcome="failed", reason="exchange_rejected",
          message="amount too small for this price", attempts=1)  # fmt: skip
    build(**CREATED, **WHEN, outcome="failed", reason="not_placed", reconciled=True,
          attempts=1, exchange_ms=30000)  # fmt: skip
    build(**CREATED, **WHEN, outcome="expired", reason="too_old")
    build(**CREATED, **WHEN, outcome="duplicate", reason="already_accepted")
    build(command_id="c-1", outcome="duplicate")
    build(**CREATED, **WHEN, outcome="unknown", reason="undecided", reconciled=True,
          attempts=1, exchange_ms=30000)  # fmt: skip
    build(**CREATED, **WHEN, outcome="unknown", reason="undecided", reconciled=True)
    found = build(**CREATED, **WHEN, outcome="accepted", reason="reconciled",
                  reconciled=True, attempts=1, data_id=77)  # fmt: skip
    assert found["data_id"] == 77
    build(**CREATED, **WHEN, outcome="accepted", reconciled=True)  # resumed after restart
    gone = build(**DELETED, **WHEN, outcome="accepted", reason="already_gone", attempts=1)
    assert gone["data_id"] == 18
    build(**DELETED, **WHEN, outcome="unknown", reason="exchange_unavailable", attempts=10)


def test_result_takes_the_command_details_from_the_command() -> None:
    cmd = parse_command(encode(delete(data_id="18")), POLICY)
    record = build(command_id="d-1", command=cmd, outcome="expired", reason="too_old")
    assert (record["action"], record["pair"], record["data_id"]) == ("delete", "eth-try", 18)
    assert record["command_created_at_ms"] == NOW - 1000
    placed_create = parse_command(encode(create()), POLICY)
    record = build(command_id="c-1", command=placed_create, outcome="accepted",
                   reconciled=True, attempts=1, data_id=77)  # fmt: skip
    assert (record["action"], record["data_id"]) == ("create", 77)
    base = {"received_at_ms": NOW, "decided_at_ms": NOW, "source": SOURCE}
    for clash in ({"command_id": "other"}, {"pair": "btc-try"}, {"data_id": 19},
                  {"action": "create"}, {"command_created_at_ms": NOW}):  # fmt: skip
        args = {"command_id": "d-1", "outcome": "accepted", "attempts": 1, **clash}
        with pytest.raises(ValueError):
            result(**base, command=cmd, **args)
    # Without the command, a delete result must be given its data_id.
    with pytest.raises(ValueError):
        result(**base, **{**DELETED, "data_id": None}, **WHEN, outcome="expired", reason="x")


def test_result_clamps_a_clock_step_and_truncates_long_messages() -> None:
    record = build(**CREATED, **WHEN, outcome="failed", reason="exchange_rejected",
                   message="x" * 5000, attempts=1, decided_at_ms=NOW - 5)  # fmt: skip
    assert record["latency_ms"]["in_sink"] == 0
    assert len(record["message"]) == 1000 and record["message"].endswith("...")
    skewed = build(**CREATED, command_created_at_ms=NOW + 10_000, outcome="expired",
                   reason="created_in_future")  # fmt: skip
    assert skewed["latency_ms"]["end_to_end"] < 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {**CREATED, **WHEN, "outcome": "ok"},
        {**CREATED, **WHEN, "outcome": "rejected"},  # no reason
        {**CREATED, **WHEN, "outcome": "rejected", "reason": "Bad Reason"},
        {**CREATED, **WHEN, "outcome": "rejected", "reason": "x", "attempts": 1},
        {**CREATED, **WHEN, "outcome": "expired", "reason": "x", "exchange_ms": 5},
        {**CREATED, **WHEN, "outcome": "duplicate", "reconciled": True},
        {**CREATED, **WHEN, "outcome": "accepted"},  # no call, not reconciled
        {**CREATED, **WHEN, "outcome": "failed", "reason": "x"},
        {**CREATED, **WHEN, "outcome": "accepted", "attempts": 1, "reason": "already_gone"},
        {**CREATED, **WHEN, "outcome": "accepted", "attempts": 1, "data_id": 5},
        {**CREATED, **WHEN, "outcome": "unknown", "reason": "x", "data_id": 5},
        {**CREATED, **WHEN, "outcome": "accepted", "attempts": 1, "reconciled": 1},
        {**CREATED, **WHEN, "outcome": "accepted", "attempts": True},
        {**CREATED, **WHEN, "outcome": "accepted", "attempts": -1},
        {**DELETED, **WHEN, "outcome": "accepted", "attempts": 1, "data_id": None},
        {**DELETED, **WHEN, "outcome": "accepted", "attempts": 1, "data_id": 0},
        {**CREATED, "outcome": "accepted", "attempts": 1},  # no created_at
        {**CREATED, **WHEN, "action": "update", "outcome": "accepted", "attempts": 1},
        {**CREATED, **WHEN, "pair": None, "outcome": "accepted", "attempts": 1},
        {"command_id": "c-1", "outcome": "expired", "reason": "too_old"},  # no command
        {"command_id": "c-1", "outcome": "rejected", "reason": "x", "pair": "btc-try"},
        {"command_id": "", "outcome": "rejected", "reason": "x"},
        {"command_id": "c 1", "outcome": "rejected", "reason": "x"},
        {"command_id": "c-1", "outcome": "rejected", "reason": "x", "source": {"topic": ""}},
        {"command_id": "c-1", "outcome": "rejected", "reason": "x", "received_at_ms": -1},
    ],
)
def test_result_refuses_records_the_schema_would_refuse(kwargs: dict[str, Any]) -> None:
    args = {"received_at_ms": NOW, "decided_at_ms": NOW + 1, "source": SOURCE, **kwargs}
    with pytest.raises(ValueError):
        result(**args)


def test_the_result_schema_refuses_inconsistent_records() -> None:
    good = build(**CREATED, **WHEN, outcome="accepted", attempts=1, exchange_ms=5)
    broken: list[dict[str, Any]] = []
    for key, value in [
        ("outcome", "ok"),
        ("outcome", "rejected"),  # attempts 1 for a never-sent outcome
        ("attempts", 0),
        ("reason", "Already Gone"),
        ("reason", "already_gone"),  # on a create
        ("data_id", 5),  # on a create that was not reconciled
        ("amount", "1"),
        ("reconciled", None),
        ("command_created_at_ms", 1.5),
        ("action", None),  # an accepted result has a command
        ("message", "x" * 1001),
    ]:
        record = copy.deepcopy(good)
        record[key] = value
        broken.append(record)
    for key in list(good):
        record = copy.deepcopy(good)
        del record[key]
        broken.append(record)
    record = copy.deepcopy(good)
    record["latency_ms"]["in_sink"] = -1
    broken.append(record)
    record = copy.deepcopy(good)
    record["source"]["extra"] = 1
    broken.append(record)
    for record in broken:
        assert list(RESULT_SCHEMA.iter_errors(record)), record


def test_outcomes_are_documented_in_the_result_schema() -> None:
    schema = load_schema("order-result")
    outcome = schema["$defs"]["result"]["properties"]["outcome"]
    assert outcome["enum"] == [o.value for o in Outcome]
    for name in outcome["enum"]:
        assert f"`{name}`:" in outcome["description"]
    assert "NOT retried" in outcome["description"]


def test_schemas_are_valid_and_closed() -> None:
    for name in ("order-command", "order-result"):
        schema = load_schema(name)
        Draft202012Validator.check_schema(schema)
        assert schema["$id"] == f"https://exchange-connectors.dev/schemas/robicoin.{name}.v1.json"
    described = load_schema("order-command")["description"]
    assert "canonical form" in described and "MUST be JSON strings" in described


# -- fuzzing -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def outcome_of(raw: bytes | None, policy: Policy = POLICY) -> str:
    """Parse ``raw``; anything but a command, BadMessage or Rejected fails the test."""
    try:
        parse_command(raw, policy)
    except BadMessage as exc:
        assert exc.reason in BAD_MESSAGE_REASONS
        return f"bad:{exc.reason}"
    except Rejected as exc:
        assert exc.reason in REJECT_REASONS
        assert exc.command_id is not None
        return f"rejected:{exc.reason}"
    return "ok"


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    outcome_of(raw)
    outcome_of(raw, SIGNED)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_arbitrary_json_never_crashes(value: Any) -> None:
    raw = json.dumps(value).encode()
    assert outcome_of(raw) != "ok"
    outcome_of(raw, SIGNED)


def mutate(base: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``base`` with some fields replaced, removed or added."""
    junk = st.one_of(
        json_values,
        st.sampled_from(["0", "1", "-1", "1.5", "1e5", "btc-try", "buy", "sell", "18", ""]),
        st.integers(min_value=-2, max_value=2**64),
    )
    names = st.sampled_from([*base, "use_rbc", "stop_limit", "expires_at", "data_id", "x"])
    return st.lists(st.tuples(names, junk | st.just(...)), max_size=3).map(
        lambda changes: {k: v for k, v in {**base, **dict(changes)}.items() if v is not ...}
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=st.one_of(mutate(create()), mutate(delete())))
def test_mutated_commands_are_parsed_or_refused_as_the_schema_says(obj: dict[str, Any]) -> None:
    raw = encode(obj)
    outcome = outcome_of(raw)
    if outcome.startswith("bad:"):
        assert outcome == "bad:invalid_command_id"
        return
    valid = not list(COMMAND_SCHEMA.iter_errors(exact(raw)))
    if outcome == "ok":
        assert valid, obj
    elif valid:
        # Only what needs the sink's configuration or compares two fields.
        assert outcome in ("rejected:pair_not_allowed", "rejected:bad_time"), (outcome, obj)
        if outcome == "rejected:bad_time":
            assert obj["expires_at"] <= obj["created_at"]


decimals = st.builds(
    lambda integer, fraction: integer + (f".{fraction}" if fraction else ""),
    st.from_regex(r"0|[1-9][0-9]{0,19}", fullmatch=True),
    st.from_regex(r"[0-9]{0,8}", fullmatch=True),
)
positive = decimals.filter(lambda text: Decimal(text) > 0)
creates = st.fixed_dictionaries(
    {
        "command_id": st.from_regex(r"[A-Za-z0-9._:-]{1,100}", fullmatch=True),
        "action": st.just("create"),
        "pair": st.sampled_from(sorted(PAIRS)),
        "side": st.sampled_from(["buy", "sell"]),
        "amount": positive,
        "price": positive,
        "created_at": st.integers(min_value=0, max_value=253_402_300_799_999 - 1),
    },
    optional={"use_rbc": st.booleans(), "stop_limit": decimals},
)


@settings(max_examples=300, deadline=None)
@given(obj=creates)
def test_valid_commands_round_trip_through_create_fields(obj: dict[str, Any]) -> None:
    for policy, raw in ((POLICY, obj), (SIGNED, {**obj, "signature": sign(obj, SECRET)})):
        assert schema_errors(raw) == []
        cmd = parse_command(encode(raw), policy)
        assert isinstance(cmd, CreateOrder)
        fields = create_fields(cmd)
        assert fields == {
            "side": obj["side"],
            "type": obj["pair"],
            "amount": obj["amount"],
            "price": obj["price"],
            "use_rbc": "1" if obj.get("use_rbc") else "0",
            "stop_limit": obj.get("stop_limit", "0"),
        }
        with localcontext() as ctx:
            ctx.prec = 100
            price = Decimal(1) if obj["side"] == "buy" else Decimal(obj["price"])
            assert notional(cmd) == Decimal(obj["amount"]) * price


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=st.one_of(mutate(create()), mutate(delete())))
def test_a_valid_signature_never_changes_the_verdict(obj: dict[str, Any]) -> None:
    """Whatever the contents (floats, nesting, non-ASCII keys), a producer that signs the
    numbers as it wrote them is verified, and the verdict is the unsigned one's."""
    text = json.dumps(obj, ensure_ascii=False)
    decoded = protocol.decode(text)
    unsigned = outcome_of(text.encode())
    if not isinstance(decoded, dict) or unsigned == "bad:invalid_command_id":
        return
    signature = sign(decoded, SECRET)
    body = canonical_bytes(decoded)[:-1]  # a command object is never empty
    assert outcome_of(body + f',"signature":"{signature}"}}'.encode(), SIGNED) == unsigned
    forged = ("0" if signature[0] != "0" else "1") + signature[1:]
    assert outcome_of(body + f',"signature":"{forged}"}}'.encode(), SIGNED) == (
        "rejected:bad_signature"
    )
