"""The Robicoin poller end to end: simulator → connector → real broker → what a consumer
reading ``read_committed`` sees."""

from __future__ import annotations

import json
import time
from collections import Counter
from itertools import pairwise
from typing import Any

import jsonschema
import pytest
import requests

from connectors.robicoin.protocol import TICKER_WINDOWS
from connectors.robicoin.schemas import load_schema
from connectors.simulators.harness import Harness
from connectors.simulators.robicoin import RobicoinSimulator
from connectors.testing import T, metric_value, read_topic, values, wait_until
from tests.robicoin_helpers import canonical, make_config, run, streams

pytestmark = pytest.mark.e2e

TX_FIELDS = ("zone", "amount", "price", "total", "fee", "status", "txid")


def as_exchange_row(data: dict[str, Any]) -> dict[str, Any]:
    """A transaction record's data turned back into the row the exchange served."""
    row = {k: data[k] for k in TX_FIELDS}
    row.update(type=data["pair"], created_at=data["created_at"], updated_at=data["updated_at"])
    return row


def events(recs: list[Any]) -> list[dict[str, Any]]:
    return [v for v in values(recs) if v["kind"] == "event"]


def test_every_stream_lands_exactly_once_with_exact_decimals(kafka_bootstrap: str) -> None:
    with Harness(RobicoinSimulator(transactions_per_second=4.0, seed=11)) as sim:
        cfg = make_config(
            sim.base_url, kafka_bootstrap, streams=streams(0.3, windows=list(TICKER_WINDOWS))
        )
        t = cfg.robicoin.topics
        with run(cfg) as conn:
            wait_until(lambda: len(sim.control.transactions()) >= 20, T(20), "activity")
            sim.control.pause_activity()
            expected = sim.control.transactions()
            # Everything the exchange holds now must arrive, then nothing more.
            read_topic(
                kafka_bootstrap,
                t.transaction,
                until=lambda recs: len(recs) >= len(expected),
                timeout=T(30),
                committed=True,
            )
            wait_until(lambda: sim.control.last_body("/open-order") is not None, T(5), "poll")
            time.sleep(T(1.5))  # a few more polls of unchanged data
            health = requests.get(f"http://127.0.0.1:{conn.health_port}/readyz", timeout=T(5))
            assert health.status_code == 200, health.text
            assert conn.stop().exit_code == 0
        log = sim.control.response_log
        open_now = sim.control.open_orders()
        balances_now = sim.control.balances()

    # transaction: every row once, nothing invented, and per pair (the record key, so
    # one partition) in the exchange's order.
    txs = events(read_topic(kafka_bootstrap, t.transaction, committed=True, timeout=T(10)))
    got = [canonical(as_exchange_row(v["data"])) for v in txs]
    assert Counter(got) == Counter(canonical(r) for r in expected)
    assert len(got) == len(expected)
    for pair in {r["type"] for r in expected}:
        mine = [g for g, v in zip(got, txs, strict=True) if v["symbol"] == pair]
        assert mine == [canonical(r) for r in expected if r["type"] == pair]

    # ticker: every window, every value the literal text the exchange served.
    served = " ".join(e.body for e in log if "/ticker" in e.path)
    tickers = events(read_topic(kafka_bootstrap, t.ticker, committed=True, timeout=T(10)))
    assert {v["data"]["window"] for v in tickers} == set(TICKER_WINDOWS)
    for v in tickers:
        for field in ("high", "low", "last", "bid", "ask", "volume", "average"):
            text = v["data"][field]
            assert isinstance(text, str)
            assert f": {text}," in served or f":{text}," in served or f":{text}}}" in served, (
                field,
                text,
            )

    # balance: the last record per currency is the exchange's final balance.
    balances = events(read_topic(kafka_bootstrap, t.balance, committed=True, timeout=T(10)))
    last = {v["symbol"]: v["data"] for v in balances}
    assert last == {
        b["currency"]: {k: b[k] for k in ("currency", "balance", "reserved_balance", "status")}
        for b in balances_now
    }
    # ... and with emit=changes, no two consecutive records of a currency are equal.
    per_currency: dict[str, list[str]] = {}
    for v in balances:
        per_currency.setdefault(v["symbol"], []).append(canonical(v["data"]))
    for seq in per_currency.values():
        assert all(a != b for a, b in pairwise(seq))

    # open-order: replaying opened/changed/closed gives the exchange's open orders.
    view: dict[int, dict[str, Any]] = {}
    opens = events(read_topic(kafka_bootstrap, t.open_order, committed=True, timeout=T(10)))
    for v in opens:
        d = v["data"]
        if d["change"] in ("opened", "changed"):
            view[d["data_id"]] = d
        else:
            view.pop(d["data_id"], None)
    assert sorted(view) == sorted(int(o["data_id"]) for o in open_now[:25])

    # order: market orders, each one as served.
    orders = events(read_topic(kafka_bootstrap, t.order, committed=True, timeout=T(10)))
    assert orders
    served_orders = " ".join(e.body for e in log if e.path.endswith("/order"))
    for v in orders[:50]:
        assert json.dumps(v["data"]["price"]) in served_orders

    # Every record of every topic passes its schema; nothing was dead-lettered.
    for channel, topic in (
        ("transaction", t.transaction),
        ("ticker", t.ticker),
        ("balance", t.balance),
        ("open-order", t.open_order),
        ("order", t.order),
    ):
        recs = read_topic(kafka_bootstrap, topic, committed=True, timeout=T(10))
        schema = load_schema(channel)
        for rec in recs:
            jsonschema.validate(json.loads(rec.value), schema)
            assert dict(rec.headers)["schema"] == f"robicoin.{channel}/v1".encode()
    assert read_topic(kafka_bootstrap, t.dead_letter, timeout=T(3)) == []


