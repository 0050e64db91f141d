"""The librdkafka producer backend (``kafka.producer_backend: confluent-kafka``).

What lands in Kafka must be what kafka-python would have written (key, value, headers,
timestamp, partition), read back with a kafka-python consumer; every acknowledgement is
counted; every failure is loud. Config mistakes stop at start, without secrets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from connectors.cryptomus import protocol
from connectors.runtime.broker import EmbeddedBroker, free_port
from connectors.runtime.config import Secret, build
from connectors.runtime.errors import ConfigError, FatalError, RetriableError
from connectors.runtime.kafka import Delivery, ensure_topics
from connectors.runtime.metrics import Metrics
from connectors.runtime.records import OutRecord
from connectors.runtime.settings import KafkaSettings
from connectors.simulators.cryptomus import CryptomusSimulator
from connectors.simulators.harness import Harness
from connectors.testing import T, metric_value, read_topic, unique, wait_until
from tests.cryptomus_helpers import make_config, run

# The test extra installs it: missing in CI is a failure, elsewhere a skip with the hint.
if not os.environ.get("CI"):
    pytest.importorskip("confluent_kafka", reason="pip install 'exchange-connectors[confluent]'")

from connectors.runtime.rdkafka import RdKafkaError, RdKafkaProducer
from connectors.testing import brokers

BACKENDS = ("kafka-python", "confluent-kafka")
SECRET = "pw-7f3a9c1e-never-shown"


def settings(bootstrap: str, backend: str = "confluent-kafka", **kw: Any) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=bootstrap, producer_backend=backend, **kw)


def connect(kafka: KafkaSettings, topic: str, metrics: Metrics | None = None) -> Delivery:
    ensure_topics(kafka, [topic])
    return Delivery.connect(kafka, metrics or Metrics(), "test", [topic])


def produced(metrics: Metrics, channel: str, outcome: str = "produced") -> float:
    value = metrics.registry.get_sample_value(
        "connector_records_total", {"connector": "test", "channel": channel, "outcome": outcome}
    )
    return value or 0.0


def sample(topic: str) -> list[OutRecord]:
    """Keyed records with headers and event times, one pinned to a partition, one
    without key or timestamp (the producer stamps it)."""
    out = [
        OutRecord(
            topic,
            value=json.dumps({"i": i, "price": "0.000123450"}).encode(),
            key=f"BTC_USDT_{i % 7}".encode(),
            headers=(("channel", b"trade"), ("seq", str(i).encode())),
            timestamp_ms=1_700_000_000_000 + i,
            channel="trade",
        )
        for i in range(60)
    ]
    out.append(
        OutRecord(topic, b'{"kind":"resync"}', b"BTC_USDT_0", (), 1_700_000_001_000, "resync", 2)
    )
    out.append(OutRecord(topic, b'{"kind":"no-key"}', channel="other"))
    return out


def landed(recs: list[Any]) -> set[tuple[Any, ...]]:
    """What a consumer sees; the partition of a record without key is the producer's
    random choice, so it is left out for that one."""
    return {
        (
            r.partition if r.key is not None else None,
            r.key,
            r.value,
            tuple(r.headers),
            r.timestamp if r.key is not None else None,
        )
        for r in recs
    }


# -- what lands in Kafka -------------------------------------------------------------------


@pytest.mark.e2e
def test_records_land_exactly_as_with_kafka_python(kafka_bootstrap: str) -> None:
    seen: dict[str, list[Any]] = {}
    for backend in BACKENDS:
        topic = unique(f"rdk-{backend[:5]}-")
        metrics = Metrics()
        delivery = connect(settings(kafka_bootstrap, backend), topic, metrics)
        records = sample(topic)
        before = time.time() * 1000
        try:
            for record in records:
                delivery.send(record)
            assert delivery.flush(T(20)), f"{backend}: not everything was acknowledged"
        finally:
            delivery.close(T(5))
        assert delivery.acked_records == len(records) and delivery.drained()
        assert delivery.failure is None and delivery.failed_records == 0
        assert produced(metrics, "trade") == 60 and produced(metrics, "resync") == 1
        want = len(records)
        recs = read_topic(
            kafka_bootstrap, topic, until=lambda rs, want=want: len(rs) >= want, timeout=T(20)
        )
        assert len(recs) == len(records), f"{backend}: duplicates in Kafka"
        (stamped,) = [r for r in recs if r.key is None]
        assert before - 1000 <= stamped.timestamp <= time.time() * 1000 + 1000
        seen[backend] = recs
    assert landed(seen["confluent-kafka"]) == landed(seen["kafka-python"])
    recs = seen["confluent-kafka"]
    (pinned,) = [r for r in recs if r.value == b'{"kind":"resync"}']
    assert pinned.partition == 2
    for key in {r.key for r in recs if r.key is not None and r.value != pinned.value}:
        same_key = [r for r in recs if r.key == key and r.value != pinned.value]
        assert len({r.partition for r in same_key}) == 1
        order = [json.loads(r.value)["i"] for r in sorted(same_key, key=lambda r: r.offset)]
        assert order == sorted(order), "one key, one partition, send order"


@pytest.mark.e2e
def test_callbacks_run_off_the_calling_thread_and_close_stops_the_poller(
    kafka_bootstrap: str,
) -> None:
    topic = unique("rdk-thr-")
    kafka = settings(kafka_bootstrap)
    ensure_topics(kafka, [topic])
    producer = RdKafkaProducer(kafka)
    producer.partitions_for(topic)
    threads: list[str] = []
    producer.send(topic, value=b"x", key=b"k").add_callback(
        lambda _md: threads.append(threading.current_thread().name)
    )
    wait_until(lambda: bool(threads), T(10), "the acknowledgement")
    assert threads == ["rdkafka-poll"]
    producer.close(timeout=T(5))
    assert not any(t.name == "rdkafka-poll" for t in threading.enumerate())
    with pytest.raises(RdKafkaError):
        producer.send(topic, value=b"late")


@pytest.mark.e2e
def test_a_full_local_queue_waits_for_room(kafka_bootstrap: str) -> None:
    """librdkafka's BufferError is not an error while the broker frees room in time."""
    topic = unique("rdk-full-")
    kafka = settings(kafka_bootstrap, linger_ms=0)
    ensure_topics(kafka, [topic])
    producer = RdKafkaProducer(
        kafka, max_block_s=T(5), overrides={"queue.buffering.max.messages": 2}
    )
    delivery = Delivery(producer, Metrics(), "test", 1000, 10.0)
    producer.partitions_for(topic)
    try:
        for i in range(50):
            delivery.send(OutRecord(topic, str(i).encode(), b"k"))
        assert delivery.flush(T(20))
    finally:
        delivery.close(T(5))
    assert delivery.acked_records == 50
    recs = read_topic(kafka_bootstrap, topic, until=lambda rs: len(rs) >= 50, timeout=T(20))
    assert [int(r.value) for r in recs] == list(range(50))


