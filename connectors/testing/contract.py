"""The plugin contract suite: what every streaming exchange plugin must do, as tests.

A plugin's tests run it in one line, by subclassing with a harness::

    class TestMyExchangeContract(StreamingContract):
        harness = MyExchangeHarness()

The suite runs the plugin through the real runtime against the plugin's simulator and
a real Kafka-protocol broker (the ``kafka_bootstrap`` fixture), and checks what a user
of the topics would notice:

- every record lands on its channel's topic, keyed by its ``symbol``, with the
  ``exchange``/``channel``/``kind``/``schema`` headers, valid against the channel's
  JSON Schema, timestamped with its receive time;
- every decimal literal the exchange wrote is in Kafka as the same text;
- a dropped connection brings a new, larger resync epoch with a marker to every key of
  every channel before that key's next event;
- unusable frames (not JSON, wrong shape, binary garbage) go to the dead-letter topic
  with their exact bytes and a reason from the vocabulary, and the stream goes on;
- a stop (what SIGTERM does) flushes what the producer still holds: exit code 0 and
  every event the exchange sent is in Kafka exactly once.

The suite needs jsonschema (the ``test`` extra) and pytest's ``kafka_bootstrap``
fixture (a real broker: :func:`connectors.runtime.broker.kafka_broker`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Protocol

import jsonschema
import pytest
import requests

from connectors.runtime.broker import EmbeddedBroker
from connectors.runtime.errors import DEAD_LETTER_REASONS
from connectors.runtime.plugins import ConnectorPlugin
from connectors.testing.brokers import BrokerUnavailable, own_broker
from connectors.testing.running import ConnectorThread, metric_value, ready
from connectors.testing.topics import read_topic, strings_in
from connectors.testing.waits import T, unique, wait_until

#: Unusable frames every plugin must dead-letter without stopping.
HOSTILE_FRAMES: tuple[str | bytes, ...] = (
    "not json at all",
    "[1, 2, 3]",
    '{"unclosed": ',
    b"\xff\xfe\x00binary\x80garbage",
    "{" * 5000,
)

_NUMBER = re.compile(r"(?<![\w.\"])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.\"])")


class StreamingHarness(Protocol):
    """What a plugin gives the suite: its plugin, simulator and knobs."""

    plugin: ConnectorPlugin

    def simulator(self) -> contextlib.AbstractContextManager[Any]:
        """A running simulator of the exchange on 127.0.0.1."""
        ...

    def config(self, sim: Any, bootstrap: str, prefix: str, **kafka: Any) -> Any:
        """A config for ``sim`` writing topics named from ``prefix``; fast back-off."""
        ...

    def topics(self, config: Any) -> Mapping[str, str]:
        """channel → topic for every enabled channel."""
        ...

    def dead_letter_topic(self, config: Any) -> str: ...

    def schema(self, channel: str) -> Mapping[str, Any] | None:
        """The channel's JSON Schema (None: the plugin ships none)."""
        ...

    def sent_frames(self, sim: Any) -> list[str]:
        """Every data frame the simulator wrote, as text."""
        ...

    def expected_events(self, sim: Any) -> Counter[tuple[str, str, str]]:
        """(channel, key, canonical data JSON) of every event the frames hold."""
        ...

    def drop(self, sim: Any) -> None:
        """Close every connection from the server's side."""
        ...

    def inject(self, sim: Any, frame: str | bytes) -> None:
        """Write ``frame`` as it is to every connection."""
        ...

    def pause(self, sim: Any, paused: bool) -> None:
        """Stop (or restart) pushing data."""
        ...

    def open_connections(self, sim: Any) -> int:
        """Connections the simulator holds open right now."""
        ...


def _values(records: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in records]


def canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


