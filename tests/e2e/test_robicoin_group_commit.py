"""Group commit in the Robicoin poller, against a real broker: the polls of several
streams share Kafka transactions, and what a ``read_committed`` consumer sees stays
exactly once when such a shared transaction fails — whether it landed anyway (its
confirmation timed out) or not — and across a restart.

The failures are injected into the transactional producer's ``commit`` of this
process (the poller runs in a thread here): one shared transaction is committed and
then reported failed, as a commit whose confirmation timed out; another is reported
failed before anything was written.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import requests

from connectors.runtime.errors import RetriableError
from connectors.runtime.records import OutRecord
from connectors.runtime.state import Transactions
from connectors.simulators.harness import Harness
from connectors.simulators.robicoin import RobicoinSimulator
from connectors.testing import T, metric_value, read_topic, values, wait_until
from tests.robicoin_helpers import canonical, make_config, run, streams

pytestmark = pytest.mark.e2e

TX_FIELDS = ("zone", "amount", "price", "total", "fee", "status", "txid")
RELOADED = "re-reading state from Kafka after a failed commit"


def as_exchange_row(data: Mapping[str, Any]) -> dict[str, Any]:
    row = {k: data[k] for k in TX_FIELDS}
    row.update(type=data["pair"], created_at=data["created_at"], updated_at=data["updated_at"])
    return row


class CommitFaults:
    """Wraps ``Transactions.commit``: the first poller transactions that hold records of
    the transaction stream *and* of another stream fail, in the order of ``plan``:
    ``landed`` (committed, then reported failed) or ``lost`` (nothing written)."""

    def __init__(self, transaction_topic: str, stream_topics: Sequence[str]) -> None:
        self.transaction_topic = transaction_topic
        self.stream_topics = set(stream_topics)
        self.plan = ["landed", "lost"]
        self.failed: list[tuple[str, set[str]]] = []
        self._real = Transactions.commit
        self._lock = threading.Lock()

    def commit(
        self,
        tx: Transactions,
        records: Sequence[OutRecord],
        offsets: Any = None,
        consumer: Any = None,
    ) -> None:
        topics = {r.topic for r in records if r.topic in self.stream_topics}
        with self._lock:
            kind = None
            if self.plan and self.transaction_topic in topics and len(topics) >= 2:
                kind = self.plan.pop(0)
        if kind is None:
            return self._real(tx, records, offsets, consumer)
        if kind == "landed":
            self._real(tx, records, offsets, consumer)
        with self._lock:
            self.failed.append((kind, topics))
        raise RetriableError(f"injected: a transaction of {len(records)} record(s) {kind}")


def test_shared_transactions_stay_exactly_once_across_failed_commits_and_a_restart(
    kafka_bootstrap: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="connectors.runtime.polling")
    with Harness(RobicoinSimulator(transactions_per_second=4.0, seed=21)) as sim:
        cfg = make_config(
            sim.base_url,
            kafka_bootstrap,
            streams=streams(0.0, windows=["24h", "1min", "1hour"]),
        )
        t = cfg.robicoin.topics
        topics = [t.ticker, t.order, t.balance, t.transaction, t.open_order]
        faults = CommitFaults(t.transaction, topics)

        def commit(tx: Transactions, records: Sequence[OutRecord], *args: Any) -> None:
            faults.commit(tx, records, *args)

        monkeypatch.setattr(Transactions, "commit", commit)

        with run(cfg) as conn:
            wait_until(lambda: len(faults.failed) == 2, T(60), "two shared transactions failed")
            wait_until(lambda: len(sim.control.transactions()) >= 40, T(30), "activity")
            sim.control.pause_activity()
            expected = sim.control.transactions()
            read_topic(
                kafka_bootstrap,
                t.transaction,
                until=lambda recs: len(recs) >= len(expected),
                timeout=T(30),
                committed=True,
            )
            text = requests.get(f"http://127.0.0.1:{conn.health_port}/metrics", timeout=T(5)).text
            assert conn.stop().exit_code == 0

        # Each failed transaction held the polls of several streams...
        assert [kind for kind, _ in faults.failed] == ["landed", "lost"]
        assert all(len(held) >= 2 for _, held in faults.failed)
        # ...and each cost one re-read of the state, not one per poll it held.
        assert caplog.text.count(RELOADED) == 2
        # Polls share transactions: every ticker poll writes records, yet there were
        # fewer transactions than ticker polls alone.
        committed = metric_value(text, "connector_transactions_total", outcome="committed")
        ticker_polls = metric_value(
            text, "connector_requests_total", endpoint="ticker", outcome="ok"
        )
        assert 0 < committed < ticker_polls, (committed, ticker_polls)

        # A second run with the same config resumes from the committed state.
        before = sim.control.counters()["requests_by_path"]
        with run(cfg) as conn:

            def polled_again() -> bool:
                now = sim.control.counters()["requests_by_path"]
                return sum(n - before.get(p, 0) for p, n in now.items() if "transaction" in p) >= 5

            wait_until(polled_again, T(30), "the second run's transaction polls")
            assert conn.stop().exit_code == 0

    recs = read_topic(kafka_bootstrap, t.transaction, committed=True, timeout=T(10))
    kinds = Counter(v["kind"] for v in values(recs))
    assert kinds == Counter(event=len(expected))  # no gap marker, nothing else
    got = Counter(canonical(as_exchange_row(v["data"])) for v in values(recs))
    assert got == Counter(canonical(r) for r in expected)  # every row once: none lost or doubled
    # One epoch throughout: no restart or failure made consumers resync.
    assert len({json.loads(r.value)["resync_epoch"] for r in recs}) == 1
