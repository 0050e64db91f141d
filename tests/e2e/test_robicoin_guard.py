"""The authentication-failure guard against the simulator and the real broker.

The exchange blocks an IP after 10 unauthorized requests. These tests count, on the
simulator's side, every unauthorized request the poller ever sends.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from connectors.cli import main as cli_main
from connectors.simulators.harness import Harness
from connectors.simulators.robicoin import DEFAULT_PUBLIC_KEY, RobicoinSimulator
from connectors.testing import T, metric_value, unique, wait_until
from tests.robicoin_helpers import make_config, run, streams

pytestmark = pytest.mark.e2e

WRONG_PRIVATE = "wrong-private-key-1f9e2c7d"


def scrape(port: int | None, path: str = "/metrics") -> requests.Response:
    return requests.get(f"http://127.0.0.1:{port}{path}", timeout=T(5))


def unauthorized(sim: Harness[RobicoinSimulator], key: str = DEFAULT_PUBLIC_KEY) -> int:
    return int(sim.control.counters()["unauthorized_by_key"].get(key, 0))


def run_until_tripped(config: Any) -> tuple[int, str, requests.Response]:
    """Start the poller, wait until its guard refuses, stop it. Returns the exit code,
    the last /metrics text and the /readyz answer."""
    with run(config) as conn:
        wait_until(
            lambda: (
                metric_value(scrape(conn.health_port).text, "connector_auth_guard_tripped") == 1
            ),
            T(20),
            "the auth guard to trip",
        )
        text = scrape(conn.health_port).text
        ready = scrape(conn.health_port, "/readyz")
        code = conn.stop().exit_code
    return code, text, ready


def test_wrong_credentials_cost_one_request_per_run_and_stop_at_the_guard(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    guard_topic = unique("guard")
    with Harness(RobicoinSimulator(transactions_per_second=0.0)) as sim:
        cfg = make_config(
            sim.base_url,
            kafka_bootstrap,
            private_key=WRONG_PRIVATE,
            guard_topic=guard_topic,
            streams=streams(0.2),
        )
        seen = []
        for _run in range(6):  # the first start and 5 restarts
            code, text, ready = run_until_tripped(cfg)
            seen.append(unauthorized(sim))
            assert code == 0  # it stays up, not ready, for the operator to see
            assert ready.status_code == 503
            assert metric_value(text, "connector_auth_guard_failures") >= 1
        # One unauthorized request in each of the first two runs (the guard's limit),
        # none afterwards: the count survived the restarts in Kafka.
        assert seen == [1, 2, 2, 2, 2, 2]
        assert sim.control.counters()["blocked_ips"] == []

        # Another credential set has its own budget (a new fingerprint).
        other = make_config(
            sim.base_url,
            kafka_bootstrap,
            private_key="another-wrong-private-key",
            guard_topic=guard_topic,
            streams=streams(0.2),
        )
        run_until_tripped(other)
        assert unauthorized(sim) == 3

    text = caplog.text
    for secret in (WRONG_PRIVATE, "another-wrong-private-key", DEFAULT_PUBLIC_KEY):
        assert secret not in text
    assert "auth-guard reset" in text  # the log tells the operator what to do


def test_with_limit_one_exactly_one_unauthorized_request_ever(kafka_bootstrap: str) -> None:
    with Harness(RobicoinSimulator(transactions_per_second=0.0)) as sim:
        cfg = make_config(
            sim.base_url,
            kafka_bootstrap,
            private_key=WRONG_PRIVATE,
            guard_limit=1,
            streams=streams(0.2),
        )
        for _run in range(6):
            run_until_tripped(cfg)
        assert unauthorized(sim) == 1


def test_an_operator_reset_lets_a_running_poller_try_once_more(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    with Harness(RobicoinSimulator(transactions_per_second=0.0)) as sim:
        cfg = make_config(
            sim.base_url,
            kafka_bootstrap,
            private_key=WRONG_PRIVATE,
            guard_limit=1,
            streams=streams(0.2, enabled={"balance"}),
        )
        path = tmp_path / "poller.yaml"
        c = cfg.robicoin
        path.write_text(
            yaml.safe_dump(
                {
                    "robicoin": {
                        "base_url": c.base_url,
                        "credentials": {
                            "public_key": DEFAULT_PUBLIC_KEY,
                            "public_id": c.credentials.public_id.reveal()
                            if c.credentials.public_id
                            else "",
                            "private_key": WRONG_PRIVATE,
                        },
                        "auth_guard": {"limit": 1, "topic": c.auth_guard.topic},
                        "topics": {"state": c.topics.state},
                    },
                    "kafka": {"bootstrap_servers": kafka_bootstrap},
                }
            )
        )
        with run(cfg) as conn:
            wait_until(lambda: unauthorized(sim) == 1, T(20), "the first failure")
            assert cli_main(["auth-guard", "show", "robicoin-poller", "--config", str(path)]) == 0
            assert cli_main(["auth-guard", "reset", "robicoin-poller", "--config", str(path)]) == 0
            # The running poller notices the reset and sends exactly one more request.
            wait_until(lambda: unauthorized(sim) == 2, T(20), "a retry after the reset")
            wait_until(
                lambda: (
                    metric_value(scrape(conn.health_port).text, "connector_auth_guard_tripped") == 1
                ),
                T(20),
                "the guard to close again",
            )
            conn.stop()
        assert unauthorized(sim) == 2


def signed_requests(sim: Harness[RobicoinSimulator]) -> int:
    by_path = sim.control.counters()["requests_by_path"]
    return sum(n for p, n in by_path.items() if "/ticker" not in p)


def test_a_key_revoked_while_running_costs_one_request(kafka_bootstrap: str) -> None:
    with Harness(RobicoinSimulator(transactions_per_second=1.0)) as sim:
        cfg = make_config(sim.base_url, kafka_bootstrap, streams=streams(0.1))
        with run(cfg) as conn:
            wait_until(
                lambda: scrape(conn.health_port, "/readyz").status_code == 200, T(20), "ready"
            )
            sim.control.set_key_active(DEFAULT_PUBLIC_KEY, False)
            wait_until(lambda: unauthorized(sim) >= 1, T(10), "the revoked key to be used")
            wait_until(
                lambda: scrape(conn.health_port, "/readyz").status_code == 503, T(10), "not ready"
            )
            before = signed_requests(sim)
            time.sleep(T(1.5))  # ~15 poll intervals
            # No signed request after the first refusal.
            assert signed_requests(sim) == before
            assert unauthorized(sim) == 1
            conn.stop()


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 5])
def test_a_sink_started_earlier_cannot_spend_what_the_poller_already_spent(
    kafka_bootstrap: str, limit: int
) -> None:
    """Issue 12 §9: the poller and the sink share one count per credential set. An idle
    sink read it at start; the poller then crash-looped until the guard refused; one
    command reached the sink; the poller restarted again. The exchange must never see
    more unauthorized requests than the limit."""
    from connectors.robicoin.config import AuthGuardSettings, CredentialSettings
    from connectors.runtime.config import Secret
    from connectors.simulators.robicoin import DEFAULT_PUBLIC_ID
    from tests.robicoin_helpers import CommandProducer, create_command, run_sink, sink_config

    guard_topic = unique("guard")
    with Harness(RobicoinSimulator(transactions_per_second=0.0)) as sim:
        poller = make_config(
            sim.base_url,
            kafka_bootstrap,
            private_key=WRONG_PRIVATE,
            guard_topic=guard_topic,
            guard_limit=limit,
            streams=streams(0.2, enabled={"balance"}),
        )
        sink = sink_config(
            sim.base_url,
            kafka_bootstrap,
            credentials=CredentialSettings(
                public_key=Secret(DEFAULT_PUBLIC_KEY),
                public_id=Secret(DEFAULT_PUBLIC_ID),
                private_key=Secret(WRONG_PRIVATE),
            ),
            auth_guard=AuthGuardSettings(limit=limit, topic=guard_topic, recheck_s=0.5),
        )
        with run_sink(sink) as idle_sink:
            wait_until(lambda: scrape(idle_sink.health_port).status_code == 200, T(20), "sink up")
            for _run in range(limit):  # the poller crash-loops until the guard refuses
                run_until_tripped(poller)
            assert unauthorized(sim) == limit
            commands = CommandProducer(kafka_bootstrap, sink.robicoin.topics.commands)
            try:
                commands.send(create_command(unique("c"), "0.001", now_ms=int(time.time() * 1000)))
            finally:
                commands.close()
            wait_until(
                lambda: (
                    metric_value(scrape(idle_sink.health_port).text, "connector_auth_guard_tripped")
                    == 1
                    or unauthorized(sim) > limit
                ),
                T(30),
                "the sink to meet the command",
            )
            time.sleep(T(1))
            for _run in range(2):
                run_until_tripped(poller)
            idle_sink.stop()
        assert unauthorized(sim) == limit
        assert sim.control.counters()["blocked_ips"] == []
