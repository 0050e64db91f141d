"""Issue 12 §3: readiness tells the truth when nothing can be written, and SIGTERM ends
every connector within its grace period in every state.

Each test runs the connector as a user does (a process, a YAML file, env credentials)
against a broker of its own that it may freeze, kill or restart empty.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from connectors.runtime.broker import EmbeddedBroker, free_port
from connectors.simulators.cryptomus import CryptomusSimulator
from connectors.simulators.harness import Harness
from connectors.simulators.robicoin import (
    DEFAULT_PRIVATE_KEY,
    DEFAULT_PUBLIC_ID,
    DEFAULT_PUBLIC_KEY,
    RobicoinSimulator,
)
from connectors.testing import T, brokers, read_topic, ready, start_connector, unique, wait_until
from tests.e2e.test_cryptomus_process import write_config as cryptomus_config
from tests.robicoin_helpers import CommandProducer, create_command, write_sink_config

pytestmark = pytest.mark.e2e

#: The grace period of the shipped Kubernetes manifests (terminationGracePeriodSeconds).
GRACE_S = 45.0
ROBICOIN_ENV = {
    "ROBICOIN_PUBLIC_KEY": DEFAULT_PUBLIC_KEY,
    "ROBICOIN_PUBLIC_ID": DEFAULT_PUBLIC_ID,
    "ROBICOIN_PRIVATE_KEY": DEFAULT_PRIVATE_KEY,
}
#: Short Kafka deadlines so the tests see each state quickly.
KAFKA_FAST = {"commit_timeout_s": 3, "stall_after_s": 2, "request_timeout_ms": 3000}


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    try:
        with brokers.own_broker() as broker:
            yield broker
    except brokers.BrokerUnavailable as exc:
        pytest.skip(str(exc))


def readyz(port: int) -> int:
    try:
        return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
    except requests.RequestException:
        return 0


def sigterm(proc: subprocess.Popen[str]) -> tuple[int, float]:
    """SIGTERM, then the exit code and the seconds it took (killed after the grace)."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"still running {GRACE_S:g} s after SIGTERM") from None
    return code, time.monotonic() - started


def poller_config(path: Path, base_url: str, bootstrap: str, port: int) -> dict[str, Any]:
    prefix = unique("p")
    cfg: dict[str, Any] = {
        "robicoin": {
            "base_url": base_url,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "request_timeout_s": 2,
            "streams": {
                "ticker": {"interval_s": 0.3},
                "order": {"enabled": False},
                "balance": {"interval_s": 0.3},
                "transaction": {"interval_s": 0.3},
                "open_order": {"enabled": False},
            },
            "auth_guard": {"topic": f"{prefix}.guard"},
            "topics": {
                "ticker": f"{prefix}.ticker",
                "balance": f"{prefix}.balances",
                "transaction": f"{prefix}.transactions",
                "dead_letter": f"{prefix}.dlq",
                "state": f"{prefix}.state",
            },
        },
        "kafka": {"bootstrap_servers": bootstrap, **KAFKA_FAST},
        "runtime": {"health_host": "127.0.0.1", "health_port": port, "drain_timeout_s": 10},
    }
    path.write_text(yaml.safe_dump(cfg))
    return cfg


def start_poller(path: Path) -> subprocess.Popen[str]:
    return start_connector("robicoin-poller", path, ROBICOIN_ENV, capture=False)


# -- the poller -------------------------------------------------------------------------


