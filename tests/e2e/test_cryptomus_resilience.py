"""Reconnects, idle close, bad frames and a Kafka outage, against real servers."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from connectors.cryptomus.protocol import CHANNELS
from connectors.runtime.broker import EmbeddedBroker
from connectors.simulators.cryptomus import CryptomusSimulator
from connectors.simulators.harness import Harness
from connectors.testing import T, brokers, metric_value, read_topic, wait_until
from tests.cryptomus_helpers import make_config, run

pytestmark = pytest.mark.e2e

FIXTURES_MALFORMED = "tests/fixtures/cryptomus/order_finished_malformed.json"


def fully_subscribed(sim: Harness[CryptomusSimulator]) -> bool:
    subs = sim.control.active_subscriptions()
    return len(subs) == 1 and set(subs[0]) == set(CHANNELS)


def test_twenty_drops_each_reconnect_uses_a_new_token_and_resubscribes(
    kafka_bootstrap: str,
) -> None:
    with Harness(CryptomusSimulator(updates_per_second=5.0, seed=3)) as sim:
        config = make_config(sim, kafka_bootstrap)
        with run(config) as conn:
            wait_until(lambda: fully_subscribed(sim), T(20), "first subscription")
            first = sim.control.active_subscriptions()[0]
            for i in range(20):
                accepted = sim.control.counters()["connections_accepted"]
                assert sim.control.drop_connections() == 1
                wait_until(
                    lambda a=accepted: (
                        sim.control.counters()["connections_accepted"] > a and fully_subscribed(sim)
                    ),
                    T(20),
                    f"resubscription after drop {i + 1}",
                )
            c = sim.control.counters()
            metrics = requests.get(f"http://127.0.0.1:{conn.health_port}/metrics", timeout=2).text
        assert c["connections_accepted"] == 21
        assert c["tokens_issued"] == 21
        assert c["token_reuse_attempts"] == 0
        assert c["token_expired"] == 0 and c["token_invalid"] == 0
        assert c["repeated_subscribe_rejections"] == 0
        # Every subscription came back as it was, one request per data type each time.
        subscribes = [
            m for _, m, _ in sim.control.connection_requests() if m and m.endswith("_subscribe")
        ]
        assert Counter(subscribes) == {f"{ch}_subscribe": 21 for ch in CHANNELS}
        assert set(first) == set(CHANNELS)
        assert metric_value(metrics, "connector_reconnects_total", reason="connection_lost") == 20
        assert metric_value(metrics, "connector_gaps_total") == 20
    markers = [
        json.loads(r.value)
        for r in read_topic(kafka_bootstrap, config.cryptomus.topics.depth, timeout=T(10))
    ]
    epochs = {m["resync_epoch"] for m in markers if m["kind"] == "resync"}
    assert len(epochs) == 21, "each connection starts a new resync epoch"


def test_connection_outlives_several_idle_limits_thanks_to_pings(kafka_bootstrap: str) -> None:
    idle = 1.0 * T(1)
    with Harness(CryptomusSimulator(updates_per_second=2.0, idle_timeout_s=idle)) as sim:
        config = make_config(
            sim,
            kafka_bootstrap,
            channels=["ticker"],
            ping_interval_s=idle * 0.4,
            ping_timeout_s=idle * 2,
            stale_after_s=idle * 5,
        )
        with run(config):
            wait_until(lambda: sim.control.open_connections() == 1, T(20), "connected")
            time.sleep(idle * 5)
            c = sim.control.counters()
        assert c["idle_closes"] == 0
        assert c["connections_accepted"] == 1
        assert c["pings"] >= 8


def test_bad_frames_are_dead_lettered_and_the_stream_goes_on(kafka_bootstrap: str) -> None:
    bad = [
        Path(FIXTURES_MALFORMED).read_text(),
        "this is not json",
        '{"id":9,"method":"candles_update","data":{},"error":null}',
        '{"id":0,"method":"ticker_update","data":{"symbol":"BTC_USDT","timestamp":1},"error":null}',
    ]
    reasons = ["invalid_json", "invalid_json", "unknown_method", "invalid_payload"]
    with Harness(CryptomusSimulator(updates_per_second=10.0)) as sim:
        config = make_config(sim, kafka_bootstrap, channels=["ticker"])
        with run(config) as conn:
            wait_until(lambda: sim.control.open_connections() == 1, T(20), "connected")
            for frame in bad:
                assert sim.control.inject_raw(frame) == 1
            before = sim.control.counters()["updates_sent"]["ticker"]
            wait_until(
                lambda: sim.control.counters()["updates_sent"]["ticker"] >= before + 10,
                T(20),
                "more",
            )
            sim.control.pause_updates()
            total = sim.control.counters()["updates_sent"]["ticker"]
            dlq = read_topic(
                kafka_bootstrap,
                config.cryptomus.topics.dead_letter,
                until=lambda rs: len(rs) >= len(bad),
                timeout=T(20),
            )
            events = read_topic(
                kafka_bootstrap,
                config.cryptomus.topics.ticker,
                until=lambda rs: sum(json.loads(r.value)["kind"] == "event" for r in rs) >= total,
                timeout=T(20),
            )
            metrics = requests.get(f"http://127.0.0.1:{conn.health_port}/metrics", timeout=2).text
        assert sim.control.counters()["connections_accepted"] == 1, (
            "a bad frame must not cost the connection"
        )
    assert sorted(r.value.decode() for r in dlq) == sorted(bad)
    for rec in dlq:
        headers = dict(rec.headers)
        assert headers["error.reason"].decode() == reasons[bad.index(rec.value.decode())]
        assert headers["error.detail"]
    assert sum(json.loads(r.value)["kind"] == "event" for r in events) == total
    assert metric_value(metrics, "connector_dead_letters_total") == len(bad)


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker this test may freeze; the shared one stays untouched."""
    try:
        with brokers.own_broker() as broker:
            yield broker
    except brokers.BrokerUnavailable as exc:
        pytest.skip(str(exc))


