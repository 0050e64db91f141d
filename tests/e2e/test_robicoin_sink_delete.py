"""delete-order commands against the simulator and the real broker: a delete is decided
by what the exchange's open orders show, never by an error status alone.

The spec documents "40x" for errors and no error bodies, so an exchange may answer a
delete of an order that is already gone with ``400 {"error": "Order not found."}`` as
well as with a 404 — and a 4xx may also refuse an order that is still open.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest

from connectors.robicoin import protocol
from connectors.robicoin.client import Credentials, RobicoinClient
from connectors.runtime.kafka import ensure_topics
from connectors.simulators.harness import Harness
from connectors.simulators.robicoin import (
    DEFAULT_PRIVATE_KEY,
    DEFAULT_PUBLIC_ID,
    DEFAULT_PUBLIC_KEY,
    RobicoinSimulator,
)
from connectors.testing import T, read_topic, values
from tests.robicoin_helpers import CommandProducer, run_sink, sink_config

pytestmark = pytest.mark.e2e

NOT_FOUND_400 = (400, {"error": "Order not found."})


def now_ms() -> int:
    return int(time.time() * 1000)


def delete_command(command_id: str, data_id: int) -> dict[str, Any]:
    return {
        "command_id": command_id,
        "action": "delete",
        "pair": "btc-try",
        "data_id": data_id,
        "created_at": now_ms(),
    }


def results_by_id(bootstrap: str, topic: str, n: int) -> dict[str, dict[str, Any]]:
    recs = read_topic(bootstrap, topic, until=lambda r: len(r) >= n, timeout=T(60), committed=True)
    out = {r["command_id"]: r for r in values(recs)}
    assert len(out) >= n, out
    return out


def place_orders(sim: Harness[RobicoinSimulator], n: int) -> list[int]:
    """Place ``n`` btc-try sells straight on the exchange (as another client of the same
    account would); their data_ids, oldest first. Needs :func:`quiet_simulator`'s loose
    rate limit: these calls do not go through the sink's limiter."""
    client = RobicoinClient(
        sim.base_url, Credentials(DEFAULT_PUBLIC_KEY, DEFAULT_PUBLIC_ID, DEFAULT_PRIVATE_KEY)
    )
    before = len(sim.control.orders_created())
    try:
        for i in range(n):
            fields = {
                "side": "sell",
                "type": "btc-try",
                "amount": f"0.{i + 1:04d}",
                "price": "2500000.00",
                "use_rbc": "0",
                "stop_limit": "0",
            }
            client.call(protocol.CREATE_ORDER, fields)
    finally:
        client.close()
    return [int(o["data_id"]) for o in sim.control.orders_created()[before:]]


def remove_order(sim: Harness[RobicoinSimulator], data_id: int) -> None:
    """Delete an order straight on the exchange (the call a crashed run made)."""
    client = RobicoinClient(
        sim.base_url, Credentials(DEFAULT_PUBLIC_KEY, DEFAULT_PUBLIC_ID, DEFAULT_PRIVATE_KEY)
    )
    try:
        client.call(protocol.DELETE_ORDER, {"data_id": str(data_id), "type": "btc-try"})
    finally:
        client.close()


def open_ids(sim: Harness[RobicoinSimulator]) -> set[int]:
    return {int(o["data_id"]) for o in sim.control.open_orders()}


def requests_to(sim: Harness[RobicoinSimulator], endpoint: str) -> int:
    return int(sim.control.counters()["requests_by_path"].get(f"/api/v1/{endpoint}", 0))


def quiet_simulator() -> Harness[RobicoinSimulator]:
    """No background activity (the tests own every open order), and room for the set-up
    calls above besides the sink's own (rate limits are not what these tests are about)."""
    return Harness(
        RobicoinSimulator(
            transactions_per_second=0.0, market_orders_per_second=0.0, other_limit=(100, 0.1)
        )
    )


def test_a_delete_of_an_order_already_deleted_is_already_gone_even_on_a_400(
    kafka_bootstrap: str,
) -> None:
    with quiet_simulator() as sim:
        sim.control.set_delete_not_found(*NOT_FOUND_400)
        (data_id,) = place_orders(sim, 1)
        cfg = sink_config(sim.base_url, kafka_bootstrap)
        t = cfg.robicoin.topics
        producer = CommandProducer(kafka_bootstrap, t.commands)
        try:
            with run_sink(cfg):
                producer.send(delete_command("first", data_id))
                results_by_id(kafka_bootstrap, t.results, 1)
                # The order is gone now; the exchange answers a second delete with 400.
                producer.send(delete_command("again", data_id))
                results = results_by_id(kafka_bootstrap, t.results, 2)
        finally:
            producer.close()
        deleted = sim.control.orders_deleted()
        still_open = open_ids(sim)
    assert (results["first"]["outcome"], results["first"]["reason"]) == ("accepted", None)
    again = results["again"]
    assert (again["outcome"], again["reason"]) == ("accepted", "already_gone"), again
    assert again["data_id"] == data_id
    assert again["reconciled"] is True  # decided by reading open-order
    assert [d["data_id"] for d in deleted] == [data_id]
    assert data_id not in still_open


