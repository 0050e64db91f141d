"""The connector as a user runs it: a process, a YAML file, env credentials, signals."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from connectors.runtime.broker import free_port
from connectors.simulators.cryptomus import CryptomusSimulator
from connectors.simulators.harness import Harness
from connectors.testing import (
    T,
    metric_value,
    read_topic,
    ready,
    start_connector,
    unique,
    wait_until,
)

pytestmark = pytest.mark.e2e

USER = "user-7f3a9c-secret-id"
KEY = "apikey-5d1e88b2-very-secret"


def write_config(
    path: Path, sim: Harness[CryptomusSimulator], bootstrap: str, port: int, **extra: Any
) -> dict[str, Any]:
    prefix = unique()
    cfg: dict[str, Any] = {
        "cryptomus": {
            "ws_url": sim.ws_url,
            "api_url": sim.base_url,
            "scales_url": sim.base_url,
            "markets": ["BTC_USDT", "ETH_USDT"],
            "channels": ["trade", "ticker", "balance"],
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "topics": {
                "trade": f"{prefix}.trades",
                "ticker": f"{prefix}.tickers",
                "balance": f"{prefix}.balances",
                "dead_letter": f"{prefix}.dlq",
            },
        },
        "kafka": {"bootstrap_servers": bootstrap, **extra.pop("kafka", {})},
        "runtime": {"health_host": "127.0.0.1", "health_port": port, **extra.pop("runtime", {})},
    }
    path.write_text(yaml.safe_dump(cfg))
    return cfg


def start(path: Path, user: str = USER, key: str = KEY) -> subprocess.Popen[str]:
    return start_connector(
        "cryptomus-ws", path, {"CRYPTOMUS_USER_ID": user, "CRYPTOMUS_API_KEY": key}
    )


def test_sigterm_flushes_buffered_records_and_exits_0(tmp_path: Path, kafka_bootstrap: str) -> None:
    port = free_port()
    with Harness(CryptomusSimulator(updates_per_second=20.0, accounts={USER: KEY})) as sim:
        # A long linger keeps records in the producer's buffer when SIGTERM arrives.
        cfg = write_config(
            tmp_path / "c.yaml", sim, kafka_bootstrap, port, kafka={"linger_ms": 4000}
        )
        proc = start(tmp_path / "c.yaml")
        try:
            wait_until(lambda: ready(port), T(30), "ready")
            wait_until(
                lambda: sim.control.counters()["updates_sent"]["trade"] >= 10, T(20), "trades"
            )
            sim.control.pause_updates()
            time.sleep(0.5)
            sent = sim.control.counters()
            metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            buffered = metric_value(metrics, "connector_buffered_records")
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=T(30))
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, out
    assert buffered > 0, "records should still be waiting in the producer at SIGTERM"
    topics = cfg["cryptomus"]["topics"]
    for name, want in (("trade", sent["trades_sent"]), ("ticker", sent["updates_sent"]["ticker"])):
        recs = read_topic(kafka_bootstrap, topics[name], timeout=T(15))
        events = [r for r in recs if json.loads(r.value)["kind"] == "event"]
        assert len(events) == want, f"{name}: {len(events)} in Kafka, {want} sent"


SECRET_PATTERNS = [re.escape(USER), re.escape(KEY), r"\b[0-9a-f]{64}\b"]


def test_secrets_appear_in_no_log_line_and_no_metric(tmp_path: Path, kafka_bootstrap: str) -> None:
    port = free_port()
    with Harness(CryptomusSimulator(updates_per_second=10.0, accounts={USER: KEY})) as sim:
        write_config(
            tmp_path / "c.yaml", sim, kafka_bootstrap, port, runtime={"log_level": "DEBUG"}
        )
        proc = start(tmp_path / "c.yaml")
        try:
            wait_until(lambda: ready(port), T(30), "ready")
            sim.control.drop_connections()  # a second token, fetched and used
            wait_until(
                lambda: sim.control.counters()["connections_accepted"] >= 2 and ready(port),
                T(20),
                "reconnect",
            )
            metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            readyz = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).text
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=T(30))
        finally:
            if proc.poll() is None:
                proc.kill()
        assert sim.control.counters()["tokens_issued"] >= 2
    assert "DEBUG" in out or "INFO" in out, "the run logged something"
    for pattern in SECRET_PATTERNS:
        for where, text in (("log", out), ("metrics", metrics), ("readyz", readyz)):
            assert not re.search(pattern, text), f"secret matching {pattern!r} in {where}"


def test_refused_credentials_exit_non_zero_with_a_clear_message(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    port = free_port()
    with Harness(CryptomusSimulator(accounts={USER: KEY})) as sim:
        write_config(tmp_path / "c.yaml", sim, kafka_bootstrap, port)
        proc = start(tmp_path / "c.yaml", key="wrong-key-0123456789")
        out, _ = proc.communicate(timeout=T(60))
        assert sim.control.counters()["bad_signatures"] == 1, "one refused call, then it stops"
        assert sim.control.counters()["connections_accepted"] == 0
    assert proc.returncode == 1
    assert "refused the credentials" in out
    assert "wrong-key-0123456789" not in out and USER not in out
