"""Loopback simulator of the Robicoin REST API v1, strict about every documented rule.

Why it exists: the connector's tests, the demo, the benchmarks and the order sink need an
exchange that *enforces* what the real one enforces (``shared/spec/robicoin-rest.md``)
and that lets a test see exactly what a client did and what it was served.

Rules enforced, in this order for every request:

1. **Blocked IP** → ``403 {"error": "IP blocked"}`` (any path, ticker included). An IP is
   blocked after ``block_after`` (10) unauthorized attempts; :meth:`unblock` lifts it.
2. **Rate limit** per caller IP and class: ``ticker`` (any path under ``/ticker``) at most
   10 requests in any sliding 100 ms window, ``other`` (everything else) at most 1.
   Arrival is ``time.monotonic()`` taken as soon as the request line is read (per request,
   keep-alive or not); every request enters the window, rejected ones included. Over the
   limit → ``429 {"error": "Too many requests"}``.
3. **Routing**: unknown path → 404, wrong method → 405 (tickers are GET, the rest POST).
4. **Form**: POST fields must be ``application/x-www-form-urlencoded`` or
   ``multipart/form-data``; JSON or anything else → 400 (not an auth failure).
5. **Auth**: ``public_key``, ``public_id``, ``time`` (integer seconds within
   ``time_tolerance_s`` of the server clock) and ``hash`` (32 lowercase hex,
   ``md5(public_key . public_id . time . md5(private_key))``), key active. Any failure,
   a missing auth field included → ``401 {"error": "Unauthorized"}``, counted for the IP
   and for the key the request *claimed* (``"-"`` when none).
6. **Endpoint**: unknown or missing fields, badly formed values → 400; unknown order to
   delete → 404 (not an auth failure; :meth:`~RobicoinSimulator.set_delete_not_found`
   changes it, e.g. to ``400 {"error": "Order not found."}``).

Shapes follow the spec, quirks included: ticker values are JSON *numbers* written from
:class:`~decimal.Decimal` text (``3456789.10``, ``987654321.12345678``, which float would
change), the ``avarage`` key (sic); money in POST answers is text with 8 decimals;
``created_at``/``updated_at`` are ``YYYY-MM-DD HH:MM:SS`` in the configured zone.
Transactions have no id, are newest first, several share a second, about 3 % repeat the
previous row exactly (two equal fills), and a row never changes once generated.

Concurrency: a ``ThreadingHTTPServer`` (one daemon thread per connection) and one
background thread for market and account activity; all state sits behind one lock.
:class:`RobicoinSimulator` is thread-safe and a context manager; :class:`SimulatorThread`
wraps one for callers that prefer the Cryptomus-style entry point.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import email.message
import email.parser
import email.policy
import http
import json
import logging
import math
import random
import re
import signal
import socket
import socketserver
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from decimal import ROUND_DOWN, ROUND_HALF_UP, Context, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit
from zoneinfo import ZoneInfo

from connectors.robicoin.signing import hash_matches

logger = logging.getLogger(__name__)

DEFAULT_PUBLIC_KEY: Final = "sim-public-key"
DEFAULT_PUBLIC_ID: Final = "1001"
DEFAULT_PRIVATE_KEY: Final = "sim-private-key"
PAIRS: Final = ("btc-try", "eth-try", "ltc-try", "usdt-try")
TICKER_WINDOWS: Final = ("1min", "1hour", "1day", "1month")

API_PREFIX: Final = "/api/v1"
TICKER_PATH: Final = API_PREFIX + "/ticker"
POST_ENDPOINTS: Final = (
    "order",
    "balance",
    "transaction",
    "open-order",
    "delete-order",
    "create-order",
)
AUTH_FIELDS: Final = ("public_key", "public_id", "time", "hash")
ENDPOINT_FIELDS: Final[Mapping[str, tuple[str, ...]]] = {
    "order": (),
    "balance": (),
    "transaction": (),
    "open-order": (),
    "delete-order": ("data_id", "type"),
    "create-order": ("side", "type", "amount", "price", "use_rbc", "stop_limit"),
}
PAGE_SIZE: Final = 25
MARKET_ORDER_CAP: Final = 500
ACTIVITY_ORDER_CAP: Final = 20
DUPLICATE_PROBABILITY: Final = 0.03
MAX_BODY_BYTES: Final = 1 << 20
RESPONSE_LOG_SIZE: Final = 10_000

_Q8: Final = Decimal("1E-8")
_ZERO8: Final = Decimal("0E-8")
_PAIR_RE: Final = re.compile(r"[a-z0-9]+-[a-z0-9]+")
_TIME_RE: Final = re.compile(r"[0-9]{1,12}")
_HASH_RE: Final = re.compile(r"[0-9a-f]{32}")
_DECIMAL_RE: Final = re.compile(r"(0|[1-9][0-9]{0,19})(\.[0-9]{1,8})?")
_DATA_ID_RE: Final = re.compile(r"[0-9]{1,18}")
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


def encode_json(value: object) -> str:
    """Compact JSON where :class:`Decimal` becomes a number with its exact text.

    >>> encode_json({"last": Decimal("20950.00"), "txid": None})
    '{"last":20950.00,"txid":null}'
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError("non-finite decimal")
        return format(value, "f")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return (
            "{" + ",".join(f"{json.dumps(str(k))}:{encode_json(v)}" for k, v in value.items()) + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ",".join(encode_json(v) for v in value) + "]"
    raise TypeError(f"cannot encode {type(value).__name__}")


class FormError(ValueError):
    """The body is not the form data every POST must carry (answered with 400)."""


def parse_form(content_type: str | None, body: bytes) -> dict[str, str]:
    """Fields of a urlencoded or multipart body; duplicates and file parts refused."""
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime == "application/x-www-form-urlencoded":
        pairs = _parse_urlencoded(body)
    elif mime == "multipart/form-data":
        pairs = _parse_multipart(content_type or "", body)
    elif mime == "application/json" or body.lstrip()[:1] in (b"{", b"["):
        raise FormError("JSON bodies are not accepted: send the fields as form data")
    elif not mime:
        raise FormError("missing Content-Type: send the fields as form data")
    else:
        raise FormError("unsupported Content-Type: send the fields as form data")
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            raise FormError(f"duplicate field: {name}")
        fields[name] = value
    return fields


def _parse_urlencoded(body: bytes) -> list[tuple[str, str]]:
    try:
        text = body.decode("ascii")
        return parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict")
    except (UnicodeError, ValueError) as exc:
        raise FormError("malformed urlencoded body") from exc


def _parse_multipart(content_type: str, body: bytes) -> list[tuple[str, str]]:
    try:
        header = content_type.encode("latin-1")
    except UnicodeError as exc:
        raise FormError("malformed multipart Content-Type") from exc
    parser = email.parser.BytesParser(policy=email.policy.HTTP)
    msg = parser.parsebytes(b"Content-Type: " + header + b"\r\n\r\n" + body)
    if not msg.is_multipart() or msg.defects or not isinstance(msg, email.message.EmailMessage):
        raise FormError("malformed multipart body (boundary missing or not closed)")
    pairs: list[tuple[str, str]] = []
    for part in msg.iter_parts():
        if part.is_multipart() or part.defects or part.get_content_disposition() != "form-data":
            raise FormError("malformed multipart part")
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise FormError("multipart part without a field name")
        if part.get_filename() is not None:
            raise FormError(f"field {name} was sent as a file upload")
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            raise FormError("malformed multipart part")
        try:
            pairs.append((name, payload.decode(part.get_content_charset() or "utf-8")))
        except (UnicodeError, LookupError) as exc:
            raise FormError(f"field {name} is not valid text") from exc
    return pairs


def is_amount(text: str, *, allow_zero: bool = False) -> bool:
    """Plain decimal text, at most 8 decimals, positive (or zero when allowed)."""
    if not _DECIMAL_RE.fullmatch(text):
        return False
    return allow_zero or Decimal(text) > 0


# --------------------------------------------------------------------------------------
# Mutable state
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Window:
    bucket: str
    high: Decimal
    low: Decimal
    volume: Decimal
    turnover: Decimal  # sum of price * quantity, for the average


class _Market:
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
        self.windows: dict[str, _Window] = {
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

    def _baseline(self, name: str, now: datetime) -> _Window:
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
        return _Window(bucket, self.price(high), self.price(low), volume, volume * average)

    def _empty(self, bucket: str) -> _Window:
        return _Window(bucket, self.price(), self.price(), _ZERO8, Decimal(0))

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
class _Order:
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
class _Account:
    public_key: str
    public_id: str
    private_key: str
    balances: dict[str, Decimal]
    active: bool = True
    open_orders: list[_Order] = dataclasses.field(default_factory=list)  # by data_id
    transactions: list[TxRow] = dataclasses.field(default_factory=list)  # oldest first
    last_tx_ts: int = 0
    last_deltas: dict[str, Decimal] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LoggedResponse:
    """One answer as served: the body is the exact text on the wire."""

    method: str
    path: str
    status: int
    body: str


@dataclasses.dataclass
class _Counters:
    requests: int = 0
    requests_by_path: dict[str, int] = dataclasses.field(default_factory=dict)
    responses_by_status: dict[int, int] = dataclasses.field(default_factory=dict)
    rate_limit_violations: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"ticker": 0, "other": 0}
    )
    unauthorized_attempts: int = 0
    unauthorized_by_key: dict[str, int] = dataclasses.field(default_factory=dict)
    blocked_requests: int = 0
    bad_requests: int = 0
    orders_created: int = 0
    orders_deleted: int = 0
    transactions_generated: int = 0
    injected_failures: int = 0
    dropped_responses: int = 0


