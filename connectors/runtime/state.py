"""Exactly-once output: a transactional producer, and state kept in a compacted topic.

A polling source keeps a cursor ("what have I already written?"). If the cursor and
the records it covers were written separately, a crash between the two writes would
either duplicate records (cursor behind) or lose them (cursor ahead). Here both go in
one Kafka transaction; consumers reading with ``isolation_level=read_committed`` see
all of a poll or none of it.

Start-up order matters and :class:`Transactions` enforces it: ``init_transactions()``
first (it fences a previous incarnation with the same transactional id and aborts its
open transaction), *then* read the state topic up to its end. Reading first could
miss a transaction that was still being committed.

"End of the topic" is the high-water mark the broker reports in fetch answers, not a
ListOffsets answer (some Kafka-protocol brokers get the latter wrong).

Blocking kafka-python calls: call these from a worker thread, not the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import (
    KafkaConfigurationError,
    KafkaError,
    KafkaTimeoutError,
    ProducerFencedError,
    TransactionalIdAuthorizationFailedError,
)
from kafka.structs import OffsetAndMetadata

from connectors.runtime.errors import ConfigError, FatalError, RetriableError
from connectors.runtime.kafka import assign_from_beginning
from connectors.runtime.metrics import Metrics
from connectors.runtime.records import OutRecord
from connectors.runtime.settings import KafkaSettings

log = logging.getLogger(__name__)


def read_state(
    settings: KafkaSettings, topic: str, timeout_s: float = 30.0
) -> dict[bytes, bytes | None]:
    """The latest committed value of every key in ``topic`` (``None`` = tombstone)."""
    try:
        consumer = KafkaConsumer(
            **settings.client_config(KafkaConsumer),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
        )
    except KafkaConfigurationError as exc:
        raise ConfigError(f"kafka.client: {exc}") from None
    except KafkaError as exc:
        raise RetriableError(f"Kafka not reachable: {exc}") from exc
    try:
        deadline = time.monotonic() + timeout_s
        tps = assign_from_beginning(consumer, [topic], timeout_s)
        if not tps:
            raise RetriableError(f"state topic {topic} has no partitions (yet)")
        state: dict[bytes, bytes | None] = {}
        while True:
            for records in consumer.poll(timeout_ms=200).values():
                for rec in records:
                    if rec.key is not None:
                        state[rec.key] = rec.value
            done = True
            for tp in tps:
                high = consumer.highwater(tp)
                if high is None or consumer.position(tp) < high:
                    done = False
                    break
            if done:
                return state
            if time.monotonic() > deadline:
                raise RetriableError(f"could not read state topic {topic} to its end")
    except KafkaError as exc:
        raise RetriableError(f"reading state topic {topic}: {exc}") from exc
    finally:
        consumer.close()


def _send(producer: Any, r: OutRecord) -> Any:
    """Hand one record to a kafka-python producer; returns its future."""
    return producer.send(
        r.topic,
        value=r.value,
        key=r.key,
        headers=list(r.headers),
        timestamp_ms=r.timestamp_ms,
        partition=r.partition,
    )


def _await(producer: Any, result: Any, what: str, deadline: float) -> None:
    """Wait for a transaction step, but never past ``deadline``: kafka-python's own
    ``commit_transaction()`` and friends wait without one, so a frozen broker would
    hold the caller (and everything waiting for it, SIGTERM included) for ever."""
    producer._sender.wakeup()
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not result.wait(timeout_ms=remaining * 1000):
        raise KafkaTimeoutError(f"Kafka did not confirm the {what} in time")


class Transactions:
    """One transactional producer: :meth:`commit` writes a list of records atomically.

    After any failure the producer is closed and rebuilt on the next call, and the
    caller must reload its state from Kafka: a commit that timed out may still have
    succeeded on the broker, so in-memory state is no longer trustworthy.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        transactional_id: str,
        metrics: Metrics,
        connector: str,
        transaction_timeout_ms: int = 60_000,
    ) -> None:
        self._settings = settings
        self.transactional_id = transactional_id
        self._timeout_ms = transaction_timeout_ms
        self._producer: Any = None
        self._committed = metrics.transactions.labels(connector, "committed")
        self._aborted = metrics.transactions.labels(connector, "aborted")
        self._records = metrics.records
        self._connector = connector
        self._lock = threading.Lock()
        self.failed_since: float | None = None
        #: When the transaction being committed now began (None: none in flight).
        self.in_flight_since: float | None = None
        self._commit_timeout_s = settings.commit_timeout_s
        #: This process gave up on a producer whose requests may still reach the
        #: broker late (after an outage) and fence the next one with the same id.
        self._abandoned = False

    def healthy(self) -> bool:
        """False while the last transaction failed (until one commits again), and
        while one has been waiting for Kafka for longer than ``stall_after_s``."""
        started = self.in_flight_since
        stalled = started is not None and (
            time.monotonic() - started > self._settings.stall_after_s
        )
        return self.failed_since is None and not stalled

    def start(self) -> None:
        """Create the producer and fence any earlier instance (idempotent)."""
        if self._producer is not None:
            return
        cfg = self._settings.client_config(KafkaProducer)
        cfg.update(
            acks="all",
            enable_idempotence=True,
            transactional_id=self.transactional_id,
            transaction_timeout_ms=self._timeout_ms,
            linger_ms=self._settings.linger_ms,
            request_timeout_ms=self._settings.request_timeout_ms,
            delivery_timeout_ms=self._settings.delivery_timeout_ms,
            # Metadata waits in send() and init_transactions() end here.
            max_block_ms=int(self._commit_timeout_s * 1000),
        )
        if self._settings.compression_type:
            cfg["compression_type"] = self._settings.compression_type
        try:
            producer = KafkaProducer(**cfg)
        except KafkaConfigurationError as exc:
            raise ConfigError(f"kafka.client: {exc}") from None
        except KafkaError as exc:
            raise RetriableError(f"Kafka not reachable: {exc}") from exc
        try:
            producer.init_transactions()
        except TransactionalIdAuthorizationFailedError as exc:
            producer.close(timeout=1)
            raise FatalError(f"not allowed to use transactional id: {exc}") from exc
        except KafkaError as exc:
            producer.close(timeout=1)
            self._abandoned = True
            raise RetriableError(f"cannot initialise transactions: {exc}") from exc
        self._producer = producer

    def commit(
        self,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int] | None = None,
        consumer: Any = None,
    ) -> None:
        """Write ``records`` in one transaction; on return all are committed.

        ``offsets`` (next offset to read, per partition) are committed for
        ``consumer``'s group in the same transaction: a consumed record counts as
        done exactly when what it produced is visible.

        Raises :class:`FatalError` when another instance took over the transactional
        id (two writers for one account), :class:`RetriableError` otherwise.
        """
        with self._lock:
            self._commit(records, offsets, consumer)

    def _commit(
        self,
        records: Sequence[OutRecord],
        offsets: Mapping[TopicPartition, int] | None,
        consumer: Any,
    ) -> None:
        try:
            self.start()
        except RetriableError:
            self.failed_since = self.failed_since or time.monotonic()
            raise
        producer = self._producer
        deadline = time.monotonic() + self._commit_timeout_s
        self.in_flight_since = time.monotonic()
        try:
            producer.begin_transaction()
            futures = [_send(producer, r) for r in records]
            manager = producer._transaction_manager
            if offsets:
                _await(
                    producer,
                    manager.send_offsets_to_transaction(
                        {tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()},
                        consumer.group_metadata(),
                    ),
                    "consumed offsets",
                    deadline,
                )
            _await(producer, manager.begin_commit(), "transaction commit", deadline)
            for future in futures:
                # Already resolved by the commit; raises if a record was refused.
                future.get(timeout=0)
        except ProducerFencedError as exc:
            self._discard()
            if self._abandoned:
                # Most likely our own: a producer given up during an outage whose
                # request reached the broker late. One new producer settles it; if that
                # one is fenced too, another instance really holds the id.
                self._abandoned = False
                self.failed_since = self.failed_since or time.monotonic()
                raise RetriableError(
                    "fenced by a producer this process gave up on during the Kafka "
                    "outage (its request reached the broker late); starting a new one"
                ) from exc
            raise FatalError(
                f"another instance with transactional id {self.transactional_id!r} "
                "took over; this one stops (single writer)"
            ) from exc
        except KafkaTimeoutError:
            self.failed_since = self.failed_since or time.monotonic()
            self._aborted.inc()
            self._abandoned = True
            self._discard()  # its state is unknown; a new one fences it
            raise RetriableError(
                f"Kafka did not confirm a transaction of {len(records)} record(s) within "
                f"{self._commit_timeout_s:g} s (kafka.commit_timeout_s); it may or may not "
                "have been committed, so state is re-read from Kafka"
            ) from None
        except KafkaError as exc:
            self.failed_since = self.failed_since or time.monotonic()
            self._aborted.inc()
            self._abort_quietly()
            self._abandoned = True
            self._discard()
            raise RetriableError(f"Kafka transaction failed: {exc!r}") from exc
        finally:
            self.in_flight_since = None
        self.failed_since = None
        self._abandoned = False
        self._committed.inc()
        for r in records:
            self._records.labels(self._connector, r.channel, "produced").inc()

    def partitions(self, topic: str) -> list[int]:
        """Partition numbers of ``topic`` (for markers that every consumer must see)."""
        with self._lock:
            self.start()
            try:
                parts = self._producer.partitions_for(topic)
            except KafkaError as exc:
                raise RetriableError(f"no metadata for {topic}: {exc}") from exc
        return sorted(parts or [0])

    def _abort_quietly(self) -> None:
        try:
            producer = self._producer
            deadline = time.monotonic() + min(5.0, self._commit_timeout_s)
            _await(producer, producer._transaction_manager.begin_abort(), "abort", deadline)
        except Exception as exc:  # the producer is rebuilt anyway
            log.debug("abort after a failed transaction did not complete: %r", exc)

    def _discard(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=2)
            except Exception as exc:
                log.debug("closing a failed transactional producer: %r", exc)

    def close(self, timeout_s: float | None = None) -> bool:
        """Close the producer once no commit is in flight. A commit still running after
        ``timeout_s`` (default: ``kafka.commit_timeout_s`` and a little) is left to its
        own deadline; returns False then, and when the last transaction failed."""
        wait = self._commit_timeout_s + 5.0 if timeout_s is None else timeout_s
        if not self._lock.acquire(timeout=max(0.0, wait)):
            return False
        try:
            self._discard()
        finally:
            self._lock.release()
        return self.failed_since is None


def write_records(
    settings: KafkaSettings, records: Sequence[OutRecord], timeout_s: float = 30.0
) -> None:
    """Write records outside any transaction, in order, and wait for every
    acknowledgement (operator commands such as an auth-guard reset)."""
    try:
        producer = KafkaProducer(
            **settings.client_config(KafkaProducer), acks="all", enable_idempotence=True
        )
    except KafkaConfigurationError as exc:
        raise ConfigError(f"kafka.client: {exc}") from None
    except KafkaError as exc:
        raise RetriableError(f"Kafka not reachable: {exc}") from exc
    try:
        futures = [_send(producer, record) for record in records]
        for future, record in zip(futures, records, strict=True):
            try:
                future.get(timeout=timeout_s)
            except KafkaError as exc:
                raise RetriableError(f"could not write to {record.topic}: {exc}") from exc
    finally:
        producer.close(timeout=5)
