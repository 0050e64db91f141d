"""Kafka delivery shared by every connector: settings, topic set-up, a tracked producer.

:class:`Delivery` wraps kafka-python's ``KafkaProducer`` (acks=all, idempotent), or
with ``kafka.producer_backend: confluent-kafka`` the librdkafka producer of
:mod:`connectors.runtime.rdkafka` behind the same interface, and puts a callback on
every send. It keeps the count and age of unacknowledged records so a source can
stop reading from the exchange *before* memory grows without bound, and it turns
any failed delivery into a fatal error the runner exits on: a record the broker
never acknowledged is never forgotten quietly.

Threads: ``send`` is called from the connector's event loop; callbacks run on
kafka-python's sender thread (or the librdkafka backend's poll thread), so the
bookkeeping they touch is guarded by a lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaConfigurationError, KafkaError, TopicAlreadyExistsError

from connectors.runtime.config import Secret, excerpt, positive
from connectors.runtime.errors import ConfigError, FatalError, RetriableError
from connectors.runtime.metrics import Metrics

log = logging.getLogger(__name__)

# Settings the runtime owns: delivery guarantees are not negotiable per deployment.
_OWNED = {
    "bootstrap_servers",
    "acks",
    "enable_idempotence",
    "key_serializer",
    "value_serializer",
    "kafka_client",
    "transactional_id",
}
_SECRET_HINTS = ("password", "token", "secret")
#: ``kafka.producer_backend`` values; transactions always use kafka-python.
PRODUCER_BACKENDS = ("kafka-python", "confluent-kafka")
#: What kafka-python connects with (transactions always use it, so its spelling).
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


@dataclass(frozen=True)
class KafkaSettings:
    """The ``kafka:`` section of every connector's config."""

    bootstrap_servers: str = "localhost:9092"
    #: Passed to kafka-python as they are: security_protocol, sasl_mechanism,
    #: sasl_plain_username/password, ssl_cafile/certfile/keyfile, client_id, ...
    client: dict[str, Any] = field(default_factory=dict)
    linger_ms: int = 5
    compression_type: str | None = None
    delivery_timeout_ms: int = 120_000
    request_timeout_ms: int = 30_000
    #: Unacknowledged records allowed before the source stops reading (memory bound).
    max_buffered_records: int = 20_000
    #: Stop reading when the oldest unacknowledged record is older than this.
    stall_after_s: float = 10.0
    #: Longest wait for Kafka to confirm one transaction (records, offsets, commit).
    commit_timeout_s: float = 15.0
    create_topics: bool = True
    topic_partitions: int = 3
    replication_factor: int = 1
    #: The stream producer: kafka-python, or librdkafka (``pip install
    #: 'exchange-connectors[confluent]'``). Transactions always use kafka-python.
    producer_backend: str = "kafka-python"

    def validate(self) -> None:
        allowed = set(KafkaProducer.DEFAULT_CONFIG) - _OWNED
        for key in self.client:
            if key in _OWNED:
                raise ConfigError(
                    f"kafka.client.{key} is set by the connector and cannot be changed"
                )
            if key not in allowed:
                raise ConfigError(f"kafka.client: unknown kafka-python setting {excerpt(key)}")
            wrong_type = isinstance(self.client[key], int | float | list | tuple | dict)
            if wrong_type and any(h in key for h in _SECRET_HINTS):
                raise ConfigError(
                    f"kafka.client.{key}: expected a string (quote it); "
                    "the value is a secret and is not shown"
                )
        protocol = self.client.get("security_protocol", "PLAINTEXT")
        if protocol not in SECURITY_PROTOCOLS:
            raise ConfigError(
                f"kafka.client.security_protocol: {excerpt(protocol)} is not one of "
                f"{', '.join(SECURITY_PROTOCOLS)}"
            )
        for name in ("topic_partitions", "replication_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"kafka.{name} must be at least 1")
        positive("kafka.stall_after_s", self.stall_after_s)
        positive("kafka.commit_timeout_s", self.commit_timeout_s)
        positive("kafka.delivery_timeout_ms", self.delivery_timeout_ms, "milliseconds")
        positive("kafka.request_timeout_ms", self.request_timeout_ms, "milliseconds")
        if self.linger_ms < 0:
            raise ConfigError("kafka.linger_ms must be >= 0")
        if self.max_buffered_records < 1:
            raise ConfigError("kafka.max_buffered_records must be at least 1")
        if self.stall_after_s * 1000 >= self.delivery_timeout_ms:
            raise ConfigError("kafka.stall_after_s must be shorter than delivery_timeout_ms")
        if self.producer_backend not in PRODUCER_BACKENDS:
            allowed_backends = ", ".join(repr(b) for b in PRODUCER_BACKENDS)
            raise ConfigError(
                f"kafka.producer_backend: {excerpt(self.producer_backend)} is not one of "
                f"{allowed_backends}"
            )
        if self.producer_backend == "confluent-kafka":
            _rdkafka().check_client(self.client)

    def client_config(self, for_client: type | None = None) -> dict[str, Any]:
        """Connection settings for ``for_client`` (producer-only keys such as
        ``max_request_size`` are left out for the admin client and consumers)."""
        accepted = getattr(for_client, "DEFAULT_CONFIG", None)
        out: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers.split(",")}
        for key, value in self.client.items():
            if accepted is None or key in accepted:
                out[key] = value.reveal() if isinstance(value, Secret) else value
        return out

    def __repr__(self) -> str:
        shown = {
            k: ("***" if any(h in k for h in _SECRET_HINTS) else v) for k, v in self.client.items()
        }
        return f"KafkaSettings(bootstrap_servers={self.bootstrap_servers!r}, client={shown!r})"


