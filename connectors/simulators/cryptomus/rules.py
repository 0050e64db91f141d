"""The Cryptomus exchange's rules, as the simulator enforces them.

From ``shared/spec/cryptomus-websocket.md``:

* the token endpoint answers only a known ``userId`` whose ``sign`` header is
  ``md5(base64(body) + api_key)`` (a GET signs the empty body);
* a WebSocket token is single-use and expires after 5 minutes; the handshake on ``/ws``
  without a valid ``token`` query parameter is answered with HTTP 401;
* text that is not JSON closes the connection; a badly shaped request gets error code 1,
  any other failure (unknown method, unknown market, repeated subscribe) error code 2;
* subscribing again to a data type that is already subscribed on the connection is
  rejected: changing the market list means unsubscribe, then subscribe again; for
  order/balance/deal an empty unsubscribe list means all;
* the unsubscribe answer carries no ``method``, as published.

(The 60 s idle close is the server's: it is a matter of time, not of what was sent.)

Nothing here touches a socket: the server hands in what arrived and sends what comes
back, so one connection's answers and counters are decided in one place.
"""

from __future__ import annotations

import dataclasses
import http
import json
import re
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Final

from connectors.cryptomus.signing import signature_matches
from connectors.simulators.cryptomus.market import Feed, Market, dumps, fmt_plain

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

#: An HTTP answer: status and the JSON payload.
Answer = tuple[http.HTTPStatus, object]


def _is_request_id(value: object) -> bool:
    """Ids are integers (spec) or strings (seen in published examples); bools are not."""
    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(value, str)


def _reject_constant(name: str) -> Any:
    """``json.loads`` accepts NaN/Infinity; the exchange's JSON parser would not."""
    raise ValueError(f"invalid JSON constant {name}")


@dataclasses.dataclass
class Counters:
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


class NotJson(Exception):
    """The client sent text that is not JSON: the exchange closes the connection."""


