"""Kafka delivery shared by every connector: topic set-up, a tracked producer.

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

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaConfigurationError, KafkaError, TopicAlreadyExistsError

from connectors.runtime.errors import ConfigError, FatalError, RetriableError
from connectors.runtime.metrics import Metrics
from connectors.runtime.producer import DeliveryReport, Producer, ProducerFactory
from connectors.runtime.records import OutRecord
from connectors.runtime.settings import KafkaSettings, require_confluent_kafka

log = logging.getLogger(__name__)


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
    require_confluent_kafka()
    from connectors.runtime import rdkafka

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


class StreamProducer(KafkaProducer):  # type: ignore[misc]
    """kafka-python's producer with :meth:`send_reported` (the :class:`Producer` protocol)."""

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
        future = self.send(
            topic,
            value=value,
            key=key,
            headers=headers,
            timestamp_ms=timestamp_ms,
            partition=partition,
        )
        future.add_callback(report.ack)
        future.add_errback(report.fail)


def create_producer(settings: KafkaSettings) -> Producer:
    """The stream producer ``kafka.producer_backend`` names."""
    producer: Producer
    try:
        if settings.producer_backend == "confluent-kafka":
            producer = _rdkafka().RdKafkaProducer(settings)
        else:
            producer = StreamProducer(**producer_config(settings))
    except KafkaConfigurationError as exc:
        raise ConfigError(f"kafka.client: {exc}") from None
    except KafkaError as exc:
        raise RetriableError(f"Kafka not reachable at {settings.bootstrap_servers}: {exc}") from exc
    return producer


class _Slice:
    """The records of one channel handed over within one :data:`SLICE_S`: counted
    together, so a record costs two counter additions and no object of its own."""

    __slots__ = ("acked", "channel", "closed", "delivery", "failed", "sent", "t0")

    def __init__(self, delivery: Delivery, channel: str, t0: float) -> None:
        self.delivery = delivery
        self.channel = channel
        self.t0 = t0
        self.sent = 0
        self.acked = 0
        self.failed = 0
        #: No more records join it (the sending thread opened the next one).
        self.closed = False

    def settled(self) -> bool:
        return self.acked + self.failed >= self.sent

    def ack(self, _metadata: Any) -> None:
        """A producer's callback: one record of this slice acknowledged."""
        delivery = self.delivery
        now = delivery._clock()
        with delivery._lock:
            self.acked += 1
            delivery.acked_records += 1
            delivery.last_ack = now
            delivery._produced[self.channel] = delivery._produced.get(self.channel, 0) + 1
            delivery._latency.observe(now - self.t0)

    def fail(self, exc: BaseException) -> None:
        """A producer's errback: one record of this slice was not delivered."""
        self.delivery._on_error(self, exc)


#: Width of a :class:`_Slice`: the resolution of the produce latency and of the oldest
#: unacknowledged record's age.
SLICE_S = 0.001


