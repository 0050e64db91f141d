"""Every metric the connectors export, defined once with small fixed label sets.

Labels are chosen from closed sets (connector name, channel, outcome, reason) so a
misbehaving exchange can never blow up the series count. No ids, no free text.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

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


class HistogramChild:
    """One labelled series of a :class:`FastHistogram`: plain counts, no lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class FastHistogram:
    """A labelled histogram for the hot path: an observation is a bisect and two sums.

    prometheus_client's ``Histogram`` takes a lock and walks its buckets in Python on
    every observation, which cost more than encoding the record it measured. A child
    here must be observed by one thread at a time (its owner: the event loop, or a
    producer's callbacks under their lock); a scrape from any thread copies its counts,
    so ``_count`` always equals the ``+Inf`` bucket. The exposed series are those of a
    ``Histogram`` with the same name, buckets and labels."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = list(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name}: expected labels {self._labelnames}")
            with self._lock:
                child = self._children.setdefault(values, HistogramChild(self._bounds))
        return child

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for le, count in zip(self._les, counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(values), buckets, total)
        yield family


class _BeforeCollect:
    """Registered first, so the registry reads it first: runs the hooks that move
    counts kept in plain integers on a hot path into their metrics, so every scrape
    (and every ``get_sample_value``) sees them up to date. Exposes nothing itself."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.hooks: list[Callable[[], None]] = []
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        for hook in list(self.hooks):
            hook()
        return iter(())


class Metrics:
    """The connectors' metrics on their own registry (tests run several side by side)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._before = _BeforeCollect(r)
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
        self.event_lag = FastHistogram(
            "connector_event_time_lag_seconds",
            "Receive time minus exchange event time, per channel.",
            ["connector", "channel"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.produce_latency = FastHistogram(
            "connector_produce_latency_seconds",
            "Time from producer.send() to broker acknowledgement (acks=all), "
            "measured from the millisecond the record was sent in.",
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

    def before_collect(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` before every collection (see :class:`_BeforeCollect`); it must be
        cheap and safe to call from any thread, several at once."""
        self._before.hooks.append(hook)

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
