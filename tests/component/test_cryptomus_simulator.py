"""The Cryptomus simulator enforces the exchange's rules and shows what the client did.

Driven with a real ``websockets`` client and ``requests`` over loopback (port 0), the
way a connector would drive the real exchange. Every wait is bounded and scaled by
``TEST_TIMEOUT_SCALE`` for slow shared machines.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import requests
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from connectors.cryptomus.signing import sign
from connectors.simulators.cryptomus import (
    DEFAULT_API_KEY,
    DEFAULT_USER_ID,
    MARKETS_PATHS,
    SCALES_PATH,
    TOKEN_PATH,
    CryptomusSimulator,
)
from connectors.simulators.harness import Harness

TIMEOUT_SCALE = float(os.environ.get("TEST_TIMEOUT_SCALE", "1"))

MARKET_FIELDS = {
    "id",
    "symbol",
    "baseCurrency",
    "quoteCurrency",
    "baseMinSize",
    "quoteMinSize",
    "baseMaxSize",
    "quoteMaxSize",
    "basePrec",
    "quotePrec",
    "baseCurrencyFullName",
    "quoteCurrencyFullName",
}
DEC16 = re.compile(r"^-?\d+\.\d{16}$")
DECIMAL_TEXT = re.compile(r"^-?\d+(\.\d+)?$")


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


class FakeClock:
    """Injectable wall clock: timestamps and token expiry without sleeping."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_sim() -> Iterator[Callable[..., Harness[CryptomusSimulator]]]:
    started: list[Harness[CryptomusSimulator]] = []

    def factory(**options: Any) -> Harness[CryptomusSimulator]:
        options.setdefault("seed", 7)
        options.setdefault("updates_per_second", 0.0)
        sim = Harness(CryptomusSimulator(**options)).start()
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.stop()


def get_token(sim: Harness[CryptomusSimulator]) -> str:
    response = requests.get(
        sim.base_url + TOKEN_PATH,
        headers={"userId": DEFAULT_USER_ID, "sign": sign(b"", DEFAULT_API_KEY)},
        timeout=scaled(5),
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


def open_ws(sim: Harness[CryptomusSimulator], token: str | None = None) -> ClientConnection:
    token = get_token(sim) if token is None else token
    return connect(
        f"{sim.ws_url}?token={token}",
        ping_interval=None,  # websockets' own pings are not requests; keep them out
        open_timeout=scaled(5),
        close_timeout=scaled(2),
    )


def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    text = ws.recv(timeout=scaled(timeout))
    assert isinstance(text, str)
    message: dict[str, Any] = json.loads(text, parse_float=Decimal)
    return message


def call(
    ws: ClientConnection, request_id: int | str, method: str, params: list[Any]
) -> dict[str, Any]:
    """Send a request and return its answer, skipping update events in between."""
    ws.send(json.dumps({"id": request_id, "method": method, "params": params}))
    deadline = time.monotonic() + scaled(5)
    while time.monotonic() < deadline:
        message = recv_json(ws)
        if not str(message.get("method", "")).endswith("_update"):
            assert message["id"] == request_id
            return message
    raise AssertionError(f"no answer to {method} within the deadline")


def collect_updates(
    ws: ClientConnection, method: str, count: int, timeout: float = 5.0
) -> list[str]:
    """Raw text of the next ``count`` ``method`` frames."""
    frames: list[str] = []
    deadline = time.monotonic() + scaled(timeout)
    while len(frames) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(frames)} {method} frames within the deadline"
        text = ws.recv(timeout=remaining)
        assert isinstance(text, str)
        if json.loads(text, parse_float=Decimal).get("method") == method:
            frames.append(text)
    return frames


