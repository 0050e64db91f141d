"""Simulator → connector → real broker → kafka-python consumer, for every channel."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import requests

from connectors.cryptomus import protocol
from connectors.cryptomus.protocol import CHANNELS
from connectors.cryptomus.schemas import load_schema
from connectors.simulators.cryptomus import CryptomusSimulator
from connectors.simulators.harness import Harness
from connectors.testing import T, metric_value, read_topic, wait_until
from connectors.testing.topics import strings_in
from tests.cryptomus_helpers import make_config, run

pytestmark = pytest.mark.e2e


@pytest.fixture
def sim() -> Iterator[Harness[CryptomusSimulator]]:
    with Harness(CryptomusSimulator(updates_per_second=20.0, seed=7)) as s:
        yield s


def literal_decimals(raw: str) -> list[str]:
    """Decimal literals of a frame, quoted or bare (JSON numbers), ids/times excluded."""
    quoted = re.findall(r'"(-?\d+\.\d+|0)"', raw)
    bare = re.findall(r"(?<=[:\[,])\s*(-?\d+\.\d+)(?=\s*[,\]}])", raw)
    return quoted + [b.strip() for b in bare]


def test_every_channel_lands_in_kafka_exactly(
    sim: Harness[CryptomusSimulator], kafka_bootstrap: str
) -> None:
    config = make_config(sim, kafka_bootstrap)
    with run(config):
        wait_until(
            lambda: all(sim.control.counters()["updates_sent"][ch] >= 5 for ch in CHANNELS),
            T(30),
            "updates on every channel",
        )
        sim.control.pause_updates()
        sent = {ch: sim.control.sent_frames(ch) for ch in CHANNELS}
        expected = {
            ch: [e for f in frames for e in protocol.parse_frame(f).events]  # type: ignore[union-attr]
            for ch, frames in sent.items()
        }
        received: dict[str, list[Any]] = {}
        for ch in CHANNELS:
            topic = config.cryptomus.topics.for_channel(ch)
            want = len(expected[ch])
            recs = read_topic(
                kafka_bootstrap,
                topic,
                until=lambda rs, want=want: (
                    sum(json.loads(r.value)["kind"] == "event" for r in rs) >= want
                ),
                timeout=T(30),
            )
            received[ch] = recs
    for ch in CHANNELS:
        schema = load_schema(ch)
        validator = jsonschema.Draft202012Validator(schema)
        events = []
        for rec in received[ch]:
            value = json.loads(rec.value)
            validator.validate(value)
            assert value["exchange"] == "cryptomus" and value["channel"] == ch
            assert rec.key.decode() == value["symbol"]
            assert dict(rec.headers)["channel"] == ch.encode()
            # One timestamp rule for every record: the time the connector received it.
            assert rec.timestamp == value["receive_time_ms"]
            if value["kind"] == "event":
                events.append(value)
        # Exactly the events the exchange sent: no loss, no duplicate, nothing rewritten.
        got = Counter((e["symbol"], json.dumps(e["data"], sort_keys=True)) for e in events)
        want = Counter((e.key, json.dumps(e.data, sort_keys=True)) for e in expected[ch])
        assert got == want, f"{ch}: Kafka differs from what the simulator sent"
        # Independently of the parser: every decimal literal of every frame, byte-exact.
        texts = {s for e in events for s in strings_in(e["data"])}
        for frame in sent[ch]:
            for literal in literal_decimals(frame):
                assert literal in texts, f"{ch}: {literal} was not kept exactly"
        # Every key saw a resync marker before its first event (the initial epoch).
        markers = [
            json.loads(r.value) for r in received[ch] if json.loads(r.value)["kind"] == "resync"
        ]
        assert markers and all(m["data"]["reason"] == "start" for m in markers)


def test_depth_records_carry_the_epoch_and_start_with_a_full_reload(
    sim: Harness[CryptomusSimulator], kafka_bootstrap: str
) -> None:
    config = make_config(sim, kafka_bootstrap, channels=["depth"], markets=["BTC_USDT"])
    with run(config):
        wait_until(
            lambda: sim.control.counters()["updates_sent"]["depth"] >= 10, T(20), "depth updates"
        )
        sim.control.pause_updates()
        n = sim.control.counters()["updates_sent"]["depth"]
        recs = read_topic(
            kafka_bootstrap,
            config.cryptomus.topics.depth,
            until=lambda rs: len(rs) >= n + 1,
            timeout=T(20),
        )
    values = [json.loads(r.value) for r in recs]
    by_partition_order = values  # one key → one partition → Kafka order is exchange order
    assert by_partition_order[0]["kind"] == "resync"
    epoch = by_partition_order[0]["resync_epoch"]
    events = [v for v in by_partition_order if v["kind"] == "event"]
    assert {v["resync_epoch"] for v in events} == {epoch}
    scales = {v["data"]["scale_index"] for v in events}
    for scale in scales:
        first = next(v for v in events if v["data"]["scale_index"] == scale)
        assert first["data"]["full_reload"] is True
    assert any(
        level[1] == "0"
        for v in events
        if not v["data"]["full_reload"]
        for level in v["data"]["bids"] + v["data"]["asks"]
    ), "partial updates remove levels with quantity 0"


def test_metrics_and_readiness(sim: Harness[CryptomusSimulator], kafka_bootstrap: str) -> None:
    config = make_config(sim, kafka_bootstrap, channels=["trade", "ticker"])
    with run(config) as conn:
        base = f"http://127.0.0.1:{conn.health_port}"
        wait_until(
            lambda: requests.get(base + "/readyz", timeout=2).status_code == 200, T(20), "ready"
        )
        assert requests.get(base + "/healthz", timeout=2).status_code == 200
        wait_until(
            lambda: (
                metric_value(
                    requests.get(base + "/metrics", timeout=2).text,
                    "connector_records_total",
                    channel="trade",
                    outcome="produced",
                )
                >= 5
            ),
            T(20),
            "produced trade records in /metrics",
        )
        text = requests.get(base + "/metrics", timeout=2).text
        for name in (
            "connector_reconnects_total",
            "connector_ping_rtt_seconds",
            "connector_event_time_lag_seconds",
            "connector_produce_latency_seconds",
            "connector_dead_letters_total",
            "connector_buffered_records",
            "connector_seconds_since_last_message",
        ):
            assert name in text, f"{name} missing from /metrics"
        assert metric_value(text, "connector_seconds_since_last_message") < 5
        assert metric_value(text, "connector_produce_latency_seconds_count") >= 5
