"""Shared set-up for the Cryptomus connector tests: simulator + config + runner."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from connectors.cryptomus.config import Credentials, CryptomusConfig, CryptomusSettings, Topics
from connectors.cryptomus.plugin import PLUGIN
from connectors.cryptomus.protocol import CHANNELS
from connectors.runtime.config import Secret
from connectors.runtime.settings import KafkaSettings, RuntimeSettings
from connectors.simulators.cryptomus import DEFAULT_API_KEY, DEFAULT_USER_ID, CryptomusSimulator
from connectors.simulators.harness import Harness
from connectors.testing import ConnectorThread, unique


def topics(prefix: str) -> Topics:
    return Topics(**{f: f"{prefix}.{f}" for f in (*CHANNELS, "dead_letter")})


def make_config(
    sim: Harness[CryptomusSimulator],
    bootstrap: str,
    *,
    prefix: str | None = None,
    user_id: str = DEFAULT_USER_ID,
    api_key: str = DEFAULT_API_KEY,
    kafka: dict[str, Any] | None = None,
    **settings: Any,
) -> CryptomusConfig:
    base = CryptomusSettings(
        ws_url=sim.ws_url,
        api_url=sim.base_url,
        scales_url=sim.base_url,
        channels=list(CHANNELS),
        credentials=Credentials(user_id=Secret(user_id), api_key=Secret(api_key)),
        topics=topics(prefix or unique()),
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
    )
    return CryptomusConfig(
        cryptomus=replace(base, **settings),
        kafka=KafkaSettings(bootstrap_servers=bootstrap, **(kafka or {})),
        runtime=RuntimeSettings(health_host="127.0.0.1", health_port=0, drain_timeout_s=10),
    )


def run(config: CryptomusConfig) -> ConnectorThread:
    return ConnectorThread(PLUGIN, config)
