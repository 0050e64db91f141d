"""The Robicoin poller as a user runs it: a process, a YAML file, env credentials, and
``kill -9`` at random moments."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from connectors.runtime.broker import free_port
from connectors.simulators.harness import Harness
from connectors.simulators.robicoin import RobicoinSimulator
from connectors.testing import T, read_topic, ready, start_connector, unique, wait_until
from tests.e2e.test_robicoin_e2e import as_exchange_row
from tests.robicoin_helpers import canonical

pytestmark = pytest.mark.e2e

PUBLIC_KEY = "pk-3b9d0c11-live-looking"
PUBLIC_ID = "7731"
PRIVATE_KEY = "sk-a61f7e0944c2-very-secret"


def write_config(path: Path, base_url: str, bootstrap: str, port: int) -> dict[str, Any]:
    prefix = unique()
    cfg: dict[str, Any] = {
        "robicoin": {
            "base_url": base_url,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.5,
            "streams": {
                "ticker": {"interval_s": 0.5},
                "order": {"enabled": False},
                "balance": {"interval_s": 0.5},
                "transaction": {"interval_s": 0.3},
                "open_order": {"interval_s": 0.5},
            },
            "auth_guard": {"topic": f"{prefix}.guard"},
            "topics": {
                "ticker": f"{prefix}.ticker",
                "balance": f"{prefix}.balances",
                "transaction": f"{prefix}.transactions",
                "open_order": f"{prefix}.open-orders",
                "dead_letter": f"{prefix}.dlq",
                "state": f"{prefix}.state",
            },
        },
        "kafka": {"bootstrap_servers": bootstrap},
        "runtime": {"health_host": "127.0.0.1", "health_port": port},
    }
    path.write_text(yaml.safe_dump(cfg))
    return cfg


def start(path: Path) -> subprocess.Popen[str]:
    env = {
        "ROBICOIN_PUBLIC_KEY": PUBLIC_KEY,
        "ROBICOIN_PUBLIC_ID": PUBLIC_ID,
        "ROBICOIN_PRIVATE_KEY": PRIVATE_KEY,
    }
    return start_connector("robicoin-poller", path, env)


def test_ten_kill_minus_nine_leave_every_transaction_exactly_once(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    rng = random.Random(20261121)
    port = free_port()
    accounts = {PUBLIC_KEY: (PUBLIC_ID, PRIVATE_KEY)}
    with Harness(RobicoinSimulator(transactions_per_second=3.0, seed=9, accounts=accounts)) as sim:
        cfg = write_config(tmp_path / "p.yaml", sim.base_url, kafka_bootstrap, port)
        topic = cfg["robicoin"]["topics"]["transaction"]
        kills = 0
        for _ in range(10):
            proc = start(tmp_path / "p.yaml")
            try:
                wait_until(lambda: ready(port), T(30), "ready")
                # Somewhere in the middle of polling and committing.
                time.sleep(rng.uniform(0.05, 1.5))
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=T(10))
                kills += 1
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert kills == 10
        proc = start(tmp_path / "p.yaml")
        try:
            wait_until(lambda: ready(port), T(30), "ready")
            time.sleep(1.0)
            sim.control.pause_activity()
            expected = sim.control.transactions()
            recs = read_topic(
                kafka_bootstrap,
                topic,
                until=lambda r: len(r) >= len(expected),
                timeout=T(30),
                committed=True,
            )
            time.sleep(T(1.0))  # a few more polls: nothing more may appear
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=T(30))
        finally:
            if proc.poll() is None:
                proc.kill()
        assert sim.control.counters()["unauthorized_attempts"] == 0

    assert proc.returncode == 0, out
    recs = read_topic(kafka_bootstrap, topic, committed=True, timeout=T(10))
    kinds = Counter(json.loads(r.value)["kind"] for r in recs)
    assert kinds["gap"] == 0, "restarts were slow enough to lose rows: the test proves nothing"
    got = Counter(
        canonical(as_exchange_row(json.loads(r.value)["data"]))
        for r in recs
        if json.loads(r.value)["kind"] == "event"
    )
    want = Counter(canonical(r) for r in expected)
    assert got == want, f"missing {want - got}, duplicated {got - want}"
    assert len(expected) >= 30
    for secret in (PUBLIC_KEY, PRIVATE_KEY):
        assert secret not in out
    assert not re.search(r"\b[0-9a-f]{32}\b", out), "a request hash reached the log"
