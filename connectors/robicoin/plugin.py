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
from connectors.runtime.app import RuntimeSettings
from connectors.runtime.authguard import GuardSpec
from connectors.runtime.config import Secret
from connectors.runtime.kafka import KafkaSettings
from connectors.runtime.plugins import Connector, ConnectorPlugin, DemoPart


def _create(config: Any) -> Connector:
    from connectors.robicoin.source import create

    return create(config)


def _auth_guard(config: Any) -> GuardSpec | None:
    from connectors.robicoin.source import RobicoinPoller

    return RobicoinPoller(config).guard_spec()


def _simulate(host: str, port: int, rate: float) -> None:
    from connectors.robicoin import simulator

    simulator.main(port=port, requests_rate=rate, host=host)


def _demo(bootstrap: str, stack: contextlib.ExitStack) -> DemoPart:
    from connectors.robicoin.simulator import (
        DEFAULT_PRIVATE_KEY,
        DEFAULT_PUBLIC_ID,
        DEFAULT_PUBLIC_KEY,
        SimulatorThread,
    )

    sim = stack.enter_context(SimulatorThread(transactions_per_second=2.0))
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
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        runtime=RuntimeSettings(health_host="127.0.0.1", health_port=0),
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
