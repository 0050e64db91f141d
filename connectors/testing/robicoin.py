"""Robicoin config parts the tests and the benchmarks share: the simulator's built-in
account (nothing here is a real secret) and topic names under one prefix."""

from __future__ import annotations

from connectors.robicoin.config import CredentialSettings
from connectors.robicoin.sink_config import SinkTopics
from connectors.runtime.config import Secret
from connectors.simulators.robicoin import (
    DEFAULT_PRIVATE_KEY,
    DEFAULT_PUBLIC_ID,
    DEFAULT_PUBLIC_KEY,
)


def credentials(
    public_key: str = DEFAULT_PUBLIC_KEY,
    public_id: str = DEFAULT_PUBLIC_ID,
    private_key: str = DEFAULT_PRIVATE_KEY,
) -> CredentialSettings:
    """The simulator's own account unless told otherwise."""
    return CredentialSettings(
        public_key=Secret(public_key), public_id=Secret(public_id), private_key=Secret(private_key)
    )


def sink_topics(prefix: str) -> SinkTopics:
    """The order sink's five topics under ``prefix``."""
    return SinkTopics(
        commands=f"{prefix}.commands",
        results=f"{prefix}.results",
        ledger=f"{prefix}.ledger",
        dead_letter=f"{prefix}.dlq",
        control=f"{prefix}.control",
    )