@pytest.mark.e2e
def test_cryptomus_runs_end_to_end_on_the_confluent_backend(kafka_bootstrap: str) -> None:
    channels = ["trade", "ticker", "depth"]
    with Harness(CryptomusSimulator(updates_per_second=20.0, seed=11)) as sim:
        config = make_config(
            sim,
            kafka_bootstrap,
            channels=channels,
            markets=["BTC_USDT", "ETH_USDT"],
            kafka={"producer_backend": "confluent-kafka"},
        )
        with run(config) as conn:
            wait_until(
                lambda: all(sim.control.counters()["updates_sent"][ch] >= 5 for ch in channels),
                T(30),
                "updates on every channel",
            )
            sim.control.pause_updates()
            expected = {
                ch: [e for f in sim.control.sent_frames(ch) for e in protocol.parse_frame(f).events]  # type: ignore[union-attr]
                for ch in channels
            }
            received = {}
            for ch in channels:
                want = len(expected[ch])
                received[ch] = read_topic(
                    kafka_bootstrap,
                    config.cryptomus.topics.for_channel(ch),
                    until=lambda rs, want=want: (
                        sum(json.loads(r.value)["kind"] == "event" for r in rs) >= want
                    ),
                    timeout=T(30),
                )
            text = requests.get(f"http://127.0.0.1:{conn.health_port}/metrics", timeout=2).text
        result = conn.result
    assert result is not None and result.exit_code == 0, result
    assert metric_value(text, "connector_records_total", outcome="failed") == 0
    for ch in channels:
        events = [json.loads(r.value) for r in received[ch]]
        got = Counter(
            (e["symbol"], json.dumps(e["data"], sort_keys=True))
            for e in events
            if e["kind"] == "event"
        )
        want = Counter((e.key, json.dumps(e.data, sort_keys=True)) for e in expected[ch])
        assert got == want, f"{ch}: Kafka differs from what the simulator sent"
        for rec in received[ch]:
            value = json.loads(rec.value)
            assert rec.key.decode() == value["symbol"]
            assert dict(rec.headers)["channel"] == ch.encode()
            # One timestamp rule on both backends: the time the connector received it.
            assert rec.timestamp == value["receive_time_ms"]


