"""The Cryptomus market model: prices, books, orders, wallets, and the updates it publishes.

Why it is apart: what the market does (random walks, books moving with the price, orders
filling, wallets moving) is one concern; who may see it (tokens, subscriptions: ``rules``)
and how it travels (``server``) are others.

Update frames follow the published shapes, quirks included: ``trade`` prices and
quantities are JSON *numbers* (the frame text is built by hand so they come out exactly
as intended, e.g. ``107100.01``, ``0.00000001``, ``2.50``); private channels use a string
``id`` and 16-decimal strings. Every decimal is produced with :class:`decimal.Decimal`
from integer random walks, never from ``float``.

Everything here runs on the simulator's event loop and takes no locks.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Mapping, Sequence
from decimal import ROUND_FLOOR, Context, Decimal
from typing import Any, Final

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


def dumps(payload: object) -> str:
    """Compact JSON, as the exchange writes it."""
    return json.dumps(payload, separators=(",", ":"))


# --------------------------------------------------------------------------------------
# Mutable simulation state (owned by the event loop)
# --------------------------------------------------------------------------------------


class MarketState:
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


class Book:
    """One connection's order book for one market and scale.

    Kept per connection so every partial update a client receives applies to the exact
    snapshot it received: a consumer that applies the frames in order rebuilds this book.
    Levels are integer multiples of the scale (``level * scale`` is the price).
    """

    def __init__(self, market: MarketState, scale: Decimal, rng: random.Random) -> None:
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
class Order:
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
class Feed:
    """What one connection was shown: its books and orders build on what it saw before.

    Books are kept per connection so every partial depth update a client receives
    applies to the exact snapshot it received; private frames count their own ids.
    """

    books: dict[str, Book] = dataclasses.field(default_factory=dict)
    orders: dict[str, Order] = dataclasses.field(default_factory=dict)
    private_seq: int = 0


# --------------------------------------------------------------------------------------
# The market and its updates
# --------------------------------------------------------------------------------------


class Market:
    """Every listed market, the account's wallets, and the update frames built on them.

    One seeded :class:`random.Random` drives it all, so a seed replays the same data
    for the same sequence of calls.
    """

    def __init__(
        self,
        markets: Sequence[MarketSpec],
        rng: random.Random,
        clock: Callable[[], float],
    ) -> None:
        specs = tuple(markets)
        if not specs:
            raise ValueError("at least one market is required")
        if len({spec.symbol for spec in specs}) != len(specs):
            raise ValueError("duplicate market symbols")
        self.markets: dict[str, MarketSpec] = {spec.symbol: spec for spec in specs}
        self.currencies: tuple[str, ...] = tuple(
            sorted({spec.base for spec in specs} | {spec.quote for spec in specs})
        )
        self._rng = rng
        self._clock = clock
        self.states = {s: MarketState(spec, rng) for s, spec in self.markets.items()}
        now_ms = int(clock() * 1000)
        self.wallets = {c: ulid_like(rng, now_ms) for c in self.currencies}
        self.balances = {c: self.initial_balance(c) for c in self.currencies}

    def list_market(self, spec: MarketSpec) -> None:
        """List a new market while running (a new listing, as exchanges do)."""
        if spec.symbol in self.markets:
            raise ValueError(f"{spec.symbol} is already listed")
        self.markets[spec.symbol] = spec
        self.states[spec.symbol] = MarketState(spec, self._rng)
        now_ms = int(self._clock() * 1000)
        for currency in (spec.base, spec.quote):
            if currency not in self.currencies:
                self.currencies = tuple(sorted((*self.currencies, currency)))
                self.wallets[currency] = ulid_like(self._rng, now_ms)
                self.balances[currency] = self.initial_balance(currency)

    # ---- frame builders --------------------------------------------------------------

    def now(self) -> int:
        return int(self._clock())

    def build_update(self, feed: Feed, kind: str, key: str) -> tuple[str, int]:
        """Return ``(frame_text, number_of_trades)`` for one update of ``kind``."""
        if kind == "depth":
            return self.depth_frame(feed, key, key not in feed.books)
        if kind == "trade":
            return self._trade_frame(key)
        if kind == "lastprice":
            return self._public_frame(kind, self._lastprice_data(key)), 0
        if kind == "ticker":
            return self._public_frame(kind, self._ticker_data(key)), 0
        if kind == "order":
            return self._private_frame(feed, kind, self._order_data(feed, key)), 0
        if kind == "balance":
            return self._private_frame(feed, kind, self._balance_data(key)), 0
        return self._private_frame(feed, kind, self._deal_data(key)), 0

    @staticmethod
    def _public_frame(kind: str, data: dict[str, Any]) -> str:
        return dumps({"id": 0, "method": f"{kind}_update", "data": data, "error": None})

    @staticmethod
    def _private_frame(feed: Feed, kind: str, data: dict[str, Any]) -> str:
        # Private updates carry a string id, as in every published example.
        feed.private_seq += 1
        return dumps(
            {"id": str(feed.private_seq), "method": f"{kind}_update", "data": data, "error": None}
        )

    def _lastprice_data(self, symbol: str) -> dict[str, Any]:
        state = self.states[symbol]
        price = state.step()
        return {"symbol": symbol, "timestamp": self.now(), "price": fmt_plain(price)}

    def _ticker_data(self, symbol: str) -> dict[str, Any]:
        state = self.states[symbol]
        price = state.step()
        state.add_volume(state.random_qty(), price)
        change = ((price - state.open) * 100 / state.open).quantize(Decimal("0.01"), context=_CTX)
        if change.is_zero():
            change = abs(change)  # "0.00", not "-0.00"
        return {
            "symbol": symbol,
            "timestamp": self.now(),
            "price": fmt_plain(price),
            "open": fmt_plain(state.open),
            "high": fmt_plain(state.high),
            "low": fmt_plain(state.low),
            "volume": fmt_plain(state.volume.quantize(state.spec.qty_quantum, context=_CTX)),
            "quote_volume": fmt_plain(state.quote_volume.quantize(_Q8, context=_CTX)),
            "price_change": fmt_plain(change),
        }

    def depth_frame(self, feed: Feed, key: str, full_reload: bool) -> tuple[str, int]:
        symbol, _, index_text = key.rpartition(":")
        index = int(index_text)
        book = feed.books.get(key)
        if book is None:
            state = self.states[symbol]
            book = Book(state, state.spec.scales[index], self._rng)
            feed.books[key] = book
            full_reload = True
        asks, bids = book.snapshot() if full_reload else book.partial()
        data = {
            "symbol": symbol,
            "timestamp": self.now(),
            "full_reload": full_reload,
            "scale_index": index,
            "asks": asks,
            "bids": bids,
        }
        return self._public_frame("depth", data), 0

    def _trade_quantity(self, state: MarketState) -> str:
        """Mostly plain sizes; sometimes the 1e-8 dust and trailing-zero forms seen live."""
        roll = self._rng.random()
        if roll < 0.07:
            return fmt_plain(_TINY_QTY)
        if roll < 0.17:
            return fmt_plain((Decimal(self._rng.randint(1, 49)) / 10).quantize(Decimal("0.01")))
        return fmt_number(state.random_qty())

    def _trade_frame(self, symbol: str) -> tuple[str, int]:
        """Trade update with JSON *numbers*, so the text is assembled by hand."""
        state = self.states[symbol]
        state.step()
        now = self.now()
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
            f'{{"id":0,"method":"trade_update","data":{{"symbol":{dumps(symbol)},'
            f'"timestamp":{now},"trades":[{",".join(parts)}]}},"error":null}}'
        )
        return text, count

    def _order_data(self, feed: Feed, symbol: str) -> dict[str, Any]:
        """Advance this connection's order on ``symbol``: create, fill partly, finish."""
        state = self.states[symbol]
        now = self.now()
        order = feed.orders.get(symbol)
        if order is None:
            order = Order(
                order_id=ulid_like(self._rng, int(self._clock() * 1000)),
                symbol=symbol,
                direction="buy" if self._rng.random() < 0.5 else "sell",
                price=state.near_price(20),
                quantity=state.random_qty(),
                filled=Decimal(0),
                client_oid=self._client_oid(),
                create_ts=now,
            )
            feed.orders[symbol] = order
            return {"type": "created", "info": self._order_info(order)}
        remaining_units = int((order.quantity - order.filled) / state.spec.qty_quantum)
        if remaining_units > 1 and self._rng.random() < 0.6:
            fill_units = self._rng.randint(1, remaining_units - 1)
            order.filled += Decimal(fill_units) * state.spec.qty_quantum
            info = self._order_info(order)
            info["updateTs"] = now
            return {"type": "updated", "info": info}
        del feed.orders[symbol]
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
    def _order_info(order: Order) -> dict[str, Any]:
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

    def initial_balance(self, currency: str) -> Decimal:
        for spec in self.markets.values():
            if spec.base == currency:
                return spec.typical_qty * 20
        return Decimal("40000")

    def _balance_data(self, currency: str) -> dict[str, Any]:
        """A wallet movement; ``newBalance`` has 8 decimals, as in the published example."""
        typical = self.initial_balance(currency) / 20
        units = int(typical / _Q8)
        amount = Decimal(self._rng.randint(max(1, units // 50), units)) * _Q8
        old = self.balances[currency]
        new = old + amount if (self._rng.random() < 0.5 or amount > old) else old - amount
        self.balances[currency] = new
        return {
            "info": {
                "walletId": self.wallets[currency],
                "currencyCode": currency,
                "amount": fmt16(amount),
                "oldBalance": fmt16(old),
                "newBalance": format(new.quantize(_Q8, context=_CTX), "f"),
            }
        }

    def _deal_data(self, symbol: str) -> dict[str, Any]:
        state = self.states[symbol]
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
                "committedAt": self.now(),
            }
        }
