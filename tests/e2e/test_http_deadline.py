"""Every HTTP call has a total deadline and a bounded answer (issue 12, section 10).

Real loopback servers answer one byte every 100 ms, trickle their headers, or never end;
the call must come back within its deadline, classified the way the caller needs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import pytest
import requests

from connectors.cryptomus.rest import CryptomusRest
from connectors.robicoin import protocol
from connectors.robicoin.client import Credentials, RequestFailed, RobicoinClient
from connectors.runtime.config import Secret
from connectors.runtime.errors import RetriableError
from connectors.testing import T, metric_value, read_topic, ready, wait_until
from tests.http_faults import FaultyHttp

DEADLINE_S = 1.0
CREDS = Credentials("sim-public-key", "1001", "sim-private-key")


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``call`` in a worker; (seconds it took, its result or exception).

    The test itself never hangs: a call still open after T(15) fails the test."""
    pool = ThreadPoolExecutor(1)
    started = time.monotonic()
    future = pool.submit(call)
    try:
        try:
            result: Any = future.result(timeout=T(15))
        except FutureTimeout:
            pytest.fail("the HTTP call was still open after 15 s: no overall deadline")
        except Exception as exc:  # the exception is the result under test
            result = exc
        return time.monotonic() - started, result
    finally:
        pool.shutdown(wait=False)


def robicoin(url: str, answers: list[tuple[str, str, float]] | None = None) -> RobicoinClient:
    def on_answer(endpoint: protocol.Endpoint, outcome: str, elapsed: float) -> None:
        if answers is not None:
            answers.append((endpoint.name, outcome, elapsed))

    return RobicoinClient(
        url + "/api/v1",
        CREDS,
        timeout_s=DEADLINE_S,
        connect_timeout_s=DEADLINE_S,
        max_body_bytes=64 * 1024,
        on_answer=on_answer,
    )


@pytest.mark.parametrize("mode", ["trickle", "slow_headers"])
def test_a_trickling_poll_answer_ends_at_the_deadline(mode: str) -> None:
    answers: list[tuple[str, str, float]] = []
    with FaultyHttp(mode=mode) as server:
        client = robicoin(server.url, answers)
        took, result = timed(lambda: client.call(protocol.ticker_endpoint("24h")))
        client.close()
    assert isinstance(result, RequestFailed), result
    assert "deadline" in str(result)
    assert DEADLINE_S * 0.9 <= took < DEADLINE_S + T(1.0)
    # The time spent is counted: one retriable answer that took about the deadline.
    assert [(n, o) for n, o, _ in answers] == [("ticker:24h", "retriable")]
    assert answers[0][2] >= DEADLINE_S * 0.9


def test_a_create_order_cut_by_the_deadline_may_have_executed() -> None:
    """The request went out before the answer stalled: the sink must reconcile."""
    with FaultyHttp(mode="trickle") as server:
        client = robicoin(server.url)
        fields = {"pair": "btc-try", "type": "sell", "amount": "0.1", "price": "1"}
        took, result = timed(lambda: client.call(protocol.CREATE_ORDER, fields))
        client.close()
    assert isinstance(result, RequestFailed), result
    assert result.maybe_executed is True
    assert took < DEADLINE_S + T(1.0)


def test_an_answer_that_never_ends_is_cut_at_the_size_limit_and_dead_lettered() -> None:
    """A body larger than the limit comes back as a bounded prefix marked too large
    (the poller dead-letters it) instead of filling memory."""
    with FaultyHttp(mode="endless") as server:
        client = robicoin(server.url)
        took, result = timed(lambda: client.call(protocol.ticker_endpoint("24h")))
        client.close()
    assert not isinstance(result, Exception), result
    assert result.error is not None and result.error.reason == "too_large"
    assert 0 < len(result.text) <= 64 * 1024
    assert result.payload is None
    assert took < DEADLINE_S + T(1.0)


def test_the_next_call_after_a_deadline_gets_the_healthy_answer() -> None:
    with FaultyHttp(upstream=None, mode="trickle") as server:
        client = robicoin(server.url)
        timed(lambda: client.call(protocol.ticker_endpoint("24h")))
        # The stalled connection is not reused: a fresh request is sent and answered.
        server.mode = "endless"
        _, result = timed(lambda: client.call(protocol.ticker_endpoint("24h")))
        client.close()
    assert not isinstance(result, Exception), result
    assert server.requests_seen == 2


def cryptomus(url: str) -> CryptomusRest:
    return CryptomusRest(
        url, url, Secret("user"), Secret("key"), timeout_s=DEADLINE_S, max_body_bytes=64 * 1024
    )


