"""The optional librdkafka producer (``kafka.producer_backend: confluent-kafka``).

:class:`RdKafkaProducer` gives :class:`~connectors.runtime.kafka.Delivery` the part of
kafka-python's ``KafkaProducer`` it uses (``send`` returning a future with
``add_callback``/``add_errback``, ``partitions_for``, ``flush``, ``close``) on top of
``confluent_kafka.Producer``, with the same guarantees: acks=all, idempotence, the
configured linger, delivery and request timeouts and compression. Keys are placed
with librdkafka's Java-compatible ``murmur2_random`` partitioner, so a key lands in the
same partition as with kafka-python. Transactions stay on kafka-python.

Threads: librdkafka reports deliveries only from ``poll()``/``flush()``. One daemon
thread polls all the time, so callbacks run off the event loop, as they do on
kafka-python's sender thread. A full local queue is not swallowed: ``send`` waits up
to ``max_block_s`` for room, then raises.

Errors are :class:`RdKafkaError`, a kafka-python ``KafkaError``, so ``Delivery``
handles both backends alike. Their text is scrubbed of every configured secret.

This module imports ``confluent_kafka``: import it only when that backend is chosen.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import confluent_kafka
from kafka.errors import KafkaError, KafkaTimeoutError

from connectors.runtime.config import Secret
from connectors.runtime.errors import ConfigError
from connectors.runtime.logs import MASK, register_secret
from connectors.runtime.producer import DeliveryReport
from connectors.runtime.settings import (
    RDKAFKA_CLIENT_KEYS,
    SECRET_HINTS,
    KafkaSettings,
    check_rdkafka_client,
)

log = logging.getLogger(__name__)
#: librdkafka's own log lines (connection chatter at INFO, problems at WARNING+).
librdkafka_log = logging.getLogger("librdkafka")

MAX_BLOCK_S = 5.0


def secrets_of(client: Mapping[str, Any]) -> list[str]:
    """Values to scrub: every ``Secret``, and plain strings under a secret-like key
    (a password written straight into YAML or an environment override)."""
    out = []
    for key, value in client.items():
        if isinstance(value, Secret):
            out.append(value.reveal())
        elif any(hint in key for hint in SECRET_HINTS) and value:
            out.append(str(value))
    return [v for v in out if v]


def rdkafka_config(settings: KafkaSettings) -> dict[str, Any]:
    """librdkafka settings equivalent to :func:`~connectors.runtime.kafka.producer_config`."""
    check_rdkafka_client(settings.client)
    cfg: dict[str, Any] = {"bootstrap.servers": settings.bootstrap_servers}
    for key, value in settings.client.items():
        cfg[RDKAFKA_CLIENT_KEYS[key]] = value.reveal() if isinstance(value, Secret) else str(value)
    cfg.update(
        {
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": settings.linger_ms,
            "message.timeout.ms": settings.delivery_timeout_ms,
            # kafka-python's request_timeout_ms is both the broker's ack timeout in
            # the ProduceRequest and how long the client waits for any answer.
            "request.timeout.ms": settings.request_timeout_ms,
            "socket.timeout.ms": settings.request_timeout_ms,
            "compression.type": settings.compression_type or "none",
            # kafka-python's (and Java's) placement of keyed records; random without a key.
            "partitioner": "murmur2_random",
        }
    )
    return cfg


class RdKafkaError(KafkaError):  # type: ignore[misc]
    """A librdkafka error, as kafka-python's type; the text never holds a secret."""

    def __init__(self, message: str, *, code: str = "", retriable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.retriable = retriable


class DeliveryFuture:
    """kafka-python's future, as far as ``Delivery`` uses it.

    Callbacks get the acknowledged ``confluent_kafka.Message`` (its ``topic()``,
    ``partition()``, ``offset()``); errbacks get an :class:`RdKafkaError`. The delivery
    report may arrive on the poll thread before the caller attached its callbacks; one
    attached to a settled future runs at once, as in kafka-python. A failing callback
    is logged, as kafka-python does: it must not kill the poller.
    """

    __slots__ = ("_callbacks", "_errbacks", "_exception", "_lock", "_owner", "_value")

    def __init__(self, owner: RdKafkaProducer) -> None:
        self._owner = owner
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Any], Any]] | None = []
        self._errbacks: list[Callable[[Any], Any]] = []
        self._value: Any = None
        self._exception: BaseException | None = None

    def add_callback(self, fn: Callable[..., Any], *args: Any) -> DeliveryFuture:
        if args:
            fn = functools.partial(fn, *args)
        with self._lock:
            if self._callbacks is not None:
                self._callbacks.append(fn)
                return self
        if self._exception is None:
            _call(fn, self._value)
        return self

    def add_errback(self, fn: Callable[..., Any], *args: Any) -> DeliveryFuture:
        if args:
            fn = functools.partial(fn, *args)
        with self._lock:
            if self._callbacks is not None:
                self._errbacks.append(fn)
                return self
        if self._exception is not None:
            _call(fn, self._exception)
        return self

    def report(self, err: confluent_kafka.KafkaError | None, msg: confluent_kafka.Message) -> None:
        """librdkafka's delivery report (``on_delivery``), on the polling thread."""
        exception = None if err is None else self._owner.error_from(err)
        with self._lock:
            if self._callbacks is None:
                return
            callbacks = self._callbacks if exception is None else self._errbacks
            self._value, self._exception = msg, exception
            self._callbacks = None
            self._errbacks = []
        result: Any = msg if exception is None else exception
        for fn in callbacks:
            _call(fn, result)