def producer_config(settings: KafkaSettings) -> dict[str, Any]:
    cfg = settings.client_config(KafkaProducer)
    cfg.update(
        acks="all",
        enable_idempotence=True,
        linger_ms=settings.linger_ms,
        delivery_timeout_ms=settings.delivery_timeout_ms,
        request_timeout_ms=settings.request_timeout_ms,
        # send() must never block the event loop for long; topics' metadata is
        # fetched before the first record, so only a full buffer could block here.
        max_block_ms=5_000,
    )
    if settings.compression_type:
        cfg["compression_type"] = settings.compression_type
    return cfg


def _rdkafka() -> ModuleType:
    """The librdkafka backend, imported only when chosen (an optional dependency)."""
    try:
        from connectors.runtime import rdkafka
    except ImportError as exc:
        if exc.name != "confluent_kafka":
            raise
        raise ConfigError(
            "kafka.producer_backend confluent-kafka needs the confluent-kafka package: "
            "pip install 'exchange-connectors[confluent]'"
        ) from None
    return rdkafka


def ensure_topics(
    settings: KafkaSettings, topics: Iterable[str], configs: dict[str, dict[str, str]] | None = None
) -> None:
    """Create missing topics (when allowed) so the first records are not refused."""
    wanted = sorted(set(topics))
    try:
        admin = KafkaAdminClient(**settings.client_config(KafkaAdminClient))
    except KafkaConfigurationError as exc:
        raise ConfigError(f"kafka.client: {exc}") from None
    except KafkaError as exc:
        raise RetriableError(f"Kafka not reachable at {settings.bootstrap_servers}: {exc}") from exc
    try:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing and not settings.create_topics:
            raise ConfigError(f"topics do not exist and kafka.create_topics is false: {missing}")
        if missing:
            new = [
                NewTopic(
                    t,
                    settings.topic_partitions,
                    settings.replication_factor,
                    topic_configs=(configs or {}).get(t, {}),
                )
                for t in missing
            ]
            try:
                admin.create_topics(new)
                log.info("created topics %s", ", ".join(missing))
            except TopicAlreadyExistsError:
                pass
    except KafkaError as exc:
        raise RetriableError(f"cannot list or create topics: {exc}") from exc
    finally:
        admin.close()


@dataclass(frozen=True)
class OutRecord:
    topic: str
    #: None is a tombstone (deletes the key in a compacted topic).
    value: bytes | None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp_ms: int | None = None
    channel: str = "-"
    #: Explicit partition (markers sent to every partition); None = by key.
    partition: int | None = None