def test_a_delete_retried_after_a_lost_answer_is_already_gone_not_failed(
    kafka_bootstrap: str,
) -> None:
    with quiet_simulator() as sim:
        sim.control.set_delete_not_found(*NOT_FOUND_400)
        (data_id,) = place_orders(sim, 1)
        # The exchange deletes the order, then the connection drops without an answer:
        # the sink sends the delete again and gets the 400.
        sim.control.set_drop_delete_response(1)
        cfg = sink_config(sim.base_url, kafka_bootstrap)
        t = cfg.robicoin.topics
        producer = CommandProducer(kafka_bootstrap, t.commands)
        try:
            with run_sink(cfg):
                producer.send(delete_command("lost-answer", data_id))
                results = results_by_id(kafka_bootstrap, t.results, 1)
        finally:
            producer.close()
        counters = sim.control.counters()
        deleted = sim.control.orders_deleted()
    r = results["lost-answer"]
    assert (r["outcome"], r["reason"]) == ("accepted", "already_gone"), r
    assert r["attempts"] == 2
    assert counters["dropped_responses"] == 1
    assert [d["data_id"] for d in deleted] == [data_id]


def test_a_delete_resumed_after_a_crash_is_already_gone_not_failed(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="connectors.robicoin.sink")
    with quiet_simulator() as sim:
        sim.control.set_delete_not_found(*NOT_FOUND_400)
        (data_id,) = place_orders(sim, 1)
        cfg = sink_config(sim.base_url, kafka_bootstrap)
        t = cfg.robicoin.topics
        # What a run killed right after its delete-order reached the exchange leaves:
        # a pending ledger entry, the command not yet consumed, the order deleted.
        ensure_topics(cfg.kafka, [t.ledger], {t.ledger: {"cleanup.policy": "compact"}})
        pending = {
            "action": "delete",
            "data_id": data_id,
            "pair": "btc-try",
            "pending_at_ms": now_ms(),
            "state": "pending",
        }
        ledger = CommandProducer(kafka_bootstrap, t.ledger)
        producer = CommandProducer(kafka_bootstrap, t.commands)
        try:
            ledger.send(json.dumps(pending).encode(), key=b"crashed")
            producer.send(delete_command("crashed", data_id))
            remove_order(sim, data_id)
            with run_sink(cfg):
                results = results_by_id(kafka_bootstrap, t.results, 1)
        finally:
            ledger.close()
            producer.close()
        still_open = open_ids(sim)
    assert "delete crashed was pending at restart" in caplog.text  # the resume path
    r = results["crashed"]
    assert (r["outcome"], r["reason"]) == ("accepted", "already_gone"), r
    assert r["data_id"] == data_id
    assert data_id not in still_open


@pytest.mark.parametrize("status", [400, 404])
def test_a_refused_delete_of_an_order_still_open_fails(kafka_bootstrap: str, status: int) -> None:
    with quiet_simulator() as sim:
        (data_id,) = place_orders(sim, 1)
        # Whatever the text says, the order is still there.
        sim.control.refuse_next_deletes(status, {"error": "Order not found."})
        cfg = sink_config(sim.base_url, kafka_bootstrap)
        t = cfg.robicoin.topics
        producer = CommandProducer(kafka_bootstrap, t.commands)
        try:
            with run_sink(cfg):
                producer.send(delete_command("refused", data_id))
                results = results_by_id(kafka_bootstrap, t.results, 1)
        finally:
            producer.close()
        still_open = open_ids(sim)
    r = results["refused"]
    assert (r["outcome"], r["reason"]) == ("failed", "exchange_rejected"), r
    assert r["message"] == "Order not found."  # the exchange's own text
    assert r["data_id"] == data_id
    assert data_id in still_open


def test_a_refused_delete_behind_a_full_open_order_window_is_unknown(
    kafka_bootstrap: str,
) -> None:
    """open-order lists only the last 25: an order missing from a full list may still be
    open, so neither `already_gone` nor `failed` can be claimed."""
    with quiet_simulator() as sim:
        sim.control.set_delete_not_found(*NOT_FOUND_400)
        ids = place_orders(sim, 27)
        hidden_open, hidden_gone = ids[0], ids[1]
        remove_order(sim, hidden_gone)  # 26 open: the oldest is not among the last 25
        sim.control.refuse_next_deletes(*NOT_FOUND_400)
        cfg = sink_config(sim.base_url, kafka_bootstrap)
        t = cfg.robicoin.topics
        producer = CommandProducer(kafka_bootstrap, t.commands)
        try:
            with run_sink(cfg):
                producer.send(delete_command("hidden-open", hidden_open))
                results_by_id(kafka_bootstrap, t.results, 1)
                producer.send(delete_command("hidden-gone", hidden_gone))
                results = results_by_id(kafka_bootstrap, t.results, 2)
        finally:
            producer.close()
        still_open = open_ids(sim)
    for cid in ("hidden-open", "hidden-gone"):
        assert (results[cid]["outcome"], results[cid]["reason"]) == ("unknown", "undecided"), (
            results[cid]
        )
    assert hidden_open in still_open and hidden_gone not in still_open


@pytest.mark.parametrize("fault", ["401", "400-hash"])
def test_an_auth_failure_on_delete_is_not_taken_for_not_found(
    kafka_bootstrap: str, fault: str
) -> None:
    with quiet_simulator() as sim:
        (data_id,) = place_orders(sim, 1)
        cfg = sink_config(sim.base_url, kafka_bootstrap)
        t = cfg.robicoin.topics
        producer = CommandProducer(kafka_bootstrap, t.commands)
        try:
            with run_sink(cfg):
                if fault == "401":
                    sim.control.set_key_active(DEFAULT_PUBLIC_KEY, False)
                else:
                    sim.control.refuse_next_deletes(400, {"error": "Invalid hash"})
                producer.send(delete_command("denied", data_id))
                results = results_by_id(kafka_bootstrap, t.results, 1)
        finally:
            producer.close()
        reads = requests_to(sim, "open-order")
        still_open = open_ids(sim)
    r = results["denied"]
    assert (r["outcome"], r["reason"]) == ("failed", "unauthorized"), r
    assert reads == 0  # no signed request after the auth failure
    assert data_id in still_open
