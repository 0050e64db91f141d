"""Loopback simulator of the Cryptomus WebSocket API and the REST calls the stream needs.

Why it exists: connector tests, the demo and the benchmarks need an exchange that
*enforces* the rules the real one enforces, and that lets a test see what the client did.
The rules (see ``shared/spec/cryptomus-websocket.md``):

* a WebSocket token is single-use and expires after 5 minutes; the handshake on ``/ws``
  without a valid ``token`` query parameter is answered with HTTP 401;
* the server closes a connection after 60 s without a client request (server updates do
  not count) and relies on the client's application-level ``ping``, so websockets' own
  keepalive pings are disabled;
* text that is not JSON closes the connection; a badly shaped request gets error code 1,
  any other failure (unknown method, unknown market, repeated subscribe) error code 2;
* subscribing again to a data type that is already subscribed on the connection is
  rejected: changing the market list means unsubscribe, then subscribe again.

One port serves both protocols: ``process_request`` answers the plain HTTP GET endpoints
(token, market list, depth scales) with JSON and lets the ``/ws`` handshake through only
with a good token.

Update frames follow the published shapes, quirks included: ``trade`` prices and
quantities are JSON *numbers* (the frame text is built by hand so they come out exactly
as intended, e.g. ``107100.01``, ``0.00000001``, ``2.50``); private channels use a string
``id`` and 16-decimal strings; unsubscribe answers carry no ``method``. Every decimal is
produced with :class:`decimal.Decimal` from integer random walks, never from ``float``.

Two entry points:

* :class:`CryptomusSimulator` runs inside the caller's event loop;
* :class:`SimulatorThread` runs one in a daemon thread with its own loop, so plain
  synchronous tests (and other threads) can drive it; its methods are forwarded into the
  loop, which owns all state, so no locks are needed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import http
import json
import logging
import math
import random
import re
import secrets
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from decimal import ROUND_FLOOR, Context, Decimal
from typing import Any, Final, TypeVar
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from connectors.cryptomus.signing import signature_matches

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_USER_ID: Final = "sim-user-0001"
DEFAULT_API_KEY: Final = "sim-api-key"

TOKEN_PATH: Final = "/v2/user-api/exchange/account/web-socket/token"
MARKETS_PATHS: Final = ("/v2/user-api/exchange/markets", "/v1/exchange/market")
SCALES_PATH: Final = "/api/v2/symbol-scales"
WS_PATH: Final = "/ws"

PUBLIC_TYPES: Final = ("lastprice", "depth", "ticker", "trade")
PRIVATE_TYPES: Final = ("order", "balance", "deal")
UPDATE_TYPES: Final = PUBLIC_TYPES + PRIVATE_TYPES
# Types whose unsubscribe accepts an empty list as "all" (spec: order/balance/deal).
_EMPTY_MEANS_ALL: Final = frozenset(PRIVATE_TYPES)

_METHOD_RE: Final = re.compile(r"^(" + "|".join(UPDATE_TYPES) + r")_(subscribe|unsubscribe)$")
_DEPTH_PARAM_RE: Final = re.compile(r"^([A-Za-z0-9]+_[A-Za-z0-9]+):([0-9]+)$")

ERR_FORMAT: Final = 1
ERR_OTHER: Final = 2

DEPTH_LEVELS: Final = 10
_DEPTH_MAX_LEVELS: Final = 12

# Wide enough for 16 decimals on balances of any plausible size.
_CTX: Final = Context(prec=60)
_Q16: Final = Decimal("1E-16")
_Q8: Final = Decimal("1E-8")
_TINY_QTY: Final = Decimal("0.00000001")
_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# --------------------------------------------------------------------------------------
# Market data (configuration)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MarketSpec:
    """One market as listed by the exchange plus what the simulator needs to animate it.

    The ``*_min``/``*_max``/``*_prec`` fields are published verbatim in the market list
    (every value a string, as the exchange sends them). ``price``/``price_tick`` seed the
    random walk, ``qty_quantum``/``typical_qty`` size orders and trades, and ``scales``
    are the depth aggregation steps, index 0 first.
    """

    symbol: str
    market_id: str
    base: str
    quote: str
    base_full_name: str
    quote_full_name: str
    price: Decimal
    price_tick: Decimal
    qty_quantum: Decimal
    typical_qty: Decimal
    scales: tuple[Decimal, ...]
    base_min_size: str = "0.0000100000000000"
    quote_min_size: str = "0.1000000000000000"
    base_max_size: str = "10000000000.0000000000000000"
    quote_max_size: str = "99999999.0000000000000000"
    base_prec: str = "8"
    quote_prec: str = "6"

    def __post_init__(self) -> None:
        if not self.scales:
            raise ValueError(f"{self.symbol}: at least one depth scale is required")
        for value in (self.price, self.price_tick, self.qty_quantum, self.typical_qty):
            if value <= 0:
                raise ValueError(f"{self.symbol}: prices and sizes must be positive")
        if any(scale < self.price_tick for scale in self.scales):
            raise ValueError(f"{self.symbol}: a depth scale is finer than the price tick")
        if self.typical_qty < self.qty_quantum:
            raise ValueError(f"{self.symbol}: typical_qty below qty_quantum")

    def market_list_entry(self) -> dict[str, str]:
        """The market-list record, field names and order as published."""
        return {
            "id": self.market_id,
            "symbol": self.symbol,
            "baseCurrency": self.base,
            "quoteCurrency": self.quote,
            "baseMinSize": self.base_min_size,
            "quoteMinSize": self.quote_min_size,
            "baseMaxSize": self.base_max_size,
            "quoteMaxSize": self.quote_max_size,
            "basePrec": self.base_prec,
            "quotePrec": self.quote_prec,
            "baseCurrencyFullName": self.base_full_name,
            "quoteCurrencyFullName": self.quote_full_name,
        }


DEFAULT_MARKETS: Final[tuple[MarketSpec, ...]] = (
    MarketSpec(
        symbol="BTC_USDT",
        market_id="01HSBPVS17CT2GN2FV34K3AMP9",
        base="BTC",
        quote="USDT",
        base_full_name="Bitcoin",
        quote_full_name="Tether USD",
        price=Decimal("107100.01"),
        price_tick=Decimal("0.01"),
        qty_quantum=Decimal("0.000001"),
        typical_qty=Decimal("0.05"),
        scales=(Decimal("0.01"), Decimal("0.1"), Decimal("1")),
    ),
    MarketSpec(
        symbol="ETH_USDT",
        market_id="01HSBPVS17CT2GN2FV34K3AMPA",
        base="ETH",
        quote="USDT",
        base_full_name="Ethereum",
        quote_full_name="Tether USD",
        price=Decimal("2431.57"),
        price_tick=Decimal("0.01"),
        qty_quantum=Decimal("0.0001"),
        typical_qty=Decimal("1.5"),
        scales=(Decimal("0.01"), Decimal("0.1"), Decimal("1")),
    ),
    MarketSpec(
        symbol="TRX_USDT",
        market_id="01HSBPVS17CT2GN2FV34K3AMPB",
        base="TRX",
        quote="USDT",
        base_full_name="TRON",
        quote_full_name="Tether USD",
        price=Decimal("0.272696"),
        price_tick=Decimal("0.000001"),
        qty_quantum=Decimal("0.01"),
        typical_qty=Decimal("500"),
        scales=(Decimal("0.000001"), Decimal("0.0001")),
        base_min_size="1.0000000000000000",
        base_prec="2",
    ),
)


# --------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------


def fmt_plain(value: Decimal) -> str:
    """Decimal as plain positional text (never exponent form), exponent kept."""
    return format(value, "f")


def fmt16(value: Decimal) -> str:
    """The exchange's private-channel style: always 16 decimals, e.g. ``50.0000000000000000``."""
    return format(value.quantize(_Q16, context=_CTX), "f")


