"""The order-command sink against the simulator and the real broker: what lands in the
results topic, and what orders the exchange ends up holding."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import jsonschema
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka import TopicPartition

from connectors.robicoin.commands import sign
from connectors.robicoin.schemas import load_schema
from connectors.robicoin.sink_config import CommandAuth, RiskSettings
from connectors.runtime.config import Secret
from connectors.simulators.harness import Harness
from connectors.simulators.robicoin import RobicoinSimulator
from connectors.testing import T, metric_value, read_topic, values, wait_until
from connectors.testing.topics import reader
from tests.robicoin_helpers import (
    CommandProducer,
    create_command,
    run_sink,
    sink_config,
)

pytestmark = pytest.mark.e2e


def now_ms() -> int:
    return int(time.time() * 1000)


def results_of(bootstrap: str, topic: str, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    recs = read_topic(
        bootstrap, topic, until=lambda r: len(r) >= n, timeout=T(timeout), committed=True
    )
    return values(recs)


def orders_by_amount(sim: Harness[RobicoinSimulator]) -> Counter[str]:
    return Counter(o["amount"] for o in sim.control.orders_created())


def test_two_hundred_commands_give_two_hundred_orders_and_results(kafka_bootstrap: str) -> None:
    with Harness(
        RobicoinSimulator(transactions_per_second=0.0, market_orders_per_second=0.0)
    ) as sim:
        cfg = sink_config(sim.base_url, kafka_bootstrap)
        t = cfg.robicoin.topics
        producer = CommandProducer(kafka_bootstrap, t.commands)
        base = now_ms()
        amounts = [f"0.{i + 1:04d}" for i in range(200)]
        try:
            with run_sink(cfg) as conn:
                for i, amount in enumerate(amounts):
                    producer.send(create_command(f"c-{i}", amount, now_ms=base))
                results = results_of(kafka_bootstrap, t.results, 200, timeout=120)
                time.sleep(T(1))
                metrics = requests.get(
                    f"http://127.0.0.1:{conn.health_port}/metrics", timeout=T(5)
                ).text
                assert conn.stop().exit_code == 0
        finally:
            producer.close()
        counters = sim.control.counters()
        created = orders_by_amount(sim)
    results = results_of(kafka_bootstrap, t.results, 200)
    assert len(results) == 200
    assert Counter(r["outcome"] for r in results) == {"accepted": 200}
    assert sorted(r["command_id"] for r in results) == sorted(f"c-{i}" for i in range(200))
    # Each command placed exactly one order, with its exact decimals.
    assert created == Counter(amounts)
    assert counters["requests_by_path"].get("/api/v1/create-order") == 200
    assert counters["rate_limit_violations"] == {"ticker": 0, "other": 0}
    schema = load_schema("order-result")
    for r in results:
        jsonschema.validate(r, schema)
        assert r["latency_ms"]["in_sink"] >= 0
    assert metric_value(metrics, "connector_commands_total", outcome="accepted") == 200
    assert metric_value(metrics, "connector_consumer_lag") == 0


def test_a_lost_answer_is_reconciled_and_never_sent_twice(kafka_bootstrap: str) -> None:
    with Harness(
        RobicoinSimulator(transactions_per_second=0.0, market_orders_per_second=0.0)
    ) as sim:
        cfg = sink_config(sim.base_url, kafka_bootstrap, request_timeout_s=0.5)
        t = cfg.robicoin.topics
        producer = CommandProducer(kafka_bootstrap, t.commands)
        try:
            with run_sink(cfg):
                # 1: the order is placed, then the connection drops without an answer.
                sim.control.set_drop_create_response(1)
                producer.send(create_command("dropped", "0.11", now_ms=now_ms()))
                first = results_of(kafka_bootstrap, t.results, 1)
                # 2: the order is placed, the answer comes after the client's timeout.
                sim.control.set_create_delay(1.5)
                producer.send(create_command("slow", "0.22", now_ms=now_ms()))
                second = results_of(kafka_bootstrap, t.results, 2)
                sim.control.set_create_delay(0.0)
                # 3: a 503 without placing anything: reconciliation finds nothing.
                sim.control.fail_next("/create-order", 503)
                producer.send(create_command("refused", "0.33", now_ms=now_ms()))
                third = results_of(kafka_bootstrap, t.results, 3)
        finally:
            producer.close()
        counters = sim.control.counters()
        created = orders_by_amount(sim)
    by_id = {r["command_id"]: r for r in third}
    assert len(first) >= 1 and len(second) >= 2
    assert by_id["dropped"]["outcome"] == "accepted" and by_id["dropped"]["reconciled"]
    assert by_id["slow"]["outcome"] == "accepted" and by_id["slow"]["reconciled"]
    assert by_id["refused"]["outcome"] == "failed"
    assert by_id["refused"]["reason"] == "not_placed"
    # Exactly one create-order request per command: reconciliation read, never resent.
    assert counters["requests_by_path"]["/api/v1/create-order"] == 3
    assert created == Counter({"0.11": 1, "0.22": 1})


def test_expired_commands_and_the_kill_switch(kafka_bootstrap: str) -> None:
    with Harness(
        RobicoinSimulator(transactions_per_second=0.0, market_orders_per_second=0.0)
    ) as sim:
        cfg = sink_config(sim.base_url, kafka_bootstrap, command_max_age_s=30.0)
        t = cfg.robicoin.topics
        producer = CommandProducer(kafka_bootstrap, t.commands)
        try:
            with run_sink(cfg) as conn:
                producer.send(
                    create_command("past", "0.1", now_ms=now_ms() - 10_000, expires_at=now_ms() - 1)
                )
                producer.send(create_command("old", "0.2", now_ms=now_ms() - 120_000))
                results_of(kafka_bootstrap, t.results, 2)
                producer.control(t.control, trading_enabled=False, reason="test", by="pytest")
                for i in range(5):
                    producer.send(create_command(f"halted-{i}", f"0.3{i}", now_ms=now_ms()))
                # Deletes still go through: cancelling reduces risk.
                producer.send(
                    {
                        "command_id": "del",
                        "action": "delete",
                        "pair": "btc-try",
                        "data_id": 424242,
                        "created_at": now_ms(),
                    }
                )
                results_of(kafka_bootstrap, t.results, 8)
                metrics = requests.get(
                    f"http://127.0.0.1:{conn.health_port}/metrics", timeout=T(5)
                ).text
                producer.control(t.control, trading_enabled=True, reason="done", by="pytest")
                producer.send(create_command("after", "0.4", now_ms=now_ms()))
                results = results_of(kafka_bootstrap, t.results, 9)
        finally:
            producer.close()
        created = orders_by_amount(sim)
    by_id = {r["command_id"]: r for r in results}
    assert by_id["past"]["outcome"] == "expired"
    assert by_id["old"]["outcome"] == "expired"
    halted = [by_id[f"halted-{i}"] for i in range(5)]
    # The switch takes effect by the next command: at most the first can slip through.
    assert [r["outcome"] for r in halted[1:]] == ["rejected"] * 4
    assert all(r["reason"] == "kill_switch" for r in halted[1:])
    assert by_id["del"]["outcome"] == "accepted" and by_id["del"]["reason"] == "already_gone"
    assert by_id["after"]["outcome"] == "accepted"
    assert metric_value(metrics, "connector_trading_enabled") == 0
    slipped = sum(1 for r in halted if r["outcome"] == "accepted")
    assert created == Counter({"0.4": 1, **({"0.30": 1} if slipped else {})})


def test_duplicates_dead_letters_signatures_and_risk(kafka_bootstrap: str) -> None:
    secret = "hmac-shared-secret-9f2e"
    with Harness(
        RobicoinSimulator(transactions_per_second=0.0, market_orders_per_second=0.0)
    ) as sim:
        cfg = sink_config(
            sim.base_url,
            kafka_bootstrap,
            command_auth=CommandAuth(required=True, secret=Secret(secret)),
            risk=RiskSettings(max_notional="1000000"),
        )
        t = cfg.robicoin.topics
        producer = CommandProducer(kafka_bootstrap, t.commands)

        def signed(cmd: dict[str, Any]) -> dict[str, Any]:
            return {**cmd, "signature": sign(cmd, secret.encode())}

        try:
            with run_sink(cfg):
                ok = signed(create_command("ok", "0.1", now_ms=now_ms()))
                producer.send(ok)
                # Same id, malformed: refused, and it must not disturb the ledger entry.
                producer.send(signed({**create_command("ok", "0.1", now_ms=now_ms()), "price": 7}))
                producer.send(ok)  # replayed: must not place a second order
                producer.send(create_command("unsigned", "0.2", now_ms=now_ms()))
                forged = {**signed(create_command("forged", "0.3", now_ms=now_ms())), "amount": "3"}
                producer.send(forged)
                producer.send(signed(create_command("big", "1", now_ms=now_ms())))  # 2.5M TRY
                meta = producer.send(b"\xff\xfe not json", key=b"btc-try")
                results = results_of(kafka_bootstrap, t.results, 6)
                dead = read_topic(
                    kafka_bootstrap,
                    t.dead_letter,
                    until=lambda r: len(r) >= 1,
                    timeout=T(20),
                    committed=True,
                )
        finally:
            producer.close()
        created = orders_by_amount(sim)
    outcomes = [(r["command_id"], r["outcome"], r["reason"]) for r in results]
    assert ("ok", "accepted", None) in outcomes
    assert ("ok", "rejected", "number_not_string") in outcomes
    assert ("ok", "duplicate", "already_accepted") in outcomes
    assert ("unsigned", "rejected", "unsigned") in outcomes
    assert ("forged", "rejected", "bad_signature") in outcomes
    assert ("big", "rejected", "risk_max_notional") in outcomes
    assert created == Counter({"0.1": 1})
    headers = dict(dead[0].headers)
    assert dead[0].value == b"\xff\xfe not json"
    assert headers["source.offset"] == str(meta.offset).encode()
    assert headers["source.topic"] == t.commands.encode()
    assert headers["error.reason"] in (b"invalid_utf8", b"invalid_json")


def test_the_lag_gauge_matches_the_backlog_of_a_paused_sink(kafka_bootstrap: str) -> None:
    with Harness(
        RobicoinSimulator(transactions_per_second=0.0, market_orders_per_second=0.0)
    ) as sim:
        cfg = sink_config(sim.base_url, kafka_bootstrap)
        t = cfg.robicoin.topics
        producer = CommandProducer(kafka_bootstrap, t.commands)
        try:
            with run_sink(cfg) as conn:
                url = f"http://127.0.0.1:{conn.health_port}/metrics"
                producer.send(create_command("warm-up", "0.5", now_ms=now_ms()))
                results_of(kafka_bootstrap, t.results, 1)
                producer.control(t.control, paused=True, by="pytest")
                wait_until(
                    lambda: (
                        metric_value(requests.get(url, timeout=T(5)).text, "connector_paused") == 1
                    ),
                    T(20),
                    "the sink to pause",
                )
                for i in range(15):
                    producer.send(create_command(f"backlog-{i}", f"0.6{i:02d}", now_ms=now_ms()))
                wait_until(
                    lambda: (
                        metric_value(requests.get(url, timeout=T(5)).text, "connector_consumer_lag")
                        == 15
                    ),
                    T(20),
                    "the lag gauge to show the 15 waiting commands",
                )
                assert len(sim.control.orders_created()) == 1  # nothing ran meanwhile
                producer.control(t.control, paused=False, by="pytest")
                results_of(kafka_bootstrap, t.results, 16)
                wait_until(
                    lambda: (
                        metric_value(requests.get(url, timeout=T(5)).text, "connector_consumer_lag")
                        == 0
                    ),
                    T(20),
                    "the lag to drain",
                )
        finally:
            producer.close()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=12,
)
FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(),
    st.text(max_size=30),
    st.sampled_from(["1e400", "-1", "0", "0.000000001", "NaN", "99999999999999999999999.1"]),
)


def mutated_commands() -> st.SearchStrategy[bytes]:
    base = st.fixed_dictionaries(
        {
            "command_id": st.text(min_size=1, max_size=8).map(lambda s: "fz-" + s),
            "action": st.sampled_from(["create", "delete", "cancel", 1]),
            "pair": st.sampled_from(["btc-try", "doge-try", "", None]),
            "side": st.sampled_from(["buy", "sell", "hold"]),
            "amount": FIELD_VALUES,
            "price": FIELD_VALUES,
            "created_at": st.one_of(st.integers(-5, 2 * 10**12), st.text(max_size=5)),
        }
    )
    with_drops = base.flatmap(
        lambda d: st.sets(st.sampled_from(sorted(d))).map(
            lambda drop: {k: v for k, v in d.items() if k not in drop}
        )
    )
    return st.one_of(
        with_drops.map(lambda d: json.dumps(d).encode()),
        JSON.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=40),
    )


class Answers:
    """Follows the results and dead-letter topics; finds what answered a given offset."""

    def __init__(self, bootstrap: str, results: str, dead_letter: str) -> None:
        self._consumer = reader(bootstrap, committed=True)
        self._topics = (results, dead_letter)
        self.seen: dict[tuple[int, int], tuple[str, Any]] = {}

    def _assign(self) -> None:
        if self._consumer.assignment():
            return
        tps = []
        for topic in self._topics:
            wait_until(lambda: bool(self._consumer.partitions_for_topic(topic)), T(20), topic)  # noqa: B023
            tps += [TopicPartition(topic, p) for p in self._consumer.partitions_for_topic(topic)]
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning(*tps)

    def wait_for(self, partition: int, offset: int, timeout: float) -> tuple[str, Any]:
        self._assign()
        deadline = time.monotonic() + timeout
        while (partition, offset) not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"no result and no dead letter for offset {offset}")
            for tp, recs in self._consumer.poll(timeout_ms=200).items():
                for rec in recs:
                    if tp.topic == self._topics[0]:
                        value = json.loads(rec.value)
                        key = (value["source"]["partition"], value["source"]["offset"])
                        self.seen[key] = ("result", value)
                    else:
                        h = dict(rec.headers)
                        key = (int(h["source.partition"]), int(h["source.offset"]))
                        self.seen[key] = ("dead_letter", h)
        return self.seen[(partition, offset)]

    def close(self) -> None:
        self._consumer.close()


@pytest.fixture(scope="module")
def fuzz_sink(kafka_bootstrap: str) -> Any:
    with Harness(
        RobicoinSimulator(transactions_per_second=0.0, market_orders_per_second=0.0)
    ) as sim:
        # A 1 TRY limit: whatever the fuzzer makes, nothing may ever be placed.
        cfg = sink_config(sim.base_url, kafka_bootstrap, risk=RiskSettings(max_notional="1"))
        t = cfg.robicoin.topics
        producer = CommandProducer(kafka_bootstrap, t.commands)
        with run_sink(cfg) as conn:
            answers = Answers(kafka_bootstrap, t.results, t.dead_letter)
            yield sim, producer, conn, answers
            answers.close()
        producer.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=mutated_commands())
def test_fuzzed_commands_end_rejected_or_dead_lettered(fuzz_sink: Any, raw: bytes) -> None:
    sim, producer, conn, answers = fuzz_sink
    meta = producer.send(raw, key=b"fuzz")
    kind, answer = answers.wait_for(meta.partition, meta.offset, T(20))
    if kind == "result":
        assert answer["outcome"] in ("rejected", "expired", "duplicate"), answer
    else:
        assert answer["error.reason"]
    assert sim.control.orders_created() == []
    assert requests.get(f"http://127.0.0.1:{conn.health_port}/healthz", timeout=T(5)).ok