def test_a_broker_restarted_empty_makes_the_poller_not_ready_then_it_recovers(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    port = free_port()
    with Harness(RobicoinSimulator(transactions_per_second=2.0)) as sim:
        cfg = poller_config(tmp_path / "p.yaml", sim.base_url, broker.bootstrap_servers, port)
        topic = cfg["robicoin"]["topics"]["ticker"]
        proc = start_poller(tmp_path / "p.yaml")
        try:
            wait_until(lambda: ready(port), T(60), "ready")
            broker.stop()  # killed: its in-memory topics are gone
            wait_until(lambda: readyz(port) == 503, T(30), "not ready while Kafka is gone")
            time.sleep(T(2))
            assert readyz(port) == 503
            fresh = EmbeddedBroker(port=broker.port).start()
            broker.process = fresh.process
            # It recreates its topics, starts a new epoch and writes again.
            wait_until(lambda: ready(port), T(90), "ready again on the new broker")
            records = read_topic(
                broker.bootstrap_servers, topic, until=lambda rs: len(rs) >= 1, timeout=T(30)
            )
            assert records
            code, took = sigterm(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 0
    print(f"poller SIGTERM after recovery: exit {code} in {took:.1f} s")


def test_sigterm_while_kafka_is_frozen_ends_the_poller_in_time(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    port = free_port()
    with Harness(RobicoinSimulator(transactions_per_second=2.0)) as sim:
        poller_config(tmp_path / "p.yaml", sim.base_url, broker.bootstrap_servers, port)
        proc = start_poller(tmp_path / "p.yaml")
        try:
            wait_until(lambda: ready(port), T(60), "ready")
            broker.pause()
            wait_until(lambda: readyz(port) == 503, T(30), "not ready while Kafka is frozen")
            code, took = sigterm(proc)
        finally:
            broker.resume()
            if proc.poll() is None:
                proc.kill()
    # Nothing it took is lost (state and records go in one transaction), but the last
    # transaction was not confirmed: it says so with a non-zero exit.
    assert code == 1
    print(f"poller SIGTERM with Kafka frozen: exit {code} in {took:.1f} s")


class Blackhole:
    """An exchange that accepts connections and never answers (or answers HTML)."""

    def __init__(self, html: bool = False) -> None:
        self.requests = 0
        outer = self
        release = self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests += 1
                if not html:
                    release.wait(60)
                    return
                body = b"<html><body>Service temporarily down for maintenance</body></html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/v1"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_sigterm_while_the_exchange_does_not_answer_ends_the_poller_in_time(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    port = free_port()
    hole = Blackhole()
    try:
        poller_config(tmp_path / "p.yaml", hole.base_url, kafka_bootstrap, port)
        proc = start_poller(tmp_path / "p.yaml")
        try:
            wait_until(lambda: hole.requests >= 2, T(60), "requests left hanging")
            assert readyz(port) == 503
            code, took = sigterm(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        hole.close()
    assert code == 0
    print(f"poller SIGTERM with the exchange silent: exit {code} in {took:.1f} s")


def test_answers_that_are_html_pages_keep_the_poller_not_ready(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    port = free_port()
    hole = Blackhole(html=True)
    try:
        cfg = poller_config(tmp_path / "p.yaml", hole.base_url, kafka_bootstrap, port)
        proc = start_poller(tmp_path / "p.yaml")
        try:
            dlq = cfg["robicoin"]["topics"]["dead_letter"]
            read_topic(kafka_bootstrap, dlq, until=lambda rs: len(rs) >= 5, timeout=T(60))
            seen = {readyz(port) for _ in range(10) if time.sleep(0.2) is None}
            code, _ = sigterm(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        hole.close()
    assert seen == {503}
    assert code == 0


# -- the order sink ------------------------------------------------------------------------


def sink_config(path: Path, base_url: str, bootstrap: str, port: int) -> dict[str, Any]:
    return write_sink_config(
        path,
        base_url,
        bootstrap,
        port,
        robicoin={
            "request_timeout_s": 1,
            "command_max_age_s": 60,
            "backoff_initial_s": 0.5,
            "backoff_max_s": 2,
        },
        kafka=KAFKA_FAST,
        runtime={"drain_timeout_s": 10},
    )


def start_sink(path: Path) -> subprocess.Popen[str]:
    return start_connector("robicoin-orders", path, ROBICOIN_ENV, capture=False)


def test_sigterm_mid_reconciliation_ends_the_sink_in_time_and_the_command_resumes(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    port = free_port()
    with Harness(
        RobicoinSimulator(transactions_per_second=0.0, market_orders_per_second=0.0)
    ) as sim:
        cfg = sink_config(tmp_path / "s.yaml", sim.base_url, kafka_bootstrap, port)
        t = cfg["robicoin"]["topics"]
        sim.control.set_drop_create_response(1)  # the answer is lost: reconcile
        # ... and reading the exchange's state fails a few times: reconciling retries.
        sim.control.fail_next("open-order", 503, n=3)
        proc = start_sink(tmp_path / "s.yaml")
        try:
            wait_until(lambda: ready(port), T(60), "ready")
            producer = CommandProducer(kafka_bootstrap, t["commands"])
            producer.send(create_command("c-1", "0.01", now_ms=int(time.time() * 1000)))
            producer.close()
            paths = sim.control.counters

            def reconciling() -> bool:
                return int(paths()["requests_by_path"].get("/api/v1/open-order", 0)) >= 1

            wait_until(reconciling, T(30), "reconciliation to start")
            code, took = sigterm(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert code == 0
        # The command stayed pending; the next run reconciles it: one result, one order.
        proc = start_sink(tmp_path / "s.yaml")
        try:
            results = read_topic(
                kafka_bootstrap,
                t["results"],
                until=lambda rs: len(rs) >= 1,
                timeout=T(60),
                committed=True,
            )
            sigterm(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
        creates = sim.control.counters()["requests_by_path"].get("/api/v1/create-order", 0)
    assert len(results) == 1
    assert creates == 1
    print(f"sink SIGTERM mid-reconciliation: exit {code} in {took:.1f} s")


def test_sigterm_while_kafka_is_frozen_ends_the_sink_in_time(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    port = free_port()
    with Harness(
        RobicoinSimulator(transactions_per_second=0.0, market_orders_per_second=0.0)
    ) as sim:
        cfg = sink_config(tmp_path / "s.yaml", sim.base_url, broker.bootstrap_servers, port)
        proc = start_sink(tmp_path / "s.yaml")
        try:
            wait_until(lambda: ready(port), T(60), "ready")
            producer = CommandProducer(
                broker.bootstrap_servers, cfg["robicoin"]["topics"]["commands"]
            )
            producer.send(create_command("c-1", "0.01", now_ms=int(time.time() * 1000)))
            producer.close()
            broker.pause()
            time.sleep(T(3))
            code, took = sigterm(proc)
        finally:
            broker.resume()
            if proc.poll() is None:
                proc.kill()
    assert code in (0, 1)
    print(f"sink SIGTERM with Kafka frozen: exit {code} in {took:.1f} s")


# -- the Cryptomus source -----------------------------------------------------------------


def test_sigterm_while_kafka_is_frozen_ends_the_source_in_time(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    port = free_port()
    user, key = "user-3e1", "key-9b7d2c"
    with Harness(CryptomusSimulator(updates_per_second=20.0, accounts={user: key})) as sim:
        cryptomus_config(
            tmp_path / "c.yaml",
            sim,
            broker.bootstrap_servers,
            port,
            kafka={"stall_after_s": 2},
            runtime={"drain_timeout_s": 5},
        )
        proc = start_connector(
            "cryptomus-ws",
            tmp_path / "c.yaml",
            {"CRYPTOMUS_USER_ID": user, "CRYPTOMUS_API_KEY": key},
            capture=False,
        )
        try:
            wait_until(lambda: ready(port), T(60), "ready")
            broker.pause()
            wait_until(lambda: readyz(port) == 503, T(30), "not ready while Kafka is frozen")
            code, took = sigterm(proc)
        finally:
            broker.resume()
            if proc.poll() is None:
                proc.kill()
    # Records it had taken were not acknowledged: a non-zero exit says so.
    assert code == 1
    print(f"source SIGTERM with Kafka frozen: exit {code} in {took:.1f} s")


def test_sigterm_while_the_exchange_does_not_answer_ends_the_source_in_time(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """The token request, the market list and the WebSocket handshake all hang."""
    port = free_port()
    hole = Blackhole()
    user, key = "user-5a2", "key-0c4e9f"
    try:
        with Harness(CryptomusSimulator(updates_per_second=1.0, accounts={user: key})) as sim:
            cfg = cryptomus_config(tmp_path / "c.yaml", sim, kafka_bootstrap, port)
        silent = hole.base_url.removesuffix("/api/v1")
        cfg["cryptomus"].update(
            ws_url=silent.replace("http://", "ws://"), api_url=silent, scales_url=silent
        )
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        proc = start_connector(
            "cryptomus-ws",
            tmp_path / "c.yaml",
            {"CRYPTOMUS_USER_ID": user, "CRYPTOMUS_API_KEY": key},
            capture=False,
        )
        try:
            wait_until(lambda: hole.requests >= 1, T(60), "a request left hanging")
            assert readyz(port) == 503
            code, took = sigterm(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        hole.close()
    assert code == 0
    print(f"source SIGTERM with the exchange silent: exit {code} in {took:.1f} s")


def test_after_a_long_freeze_the_poller_writes_again_and_is_not_fenced_by_itself(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """Producers it gave up on during the outage may reach the broker late and fence the
    new one: that is not another instance, and the poller must carry on."""
    port = free_port()
    with Harness(RobicoinSimulator(transactions_per_second=2.0)) as sim:
        cfg = poller_config(tmp_path / "p.yaml", sim.base_url, broker.bootstrap_servers, port)
        topic = cfg["robicoin"]["topics"]["ticker"]
        proc = start_poller(tmp_path / "p.yaml")
        try:
            wait_until(lambda: ready(port), T(60), "ready")
            broker.pause()
            wait_until(lambda: readyz(port) == 503, T(30), "not ready while Kafka is frozen")
            time.sleep(20)  # several commit deadlines: producers are given up on
            broker.resume()
            wait_until(lambda: ready(port), T(90), "ready again after the freeze")
            count = len(read_topic(broker.bootstrap_servers, topic, timeout=T(5)))
            wait_until(
                lambda: len(read_topic(broker.bootstrap_servers, topic, timeout=T(5))) > count,
                T(30),
                "new records after the freeze",
            )
            assert proc.poll() is None, "the poller stopped"
            code, _ = sigterm(proc)
        finally:
            broker.resume()
            if proc.poll() is None:
                proc.kill()
    assert code == 0


def test_an_idle_sink_turns_not_ready_when_kafka_stops_answering(
    tmp_path: Path, broker: EmbeddedBroker
) -> None:
    """With no command to handle it writes nothing, so no failed commit can tell it."""
    port = free_port()
    with Harness(
        RobicoinSimulator(transactions_per_second=0.0, market_orders_per_second=0.0)
    ) as sim:
        sink_config(tmp_path / "s.yaml", sim.base_url, broker.bootstrap_servers, port)
        proc = start_sink(tmp_path / "s.yaml")
        try:
            wait_until(lambda: ready(port), T(60), "ready")
            broker.pause()
            wait_until(lambda: readyz(port) == 503, T(45), "not ready while Kafka is frozen")
            broker.resume()
            wait_until(lambda: ready(port), T(60), "ready again")
            code, _ = sigterm(proc)
        finally:
            broker.resume()
            if proc.poll() is None:
                proc.kill()
    assert code == 0
