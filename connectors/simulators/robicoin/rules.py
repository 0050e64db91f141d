"""The Robicoin exchange's rules, as the simulator enforces them.

From ``shared/spec/robicoin-rest.md``, in this order for every request:

1. **Blocked IP** → ``403 {"error": "IP blocked"}`` (any path, ticker included). An IP is
   blocked after ``block_after`` (10) unauthorized attempts; ``control.unblock`` lifts it.
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
   delete → 404 (not an auth failure; ``control.set_delete_not_found`` changes it, e.g. to
   ``400 {"error": "Order not found."}``).

:class:`Exchange` decides each answer from a parsed :class:`Request` and never touches a
socket; the server reads requests and writes the :class:`Outcome`. All state sits
behind ``Exchange.lock`` (the market's too), taken once per request.
"""

from __future__ import annotations

import bisect
import dataclasses
import email.message
import email.parser
import email.policy
import http
import json
import logging
import re
import threading
from collections import deque
from collections.abc import Callable, Mapping
from decimal import ROUND_DOWN, Context, Decimal
from typing import Any, Final
from urllib.parse import parse_qsl

from connectors.robicoin.signing import hash_matches
from connectors.simulators.robicoin.market import TICKER_WINDOWS, Account, Market

logger = logging.getLogger(__name__)

DEFAULT_PUBLIC_KEY: Final = "sim-public-key"
DEFAULT_PUBLIC_ID: Final = "1001"
DEFAULT_PRIVATE_KEY: Final = "sim-private-key"

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
RESPONSE_LOG_SIZE: Final = 10_000

_Q8: Final = Decimal("1E-8")
_TIME_RE: Final = re.compile(r"[0-9]{1,12}")
_HASH_RE: Final = re.compile(r"[0-9a-f]{32}")
_DECIMAL_RE: Final = re.compile(r"(0|[1-9][0-9]{0,19})(\.[0-9]{1,8})?")
_DATA_ID_RE: Final = re.compile(r"[0-9]{1,18}")


# --------------------------------------------------------------------------------------
# Wire helpers
# --------------------------------------------------------------------------------------


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
# Requests, answers, counters
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoggedResponse:
    """One answer as served: the body is the exact text on the wire."""

    method: str
    path: str
    status: int
    body: str


@dataclasses.dataclass
class Counters:
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
    injected_failures: int = 0
    dropped_responses: int = 0


