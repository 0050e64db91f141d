"""The producer interface: what :class:`~connectors.runtime.kafka.Delivery` writes through.

Two implementations stand behind it: kafka-python's ``KafkaProducer`` and the
librdkafka producer of :mod:`connectors.runtime.rdkafka`; ``kafka.producer_backend``
chooses (:func:`connectors.runtime.kafka.create_producer`). Transactions stand beside
it, in :mod:`connectors.runtime.state`, and always use kafka-python.

Tests and the benchmark harness wrap or swap a producer by handing the runner a
:data:`ProducerFactory` (``run_connector(..., producer_factory=...)``) instead of
patching a class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from connectors.runtime.settings import KafkaSettings


class SendFuture(Protocol):
    """The outcome of one send: callbacks get ``(*args, metadata)``; errbacks get
    ``(*args, exception)``. One attached after the outcome is known runs at once."""

    def add_callback(self, fn: Callable[..., Any], *args: Any) -> Any: ...

    def add_errback(self, fn: Callable[..., Any], *args: Any) -> Any: ...


class DeliveryReport(Protocol):
    """Told the outcome of a record sent with :meth:`Producer.send_reported`: exactly
    one of the two, once, from the producer's delivery thread."""

    def ack(self, metadata: Any) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


class Producer(Protocol):
    """An idempotent, ``acks=all`` producer (kafka-python's spelling; the record's parts
    are passed by keyword: the two clients order them differently)."""

    def send(
        self,
        topic: str,
        *,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
        partition: int | None = None,
    ) -> SendFuture: ...

    def send_reported(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes]] | None,
        timestamp_ms: int | None,
        partition: int | None,
        report: DeliveryReport,
    ) -> None:
        """:meth:`send` for the hot path: the outcome goes to ``report`` (one object may
        serve many records) instead of a future with callbacks of its own."""
        ...

    def partitions_for(self, topic: str) -> Any: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


#: Builds the stream producer from the ``kafka:`` settings; raises ConfigError for
#: settings the client refuses and RetriableError when Kafka cannot be reached.
ProducerFactory = Callable[["KafkaSettings"], Producer]
