"""Cryptomus WebSocket protocol: frames in, typed events out; requests built as text.

Pure functions only: no sockets, no Kafka, no clock. Decimals keep the exchange's
exact text: JSON numbers are decoded into :class:`~connectors.runtime.wire.JsonNumber`
(a ``str`` holding the literal), so ``0.00000001`` stays ``"0.00000001"`` (``Decimal``
would print ``1E-8``), and are checked with the one wire layer (:mod:`connectors.runtime.wire`).

Sample update frame::

    {"id":0,"method":"trade_update","data":{"symbol":"BTC_USDT","timestamp":1750953177,
     "trades":[{"price":107100.01,"quantity":0.000254,"timestamp":1750953177,
     "direction":"buy"}]},"error":null}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import InvalidOperation
from typing import Any

from connectors.runtime import wire
from connectors.runtime.errors import BadMessage, ConfigError
from connectors.runtime.records import Event as Event
from connectors.runtime.session import ErrorInfo, Reply, Update

EXCHANGE = "cryptomus"
PUBLIC_CHANNELS = ("lastprice", "depth", "ticker", "trade")
PRIVATE_CHANNELS = ("order", "balance", "deal")
CHANNELS = PUBLIC_CHANNELS + PRIVATE_CHANNELS

_REPLY_METHODS = {"pong", "ping"} | {
    f"{c}_{op}" for c in CHANNELS for op in ("subscribe", "unsubscribe")
}


#: Decode JSON keeping every number's text (:func:`connectors.runtime.wire.loads`);
#: raises ``BadMessage("invalid_json")``.
loads = wire.loads


# -- frames ------------------------------------------------------------------------------


def _id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) or type(value) is int:  # a number, or a string id ("3")
        return str(value)
    raise BadMessage("invalid_frame", f"id has type {type(value).__name__}")


def _error(value: Any) -> ErrorInfo | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return ErrorInfo(None, str(value)[:200])
    code = value.get("code")
    try:
        code_int = int(code) if code is not None else None
    except (TypeError, ValueError):
        code_int = None
    return ErrorInfo(code_int, str(value.get("message", ""))[:200])


def parse_frame(text: str | bytes) -> Reply | Update:
    """Turn one WebSocket text frame into a Reply or an Update.

    Raises :class:`BadMessage` with reason ``invalid_json``, ``invalid_frame``,
    ``unknown_method`` or ``invalid_payload``.
    """
    obj = wire.loads_fast(text)
    if not isinstance(obj, dict):
        raise BadMessage("invalid_frame", f"frame is a JSON {type(obj).__name__}, not an object")
    method = obj.get("method")
    if method is not None and not isinstance(method, str):
        raise BadMessage("invalid_frame", "method is not a string")
    if method is not None and method.endswith("_update"):
        channel = method[: -len("_update")]
        parser = _UPDATE_PARSERS.get(channel)
        if parser is None:
            raise BadMessage("unknown_method", f"unknown update method {method!r}")
        if obj.get("error") is not None:
            raise BadMessage("invalid_payload", f"{method} carries an error")
        data = obj.get("data")
        try:
            events = parser(data)
        except BadMessage:
            raise
        except (KeyError, TypeError, ValueError, InvalidOperation) as exc:
            raise BadMessage("invalid_payload", f"{method}: {type(exc).__name__}: {exc}") from None
        return Update(channel, events)
    error = _error(obj.get("error"))
    if method is not None and method not in _REPLY_METHODS and error is None:
        raise BadMessage("unknown_method", f"unknown method {method!r}")
    if "data" not in obj and "error" not in obj:
        raise BadMessage("invalid_frame", "neither data nor error in frame")
    return Reply(_id(obj.get("id")), method, obj.get("data"), error)


# -- field helpers ---------------------------------------------------------------------


#: Every mistake in an update's data is ``invalid_payload`` on Cryptomus.
_FIELDS = wire.Fields.uniform("invalid_payload")
_need = _FIELDS.need
dec = _FIELDS.decimal
opt_dec = _FIELDS.opt_decimal
#: Unix seconds (integer or decimal) to integer milliseconds.
ts_ms = _FIELDS.unix_ms
opt_ts_ms = _FIELDS.opt_unix_ms
text = _FIELDS.text
opt_text = _FIELDS.opt_text
one_of = _FIELDS.one_of
integer = _FIELDS.integer
boolean = _FIELDS.boolean


_is_number = wire.JSON_NUMBER.fullmatch


def _levels(value: Any, field: str) -> list[list[str]]:
    if not isinstance(value, list):
        raise BadMessage("invalid_payload", f"{field} is not a list")
    out = []
    for i, level in enumerate(value):
        if not isinstance(level, list) or len(level) != 2:
            raise BadMessage("invalid_payload", f"{field}[{i}] is not a [price, quantity] pair")
        price, quantity = level
        # The documented form (two decimal strings) in one step; anything else through
        # the readers, which accept numbers too and name what is wrong.
        if (
            type(price) is str
            and type(quantity) is str
            and _is_number(price)
            and _is_number(quantity)
        ):
            out.append([price, quantity])
        else:
            out.append([dec(price, f"{field}[{i}].price"), dec(quantity, f"{field}[{i}].quantity")])
    return out


# -- update parsers (one per channel) ----------------------------------------------------


def parse_lastprice(data: Any) -> list[Event]:
    """``{"symbol":"BTC_USDT","timestamp":1750953362,"price":"107152.55"}``"""
    symbol = text(_need(data, "symbol"), "symbol")
    return [
        Event(
            "lastprice",
            symbol,
            ts_ms(_need(data, "timestamp"), "timestamp"),
            {"price": dec(_need(data, "price"), "price")},
        )
    ]


_TICKER_FIELDS = ("price", "open", "high", "low", "volume", "quote_volume", "price_change")


def parse_ticker(data: Any) -> list[Event]:
    """``{"symbol":"BTC_USDT","timestamp":1750953144,"price":"107090.35","open":...}``"""
    symbol = text(_need(data, "symbol"), "symbol")
    fields = {name: dec(_need(data, name), name) for name in _TICKER_FIELDS}
    return [Event("ticker", symbol, ts_ms(_need(data, "timestamp"), "timestamp"), fields)]


def parse_depth(data: Any) -> list[Event]:
    """``{"symbol":"BTC_USDT","timestamp":1750952911,"full_reload":false,"scale_index":0,
    "asks":[["107043.93","0.304313"]],"bids":[["106976.11","0"]]}`` ("0" = level gone)."""
    symbol = text(_need(data, "symbol"), "symbol")
    body = {
        "scale_index": integer(_need(data, "scale_index"), "scale_index"),
        "full_reload": boolean(_need(data, "full_reload"), "full_reload"),
        "asks": _levels(_need(data, "asks"), "asks"),
        "bids": _levels(_need(data, "bids"), "bids"),
    }
    return [Event("depth", symbol, ts_ms(_need(data, "timestamp"), "timestamp"), body)]


def parse_trade(data: Any) -> list[Event]:
    """One event per trade; price and quantity arrive as JSON numbers and stay exact."""
    symbol = text(_need(data, "symbol"), "symbol")
    update_ts = opt_ts_ms(data.get("timestamp"), "timestamp")
    trades = _need(data, "trades")
    if not isinstance(trades, list):
        raise BadMessage("invalid_payload", "trades is not a list")
    events = []
    for i, trade in enumerate(trades):
        when = (
            opt_ts_ms(trade.get("timestamp"), f"trades[{i}].timestamp")
            if isinstance(trade, Mapping)
            else None
        )
        body = {
            "price": dec(_need(trade, "price"), f"trades[{i}].price"),
            "quantity": dec(_need(trade, "quantity"), f"trades[{i}].quantity"),
            "side": one_of(_need(trade, "direction"), f"trades[{i}].direction", ("buy", "sell")),
        }
        events.append(Event("trade", symbol, when if when is not None else update_ts, body))
    return events


_ORDER_EVENTS = ("created", "updated", "finished")


def parse_order(data: Any) -> list[Event]:
    """``{"type":"created","info":{"id":"01JY...","symbol":"TRX_USDT","orderType":"limit",
    "direction":"sell","price":"0.22...","quantity":"50.0...", ...,"createTs":1750696376}}``"""
    kind = one_of(_need(data, "type"), "type", _ORDER_EVENTS)
    info = _need(data, "info")
    created = ts_ms(_need(info, "createTs"), "info.createTs")
    updated = opt_ts_ms(info.get("updateTs"), "info.updateTs")
    finished = opt_ts_ms(info.get("finishTs"), "info.finishTs")
    body = {
        "event": kind,
        "order_id": text(_need(info, "id"), "info.id"),
        "order_type": text(_need(info, "orderType"), "info.orderType"),
        "side": one_of(_need(info, "direction"), "info.direction", ("buy", "sell")),
        "price": opt_dec(info.get("price"), "info.price"),
        "quantity": opt_dec(info.get("quantity"), "info.quantity"),
        "value": opt_dec(info.get("value"), "info.value"),
        "filled_quantity": dec(_need(info, "filledQuantity"), "info.filledQuantity"),
        "filled_value": dec(_need(info, "filledValue"), "info.filledValue"),
        "client_order_id": opt_text(info.get("clientOid"), "info.clientOid"),
        "created_at_ms": created,
        "updated_at_ms": updated,
        "finished_at_ms": finished,
        "state": opt_text(info.get("state"), "info.state"),
        "internal_state": opt_text(info.get("internalState"), "info.internalState"),
    }
    event_time = finished if kind == "finished" and finished else updated or created
    symbol = text(_need(info, "symbol"), "info.symbol")
    return [Event("order", symbol, event_time, body)]


def parse_balance(data: Any) -> list[Event]:
    """``{"info":{"walletId":"01J7...","currencyCode":"USDT","amount":"50.0...",
    "oldBalance":"40000.0...","newBalance":"39950.00000000"}}`` (no timestamp)."""
    info = _need(data, "info")
    currency = text(_need(info, "currencyCode"), "info.currencyCode")
    body = {
        "wallet_id": text(_need(info, "walletId"), "info.walletId"),
        "currency": currency,
        "amount": dec(_need(info, "amount"), "info.amount"),
        "old_balance": dec(_need(info, "oldBalance"), "info.oldBalance"),
        "new_balance": dec(_need(info, "newBalance"), "info.newBalance"),
    }
    return [Event("balance", currency, None, body)]


def parse_deal(data: Any) -> list[Event]:
    """``{"info":{"dealId":"01JY...","symbol":"TRX_USDT","dealState":"completed",
    "filledPrice":"0.27...","fee":"1.09...","feeCurrency":"USDT","tradeRole":"taker",
    "committedAt":1750774869, ...}}``"""
    info = _need(data, "info")
    committed = ts_ms(_need(info, "committedAt"), "info.committedAt")
    body = {
        "deal_id": text(_need(info, "dealId"), "info.dealId"),
        "deal_state": text(_need(info, "dealState"), "info.dealState"),
        "transaction_id": opt_text(info.get("transactionId"), "info.transactionId"),
        "filled_price": dec(_need(info, "filledPrice"), "info.filledPrice"),
        "filled_quantity": dec(_need(info, "filledQuantity"), "info.filledQuantity"),
        "filled_value": dec(_need(info, "filledValue"), "info.filledValue"),
        "fee": dec(_need(info, "fee"), "info.fee"),
        "fee_currency": text(_need(info, "feeCurrency"), "info.feeCurrency"),
        "trade_role": one_of(_need(info, "tradeRole"), "info.tradeRole", ("maker", "taker")),
        "committed_at_ms": committed,
    }
    return [Event("deal", text(_need(info, "symbol"), "info.symbol"), committed, body)]


_UPDATE_PARSERS: dict[str, Callable[[Any], list[Event]]] = {
    "lastprice": parse_lastprice,
    "depth": parse_depth,
    "ticker": parse_ticker,
    "trade": parse_trade,
    "order": parse_order,
    "balance": parse_balance,
    "deal": parse_deal,
}


# -- requests ------------------------------------------------------------------------------


class CryptomusDialect:
    """How Cryptomus spells requests (``{"id":..,"method":..,"params":[..]}``) and
    frames: the :class:`~connectors.runtime.session.Dialect` of the streaming runtime."""

    #: 1 = wrong request, 2 = unknown method: the error codes the documentation names.
    known_error_codes = frozenset({1, 2})
    parse = staticmethod(parse_frame)

    @staticmethod
    def request(req_id: int, method: str, params: Sequence[str] = ()) -> str:
        body = {"id": req_id, "method": method, "params": list(params)}
        return json.dumps(body, separators=(",", ":"))

    def is_pong(self, reply: Reply) -> bool:
        return reply.method == "pong"

    def ping(self, req_id: int) -> str:
        """``{"id":0,"method":"ping","params":[]}``"""
        return self.request(req_id, "ping")

    def subscribe(self, req_id: int, channel: str, params: Sequence[str]) -> str:
        """One request per data type carrying every market (re-subscribing is rejected)."""
        return self.request(req_id, f"{channel}_subscribe", params)

    def unsubscribe(self, req_id: int, channel: str) -> str:
        return self.request(req_id, f"{channel}_unsubscribe", ["all"])


DIALECT = CryptomusDialect()


# -- REST answers and subscription planning -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Market:
    symbol: str
    base: str
    quote: str


def parse_token(body: bytes | str) -> str:
    """``{"token": "168b34a3...a094"}``"""
    obj = loads(body)
    token = obj.get("token") if isinstance(obj, dict) else None
    if not wire.is_text(token) or not token:
        raise BadMessage("invalid_payload", "token answer holds no token")
    return token


def parse_markets(body: bytes | str) -> list[Market]:
    """``{"result":[{"id":"01HS...","symbol":"BTC_USDT","baseCurrency":"BTC",...}]}``"""
    obj = loads(body)
    rows = obj.get("result") if isinstance(obj, dict) else None
    if not isinstance(rows, list):
        raise BadMessage("invalid_payload", "market list has no result array")
    return [
        Market(
            text(_need(r, "symbol"), "symbol"),
            text(_need(r, "baseCurrency"), "baseCurrency"),
            text(_need(r, "quoteCurrency"), "quoteCurrency"),
        )
        for r in rows
    ]


def parse_scales(body: bytes | str) -> dict[int, str]:
    """``{"status":"success","message":"success","data":[{"scale":"0.01","index":0}]}``"""
    obj = loads(body)
    if not isinstance(obj, dict) or obj.get("status") != "success":
        raise BadMessage("invalid_payload", "symbol-scales answer is not a success")
    rows = obj.get("data")
    if not isinstance(rows, list):
        raise BadMessage("invalid_payload", "symbol-scales answer has no data array")
    return {integer(_need(r, "index"), "index"): dec(_need(r, "scale"), "scale") for r in rows}


def plan_subscriptions(
    channels: Sequence[str],
    markets: Sequence[str] | None,
    market_list: Sequence[Market],
    depth_scales: Mapping[str, Sequence[int]],
    balance_currencies: Sequence[str] | None,
) -> dict[str, list[str]]:
    """The params of the one subscribe request per channel.

    ``markets=None`` means every market: ``["all"]`` for channels that take it, and
    an explicit ``MARKET:index`` list for depth (a scale index is per market).
    """
    known = {m.symbol: m for m in market_list}
    if markets is not None:
        unknown = [m for m in markets if m not in known]
        if unknown:
            raise ConfigError(f"markets not listed by the exchange: {', '.join(unknown)}")
    chosen = list(markets) if markets is not None else sorted(known)
    plan: dict[str, list[str]] = {}
    for channel in channels:
        if channel not in CHANNELS:
            raise ConfigError(f"unknown channel {channel!r} (known: {', '.join(CHANNELS)})")
        if channel == "depth":
            plan[channel] = [f"{m}:{i}" for m in chosen for i in depth_scales.get(m, ())]
            if not plan[channel]:
                raise ConfigError("depth is enabled but no market has a scale index")
        elif channel == "balance":
            if balance_currencies:
                plan[channel] = list(balance_currencies)
            elif markets is None:
                plan[channel] = ["all"]
            else:
                plan[channel] = sorted({known[m].base for m in chosen})
        else:
            plan[channel] = ["all"] if markets is None else list(chosen)
    return plan


def marker_keys(channel: str, params: Sequence[str], market_list: Sequence[Market]) -> list[str]:
    """The record keys a resync marker goes to, so it lands in each key's partition."""
    if list(params) == ["all"]:
        if channel == "balance":
            return sorted({m.base for m in market_list} | {m.quote for m in market_list})
        return sorted(m.symbol for m in market_list)
    return sorted({p.split(":", 1)[0] for p in params})