# -- failures are loud ---------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["too large", "no such partition"])
def test_a_record_the_producer_refuses_is_fatal(
    kafka_bootstrap: str, backend: str, what: str
) -> None:
    topic = unique("rdk-bad-")
    metrics = Metrics()
    delivery = connect(settings(kafka_bootstrap, backend), topic, metrics)
    if what == "too large":
        bad = OutRecord(topic, b"x" * 2_000_000, b"k", channel="trade")
    else:
        bad = OutRecord(topic, b"x", b"k", channel="trade", partition=99)
    try:
        # kafka-python fails some of these through the future, librdkafka at once:
        # either way the failure is recorded and the next send refuses.
        with contextlib.suppress(FatalError):
            delivery.send(bad)
        wait_until(lambda: delivery.failure is not None, T(10), "the failure")
        with pytest.raises(FatalError, match="failed earlier"):
            delivery.send(OutRecord(topic, b"fine", b"k"))
        assert not delivery.flush(T(5))
    finally:
        delivery.close(T(5))
    assert delivery.failed_records == 1 and delivery.acked_records == 0
    assert produced(metrics, "trade", "failed") == 1


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker this test may freeze; the shared one stays untouched."""
    try:
        with brokers.own_broker() as broker:
            yield broker
    except brokers.BrokerUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.e2e
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_broker_that_stops_answering_fails_the_delivery(
    own_broker: EmbeddedBroker, backend: str
) -> None:
    topic = unique("rdk-frozen-")
    kafka = settings(
        own_broker.bootstrap_servers,
        backend,
        linger_ms=0,
        stall_after_s=0.5,
        request_timeout_ms=1000,
        delivery_timeout_ms=3000,
    )
    delivery = connect(kafka, topic)
    try:
        delivery.send(OutRecord(topic, b"before", b"k"))
        assert delivery.flush(T(10))
        own_broker.pause()
        delivery.send(OutRecord(topic, b"during", b"k"))
        wait_until(lambda: delivery.failure is not None, T(20), "the delivery timeout")
        assert delivery.failed_records == 1 and delivery.acked_records == 1
        with pytest.raises(FatalError):
            delivery.send(OutRecord(topic, b"after", b"k"))
    finally:
        own_broker.resume()
        delivery.close(T(5))


def test_undeliverable_records_fail_by_the_delivery_timeout() -> None:
    """Nothing listens at the bootstrap address: the record fails, it is not dropped."""
    kafka = settings(f"127.0.0.1:{free_port()}", stall_after_s=0.5, delivery_timeout_ms=1500)
    delivery = Delivery(RdKafkaProducer(kafka), Metrics(), "test", 100, 0.5)
    try:
        delivery.send(OutRecord("nowhere", b"v", b"k"))
        wait_until(lambda: delivery.failure is not None, T(15), "the delivery timeout")
        assert isinstance(delivery.failure, RdKafkaError)
        assert "timed out" in str(delivery.failure).lower()
        with pytest.raises(FatalError):
            delivery.send(OutRecord("nowhere", b"v2", b"k"))
    finally:
        delivery.close(1)
    assert delivery.failed_records == 1 and delivery.drained()


def test_close_fails_what_it_could_not_deliver() -> None:
    kafka = settings(f"127.0.0.1:{free_port()}")
    delivery = Delivery(RdKafkaProducer(kafka), Metrics(), "test", 100, 10.0)
    for i in range(3):
        delivery.send(OutRecord("nowhere", str(i).encode(), b"k"))
    assert not delivery.flush(0.2)
    delivery.close(0.2)
    assert delivery.failed_records == 3 and delivery.drained()
    assert isinstance(delivery.failure, RdKafkaError)


def test_a_queue_that_stays_full_is_fatal_after_max_block() -> None:
    kafka = settings(f"127.0.0.1:{free_port()}")
    producer = RdKafkaProducer(
        kafka, max_block_s=0.3, overrides={"queue.buffering.max.messages": 1}
    )
    delivery = Delivery(producer, Metrics(), "test", 100, 10.0)
    try:
        delivery.send(OutRecord("nowhere", b"1", b"k"))
        started = time.monotonic()
        with pytest.raises(FatalError, match="queue still full"):
            delivery.send(OutRecord("nowhere", b"2", b"k"))
        assert time.monotonic() - started >= 0.3
        assert delivery.failure is not None
    finally:
        delivery.close(0.2)


def test_an_unreachable_broker_is_retriable_at_connect() -> None:
    kafka = settings(f"127.0.0.1:{free_port()}")
    with pytest.raises(RetriableError, match="topic metadata"):
        Delivery.connect(kafka, Metrics(), "test", ["nowhere"])


@pytest.mark.e2e
def test_refused_credentials_never_show_the_password(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SASL against a broker that does not take it: connect fails, the secret stays hidden."""
    caplog.set_level(logging.DEBUG)
    kafka = settings(
        kafka_bootstrap,
        client={
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "sasl_plain_username": "connector",
            "sasl_plain_password": Secret(SECRET),
        },
    )
    with pytest.raises(RetriableError) as info:
        Delivery.connect(kafka, Metrics(), "test", ["nowhere"])
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert caplog.records, "librdkafka's log lines reach Python logging"
    assert SECRET not in caplog.text
    assert SECRET not in repr(kafka)