class StreamingContract:
    """Subclass with ``harness = <your StreamingHarness>``."""

    harness: ClassVar[StreamingHarness]

    @contextlib.contextmanager
    def _running(self, bootstrap: str, **kafka: Any) -> Iterator[tuple[Any, Any, ConnectorThread]]:
        h = self.harness
        with h.simulator() as sim:
            config = h.config(sim, bootstrap, unique(), **kafka)
            with ConnectorThread(h.plugin, config) as conn:
                yield sim, config, conn

    def _events_arrived(self, sim: Any) -> bool:
        return len(self.harness.sent_frames(sim)) >= 20

    def test_records_land_keyed_with_headers_schemas_and_exact_decimals(
        self, kafka_bootstrap: str
    ) -> None:
        h = self.harness
        with self._running(kafka_bootstrap) as (sim, config, conn):
            wait_until(lambda: self._events_arrived(sim), T(30), "data from the simulator")
            h.pause(sim, True)
            expected = h.expected_events(sim)
            frames = h.sent_frames(sim)
            topics = h.topics(config)
            got: Counter[tuple[str, str, str]] = Counter()
            texts: set[str] = set()
            for channel, topic in topics.items():
                want = sum(n for (ch, _, _), n in expected.items() if ch == channel)
                recs = read_topic(
                    kafka_bootstrap, topic, until=_events_at_least(want), timeout=T(30)
                )
                schema = h.schema(channel)
                for rec in recs:
                    value = json.loads(rec.value)
                    if schema is not None:
                        jsonschema.Draft202012Validator(schema).validate(value)
                    headers = dict(rec.headers)
                    assert headers["exchange"] == h.plugin.exchange.encode()
                    assert headers["channel"] == channel.encode()
                    assert headers["kind"] == value["kind"].encode()
                    assert headers["schema"] == f"{h.plugin.exchange}.{channel}/v1".encode()
                    assert rec.key.decode() == value["symbol"]
                    assert rec.timestamp == value["receive_time_ms"]
                    if value["kind"] == "event":
                        got[(channel, value["symbol"], canonical(value["data"]))] += 1
                        texts.update(strings_in(value["data"]))
            conn.stop()
        assert got == expected, "Kafka differs from what the exchange sent"
        for frame in frames:
            for literal in _NUMBER.findall(frame):
                if "." in literal or "e" in literal.lower():
                    assert literal in texts, f"{literal} was not kept exactly"

    def test_a_dropped_connection_brings_markers_to_every_key(self, kafka_bootstrap: str) -> None:
        h = self.harness
        with self._running(kafka_bootstrap) as (sim, config, conn):
            wait_until(lambda: self._events_arrived(sim), T(30), "data from the simulator")
            h.drop(sim)
            seen = len(h.sent_frames(sim))
            wait_until(lambda: len(h.sent_frames(sim)) > seen + 10, T(30), "data after the drop")
            h.pause(sim, True)
            for channel, topic in h.topics(config).items():
                recs = _values(read_topic(kafka_bootstrap, topic, timeout=T(20), idle=T(2)))
                epochs: dict[str, list[tuple[int, str]]] = {}
                for v in recs:
                    epochs.setdefault(v["symbol"], []).append((v["resync_epoch"], v["kind"]))
                for key, seq in epochs.items():
                    markers = [e for e, kind in seq if kind == "resync"]
                    assert len(markers) >= 2, f"{channel}/{key}: no marker after the drop"
                    assert markers == sorted(set(markers)), f"{channel}/{key}: epochs not rising"
                    # Every event belongs to the epoch of the marker before it.
                    current = None
                    for epoch, kind in seq:
                        if kind == "resync":
                            current = epoch
                        else:
                            assert epoch == current, f"{channel}/{key}: event outside its epoch"
                last = [
                    v for v in recs if v["kind"] == "resync" and v["resync_epoch"] == markers[-1]
                ]
                assert {v["data"]["reason"] for v in last} <= {"server_closed", "connection_lost"}
            text = _metrics(conn)
            ended = sum(
                metric_value(text, "connector_reconnects_total", reason=r)
                for r in ("server_closed", "connection_lost")
            )
            assert ended >= 1
            assert metric_value(text, "connector_gaps_total") >= 1
            assert metric_value(text, "connector_connected") == 1
            assert _ready(conn)
            assert conn.stop().exit_code == 0

    def test_unusable_frames_are_dead_lettered_and_the_stream_goes_on(
        self, kafka_bootstrap: str
    ) -> None:
        h = self.harness
        with self._running(kafka_bootstrap) as (sim, config, conn):
            wait_until(lambda: self._events_arrived(sim), T(30), "data from the simulator")
            for frame in HOSTILE_FRAMES:
                h.inject(sim, frame)
            seen = len(h.sent_frames(sim))
            wait_until(lambda: len(h.sent_frames(sim)) > seen + 10, T(30), "data after them")
            dead = read_topic(
                kafka_bootstrap,
                h.dead_letter_topic(config),
                until=lambda rs: len(rs) >= len(HOSTILE_FRAMES),
                timeout=T(30),
            )
            counted = metric_value(_metrics(conn), "connector_dead_letters_total")
            assert conn.stop().exit_code == 0
        assert counted == len(HOSTILE_FRAMES)
        assert len(dead) == len(HOSTILE_FRAMES)
        want = {
            hashlib.sha256(f.encode() if isinstance(f, str) else f).hexdigest()
            for f in HOSTILE_FRAMES
        }
        assert {dict(r.headers)["original-sha256"].decode() for r in dead} == want
        for rec in dead:
            headers = dict(rec.headers)
            assert headers["error.reason"].decode() in DEAD_LETTER_REASONS
            assert headers["exchange"] == h.plugin.exchange.encode()
        originals = {f.encode() if isinstance(f, str) else f for f in HOSTILE_FRAMES}
        assert {r.value for r in dead} == originals

    def test_stop_flushes_what_the_producer_holds(self, kafka_bootstrap: str) -> None:
        """A long linger keeps records in the producer; stopping must still deliver them."""
        h = self.harness
        with self._running(kafka_bootstrap, linger_ms=3000) as (sim, config, conn):
            wait_until(lambda: self._events_arrived(sim), T(30), "data from the simulator")
            h.pause(sim, True)
            # The connector read everything in flight once nothing arrived for a while.
            wait_until(lambda: _quiet_for(conn, T(0.5)), T(20), "the last frames read")
            result = conn.stop()
            expected = h.expected_events(sim)
        assert result.exit_code == 0
        got: Counter[tuple[str, str, str]] = Counter()
        for channel, topic in h.topics(config).items():
            for v in _values(read_topic(kafka_bootstrap, topic, timeout=T(20), idle=T(2))):
                if v["kind"] == "event":
                    got[(channel, v["symbol"], canonical(v["data"]))] += 1
        assert got == expected

    def test_a_frozen_kafka_pauses_reading_and_resumes_with_a_marker(self) -> None:
        """Back-pressure: with Kafka frozen the connector stops reading (memory stays
        bounded, not ready); once Kafka is back it reconnects with a marker."""
        with contextlib.ExitStack() as stack:
            try:
                broker = stack.enter_context(own_broker())
            except BrokerUnavailable as exc:
                pytest.skip(str(exc))
            self._frozen_kafka(broker)

    def _frozen_kafka(self, broker: EmbeddedBroker) -> None:
        h = self.harness
        limit = 300
        kafka = {"max_buffered_records": limit, "stall_after_s": 1.5, "request_timeout_ms": 4000}
        with self._running(broker.bootstrap_servers, **kafka) as (sim, config, conn):
            wait_until(lambda: _ready(conn), T(30), "ready")
            wait_until(lambda: self._events_arrived(sim), T(30), "data from the simulator")
            broker.pause()
            try:
                wait_until(lambda: h.open_connections(sim) == 0, T(30), "reading paused")
                assert not _ready(conn)
                peak = 0.0
                for _ in range(10):  # stays disconnected, the buffer stays bounded
                    text = _metrics(conn)
                    peak = max(peak, metric_value(text, "connector_buffered_records"))
                    assert h.open_connections(sim) == 0
                    time.sleep(0.2)
                assert peak <= limit + 50
            finally:
                broker.resume()
            wait_until(lambda: _ready(conn), T(60), "ready again")
            text = _metrics(conn)
            assert metric_value(text, "connector_gaps_total", reason="kafka_unavailable") >= 1
            assert metric_value(text, "connector_records_total", outcome="failed") == 0
            assert conn.stop().exit_code == 0
        for topic in h.topics(config).values():
            recs = read_topic(broker.bootstrap_servers, topic, timeout=T(20), idle=T(2))
            reasons = [v["data"]["reason"] for v in _values(recs) if v["kind"] == "resync"]
            assert "kafka_unavailable" in reasons, topic


def _ready(conn: ConnectorThread) -> bool:
    return conn.health_port is not None and ready(conn.health_port)


def _metrics(conn: ConnectorThread) -> str:
    return requests.get(f"http://127.0.0.1:{conn.health_port}/metrics", timeout=5).text


def _quiet_for(conn: ConnectorThread, seconds: float) -> bool:
    return metric_value(_metrics(conn), "connector_seconds_since_last_message") > seconds


def _events_at_least(count: int) -> Callable[[list[Any]], bool]:
    def enough(records: list[Any]) -> bool:
        return sum(b'"kind":"event"' in r.value for r in records) >= count

    return enough


__all__ = ["HOSTILE_FRAMES", "StreamingContract", "StreamingHarness", "canonical"]
