"""What a running connector gets from the runtime (:class:`RuntimeContext`).

A module of its own so that the plugin interface (:mod:`.plugins`) can name it without
importing the runner (:mod:`.app`), which imports the plugin interface.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from connectors.runtime.health import HealthState
    from connectors.runtime.kafka import Delivery
    from connectors.runtime.metrics import Metrics
    from connectors.runtime.settings import KafkaSettings
    from connectors.runtime.state import Transactions


@dataclass
class RuntimeContext:
    """What a running connector gets from the runtime.

    A connector writes either through ``delivery`` (a tracked idempotent producer,
    for streams) or, when it declares a ``transactional_id``, through
    ``transactions`` (atomic batches with its state); never both.
    """

    name: str
    metrics: Metrics
    health: HealthState
    stop: asyncio.Event
    kafka: KafkaSettings
    _delivery: Delivery | None = None
    _transactions: Transactions | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def delivery(self) -> Delivery:
        if self._delivery is None:
            raise RuntimeError("this connector writes through Kafka transactions")
        return self._delivery

    @property
    def transactions(self) -> Transactions:
        if self._transactions is None:
            raise RuntimeError("this connector has no transactional_id")
        return self._transactions