def wait_closed(ws: ClientConnection, timeout: float) -> ConnectionClosed:
    """Read until the server closes; return the close exception."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the server did not close the connection"
        try:
            ws.recv(timeout=remaining)
        except ConnectionClosed as exc:
            return exc


# ---- REST --------------------------------------------------------------------------


def test_signature_test_vector() -> None:
    body = b'{"market":"TRX_USDT","quantity":"20"}'
    assert sign(body, "fixture-api-key") == "7a25ed96c474b99df63c8caad23459bc"


def test_token_endpoint_requires_a_good_signature(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    sim = make_sim()
    url = sim.base_url + TOKEN_PATH

    token = get_token(sim)
    assert re.fullmatch(r"[0-9a-f]{64}", token)

    bad = requests.get(
        url, headers={"userId": DEFAULT_USER_ID, "sign": sign(b"", "wrong-key")}, timeout=5
    )
    assert bad.status_code == 401
    assert bad.json() == {"message": "Invalid Sign."}
    missing = requests.get(url, headers={"userId": DEFAULT_USER_ID}, timeout=scaled(5))
    assert missing.status_code == 401

    unknown = requests.get(
        url, headers={"userId": "nobody", "sign": sign(b"", DEFAULT_API_KEY)}, timeout=5
    )
    assert unknown.status_code == 404
    assert unknown.headers["Content-Type"] == "application/json"

    counters = sim.control.counters()
    assert counters["tokens_issued"] == 1
    assert counters["bad_signatures"] == 2


def test_market_list_on_both_paths(make_sim: Callable[..., Harness[CryptomusSimulator]]) -> None:
    sim = make_sim()
    bodies = []
    for path in MARKETS_PATHS:
        response = requests.get(sim.base_url + path, timeout=scaled(5))
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "application/json"
        bodies.append(response.json())
    assert bodies[0] == bodies[1]
    markets = bodies[0]["result"]
    assert {m["symbol"] for m in markets} == {"BTC_USDT", "ETH_USDT", "TRX_USDT"}
    for market in markets:
        assert set(market) == MARKET_FIELDS
        assert all(isinstance(value, str) for value in market.values())
    # A signed request is accepted as well.
    signed = requests.get(
        sim.base_url + MARKETS_PATHS[0],
        headers={"userId": DEFAULT_USER_ID, "sign": sign(b"", DEFAULT_API_KEY)},
        timeout=scaled(5),
    )
    assert signed.status_code == 200


def test_symbol_scales(make_sim: Callable[..., Harness[CryptomusSimulator]]) -> None:
    sim = make_sim()
    response = requests.get(
        sim.base_url + SCALES_PATH, params={"symbol": "BTC_USDT"}, timeout=scaled(5)
    )
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "success" and body["message"] == "success"
    assert [entry["index"] for entry in body["data"]] == [0, 1, 2]
    assert body["data"][0] == {"scale": "0.01", "index": 0}

    unknown = requests.get(
        sim.base_url + SCALES_PATH, params={"symbol": "NOPE_USDT"}, timeout=scaled(5)
    )
    assert unknown.status_code == 404
    assert unknown.json()["status"] == "error"


# ---- tokens ------------------------------------------------------------------------


def test_token_is_single_use(make_sim: Callable[..., Harness[CryptomusSimulator]]) -> None:
    sim = make_sim()
    token = get_token(sim)
    with open_ws(sim, token) as first:
        with pytest.raises(InvalidStatus) as rejected:
            open_ws(sim, token)
        assert rejected.value.response.status_code == 401
        # The first connection is unaffected.
        assert call(first, 1, "ping", [])["method"] == "pong"
    counters = sim.control.counters()
    assert counters["token_reuse_attempts"] == 1
    assert counters["connections_accepted"] == 1


def test_unknown_missing_and_expired_tokens(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    clock = FakeClock(1_750_953_362.0)
    sim = make_sim(clock=clock, token_ttl_s=300.0)
    for token in ("0" * 64, ""):
        with pytest.raises(InvalidStatus) as rejected:
            open_ws(sim, token)
        assert rejected.value.response.status_code == 401

    token = get_token(sim)
    clock.now += 301
    with pytest.raises(InvalidStatus) as rejected:
        open_ws(sim, token)
    assert rejected.value.response.status_code == 401

    counters = sim.control.counters()
    assert counters["token_invalid"] == 2
    assert counters["token_expired"] == 1
    assert counters["connections_accepted"] == 0


# ---- connection rules --------------------------------------------------------------


def test_idle_connection_is_closed_even_while_updates_flow(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    idle = scaled(0.4)
    sim = make_sim(idle_timeout_s=idle, updates_per_second=20.0)
    with open_ws(sim) as ws:
        started = time.monotonic()
        assert call(ws, 1, "lastprice_subscribe", ["BTC_USDT"])["error"] is None
        closed = wait_closed(ws, timeout=0.4 + 3)
        elapsed = time.monotonic() - started
    assert closed.rcvd is not None and closed.rcvd.code in (1000, 1001)
    assert elapsed >= idle * 0.8
    counters = sim.control.counters()
    assert counters["idle_closes"] == 1
    assert counters["updates_sent"]["lastprice"] >= 2  # server updates did not keep it open


def test_pings_keep_the_connection_open(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    idle = scaled(0.4)
    sim = make_sim(idle_timeout_s=idle)
    with open_ws(sim) as ws:
        end = time.monotonic() + idle * 3
        request_id = 0
        while time.monotonic() < end:
            request_id += 1
            pong = call(ws, request_id, "ping", [])
            assert pong == {"id": request_id, "method": "pong", "data": None, "error": None}
            time.sleep(idle / 4)
        # Runtime change: a shorter timeout applies to the open connection at once.
        sim.control.set_idle_timeout(0.05)
        closed = wait_closed(ws, timeout=3)
    assert closed.rcvd is not None and closed.rcvd.code in (1000, 1001)
    counters = sim.control.counters()
    assert counters["pings"] == request_id
    assert counters["idle_closes"] == 1


def test_invalid_json_closes_the_connection(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    sim = make_sim()
    with open_ws(sim) as ws:
        ws.send('{"id":1,"method":"ping","params":[],}')
        closed = wait_closed(ws, timeout=3)
    assert closed.rcvd is not None
    assert closed.rcvd.code in (1003, 1008)
    assert closed.rcvd.reason == "invalid json"
    assert sim.control.counters()["invalid_json_closes"] == 1


def test_badly_shaped_requests_and_unknown_methods_get_errors(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    sim = make_sim()
    with open_ws(sim) as ws:
        ws.send("[1, 2]")
        reply = recv_json(ws)
        assert reply["data"] is None and reply["error"]["code"] == 1

        ws.send('{"id": 5, "method": "ping"}')  # params missing
        reply = recv_json(ws)
        assert reply["id"] == 5 and reply["error"]["code"] == 1

        ws.send('{"id": 6, "method": "ping", "params": {}}')  # params not a list
        assert recv_json(ws)["error"]["code"] == 1

        unknown = call(ws, 7, "candles_subscribe", ["BTC_USDT"])
        assert unknown["data"] is None and unknown["error"]["code"] == 2

        # A string id is echoed as is and the connection is still usable.
        assert call(ws, "abc", "ping", []) == {
            "id": "abc",
            "method": "pong",
            "data": None,
            "error": None,
        }
    assert sim.control.counters()["error_replies"] == 4


def test_repeated_subscribe_is_rejected_until_unsubscribed(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    sim = make_sim()
    with open_ws(sim) as ws:
        first = call(ws, 1, "lastprice_subscribe", ["BTC_USDT"])
        assert first == {
            "id": 1,
            "method": "lastprice_subscribe",
            "data": {"status": "success"},
            "error": None,
        }
        again = call(ws, 2, "lastprice_subscribe", ["ETH_USDT"])
        assert again["method"] == "lastprice_subscribe"
        assert again["data"] is None
        assert again["error"] == {"code": 2, "message": "already subscribed"}
        assert sim.control.active_subscriptions() == [{"lastprice": ["BTC_USDT"]}]

        unsubscribed = call(ws, 3, "lastprice_unsubscribe", ["all"])
        assert unsubscribed == {"id": 3, "data": {"status": "success"}, "error": None}
        assert call(ws, 4, "lastprice_subscribe", ["ETH_USDT"])["error"] is None
        assert sim.control.active_subscriptions() == [{"lastprice": ["ETH_USDT"]}]

        # Private types: an empty list unsubscribes everything.
        assert call(ws, 5, "order_subscribe", ["all"])["error"] is None
        assert call(ws, 6, "order_unsubscribe", [])["error"] is None
        assert call(ws, 7, "order_subscribe", ["TRX_USDT"])["error"] is None

    counters = sim.control.counters()
    assert counters["repeated_subscribe_rejections"] == 1
    requests_seen = [(method, params) for _, method, params in sim.control.connection_requests()]
    assert requests_seen[:3] == [
        ("lastprice_subscribe", ["BTC_USDT"]),
        ("lastprice_subscribe", ["ETH_USDT"]),
        ("lastprice_unsubscribe", ["all"]),
    ]


def test_unknown_market_scale_or_currency_rejects_the_whole_request(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    sim = make_sim()
    with open_ws(sim) as ws:
        for request_id, (method, params) in enumerate(
            [
                ("trade_subscribe", ["BTC_USDT", "NOPE_USDT"]),
                ("depth_subscribe", ["BTC_USDT:9"]),
                ("depth_subscribe", ["BTC_USDT"]),
                ("balance_subscribe", ["BTC", "NOPE"]),
            ]
        ):
            reply = call(ws, request_id, method, params)
            assert reply["data"] is None and reply["error"]["code"] == 2, reply
        assert sim.control.active_subscriptions() == [{}]


# ---- update streams ----------------------------------------------------------------


def test_depth_starts_with_a_snapshot_then_partials_that_rebuild(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    sim = make_sim(updates_per_second=100.0)
    scales = {"BTC_USDT": Decimal("0.01"), "ETH_USDT": Decimal("0.1")}
    with open_ws(sim) as ws:
        ws.send(
            json.dumps(
                {"id": 1, "method": "depth_subscribe", "params": ["BTC_USDT:0", "ETH_USDT:1"]}
            )
        )
        assert recv_json(ws)["data"] == {"status": "success"}
        books: dict[str, dict[str, dict[Decimal, Decimal]]] = {}
        for _ in range(2):
            snapshot = recv_json(ws)["data"]
            assert snapshot["full_reload"] is True
            assert len(snapshot["asks"]) == len(snapshot["bids"]) == 10
            books[snapshot["symbol"]] = {
                side: {Decimal(p): Decimal(q) for p, q in snapshot[side]}
                for side in ("asks", "bids")
            }
        assert set(books) == set(scales)

        zeros = 0
        for text in collect_updates(ws, "depth_update", 40):
            data = json.loads(text)["data"]
            assert data["full_reload"] is False
            assert isinstance(data["timestamp"], int)
            book = books[data["symbol"]]
            assert data["scale_index"] == (0 if data["symbol"] == "BTC_USDT" else 1)
            for side in ("asks", "bids"):
                for price_text, qty_text in data[side]:
                    price, qty = Decimal(price_text), Decimal(qty_text)
                    assert price % scales[data["symbol"]] == 0, price_text
                    if qty_text == "0":
                        zeros += 1
                        book[side].pop(price, None)
                    else:
                        book[side][price] = qty
            assert max(book["bids"]) < min(book["asks"]), "rebuilt book is crossed"
    assert zeros > 0
    for book in books.values():
        assert 10 <= len(book["asks"]) <= 12 and 10 <= len(book["bids"]) <= 12


def test_trade_prices_and_quantities_are_json_numbers(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    sim = make_sim(updates_per_second=200.0)
    with open_ws(sim) as ws:
        assert call(ws, 1, "trade_subscribe", ["all"])["error"] is None
        frames = collect_updates(ws, "trade_update", 120)
    for text in frames:
        data = json.loads(text, parse_float=Decimal)["data"]
        assert 1 <= len(data["trades"]) <= 3
        for trade in data["trades"]:
            assert isinstance(trade["price"], Decimal | int)
            assert isinstance(trade["quantity"], Decimal | int)
            assert trade["direction"] in ("buy", "sell")
            assert isinstance(trade["timestamp"], int)
    raw = "".join(frames)
    assert re.search(r'"price":\d+\.\d+,', raw)
    assert '"quantity":0.00000001,' in raw  # dust written positionally, not 1e-08
    assert re.search(r'"quantity":\d+\.\d0,', raw)  # trailing-zero form such as 2.50
    assert "e-" not in raw.lower().replace("trade_update", "")
    logged = sim.control.sent_frames("trade")
    assert logged[: len(frames)] == frames
    assert sim.control.counters()["trades_sent"] >= sum(
        len(json.loads(text)["data"]["trades"]) for text in frames
    )


def test_lastprice_and_ticker_use_strings_and_the_injected_clock(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    sim = make_sim(updates_per_second=50.0, clock=FakeClock(1_750_953_144.9))
    with open_ws(sim) as ws:
        assert call(ws, 1, "lastprice_subscribe", ["ETH_USDT"])["error"] is None
        assert call(ws, 2, "ticker_subscribe", ["all"])["error"] is None
        lastprices = collect_updates(ws, "lastprice_update", 3)
        tickers = collect_updates(ws, "ticker_update", 3)
    for text in lastprices:
        message = json.loads(text)
        assert message["id"] == 0 and message["error"] is None
        assert message["data"]["symbol"] == "ETH_USDT"
        assert message["data"]["timestamp"] == 1_750_953_144
        assert DECIMAL_TEXT.match(message["data"]["price"])
    for text in tickers:
        data = json.loads(text)["data"]
        assert data["timestamp"] == 1_750_953_144
        for field in ("price", "open", "high", "low", "volume", "quote_volume", "price_change"):
            assert isinstance(data[field], str) and DECIMAL_TEXT.match(data[field]), field
        assert Decimal(data["low"]) <= Decimal(data["price"]) <= Decimal(data["high"])
    assert {json.loads(t)["data"]["symbol"] for t in tickers} == {
        "BTC_USDT",
        "ETH_USDT",
        "TRX_USDT",
    }


def test_private_channels_only_for_subscribed_markets(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    sim = make_sim(updates_per_second=100.0)
    with open_ws(sim) as ws:
        assert call(ws, 1, "order_subscribe", ["TRX_USDT"])["error"] is None
        assert call(ws, 2, "balance_subscribe", ["BTC"])["error"] is None
        assert call(ws, 3, "deal_subscribe", ["ETH_USDT"])["error"] is None
        orders = collect_updates(ws, "order_update", 12)
        balances = collect_updates(ws, "balance_update", 3)
        deals = collect_updates(ws, "deal_update", 3)
    order_types = set()
    for text in orders:
        message = json.loads(text)
        assert isinstance(message["id"], str)
        info = message["data"]["info"]
        order_types.add(message["data"]["type"])
        assert info["symbol"] == "TRX_USDT"
        for field in ("price", "quantity", "value", "filledQuantity", "filledValue"):
            assert DEC16.match(info[field]), (field, info[field])
        if message["data"]["type"] == "finished":
            assert {"finishTs", "state", "internalState"} <= set(info)
    assert order_types >= {"created", "finished"}
    for text in balances:
        info = json.loads(text)["data"]["info"]
        assert info["currencyCode"] == "BTC"
        old, new, amount = (Decimal(info[k]) for k in ("oldBalance", "newBalance", "amount"))
        assert abs(new - old) == amount
    for text in deals:
        info = json.loads(text)["data"]["info"]
        assert info["symbol"] == "ETH_USDT" and info["tradeRole"] in ("maker", "taker")
        assert Decimal(info["filledValue"]) == Decimal(info["filledPrice"]) * Decimal(
            info["filledQuantity"]
        )


def test_pause_and_resume_updates(make_sim: Callable[..., Harness[CryptomusSimulator]]) -> None:
    sim = make_sim(updates_per_second=50.0)
    with open_ws(sim) as ws:
        assert call(ws, 1, "lastprice_subscribe", ["BTC_USDT"])["error"] is None
        collect_updates(ws, "lastprice_update", 2)
        sim.control.pause_updates()
        before = sim.control.counters()["updates_sent"]["lastprice"]
        time.sleep(0.2)
        assert sim.control.counters()["updates_sent"]["lastprice"] == before
        sim.control.resume_updates()
        collect_updates(ws, "lastprice_update", 2)


# ---- test controls -----------------------------------------------------------------


def test_drop_connections_aborts_without_close_frame(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    sim = make_sim()
    with open_ws(sim) as ws:
        sim.control.wait_for_connections(1, timeout=scaled(5))
        assert sim.control.drop_connections() == 1
        closed = wait_closed(ws, timeout=3)
    assert isinstance(closed, ConnectionClosedError)
    assert closed.rcvd is None  # no close frame: an abrupt network drop
    assert sim.control.counters()["dropped_by_test"] == 1


def test_inject_raw_sends_text_verbatim(
    make_sim: Callable[..., Harness[CryptomusSimulator]],
) -> None:
    sim = make_sim()
    # The published "finished" example: two keys without a comma between them.
    broken = (
        '{"id":"3","method":"order_update","data":{"info":'
        '{"state":"completed""internalState":"filled"}},"error":null}'
    )
    with open_ws(sim) as first, open_ws(sim) as second:
        sim.control.wait_for_connections(2, timeout=scaled(5))
        assert sim.control.inject_raw(broken) == 2
        assert first.recv(timeout=scaled(5)) == broken
        assert second.recv(timeout=scaled(5)) == broken
        assert len(sim.control.active_subscriptions()) == 2


def test_in_loop_simulator_with_the_asyncio_client() -> None:
    """The asyncio class works on the caller's loop, without the thread wrapper."""

    async def scenario() -> dict[str, Any]:
        async with CryptomusSimulator(seed=1, updates_per_second=0) as sim:
            token = sim.control.issue_token()
            async with async_connect(f"{sim.ws_url}?token={token}", ping_interval=None) as ws:
                await sim.control.wait_for_connections(1, timeout=scaled(5))
                await ws.send('{"id":1,"method":"ping","params":[]}')
                reply = json.loads(await asyncio.wait_for(ws.recv(), scaled(5)))
                assert reply == {"id": 1, "method": "pong", "data": None, "error": None}
            return sim.control.counters()

    counters = asyncio.run(asyncio.wait_for(scenario(), scaled(15)))
    assert counters["pings"] == 1 and counters["tokens_issued"] == 1
