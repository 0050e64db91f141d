"""kill -9 the order sink again and again while commands flow: every command must end
with exactly one result, and the exchange must hold each accepted order exactly once."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from connectors.runtime.broker import free_port
from connectors.simulators.harness import Harness
from connectors.simulators.robicoin import (
    DEFAULT_PRIVATE_KEY,
    DEFAULT_PUBLIC_ID,
    DEFAULT_PUBLIC_KEY,
    RobicoinSimulator,
)
from connectors.testing import T, read_topic, ready, start_connector, values, wait_until
from tests.robicoin_helpers import CommandProducer, create_command, write_sink_config

pytestmark = pytest.mark.e2e

COMMANDS = 200
KILLS = 20


def start(path: Path) -> subprocess.Popen[str]:
    env = {
        "ROBICOIN_PUBLIC_KEY": DEFAULT_PUBLIC_KEY,
        "ROBICOIN_PUBLIC_ID": DEFAULT_PUBLIC_ID,
        "ROBICOIN_PRIVATE_KEY": DEFAULT_PRIVATE_KEY,
    }
    return start_connector("robicoin-orders", path, env, capture=False)


def creates(sim: Harness[RobicoinSimulator]) -> int:
    return int(sim.control.counters()["requests_by_path"].get("/api/v1/create-order", 0))


def test_twenty_kill_minus_nine_leave_one_result_and_one_order_per_command(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    rng = random.Random(4)
    port = free_port()
    with Harness(
        RobicoinSimulator(transactions_per_second=0.0, market_orders_per_second=0.0)
    ) as sim:
        # Answers come 0.4 s after the order is placed: a wide window between the
        # exchange call and the ledger write for the kills to land in.
        sim.control.set_create_delay(0.4)
        cfg = write_sink_config(tmp_path / "s.yaml", sim.base_url, kafka_bootstrap, port)
        t = cfg["robicoin"]["topics"]
        producer = CommandProducer(kafka_bootstrap, t["commands"])
        base = int(time.time() * 1000)
        amounts = {f"cmd-{i}": f"0.{i + 1:05d}" for i in range(COMMANDS)}
        for cid, amount in amounts.items():
            producer.send(create_command(cid, amount, now_ms=base))
        producer.close()

        in_call = 0
        for k in range(KILLS):
            proc = start(tmp_path / "s.yaml")
            try:
                wait_until(lambda: ready(port), T(60), "the sink to be ready")
                if k % 2 == 0:
                    # Right after a create-order reached the exchange, before its answer.
                    before = creates(sim)
                    wait_until(lambda: creates(sim) > before, T(60), "a create-order")  # noqa: B023
                    time.sleep(rng.uniform(0.0, 0.3))
                    in_call += 1
                else:
                    time.sleep(rng.uniform(0.2, 2.0))
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=T(10))
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert in_call == KILLS // 2

        proc = start(tmp_path / "s.yaml")
        try:
            read_topic(
                kafka_bootstrap,
                t["results"],
                until=lambda r: len({json.loads(x.value)["command_id"] for x in r}) >= COMMANDS,
                timeout=T(300),
                committed=True,
            )
            time.sleep(T(2))
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=T(30))
        finally:
            if proc.poll() is None:
                proc.kill()
        placed = Counter(o["amount"] for o in sim.control.orders_created())
        counters = sim.control.counters()

    assert proc.returncode == 0
    results = values(read_topic(kafka_bootstrap, t["results"], committed=True, timeout=T(10)))
    final = [r for r in results if r["outcome"] != "duplicate"]
    per_command = Counter(r["command_id"] for r in final)
    assert set(per_command) == set(amounts)
    assert all(n == 1 for n in per_command.values()), per_command.most_common(3)
    assert not [r for r in results if r["outcome"] == "duplicate"]
    outcomes = Counter(r["outcome"] for r in final)
    assert outcomes["unknown"] == 0, outcomes
    for r in final:
        amount = amounts[r["command_id"]]
        if r["outcome"] == "accepted":
            assert placed[amount] == 1, (r, placed[amount])
        else:
            assert r["outcome"] == "failed" and r["reason"] == "not_placed", r
            assert placed[amount] == 0, r
    # No order the results do not account for, and never two for one command.
    assert sum(placed.values()) == outcomes["accepted"]
    assert max(placed.values()) == 1
    # The kills inside calls were settled by reading the exchange, not by resending.
    assert sum(1 for r in final if r["reconciled"]) >= 1
    assert counters["rate_limit_violations"] == {"ticker": 0, "other": 0}
    print(
        f"chaos: {KILLS} kills ({in_call} inside a create call); outcomes {dict(outcomes)}; "
        f"reconciled {sum(1 for r in final if r['reconciled'])}; "
        f"create-order requests {counters['requests_by_path'].get('/api/v1/create-order')}"
    )
