"""Delivery's per-slice counting against a real broker, with both producer backends.

Records sent through the hot path (``Delivery.send_parts``, envelopes from
``records.Envelopes``) on two channels at once: every one acknowledged and counted per
channel, and every one in Kafka, once, in the order it was sent for its key.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any

import pytest

from connectors.runtime import records
from connectors.runtime.kafka import Delivery, ensure_topics
from connectors.runtime.metrics import Metrics
from connectors.runtime.settings import KafkaSettings
from connectors.testing import T, read_topic, unique

# The test extra installs it: missing in CI is a failure, elsewhere a skip with the hint.
if not os.environ.get("CI"):
    pytest.importorskip("confluent_kafka", reason="pip install 'exchange-connectors[confluent]'")

BACKENDS = ("kafka-python", "confluent-kafka")
CONNECTOR = "slices"
CHANNELS = ("trade", "book")
PER_CHANNEL = 1_000
KEYS = 7


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"connector": CONNECTOR, **labels})
    return value or 0.0


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKENDS)
def test_records_sent_in_slices_are_all_acknowledged_and_land_in_key_order(
    kafka_bootstrap: str, backend: str
) -> None:
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, producer_backend=backend)
    topics = {channel: unique(f"slices-{channel}-") for channel in CHANNELS}
    ensure_topics(kafka, topics.values())
    metrics = Metrics()
    delivery = Delivery.connect(kafka, metrics, CONNECTOR, topics.values())
    envelopes = records.Envelopes("slicetest")
    headers = {
        channel: records.headers("slicetest", channel, "event", f"slicetest.{channel}/v1")
        for channel in CHANNELS
    }
    try:
        for i in range(2 * PER_CHANNEL):
            channel = CHANNELS[i % 2]
            seq = i // 2
            symbol = f"SYM_{seq % KEYS}"
            value = envelopes.encode(
                channel, "event", symbol, None, 1_700_000_000_000 + i, 1, {"seq": seq}
            )
            delivery.send_parts(
                topics[channel], value, symbol.encode(), headers[channel], None, channel
            )
        assert delivery.sent_records == 2 * PER_CHANNEL
        assert delivery.flush(T(30)), f"{backend}: not everything was acknowledged"
    finally:
        delivery.close(T(5))
    assert delivery.acked_records == 2 * PER_CHANNEL
    assert delivery.buffered == 0 and delivery.drained()
    assert delivery.failure is None and delivery.failed_records == 0
    assert delivery.oldest_unacked_age() == 0.0
    assert sample(metrics, "connector_buffered_records") == 0
    assert sample(metrics, "connector_produce_latency_seconds_count") == 2 * PER_CHANNEL
    for channel in CHANNELS:
        labels = {"channel": channel, "outcome": "produced"}
        assert sample(metrics, "connector_records_total", **labels) == PER_CHANNEL
        assert sample(metrics, "connector_records_total", channel=channel, outcome="failed") == 0

    for channel, topic in topics.items():
        recs = read_topic(
            kafka_bootstrap, topic, until=lambda rs: len(rs) >= PER_CHANNEL, timeout=T(30)
        )
        assert len(recs) == PER_CHANNEL, f"{backend}/{channel}: duplicates in Kafka"
        by_key: dict[bytes, list[Any]] = defaultdict(list)
        for rec in recs:
            by_key[rec.key].append(rec)
        seen: list[int] = []
        for key, same_key in by_key.items():
            assert len({r.partition for r in same_key}) == 1, "one key, one partition"
            envelopes_read = [json.loads(r.value) for r in sorted(same_key, key=lambda r: r.offset)]
            assert {e["symbol"].encode() for e in envelopes_read} == {key}
            assert {e["channel"] for e in envelopes_read} == {channel}
            order = [e["data"]["seq"] for e in envelopes_read]
            assert order == sorted(order), f"{backend}/{channel}/{key!r}: not in send order"
            seen.extend(order)
        assert sorted(seen) == list(range(PER_CHANNEL)), f"{backend}/{channel}: records lost"