@dataclasses.dataclass(frozen=True)
class _Request:
    method: str
    path: str
    ip: str
    arrival: float
    content_type: str | None
    body: bytes
    body_error: tuple[int, str] | None = None


@dataclasses.dataclass(frozen=True)
class _Outcome:
    status: int
    body: str
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    drop: bool = False
    close: bool = False


# --------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------


class RobicoinSimulator:
    """A Robicoin exchange on loopback. Thread-safe; ``with`` starts and stops it."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        pairs: Sequence[str] = PAIRS,
        seed: int | None = None,
        transactions_per_second: float = 2.0,
        market_orders_per_second: float = 4.0,
        zone: str = "Europe/Istanbul",
        time_tolerance_s: float = 30.0,
        block_after: int = 10,
        ticker_limit: tuple[int, float] = (10, 0.100),
        other_limit: tuple[int, float] = (1, 0.100),
        accounts: Mapping[str, tuple[str, str]] | None = None,
        clock: Callable[[], float] = time.time,
        initial_transactions: int = 5,
    ) -> None:
        for name, value in (
            ("transactions_per_second", transactions_per_second),
            ("market_orders_per_second", market_orders_per_second),
            ("time_tolerance_s", time_tolerance_s),
        ):
            if math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        for name, (count, window) in (("ticker_limit", ticker_limit), ("other_limit", other_limit)):
            if count < 1 or not window > 0:
                raise ValueError(f"{name} must be (count >= 1, window > 0)")
        if block_after < 1 or initial_transactions < 0:
            raise ValueError("block_after must be >= 1 and initial_transactions >= 0")
        if not pairs or len(set(pairs)) != len(pairs):
            raise ValueError("pairs must be a non-empty list without duplicates")
        self.host = host
        self._requested_port = port
        self._port = port
        self._zone = ZoneInfo(zone)
        self._clock = clock
        self._rng = random.Random(seed)
        self._tps = transactions_per_second
        self._market_rate = market_orders_per_second
        self._tolerance = time_tolerance_s
        self._block_after = block_after
        self._limits = {"ticker": ticker_limit, "other": other_limit}
        self._initial_transactions = initial_transactions
        self._lock = threading.Lock()

        now = self._local(self._clock())
        self._markets = {p: _Market(pair_spec(p), self._rng, now) for p in pairs}
        self._wallets = tuple(
            dict.fromkeys([*_WALLETS[:-1], *(m.spec.base for m in self._markets.values()), "rbc"])
        )
        self._active_wallets = frozenset(
            {"try", "rbc", *(m.spec.base for m in self._markets.values())}
        )
        self._seq = 0
        self._next_data_id = 1
        self._market_orders: list[_Order] = []
        self._accounts: dict[str, _Account] = {}
        self._default_key = ""
        self._orders_created: list[dict[str, Any]] = []
        self._orders_deleted: list[dict[str, Any]] = []
        self._counters = _Counters()
        self._responses: deque[LoggedResponse] = deque(maxlen=RESPONSE_LOG_SIZE)
        self._arrivals: dict[tuple[str, str], list[float]] = {}
        self._unauthorized_by_ip: dict[str, int] = {}
        self._blocked: set[str] = set()
        self._failures: list[list[Any]] = []  # [path_suffix, status, remaining]
        self._create_delay = 0.0
        self._drop_creates = 0
        # delete-order faults: the answer to an order that is not open, canned refusals
        # of open ones, and answers dropped after deleting.
        self._delete_not_found: tuple[int, object] = (404, {"error": "Order not found"})
        self._refused_deletes: list[tuple[int, object]] = []
        self._drop_deletes = 0
        self._paused = False

        with self._lock:
            self._seed_market_orders()
            for key, (public_id, private_key) in (
                accounts
                if accounts is not None
                else {DEFAULT_PUBLIC_KEY: (DEFAULT_PUBLIC_ID, DEFAULT_PRIVATE_KEY)}
            ).items():
                self._add_account(key, public_id, private_key)
        if not self._accounts:
            raise ValueError("at least one account is required")
        self._default_key = (
            DEFAULT_PUBLIC_KEY
            if DEFAULT_PUBLIC_KEY in self._accounts
            else next(iter(self._accounts))
        )

        self._httpd: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._port}{API_PREFIX}"

    def start(self) -> RobicoinSimulator:
        """Bind (port 0 picks a free one), serve, and start the activity thread."""
        if self._httpd is not None:
            raise RuntimeError("simulator already started")
        self._stop.clear()
        httpd = _Server((self.host, self._requested_port), self)
        self._httpd = httpd
        self._port = int(httpd.server_address[1])
        self._threads = [
            threading.Thread(
                target=httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="robicoin-sim-http",
                daemon=True,
            ),
            threading.Thread(target=self._activity_loop, name="robicoin-sim-activity", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        logger.info("robicoin simulator listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving, close every open connection and release the port."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stop.set()
        httpd.shutdown()
        httpd.server_close()
        httpd.close_connections()
        for thread in self._threads:
            thread.join(timeout=5.0)
        self._threads = []

    def __enter__(self) -> RobicoinSimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- what the clients did and were served ----------------------------------------

    def counters(self) -> dict[str, Any]:
        """A snapshot: plain dicts and lists, safe to keep and compare."""
        with self._lock:
            data = dataclasses.asdict(self._counters)
            data["blocked_ips"] = sorted(self._blocked)
            data["unauthorized_by_ip"] = dict(self._unauthorized_by_ip)
            return data

    @property
    def response_log(self) -> list[LoggedResponse]:
        """The last answers served (at most 10 000), oldest first."""
        with self._lock:
            return list(self._responses)

    def last_body(self, path: str) -> str | None:
        """Exact text of the last answer for ``path`` (full path or a suffix like
        ``/transaction``), or None if nothing was served there."""
        with self._lock:
            for entry in reversed(self._responses):
                if entry.path == path or entry.path.endswith(path):
                    return entry.body
        return None

    def transactions(self, public_key: str | None = None) -> list[TxRow]:
        """Every transaction row generated for the account (default one), oldest first."""
        with self._lock:
            return [dict(row) for row in self._account(public_key).transactions]

    def open_orders(self, public_key: str | None = None) -> list[Row]:
        """Every open order of the account, newest first, as ``/open-order`` rows."""
        with self._lock:
            return [o.open_row() for o in reversed(self._account(public_key).open_orders)]

    def balances(self, public_key: str | None = None) -> list[Row]:
        with self._lock:
            return self._balance_rows(self._account(public_key))

    def market_orders(self) -> list[Row]:
        """Every open order on the market (all accounts and others), newest first."""
        with self._lock:
            return [o.market_row() for o in self._all_open_orders()]

    def orders_created(self) -> list[dict[str, Any]]:
        """Every accepted create-order: the fields as received (``time`` is the client's
        auth field) plus ``received_at`` (server clock) and the ``data_id`` assigned."""
        with self._lock:
            return [dict(r) for r in self._orders_created]

    def orders_deleted(self) -> list[dict[str, Any]]:
        """Every successful delete-order: fields as received plus ``received_at``."""
        with self._lock:
            return [dict(r) for r in self._orders_deleted]

    # ---- test controls ---------------------------------------------------------------

    def burst(self, n: int, same_second: bool = True, public_key: str | None = None) -> list[TxRow]:
        """Add ``n`` transactions at once (all in the current second, or in consecutive
        seconds ending now and never before the previous row) and return them."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            account = self._account(public_key)
            now = int(self._clock())
            start = now if same_second else max(account.last_tx_ts, now - (n - 1))
            rows = []
            for i in range(n):
                ts = now if same_second else max(start, min(now, start + i))
                rows.append(dict(self._add_transaction(account, ts)))
            return rows

    def pause_activity(self) -> None:
        """Stop generating market and account activity (transactions, orders, prices)."""
        with self._lock:
            self._paused = True

    def resume_activity(self) -> None:
        with self._lock:
            self._paused = False

    def set_key_active(self, public_key: str, active: bool) -> None:
        with self._lock:
            self._account(public_key).active = active

    def add_account(self, public_key: str, public_id: str, private_key: str) -> None:
        with self._lock:
            if public_key in self._accounts:
                raise ValueError("account already exists")
            self._add_account(public_key, public_id, private_key)

    def unblock(self, ip: str | None = None) -> None:
        """Lift the block on ``ip`` (all IPs when None) and forget its failed attempts."""
        with self._lock:
            if ip is None:
                self._blocked.clear()
                self._unauthorized_by_ip.clear()
            else:
                self._blocked.discard(ip)
                self._unauthorized_by_ip.pop(ip, None)

    def set_create_delay(self, seconds: float) -> None:
        """create-order places the order, then waits this long before answering."""
        if math.isnan(seconds) or seconds < 0:
            raise ValueError("seconds must be >= 0")
        with self._lock:
            self._create_delay = seconds

    def set_drop_create_response(self, n: int) -> None:
        """The next ``n`` accepted create-orders place the order, then close the
        connection without answering."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._drop_creates = n

    def fail_next(self, path_suffix: str, status: int, n: int = 1) -> None:
        """Answer the next ``n`` requests whose path ends with ``path_suffix`` (e.g.
        ``/create-order``) with ``status`` (5xx) without doing anything else."""
        if not 500 <= status <= 599 or n < 1:
            raise ValueError("status must be 5xx and n >= 1")
        suffix = path_suffix if path_suffix.startswith("/") else "/" + path_suffix
        with self._lock:
            self._failures.append([suffix, status, n])

    def set_delete_not_found(self, status: int, payload: object) -> None:
        """How delete-order answers an order that is not open (default ``404 {"error":
        "Order not found"}``). The spec only says "40x" and documents no error body, so
        tests also play e.g. ``400 {"error": "Order not found."}``."""
        if not 400 <= status <= 499 or status in (401, 403):
            raise ValueError("status must be a 4xx other than 401/403")
        with self._lock:
            self._delete_not_found = (status, payload)

    def refuse_next_deletes(self, status: int, payload: object, n: int = 1) -> None:
        """Answer the next ``n`` authenticated, well-formed delete-orders with a 4xx
        ``status`` and ``payload`` without deleting anything (the order stays open)."""
        if not 400 <= status <= 499 or status in (401, 403) or n < 1:
            raise ValueError("status must be a 4xx other than 401/403, and n >= 1")
        with self._lock:
            self._refused_deletes.extend([(status, payload)] * n)

    def set_drop_delete_response(self, n: int) -> None:
        """The next ``n`` successful delete-orders delete the order, then close the
        connection without answering."""
        if n < 0:
            raise ValueError("n must be >= 0")
        with self._lock:
            self._drop_deletes = n

    # ---- request processing (called by the HTTP handler threads) ---------------------

    def handle(self, request: _Request) -> _Outcome:
        """Decide the answer to one request. Everything but the create delay happens
        under the lock, so counters and state always agree."""
        with self._lock:
            return self._handle_locked(request)

    def _handle_locked(self, req: _Request) -> _Outcome:
        c = self._counters
        c.requests += 1
        c.requests_by_path[req.path] = c.requests_by_path.get(req.path, 0) + 1
        klass = (
            "ticker"
            if req.path == TICKER_PATH or req.path.startswith(TICKER_PATH + "/")
            else "other"
        )
        over_limit = self._over_limit(req.ip, klass, req.arrival)
        if req.ip in self._blocked:
            c.blocked_requests += 1
            return self._reply(req, 403, {"error": "IP blocked"})
        if over_limit:
            c.rate_limit_violations[klass] += 1
            return self._reply(req, 429, {"error": "Too many requests"})
        if req.body_error is not None:
            c.bad_requests += 1
            status, message = req.body_error
            return self._reply(req, status, {"error": message}, close=True)

        endpoint, allowed = _route(req.path)
        if endpoint is None:
            return self._reply(req, 404, {"error": "Not found"})
        if req.method != allowed:
            return self._reply(
                req, 405, {"error": "Method not allowed"}, headers=(("Allow", allowed),)
            )
        failure = self._take_failure(req.path)
        if failure is not None:
            c.injected_failures += 1
            return self._reply(req, failure, {"error": http.HTTPStatus(failure).phrase})
        if allowed == "GET":
            return self._ticker(req, endpoint)

        try:
            fields = parse_form(req.content_type, req.body)
        except FormError as exc:
            c.bad_requests += 1
            return self._reply(req, 400, {"error": str(exc)})
        account = self._authenticate(req.ip, fields)
        if account is None:
            return self._reply(req, 401, {"error": "Unauthorized"})
        expected = ENDPOINT_FIELDS[endpoint]
        unexpected = sorted(set(fields) - set(AUTH_FIELDS) - set(expected))
        missing = [name for name in expected if not fields.get(name)]
        if unexpected or missing:
            c.bad_requests += 1
            problems = []
            if missing:
                problems.append("missing field(s): " + ", ".join(missing))
            if unexpected:
                problems.append("unexpected field(s): " + ", ".join(unexpected))
            return self._reply(req, 400, {"error": "; ".join(problems)})

        if endpoint == "order":
            rows = [o.market_row() for o in self._all_open_orders()[:PAGE_SIZE]]
            return self._reply(req, 200, {"data": rows})
        if endpoint == "balance":
            return self._reply(req, 200, {"data": self._balance_rows(account)})
        if endpoint == "transaction":
            rows = [dict(r) for r in reversed(account.transactions[-PAGE_SIZE:])]
            return self._reply(req, 200, {"data": rows})
        if endpoint == "open-order":
            rows = [o.open_row() for o in reversed(account.open_orders[-PAGE_SIZE:])]
            return self._reply(req, 200, {"data": rows})
        if endpoint == "create-order":
            return self._create_order(req, account, fields)
        return self._delete_order(req, account, fields)

    def _reply(
        self,
        req: _Request,
        status: int,
        payload: object,
        *,
        headers: tuple[tuple[str, str], ...] = (),
        delay: float = 0.0,
        close: bool = False,
    ) -> _Outcome:
        body = encode_json(payload)
        by_status = self._counters.responses_by_status
        by_status[status] = by_status.get(status, 0) + 1
        self._responses.append(LoggedResponse(req.method, req.path, status, body))
        return _Outcome(status, body, headers, delay, close=close)

    def _over_limit(self, ip: str, klass: str, arrival: float) -> bool:
        """Sliding window: True if ``count`` requests already arrived in the last
        ``window`` seconds. The request is recorded either way."""
        count, window = self._limits[klass]
        times = self._arrivals.setdefault((ip, klass), [])
        del times[: bisect.bisect_right(times, arrival - window)]
        over = len(times) >= count
        bisect.insort(times, arrival)
        return over

    def _take_failure(self, path: str) -> int | None:
        for entry in self._failures:
            if path.endswith(entry[0]):
                entry[2] -= 1
                if entry[2] <= 0:
                    self._failures.remove(entry)
                return int(entry[1])
        return None

    def _authenticate(self, ip: str, fields: Mapping[str, str]) -> _Account | None:
        key = fields.get("public_key", "")
        account = self._accounts.get(key)
        time_text = fields.get("time", "")
        claimed = fields.get("hash", "")
        ok = (
            account is not None
            and account.active
            and fields.get("public_id") == account.public_id
            and _TIME_RE.fullmatch(time_text) is not None
            and abs(int(time_text) - self._clock()) <= self._tolerance
            and _HASH_RE.fullmatch(claimed) is not None
            and hash_matches(key, account.public_id, time_text, account.private_key, claimed)
        )
        if ok:
            return account
        c = self._counters
        c.unauthorized_attempts += 1
        label = key or "-"
        c.unauthorized_by_key[label] = c.unauthorized_by_key.get(label, 0) + 1
        attempts = self._unauthorized_by_ip.get(ip, 0) + 1
        self._unauthorized_by_ip[ip] = attempts
        if attempts >= self._block_after and ip not in self._blocked:
            self._blocked.add(ip)
            logger.warning("robicoin simulator: blocked %s after %d unauthorized", ip, attempts)
        return None

    def _ticker(self, req: _Request, endpoint: str) -> _Outcome:
        now = self._local(self._clock())
        rows = [market.ticker_row(endpoint, now) for market in self._markets.values()]
        return self._reply(req, 200, {"data": rows})

    def _create_order(
        self, req: _Request, account: _Account, fields: Mapping[str, str]
    ) -> _Outcome:
        side, pair = fields["side"], fields["type"]
        error = None
        if side not in ("buy", "sell"):
            error = "side must be buy or sell"
        elif pair not in self._markets:
            error = "unknown market type"
        elif not is_amount(fields["amount"]):
            error = "amount must be a positive decimal with at most 8 decimals"
        elif not is_amount(fields["price"]):
            error = "price must be a positive decimal with at most 8 decimals"
        elif fields["use_rbc"] not in ("0", "1"):
            error = "use_rbc must be 0 or 1"
        elif not is_amount(fields["stop_limit"], allow_zero=True):
            error = "stop_limit must be a decimal >= 0 with at most 8 decimals"
        price = Decimal(fields["price"]) if error is None else Decimal(1)
        amount = Decimal(fields["amount"]) if error is None else Decimal(1)
        if error is None and side == "buy":
            # A buy's amount is the TRY to spend; the order shows the coin it buys.
            exact = Context(prec=100, rounding=ROUND_DOWN)
            amount = exact.divide(amount, price).quantize(_Q8, rounding=ROUND_DOWN, context=exact)
            if amount <= 0:
                error = "amount too small for this price"
        if error is not None:
            self._counters.bad_requests += 1
            return self._reply(req, 400, {"error": error})
        order = self._open_order(account, pair, side, amount, price, "client")
        self._orders_created.append(
            {**fields, "received_at": self._clock(), "data_id": order.data_id}
        )
        self._counters.orders_created += 1
        if self._drop_creates > 0:
            self._drop_creates -= 1
            self._counters.dropped_responses += 1
            return _Outcome(0, "", drop=True)
        return self._reply(
            req, 200, {"success": "Order saved successfully."}, delay=self._create_delay
        )

    def _delete_order(
        self, req: _Request, account: _Account, fields: Mapping[str, str]
    ) -> _Outcome:
        data_id_text, pair = fields["data_id"], fields["type"]
        if not _DATA_ID_RE.fullmatch(data_id_text):
            self._counters.bad_requests += 1
            return self._reply(req, 400, {"error": "data_id must be an integer"})
        if pair not in self._markets:
            self._counters.bad_requests += 1
            return self._reply(req, 400, {"error": "unknown market type"})
        if self._refused_deletes:
            status, payload = self._refused_deletes.pop(0)
            return self._reply(req, status, payload)
        data_id = int(data_id_text)
        for order in account.open_orders:
            if order.data_id == data_id and order.pair == pair:
                account.open_orders.remove(order)
                self._orders_deleted.append(
                    {**fields, "received_at": self._clock(), "data_id": data_id}
                )
                self._counters.orders_deleted += 1
                if self._drop_deletes > 0:
                    self._drop_deletes -= 1
                    self._counters.dropped_responses += 1
                    return _Outcome(0, "", drop=True)
                return self._reply(req, 200, {"success": "Order deleted successfully."})
        return self._reply(req, *self._delete_not_found)

    # ---- state helpers (lock held) ---------------------------------------------------

    def _local(self, ts: float) -> datetime:
        return datetime.fromtimestamp(ts, self._zone)

    def _fmt(self, ts: float) -> str:
        return self._local(int(ts)).strftime(_TIME_FORMAT)

    def _account(self, public_key: str | None) -> _Account:
        return self._accounts[self._default_key if public_key is None else public_key]

    def _add_account(self, public_key: str, public_id: str, private_key: str) -> None:
        if not public_key or not public_id or not private_key:
            raise ValueError("public_key, public_id and private_key must be non-empty")
        balances = {}
        for currency in self._wallets:
            base = _INITIAL_BALANCE.get(currency, Decimal("1000"))
            if currency in self._active_wallets:
                balances[currency] = q8(base * Decimal(self._rng.uniform(0.5, 1.5)))
            else:
                balances[currency] = _ZERO8
        account = _Account(public_key, public_id, private_key, balances)
        self._accounts[public_key] = account
        # Some history from before the simulator started, oldest first, then a few
        # orders left open.
        gaps = [self._rng.randint(1, 600) for _ in range(self._initial_transactions)]
        ts = int(self._clock()) - sum(gaps)
        for gap in gaps:
            self._add_transaction(account, ts)
            ts += gap
        for _ in range(3):
            self._open_activity_order(account)

    def _seed_market_orders(self) -> None:
        now = int(self._clock())
        ts = now - 40 * 15
        for _ in range(40):
            ts += self._rng.randint(0, 15)
            self._add_market_order(min(ts, now))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _add_market_order(self, ts: int) -> None:
        market = self._rng.choice(list(self._markets.values()))
        side = self._rng.choice(("buy", "sell"))
        order = _Order(
            self._next_seq(),
            market.spec.pair,
            side,
            market.random_qty(),
            market.price(market.near_ticks(side)),
            self._fmt(ts),
            "market",
        )
        self._market_orders.append(order)
        if len(self._market_orders) > MARKET_ORDER_CAP:
            del self._market_orders[0]

    def _open_order(
        self, account: _Account, pair: str, side: str, amount: Decimal, price: Decimal, origin: str
    ) -> _Order:
        order = _Order(
            self._next_seq(),
            pair,
            side,
            amount,
            price,
            self._fmt(self._clock()),
            origin,
            self._next_data_id,
        )
        self._next_data_id += 1
        account.open_orders.append(order)
        return order

    def _open_activity_order(self, account: _Account) -> None:
        market = self._rng.choice(list(self._markets.values()))
        side = self._rng.choice(("buy", "sell"))
        price = market.price(market.near_ticks(side))
        self._open_order(account, market.spec.pair, side, market.random_qty(), price, "activity")

    def _all_open_orders(self) -> list[_Order]:
        """Market orders and every account's open orders, newest first."""
        orders = list(self._market_orders)
        for account in self._accounts.values():
            orders.extend(account.open_orders)
        return sorted(orders, key=lambda o: o.seq, reverse=True)

    def _balance_rows(self, account: _Account) -> list[Row]:
        reserved = dict.fromkeys(self._wallets, Decimal(0))
        for order in account.open_orders:
            market = self._markets[order.pair]
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
                "status": "active" if currency in self._active_wallets else "passive",
            }
            for currency in self._wallets
        ]

    # ---- transactions ----------------------------------------------------------------

    def _add_transaction(self, account: _Account, ts: int) -> TxRow:
        created_at = self._fmt(ts)
        previous = account.transactions[-1] if account.transactions else None
        if (
            previous is not None
            and previous["created_at"] == created_at
            and self._rng.random() < DUPLICATE_PROBABILITY
            and self._apply(account, account.last_deltas)
        ):
            row = dict(previous)  # two equal fills in the same second
        else:
            row = self._new_transaction(account, created_at)
        account.transactions.append(row)
        account.last_tx_ts = max(account.last_tx_ts, ts)
        self._counters.transactions_generated += 1
        return row

    def _new_transaction(self, account: _Account, created_at: str) -> TxRow:
        kind = self._rng.choices(("maker", "taker", "deposit", "withdraw"), (45, 30, 15, 10))[0]
        row: TxRow | None = None
        if kind == "maker":
            row = self._maker_fill(account, created_at)
        elif kind == "taker":
            market = self._rng.choice(list(self._markets.values()))
            side = self._rng.choice(("buy", "sell"))
            row = self._trade(
                account, "taker", market, side, market.random_qty(), market.price(), created_at
            )
        elif kind == "withdraw":
            row = self._withdraw(account, created_at)
        return row if row is not None else self._deposit(account, created_at)

    def _maker_fill(self, account: _Account, created_at: str) -> TxRow | None:
        """Fill one of the account's activity orders, or (none open) a resting order
        the simulator does not list."""
        mine = [o for o in account.open_orders if o.origin == "activity"]
        if mine:
            order = self._rng.choice(mine)
            account.open_orders.remove(order)
            market = self._markets[order.pair]
            return self._trade(
                account, "maker", market, order.side, order.amount, order.price, created_at
            )
        market = self._rng.choice(list(self._markets.values()))
        side = self._rng.choice(("buy", "sell"))
        price = market.price(market.near_ticks(side, 0.005))
        return self._trade(account, "maker", market, side, market.random_qty(), price, created_at)

    def _trade(
        self,
        account: _Account,
        zone: str,
        market: _Market,
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

    def _deposit(self, account: _Account, created_at: str) -> TxRow:
        currency = self._rng.choice(sorted(self._active_wallets))
        amount = self._coin_amount(currency)
        self._apply(account, {currency: amount})
        return self._movement("deposit", currency, amount, _ZERO8, created_at)

    def _withdraw(self, account: _Account, created_at: str) -> TxRow | None:
        currency = self._rng.choice(sorted(self._active_wallets))
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
        return Decimal(self._rng.randint(max(1, units // 50), units)) * _Q8

    def _txid(self, currency: str) -> str:
        if currency in ("btc", "ltc"):
            return f"{self._rng.getrandbits(256):064x}"
        if currency == "try":
            return f"{self._rng.getrandbits(128):032x}"
        return f"0x{self._rng.getrandbits(256):064x}"

    def _apply(self, account: _Account, deltas: Mapping[str, Decimal]) -> bool:
        """Move balances if none would go negative; remember the move for duplicates."""
        if any(account.balances.get(c, _ZERO8) + d < 0 for c, d in deltas.items()):
            return False
        for currency, delta in deltas.items():
            account.balances[currency] = q8(account.balances.get(currency, _ZERO8) + delta)
        account.last_deltas = dict(deltas)
        return True

    # ---- background activity ---------------------------------------------------------

    def _activity_loop(self) -> None:
        next_market = math.inf
        next_tx: dict[str, float] = {}
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                if next_market == math.inf:
                    next_market = self._schedule(now, self._market_rate)
                for key in self._accounts:
                    if key not in next_tx:
                        next_tx[key] = self._schedule(now, self._tps)
            due = min([next_market, *next_tx.values()])
            if self._stop.wait(min(max(0.0, due - now), 0.25)):
                return
            now = time.monotonic()
            try:
                with self._lock:
                    if now >= next_market:
                        next_market = self._schedule(now, self._market_rate)
                        if not self._paused:
                            self._market_tick()
                    for key, at in next_tx.items():
                        if now >= at:
                            next_tx[key] = self._schedule(now, self._tps)
                            if not self._paused:
                                self._account_tick(self._accounts[key])
            except Exception:  # keep the simulator alive; a test will see the log
                logger.exception("robicoin simulator activity failed")

    def _schedule(self, now: float, rate: float) -> float:
        """Poisson arrivals: several events can land in the same second."""
        return math.inf if rate <= 0 else now + self._rng.expovariate(rate)

    def _market_tick(self) -> None:
        ts = self._clock()
        market = self._rng.choice(list(self._markets.values()))
        market.trade(self._local(ts))
        self._add_market_order(int(ts))
        if len(self._market_orders) > 60 and self._rng.random() < 0.6:
            del self._market_orders[self._rng.randrange(len(self._market_orders))]

    def _account_tick(self, account: _Account) -> None:
        self._add_transaction(account, int(self._clock()))
        activity = [o for o in account.open_orders if o.origin == "activity"]
        roll = self._rng.random()
        if roll < 0.35 and len(activity) < ACTIVITY_ORDER_CAP:
            self._open_activity_order(account)
        elif roll < 0.45 and activity:
            account.open_orders.remove(self._rng.choice(activity))


def _route(path: str) -> tuple[str | None, str]:
    """(endpoint, allowed method); endpoint None for an unknown path."""
    if path == TICKER_PATH:
        return "24h", "GET"
    if path.startswith(TICKER_PATH + "/") and path[len(TICKER_PATH) + 1 :] in TICKER_WINDOWS:
        return path[len(TICKER_PATH) + 1 :], "GET"
    if path.startswith(API_PREFIX + "/") and path[len(API_PREFIX) + 1 :] in POST_ENDPOINTS:
        return path[len(API_PREFIX) + 1 :], "POST"
    return None, ""


# --------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------


class _BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], simulator: RobicoinSimulator) -> None:
        self.simulator = simulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), slow on some machines.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            if open_:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def close_connections(self) -> None:
        """Keep-alive connections would outlive ``shutdown()``: end them too."""
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "robicoin-simulator"
    timeout = 120  # an idle keep-alive connection is closed after this
    # Headers and body go out in two writes: without TCP_NODELAY the body waits for the
    # client's delayed ACK (~40 ms), which would make 10 requests per 100 ms impossible.
    disable_nagle_algorithm = True
    arrival = 0.0

    def handle(self) -> None:
        # A client that gave up (timeout, reset) is normal here, not a server error.
        with contextlib.suppress(ConnectionError):
            super().handle()

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        self._server().track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._server().track(self.connection, False)

    def _server(self) -> _Server:
        server = self.server
        assert isinstance(server, _Server)
        return server

    def parse_request(self) -> bool:
        # Called right after the request line is read: that is the arrival time.
        self.arrival = time.monotonic()
        return super().parse_request()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("robicoin simulator %s: " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _handle(self) -> None:
        body, body_error = b"", None
        try:
            body = self._read_body()
        except _BodyError as exc:
            body_error = (exc.status, exc.message)
            self.close_connection = True
        except (OSError, ValueError):
            self.close_connection = True
            return
        raw_path = self.path
        path = raw_path.split("?", 1)[0] if raw_path.startswith("/") else urlsplit(raw_path).path
        request = _Request(
            method=self.command,
            path=path,
            ip=self.client_address[0],
            arrival=self.arrival,
            content_type=self.headers.get("Content-Type"),
            body=body,
            body_error=body_error,
        )
        try:
            outcome = self._server().simulator.handle(request)
        except Exception:
            logger.exception("robicoin simulator failed on %s %s", self.command, path)
            outcome = _Outcome(500, '{"error":"Internal server error"}', close=True)
        if outcome.delay > 0:
            time.sleep(outcome.delay)
        if outcome.drop:
            self.close_connection = True
            return
        data = outcome.body.encode("utf-8")
        self.send_response(outcome.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in outcome.headers:
            self.send_header(name, value)
        if outcome.close or self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _read_body(self) -> bytes:
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None:
            if encoding.strip().lower() != "chunked":
                raise _BodyError(400, "unsupported Transfer-Encoding")
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        if not length.strip().isdigit():
            raise _BodyError(400, "invalid Content-Length")
        size = int(length)
        if size > MAX_BODY_BYTES:
            raise _BodyError(413, "request body too large")
        data = self.rfile.read(size)
        if len(data) != size:
            raise ValueError("connection closed inside the body")
        return data

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1026)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError as exc:
                raise _BodyError(400, "malformed chunked body") from exc
            if size == 0:
                while self.rfile.readline(1026) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise _BodyError(413, "request body too large")
            chunks.append(self.rfile.read(size))
            if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise _BodyError(400, "malformed chunked body")


# --------------------------------------------------------------------------------------
# Entry points for synchronous callers and the CLI
# --------------------------------------------------------------------------------------


class SimulatorThread:
    """A :class:`RobicoinSimulator` started on entry and stopped on exit.

    The simulator already serves from its own daemon threads and is thread-safe, so this
    only owns the lifecycle and forwards the control surface.
    """

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._simulator: RobicoinSimulator | None = None

    @property
    def simulator(self) -> RobicoinSimulator:
        if self._simulator is None:
            raise RuntimeError("simulator thread not started")
        return self._simulator

    @property
    def port(self) -> int:
        return self.simulator.port

    @property
    def base_url(self) -> str:
        return self.simulator.base_url

    def start(self) -> SimulatorThread:
        if self._simulator is not None:
            raise RuntimeError("simulator thread already started")
        self._simulator = RobicoinSimulator(**self._options).start()
        return self

    def stop(self) -> None:
        simulator, self._simulator = self._simulator, None
        if simulator is not None:
            simulator.stop()

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- forwarded control surface ---------------------------------------------------

    def counters(self) -> dict[str, Any]:
        return self.simulator.counters()

    @property
    def response_log(self) -> list[LoggedResponse]:
        return self.simulator.response_log

    def last_body(self, path: str) -> str | None:
        return self.simulator.last_body(path)

    def transactions(self, public_key: str | None = None) -> list[TxRow]:
        return self.simulator.transactions(public_key)

    def open_orders(self, public_key: str | None = None) -> list[Row]:
        return self.simulator.open_orders(public_key)

    def balances(self, public_key: str | None = None) -> list[Row]:
        return self.simulator.balances(public_key)

    def market_orders(self) -> list[Row]:
        return self.simulator.market_orders()

    def orders_created(self) -> list[dict[str, Any]]:
        return self.simulator.orders_created()

    def orders_deleted(self) -> list[dict[str, Any]]:
        return self.simulator.orders_deleted()

    def burst(self, n: int, same_second: bool = True, public_key: str | None = None) -> list[TxRow]:
        return self.simulator.burst(n, same_second, public_key)

    def pause_activity(self) -> None:
        self.simulator.pause_activity()

    def resume_activity(self) -> None:
        self.simulator.resume_activity()

    def set_key_active(self, public_key: str, active: bool) -> None:
        self.simulator.set_key_active(public_key, active)

    def add_account(self, public_key: str, public_id: str, private_key: str) -> None:
        self.simulator.add_account(public_key, public_id, private_key)

    def unblock(self, ip: str | None = None) -> None:
        self.simulator.unblock(ip)

    def set_create_delay(self, seconds: float) -> None:
        self.simulator.set_create_delay(seconds)

    def set_drop_create_response(self, n: int) -> None:
        self.simulator.set_drop_create_response(n)

    def fail_next(self, path_suffix: str, status: int, n: int = 1) -> None:
        self.simulator.fail_next(path_suffix, status, n)


def _banner(simulator: RobicoinSimulator, accounts: Mapping[str, tuple[str, str]]) -> Iterable[str]:
    yield "Robicoin simulator running (Ctrl-C to stop)"
    yield f"  base URL    : {simulator.base_url}"
    for public_key, (public_id, private_key) in accounts.items():
        yield f"  public_key  : {public_key}"
        yield f"  public_id   : {public_id}"
        yield f"  private_key : {private_key}   (simulator credentials)"
    yield f"  pairs       : {', '.join(PAIRS)}"


def main(port: int = 8766, requests_rate: float = 2.0, host: str = "127.0.0.1") -> None:
    """Run a simulator in the foreground until Ctrl-C or SIGTERM.

    ``requests_rate`` is the account activity (transactions per second); the market
    moves twice as fast.
    """
    accounts = {DEFAULT_PUBLIC_KEY: (DEFAULT_PUBLIC_ID, DEFAULT_PRIVATE_KEY)}
    simulator = RobicoinSimulator(
        host=host,
        port=port,
        transactions_per_second=requests_rate,
        market_orders_per_second=2 * requests_rate,
        accounts=accounts,
    )
    stop = threading.Event()
    previous: Any = None
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    simulator.start()
    try:
        for line in _banner(simulator, accounts):
            print(line, flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        simulator.stop()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