def fmt_number(value: Decimal) -> str:
    """Shortest plain JSON number text for a quantity (``0.000254``, ``3``)."""
    return format(value.normalize(_CTX), "f")


def ulid_like(rng: random.Random, unix_ms: int) -> str:
    """A 26-character Crockford-base32 id shaped like the exchange's ULIDs."""
    head = []
    ms = max(0, unix_ms)
    for _ in range(10):
        head.append(_CROCKFORD[ms % 32])
        ms //= 32
    tail = "".join(rng.choice(_CROCKFORD) for _ in range(16))
    return "".join(reversed(head)) + tail


def _is_request_id(value: object) -> bool:
    """Ids are integers (spec) or strings (seen in published examples); bools are not."""
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def _reject_constant(name: str) -> Any:
    """``json.loads`` accepts NaN/Infinity; the exchange's JSON parser would not."""
    raise ValueError(f"invalid JSON constant {name}")


def _dumps(payload: object) -> str:
    return json.dumps(payload, separators=(",", ":"))


# --------------------------------------------------------------------------------------
# Mutable simulation state (owned by the event loop)
# --------------------------------------------------------------------------------------


class _MarketState:
    """Price random walk in integer ticks, plus the 24 h ticker aggregates.

    Integer ticks keep the walk exact (no float) and every price on the tick grid.
    """

    def __init__(self, spec: MarketSpec, rng: random.Random) -> None:
        self.spec = spec
        self._rng = rng
        self.initial_ticks = int((spec.price / spec.price_tick).to_integral_value(ROUND_FLOOR))
        self.price_ticks = self.initial_ticks
        self.open = self.price
        self.high = self._ticks_to_price(self.initial_ticks * 1008 // 1000)
        self.low = self._ticks_to_price(self.initial_ticks * 992 // 1000)
        self.volume = spec.typical_qty * 20000
        self.quote_volume = (self.volume * spec.price).quantize(_Q8, context=_CTX)

    def _ticks_to_price(self, ticks: int) -> Decimal:
        return Decimal(ticks) * self.spec.price_tick

    @property
    def price(self) -> Decimal:
        return self._ticks_to_price(self.price_ticks)

    def step(self) -> Decimal:
        """Move the price by a few ticks (about ±0.02 %), pulled back if it drifts far."""
        max_step = max(1, self.price_ticks // 5000)
        move = self._rng.randint(-max_step, max_step)
        if self.price_ticks * 10 > self.initial_ticks * 12:
            move = -abs(move)
        elif self.price_ticks * 10 < self.initial_ticks * 8:
            move = abs(move)
        self.price_ticks = max(1, self.price_ticks + move)
        price = self.price
        self.high = max(self.high, price)
        self.low = min(self.low, price)
        return price

    def random_qty(self) -> Decimal:
        """A size around ``typical_qty`` on the quantity grid."""
        units = int(self.spec.typical_qty / self.spec.qty_quantum)
        return Decimal(self._rng.randint(max(1, units // 20), units * 2)) * self.spec.qty_quantum

    def near_price(self, spread_ticks: int = 3) -> Decimal:
        ticks = max(1, self.price_ticks + self._rng.randint(-spread_ticks, spread_ticks))
        return self._ticks_to_price(ticks)

    def add_volume(self, qty: Decimal, price: Decimal) -> None:
        self.volume += qty
        self.quote_volume += qty * price


class _Book:
    """One connection's order book for one market and scale.

    Kept per connection so every partial update a client receives applies to the exact
    snapshot it received: a consumer that applies the frames in order rebuilds this book.
    Levels are integer multiples of the scale (``level * scale`` is the price).
    """

    def __init__(self, market: _MarketState, scale: Decimal, rng: random.Random) -> None:
        self.market = market
        self.scale = scale
        self._rng = rng
        self.asks: dict[int, Decimal] = {}
        self.bids: dict[int, Decimal] = {}

    def _best_bid_level(self) -> int:
        return int((self.market.price / self.scale).to_integral_value(ROUND_FLOOR))

    def _qty(self) -> Decimal:
        return self.market.random_qty()

    def snapshot(self) -> tuple[list[list[str]], list[list[str]]]:
        """Build a fresh book around the current price and return it whole."""
        self.asks.clear()
        self.bids.clear()
        top_bid = self._best_bid_level()
        level = top_bid + 1
        while len(self.asks) < DEPTH_LEVELS:
            self.asks[level] = self._qty()
            level += self._rng.randint(1, 2)
        level = top_bid
        while len(self.bids) < DEPTH_LEVELS and level > 0:
            self.bids[level] = self._qty()
            level -= self._rng.randint(1, 2)
        return self._render(self.asks, ascending=True), self._render(self.bids, ascending=False)

    def partial(self) -> tuple[list[list[str]], list[list[str]]]:
        """Move the book with the price and return only the changed levels.

        A removed level is sent with quantity ``"0"``; at least one level is removed per
        update, so consumers exercise their delete path.
        """
        self.market.step()
        top_bid = self._best_bid_level()
        top_ask = top_bid + 1
        ask_changes: dict[int, Decimal] = {}
        bid_changes: dict[int, Decimal] = {}

        # Levels now on the wrong side of the price are gone.
        for level in [lvl for lvl in self.asks if lvl <= top_bid]:
            del self.asks[level]
            ask_changes[level] = Decimal(0)
        for level in [lvl for lvl in self.bids if lvl >= top_ask]:
            del self.bids[level]
            bid_changes[level] = Decimal(0)

        # One random level filled or cancelled.
        side, changes = (
            (self.asks, ask_changes) if self._rng.random() < 0.5 else (self.bids, bid_changes)
        )
        if side:
            gone = self._rng.choice(sorted(side))
            del side[gone]
            changes[gone] = Decimal(0)

        # One or two levels change size.
        for _ in range(self._rng.randint(1, 2)):
            side, changes = (
                (self.asks, ask_changes) if self._rng.random() < 0.5 else (self.bids, bid_changes)
            )
            if side:
                level = self._rng.choice(sorted(side))
                side[level] = self._qty()
                changes[level] = side[level]

        # Refill from the top of the book outwards, then trim the far end.
        level = top_ask
        while len(self.asks) < DEPTH_LEVELS:
            if level not in self.asks:
                self.asks[level] = self._qty()
                ask_changes[level] = self.asks[level]
            level += 1
        level = top_bid
        while len(self.bids) < DEPTH_LEVELS and level > 0:
            if level not in self.bids:
                self.bids[level] = self._qty()
                bid_changes[level] = self.bids[level]
            level -= 1
        while len(self.asks) > _DEPTH_MAX_LEVELS:
            far = max(self.asks)
            del self.asks[far]
            ask_changes[far] = Decimal(0)
        while len(self.bids) > _DEPTH_MAX_LEVELS:
            far = min(self.bids)
            del self.bids[far]
            bid_changes[far] = Decimal(0)

        return self._render(ask_changes, ascending=True), self._render(bid_changes, ascending=False)

    def _render(self, levels: Mapping[int, Decimal], *, ascending: bool) -> list[list[str]]:
        rows = []
        for level in sorted(levels, reverse=not ascending):
            qty = levels[level]
            rows.append(
                [fmt_plain(Decimal(level) * self.scale), "0" if qty == 0 else fmt_plain(qty)]
            )
        return rows


@dataclasses.dataclass
class _Order:
    """A simulated open order walking through created → updated* → finished."""

    order_id: str
    symbol: str
    direction: str
    price: Decimal
    quantity: Decimal
    filled: Decimal
    client_oid: str | None
    create_ts: int


@dataclasses.dataclass
class _Subscription:
    """What one ``<type>_subscribe`` established; ``all_markets`` when params were ``["all"]``."""

    keys: set[str]
    all_markets: bool
    cursor: int = 0

    def params(self) -> list[str]:
        return ["all"] if self.all_markets else sorted(self.keys)


@dataclasses.dataclass
class _Connection:
    connection_id: int
    ws: ServerConnection
    user_id: str
    last_request: float
    send_lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    subscriptions: dict[str, _Subscription] = dataclasses.field(default_factory=dict)
    books: dict[str, _Book] = dataclasses.field(default_factory=dict)
    orders: dict[str, _Order] = dataclasses.field(default_factory=dict)
    private_seq: int = 0
    tasks: list[asyncio.Task[None]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Token:
    user_id: str
    issued_at: float
    used: bool = False


@dataclasses.dataclass
class _Counters:
    tokens_issued: int = 0
    connections_accepted: int = 0
    token_reuse_attempts: int = 0
    token_expired: int = 0
    token_invalid: int = 0
    bad_signatures: int = 0
    invalid_json_closes: int = 0
    error_replies: int = 0
    repeated_subscribe_rejections: int = 0
    idle_closes: int = 0
    pings: int = 0
    dropped_by_test: int = 0
    updates_sent: dict[str, int] = dataclasses.field(default_factory=dict)
    trades_sent: int = 0
    client_requests: int = 0

    def snapshot(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["updates_sent"] = dict(self.updates_sent)
        return data


class _RequestError(Exception):
    """A request the exchange answers with an error envelope (code 1 or 2)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


async def _wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; True if it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


# --------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------


class CryptomusSimulator:
    """A Cryptomus exchange on loopback: WebSocket streams and the REST calls they need.

    Runs in the caller's event loop; every method that is not ``async`` must be called
    from that loop (use :class:`SimulatorThread` to drive it from other threads).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        accounts: Mapping[str, str] | None = None,
        markets: Sequence[MarketSpec] | None = None,
        idle_timeout_s: float = 60.0,
        token_ttl_s: float = 300.0,
        updates_per_second: float = 5.0,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
        log_maxlen: int = 200_000,
    ) -> None:
        _check_non_negative("idle_timeout_s", idle_timeout_s)
        _check_non_negative("token_ttl_s", token_ttl_s)
        _check_non_negative("updates_per_second", updates_per_second)
        self.host = host
        self._requested_port = port
        self.port = port
        self.accounts: dict[str, str] = dict(
            accounts if accounts is not None else {DEFAULT_USER_ID: DEFAULT_API_KEY}
        )
        specs = tuple(markets if markets is not None else DEFAULT_MARKETS)
        if not specs:
            raise ValueError("at least one market is required")
        if len({spec.symbol for spec in specs}) != len(specs):
            raise ValueError("duplicate market symbols")
        self.markets: dict[str, MarketSpec] = {spec.symbol: spec for spec in specs}
        self.currencies: tuple[str, ...] = tuple(
            sorted({spec.base for spec in specs} | {spec.quote for spec in specs})
        )
        self._idle_timeout_s = idle_timeout_s
        self._token_ttl_s = token_ttl_s
        self._updates_per_second = updates_per_second
        self._paused = False
        self._rng = random.Random(seed)
        self._clock = clock
        self._market_state = {s: _MarketState(spec, self._rng) for s, spec in self.markets.items()}
        now_ms = int(clock() * 1000)
        self._wallets = {c: ulid_like(self._rng, now_ms) for c in self.currencies}
        self._balances = {c: self._initial_balance(c) for c in self.currencies}
        self._tokens: dict[str, _Token] = {}
        self._connections: dict[int, _Connection] = {}
        self._next_connection_id = 1
        self._counters = _Counters(updates_sent={t: 0 for t in UPDATE_TYPES})
        self._log: deque[tuple[int, str, str]] = deque(maxlen=log_maxlen)
        self._requests: deque[tuple[int, str | None, Any]] = deque(maxlen=log_maxlen)
        self._server: Server | None = None
        # Replaced (and the old one set) whenever rate, pause or idle timeout changes, so
        # every waiting emitter/watchdog wakes up and re-reads the settings.
        self._settings_changed = asyncio.Event()

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}{WS_PATH}"

    async def start(self) -> None:
        """Bind the port (``port=0`` picks a free one) and start serving."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._settings_changed = asyncio.Event()
        self._server = await serve(
            self._handle_connection,
            self.host,
            self._requested_port,
            process_request=self._process_request,
            ping_interval=None,
            compression=None,
            close_timeout=2,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info("cryptomus simulator listening on %s", self.base_url)

    async def stop(self) -> None:
        """Close every connection (code 1001) and release the port."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()

    async def __aenter__(self) -> CryptomusSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---- control surface (call from the simulator's loop) ----------------------------

    def counters(self) -> dict[str, Any]:
        """Plain-dict snapshot of every counter (``updates_sent`` is type → count)."""
        return self._counters.snapshot()

    def sent_frames(self, type: str | None = None) -> list[str]:
        """Raw text of the logged update frames, optionally of one type (``"depth"``)."""
        return [raw for _, kind, raw in self._log if type is None or kind == type]

    def sent_log(self) -> list[tuple[int, str, str]]:
        """The bounded log itself: ``(connection_id, type, raw_text)``."""
        return list(self._log)

    def active_subscriptions(self) -> list[dict[str, list[str]]]:
        """One dict per open connection (by connection id): type → sorted params."""
        return [
            {kind: sub.params() for kind, sub in sorted(conn.subscriptions.items())}
            for _, conn in sorted(self._connections.items())
        ]

    def connection_requests(self) -> list[tuple[int, str | None, Any]]:
        """Every parsed client request in order: ``(connection_id, method, params)``.

        ``method`` is None and ``params`` whatever was sent when the request was badly
        shaped; text that was not JSON is not a request and is not listed.
        """
        return list(self._requests)

    def open_connections(self) -> int:
        return len(self._connections)

    def issue_token(self, user_id: str = DEFAULT_USER_ID) -> str:
        """Mint a WebSocket token without the REST call (counts as issued)."""
        if user_id not in self.accounts:
            raise KeyError(user_id)
        token = secrets.token_hex(32)
        self._tokens[token] = _Token(user_id=user_id, issued_at=self._clock())
        self._counters.tokens_issued += 1
        return token

    def list_market(self, spec: MarketSpec) -> None:
        """List a new market while running (a new listing, as exchanges do)."""
        if spec.symbol in self.markets:
            raise ValueError(f"{spec.symbol} is already listed")
        self.markets[spec.symbol] = spec
        self._market_state[spec.symbol] = _MarketState(spec, self._rng)
        now_ms = int(self._clock() * 1000)
        for currency in (spec.base, spec.quote):
            if currency not in self.currencies:
                self.currencies = tuple(sorted((*self.currencies, currency)))
                self._wallets[currency] = ulid_like(self._rng, now_ms)
                self._balances[currency] = self._initial_balance(currency)

    def drop_connections(self) -> int:
        """Abort every open connection's transport (no close frame); return how many."""
        dropped = 0
        for conn in list(self._connections.values()):
            transport = conn.ws.transport
            if transport is not None and not transport.is_closing():
                transport.abort()
                dropped += 1
        self._counters.dropped_by_test += dropped
        return dropped

    async def inject_raw(self, text: str) -> int:
        """Send ``text`` verbatim to every open connection; return how many got it."""
        delivered = 0
        for conn in list(self._connections.values()):
            async with conn.send_lock:
                try:
                    await conn.ws.send(text)
                except ConnectionClosed:
                    continue
            delivered += 1
        return delivered

    def set_idle_timeout(self, seconds: float) -> None:
        """Change the idle close delay for every connection (``math.inf`` disables it)."""
        _check_non_negative("idle timeout", seconds)
        self._idle_timeout_s = seconds
        self._notify_settings_changed()

    def set_updates_per_second(self, rate: float) -> None:
        """Updates per second per subscribed type on each connection (0 = none)."""
        _check_non_negative("updates_per_second", rate)
        self._updates_per_second = rate
        self._notify_settings_changed()

    def pause_updates(self) -> None:
        """Stop the update generators (depth snapshots on subscribe are still sent)."""
        self._paused = True
        self._notify_settings_changed()

    def resume_updates(self) -> None:
        self._paused = False
        self._notify_settings_changed()

    async def send_burst(self, count: int, rate: float | None = None) -> list[tuple[int, str, int]]:
        """Load generator: send ``count`` update frames on the one open connection.

        Frames are built first (the same builders as the periodic emitter, round-robin
        over the connection's subscribed types and keys), then sent at ``rate`` frames/s
        (``None``: as fast as the client reads them; TCP back-pressure slows the loop).
        Returns ``(send_time_ns, type, records)`` per frame in send order, where
        ``send_time_ns`` is ``time.monotonic_ns()`` just before the frame was handed to
        the socket and ``records`` is the number of events in it (trades per trade frame).
        The list is shorter than ``count`` when the client closed the connection.
        """
        if count < 0 or (rate is not None and rate <= 0):
            raise ValueError("count must be >= 0 and rate > 0 (or None)")
        if len(self._connections) != 1:
            raise RuntimeError(f"need exactly one open connection, have {len(self._connections)}")
        conn = next(iter(self._connections.values()))
        kinds = [k for k in UPDATE_TYPES if k in conn.subscriptions and conn.subscriptions[k].keys]
        if not kinds:
            raise RuntimeError("the connection has no subscriptions")
        frames: list[tuple[str, str, int]] = []
        for i in range(count):
            kind = kinds[i % len(kinds)]
            sub = conn.subscriptions[kind]
            keys = sorted(sub.keys)
            key = keys[sub.cursor % len(keys)]
            sub.cursor += 1
            text, trades = self._build_update(conn, kind, key)
            frames.append((text, kind, trades))
        sent: list[tuple[int, str, int]] = []
        clock = time.monotonic_ns
        start = clock()
        interval_ns = 0 if rate is None else 1e9 / rate
        async with conn.send_lock:
            for i, (text, frame_kind, trades) in enumerate(frames):
                if interval_ns:
                    due = start + int(i * interval_ns)
                    now = clock()
                    if due > now + 200_000:  # sleep only when >0.2 ms early: batch the rest
                        await asyncio.sleep((due - now) / 1e9)
                stamp = clock()
                try:
                    await conn.ws.send(text)
                except ConnectionClosed:
                    break  # the client went away: the caller sees a short list
                sent.append((stamp, frame_kind, trades or 1))
                self._log.append((conn.connection_id, frame_kind, text))
                updates = self._counters.updates_sent
                updates[frame_kind] = updates.get(frame_kind, 0) + 1
                self._counters.trades_sent += trades
        return sent

    async def wait_for_connections(self, n: int, timeout: float) -> int:
        """Wait until at least ``n`` connections were accepted in total; return the count."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._counters.connections_accepted < n:
            if loop.time() >= deadline:
                raise TimeoutError(
                    f"{self._counters.connections_accepted} connections accepted, wanted {n}"
                )
            await asyncio.sleep(0.01)
        return self._counters.connections_accepted

    def _notify_settings_changed(self) -> None:
        old, self._settings_changed = self._settings_changed, asyncio.Event()
        old.set()

    # ---- HTTP side -------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer REST GETs with JSON; gate the ``/ws`` handshake on the token."""
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        if url.path == WS_PATH:
            return self._check_ws_token(connection, request, query)
        if url.path == TOKEN_PATH:
            return self._token_endpoint(request)
        if url.path in MARKETS_PATHS:
            entries = [spec.market_list_entry() for spec in self.markets.values()]
            return _json_response(http.HTTPStatus.OK, {"result": entries})
        if url.path == SCALES_PATH:
            return self._scales_endpoint(query)
        return _json_response(http.HTTPStatus.NOT_FOUND, {"message": "Not found"})

    def _check_ws_token(
        self, connection: ServerConnection, request: Request, query: Mapping[str, list[str]]
    ) -> Response | None:
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            return _json_response(
                http.HTTPStatus.UPGRADE_REQUIRED, {"message": "WebSocket upgrade required"}
            )
        token_text = (query.get("token") or [""])[0]
        token = self._tokens.get(token_text)
        if token is None:
            self._counters.token_invalid += 1
            return _json_response(http.HTTPStatus.UNAUTHORIZED, {"message": "Invalid token"})
        if token.used:
            self._counters.token_reuse_attempts += 1
            return _json_response(http.HTTPStatus.UNAUTHORIZED, {"message": "Token already used"})
        if self._clock() - token.issued_at > self._token_ttl_s:
            self._counters.token_expired += 1
            return _json_response(http.HTTPStatus.UNAUTHORIZED, {"message": "Token expired"})
        # Consumed at the handshake: process_request and the 101 response run without
        # yielding, so two handshakes racing on one token cannot both pass.
        token.used = True
        connection.username = token.user_id
        return None

    def _token_endpoint(self, request: Request) -> Response:
        user_id = request.headers.get("userId")
        api_key = self.accounts.get(user_id) if user_id else None
        if user_id is None or api_key is None:
            return _json_response(http.HTTPStatus.NOT_FOUND, {"message": "Not found"})
        claimed = request.headers.get("sign", "")
        # websockets' HTTP parser refuses request bodies, so a GET always signs b"".
        if not claimed or not signature_matches(b"", api_key, claimed):
            self._counters.bad_signatures += 1
            return _json_response(http.HTTPStatus.UNAUTHORIZED, {"message": "Invalid Sign."})
        return _json_response(http.HTTPStatus.OK, {"token": self.issue_token(user_id)})

    def _scales_endpoint(self, query: Mapping[str, list[str]]) -> Response:
        symbol = (query.get("symbol") or [""])[0]
        if not symbol:
            return _json_response(
                http.HTTPStatus.BAD_REQUEST,
                {"status": "error", "message": "The symbol field is required."},
            )
        spec = self.markets.get(symbol)
        if spec is None:
            return _json_response(
                http.HTTPStatus.NOT_FOUND, {"status": "error", "message": "Symbol not found"}
            )
        data = [{"scale": fmt_plain(scale), "index": i} for i, scale in enumerate(spec.scales)]
        return _json_response(
            http.HTTPStatus.OK, {"status": "success", "message": "success", "data": data}
        )

    # ---- WebSocket side --------------------------------------------------------------

    async def _handle_connection(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        conn = _Connection(
            connection_id=self._next_connection_id,
            ws=ws,
            user_id=getattr(ws, "username", ""),
            last_request=loop.time(),
        )
        self._next_connection_id += 1
        self._connections[conn.connection_id] = conn
        self._counters.connections_accepted += 1
        conn.tasks = [
            asyncio.create_task(self._guarded(conn, self._emit_loop(conn))),
            asyncio.create_task(self._guarded(conn, self._idle_watchdog(conn))),
        ]
        try:
            async for message in ws:
                conn.last_request = loop.time()
                self._counters.client_requests += 1
                if not await self._on_message(conn, message):
                    break
        except ConnectionClosed:
            pass
        finally:
            self._connections.pop(conn.connection_id, None)
            for task in conn.tasks:
                task.cancel()
            await asyncio.gather(*conn.tasks, return_exceptions=True)

    @staticmethod
    async def _guarded(conn: _Connection, work: Coroutine[Any, Any, None]) -> None:
        """Run a per-connection task; a closed socket ends it, a bug is logged, not lost."""
        try:
            await work
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("simulator task failed on connection %d", conn.connection_id)

    async def _on_message(self, conn: _Connection, message: str | bytes) -> bool:
        """Handle one client frame; False when the connection was closed for it."""
        try:
            request = json.loads(message, parse_float=Decimal, parse_constant=_reject_constant)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self._counters.invalid_json_closes += 1
            await conn.ws.close(1003, "invalid json")
            return False

        request_id: Any = None
        method: str | None = None
        try:
            if not isinstance(request, dict):
                self._requests.append((conn.connection_id, None, None))
                raise _RequestError(ERR_FORMAT, "Invalid message format")
            raw_id = request.get("id")
            raw_method = request.get("method")
            params = request.get("params")
            request_id = raw_id if _is_request_id(raw_id) else None
            method = raw_method if isinstance(raw_method, str) else None
            self._requests.append((conn.connection_id, method, params))
            if request_id is None or method is None or not isinstance(params, list):
                raise _RequestError(ERR_FORMAT, "Invalid message format")
            await self._dispatch(conn, request_id, method, params)
        except _RequestError as exc:
            self._counters.error_replies += 1
            reply = {
                "id": request_id,
                "method": method,
                "data": None,
                "error": {"code": exc.code, "message": exc.message},
            }
            await self._send(conn, _dumps(reply))
        return True

    async def _dispatch(
        self, conn: _Connection, request_id: int | str, method: str, params: list[Any]
    ) -> None:
        """Route a well-formed request; raises :class:`_RequestError` to answer an error."""
        if method == "ping":
            self._counters.pings += 1
            await self._send(
                conn, _dumps({"id": request_id, "method": "pong", "data": None, "error": None})
            )
            return
        match = _METHOD_RE.match(method)
        if match is None:
            raise _RequestError(ERR_OTHER, f"Unknown method: {method}")
        kind, action = match.group(1), match.group(2)
        if not all(isinstance(p, str) for p in params):
            raise _RequestError(ERR_FORMAT, "Invalid message format")
        if action == "subscribe":
            await self._subscribe(conn, request_id, kind, params)
        else:
            await self._unsubscribe(conn, request_id, kind, params)

    def _all_keys(self, kind: str) -> list[str]:
        if kind == "balance":
            return list(self.currencies)
        if kind == "depth":
            return [
                f"{symbol}:{i}"
                for symbol, spec in self.markets.items()
                for i in range(len(spec.scales))
            ]
        return list(self.markets)

    def _validate_key(self, kind: str, key: str) -> None:
        if kind == "balance":
            if key not in self.currencies:
                raise _RequestError(ERR_OTHER, f"Unknown currency: {key}")
            return
        if kind == "depth":
            match = _DEPTH_PARAM_RE.match(key)
            if match is None:
                raise _RequestError(ERR_OTHER, f"Invalid depth param (want MARKET:scale): {key}")
            spec = self.markets.get(match.group(1))
            if spec is None:
                raise _RequestError(ERR_OTHER, f"Unknown market: {match.group(1)}")
            if int(match.group(2)) >= len(spec.scales):
                raise _RequestError(ERR_OTHER, f"Unknown scale index: {key}")
            return
        if key not in self.markets:
            raise _RequestError(ERR_OTHER, f"Unknown market: {key}")

    def _resolve_params(self, kind: str, params: list[str]) -> tuple[set[str], bool]:
        """Validate every param before touching state: a bad one rejects the request."""
        if "all" in params:
            return set(self._all_keys(kind)), True
        for key in params:
            self._validate_key(kind, key)
        return set(params), False

    async def _subscribe(
        self, conn: _Connection, request_id: int | str, kind: str, params: list[str]
    ) -> None:
        if kind in conn.subscriptions:
            self._counters.repeated_subscribe_rejections += 1
            raise _RequestError(ERR_OTHER, "already subscribed")
        if not params:
            raise _RequestError(ERR_OTHER, "params must list at least one market or 'all'")
        keys, all_markets = self._resolve_params(kind, params)
        reply = {
            "id": request_id,
            "method": f"{kind}_subscribe",
            "data": {"status": "success"},
            "error": None,
        }
        # Under the send lock: the emitter must not send a partial depth update for a
        # book before the client has its snapshot.
        async with conn.send_lock:
            conn.subscriptions[kind] = _Subscription(keys=keys, all_markets=all_markets)
            await conn.ws.send(_dumps(reply))
            if kind == "depth":
                for key in sorted(keys):
                    await self._send_update(conn, kind, self._depth_frame(conn, key, True))

    async def _unsubscribe(
        self, conn: _Connection, request_id: int | str, kind: str, params: list[str]
    ) -> None:
        if not params and kind not in _EMPTY_MEANS_ALL:
            raise _RequestError(ERR_OTHER, "params must list at least one market or 'all'")
        sub = conn.subscriptions.get(kind)
        if not params or "all" in params:
            removed = set(sub.keys) if sub else set()
            conn.subscriptions.pop(kind, None)
        else:
            keys, _ = self._resolve_params(kind, params)
            removed = keys & sub.keys if sub else set()
            if sub is not None:
                sub.keys -= keys
                sub.all_markets = False
                if not sub.keys:
                    del conn.subscriptions[kind]
        if kind == "depth":
            for key in removed:
                conn.books.pop(key, None)
        elif kind == "order":
            for key in removed:
                conn.orders.pop(key, None)
        # As published: the unsubscribe answer has no "method".
        await self._send(
            conn, _dumps({"id": request_id, "data": {"status": "success"}, "error": None})
        )

    async def _send(self, conn: _Connection, text: str) -> None:
        async with conn.send_lock:
            await conn.ws.send(text)

    async def _send_update(self, conn: _Connection, kind: str, frame: tuple[str, int]) -> None:
        """Send one update frame (caller holds the send lock) and log/count it."""
        text, trades = frame
        await conn.ws.send(text)
        self._log.append((conn.connection_id, kind, text))
        self._counters.updates_sent[kind] = self._counters.updates_sent.get(kind, 0) + 1
        self._counters.trades_sent += trades

    # ---- background tasks ------------------------------------------------------------

    async def _idle_watchdog(self, conn: _Connection) -> None:
        """Close the connection once no client request arrived for the idle timeout."""
        loop = asyncio.get_running_loop()
        while True:
            changed = self._settings_changed
            remaining = conn.last_request + self._idle_timeout_s - loop.time()
            if remaining <= 0:
                self._counters.idle_closes += 1
                logger.info("closing idle connection %d", conn.connection_id)
                await conn.ws.close(1000, "idle timeout")
                return
            await _wait_event(changed, remaining if math.isfinite(remaining) else None)

    async def _emit_loop(self, conn: _Connection) -> None:
        """Emit one update per subscribed type per tick, ``updates_per_second`` ticks/s."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while True:
                changed = self._settings_changed
                rate = self._updates_per_second
                if self._paused or rate <= 0:
                    await changed.wait()
                    next_at = loop.time()
                    continue
                next_at += 1.0 / rate
                now = loop.time()
                if next_at < now - 1.0:  # fell far behind (slow client): drop the backlog
                    next_at = now
                if next_at > now and await _wait_event(changed, next_at - now):
                    next_at = loop.time()
                    continue
                await self._emit_tick(conn)
        except ConnectionClosed:
            return

    async def _emit_tick(self, conn: _Connection) -> None:
        async with conn.send_lock:
            for kind in UPDATE_TYPES:
                sub = conn.subscriptions.get(kind)
                if sub is None or not sub.keys:
                    continue
                keys = sorted(sub.keys)
                key = keys[sub.cursor % len(keys)]
                sub.cursor += 1
                await self._send_update(conn, kind, self._build_update(conn, kind, key))

    # ---- frame builders --------------------------------------------------------------

    def _now(self) -> int:
        return int(self._clock())

    def _build_update(self, conn: _Connection, kind: str, key: str) -> tuple[str, int]:
        """Return ``(frame_text, number_of_trades)`` for one update of ``kind``."""
        if kind == "depth":
            return self._depth_frame(conn, key, key not in conn.books)
        if kind == "trade":
            return self._trade_frame(key)
        if kind == "lastprice":
            return self._public_frame(kind, self._lastprice_data(key)), 0
        if kind == "ticker":
            return self._public_frame(kind, self._ticker_data(key)), 0
        if kind == "order":
            return self._private_frame(conn, kind, self._order_data(conn, key)), 0
        if kind == "balance":
            return self._private_frame(conn, kind, self._balance_data(key)), 0
        return self._private_frame(conn, kind, self._deal_data(key)), 0

    @staticmethod
    def _public_frame(kind: str, data: dict[str, Any]) -> str:
        return _dumps({"id": 0, "method": f"{kind}_update", "data": data, "error": None})

    @staticmethod
    def _private_frame(conn: _Connection, kind: str, data: dict[str, Any]) -> str:
        # Private updates carry a string id, as in every published example.
        conn.private_seq += 1
        return _dumps(
            {"id": str(conn.private_seq), "method": f"{kind}_update", "data": data, "error": None}
        )

    def _lastprice_data(self, symbol: str) -> dict[str, Any]:
        state = self._market_state[symbol]
        price = state.step()
        return {"symbol": symbol, "timestamp": self._now(), "price": fmt_plain(price)}

    def _ticker_data(self, symbol: str) -> dict[str, Any]:
        state = self._market_state[symbol]
        price = state.step()
        state.add_volume(state.random_qty(), price)
        change = ((price - state.open) * 100 / state.open).quantize(Decimal("0.01"), context=_CTX)
        if change.is_zero():
            change = abs(change)  # "0.00", not "-0.00"
        return {
            "symbol": symbol,
            "timestamp": self._now(),
            "price": fmt_plain(price),
            "open": fmt_plain(state.open),
            "high": fmt_plain(state.high),
            "low": fmt_plain(state.low),
            "volume": fmt_plain(state.volume.quantize(state.spec.qty_quantum, context=_CTX)),
            "quote_volume": fmt_plain(state.quote_volume.quantize(_Q8, context=_CTX)),
            "price_change": fmt_plain(change),
        }

    def _depth_frame(self, conn: _Connection, key: str, full_reload: bool) -> tuple[str, int]:
        symbol, _, index_text = key.rpartition(":")
        index = int(index_text)
        book = conn.books.get(key)
        if book is None:
            state = self._market_state[symbol]
            book = _Book(state, state.spec.scales[index], self._rng)
            conn.books[key] = book
            full_reload = True
        asks, bids = book.snapshot() if full_reload else book.partial()
        data = {
            "symbol": symbol,
            "timestamp": self._now(),
            "full_reload": full_reload,
            "scale_index": index,
            "asks": asks,
            "bids": bids,
        }
        return self._public_frame("depth", data), 0

    def _trade_quantity(self, state: _MarketState) -> str:
        """Mostly plain sizes; sometimes the 1e-8 dust and trailing-zero forms seen live."""
        roll = self._rng.random()
        if roll < 0.07:
            return fmt_plain(_TINY_QTY)
        if roll < 0.17:
            return fmt_plain((Decimal(self._rng.randint(1, 49)) / 10).quantize(Decimal("0.01")))
        return fmt_number(state.random_qty())

    def _trade_frame(self, symbol: str) -> tuple[str, int]:
        """Trade update with JSON *numbers*, so the text is assembled by hand."""
        state = self._market_state[symbol]
        state.step()
        now = self._now()
        parts = []
        count = self._rng.randint(1, 3)
        for _ in range(count):
            price = state.near_price()
            quantity = self._trade_quantity(state)
            state.add_volume(Decimal(quantity), price)
            direction = "buy" if self._rng.random() < 0.5 else "sell"
            parts.append(
                f'{{"price":{fmt_plain(price)},"quantity":{quantity},'
                f'"timestamp":{now},"direction":"{direction}"}}'
            )
        text = (
            f'{{"id":0,"method":"trade_update","data":{{"symbol":{_dumps(symbol)},'
            f'"timestamp":{now},"trades":[{",".join(parts)}]}},"error":null}}'
        )
        return text, count

    def _order_data(self, conn: _Connection, symbol: str) -> dict[str, Any]:
        """Advance this connection's order on ``symbol``: create, fill partly, finish."""
        state = self._market_state[symbol]
        now = self._now()
        order = conn.orders.get(symbol)
        if order is None:
            order = _Order(
                order_id=ulid_like(self._rng, int(self._clock() * 1000)),
                symbol=symbol,
                direction="buy" if self._rng.random() < 0.5 else "sell",
                price=state.near_price(20),
                quantity=state.random_qty(),
                filled=Decimal(0),
                client_oid=self._client_oid(),
                create_ts=now,
            )
            conn.orders[symbol] = order
            return {"type": "created", "info": self._order_info(order)}
        remaining_units = int((order.quantity - order.filled) / state.spec.qty_quantum)
        if remaining_units > 1 and self._rng.random() < 0.6:
            fill_units = self._rng.randint(1, remaining_units - 1)
            order.filled += Decimal(fill_units) * state.spec.qty_quantum
            info = self._order_info(order)
            info["updateTs"] = now
            return {"type": "updated", "info": info}
        del conn.orders[symbol]
        cancelled = self._rng.random() < 0.25
        if not cancelled:
            order.filled = order.quantity
        info = self._order_info(order)
        info["finishTs"] = now
        info["state"] = "cancelled" if cancelled else "completed"
        info["internalState"] = "cancelled" if cancelled else "filled"
        return {"type": "finished", "info": info}

    def _client_oid(self) -> str | None:
        """Half the orders carry a client id; the published examples show ``null``."""
        return None if self._rng.random() < 0.5 else f"sim-{self._rng.randrange(10**9)}"

    @staticmethod
    def _order_info(order: _Order) -> dict[str, Any]:
        return {
            "id": order.order_id,
            "symbol": order.symbol,
            "orderType": "limit",
            "direction": order.direction,
            "price": fmt16(order.price),
            "quantity": fmt16(order.quantity),
            "value": fmt16(order.price * order.quantity),
            "filledQuantity": fmt16(order.filled),
            "filledValue": fmt16(order.price * order.filled),
            "clientOid": order.client_oid,
            "createTs": order.create_ts,
        }

    def _initial_balance(self, currency: str) -> Decimal:
        for spec in self.markets.values():
            if spec.base == currency:
                return spec.typical_qty * 20
        return Decimal("40000")

    def _balance_data(self, currency: str) -> dict[str, Any]:
        """A wallet movement; ``newBalance`` has 8 decimals, as in the published example."""
        typical = self._initial_balance(currency) / 20
        units = int(typical / _Q8)
        amount = Decimal(self._rng.randint(max(1, units // 50), units)) * _Q8
        old = self._balances[currency]
        new = old + amount if (self._rng.random() < 0.5 or amount > old) else old - amount
        self._balances[currency] = new
        return {
            "info": {
                "walletId": self._wallets[currency],
                "currencyCode": currency,
                "amount": fmt16(amount),
                "oldBalance": fmt16(old),
                "newBalance": format(new.quantize(_Q8, context=_CTX), "f"),
            }
        }

    def _deal_data(self, symbol: str) -> dict[str, Any]:
        state = self._market_state[symbol]
        price = state.near_price()
        qty = state.random_qty()
        value = price * qty
        maker = self._rng.random() < 0.5
        fee = (value * (Decimal("0.0008") if maker else Decimal("0.001"))).quantize(
            _Q8, context=_CTX
        )
        now_ms = int(self._clock() * 1000)
        return {
            "info": {
                "dealId": ulid_like(self._rng, now_ms),
                "symbol": symbol,
                "dealState": "completed",
                "transactionId": ulid_like(self._rng, now_ms),
                "filledPrice": fmt16(price),
                "filledQuantity": fmt16(qty),
                "filledValue": fmt16(value),
                "fee": fmt16(fee),
                "feeCurrency": state.spec.quote,
                "tradeRole": "maker" if maker else "taker",
                "committedAt": self._now(),
            }
        }


def _check_non_negative(name: str, value: float) -> None:
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _json_response(status: http.HTTPStatus, payload: object) -> Response:
    body = _dumps(payload).encode("utf-8")
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", "application/json"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


# --------------------------------------------------------------------------------------
# Thread wrapper for synchronous callers
# --------------------------------------------------------------------------------------


class SimulatorThread:
    """A :class:`CryptomusSimulator` on its own event loop in a daemon thread.

    Synchronous tests and benchmarks use this; every method hops into the simulator's
    loop (``run_coroutine_threadsafe``), which owns all state, and waits for the answer.
    """

    def __init__(self, *, call_timeout: float = 10.0, **options: Any) -> None:
        self._options = options
        self._call_timeout = call_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._simulator: CryptomusSimulator | None = None

    @property
    def simulator(self) -> CryptomusSimulator:
        if self._simulator is None:
            raise RuntimeError("simulator thread not started")
        return self._simulator

    @property
    def port(self) -> int:
        return self.simulator.port

    @property
    def base_url(self) -> str:
        return self.simulator.base_url

    @property
    def ws_url(self) -> str:
        return self.simulator.ws_url

    @property
    def accounts(self) -> dict[str, str]:
        return dict(self.simulator.accounts)

    def start(self) -> SimulatorThread:
        if self._thread is not None:
            raise RuntimeError("simulator thread already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="cryptomus-simulator", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._simulator = CryptomusSimulator(**self._options)
            self._submit(self._simulator.start())
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        try:
            if self._simulator is not None:
                self._submit(self._simulator.stop())
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=self._call_timeout)
        if not thread.is_alive():
            loop.close()

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _submit(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("simulator thread not running")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self._call_timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def _call(self, fn: Callable[[], _T]) -> _T:
        async def run() -> _T:
            return fn()

        return self._submit(run())

    # ---- forwarded control surface ---------------------------------------------------

    def counters(self) -> dict[str, Any]:
        return self._call(self.simulator.counters)

    def sent_frames(self, type: str | None = None) -> list[str]:
        return self._call(lambda: self.simulator.sent_frames(type))

    def sent_log(self) -> list[tuple[int, str, str]]:
        return self._call(self.simulator.sent_log)

    def active_subscriptions(self) -> list[dict[str, list[str]]]:
        return self._call(self.simulator.active_subscriptions)

    def connection_requests(self) -> list[tuple[int, str | None, Any]]:
        return self._call(self.simulator.connection_requests)

    def open_connections(self) -> int:
        return self._call(self.simulator.open_connections)

    def issue_token(self, user_id: str = DEFAULT_USER_ID) -> str:
        return self._call(lambda: self.simulator.issue_token(user_id))

    def list_market(self, spec: MarketSpec) -> None:
        self._call(lambda: self.simulator.list_market(spec))

    def drop_connections(self) -> int:
        return self._call(self.simulator.drop_connections)

    def inject_raw(self, text: str) -> int:
        return self._submit(self.simulator.inject_raw(text))

    def set_idle_timeout(self, seconds: float) -> None:
        self._call(lambda: self.simulator.set_idle_timeout(seconds))

    def set_updates_per_second(self, rate: float) -> None:
        self._call(lambda: self.simulator.set_updates_per_second(rate))

    def pause_updates(self) -> None:
        self._call(self.simulator.pause_updates)

    def resume_updates(self) -> None:
        self._call(self.simulator.resume_updates)

    def wait_for_connections(self, n: int, timeout: float) -> int:
        return self._submit(self.simulator.wait_for_connections(n, timeout), timeout + 5.0)

    def send_burst(
        self, count: int, rate: float | None = None, timeout: float = 600.0
    ) -> list[tuple[int, str, int]]:
        return self._submit(self.simulator.send_burst(count, rate), timeout)


# --------------------------------------------------------------------------------------
# CLI entry (``exchange-connectors simulate cryptomus --port N``)
# --------------------------------------------------------------------------------------


async def serve_forever(port: int, **options: Any) -> None:
    """Run a simulator on ``port`` until SIGINT/SIGTERM, printing how to reach it."""
    simulator = CryptomusSimulator(port=port, **options)
    await simulator.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread / platform
            pass
    for line in _banner(simulator):
        print(line, flush=True)
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await simulator.stop()


def _banner(simulator: CryptomusSimulator) -> Iterable[str]:
    yield "Cryptomus simulator running (Ctrl-C to stop)"
    yield f"  REST base URL : {simulator.base_url}"
    yield f"  WebSocket URL : {simulator.ws_url}?token=<token>"
    for user_id, api_key in simulator.accounts.items():
        yield f"  user id       : {user_id}"
        yield f"  api key       : {api_key}"
    yield f"  markets       : {', '.join(simulator.markets)}"


def main(port: int, updates_per_second: float = 5.0, host: str = "127.0.0.1") -> int:
    """Blocking CLI entry point; returns the process exit code."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(port, host=host, updates_per_second=updates_per_second))
    return 0