def test_kafka_outage_pauses_reading_and_resumes_with_a_gap_marker(
    own_broker: EmbeddedBroker,
) -> None:
    bootstrap = own_broker.bootstrap_servers
    limit = 300
    with Harness(CryptomusSimulator(updates_per_second=40.0)) as sim:
        config = make_config(
            sim,
            bootstrap,
            channels=["trade", "ticker", "depth"],
            markets=["BTC_USDT"],
            kafka={
                "max_buffered_records": limit,
                "stall_after_s": 1.5,
                "request_timeout_ms": 4000,
                "delivery_timeout_ms": 120_000,
            },
        )
        with run(config) as conn:
            base = f"http://127.0.0.1:{conn.health_port}"
            wait_until(
                lambda: requests.get(base + "/readyz", timeout=2).status_code == 200, T(20), "ready"
            )
            own_broker.pause()
            try:
                wait_until(
                    lambda: sim.control.open_connections() == 0,
                    T(20),
                    "exchange connection dropped",
                )
                assert requests.get(base + "/readyz", timeout=2).status_code == 503
                accepted = sim.control.counters()["connections_accepted"]
                peak = 0.0
                end = time.monotonic() + 4
                while time.monotonic() < end:  # stays disconnected, memory stays bounded
                    text = requests.get(base + "/metrics", timeout=2).text
                    peak = max(peak, metric_value(text, "connector_buffered_records"))
                    time.sleep(0.2)
                assert sim.control.counters()["connections_accepted"] == accepted
                assert peak <= limit + 50
            finally:
                own_broker.resume()
            wait_until(
                lambda: sim.control.counters()["connections_accepted"] > accepted,
                T(60),
                "reconnect",
            )
            wait_until(
                lambda: requests.get(base + "/readyz", timeout=2).status_code == 200,
                T(30),
                "ready again",
            )
            text = requests.get(base + "/metrics", timeout=2).text
            assert metric_value(text, "connector_gaps_total", reason="kafka_unavailable") >= 1
            assert metric_value(text, "connector_records_total", outcome="failed") == 0
        result = conn.result
        assert result is not None and result.exit_code == 0
    markers = [
        json.loads(r.value)
        for r in read_topic(bootstrap, config.cryptomus.topics.depth, timeout=T(15))
        if json.loads(r.value)["kind"] == "resync"
    ]
    assert [m["data"]["reason"] for m in markers][-1] == "kafka_unavailable"