class RequestError(Exception):
    """A request the exchange answers with an error envelope (code 1 or 2)."""

    def __init__(
        self,
        code: int,
        message: str,
        request_id: int | str | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.method = method


@dataclasses.dataclass(frozen=True)
class Call:
    """A well-formed request: ``{"id": ..., "method": ..., "params": [...]}``."""

    id: int | str
    method: str
    params: list[Any]

    def error(self, code: int, message: str) -> RequestError:
        return RequestError(code, message, self.id, self.method)


@dataclasses.dataclass
class Token:
    user_id: str
    issued_at: float
    used: bool = False


@dataclasses.dataclass
class Subscription:
    """What one ``<type>_subscribe`` established; ``all_markets`` when params were ``["all"]``."""

    keys: set[str]
    all_markets: bool
    cursor: int = 0

    def params(self) -> list[str]:
        return ["all"] if self.all_markets else sorted(self.keys)


@dataclasses.dataclass
class Session:
    """One WebSocket connection as the exchange sees it: who, what it subscribed, what
    it was shown."""

    connection_id: int
    user_id: str
    subscriptions: dict[str, Subscription] = dataclasses.field(default_factory=dict)
    feed: Feed = dataclasses.field(default_factory=Feed)


class Exchange:
    """Accounts, tokens and the request rules, with the counters and logs tests read."""

    def __init__(
        self,
        *,
        accounts: Mapping[str, str],
        market: Market,
        token_ttl_s: float,
        clock: Callable[[], float],
        log_maxlen: int,
    ) -> None:
        self.accounts: dict[str, str] = dict(accounts)
        self.market = market
        self._token_ttl_s = token_ttl_s
        self._clock = clock
        self.tokens: dict[str, Token] = {}
        self.counters = Counters(updates_sent={t: 0 for t in UPDATE_TYPES})
        #: ``(connection_id, type, raw_text)`` of every update frame sent.
        self.sent_log: deque[tuple[int, str, str]] = deque(maxlen=log_maxlen)
        #: ``(connection_id, method, params)`` of every parsed client request.
        self.requests: deque[tuple[int, str | None, Any]] = deque(maxlen=log_maxlen)

    # ---- tokens and REST -------------------------------------------------------------

    def issue_token(self, user_id: str = DEFAULT_USER_ID) -> str:
        if user_id not in self.accounts:
            raise KeyError(user_id)
        token = secrets.token_hex(32)
        self.tokens[token] = Token(user_id=user_id, issued_at=self._clock())
        self.counters.tokens_issued += 1
        return token

    def admit(self, headers: Mapping[str, str], query: Mapping[str, list[str]]) -> Answer | str:
        """The ``/ws`` handshake: the user id its token was issued to, or the refusal."""
        if "websocket" not in headers.get("Upgrade", "").lower():
            return http.HTTPStatus.UPGRADE_REQUIRED, {"message": "WebSocket upgrade required"}
        token_text = (query.get("token") or [""])[0]
        token = self.tokens.get(token_text)
        if token is None:
            self.counters.token_invalid += 1
            return http.HTTPStatus.UNAUTHORIZED, {"message": "Invalid token"}
        if token.used:
            self.counters.token_reuse_attempts += 1
            return http.HTTPStatus.UNAUTHORIZED, {"message": "Token already used"}
        if self._clock() - token.issued_at > self._token_ttl_s:
            self.counters.token_expired += 1
            return http.HTTPStatus.UNAUTHORIZED, {"message": "Token expired"}
        # Consumed at the handshake: process_request and the 101 response run without
        # yielding, so two handshakes racing on one token cannot both pass.
        token.used = True
        return token.user_id

    def http_get(
        self, path: str, query: Mapping[str, list[str]], headers: Mapping[str, str]
    ) -> Answer:
        """The REST GETs the stream needs: token, market list, depth scales."""
        if path == TOKEN_PATH:
            return self._token_endpoint(headers)
        if path in MARKETS_PATHS:
            entries = [spec.market_list_entry() for spec in self.market.markets.values()]
            return http.HTTPStatus.OK, {"result": entries}
        if path == SCALES_PATH:
            return self._scales_endpoint(query)
        return http.HTTPStatus.NOT_FOUND, {"message": "Not found"}

    def _token_endpoint(self, headers: Mapping[str, str]) -> Answer:
        user_id = headers.get("userId")
        api_key = self.accounts.get(user_id) if user_id else None
        if user_id is None or api_key is None:
            return http.HTTPStatus.NOT_FOUND, {"message": "Not found"}
        claimed = headers.get("sign", "")
        # websockets' HTTP parser refuses request bodies, so a GET always signs b"".
        if not claimed or not signature_matches(b"", api_key, claimed):
            self.counters.bad_signatures += 1
            return http.HTTPStatus.UNAUTHORIZED, {"message": "Invalid Sign."}
        return http.HTTPStatus.OK, {"token": self.issue_token(user_id)}

    def _scales_endpoint(self, query: Mapping[str, list[str]]) -> Answer:
        symbol = (query.get("symbol") or [""])[0]
        if not symbol:
            return http.HTTPStatus.BAD_REQUEST, {
                "status": "error",
                "message": "The symbol field is required.",
            }
        spec = self.market.markets.get(symbol)
        if spec is None:
            return http.HTTPStatus.NOT_FOUND, {"status": "error", "message": "Symbol not found"}
        data = [{"scale": fmt_plain(scale), "index": i} for i, scale in enumerate(spec.scales)]
        return http.HTTPStatus.OK, {"status": "success", "message": "success", "data": data}

    # ---- requests on a connection ----------------------------------------------------

    def decode(self, session: Session, message: str | bytes) -> Call:
        """The request in one client frame, logged for :meth:`requests`.

        Raises :class:`NotJson` for text that is not JSON (not a request, not logged)
        and :class:`RequestError` (code 1) for a badly shaped one; ``method`` is logged
        as None and ``params`` as whatever was sent when the shape is wrong.
        """
        try:
            request = json.loads(message, parse_float=Decimal, parse_constant=_reject_constant)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.counters.invalid_json_closes += 1
            raise NotJson from None
        if not isinstance(request, dict):
            self.requests.append((session.connection_id, None, None))
            raise RequestError(ERR_FORMAT, "Invalid message format")
        raw_id = request.get("id")
        raw_method = request.get("method")
        params = request.get("params")
        request_id = raw_id if _is_request_id(raw_id) else None
        method = raw_method if isinstance(raw_method, str) else None
        self.requests.append((session.connection_id, method, params))
        if request_id is None or method is None or not isinstance(params, list):
            raise RequestError(ERR_FORMAT, "Invalid message format", request_id, method)
        return Call(request_id, method, params)

    def error_reply(self, error: RequestError) -> str:
        self.counters.error_replies += 1
        reply = {
            "id": error.request_id,
            "method": error.method,
            "data": None,
            "error": {"code": error.code, "message": error.message},
        }
        return dumps(reply)

    def pong(self, call: Call) -> str:
        self.counters.pings += 1
        return dumps({"id": call.id, "method": "pong", "data": None, "error": None})

    def route(self, call: Call) -> tuple[str, str]:
        """``(type, "subscribe" | "unsubscribe")`` of a request that is not a ping."""
        match = _METHOD_RE.match(call.method)
        if match is None:
            raise call.error(ERR_OTHER, f"Unknown method: {call.method}")
        if not all(isinstance(p, str) for p in call.params):
            raise call.error(ERR_FORMAT, "Invalid message format")
        return match.group(1), match.group(2)

    def subscribe(self, session: Session, call: Call, kind: str) -> tuple[Subscription, str]:
        """The subscription a ``<kind>_subscribe`` establishes and its answer; the caller
        records it and sends the answer (and depth snapshots) under the send lock."""
        if kind in session.subscriptions:
            self.counters.repeated_subscribe_rejections += 1
            raise call.error(ERR_OTHER, "already subscribed")
        if not call.params:
            raise call.error(ERR_OTHER, "params must list at least one market or 'all'")
        keys, all_markets = self._resolve_params(call, kind)
        reply = {
            "id": call.id,
            "method": f"{kind}_subscribe",
            "data": {"status": "success"},
            "error": None,
        }
        return Subscription(keys=keys, all_markets=all_markets), dumps(reply)

    def unsubscribe(self, session: Session, call: Call, kind: str) -> str:
        """Drop what a ``<kind>_unsubscribe`` names from the session; the answer."""
        params = call.params
        if not params and kind not in _EMPTY_MEANS_ALL:
            raise call.error(ERR_OTHER, "params must list at least one market or 'all'")
        sub = session.subscriptions.get(kind)
        if not params or "all" in params:
            removed = set(sub.keys) if sub else set()
            session.subscriptions.pop(kind, None)
        else:
            keys, _ = self._resolve_params(call, kind)
            removed = keys & sub.keys if sub else set()
            if sub is not None:
                sub.keys -= keys
                sub.all_markets = False
                if not sub.keys:
                    del session.subscriptions[kind]
        if kind == "depth":
            for key in removed:
                session.feed.books.pop(key, None)
        elif kind == "order":
            for key in removed:
                session.feed.orders.pop(key, None)
        # As published: the unsubscribe answer has no "method".
        return dumps({"id": call.id, "data": {"status": "success"}, "error": None})

    def _all_keys(self, kind: str) -> list[str]:
        if kind == "balance":
            return list(self.market.currencies)
        if kind == "depth":
            return [
                f"{symbol}:{i}"
                for symbol, spec in self.market.markets.items()
                for i in range(len(spec.scales))
            ]
        return list(self.market.markets)

    def _validate_key(self, call: Call, kind: str, key: str) -> None:
        if kind == "balance":
            if key not in self.market.currencies:
                raise call.error(ERR_OTHER, f"Unknown currency: {key}")
            return
        if kind == "depth":
            match = _DEPTH_PARAM_RE.match(key)
            if match is None:
                raise call.error(ERR_OTHER, f"Invalid depth param (want MARKET:scale): {key}")
            spec = self.market.markets.get(match.group(1))
            if spec is None:
                raise call.error(ERR_OTHER, f"Unknown market: {match.group(1)}")
            if int(match.group(2)) >= len(spec.scales):
                raise call.error(ERR_OTHER, f"Unknown scale index: {key}")
            return
        if key not in self.market.markets:
            raise call.error(ERR_OTHER, f"Unknown market: {key}")

    def _resolve_params(self, call: Call, kind: str) -> tuple[set[str], bool]:
        """Validate every param before touching state: a bad one rejects the request."""
        if "all" in call.params:
            return set(self._all_keys(kind)), True
        for key in call.params:
            self._validate_key(call, kind, key)
        return set(call.params), False

    # ---- what was sent ---------------------------------------------------------------

    def record_update(self, connection_id: int, kind: str, frame: tuple[str, int]) -> None:
        """Log and count one update frame the server handed to a socket."""
        text, trades = frame
        self.sent_log.append((connection_id, kind, text))
        self.counters.updates_sent[kind] = self.counters.updates_sent.get(kind, 0) + 1
        self.counters.trades_sent += trades
