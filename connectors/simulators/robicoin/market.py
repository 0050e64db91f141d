"""The Robicoin market model: prices, ticker windows, resting orders, and the accounts.

Why it is apart: what the market and the accounts do (random walks, ticker windows,
orders resting and filling, transactions moving balances) is one concern; who may ask
and how often (``rules``) and how the answers travel (``server``) are others.

Shapes follow the spec, quirks included: ticker values are :class:`~decimal.Decimal`
written as JSON *numbers* by ``rules.encode_json`` (``3456789.10``, ``987654321.12345678``,
which float would change), the ``avarage`` key (sic); money in POST answers is text with
8 decimals; ``created_at``/``updated_at`` are ``YYYY-MM-DD HH:MM:SS`` in the configured
zone. Transactions have no id, are newest first, several share a second, about 3 % repeat
the previous row exactly (two equal fills), and a row never changes once generated.

Not thread-safe on its own: the simulator calls it with the exchange's lock held.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Final
from zoneinfo import ZoneInfo

PAIRS: Final = ("btc-try", "eth-try", "ltc-try", "usdt-try")
TICKER_WINDOWS: Final = ("1min", "1hour", "1day", "1month")
MARKET_ORDER_CAP: Final = 500
ACTIVITY_ORDER_CAP: Final = 20
DUPLICATE_PROBABILITY: Final = 0.03

_Q8: Final = Decimal("1E-8")
_ZERO8: Final = Decimal("0E-8")
_PAIR_RE: Final = re.compile(r"[a-z0-9]+-[a-z0-9]+")
_TIME_FORMAT: Final = "%Y-%m-%d %H:%M:%S"
_BUCKET_FORMATS: Final[Mapping[str, str]] = {
    "1min": "%Y-%m-%d %H:%M",
    "1hour": "%Y-%m-%d %H",
    "1day": "%Y-%m-%d",
    "1month": "%Y-%m",
}

Row = dict[str, Any]
TxRow = dict[str, str | None]


# --------------------------------------------------------------------------------------
# Markets (configuration) and pure helpers
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PairSpec:
    """What the simulator needs to animate one market: start price, price tick, a
    typical trade size and a typical 24 h volume (base currency)."""

    pair: str
    price: Decimal
    tick: Decimal
    typical_qty: Decimal
    daily_volume: Decimal

    @property
    def base(self) -> str:
        return self.pair.split("-", 1)[0]

    @property
    def quote(self) -> str:
        return self.pair.split("-", 1)[1]


KNOWN_PAIRS: Final[Mapping[str, PairSpec]] = {
    spec.pair: spec
    for spec in (
        PairSpec(
            "btc-try", Decimal("3456789.12"), Decimal("0.01"), Decimal("0.05"), Decimal("143")
        ),
        PairSpec("eth-try", Decimal("123456.78"), Decimal("0.01"), Decimal("0.8"), Decimal("2518")),
        PairSpec("ltc-try", Decimal("3456.78"), Decimal("0.01"), Decimal("12"), Decimal("20481")),
        # Large volumes with 8 decimals: 18+ significant digits, which a float cannot hold.
        PairSpec(
            "usdt-try", Decimal("41.2345"), Decimal("0.0001"), Decimal("2500"), Decimal("9.87e8")
        ),
    )
}

_WALLETS: Final = ("try", "btc", "eth", "ltc", "usdt", "rbc")
_INITIAL_BALANCE: Final[Mapping[str, Decimal]] = {
    "try": Decimal("2500000"),
    "btc": Decimal("1.5"),
    "eth": Decimal("25"),
    "ltc": Decimal("400"),
    "usdt": Decimal("50000"),
    "rbc": Decimal("10000"),
}
_WITHDRAW_FEE: Final[Mapping[str, Decimal]] = {
    "try": Decimal("5"),
    "btc": Decimal("0.0005"),
    "eth": Decimal("0.005"),
    "ltc": Decimal("0.001"),
    "usdt": Decimal("1"),
    "rbc": Decimal("10"),
}
_MAKER_FEE: Final = Decimal("0.001")
_TAKER_FEE: Final = Decimal("0.002")


def pair_spec(pair: str) -> PairSpec:
    """The known spec, or a generic one for other ``base-quote`` pairs."""
    if not _PAIR_RE.fullmatch(pair):
        raise ValueError(f"bad pair {pair!r}: expected lowercase 'base-quote'")
    known = KNOWN_PAIRS.get(pair)
    if known is not None:
        return known
    return PairSpec(pair, Decimal("100.00"), Decimal("0.01"), Decimal("10"), Decimal("100000"))


def q8(value: Decimal) -> Decimal:
    return value.quantize(_Q8, rounding=ROUND_HALF_UP)


def s8(value: Decimal) -> str:
    """Money text as the exchange writes it in POST answers: ``"1.00000000"``."""
    return format(q8(value), "f")


# --------------------------------------------------------------------------------------
# Mutable state
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Window:
    bucket: str
    high: Decimal
    low: Decimal
    volume: Decimal
    turnover: Decimal  # sum of price * quantity, for the average


class PairMarket:
    """Price random walk in integer ticks and the ticker windows built on it.

    ``24h`` starts from a synthetic day of history and then accumulates; the calendar
    windows start with synthetic history for the elapsed part of the current
    hour/day/month and restart empty when the local calendar bucket changes.
    """

    def __init__(self, spec: PairSpec, rng: random.Random, now: datetime) -> None:
        self.spec = spec
        self._rng = rng
        self.initial_ticks = int((spec.price / spec.tick).to_integral_value())
        self.ticks = self.initial_ticks
        self.bid_ticks = self.ticks - rng.randint(1, 5)
        self.ask_ticks = self.ticks + rng.randint(0, 2)
        self.windows: dict[str, Window] = {
            name: self._baseline(name, now) for name in ("24h", *TICKER_WINDOWS)
        }

    def price(self, ticks: int | None = None) -> Decimal:
        return Decimal(self.ticks if ticks is None else ticks) * self.spec.tick

    def random_qty(self) -> Decimal:
        units = int(self.spec.typical_qty / _Q8)
        return Decimal(self._rng.randint(max(1, units // 20), units * 2)) * _Q8

    def near_ticks(self, side: str, max_fraction: float = 0.03) -> int:
        """A limit price a little away from the market: below for buys, above for sells."""
        offset = max(1, int(self.ticks * self._rng.uniform(0.001, max_fraction)))
        return max(1, self.ticks - offset if side == "buy" else self.ticks + offset)

    def _baseline(self, name: str, now: datetime) -> Window:
        bucket = _bucket(name, now)
        if name == "1min":
            return self._empty(bucket)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        elapsed_days = {
            "24h": 1.0,
            "1month": (now.day - 1) + (now - midnight).total_seconds() / 86400,
            "1day": (now - midnight).total_seconds() / 86400,
            "1hour": (now.minute * 60 + now.second) / 86400,
        }[name]
        spread = {"24h": 0.02, "1month": 0.08, "1day": 0.015, "1hour": 0.004}[name]
        units = int(
            self.spec.daily_volume / _Q8 * Decimal(elapsed_days * self._rng.uniform(0.8, 1.2))
        )
        if units <= 0:
            return self._empty(bucket)
        volume = Decimal(units + self._rng.randint(0, 99_999_999)) * _Q8
        high = self.ticks + max(1, int(self.ticks * spread * self._rng.uniform(0.3, 1.0)))
        low = max(1, self.ticks - max(1, int(self.ticks * spread * self._rng.uniform(0.3, 1.0))))
        average = self.price(self._rng.randint(low, high))
        return Window(bucket, self.price(high), self.price(low), volume, volume * average)

    def _empty(self, bucket: str) -> Window:
        return Window(bucket, self.price(), self.price(), _ZERO8, Decimal(0))

    def roll(self, now: datetime) -> None:
        for name in TICKER_WINDOWS:
            bucket = _bucket(name, now)
            if self.windows[name].bucket != bucket:
                self.windows[name] = self._empty(bucket)

    def trade(self, now: datetime) -> None:
        """One market trade: move the price a little, then add it to every window."""
        step = max(1, self.ticks // 2000)
        move = self._rng.randint(-step, step)
        if self.ticks * 10 > self.initial_ticks * 12:
            move = -abs(move)
        elif self.ticks * 10 < self.initial_ticks * 8:
            move = abs(move)
        self.ticks = max(2, self.ticks + move)
        self.bid_ticks = max(1, self.ticks - self._rng.randint(1, 5))
        self.ask_ticks = self.ticks + self._rng.randint(0, 2)
        price, qty = self.price(), self.random_qty()
        self.roll(now)
        for window in self.windows.values():
            window.high = max(window.high, price)
            window.low = min(window.low, price)
            window.volume += qty
            window.turnover += qty * price

    def ticker_row(self, name: str, now: datetime) -> Row:
        self.roll(now)
        window = self.windows[name]
        last = self.price()
        high, low = max(window.high, last), min(window.low, last)
        if window.volume:
            average = (window.turnover / window.volume).quantize(self.spec.tick, ROUND_HALF_UP)
            average = min(max(average, low), high)
        else:
            average = last
        return {
            "type": self.spec.pair,
            "high": high,
            "last": last,
            "bid": self.price(self.bid_ticks),
            "volume": q8(window.volume),
            "low": low,
            "ask": self.price(self.ask_ticks),
            "avarage": average,
        }


def _bucket(name: str, now: datetime) -> str:
    fmt = _BUCKET_FORMATS.get(name)
    return "24h" if fmt is None else now.strftime(fmt)


@dataclasses.dataclass
class Order:
    seq: int
    pair: str
    side: str
    amount: Decimal
    price: Decimal
    created_at: str
    origin: str  # "market" | "activity" | "client"
    data_id: int = 0

    @property
    def total(self) -> Decimal:
        return q8(self.amount * self.price)

    def market_row(self) -> Row:
        return {
            "type": self.pair,
            "side": self.side,
            "amount": s8(self.amount),
            "price": s8(self.price),
            "total": s8(self.total),
            "status": "active",
            "created_at": self.created_at,
        }

    def open_row(self) -> Row:
        return {"data_id": self.data_id, **self.market_row()}


@dataclasses.dataclass
class Account:
    public_key: str
    public_id: str
    private_key: str
    balances: dict[str, Decimal]
    active: bool = True
    open_orders: list[Order] = dataclasses.field(default_factory=list)  # by data_id
    transactions: list[TxRow] = dataclasses.field(default_factory=list)  # oldest first
    last_tx_ts: int = 0
    last_deltas: dict[str, Decimal] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------
# The market and the accounts in it
# --------------------------------------------------------------------------------------


class Market:
    """Every pair, the resting orders, and each account's balances, orders and history.

    One seeded :class:`random.Random` drives it all (``rng``), so a seed replays the
    same data for the same sequence of calls.
    """

    def __init__(
        self,
        pairs: Sequence[str],
        *,
        rng: random.Random,
        clock: Callable[[], float],
        zone: ZoneInfo,
        initial_transactions: int,
    ) -> None:
        self.rng = rng
        self.clock = clock
        self._zone = zone
        self._initial_transactions = initial_transactions
        now = self.local(self.clock())
        self.pairs = {p: PairMarket(pair_spec(p), self.rng, now) for p in pairs}
        self.wallets = tuple(
            dict.fromkeys([*_WALLETS[:-1], *(m.spec.base for m in self.pairs.values()), "rbc"])
        )
        self.active_wallets = frozenset({"try", "rbc", *(m.spec.base for m in self.pairs.values())})
        self._seq = 0
        self._next_data_id = 1
        self.market_orders: list[Order] = []
        self.accounts: dict[str, Account] = {}
        self.default_key = ""
        self.transactions_generated = 0
        #: No market or account activity while set (the activity loop reads it).
        self.paused = False
        self.seed_market_orders()

    def ticker_rows(self, window: str) -> list[Row]:
        """One row per pair for a ticker window (``24h``, ``1min``, ...)."""
        now = self.local(self.clock())
        return [market.ticker_row(window, now) for market in self.pairs.values()]

    def next_arrival(self, now: float, rate: float) -> float:
        """Poisson arrivals: several events can land in the same second."""
        return math.inf if rate <= 0 else now + self.rng.expovariate(rate)

    def local(self, ts: float) -> datetime:
        return datetime.fromtimestamp(ts, self._zone)

    def _fmt(self, ts: float) -> str:
        return self.local(int(ts)).strftime(_TIME_FORMAT)

    def account(self, public_key: str | None) -> Account:
        return self.accounts[self.default_key if public_key is None else public_key]

    def add_account(self, public_key: str, public_id: str, private_key: str) -> None:
        if not public_key or not public_id or not private_key:
            raise ValueError("public_key, public_id and private_key must be non-empty")
        balances = {}
        for currency in self.wallets:
            base = _INITIAL_BALANCE.get(currency, Decimal("1000"))
            if currency in self.active_wallets:
                balances[currency] = q8(base * Decimal(self.rng.uniform(0.5, 1.5)))
            else:
                balances[currency] = _ZERO8
        account = Account(public_key, public_id, private_key, balances)
        self.accounts[public_key] = account
        # Some history from before the simulator started, oldest first, then a few
        # orders left open.
        gaps = [self.rng.randint(1, 600) for _ in range(self._initial_transactions)]
        ts = int(self.clock()) - sum(gaps)
        for gap in gaps:
            self.add_transaction(account, ts)
            ts += gap
        for _ in range(3):
            self._open_activity_order(account)

    def seed_market_orders(self) -> None:
        now = int(self.clock())
        ts = now - 40 * 15
        for _ in range(40):
            ts += self.rng.randint(0, 15)
            self._add_market_order(min(ts, now))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _add_market_order(self, ts: int) -> None:
        market = self.rng.choice(list(self.pairs.values()))
        side = self.rng.choice(("buy", "sell"))
        order = Order(
            self._next_seq(),
            market.spec.pair,
            side,
            market.random_qty(),
            market.price(market.near_ticks(side)),
            self._fmt(ts),
            "market",
        )
        self.market_orders.append(order)
        if len(self.market_orders) > MARKET_ORDER_CAP:
            del self.market_orders[0]

    def open_order(
        self, account: Account, pair: str, side: str, amount: Decimal, price: Decimal, origin: str
    ) -> Order:
        order = Order(
            self._next_seq(),
            pair,
            side,
            amount,
            price,
            self._fmt(self.clock()),
            origin,
            self._next_data_id,
        )
        self._next_data_id += 1
        account.open_orders.append(order)
        return order

    def _open_activity_order(self, account: Account) -> None:
        market = self.rng.choice(list(self.pairs.values()))
        side = self.rng.choice(("buy", "sell"))
        price = market.price(market.near_ticks(side))
        self.open_order(account, market.spec.pair, side, market.random_qty(), price, "activity")

    def all_open_orders(self) -> list[Order]:
        """Market orders and every account's open orders, newest first."""
        orders = list(self.market_orders)
        for account in self.accounts.values():
            orders.extend(account.open_orders)
        return sorted(orders, key=lambda o: o.seq, reverse=True)

    def balance_rows(self, account: Account) -> list[Row]:
        reserved = dict.fromkeys(self.wallets, Decimal(0))
        for order in account.open_orders:
            market = self.pairs[order.pair]
            if order.side == "buy":
                reserved[market.spec.quote] = (
                    reserved.get(market.spec.quote, Decimal(0)) + order.total
                )
            else:
                reserved[market.spec.base] = (
                    reserved.get(market.spec.base, Decimal(0)) + order.amount
                )
        return [
            {
                "currency": currency,
                "balance": s8(account.balances[currency]),
                "reserved_balance": s8(reserved[currency]),
                "status": "active" if currency in self.active_wallets else "passive",
            }
            for currency in self.wallets
        ]

    # ---- transactions ----------------------------------------------------------------

    def add_transaction(self, account: Account, ts: int) -> TxRow:
        created_at = self._fmt(ts)
        previous = account.transactions[-1] if account.transactions else None
        if (
            previous is not None
            and previous["created_at"] == created_at
            and self.rng.random() < DUPLICATE_PROBABILITY
            and self._apply(account, account.last_deltas)
        ):
            row = dict(previous)  # two equal fills in the same second
        else:
            row = self._new_transaction(account, created_at)
        account.transactions.append(row)
        account.last_tx_ts = max(account.last_tx_ts, ts)
        self.transactions_generated += 1
        return row

    def _new_transaction(self, account: Account, created_at: str) -> TxRow:
        kind = self.rng.choices(("maker", "taker", "deposit", "withdraw"), (45, 30, 15, 10))[0]
        row: TxRow | None = None
        if kind == "maker":
            row = self._maker_fill(account, created_at)
        elif kind == "taker":
            market = self.rng.choice(list(self.pairs.values()))
            side = self.rng.choice(("buy", "sell"))
            row = self._trade(
                account, "taker", market, side, market.random_qty(), market.price(), created_at
            )
        elif kind == "withdraw":
            row = self._withdraw(account, created_at)
        return row if row is not None else self._deposit(account, created_at)

    def _maker_fill(self, account: Account, created_at: str) -> TxRow | None:
        """Fill one of the account's activity orders, or (none open) a resting order
        the simulator does not list."""
        mine = [o for o in account.open_orders if o.origin == "activity"]
        if mine:
            order = self.rng.choice(mine)
            account.open_orders.remove(order)
            market = self.pairs[order.pair]
            return self._trade(
                account, "maker", market, order.side, order.amount, order.price, created_at
            )
        market = self.rng.choice(list(self.pairs.values()))
        side = self.rng.choice(("buy", "sell"))
        price = market.price(market.near_ticks(side, 0.005))
        return self._trade(account, "maker", market, side, market.random_qty(), price, created_at)

    def _trade(
        self,
        account: Account,
        zone: str,
        market: PairMarket,
        side: str,
        amount: Decimal,
        price: Decimal,
        created_at: str,
    ) -> TxRow | None:
        total = q8(amount * price)
        fee = q8(total * (_MAKER_FEE if zone == "maker" else _TAKER_FEE))
        base, quote = market.spec.base, market.spec.quote
        if side == "buy":
            deltas = {quote: -(total + fee), base: amount}
        else:
            deltas = {base: -amount, quote: total - fee}
        if not self._apply(account, deltas):
            return None
        return {
            "zone": zone,
            "type": market.spec.pair,
            "amount": s8(amount),
            "price": s8(price),
            "total": s8(total),
            "fee": s8(fee),
            "status": "approved",
            "txid": None,
            "updated_at": created_at,
            "created_at": created_at,
        }

    def _deposit(self, account: Account, created_at: str) -> TxRow:
        currency = self.rng.choice(sorted(self.active_wallets))
        amount = self._coin_amount(currency)
        self._apply(account, {currency: amount})
        return self._movement("deposit", currency, amount, _ZERO8, created_at)

    def _withdraw(self, account: Account, created_at: str) -> TxRow | None:
        currency = self.rng.choice(sorted(self.active_wallets))
        amount = self._coin_amount(currency)
        fee = _WITHDRAW_FEE.get(currency, Decimal("0.001"))
        if not self._apply(account, {currency: -(amount + fee)}):
            return None
        return self._movement("withdraw", currency, amount, fee, created_at)

    def _movement(
        self, zone: str, currency: str, amount: Decimal, fee: Decimal, created_at: str
    ) -> TxRow:
        return {
            "zone": zone,
            "type": f"{currency}-{currency}",
            "amount": s8(amount),
            "price": "1.00000000",
            "total": s8(amount),
            "fee": s8(fee),
            "status": "approved",
            "txid": self._txid(currency),
            "updated_at": created_at,
            "created_at": created_at,
        }

    def _coin_amount(self, currency: str) -> Decimal:
        typical = _INITIAL_BALANCE.get(currency, Decimal("1000")) / 20
        units = int(typical / _Q8)
        return Decimal(self.rng.randint(max(1, units // 50), units)) * _Q8

    def _txid(self, currency: str) -> str:
        if currency in ("btc", "ltc"):
            return f"{self.rng.getrandbits(256):064x}"
        if currency == "try":
            return f"{self.rng.getrandbits(128):032x}"
        return f"0x{self.rng.getrandbits(256):064x}"

    def _apply(self, account: Account, deltas: Mapping[str, Decimal]) -> bool:
        """Move balances if none would go negative; remember the move for duplicates."""
        if any(account.balances.get(c, _ZERO8) + d < 0 for c, d in deltas.items()):
            return False
        for currency, delta in deltas.items():
            account.balances[currency] = q8(account.balances.get(currency, _ZERO8) + delta)
        account.last_deltas = dict(deltas)
        return True

    # ---- background activity ---------------------------------------------------------

    def _schedule(self, now: float, rate: float) -> float:
        """Poisson arrivals: several events can land in the same second."""
        return math.inf if rate <= 0 else now + self.rng.expovariate(rate)

    def market_tick(self) -> None:
        ts = self.clock()
        market = self.rng.choice(list(self.pairs.values()))
        market.trade(self.local(ts))
        self._add_market_order(int(ts))
        if len(self.market_orders) > 60 and self.rng.random() < 0.6:
            del self.market_orders[self.rng.randrange(len(self.market_orders))]

    def account_tick(self, account: Account) -> None:
        self.add_transaction(account, int(self.clock()))
        activity = [o for o in account.open_orders if o.origin == "activity"]
        roll = self.rng.random()
        if roll < 0.35 and len(activity) < ACTIVITY_ORDER_CAP:
            self._open_activity_order(account)
        elif roll < 0.45 and activity:
            account.open_orders.remove(self.rng.choice(activity))