def test_a_record_kafka_refuses_ends_the_run_with_exit_1(kafka_bootstrap: str) -> None:
    """No swallowed send error: a record the producer cannot deliver is fatal."""
    with Harness(CryptomusSimulator(updates_per_second=5.0)) as sim:
        config = make_config(
            sim, kafka_bootstrap, channels=["ticker"], kafka={"client": {"max_request_size": 4096}}
        )
        conn = run(config).start()
        wait_until(lambda: sim.control.open_connections() == 1, T(20), "connected")
        sim.control.inject_raw("x" * 10_000)  # dead-letter record larger than Kafka will take
        wait_until(lambda: conn.result is not None, T(30), "the connector to stop")
        result = conn.stop()
    assert result.exit_code == 1
    assert result.error and "refused a record" in result.error


def test_kafka_away_longer_than_the_delivery_timeout_is_fatal(
    own_broker: EmbeddedBroker,
) -> None:
    with Harness(CryptomusSimulator(updates_per_second=20.0)) as sim:
        config = make_config(
            sim,
            own_broker.bootstrap_servers,
            channels=["ticker"],
            kafka={
                "stall_after_s": 0.5,
                "request_timeout_ms": 1000,
                "delivery_timeout_ms": 3000,
                "linger_ms": 0,
            },
        )
        conn = run(config).start()
        wait_until(lambda: sim.control.open_connections() == 1, T(20), "connected")
        time.sleep(0.5)
        own_broker.pause()
        try:
            wait_until(lambda: conn.result is not None, T(40), "the connector to give up")
        finally:
            own_broker.resume()
        result = conn.stop()
    assert result.exit_code == 1
    assert result.error and "did not acknowledge" in result.error


def test_a_new_listing_moves_depth_subscriptions_in_place(kafka_bootstrap: str) -> None:
    """Changing a subscribed list: unsubscribe then subscribe, same connection, markers."""
    from decimal import Decimal

    from connectors.simulators.cryptomus import MarketSpec

    with Harness(CryptomusSimulator(updates_per_second=10.0)) as sim:
        config = make_config(
            sim,
            kafka_bootstrap,
            channels=["depth", "ticker"],
            depth_scale_indices=[0],
            market_refresh_s=0.5 * T(1),
        )
        with run(config):
            wait_until(lambda: len(sim.control.active_subscriptions()) == 1, T(20), "subscribed")
            sim.control.list_market(
                MarketSpec(
                    symbol="SOL_USDT",
                    market_id="01HSBPVS17CT2GN2FV34K3SOL1",
                    base="SOL",
                    quote="USDT",
                    base_full_name="Solana",
                    quote_full_name="Tether USD",
                    price=Decimal("150.25"),
                    price_tick=Decimal("0.01"),
                    qty_quantum=Decimal("0.001"),
                    typical_qty=Decimal("2"),
                    scales=(Decimal("0.01"), Decimal("0.1")),
                )
            )
            wait_until(
                lambda: (
                    "SOL_USDT:0" in (sim.control.active_subscriptions() or [{}])[0].get("depth", [])
                ),
                T(20),
                "depth subscription to include the new market",
            )
            requests_seen = [m for _, m, _ in sim.control.connection_requests()]
            counters = sim.control.counters()
            recs = read_topic(
                kafka_bootstrap,
                config.cryptomus.topics.depth,
                until=lambda rs: any(
                    json.loads(r.value)["symbol"] == "SOL_USDT"
                    and json.loads(r.value)["kind"] == "event"
                    for r in rs
                ),
                timeout=T(20),
            )
    assert counters["connections_accepted"] == 1, "changed in place, no reconnect"
    assert counters["repeated_subscribe_rejections"] == 0
    assert requests_seen.count("depth_unsubscribe") == 1
    assert requests_seen.count("depth_subscribe") == 2
    assert requests_seen.count("ticker_subscribe") == 1, "unchanged channels are left alone"
    sol = [json.loads(r.value) for r in recs if r.key == b"SOL_USDT"]
    assert sol[0]["kind"] == "resync" and sol[0]["data"]["reason"] == "subscription_change"
    first_event = next(v for v in sol if v["kind"] == "event")
    assert first_event["data"]["full_reload"] is True
    assert first_event["resync_epoch"] == sol[0]["resync_epoch"]
