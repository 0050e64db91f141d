from __future__ import annotations

from collections.abc import Iterator

import pytest

from connectors.runtime.broker import kafka_broker


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A real Kafka-protocol broker: $KAFKA_BOOTSTRAP_SERVERS, testcontainers, or Tansu."""
    with kafka_broker() as bootstrap:
        yield bootstrap
