"""Registers the Cryptomus WebSocket source with the runtime (entry point target)."""

from __future__ import annotations

import contextlib
from typing import Any

from connectors.cryptomus.config import Credentials, CryptomusConfig, CryptomusSettings
from connectors.runtime.config import Secret
from connectors.runtime.plugins import Connector, ConnectorPlugin, DemoPart
from connectors.runtime.settings import demo_sections


def _create(config: Any) -> Connector:
    from connectors.cryptomus.stream import CryptomusStream
    from connectors.runtime.streaming import StreamingSource

    return StreamingSource(CryptomusStream(config))


def _simulate(host: str, port: int, rate: float) -> None:
    from connectors.simulators.cryptomus import CryptomusSimulator
    from connectors.simulators.harness import serve_in_foreground

    serve_in_foreground(CryptomusSimulator(host=host, port=port, updates_per_second=rate))


def _demo(bootstrap: str, stack: contextlib.ExitStack) -> DemoPart:
    from connectors.cryptomus.protocol import CHANNELS
    from connectors.simulators.cryptomus import DEFAULT_API_KEY, DEFAULT_USER_ID, CryptomusSimulator
    from connectors.simulators.harness import Harness

    sim = stack.enter_context(Harness(CryptomusSimulator(updates_per_second=4.0)))
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
        **demo_sections(bootstrap),
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
