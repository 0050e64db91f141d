"""The Toyex plugin: everything a new WebSocket exchange writes, and nothing else.

A dialect (parse one frame, spell ping/subscribe/unsubscribe), a plan (what to
subscribe, which keys get markers), the URL of a connection and its config. No loop,
no reconnect, no Kafka, no metrics: those are the streaming runtime's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from connectors.runtime import wire
from connectors.runtime.context import RuntimeContext
from connectors.runtime.errors import BadMessage
from connectors.runtime.plugins import Connector, ConnectorPlugin
from connectors.runtime.records import Event
from connectors.runtime.session import ErrorInfo, Plan, Reply, Update
from connectors.runtime.settings import KafkaSettings, RuntimeSettings, StreamSettings
from connectors.runtime.streaming import StreamingSource

EXCHANGE = "toyex"
CHANNELS = ("quotes", "trades")


@dataclass(frozen=True)
class ToySettings:
    url: str = "ws://127.0.0.1:1/stream"
    symbols: list[str] = field(default_factory=lambda: ["AAA", "BBB", "CCC"])
    channels: list[str] = field(default_factory=lambda: list(CHANNELS))
    topic_prefix: str = "toyex"
    stream: StreamSettings = field(default_factory=StreamSettings)


@dataclass(frozen=True)
class ToyConfig:
    toyex: ToySettings = field(default_factory=ToySettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)


def _decimal(value: Any, name: str) -> str:
    if not wire.is_json_decimal(value):
        raise BadMessage("invalid_payload", f"{name} is not a decimal")
    return str(value)


class ToyDialect:
    known_error_codes = frozenset({7})

    def parse(self, frame: str | bytes) -> Reply | Update:
        obj = wire.loads(frame)
        if not isinstance(obj, dict):
            raise BadMessage("invalid_frame", "not a JSON object")
        op = obj.get("op")
        if op in ("ack", "pong"):
            return Reply(str(obj.get("id")), op, None, None)
        if op == "nack":
            code = obj.get("code")
            return Reply(str(obj.get("id")), op, None, ErrorInfo(int(code) if code else None, ""))
        if op != "data":
            raise BadMessage("unknown_method", f"unknown op {str(op)[:40]!r}")
        channel, symbol, ts = obj.get("channel"), obj.get("symbol"), obj.get("ts")
        if channel not in CHANNELS or not wire.is_text(symbol) or not wire.is_json_decimal(ts):
            raise BadMessage("invalid_payload", "data without channel, symbol or ts")
        when = int(ts)
        if channel == "quotes":
            data = {"bid": _decimal(obj.get("bid"), "bid"), "ask": _decimal(obj.get("ask"), "ask")}
            return Update(channel, [Event(channel, symbol, when, data)])
        trades = obj.get("trades")
        if not isinstance(trades, list):
            raise BadMessage("invalid_payload", "trades is not a list")
        return Update(
            channel,
            [
                Event(
                    channel,
                    symbol,
                    when,
                    {
                        "price": _decimal(t.get("px"), "px"),
                        "quantity": _decimal(t.get("qty"), "qty"),
                    },
                )
                for t in trades
                if isinstance(t, dict)
            ],
        )

    def is_pong(self, reply: Reply) -> bool:
        return reply.method == "pong"

    def ping(self, req_id: int) -> str:
        return f'{{"op":"ping","id":{req_id}}}'

    def subscribe(self, req_id: int, channel: str, params: Sequence[str]) -> str:
        symbols = ",".join(f'"{s}"' for s in params)
        return f'{{"op":"subscribe","id":{req_id},"channel":"{channel}","symbols":[{symbols}]}}'

    def unsubscribe(self, req_id: int, channel: str) -> str:
        return f'{{"op":"unsubscribe","id":{req_id},"channel":"{channel}"}}'


class ToyStream:
    exchange = EXCHANGE
    dialect = ToyDialect()

    def __init__(self, config: ToyConfig) -> None:
        s = config.toyex
        self.url = s.url
        self.symbols = list(s.symbols)
        self.settings = s.stream
        self.topics = {ch: f"{s.topic_prefix}.{ch}" for ch in s.channels}
        self.dead_letter_topic = f"{s.topic_prefix}.dead-letter"

    def attach(self, ctx: RuntimeContext) -> None:
        pass

    def load_plan(self) -> Plan:
        return Plan(
            {ch: self.symbols for ch in self.topics},
            {ch: sorted(self.symbols) for ch in self.topics},
        )

    def connect_url(self) -> str:
        return self.url


def _create(config: Any) -> Connector:
    return StreamingSource(ToyStream(config))


PLUGIN = ConnectorPlugin(
    name="toyex-ws",
    exchange=EXCHANGE,
    kind="source",
    summary="Toyex: a fake exchange for the tests",
    config_type=ToyConfig,
    create=_create,
)
