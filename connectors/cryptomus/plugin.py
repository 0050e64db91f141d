"""Registers the Cryptomus WebSocket source with the runtime (entry point target)."""

from __future__ import annotations

import contextlib
from typing import Any

from connectors.cryptomus.config import Credentials, CryptomusConfig, CryptomusSettings
from connectors.runtime.app import RuntimeSettings
from connectors.runtime.config import Secret
from connectors.runtime.kafka import KafkaSettings
from connectors.runtime.plugins import Connector, ConnectorPlugin, DemoPart


def _create(config: Any) -> Connector:
    from connectors.cryptomus.source import CryptomusSource

    return CryptomusSource(config)


def _simulate(host: str, port: int, rate: float) -> None:
    from connectors.cryptomus import simulator

    simulator.main(port=port, updates_per_second=rate, host=host)


def _demo(bootstrap: str, stack: contextlib.ExitStack) -> DemoPart:
    from connectors.cryptomus.protocol import CHANNELS
    from connectors.cryptomus.simulator import DEFAULT_API_KEY, DEFAULT_USER_ID, SimulatorThread

    sim = stack.enter_context(SimulatorThread(updates_per_second=4.0))
    config = CryptomusConfig(
        cryptomus=CryptomusSettings(
            ws_url=sim.ws_url,
            api_url=sim.base_url,
            scales_url=sim.base_url,
            channels=list(CHANNELS),
            credentials=Credentials(
                user_id=Secret(DEFAULT_USER_ID), api_key=Secret(DEFAULT_API_KEY)
            ),
        ),
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        runtime=RuntimeSettings(health_host="127.0.0.1", health_port=0),
    )
    return DemoPart(config=config)


PLUGIN = ConnectorPlugin(
    name="cryptomus-ws",
    exchange="cryptomus",
    kind="source",
    summary="Cryptomus WebSocket: lastprice, depth, ticker, trade, order, balance, deal",
    config_type=CryptomusConfig,
    create=_create,
    simulate=_simulate,
    demo=_demo,
    example_config="deploy/config/cryptomus-ws.yaml",
)
