"""The Robicoin simulator enforces the documented rules and shows what the client did.

Driven over loopback (port 0) with ``requests``, the way a connector drives the real
exchange. POSTs from one client are spaced 120 ms apart (the exchange allows one per
100 ms per IP); every timeout goes through ``T()``.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import requests

from connectors.robicoin.signing import auth_fields
from connectors.simulators.harness import Harness
from connectors.simulators.robicoin import (
    DEFAULT_PRIVATE_KEY,
    DEFAULT_PUBLIC_ID,
    DEFAULT_PUBLIC_KEY,
    PAIRS,
    TICKER_WINDOWS,
    RobicoinSimulator,
    encode_json,
)
from connectors.testing import T, wait_until

POST_GAP = 0.12  # > 100 ms between POST arrivals, whatever the machine's speed
DEC8 = re.compile(r"^\d+\.\d{8}$")
STAMP = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
TX_FIELDS = [
    "zone",
    "type",
    "amount",
    "price",
    "total",
    "fee",
    "status",
    "txid",
    "updated_at",
    "created_at",
]
TICKER_FIELDS = ["type", "high", "last", "bid", "volume", "low", "ask", "avarage"]
ORDER = {
    "side": "buy",
    "type": "btc-try",
    "amount": "1000",
    "price": "3000000.5",
    "use_rbc": "0",
    "stop_limit": "0",
}

Start = Callable[..., Harness[RobicoinSimulator]]


@pytest.fixture
def start() -> Iterator[Start]:
    """Start simulators (quiet and seeded unless told otherwise); all stopped at the end."""
    running: list[Harness[RobicoinSimulator]] = []

    def _start(**options: Any) -> Harness[RobicoinSimulator]:
        options.setdefault("seed", 1234)
        options.setdefault("transactions_per_second", 0.0)
        options.setdefault("market_orders_per_second", 0.0)
        sim = Harness(RobicoinSimulator(**options)).start()
        running.append(sim)
        return sim

    yield _start
    for sim in running:
        sim.stop()


# When the last POST to each simulator ended: the limit is per IP, and all clients are
# on 127.0.0.1.
_last_post: dict[str, float] = {}


class Client:
    """One caller: a keep-alive session that spaces its POSTs like a polite connector."""

    def __init__(
        self,
        sim: Harness[RobicoinSimulator],
        public_key: str = DEFAULT_PUBLIC_KEY,
        public_id: str = DEFAULT_PUBLIC_ID,
        private_key: str = DEFAULT_PRIVATE_KEY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base = sim.base_url
        self.session = requests.Session()
        self.creds = (public_key, public_id, private_key)
        self.clock = clock

    def auth(self, **override: str) -> dict[str, str]:
        fields = auth_fields(*self.creds, int(self.clock()))
        fields.update(override)
        return fields

    def post(
        self, endpoint: str, extra: dict[str, str] | None = None, *, spaced: bool = True, **kw: Any
    ) -> requests.Response:
        """POST the auth fields (+ ``extra``) as a urlencoded form unless ``kw`` says
        otherwise (``data=``, ``files=``, ``json=``...)."""
        if spaced:
            time.sleep(max(0.0, _last_post.get(self.base, 0.0) + POST_GAP - time.monotonic()))
        if not {"data", "files", "json"} & kw.keys():
            kw["data"] = {**self.auth(), **(extra or {})}
        kw.setdefault("timeout", T(5))
        try:
            return self.session.post(f"{self.base}/{endpoint}", **kw)
        finally:
            _last_post[self.base] = time.monotonic()

    def get(self, path: str) -> requests.Response:
        return self.session.get(f"{self.base}/{path}", timeout=T(5))


def ok_data(response: requests.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    data = response.json()["data"]
    assert isinstance(data, list)
    return data


# --------------------------------------------------------------------------------------
# Authentication and form data
# --------------------------------------------------------------------------------------


def test_spec_signing_vector_passes_and_a_wrong_hash_is_unauthorized(start: Start) -> None:
    sim = start(accounts={"PUBKEY": ("42", "SECRET")}, clock=lambda: 1524922783.0)
    client = Client(sim)
    vector = {
        "public_key": "PUBKEY",
        "public_id": "42",
        "time": "1524922783",
        "hash": "cc7c90d68f4e112488b26cc28b4143e3",
    }
    balances = ok_data(client.post("balance", data=vector))
    assert [b["currency"] for b in balances] == ["try", "btc", "eth", "ltc", "usdt", "rbc"]

    bad = client.post("balance", data={**vector, "hash": "cc7c90d68f4e112488b26cc28b4143e4"})
    assert bad.status_code == 401
    assert bad.headers["Content-Type"] == "application/json"
    assert bad.json() == {"error": "Unauthorized"}
    assert "SECRET" not in bad.text
    counters = sim.control.counters()
    assert counters["unauthorized_attempts"] == 1
    assert counters["unauthorized_by_key"] == {"PUBKEY": 1}
    assert counters["responses_by_status"] == {200: 1, 401: 1}


def test_urlencoded_and_multipart_accepted_json_and_other_bodies_refused(start: Start) -> None:
    sim = start()
    client = Client(sim)
    ok_data(client.post("balance"))
    multipart = {name: (None, value) for name, value in client.auth().items()}
    ok_data(client.post("balance", files=multipart))

    for kw in (
        {"json": client.auth()},
        {"data": "just text", "headers": {"Content-Type": "text/plain"}},
        {"data": json.dumps(client.auth())},  # no Content-Type at all
        {"data": "&".join(f"{k}={v}" for k, v in client.auth().items()) + "&time=1"},
        {"files": {"public_key": DEFAULT_PUBLIC_KEY, "x": (None, "1")}},  # a file part
    ):
        refused = client.post("balance", **kw)
        assert refused.status_code == 400, kw
        assert set(refused.json()) == {"error"}
    # Badly formed bodies are not unauthorized attempts.
    assert sim.control.counters()["unauthorized_attempts"] == 0

    # A missing auth field is: counted under "-" when no key was claimed.
    no_key = {k: v for k, v in client.auth().items() if k != "public_key"}
    assert client.post("balance", data=no_key).status_code == 401
    assert sim.control.counters()["unauthorized_by_key"] == {"-": 1}


def test_stale_or_malformed_time_wrong_id_and_inactive_key_are_unauthorized(
    start: Start,
) -> None:
    sim = start()
    client = Client(sim)
    now = int(time.time())
    for fields in (
        auth_fields(DEFAULT_PUBLIC_KEY, DEFAULT_PUBLIC_ID, DEFAULT_PRIVATE_KEY, now - 40),
        auth_fields(DEFAULT_PUBLIC_KEY, DEFAULT_PUBLIC_ID, DEFAULT_PRIVATE_KEY, now + 40),
        {**client.auth(), "time": f"{now}.0"},
        auth_fields(DEFAULT_PUBLIC_KEY, "1002", DEFAULT_PRIVATE_KEY, now),
        auth_fields("someone-else", DEFAULT_PUBLIC_ID, DEFAULT_PRIVATE_KEY, now),
    ):
        assert client.post("balance", data=fields).status_code == 401, fields
    ok_data(client.post("balance", data=auth_fields(*client.creds, now - 25)))

    sim.control.set_key_active(DEFAULT_PUBLIC_KEY, False)
    assert client.post("balance").status_code == 401
    sim.control.set_key_active(DEFAULT_PUBLIC_KEY, True)
    ok_data(client.post("balance"))

    sim.control.add_account("second-key", "77", "second-secret")
    ok_data(Client(sim, "second-key", "77", "second-secret").post("open-order"))
    assert sim.control.counters()["unauthorized_by_key"] == {
        DEFAULT_PUBLIC_KEY: 5,
        "someone-else": 1,
    }


def test_unknown_paths_and_wrong_methods(start: Start) -> None:
    sim = start()
    client = Client(sim)
    root = sim.base_url.removesuffix("/api/v1")
    cases = [
        (client.session.get(f"{sim.base_url}/balance", timeout=T(5)), 405),
        (client.post("ticker", data={}), 405),
        (client.get("ticker/5min"), 404),
        (client.get("ticker/"), 404),
        (client.post("orders"), 404),
    ]
    time.sleep(POST_GAP)  # outside /api/v1/ticker: the "other" class
    cases.append((client.session.get(f"{root}/ticker", timeout=T(5)), 404))
    for response, status in cases:
        assert response.status_code == status, response.request.url
        assert response.headers["Content-Type"] == "application/json"
        assert set(response.json()) == {"error"}
    assert cases[0][0].headers["Allow"] == "POST"


# --------------------------------------------------------------------------------------
# Rate limits and the IP block
# --------------------------------------------------------------------------------------


def test_ticker_limit_ten_per_100ms(start: Start) -> None:
    sim = start()
    client = Client(sim)
    # Spaced to fit: two rounds of ten, 120 ms apart, all pass.
    for _ in range(2):
        for _ in range(10):
            ok_data(client.get("ticker"))
        time.sleep(POST_GAP)
    assert sim.control.counters()["rate_limit_violations"]["ticker"] == 0

    # Eleven in a row: if the client saw all eleven within 100 ms, the server did too,
    # so the 11th must be refused. A slow machine gets another try.
    for _ in range(5):
        time.sleep(POST_GAP)
        began = time.monotonic()
        statuses = [client.get("ticker/1min").status_code for _ in range(11)]
        if time.monotonic() - began < 0.1:
            break
    else:
        pytest.skip("machine too slow to send 11 requests within 100 ms")
    assert statuses == [200] * 10 + [429]
    assert client.get("ticker").status_code == 429  # still inside the window
    assert sim.control.last_body("/ticker") == '{"error":"Too many requests"}'
    counters = sim.control.counters()
    assert counters["rate_limit_violations"] == {"ticker": 2, "other": 0}
    assert counters["responses_by_status"][429] == 2


def test_other_limit_one_per_100ms(start: Start) -> None:
    sim = start()
    client = Client(sim)
    ok_data(client.post("balance"))
    ok_data(client.post("transaction"))  # 120 ms later: fine
    for _ in range(5):
        time.sleep(POST_GAP)
        began = time.monotonic()
        first = client.post("open-order", spaced=False)
        second = client.post("balance", spaced=False)
        if time.monotonic() - began < 0.1:
            break
    else:
        pytest.skip("machine too slow to send 2 requests within 100 ms")
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json() == {"error": "Too many requests"}
    # The rejected one counted in the window too: the ticker class is separate.
    ok_data(client.get("ticker"))
    assert sim.control.counters()["rate_limit_violations"] == {"ticker": 0, "other": 1}


def test_ten_unauthorized_attempts_block_the_ip_until_unblocked(start: Start) -> None:
    sim = start()
    client = Client(sim)
    for _ in range(10):
        refused = client.post("balance", data=client.auth(hash="0" * 32))
        assert refused.status_code == 401
    blocked = client.get("ticker")
    assert blocked.status_code == 403
    assert blocked.json() == {"error": "IP blocked"}
    assert client.post("balance").status_code == 403  # good credentials do not help
    counters = sim.control.counters()
    assert counters["blocked_ips"] == ["127.0.0.1"]
    assert counters["blocked_requests"] == 2
    assert counters["unauthorized_attempts"] == 10
    assert counters["unauthorized_by_key"] == {DEFAULT_PUBLIC_KEY: 10}

    sim.control.unblock()
    assert sim.control.counters()["blocked_ips"] == []
    ok_data(client.get("ticker"))
    ok_data(client.post("balance"))


# --------------------------------------------------------------------------------------
# Ticker, order book, balances
# --------------------------------------------------------------------------------------

NUMBER = re.compile(r'"(\w+)":(-?\d+(?:\.\d+)?)(?=[,}])')


def test_ticker_values_are_exact_json_numbers(start: Start) -> None:
    sim = start()
    client = Client(sim)
    float_would_change = []
    for path in ["ticker", *(f"ticker/{w}" for w in TICKER_WINDOWS)]:
        response = client.get(path)
        rows = json.loads(response.text, parse_float=Decimal)["data"]
        assert response.text == sim.control.last_body("/" + path)
        assert [row["type"] for row in rows] == list(PAIRS)
        literals = NUMBER.findall(response.text)
        assert len(literals) == 7 * len(rows)
        values = [(k, v) for row in rows for k, v in row.items() if k != "type"]
        # The text written is the text read back: nothing went through float.
        assert [(k, format(v, "f")) for k, v in values] == literals
        for row in rows:
            assert list(row) == TICKER_FIELDS
            assert all(isinstance(row[k], Decimal) for k in TICKER_FIELDS[1:])
            assert row["low"] <= row["last"] <= row["high"]
            assert row["low"] <= row["avarage"] <= row["high"]
            assert row["bid"] <= row["ask"]
            assert row["volume"] >= 0
        float_would_change += [
            text for _, text in literals if Decimal(repr(float(text))) != Decimal(text)
        ]
    assert float_would_change, "no ticker value that float would alter"
    assert sim.control.counters()["requests_by_path"]["/api/v1/ticker/1month"] == 1


def test_ticker_moves_with_market_activity(start: Start) -> None:
    sim = start(market_orders_per_second=200.0)
    client = Client(sim)
    first = client.get("ticker").text
    wait_until(lambda: client.get("ticker").text != first, T(5), "the ticker to move")
    for row in ok_data(client.get("ticker/1min")):
        assert row["low"] <= row["last"] <= row["high"]
        assert row["bid"] <= row["ask"]


def test_order_book_and_balances_shapes(start: Start) -> None:
    sim = start()
    client = Client(sim)
    orders = ok_data(client.post("order"))
    assert len(orders) == 25
    for order in orders:
        assert list(order) == ["type", "side", "amount", "price", "total", "status", "created_at"]
        assert order["type"] in PAIRS and order["side"] in ("buy", "sell")
        assert all(DEC8.match(order[k]) for k in ("amount", "price", "total"))
        assert Decimal(order["total"]) == (
            Decimal(order["amount"]) * Decimal(order["price"])
        ).quantize(Decimal("1E-8"))
        assert order["status"] == "active" and STAMP.match(order["created_at"])
    stamps = [o["created_at"] for o in orders]
    assert stamps == sorted(stamps, reverse=True)

    wallets = ok_data(client.post("balance"))
    for wallet in wallets:
        assert list(wallet) == ["currency", "balance", "reserved_balance", "status"]
        assert DEC8.match(wallet["balance"]) and DEC8.match(wallet["reserved_balance"])
        assert wallet["status"] in ("active", "passive")


def test_passive_wallet_for_a_currency_without_market(start: Start) -> None:
    sim = start(pairs=("btc-try",))
    wallets = {w["currency"]: w for w in ok_data(Client(sim).post("balance"))}
    assert wallets["btc"]["status"] == "active"
    assert wallets["eth"] == {
        "currency": "eth",
        "balance": "0.00000000",
        "reserved_balance": "0.00000000",
        "status": "passive",
    }


# --------------------------------------------------------------------------------------
# Transactions
# --------------------------------------------------------------------------------------


def check_transaction(row: dict[str, Any]) -> None:
    assert list(row) == TX_FIELDS
    assert row["zone"] in ("maker", "taker", "deposit", "withdraw")
    assert all(DEC8.match(row[k]) for k in ("amount", "price", "total", "fee"))
    assert row["status"] == "approved"
    assert STAMP.match(row["created_at"]) and row["updated_at"] == row["created_at"]
    if row["zone"] in ("maker", "taker"):
        assert row["type"] in PAIRS and row["txid"] is None
    else:
        base, quote = row["type"].split("-")
        assert base == quote and row["price"] == "1.00000000"
        assert re.fullmatch(r"(0x)?[0-9a-f]{32,64}", row["txid"])


def test_transactions_newest_first_at_most_25_and_burst(start: Start) -> None:
    sim = start()
    client = Client(sim)
    before = ok_data(client.post("transaction"))
    assert before == list(reversed(sim.control.transactions()))  # the 5 rows of initial history
    burst = sim.control.burst(40)
    assert len(burst) == 40 and len({row["created_at"] for row in burst}) == 1
    served = ok_data(client.post("transaction"))
    assert served == list(reversed(burst[-25:]))
    assert served == list(reversed(sim.control.transactions()[-25:]))
    for row in served:
        check_transaction(row)
    assert sim.control.counters()["transactions_generated"] == 45


def test_burst_rows_can_repeat_exactly_and_spread_over_seconds(start: Start) -> None:
    sim = start()
    rows = sim.control.burst(300)
    assert any(a == b for a, b in itertools.pairwise(rows)), "no equal fills"
    spread = sim.control.burst(5, same_second=False)
    stamps = [row["created_at"] for row in spread]
    assert stamps == sorted(stamps)
    assert sim.control.transactions()[-5:] == spread


def test_account_activity_adds_rows_and_never_changes_old_ones(start: Start) -> None:
    sim = start(transactions_per_second=40.0, market_orders_per_second=40.0)
    client = Client(sim)
    seen = sim.control.transactions()
    wait_until(lambda: len(sim.control.transactions()) >= len(seen) + 15, T(10), "account activity")
    sim.control.pause_activity()
    later = sim.control.transactions()
    assert later[: len(seen)] == seen
    served = ok_data(client.post("transaction"))
    assert served == list(reversed(later[-25:]))
    assert sim.control.transactions() == later  # paused: nothing new
    for row in served:
        check_transaction(row)
    assert sim.control.counters()["transactions_generated"] == len(later)


# --------------------------------------------------------------------------------------
# Orders
# --------------------------------------------------------------------------------------


def test_create_order_appears_in_open_orders_and_orders_created(start: Start) -> None:
    sim = start()
    client = Client(sim)
    saved = client.post("create-order", ORDER)
    assert saved.status_code == 200
    assert saved.json() == {"success": "Order saved successfully."}
    assert saved.text == sim.control.last_body("/create-order")
    created = sim.control.orders_created()
    assert len(created) == 1
    assert {k: created[0][k] for k in ORDER} == ORDER
    data_id = created[0]["data_id"]

    rows = ok_data(client.post("open-order"))
    assert rows[0] == {
        "data_id": data_id,
        "type": "btc-try",
        "side": "buy",
        "amount": "0.00033333",  # a buy's amount is TRY: 1000 / 3000000.5, rounded down
        "price": "3000000.50000000",
        "total": "999.99016667",
        "status": "active",
        "created_at": rows[0]["created_at"],
    }
    assert data_id > max(row["data_id"] for row in rows[1:])
    assert sim.control.open_orders()[0] == rows[0]

    sell = {**ORDER, "side": "sell", "type": "eth-try", "amount": "0.5", "price": "120000"}
    assert client.post("create-order", sell).status_code == 200
    top = ok_data(client.post("open-order"))[0]
    assert (top["amount"], top["total"]) == ("0.50000000", "60000.00000000")
    assert sim.control.counters()["orders_created"] == 2


@pytest.mark.parametrize(
    "change",
    [
        {"side": "BUY"},
        {"type": "doge-try"},
        {"amount": "0"},
        {"amount": "1.123456789"},
        {"price": "-5"},
        {"price": "1e3"},
        {"use_rbc": "2"},
        {"stop_limit": "-1"},
        {"amount": "0.00000001"},  # buys 0 coin at this price
        {"side": ""},
        {"client_order_id": "x"},
    ],
)
def test_create_order_rejects_invalid_fields(start: Start, change: dict[str, str]) -> None:
    sim = start()
    before = sim.control.open_orders()
    refused = Client(sim).post("create-order", {**ORDER, **change})
    assert refused.status_code == 400
    assert set(refused.json()) == {"error"} and refused.json()["error"]
    assert sim.control.open_orders() == before
    assert sim.control.orders_created() == []
    assert sim.control.counters()["unauthorized_attempts"] == 0


def test_delete_order_then_again_is_not_found_not_unauthorized(start: Start) -> None:
    sim = start()
    client = Client(sim)
    assert client.post("create-order", ORDER).status_code == 200
    data_id = str(sim.control.orders_created()[0]["data_id"])

    wrong_pair = client.post("delete-order", {"data_id": data_id, "type": "eth-try"})
    assert wrong_pair.status_code == 404
    deleted = client.post("delete-order", {"data_id": data_id, "type": "btc-try"})
    assert deleted.status_code == 200
    assert deleted.json() == {"success": "Order deleted successfully."}
    assert all(str(row["data_id"]) != data_id for row in ok_data(client.post("open-order")))
    again = client.post("delete-order", {"data_id": data_id, "type": "btc-try"})
    assert again.status_code == 404
    assert again.json() == {"error": "Order not found"}
    assert client.post("delete-order", {"data_id": "abc", "type": "btc-try"}).status_code == 400

    counters = sim.control.counters()
    assert counters["unauthorized_attempts"] == 0 and counters["blocked_ips"] == []
    assert counters["orders_deleted"] == 1
    assert [r["data_id"] for r in sim.control.orders_deleted()] == [int(data_id)]


def test_create_delay_and_dropped_response_still_place_the_order(start: Start) -> None:
    sim = start()
    client = Client(sim)
    sim.control.set_create_delay(T(1.0))
    with pytest.raises(requests.exceptions.ReadTimeout):
        client.post("create-order", ORDER, timeout=(T(5), T(0.3)))
    assert len(sim.control.orders_created()) == 1  # placed before the (late) answer
    sim.control.set_create_delay(0)

    sim.control.set_drop_create_response(1)
    with pytest.raises(requests.exceptions.ConnectionError):
        client.post("create-order", {**ORDER, "price": "2999999"})
    created = sim.control.orders_created()
    assert [c["price"] for c in created] == ["3000000.5", "2999999"]
    open_ids = [row["data_id"] for row in sim.control.open_orders()]
    assert [c["data_id"] for c in created] == sorted(open_ids)[-2:]
    assert sim.control.counters()["dropped_responses"] == 1

    assert client.post("create-order", ORDER).status_code == 200  # back to normal


def test_fail_next_answers_5xx_without_doing_anything(start: Start) -> None:
    sim = start()
    client = Client(sim)
    sim.control.fail_next("/create-order", 503, n=2)
    for _ in range(2):
        failed = client.post("create-order", ORDER)
        assert failed.status_code == 503
        assert failed.headers["Content-Type"] == "application/json"
    assert sim.control.orders_created() == []
    ok_data(client.post("open-order"))  # other endpoints unaffected
    assert client.post("create-order", ORDER).status_code == 200
    assert sim.control.counters()["responses_by_status"][503] == 2


def test_timestamps_are_istanbul_local_time_from_the_clock(start: Start) -> None:
    def clock() -> float:
        return 1700000000.0

    sim = start(clock=clock)
    client = Client(sim, clock=clock)
    assert client.post("create-order", ORDER).status_code == 200
    assert ok_data(client.post("open-order"))[0]["created_at"] == "2023-11-15 01:13:20"
    (row,) = sim.control.burst(1)
    assert (row["created_at"], row["updated_at"]) == ("2023-11-15 01:13:20",) * 2
    assert ok_data(client.post("transaction"))[0] == row

    utc = start(clock=clock, zone="UTC")
    (row,) = utc.control.burst(1)
    assert row["created_at"] == "2023-11-14 22:13:20"


# --------------------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------------------


def test_lifecycle_base_url_and_port_release() -> None:
    with RobicoinSimulator(transactions_per_second=0) as simulator:
        assert simulator.port > 0
        assert simulator.base_url == f"http://127.0.0.1:{simulator.port}/api/v1"
        session = requests.Session()
        assert session.get(simulator.base_url + "/ticker", timeout=T(5)).status_code == 200
    with pytest.raises(requests.exceptions.ConnectionError):
        session.get(simulator.base_url + "/ticker", timeout=T(5))  # kept-alive one closed too
    with Harness(RobicoinSimulator(seed=1)) as sim:
        assert sim.simulator.port == sim.port and sim.base_url.endswith("/api/v1")
    with pytest.raises(RuntimeError):
        _ = sim.simulator


def test_encode_json_keeps_decimal_text() -> None:
    payload = {"data": [{"v": Decimal("987654321.12345678"), "s": "1.00000000", "n": None}]}
    text = encode_json(payload)
    assert text == '{"data":[{"v":987654321.12345678,"s":"1.00000000","n":null}]}'
    assert json.loads(text, parse_float=Decimal) == payload