@pytest.mark.parametrize("mode", ["trickle", "slow_headers"])
def test_a_trickling_token_answer_ends_at_the_deadline(mode: str) -> None:
    with FaultyHttp(mode=mode) as server:
        rest = cryptomus(server.url)
        took, result = timed(rest.ws_token)
    assert isinstance(result, RetriableError), result
    assert "deadline" in str(result)
    assert took < DEADLINE_S + T(1.0)


def test_an_endless_market_list_is_refused_at_the_size_limit() -> None:
    with FaultyHttp(mode="endless") as server:
        rest = cryptomus(server.url)
        took, result = timed(rest.markets)
    assert isinstance(result, RetriableError), result
    assert "larger than" in str(result)
    assert took < DEADLINE_S + T(1.0)


# -- the connectors recover as soon as the exchange does -----------------------------------


@pytest.mark.e2e
def test_the_poller_recovers_as_soon_as_a_trickling_exchange_is_healthy(
    kafka_bootstrap: str,
) -> None:
    from connectors.simulators.harness import Harness
    from connectors.simulators.robicoin import RobicoinSimulator
    from tests.robicoin_helpers import make_config as poller_config
    from tests.robicoin_helpers import run as run_poller
    from tests.robicoin_helpers import streams

    with (
        Harness(RobicoinSimulator()) as sim,
        FaultyHttp(upstream=f"http://127.0.0.1:{sim.port}") as proxy,
    ):
        proxy.mode = "trickle"
        cfg = poller_config(
            proxy.url + "/api/v1",
            kafka_bootstrap,
            streams=streams(0.3, enabled={"ticker"}),
            request_timeout_s=DEADLINE_S,
            connect_timeout_s=DEADLINE_S,
        )
        with run_poller(cfg) as conn:
            wait_until(lambda: proxy.requests_seen >= 2, T(20), "a second trickling request")
            proxy.mode = "forward"
            healed = time.monotonic()
            wait_until(lambda: proxy.forwarded_ok >= 1, T(10), "a healthy answer")
            answered = time.monotonic() - healed
            recs = read_topic(
                kafka_bootstrap,
                cfg.robicoin.topics.ticker,
                until=lambda rs: len(rs) >= 1,
                timeout=T(20),
                committed=True,
            )
            metrics = requests.get(f"http://127.0.0.1:{conn.health_port}/metrics", timeout=5).text
    print(f"poller: first healthy answer {answered:.2f}s after the exchange recovered")
    assert recs
    # At worst one call still trickling (the deadline) plus one back-off wait.
    assert answered < DEADLINE_S + cfg.robicoin.backoff_max_s + T(1.0)
    retriable = metric_value(metrics, "connector_requests_total", outcome="retriable")
    assert retriable >= 2, "every cut call is counted"
    assert metric_value(metrics, "connector_request_latency_seconds_sum") >= 2 * DEADLINE_S * 0.9


@pytest.mark.e2e
def test_the_cryptomus_source_recovers_as_soon_as_the_token_call_is_healthy(
    kafka_bootstrap: str,
) -> None:
    from connectors.simulators.cryptomus import CryptomusSimulator
    from connectors.simulators.harness import Harness
    from tests.cryptomus_helpers import make_config as source_config
    from tests.cryptomus_helpers import run as run_source

    with (
        Harness(CryptomusSimulator(updates_per_second=5.0)) as sim,
        FaultyHttp(upstream=sim.base_url) as proxy,
    ):
        cfg = source_config(
            sim,
            kafka_bootstrap,
            channels=["ticker"],
            api_url=proxy.url,
            scales_url=proxy.url,
            http_timeout_s=DEADLINE_S,
        )
        with run_source(cfg) as conn:
            wait_until(lambda: ready(conn.health_port or 0), T(20), "ready")
            proxy.mode = "trickle"
            seen = proxy.requests_seen
            assert sim.control.drop_connections() == 1
            wait_until(lambda: proxy.requests_seen >= seen + 2, T(20), "trickling token calls")
            proxy.mode = "forward"
            healed = time.monotonic()
            wait_until(lambda: ready(conn.health_port or 0), T(20), "ready again")
            recovered = time.monotonic() - healed
            metrics = requests.get(f"http://127.0.0.1:{conn.health_port}/metrics", timeout=5).text
    print(f"cryptomus: ready {recovered:.2f}s after the exchange recovered")
    assert recovered < DEADLINE_S + cfg.cryptomus.backoff_max_s + T(2.0)
    assert (
        metric_value(metrics, "connector_requests_total", endpoint="ws_token", outcome="retriable")
        >= 2
    )
    assert metric_value(metrics, "connector_requests_total", endpoint="ws_token", outcome="ok") >= 2
