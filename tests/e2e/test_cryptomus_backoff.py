"""Reconnect back-off across short but healthy connections (issue 12, section 8).

A connection that subscribed and streamed data proves the exchange works: the next
reconnect starts from the initial delay. Connections that never get that far (refused
handshakes) still back off exponentially. Time spent disconnected is a metric.
"""

from __future__ import annotations

import time

import pytest
import requests

from connectors.simulators.cryptomus import CryptomusSimulator
from connectors.simulators.harness import Harness
from connectors.testing import T, metric_value, wait_until
from tests.cryptomus_helpers import make_config, run
from tests.e2e.test_cryptomus_resilience import fully_subscribed
from tests.http_faults import FaultyHttp

pytestmark = pytest.mark.e2e

DROPS = 8


def disconnected_seconds(port: int | None) -> float:
    """The metric's value (NaN when it is not exported: the assertions on it fail)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    if "connector_disconnected_seconds_total" not in text:
        return float("nan")
    return metric_value(text, "connector_disconnected_seconds_total")


def test_short_healthy_connections_do_not_grow_the_back_off(kafka_bootstrap: str) -> None:
    """The server drops every connection after about a second of streaming data."""
    up = T(1.0)
    with Harness(CryptomusSimulator(updates_per_second=10.0)) as sim:
        config = make_config(
            sim, kafka_bootstrap, backoff_initial_s=0.2, backoff_max_s=8.0, healthy_after_s=30.0
        )
        with run(config) as conn:
            wait_until(lambda: fully_subscribed(sim), T(20), "first subscription")
            before = disconnected_seconds(conn.health_port)
            started = time.monotonic()
            outages: list[float] = []
            for i in range(DROPS):
                time.sleep(up)
                accepted = sim.control.counters()["connections_accepted"]
                dropped = time.monotonic()
                assert sim.control.drop_connections() == 1
                wait_until(
                    lambda a=accepted: (
                        sim.control.counters()["connections_accepted"] > a and fully_subscribed(sim)
                    ),
                    T(30),
                    f"resubscription after drop {i + 1}",
                )
                outages.append(time.monotonic() - dropped)
            total = time.monotonic() - started
            counted = disconnected_seconds(conn.health_port) - before
    share = sum(outages) / total
    print(f"outages {[round(o, 2) for o in outages]}, disconnected {share:.0%} of {total:.1f}s")
    # Each wait is at most backoff_initial_s (0.2 s) plus the reconnect itself; without
    # the reset the ceilings double to 0.4, 0.8, ... 6.4 s.
    assert max(outages) < 0.2 + T(0.8), outages
    assert share < 0.3, f"disconnected {share:.0%} of the time"
    # The metric saw the same outages (it counts up to the subscription being answered).
    assert sum(outages) * 0.5 - 0.2 <= counted <= sum(outages) + T(0.5)


def test_refused_handshakes_still_back_off_exponentially(kafka_bootstrap: str) -> None:
    window = T(4.0)
    with Harness(CryptomusSimulator()) as sim, FaultyHttp(mode="unavailable") as refusing:
        ws_port = refusing.url.rsplit(":", 1)[1]
        config = make_config(
            sim,
            kafka_bootstrap,
            ws_url=f"ws://127.0.0.1:{ws_port}/ws",
            backoff_initial_s=0.05,
            backoff_max_s=window,
        )
        with run(config) as conn:
            wait_until(lambda: refusing.requests_seen >= 1, T(20), "a first handshake")
            first = refusing.requests_seen
            time.sleep(window)
            attempts = refusing.requests_seen - first
            counted = disconnected_seconds(conn.health_port)
    # Full jitter from 0.05 s doubling each time: about 8 attempts fit in the window
    # (a back-off reset after every attempt would make it well over a hundred).
    assert 2 <= attempts <= 20, attempts
    assert counted >= window * 0.9, "never subscribed: the whole run counts as disconnected"