class Delivery:
    """A producer whose every send is tracked until the broker acknowledges it.

    Records are counted, not kept: each is counted in the slice of its channel and
    millisecond, so the number buffered, the age of the oldest unacknowledged record
    and the metrics cost a few additions per record. :meth:`send` and
    :meth:`send_parts` are called from one thread (the connector's event loop); the
    producer's callbacks count under a lock.
    """

    def __init__(
        self,
        producer: Producer,
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
        #: Slices in the order they were opened; settled closed ones are dropped.
        self._slices: deque[_Slice] = deque()
        self._open: dict[str, _Slice] = {}
        self.failure: BaseException | None = None
        #: Written by the sending thread only.
        self.sent_records = 0
        #: Written under the lock only.
        self.failed_records = 0
        self.acked_records = 0
        self.last_ack: float | None = None
        self._produced: dict[str, int] = {}
        self._reported: dict[str, int] = {}
        self._report_lock = threading.Lock()
        self._latency = metrics.produce_latency.labels(connector)
        metrics.buffered.labels(connector).set_function(lambda: self.buffered)
        metrics.before_collect(self._report)

    @classmethod
    def connect(
        cls,
        settings: KafkaSettings,
        metrics: Metrics,
        connector: str,
        topics: Iterable[str],
        factory: ProducerFactory | None = None,
    ) -> Delivery:
        """Create the producer (``factory``, by default :func:`create_producer`) and
        load every topic's metadata up front."""
        producer = (factory or create_producer)(settings)
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
        self.send_parts(
            record.topic,
            record.value,
            record.key,
            list(record.headers),
            record.timestamp_ms,
            record.channel,
            record.partition,
        )

    def send_parts(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
        timestamp_ms: int | None,
        channel: str,
        partition: int | None = None,
    ) -> None:
        """:meth:`send` without building an :class:`OutRecord` (the hot path).
        ``headers`` is handed to the producer as it is: share one list per channel."""
        if self.failure is not None:
            raise FatalError(f"Kafka delivery failed earlier: {self.failure!r}")
        now = self._clock()
        slice_ = self._open.get(channel)
        if slice_ is None or now - slice_.t0 >= SLICE_S:
            slice_ = self._new_slice(channel, now, slice_)
        slice_.sent += 1
        self.sent_records += 1
        try:
            self._producer.send_reported(
                topic,
                value=value,
                key=key,
                headers=headers,
                timestamp_ms=timestamp_ms,
                partition=partition,
                report=slice_,
            )
        except Exception as exc:
            self._on_error(slice_, exc)
            raise FatalError(f"Kafka producer refused a record for {topic}: {exc!r}") from exc

    def _new_slice(self, channel: str, now: float, previous: _Slice | None) -> _Slice:
        """Open the next slice of ``channel``. Every open slice older than a slice width
        is closed here too, by the one thread that adds records to slices: a channel
        that went quiet must not hold the settled slices behind it in memory."""
        slice_ = _Slice(self, channel, now)
        with self._lock:
            if previous is not None:
                previous.closed = True
            for other in self._open.values():
                if now - other.t0 >= SLICE_S:
                    other.closed = True
            self._slices.append(slice_)
            self._drop_settled()
        self._open[channel] = slice_
        return slice_

    def _drop_settled(self) -> None:
        """Forget settled closed slices at the front (under the lock)."""
        slices = self._slices
        while slices and slices[0].closed and slices[0].settled():
            slices.popleft()

    def _on_error(self, slice_: _Slice, exc: BaseException) -> None:
        with self._lock:
            slice_.failed += 1
            self.failed_records += 1
            if self.failure is None:
                self.failure = exc
        self._metrics.records.labels(self._connector, slice_.channel, "failed").inc()
        log.error("Kafka did not accept a %s record: %r", slice_.channel, exc)

    def _report(self) -> None:
        """Move the acknowledged counts into ``connector_records_total`` (before a scrape;
        two scrapes at once each move only what the other did not)."""
        with self._report_lock:
            with self._lock:
                produced = dict(self._produced)
            for channel, count in produced.items():
                delta = count - self._reported.get(channel, 0)
                if delta > 0:
                    self._reported[channel] = count
                    self._metrics.records.labels(self._connector, channel, "produced").inc(delta)

    # -- back-pressure -----------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Records handed over and not acknowledged or failed yet."""
        return self.sent_records - self.acked_records - self.failed_records

    def oldest_unacked_age(self) -> float:
        """Seconds since the oldest record still waiting for the broker was sent (to the
        millisecond); 0 when none is waiting."""
        with self._lock:
            self._drop_settled()
            oldest = next((s.t0 for s in self._slices if not s.settled()), None)
        return 0.0 if oldest is None else self._clock() - oldest

    def must_pause(self) -> bool:
        """True when the source should stop reading: buffer full or Kafka stalled."""
        return (
            self.buffered >= self._max_buffered or self.oldest_unacked_age() > self._stall_after_s
        )

    def drained(self) -> bool:
        return self.buffered == 0

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


def assign_from_beginning(
    consumer: Any, topics: Sequence[str], timeout_s: float
) -> list[TopicPartition]:
    """Assign every partition of ``topics`` to ``consumer`` (no group), at the start.

    Waits up to ``timeout_s`` for each topic's partitions to be known (a topic just
    created, or a metadata refresh); a topic that has none by then is left out. The one
    way anything here reads a topic from its beginning: state and ledgers, the control
    topic, the demo's counts, the tests and the benchmarks.
    """
    deadline = time.monotonic() + timeout_s
    assigned: list[TopicPartition] = []
    for topic in topics:
        parts = consumer.partitions_for_topic(topic)
        while not parts and time.monotonic() < deadline:
            time.sleep(0.1)
            parts = consumer.partitions_for_topic(topic)
        assigned.extend(TopicPartition(topic, p) for p in sorted(parts or ()))
    consumer.assign(assigned)
    if assigned:
        consumer.seek_to_beginning(*assigned)
    return assigned