class Delivery:
    """A producer whose every send is tracked until the broker acknowledges it."""

    def __init__(
        self,
        producer: Any,
        metrics: Metrics,
        connector: str,
        max_buffered: int,
        stall_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._producer = producer
        self._metrics = metrics
        self._connector = connector
        self._max_buffered = max_buffered
        self._stall_after_s = stall_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, float] = OrderedDict()
        self._seq = itertools.count()
        self.failure: BaseException | None = None
        self.failed_records = 0
        self.acked_records = 0
        self.last_ack: float | None = None
        self._buffered_gauge = metrics.buffered.labels(connector)
        self._latency = metrics.produce_latency.labels(connector)
        self._children: dict[tuple[str, str], Any] = {}

    @classmethod
    def connect(
        cls, settings: KafkaSettings, metrics: Metrics, connector: str, topics: Iterable[str]
    ) -> Delivery:
        """Create the producer and load every topic's metadata up front."""
        producer: Any
        try:
            if settings.producer_backend == "confluent-kafka":
                producer = _rdkafka().RdKafkaProducer(settings)
            else:
                producer = KafkaProducer(**producer_config(settings))
        except KafkaConfigurationError as exc:
            raise ConfigError(f"kafka.client: {exc}") from None
        except KafkaError as exc:
            raise RetriableError(
                f"Kafka not reachable at {settings.bootstrap_servers}: {exc}"
            ) from exc
        try:
            for topic in topics:
                producer.partitions_for(topic)
        except KafkaError as exc:
            producer.close(timeout=1)
            raise RetriableError(f"cannot load topic metadata: {exc}") from exc
        return cls(
            producer, metrics, connector, settings.max_buffered_records, settings.stall_after_s
        )

    # -- sending ---------------------------------------------------------------------

    def send(self, record: OutRecord) -> None:
        """Hand one record to the producer; raises :class:`FatalError` after a failure."""
        if self.failure is not None:
            raise FatalError(f"Kafka delivery failed earlier: {self.failure!r}")
        seq = next(self._seq)
        sent_at = self._clock()
        with self._lock:
            self._pending[seq] = sent_at
            self._buffered_gauge.set(len(self._pending))
        try:
            future = self._producer.send(
                record.topic,
                value=record.value,
                key=record.key,
                headers=list(record.headers),
                timestamp_ms=record.timestamp_ms,
                partition=record.partition,
            )
        except Exception as exc:
            self._on_error(seq, record.channel, exc)
            raise FatalError(
                f"Kafka producer refused a record for {record.topic}: {exc!r}"
            ) from exc
        future.add_callback(self._on_ack, seq, record.channel)
        future.add_errback(self._on_error, seq, record.channel)

    def _counter(self, channel: str, outcome: str) -> Any:
        """Label children cached: ``labels()`` costs a lock and a dict walk per call."""
        child = self._children.get((channel, outcome))
        if child is None:
            child = self._metrics.records.labels(self._connector, channel, outcome)
            self._children[(channel, outcome)] = child
        return child

    def _on_ack(self, seq: int, channel: str, _metadata: Any) -> None:
        now = self._clock()
        with self._lock:
            sent_at = self._pending.pop(seq, now)
            self._buffered_gauge.set(len(self._pending))
            self.acked_records += 1
            self.last_ack = now
        self._latency.observe(now - sent_at)
        self._counter(channel, "produced").inc()

    def _on_error(self, seq: int, channel: str, exc: BaseException) -> None:
        with self._lock:
            self._pending.pop(seq, None)
            self._buffered_gauge.set(len(self._pending))
            self.failed_records += 1
            if self.failure is None:
                self.failure = exc
        self._counter(channel, "failed").inc()
        log.error("Kafka did not accept a %s record: %r", channel, exc)

    # -- back-pressure -----------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return len(self._pending)

    def oldest_unacked_age(self) -> float:
        with self._lock:
            if not self._pending:
                return 0.0
            first = next(iter(self._pending.values()))
        return self._clock() - first

    def must_pause(self) -> bool:
        """True when the source should stop reading: buffer full or Kafka stalled."""
        return (
            len(self._pending) >= self._max_buffered
            or self.oldest_unacked_age() > self._stall_after_s
        )

    def drained(self) -> bool:
        return not self._pending

    def healthy(self) -> bool:
        return self.failure is None and not self.must_pause()

    # -- shutdown ----------------------------------------------------------------------

    def flush(self, timeout_s: float) -> bool:
        """Wait for every buffered record; True when all were acknowledged."""
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            log.error("flush did not complete: %r", exc)
        return self.drained() and self.failure is None

    def close(self, timeout_s: float = 5.0) -> None:
        """Close the producer; what it could not deliver was already counted as failed."""
        try:
            self._producer.close(timeout=timeout_s)
        except KafkaError as exc:
            log.error("producer did not close cleanly: %r", exc)


def group_poll(
    consumer: Any, timeout_ms: int, wait: Callable[[float], object] = time.sleep
) -> dict[Any, list[Any]]:
    """``consumer.poll(timeout_ms)`` for a consumer in a group, without kafka-python's spin.

    kafka-python 3.0 caps every turn of ``poll()`` at the time left to the next
    heartbeat. While a heartbeat is in flight to a coordinator that does not answer (a
    frozen broker, a half-open connection) that time stays 0 until the request times
    out (``request_timeout_ms``, 30 s): ``poll()`` spins for its whole timeout, and each
    turn ties a wake-up future and its waiter (a few KB) to the fetch in flight. That
    was a core at 100 % and about 10 MB a second while Kafka was unreachable. In that
    state this polls once without waiting and does the waiting itself (``wait``: pass a
    stop event's ``wait`` to stay interruptible), so an outage costs one turn per call.
    """
    if timeout_ms > 0 and _poll_would_spin(consumer):
        batch: dict[Any, list[Any]] = consumer.poll(timeout_ms=0)
        if not batch:
            wait(timeout_ms / 1000)
        return batch
    result: dict[Any, list[Any]] = consumer.poll(timeout_ms=timeout_ms)
    return result


def group_reachable(consumer: Any) -> bool:
    """False once a group consumer lost its coordinator (kafka-python marks it dead when
    a request to it times out: a frozen or unreachable broker). A plain attribute read,
    so it never changes the consumer's state; True if the shape is unknown."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or getattr(coordinator, "group_id", None) is None:
        return True
    return getattr(coordinator, "coordinator_id", 0) is not None


def _poll_would_spin(consumer: Any) -> bool:
    """A heartbeat is due now to the known coordinator of a joined, stable group: the
    state in which ``poll()`` cannot wait (see :func:`group_poll`); while the coordinator
    is unknown or the group rejoins, ``poll()`` waits and is left alone. Only reads:
    kafka-python's coordinator is private, and if it ever changes shape this says no
    and a plain poll is used."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or getattr(coordinator, "group_id", None) is None:
        return False
    try:
        return bool(
            coordinator.coordinator_id is not None
            and coordinator.stable()
            and not coordinator.need_rejoin()
            and coordinator.time_to_next_poll() <= 0
        )
    except Exception:
        return False
