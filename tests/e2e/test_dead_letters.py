"""Dead letters stay writable whatever came in: bounded, hashed, secrets masked.

Issue 12 §1: a 1 MiB record on the command topic became a dead letter larger than the
producer's ``max_request_size``; the transaction was retried for ever and no later
command was handled. A 2 MiB non-JSON WebSocket frame stopped the Cryptomus source.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kafka import KafkaProducer

from connectors.runtime import records
from connectors.runtime.logs import register_secret
from connectors.simulators.cryptomus import CryptomusSimulator
from connectors.simulators.harness import Harness
from connectors.simulators.robicoin import RobicoinSimulator
from connectors.testing import T, read_topic, unique, wait_until
from tests.cryptomus_helpers import make_config as cryptomus_config
from tests.cryptomus_helpers import run as run_cryptomus
from tests.robicoin_helpers import create_command, run_sink, sink_config

MiB = 1024 * 1024


def headers_of(record: Any) -> dict[str, bytes]:
    return dict(record.headers)


# -- the record itself (pure) -------------------------------------------------------------


def test_an_oversized_value_keeps_a_bounded_prefix_with_its_size_and_hash() -> None:
    raw = b"\xff\x00not json " * (MiB // 10 + 1)
    rec = records.dead_letter(
        topic="dlq",
        raw=raw,
        reason="invalid_json",
        detail="x" * 5000,
        exchange="robicoin",
        receive_time_ms=1,
        source="robicoin-orders",
        key=b"k" * (2 * MiB),
    )
    h = dict(rec.headers)
    assert rec.value == raw[: records.DEAD_LETTER_MAX_VALUE]
    assert rec.key is not None and len(rec.key) <= records.DEAD_LETTER_MAX_VALUE
    assert h["truncated"] == b"true"
    assert h["original-size"] == str(len(raw)).encode()
    assert h["original-sha256"] == hashlib.sha256(raw).hexdigest().encode()
    assert len(h["error.detail"]) <= 1000 * 4


def test_a_small_value_is_kept_whole() -> None:
    rec = records.dead_letter(
        topic="dlq",
        raw="not json",
        reason="invalid_json",
        detail="d",
        exchange="cryptomus",
        receive_time_ms=1,
        source="cryptomus-ws",
    )
    h = dict(rec.headers)
    assert rec.value == b"not json"
    assert h["truncated"] == b"false" and h["original-size"] == b"8"


def test_registered_secrets_are_masked_in_the_value_and_every_header() -> None:
    secret = "pubkey-" + unique("s")
    register_secret(secret)
    body = f'{{"error":"bad request","public_key":"{secret}"}}'
    rec = records.dead_letter(
        topic="dlq",
        raw=body,
        reason="exchange_error",
        detail=f"HTTP 400 for {secret}",
        exchange="robicoin",
        receive_time_ms=1,
        source="robicoin-poller",
        extra_headers=[("source.topic", secret.encode())],
    )
    everything = rec.value + b"".join(v for _, v in rec.headers)
    assert secret.encode() not in everything
    assert b"***" in rec.value
    # The hash is of the message as it came (to find it again), not of the masked one.
    assert (
        dict(rec.headers)["original-sha256"] == hashlib.sha256(body.encode()).hexdigest().encode()
    )


def test_a_secret_cut_by_the_prefix_does_not_leave_its_head_behind() -> None:
    secret = "private-" + unique("s") * 4
    register_secret(secret)
    limit = records.DEAD_LETTER_MAX_VALUE
    raw = b"a" * (limit - 10) + secret.encode() + b"b" * 100
    rec = records.dead_letter(
        topic="dlq",
        raw=raw,
        reason="r",
        detail="",
        exchange="e",
        receive_time_ms=1,
        source="s",
    )
    assert secret[:10].encode() not in rec.value


# -- the order sink, end to end ------------------------------------------------------------


@pytest.fixture
def big_producer(kafka_bootstrap: str) -> Iterator[KafkaProducer]:
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", max_request_size=12 * MiB
    )
    yield producer
    producer.close(timeout=5)


@pytest.mark.e2e
def test_poison_records_on_the_command_topic_do_not_block_later_commands(
    kafka_bootstrap: str, big_producer: KafkaProducer
) -> None:
    with Harness(RobicoinSimulator(transactions_per_second=0.0)) as sim:
        cfg = sink_config(sim.base_url, kafka_bootstrap)
        t = cfg.robicoin.topics
        poison = [
            b"\x00\xff" * (MiB // 2),  # 1 MiB, not JSON
            json.dumps(create_command(unique("c"), "0.001", now_ms=0, note="n" * MiB)).encode(),
            b"{" * (10 * MiB),  # 10 MiB, not JSON
        ]
        with run_sink(cfg):
            handled_after: list[float] = []
            for n, value in enumerate(poison):
                big_producer.send(t.commands, value=value, key=b"btc-try").get(timeout=T(60))
                sent = time.monotonic()
                command_id = unique(f"ok{n}")
                cmd = create_command(command_id, f"0.00{n + 1}", now_ms=int(time.time() * 1000))
                big_producer.send(t.commands, value=json.dumps(cmd).encode(), key=b"btc-try").get(
                    timeout=T(30)
                )

                def answered(cid: str = command_id) -> bool:
                    found = read_topic(kafka_bootstrap, t.results, timeout=T(2), committed=True)
                    return any(json.loads(r.value)["command_id"] == cid for r in found)

                wait_until(answered, T(60), f"a result for the command after poison {n}")
                handled_after.append(time.monotonic() - sent)
        dead = read_topic(
            kafka_bootstrap, t.dead_letter, until=lambda rs: len(rs) >= 2, timeout=T(30)
        )
        results = [
            json.loads(r.value)
            for r in read_topic(kafka_bootstrap, t.results, timeout=T(5), committed=True)
        ]
    # Both non-JSON values are dead letters with a bounded prefix and the original size.
    sizes = sorted(int(headers_of(r)["original-size"]) for r in dead)
    assert sizes == sorted([len(poison[0]), len(poison[2])])
    for rec in dead:
        h = headers_of(rec)
        assert h["truncated"] == b"true"
        assert len(rec.value) <= records.DEAD_LETTER_MAX_VALUE
        original = next(p for p in poison if len(p) == int(h["original-size"]))
        assert h["original-sha256"] == hashlib.sha256(original).hexdigest().encode()
    # The 1 MiB JSON command got an answer of its own (it is a command, not garbage),
    # and each valid command after a poison record one accepted result.
    ok = [r for r in results if r["command_id"].startswith("ok")]
    assert sorted(r["outcome"] for r in ok) == ["accepted"] * 3
    assert len(results) == 4
    assert all(len(json.dumps(r)) < 64 * 1024 for r in results)
    print("seconds from poison record to the next command's result:", handled_after)


# -- the Cryptomus source, end to end -------------------------------------------------------


@pytest.mark.e2e
def test_a_two_mib_frame_that_is_not_json_is_dead_lettered_and_the_stream_goes_on(
    kafka_bootstrap: str,
) -> None:
    frame = "not json " * (2 * MiB // 9 + 1)
    with Harness(CryptomusSimulator(updates_per_second=10.0)) as sim:
        config = cryptomus_config(sim, kafka_bootstrap, channels=["ticker"])
        with run_cryptomus(config) as conn:
            wait_until(lambda: sim.control.open_connections() == 1, T(20), "connected")
            assert sim.control.inject_raw(frame) == 1
            dead = read_topic(
                kafka_bootstrap,
                config.cryptomus.topics.dead_letter,
                until=lambda rs: len(rs) >= 1,
                timeout=T(20),
            )
            before = sim.control.counters()["updates_sent"]["ticker"]
            wait_until(
                lambda: sim.control.counters()["updates_sent"]["ticker"] >= before + 5,
                T(20),
                "more data",
            )
            assert conn.result is None, "the source must keep running"
        assert conn.result is not None and conn.result.exit_code == 0
        assert sim.control.counters()["connections_accepted"] == 1
    h = headers_of(dead[0])
    assert h["error.reason"] == b"invalid_json"
    assert h["truncated"] == b"true"
    assert int(h["original-size"]) == len(frame.encode())
    assert dead[0].value == frame.encode()[: records.DEAD_LETTER_MAX_VALUE]