def _call(fn: Callable[[Any], Any], result: Any) -> None:
    try:
        fn(result)
    except Exception:
        log.exception("error in a Kafka delivery callback")


class _LibrdkafkaLog:
    """librdkafka's ``logger``: its lines to :data:`librdkafka_log`, secrets scrubbed."""

    def __init__(self, scrub: Callable[[str], str]) -> None:
        self._scrub = scrub

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if librdkafka_log.isEnabledFor(level):
            librdkafka_log.log(level, fmt, *(self._scrub(str(a)) for a in args))


class RdKafkaProducer:
    """``confluent_kafka.Producer`` behind kafka-python's producer interface."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        max_block_s: float = MAX_BLOCK_S,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        """``overrides``: librdkafka settings applied last (tests use a tiny local queue)."""
        self._secrets = sorted(secrets_of(settings.client), key=len, reverse=True)
        for secret in self._secrets:
            register_secret(secret)
        self._max_block_s = max_block_s
        self._fatal: RdKafkaError | None = None
        self._closed = False
        cfg = rdkafka_config(settings)
        cfg.update(overrides or {})
        cfg.update(error_cb=self._on_client_error, logger=_LibrdkafkaLog(self.scrub))
        try:
            self._producer = confluent_kafka.Producer(cfg)
        except (confluent_kafka.KafkaException, ValueError, TypeError) as exc:
            raise ConfigError(f"kafka (confluent-kafka): {self._describe(exc)}") from None
        self._stop_polling = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="rdkafka-poll", daemon=True)
        self._poller.start()

    # -- errors ------------------------------------------------------------------------

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

    def _describe(self, exc: BaseException) -> str:
        err = exc.args[0] if exc.args else None
        if isinstance(err, confluent_kafka.KafkaError):
            return self.scrub(f"{err.name()}: {err.str()}")
        return self.scrub(str(exc))

    def error_from(self, err: confluent_kafka.KafkaError) -> RdKafkaError:
        # After a fatal error every outstanding record fails (purged): report the cause.
        if self._fatal is not None:
            return self._fatal
        return RdKafkaError(
            self.scrub(f"{err.name()}: {err.str()}"), code=err.name(), retriable=err.retriable()
        )

    def _on_client_error(self, err: confluent_kafka.KafkaError) -> None:
        """Errors not tied to one record (brokers down, auth): librdkafka retries them
        itself and logs them (:data:`librdkafka_log`), and records that cannot be
        delivered in time fail on their own. A fatal error (idempotence broken) fails
        everything from here on."""
        text = self.scrub(f"{err.name()}: {err.str()}")
        if err.fatal():
            self._fatal = RdKafkaError(f"fatal: {text}", code=err.name())
            log.error("Kafka producer hit a fatal error: %s", text)
        else:
            log.debug("Kafka producer: %s", text)

    # -- kafka-python's interface ----------------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        timestamp_ms: int | None = None,
        partition: int | None = None,
    ) -> DeliveryFuture:
        """Queue one record; a full local queue is waited on for ``max_block_s`` at most."""
        future = DeliveryFuture(self)
        self._produce(topic, value, key, headers, timestamp_ms, partition, future.report)
        return future

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
        """:meth:`send` without a future: librdkafka's report goes straight to ``report``."""
        error_from = self.error_from

        def delivered(err: confluent_kafka.KafkaError | None, msg: confluent_kafka.Message) -> None:
            try:
                if err is None:
                    report.ack(msg)
                else:
                    report.fail(error_from(err))
            except Exception:  # as kafka-python: a failing callback must not kill the poller
                log.exception("error in a Kafka delivery callback")

        self._produce(topic, value, key, headers, timestamp_ms, partition, delivered)

    def _produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes]] | None,
        timestamp_ms: int | None,
        partition: int | None,
        on_delivery: Callable[[Any, Any], None],
    ) -> None:
        if self._closed:
            raise RdKafkaError("the producer is closed", code="_STATE")
        if self._fatal is not None:
            raise self._fatal
        produce = self._producer.produce
        deadline: float | None = None
        while True:
            try:
                produce(
                    topic,
                    value=value,
                    key=key,
                    partition=-1 if partition is None else partition,  # -1: by key
                    on_delivery=on_delivery,
                    timestamp=timestamp_ms or 0,  # 0: librdkafka stamps the current time
                    headers=headers or None,  # type: ignore[arg-type]
                )
                return
            except BufferError:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self._max_block_s
                elif now >= deadline:
                    raise KafkaTimeoutError(
                        f"local producer queue still full after {self._max_block_s:g}s"
                    ) from None
                time.sleep(0.01)  # the poll thread serves delivery reports meanwhile
            except confluent_kafka.KafkaException as exc:
                raise RdKafkaError(self._describe(exc)) from None

    def partitions_for(self, topic: str) -> set[int]:
        """The topic's partitions (loads and caches its metadata), as kafka-python."""
        try:
            metadata = self._producer.list_topics(topic, timeout=self._max_block_s)
        except confluent_kafka.KafkaException as exc:
            raise RdKafkaError(self._describe(exc), retriable=True) from None
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            reason = found.error.str() if found is not None and found.error else "no partitions"
            raise RdKafkaError(self.scrub(f"{topic}: {reason}"), retriable=True)
        return set(found.partitions)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued record is acknowledged or failed."""
        left = self._producer.flush(-1 if timeout is None else timeout)
        if left:
            raise KafkaTimeoutError(f"{left} records still queued after {timeout}s")

    def close(self, timeout: float | None = None) -> None:
        """Flush for ``timeout``, then fail what is left, so no record goes unreported."""
        if self._closed:
            return
        self._closed = True
        left = self._producer.flush(-1 if timeout is None else timeout)
        if left:
            log.error("closing the producer with %d records undelivered", left)
            self._producer.purge(in_queue=True, in_flight=True)
        self._stop_polling.set()
        self._poller.join()
        self._producer.poll(0)  # serve the purged records' reports: their errbacks count them
        close = getattr(self._producer, "close", None)  # confluent-kafka >= 2.11
        if close is not None:
            close()

    def _poll(self) -> None:
        while not self._stop_polling.is_set():
            try:
                self._producer.poll(0.1)
            except Exception:  # a dead poller would stall every delivery report
                log.exception("polling the Kafka producer failed")
