"""Shared set-up for the Robicoin poller tests: simulator + config + runner."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from connectors.robicoin.config import (
    AccountShare,
    AuthGuardSettings,
    RateLimitSettings,
    RobicoinConfig,
    RobicoinSettings,
    SnapshotStream,
    Streams,
    StreamSettings,
    TickerStream,
    Topics,
)
from connectors.robicoin.plugin import PLUGIN
from connectors.runtime.settings import KafkaSettings, RuntimeSettings
from connectors.simulators.robicoin import (
    DEFAULT_PRIVATE_KEY,
    DEFAULT_PUBLIC_ID,
    DEFAULT_PUBLIC_KEY,
)
from connectors.testing import ConnectorThread, unique
from connectors.testing.robicoin import credentials, sink_topics

CHANNEL_FIELDS = ("ticker", "order", "balance", "transaction", "open_order")


def topics(prefix: str) -> Topics:
    return Topics(
        **{f: f"{prefix}.{f}" for f in CHANNEL_FIELDS},
        dead_letter=f"{prefix}.dlq",
        state=f"{prefix}.state",
    )


def streams(
    interval_s: float = 0.3, windows: list[str] | None = None, enabled: set[str] | None = None
) -> Streams:
    """Streams in ``enabled`` (default: all) polled every ``interval_s``."""
    on = {name: enabled is None or name in enabled for name in CHANNEL_FIELDS}
    return Streams(
        ticker=TickerStream(
            enabled=on["ticker"], interval_s=interval_s, windows=windows or ["24h"]
        ),
        order=StreamSettings(enabled=on["order"], interval_s=interval_s),
        balance=SnapshotStream(enabled=on["balance"], interval_s=interval_s),
        transaction=StreamSettings(enabled=on["transaction"], interval_s=interval_s),
        open_order=SnapshotStream(enabled=on["open_order"], interval_s=interval_s),
    )


def make_config(
    base_url: str,
    bootstrap: str,
    *,
    prefix: str | None = None,
    public_key: str = DEFAULT_PUBLIC_KEY,
    public_id: str = DEFAULT_PUBLIC_ID,
    private_key: str = DEFAULT_PRIVATE_KEY,
    guard_topic: str | None = None,
    guard_limit: int = 2,
    slots: int = 1,
    **settings: Any,
) -> RobicoinConfig:
    prefix = prefix or unique()
    base = RobicoinSettings(
        base_url=base_url,
        credentials=credentials(public_key, public_id, private_key),
        streams=streams(),
        topics=topics(prefix),
        auth_guard=AuthGuardSettings(
            limit=guard_limit, topic=guard_topic or f"{prefix}.guard", recheck_s=0.5
        ),
        rate_limit=RateLimitSettings(share=AccountShare(slots=slots, slot=0)),
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        transactional_id=f"{prefix}-poller",
    )
    return RobicoinConfig(
        robicoin=replace(base, **settings),
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        runtime=RuntimeSettings(health_host="127.0.0.1", health_port=0, drain_timeout_s=10),
    )


def run(config: RobicoinConfig) -> ConnectorThread:
    return ConnectorThread(PLUGIN, config)


def canonical(row: Any) -> str:
    return json.dumps(row, sort_keys=True, separators=(",", ":"))


# -- order sink --------------------------------------------------------------------------


def sink_config(
    base_url: str,
    bootstrap: str,
    *,
    prefix: str | None = None,
    slots: int = 1,
    **settings: Any,
) -> Any:
    from connectors.robicoin.sink_config import (
        ConsumerSettings,
        OrderSinkConfig,
        OrderSinkSettings,
        RiskSettings,
    )

    prefix = prefix or unique()
    base = OrderSinkSettings(
        base_url=base_url,
        credentials=credentials(),
        topics=sink_topics(prefix),
        consumer=ConsumerSettings(
            group_id=f"{prefix}-orders",
            max_poll_interval_ms=3000,
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
        ),
        auth_guard=AuthGuardSettings(topic=f"{prefix}.guard", recheck_s=0.5),
        rate_limit=RateLimitSettings(share=AccountShare(slots=slots, slot=0)),
        pairs=["btc-try", "eth-try", "ltc-try", "usdt-try"],
        # Tests send bursts; the per-minute risk limit has its own test.
        risk=RiskSettings(max_orders_per_minute=0),
        reconcile_settle_s=0.2,
        request_timeout_s=2.0,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        transactional_id=f"{prefix}-orders",
    )
    return OrderSinkConfig(
        robicoin=replace(base, **settings),
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        runtime=RuntimeSettings(health_host="127.0.0.1", health_port=0, drain_timeout_s=10),
    )


def write_sink_config(
    path: Path,
    base_url: str,
    bootstrap: str,
    port: int,
    *,
    robicoin: dict[str, Any] | None = None,
    kafka: dict[str, Any] | None = None,
    runtime: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sink's YAML file as a user writes it (for tests that run it as a process);
    ``robicoin``/``kafka``/``runtime`` override keys of those sections."""
    prefix = unique()
    cfg: dict[str, Any] = {
        "robicoin": {
            "base_url": base_url,
            "pairs": ["btc-try"],
            "request_timeout_s": 3,
            "reconcile_settle_s": 0.2,
            "command_max_age_s": 0,  # commands may wait through restarts and outages
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "rate_limit": {"share": {"slots": 1, "slot": 0}},
            "risk": {"max_orders_per_minute": 0},
            "auth_guard": {"topic": f"{prefix}.guard"},
            "consumer": {
                "group_id": f"{prefix}-orders",
                "max_poll_interval_ms": 3000,
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
            },
            "topics": {
                "commands": f"{prefix}.commands",
                "results": f"{prefix}.results",
                "ledger": f"{prefix}.ledger",
                "dead_letter": f"{prefix}.dlq",
                "control": f"{prefix}.control",
            },
            **(robicoin or {}),
        },
        "kafka": {"bootstrap_servers": bootstrap, **(kafka or {})},
        "runtime": {"health_host": "127.0.0.1", "health_port": port, **(runtime or {})},
    }
    path.write_text(yaml.safe_dump(cfg))
    return cfg


def run_sink(config: Any) -> ConnectorThread:
    from connectors.robicoin.plugin import ORDERS_PLUGIN

    return ConnectorThread(ORDERS_PLUGIN, config)


def create_command(command_id: str, amount: str, *, now_ms: int, **extra: Any) -> dict[str, Any]:
    cmd: dict[str, Any] = {
        "command_id": command_id,
        "action": "create",
        "pair": "btc-try",
        "side": "sell",
        "amount": amount,
        "price": "2500000.00",
        "created_at": now_ms,
    }
    cmd.update(extra)
    return cmd


class CommandProducer:
    """Writes commands (dicts as JSON, or raw bytes) to the commands topic."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaProducer

        self.topic = topic
        self._producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")

    def send(self, command: dict[str, Any] | bytes, key: bytes | None = None) -> Any:
        value = command if isinstance(command, bytes) else json.dumps(command).encode()
        if key is None and isinstance(command, dict) and isinstance(command.get("pair"), str):
            key = command["pair"].encode()
        return self._producer.send(self.topic, value=value, key=key).get(timeout=30)

    def control(self, topic: str, **change: Any) -> None:
        self._producer.send(topic, value=json.dumps(change).encode(), key=b"control").get(
            timeout=30
        )

    def close(self) -> None:
        self._producer.close(timeout=5)
