"""Every metric the connectors export, defined once with small fixed label sets.

Labels are chosen from closed sets (connector name, channel, outcome, reason) so a
misbehaving exchange can never blow up the series count. No ids, no free text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


class ReadCounter:
    """A counter per connector whose value is read at scrape time from a function that
    never decreases (so time still running, such as an outage under way, is counted)."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name.removesuffix("_total")
        self._doc = documentation
        self._reads: dict[str, Callable[[], float]] = {}
        registry.register(self)

    def track(self, connector: str, read: Callable[[], float]) -> None:
        self._reads[connector] = read

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._doc, labels=["connector"])

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._doc, labels=["connector"])
        for connector, read in list(self._reads.items()):
            family.add_metric([connector], read())
        yield family


class Metrics:
    """The connectors' metrics on their own registry (tests run several side by side)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.records = Counter(
            "connector_records_total",
            "Records by channel and outcome (produced, failed, dead_lettered).",
            ["connector", "channel", "outcome"],
            registry=r,
        )
        self.reconnects = Counter(
            "connector_reconnects_total",
            "Exchange connections re-established, by the reason the previous one ended.",
            ["connector", "reason"],
            registry=r,
        )
        self.connections = Counter(
            "connector_connections_total",
            "Exchange connections opened successfully.",
            ["connector"],
            registry=r,
        )
        self.ping_rtt = Histogram(
            "connector_ping_rtt_seconds",
            "Application-level ping round trip to the exchange.",
            ["connector"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.event_lag = Histogram(
            "connector_event_time_lag_seconds",
            "Receive time minus exchange event time, per channel.",
            ["connector", "channel"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.produce_latency = Histogram(
            "connector_produce_latency_seconds",
            "Time from producer.send() to broker acknowledgement (acks=all).",
            ["connector"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.dead_letters = Counter(
            "connector_dead_letters_total",
            "Inbound messages sent to the dead-letter topic, by reason.",
            ["connector", "reason"],
            registry=r,
        )
        self.exchange_errors = Counter(
            "connector_exchange_errors_total",
            "Error answers from the exchange, by error code.",
            ["connector", "code"],
            registry=r,
        )
        self.gaps = Counter(
            "connector_gaps_total",
            "Times the stream was interrupted and consumers were told to resync, by reason.",
            ["connector", "reason"],
            registry=r,
        )
        self.buffered = Gauge(
            "connector_buffered_records",
            "Records handed to the producer and not yet acknowledged by Kafka.",
            ["connector"],
            registry=r,
        )
        self.connected = Gauge(
            "connector_connected",
            "1 while connected to the exchange and subscribed.",
            ["connector"],
            registry=r,
        )
        self.disconnected_seconds = ReadCounter(
            "connector_disconnected_seconds_total",
            "Seconds the source was not connected and subscribed to the exchange "
            "(from its start; an outage under way included).",
            registry=r,
        )
        self.ready = Gauge(
            "connector_ready", "1 while /readyz answers 200.", ["connector"], registry=r
        )
        self.seconds_since_last_message = Gauge(
            "connector_seconds_since_last_message",
            "Seconds since the last message arrived from the exchange.",
            ["connector"],
            registry=r,
        )
        self.auth_failures = Counter(
            "connector_auth_failures_total",
            "Requests the exchange refused because of credentials.",
            ["connector"],
            registry=r,
        )

        self.rate_limit_waits = Counter(
            "connector_rate_limit_waits_total",
            "Requests that had to wait for the client-side rate limiter, by endpoint class.",
            ["connector", "endpoint_class"],
            registry=r,
        )
        self.rate_limit_wait_seconds = Histogram(
            "connector_rate_limit_wait_seconds",
            "Seconds a request waited for the client-side rate limiter, by endpoint class.",
            ["connector", "endpoint_class"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "connector_requests_total",
            "REST requests to the exchange by endpoint and outcome "
            "(ok, retriable, rejected, unauthorized, rate_limited).",
            ["connector", "endpoint", "outcome"],
            registry=r,
        )
        self.request_latency = Histogram(
            "connector_request_latency_seconds",
            "REST request round trip to the exchange, by endpoint.",
            ["connector", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.auth_guard_failures = Gauge(
            "connector_auth_guard_failures",
            "Unauthorized answers (or unconfirmed first attempts) recorded for the "
            "configured credentials, persisted in Kafka across restarts.",
            ["connector"],
            registry=r,
        )
        self.auth_guard_tripped = Gauge(
            "connector_auth_guard_tripped",
            "1 while the connector refuses to call the exchange with these credentials "
            "(an operator must reset the guard or change the credentials).",
            ["connector"],
            registry=r,
        )
        self.transactions = Counter(
            "connector_transactions_total",
            "Kafka transactions by outcome (committed, aborted).",
            ["connector", "outcome"],
            registry=r,
        )

        self.commands = Counter(
            "connector_commands_total",
            "Commands consumed by a sink, by action and final outcome (accepted, rejected, "
            "failed, expired, duplicate, unknown).",
            ["connector", "action", "outcome"],
            registry=r,
        )
        self.command_latency = Histogram(
            "connector_command_latency_seconds",
            "From a command's created_at to its result being committed.",
            ["connector", "action"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.commands_in_flight = Gauge(
            "connector_commands_in_flight",
            "Commands written to the ledger as pending and not decided yet.",
            ["connector"],
            registry=r,
        )
        self.reconciliations = Counter(
            "connector_reconciliations_total",
            "Ambiguous exchange calls settled by reading the exchange's state, by outcome "
            "(found, not_found, undecided).",
            ["connector", "outcome"],
            registry=r,
        )
        self.consumer_lag = Gauge(
            "connector_consumer_lag",
            "Records in a consumed partition not yet done: high-water mark minus the "
            "committed offset.",
            ["connector", "topic", "partition"],
            registry=r,
        )
        self.trading_enabled = Gauge(
            "connector_trading_enabled",
            "1 while the sink may place new orders (the kill switch is off).",
            ["connector"],
            registry=r,
        )
        self.paused = Gauge(
            "connector_paused",
            "1 while an operator has paused the sink (commands wait in Kafka).",
            ["connector"],
            registry=r,
        )

    def rate_limit_observer(self, connector: str, endpoint_class: str) -> Callable[[float], None]:
        """The ``on_wait`` callback of a rate limiter: counts and times every wait."""
        waits = self.rate_limit_waits.labels(connector, endpoint_class)
        seconds = self.rate_limit_wait_seconds.labels(connector, endpoint_class)

        def record(waited: float) -> None:
            waits.inc()
            seconds.observe(waited)

        return record

    def observe_request(self, connector: str, endpoint: str, outcome: str, elapsed: float) -> None:
        self.requests.labels(connector, endpoint, outcome).inc()
        self.request_latency.labels(connector, endpoint).observe(elapsed)

    def track_last_message(self, connector: str, last: Callable[[], float | None]) -> None:
        """Export ``now - last()`` at scrape time (``+Inf`` before the first message)."""

        def age() -> float:
            ts = last()
            return float("inf") if ts is None else max(0.0, time.monotonic() - ts)

        self.seconds_since_last_message.labels(connector).set_function(age)
