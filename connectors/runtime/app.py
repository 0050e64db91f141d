"""Run one connector: Kafka, metrics, health, signals, drain on stop.

Concurrency model (one per process, on purpose): a single asyncio event loop runs the
connector (exchange I/O, parsing, handing records to the producer). Three kinds of
threads exist beside it, each with one job: kafka-python's sender thread (network I/O
to Kafka; its callbacks only update counters under a lock; with the confluent-kafka
backend, the thread polling librdkafka for delivery reports), the health HTTP server
thread (reads state, never writes it), and short-lived worker threads for blocking
REST calls (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from typing import Any

from connectors.runtime.backoff import Backoff
from connectors.runtime.context import RuntimeContext
from connectors.runtime.errors import ConfigError, FatalError, RetriableError
from connectors.runtime.health import HealthServer, HealthState
from connectors.runtime.kafka import Delivery, ensure_topics
from connectors.runtime.metrics import Metrics
from connectors.runtime.plugins import ConnectorPlugin
from connectors.runtime.producer import ProducerFactory
from connectors.runtime.settings import KafkaSettings, RuntimeSettings
from connectors.runtime.state import Transactions

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_CONFIG = 2


@dataclass
class RunResult:
    exit_code: int
    health_port: int | None = None
    error: str | None = None


async def _heartbeat(health: HealthState, stop: asyncio.Event) -> None:
    while not stop.is_set():
        health.beat()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


async def _connect_kafka(
    settings: KafkaSettings,
    metrics: Metrics,
    name: str,
    topics: dict[str, dict[str, str]],
    stop: asyncio.Event,
    factory: ProducerFactory | None,
) -> Delivery | None:
    """Retry until Kafka answers (not ready meanwhile) or stop is requested."""
    backoff = Backoff(initial_s=0.5, cap_s=15.0)
    while not stop.is_set():
        try:
            await asyncio.to_thread(ensure_topics, settings, topics, topics)
            return await asyncio.to_thread(
                Delivery.connect, settings, metrics, name, topics, factory
            )
        except RetriableError as exc:
            delay = backoff.next_delay()
            log.warning("Kafka not ready (%s); retrying in %.1fs", exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
    return None


async def _connect_transactions(
    settings: KafkaSettings,
    transactions: Transactions,
    topics: dict[str, dict[str, str]],
    stop: asyncio.Event,
) -> bool:
    """Retry until topics exist and ``init_transactions`` succeeded (or stop)."""
    backoff = Backoff(initial_s=0.5, cap_s=15.0)
    while not stop.is_set():
        try:
            await asyncio.to_thread(ensure_topics, settings, topics, topics)
            await asyncio.to_thread(transactions.start)
            return True
        except RetriableError as exc:
            delay = backoff.next_delay()
            log.warning("Kafka not ready (%s); retrying in %.1fs", exc, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
    return False


async def _run_until_delivery_fails(work: Any, delivery: Delivery | None) -> None:
    """Run the connector, but end it as soon as Kafka reports a failed delivery.

    A callback failure happens on the sender thread; watching for it here means a
    lost record stops the process even if the connector is idle at that moment.
    """
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=0.25)
        if delivery is not None and delivery.failure is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise FatalError(f"Kafka did not acknowledge a record: {delivery.failure!r}")
    task.result()


async def run_connector(
    plugin: ConnectorPlugin,
    config: Any,
    stop: asyncio.Event | None = None,
    install_signals: bool = True,
    started: asyncio.Future[RunResult] | None = None,
    producer_factory: ProducerFactory | None = None,
) -> RunResult:
    """Run ``plugin`` with ``config`` until stopped; returns the process exit code.

    ``producer_factory`` builds the stream producer instead of the backend the config
    names (tests and the benchmark wrap the real one to observe it)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    runtime: RuntimeSettings = config.runtime
    kafka: KafkaSettings = config.kafka
    metrics = Metrics()
    health = HealthState()
    metrics.ready.labels(plugin.name).set_function(lambda: 1.0 if health.ready() else 0.0)
    try:
        server = HealthServer(health, metrics, runtime.health_host, runtime.health_port).start()
    except ConfigError as exc:  # the port is taken
        log.error("%s: configuration error: %s", plugin.name, exc)
        refused = RunResult(EXIT_CONFIG, None, str(exc))
        if started is not None and not started.done():
            started.set_result(refused)
        return refused
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    result = RunResult(EXIT_OK, server.port)
    log.info("%s: health and metrics on port %d", plugin.name, server.port)
    if started is not None and not started.done():
        started.set_result(result)
    beat = asyncio.create_task(_heartbeat(health, stop))
    delivery: Delivery | None = None
    transactions: Transactions | None = None
    try:
        connector = plugin.create(config)
        topics = connector.topics()
        health.set("kafka", False)
        transactional_id: str | None = getattr(connector, "transactional_id", None)
        if transactional_id:
            transactions = Transactions(kafka, transactional_id, metrics, plugin.name)
            if not await _connect_transactions(kafka, transactions, topics, stop):
                return result
            health.add_check("kafka", transactions.healthy)
        else:
            delivery = await _connect_kafka(
                kafka, metrics, plugin.name, topics, stop, producer_factory
            )
            if delivery is None:
                return result
            health.add_check("kafka", delivery.healthy)
        ctx = RuntimeContext(plugin.name, metrics, health, stop, kafka, delivery, transactions)
        await _run_until_delivery_fails(connector.run(ctx), delivery)
    except ConfigError as exc:
        log.error("%s: configuration error: %s", plugin.name, exc)
        result.exit_code, result.error = EXIT_CONFIG, str(exc)
    except FatalError as exc:
        log.error("%s: stopping on a fatal error: %s", plugin.name, exc)
        result.exit_code, result.error = EXIT_FATAL, str(exc)
    finally:
        health.set("stopping", False)
        if delivery is not None:
            flushed = await asyncio.to_thread(delivery.flush, runtime.drain_timeout_s)
            if not flushed:
                log.error(
                    "%s: %d records were not acknowledged by Kafka before exit (%d failed)",
                    plugin.name,
                    delivery.buffered,
                    delivery.failed_records,
                )
                if result.exit_code == EXIT_OK:
                    result.exit_code, result.error = EXIT_FATAL, "records not delivered"
            await asyncio.to_thread(delivery.close, 5.0)
        if transactions is not None:
            # At most one commit holds it, for at most kafka.commit_timeout_s.
            wait = min(runtime.drain_timeout_s, kafka.commit_timeout_s + 1.0)
            closed = await asyncio.to_thread(transactions.close, wait)
            if not closed:
                log.error(
                    "%s: stopped while Kafka had not confirmed the last transaction; "
                    "what it held is re-read (or redone) at the next start",
                    plugin.name,
                )
                if result.exit_code == EXIT_OK:
                    result.exit_code, result.error = EXIT_FATAL, "last transaction not confirmed"
        stop.set()
        await beat
        server.stop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    return result