# -- configuration -------------------------------------------------------------------------


def test_the_yaml_key_selects_the_backend() -> None:
    assert build(KafkaSettings, {}).producer_backend == "kafka-python"
    chosen = build(KafkaSettings, {"producer_backend": "confluent-kafka"}, "kafka")
    assert chosen.producer_backend == "confluent-kafka"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"producer_backend": "librdkafka"}, "kafka.producer_backend: 'librdkafka' is not one of"),
        ({"producer_backend": 1}, "kafka.producer_backend: expected a string"),
        ({"client": {"max_request_size": 4096}}, "kafka.client.max_request_size is not supported"),
        ({"client": {"ssl_password": SECRET}}, "kafka.client.ssl_password is not supported"),
        ({"client": {"sasl_plain_passwrd": SECRET}}, "unknown kafka-python setting"),
        ({"client": {"acks": 1}}, "set by the connector"),
        (
            {"client": {"security_protocol": "SASL_SSL", "sasl_plain_password": SECRET}},
            "sasl_mechanism is required",
        ),
        (
            {"client": {"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"}},
            "'OAUTHBEARER' is not supported",
        ),
    ],
)
def test_config_mistakes_stop_at_start_without_secrets(data: dict[str, Any], message: str) -> None:
    data = {"producer_backend": "confluent-kafka", **data}
    with pytest.raises(ConfigError, match=message) as info:
        build(KafkaSettings, data, "kafka")
    assert SECRET not in str(info.value)


def test_every_supported_client_key_reaches_librdkafka() -> None:
    from connectors.runtime.rdkafka import rdkafka_config

    kafka = build(
        KafkaSettings,
        {
            "producer_backend": "confluent-kafka",
            "bootstrap_servers": "a:9093,b:9093",
            "compression_type": "zstd",
            "client": {
                "client_id": "cx",
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_plain_username": "connector",
                "sasl_plain_password": SECRET,
                "ssl_cafile": "/etc/ca.pem",
                "ssl_certfile": "/etc/c.pem",
                "ssl_keyfile": "/etc/k.pem",
            },
        },
    )
    cfg = rdkafka_config(kafka)
    assert cfg == {
        "bootstrap.servers": "a:9093,b:9093",
        "client.id": "cx",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "connector",
        "sasl.password": SECRET,
        "ssl.ca.location": "/etc/ca.pem",
        "ssl.certificate.location": "/etc/c.pem",
        "ssl.key.location": "/etc/k.pem",
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "message.timeout.ms": 120_000,
        "request.timeout.ms": 30_000,
        "socket.timeout.ms": 30_000,
        "compression.type": "zstd",
        "partitioner": "murmur2_random",
    }
    assert SECRET not in repr(kafka)


def test_a_bad_librdkafka_setting_is_a_config_error_without_the_secret() -> None:
    kafka = settings(
        "127.0.0.1:1",
        client={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "PLAIN",
            "sasl_plain_username": "connector",
            "sasl_plain_password": Secret(SECRET),
        },
        compression_type="brotli",
    )
    with pytest.raises(ConfigError, match="compression") as info:
        RdKafkaProducer(kafka)
    assert SECRET not in str(info.value)


def test_a_missing_confluent_kafka_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "confluent_kafka", None)
    monkeypatch.delitem(sys.modules, "connectors.runtime.rdkafka")
    monkeypatch.delattr("connectors.runtime.rdkafka")
    with pytest.raises(ConfigError, match=r"exchange-connectors\[confluent\]"):
        build(KafkaSettings, {"producer_backend": "confluent-kafka"}, "kafka")
    # The default backend never imports it.
    assert build(KafkaSettings, {}, "kafka").producer_backend == "kafka-python"
