"""Registers the Robicoin REST poller with the runtime (entry point target)."""

from __future__ import annotations

import contextlib
from typing import Any

from connectors.robicoin.config import (
    AccountShare,
    CredentialSettings,
    RateLimitSettings,
    RobicoinConfig,
    RobicoinSettings,
    Streams,
    TickerStream,
)
from connectors.runtime.authguard import GuardSpec
from connectors.runtime.config import Secret
from connectors.runtime.plugins import Connector, ConnectorPlugin, DemoPart
from connectors.runtime.settings import demo_sections


def _create(config: Any) -> Connector:
    from connectors.robicoin.streams import create

    return create(config)


def _auth_guard(config: Any) -> GuardSpec | None:
    from connectors.robicoin.streams import RobicoinPolling

    return RobicoinPolling(config).guard_spec()


def _simulate(host: str, port: int, rate: float) -> None:
    """``rate`` is the account activity (transactions per second); the market moves
    twice as fast."""
    from connectors.simulators.harness import serve_in_foreground
    from connectors.simulators.robicoin import RobicoinSimulator

    serve_in_foreground(
        RobicoinSimulator(
            host=host,
            port=port,
            transactions_per_second=rate,
            market_orders_per_second=2 * rate,
        )
    )


def _demo(bootstrap: str, stack: contextlib.ExitStack) -> DemoPart:
    from connectors.simulators.harness import Harness
    from connectors.simulators.robicoin import (
        DEFAULT_PRIVATE_KEY,
        DEFAULT_PUBLIC_ID,
        DEFAULT_PUBLIC_KEY,
        RobicoinSimulator,
    )

    sim = stack.enter_context(Harness(RobicoinSimulator(transactions_per_second=2.0)))
    config = RobicoinConfig(
        robicoin=RobicoinSettings(
            base_url=sim.base_url,
            credentials=CredentialSettings(
                public_key=Secret(DEFAULT_PUBLIC_KEY),
                public_id=Secret(DEFAULT_PUBLIC_ID),
                private_key=Secret(DEFAULT_PRIVATE_KEY),
            ),
            streams=Streams(ticker=TickerStream(windows=["24h", "1min", "1hour"])),
            rate_limit=RateLimitSettings(share=AccountShare(slots=2, slot=0)),
        ),
        **demo_sections(bootstrap),
    )
    return DemoPart(config=config)


PLUGIN = ConnectorPlugin(
    name="robicoin-poller",
    exchange="robicoin",
    kind="source",
    summary="Robicoin REST poller: ticker, order, balance, transaction, open-order",
    config_type=RobicoinConfig,
    create=_create,
    simulate=_simulate,
    demo=_demo,
    example_config="deploy/config/robicoin-poller.yaml",
    auth_guard=_auth_guard,
)


def _create_sink(config: Any) -> Connector:
    from connectors.robicoin.sink import create

    return create(config)


def _sink_guard(config: Any) -> GuardSpec | None:
    from connectors.robicoin.sink import RobicoinOrders

    return RobicoinOrders(config).guard_spec()


def _demo_sink(bootstrap: str, stack: contextlib.ExitStack) -> DemoPart:
    import json
    import time

    from kafka import KafkaProducer

    from connectors.robicoin.sink_config import (
        ConsumerSettings,
        OrderSinkConfig,
        OrderSinkSettings,
    )
    from connectors.simulators.harness import Harness
    from connectors.simulators.robicoin import (
        DEFAULT_PRIVATE_KEY,
        DEFAULT_PUBLIC_ID,
        DEFAULT_PUBLIC_KEY,
        RobicoinSimulator,
    )

    sim = stack.enter_context(Harness(RobicoinSimulator(transactions_per_second=0.5)))
    config = OrderSinkConfig(
        robicoin=OrderSinkSettings(
            base_url=sim.base_url,
            credentials=CredentialSettings(
                public_key=Secret(DEFAULT_PUBLIC_KEY),
                public_id=Secret(DEFAULT_PUBLIC_ID),
                private_key=Secret(DEFAULT_PRIVATE_KEY),
            ),
            reconcile_settle_s=0.2,
            # Some embedded brokers hold a group join for about this long.
            consumer=ConsumerSettings(max_poll_interval_ms=6000, session_timeout_ms=6000),
        ),
        **demo_sections(bootstrap),
    )

    def feed() -> None:
        """A few sample commands: three orders, one refused by validation, one delete
        of an order that does not exist, one record that is not JSON."""
        now = int(time.time() * 1000)
        samples: list[dict[str, Any] | bytes] = [
            {
                "command_id": f"demo-{now}-1",
                "action": "create",
                "pair": "btc-try",
                "side": "buy",
                "amount": "1500.00",
                "price": "2500000.00",
                "created_at": now,
            },
            {
                "command_id": f"demo-{now}-2",
                "action": "create",
                "pair": "eth-try",
                "side": "sell",
                "amount": "0.25",
                "price": "125000.50",
                "created_at": now,
            },
            {
                "command_id": f"demo-{now}-3",
                "action": "create",
                "pair": "ltc-try",
                "side": "buy",
                "amount": "300",
                "price": "3500.1",
                "created_at": now,
            },
            {
                "command_id": f"demo-{now}-4",
                "action": "create",
                "pair": "doge-try",
                "side": "buy",
                "amount": "1",
                "price": "1",
                "created_at": now,
            },
            {
                "command_id": f"demo-{now}-5",
                "action": "delete",
                "pair": "btc-try",
                "data_id": 999999,
                "created_at": now,
            },
            b"this is not a command",
        ]
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        try:
            for sample in samples:
                value = sample if isinstance(sample, bytes) else json.dumps(sample).encode()
                key = None if isinstance(sample, bytes) else str(sample["pair"]).encode()
                producer.send(config.robicoin.topics.commands, value=value, key=key)
            producer.flush(timeout=10)
        finally:
            producer.close(timeout=5)

    return DemoPart(config=config, on_started=feed)


def _orders_config_type() -> type[Any]:
    from connectors.robicoin.sink_config import OrderSinkConfig

    return OrderSinkConfig


ORDERS_PLUGIN = ConnectorPlugin(
    name="robicoin-orders",
    exchange="robicoin",
    kind="sink",
    summary="Robicoin order commands from Kafka: create-order / delete-order, effect-once",
    config_type=_orders_config_type(),
    create=_create_sink,
    simulate=_simulate,
    demo=_demo_sink,
    example_config="deploy/config/robicoin-orders.yaml",
    auth_guard=_sink_guard,
)