@dataclasses.dataclass(frozen=True)
class Request:
    """One HTTP request as read off the socket (``arrival`` is ``time.monotonic()``)."""

    method: str
    path: str
    ip: str
    arrival: float
    content_type: str | None
    body: bytes
    body_error: tuple[int, str] | None = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What to write back: ``drop`` closes the connection without an answer."""

    status: int
    body: str
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0
    drop: bool = False
    close: bool = False


@dataclasses.dataclass
class Faults:
    """What a test told the exchange to get wrong (see ``control``)."""

    #: ``[path_suffix, status, remaining]`` per :meth:`RobicoinControl.fail_next` call.
    failures: list[list[Any]] = dataclasses.field(default_factory=list)
    create_delay: float = 0.0
    drop_creates: int = 0
    #: How delete-order answers an order that is not open.
    delete_not_found: tuple[int, object] = (404, {"error": "Order not found"})
    #: Canned refusals of open orders, and answers dropped after deleting.
    refused_deletes: list[tuple[int, object]] = dataclasses.field(default_factory=list)
    drop_deletes: int = 0


def route(path: str) -> tuple[str | None, str]:
    """(endpoint, allowed method); endpoint None for an unknown path."""
    if path == TICKER_PATH:
        return "24h", "GET"
    if path.startswith(TICKER_PATH + "/") and path[len(TICKER_PATH) + 1 :] in TICKER_WINDOWS:
        return path[len(TICKER_PATH) + 1 :], "GET"
    if path.startswith(API_PREFIX + "/") and path[len(API_PREFIX) + 1 :] in POST_ENDPOINTS:
        return path[len(API_PREFIX) + 1 :], "POST"
    return None, ""


# --------------------------------------------------------------------------------------
# The exchange
# --------------------------------------------------------------------------------------


class Exchange:
    """The rules above applied to one market; thread-safe (everything under ``lock``)."""

    def __init__(
        self,
        market: Market,
        *,
        clock: Callable[[], float],
        time_tolerance_s: float,
        block_after: int,
        limits: Mapping[str, tuple[int, float]],
    ) -> None:
        self.lock = threading.Lock()
        self.market = market
        self._clock = clock
        self._tolerance = time_tolerance_s
        self._block_after = block_after
        self._limits = dict(limits)
        self.counters = Counters()
        self.responses: deque[LoggedResponse] = deque(maxlen=RESPONSE_LOG_SIZE)
        self.orders_created: list[dict[str, Any]] = []
        self.orders_deleted: list[dict[str, Any]] = []
        self._arrivals: dict[tuple[str, str], list[float]] = {}
        self.unauthorized_by_ip: dict[str, int] = {}
        self.blocked: set[str] = set()
        self.faults = Faults()

    def handle(self, request: Request) -> Outcome:
        """Decide the answer to one request. Everything but the create delay happens
        under the lock, so counters and state always agree."""
        with self.lock:
            return self._handle_locked(request)

    def _handle_locked(self, req: Request) -> Outcome:
        c = self.counters
        c.requests += 1
        c.requests_by_path[req.path] = c.requests_by_path.get(req.path, 0) + 1
        klass = (
            "ticker"
            if req.path == TICKER_PATH or req.path.startswith(TICKER_PATH + "/")
            else "other"
        )
        over_limit = self._over_limit(req.ip, klass, req.arrival)
        if req.ip in self.blocked:
            c.blocked_requests += 1
            return self._reply(req, 403, {"error": "IP blocked"})
        if over_limit:
            c.rate_limit_violations[klass] += 1
            return self._reply(req, 429, {"error": "Too many requests"})
        if req.body_error is not None:
            c.bad_requests += 1
            status, message = req.body_error
            return self._reply(req, status, {"error": message}, close=True)

        endpoint, allowed = route(req.path)
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
            rows = [o.market_row() for o in self.market.all_open_orders()[:PAGE_SIZE]]
            return self._reply(req, 200, {"data": rows})
        if endpoint == "balance":
            return self._reply(req, 200, {"data": self.market.balance_rows(account)})
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
        req: Request,
        status: int,
        payload: object,
        *,
        headers: tuple[tuple[str, str], ...] = (),
        delay: float = 0.0,
        close: bool = False,
    ) -> Outcome:
        body = encode_json(payload)
        by_status = self.counters.responses_by_status
        by_status[status] = by_status.get(status, 0) + 1
        self.responses.append(LoggedResponse(req.method, req.path, status, body))
        return Outcome(status, body, headers, delay, close=close)

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
        for entry in self.faults.failures:
            if path.endswith(entry[0]):
                entry[2] -= 1
                if entry[2] <= 0:
                    self.faults.failures.remove(entry)
                return int(entry[1])
        return None

    def _authenticate(self, ip: str, fields: Mapping[str, str]) -> Account | None:
        key = fields.get("public_key", "")
        account = self.market.accounts.get(key)
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
        c = self.counters
        c.unauthorized_attempts += 1
        label = key or "-"
        c.unauthorized_by_key[label] = c.unauthorized_by_key.get(label, 0) + 1
        attempts = self.unauthorized_by_ip.get(ip, 0) + 1
        self.unauthorized_by_ip[ip] = attempts
        if attempts >= self._block_after and ip not in self.blocked:
            self.blocked.add(ip)
            logger.warning("robicoin simulator: blocked %s after %d unauthorized", ip, attempts)
        return None

    def _ticker(self, req: Request, endpoint: str) -> Outcome:
        return self._reply(req, 200, {"data": self.market.ticker_rows(endpoint)})

    def _create_order(self, req: Request, account: Account, fields: Mapping[str, str]) -> Outcome:
        side, pair = fields["side"], fields["type"]
        error = None
        if side not in ("buy", "sell"):
            error = "side must be buy or sell"
        elif pair not in self.market.pairs:
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
            self.counters.bad_requests += 1
            return self._reply(req, 400, {"error": error})
        order = self.market.open_order(account, pair, side, amount, price, "client")
        self.orders_created.append(
            {**fields, "received_at": self._clock(), "data_id": order.data_id}
        )
        self.counters.orders_created += 1
        if self.faults.drop_creates > 0:
            self.faults.drop_creates -= 1
            self.counters.dropped_responses += 1
            return Outcome(0, "", drop=True)
        return self._reply(
            req, 200, {"success": "Order saved successfully."}, delay=self.faults.create_delay
        )

    def _delete_order(self, req: Request, account: Account, fields: Mapping[str, str]) -> Outcome:
        data_id_text, pair = fields["data_id"], fields["type"]
        if not _DATA_ID_RE.fullmatch(data_id_text):
            self.counters.bad_requests += 1
            return self._reply(req, 400, {"error": "data_id must be an integer"})
        if pair not in self.market.pairs:
            self.counters.bad_requests += 1
            return self._reply(req, 400, {"error": "unknown market type"})
        if self.faults.refused_deletes:
            status, payload = self.faults.refused_deletes.pop(0)
            return self._reply(req, status, payload)
        data_id = int(data_id_text)
        for order in account.open_orders:
            if order.data_id == data_id and order.pair == pair:
                account.open_orders.remove(order)
                self.orders_deleted.append(
                    {**fields, "received_at": self._clock(), "data_id": data_id}
                )
                self.counters.orders_deleted += 1
                if self.faults.drop_deletes > 0:
                    self.faults.drop_deletes -= 1
                    self.counters.dropped_responses += 1
                    return Outcome(0, "", drop=True)
                return self._reply(req, 200, {"success": "Order deleted successfully."})
        return self._reply(req, *self.faults.delete_not_found)