def test_a_burst_larger_than_the_window_writes_a_gap_marker(kafka_bootstrap: str) -> None:
    with Harness(RobicoinSimulator(transactions_per_second=0.0, seed=3)) as sim:
        cfg = make_config(
            sim.base_url,
            kafka_bootstrap,
            streams=streams(2.0, enabled={"transaction"}),
        )
        t = cfg.robicoin.topics
        with run(cfg) as conn:
            first = read_topic(
                kafka_bootstrap,
                t.transaction,
                until=lambda r: len(r) >= 5,
                timeout=T(20),
                committed=True,
            )
            assert len(first) == 5  # the simulator's initial history
            burst = sim.control.burst(40)  # between two polls (2 s apart)
            recs = read_topic(
                kafka_bootstrap,
                t.transaction,
                until=lambda r: any(json.loads(x.value)["kind"] == "gap" for x in r),
                timeout=T(20),
                committed=True,
            )
            time.sleep(T(0.5))
            text = requests.get(f"http://127.0.0.1:{conn.health_port}/metrics", timeout=T(5)).text
            conn.stop()
    gaps = [v for v in values(recs) if v["kind"] == "gap"]
    # One marker per partition, so every consumer of the topic learns about it.
    assert len(gaps) == cfg.kafka.topic_partitions
    assert {v["data"]["reason"] for v in gaps} == {"window_overflow"}
    jsonschema.validate(gaps[0], load_schema("transaction"))
    assert gaps[0]["resync_epoch"] > json.loads(first[0].value)["resync_epoch"]
    assert metric_value(text, "connector_gaps_total", reason="window_overflow") == 1
    # The 25 rows that were visible are written; the 15 older ones could not be seen.
    written = Counter(canonical(as_exchange_row(v["data"])) for v in events(recs))
    before = Counter(canonical(as_exchange_row(v["data"])) for v in events(first))
    assert written - before == Counter(canonical(r) for r in burst[-25:])
    assert sum(written.values()) == 5 + 25


def test_a_thirty_second_run_at_full_budget_makes_no_rate_limit_violation(
    kafka_bootstrap: str,
) -> None:
    """Every stream polled back to back (interval 0), all five ticker windows: only the
    rate limiters hold the connector back. The simulator counts any request that
    breaks 10/100 ms (ticker) or 1/100 ms (everything else)."""
    with Harness(RobicoinSimulator(transactions_per_second=5.0, seed=5)) as sim:
        cfg = make_config(
            sim.base_url, kafka_bootstrap, streams=streams(0.0, windows=list(TICKER_WINDOWS))
        )
        with run(cfg) as conn:
            started = time.monotonic()
            time.sleep(30)
            elapsed = time.monotonic() - started
            text = requests.get(f"http://127.0.0.1:{conn.health_port}/metrics", timeout=T(5)).text
            assert conn.stop().exit_code == 0
        counters = sim.control.counters()
    assert counters["rate_limit_violations"] == {"ticker": 0, "other": 0}
    assert counters["responses_by_status"].get(429, 0) == 0
    by_path = counters["requests_by_path"]
    other = sum(n for p, n in by_path.items() if "/ticker" not in p)
    ticker = sum(n for p, n in by_path.items() if "/ticker" in p)
    # The limiter really was the bottleneck: the "other" class ran near its budget
    # (each request 102 ms after the previous answer); the waits are on /metrics.
    assert other / elapsed > 0.6 * (1 / 0.12), (other, elapsed)
    assert ticker > 0
    assert metric_value(text, "connector_rate_limit_waits_total", endpoint_class="other") > 0
    assert metric_value(text, "connector_rate_limit_wait_seconds_count", endpoint_class="other") > 0
    print(
        f"full budget: other {other / elapsed:.2f} req/s (budget {1 / 0.12:.2f}), "
        f"ticker {ticker / elapsed:.2f} req/s, 0 violations"
    )
