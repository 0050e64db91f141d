"""Group commit in the polling runtime, without a broker.

:class:`GroupCommit` is driven on its own with a scripted ``commit``; then the whole
poll loop (:class:`PollingSource`) runs against a toy exchange and an in-memory stand-in
for Kafka that keeps only committed transactions and can fail one, before or after it
landed (a commit that timed out may have succeeded). What is checked is what a reader
of the topics would notice: every row once, polls of several streams in one
transaction, state re-read once per failed transaction however many polls it held.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from connectors.runtime import polling
from connectors.runtime.context import RuntimeContext
from connectors.runtime.cursors import Incremental, Request, Step
from connectors.runtime.errors import BadMessage, FatalError, RetriableError
from connectors.runtime.health import HealthState
from connectors.runtime.metrics import Metrics
from connectors.runtime.polling import (
    GroupCommit,
    PollingSource,
    PollSettings,
    RateClass,
    Submission,
    wait_for_event,
)
from connectors.runtime.ratelimit import RateLimit
from connectors.runtime.records import Event, OutRecord
from connectors.runtime.settings import KafkaSettings
from connectors.testing import T

# -- the committer on its own -------------------------------------------------------------


def rec(name: str) -> OutRecord:
    return OutRecord("topic", name.encode(), None, (), 1, "test")


class Script:
    """A ``commit`` that records each group; a group can be held in flight until
    released, or fail with a given error."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.in_flight = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.errors: list[BaseException | None] = []

    async def __call__(self, group: Sequence[Submission]) -> None:
        self.groups.append([s.key for s in group])
        self.in_flight.set()
        await self.release.wait()
        self.in_flight.clear()
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error


async def running(committer: GroupCommit, body: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(committer.run())
    try:
        await asyncio.wait_for(body(), T(10))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_polls_that_finish_during_a_transaction_go_together_in_the_next() -> None:
    script = Script()
    committer = GroupCommit(script)

    async def body() -> None:
        script.release.clear()
        first = asyncio.create_task(committer.submit("a", [rec("a1")], {"cursor/a": 1}))
        await script.in_flight.wait()  # a's transaction is in flight...
        later = [
            asyncio.create_task(committer.submit(k, [rec(k)], {f"cursor/{k}": 1}))
            for k in ("b", "c", "d")
        ]
        while committer.waiting < 3:  # ...while three more polls finish
            await asyncio.sleep(0)
        assert not any(t.done() for t in [first, *later])  # nobody returns before its commit
        script.release.set()
        await asyncio.gather(first, *later)

    asyncio.run(running(committer, body))
    assert script.groups == [["a"], ["b", "c", "d"]]  # in the order they were submitted
    assert (committer.groups, committer.polls) == (2, 4)


def test_every_poll_of_a_failed_transaction_sees_its_failure_and_the_next_goes_on() -> None:
    script = Script()
    committer = GroupCommit(script)
    outcomes: dict[str, BaseException | None] = {}

    async def submit(key: str) -> None:
        try:
            await committer.submit(key, [rec(key)], {})
            outcomes[key] = None
        except Exception as exc:
            outcomes[key] = exc

    async def body() -> None:
        script.release.clear()
        script.errors = [None, RetriableError("Kafka did not confirm"), None]
        first = asyncio.create_task(submit("a"))
        await script.in_flight.wait()
        group = [asyncio.create_task(submit(k)) for k in ("b", "c")]
        while committer.waiting < 2:
            await asyncio.sleep(0)
        script.release.set()
        await asyncio.gather(first, *group)
        await submit("b")  # the stream polls again: a new transaction

    asyncio.run(running(committer, body))
    assert script.groups == [["a"], ["b", "c"], ["b"]]
    assert outcomes["a"] is None and outcomes["b"] is None  # b's retry committed
    failed = outcomes["c"]
    assert isinstance(failed, RetriableError) and "did not confirm" in str(failed)
    assert committer.groups == 2  # transactions committed: the failed one is not counted


def test_a_fatal_error_reaches_every_poll_of_its_transaction() -> None:
    script = Script()
    committer = GroupCommit(script)

    async def body() -> None:
        script.errors = [FatalError("another instance took over")]
        results = await asyncio.gather(
            committer.submit("a", [rec("a")], {}),
            committer.submit("b", [rec("b")], {}),
            return_exceptions=True,
        )
        assert [type(r) for r in results] == [FatalError, FatalError]

    asyncio.run(running(committer, body))
    assert script.groups == [["a", "b"]]


def test_a_stream_has_at_most_one_submission_waiting_or_in_flight() -> None:
    script = Script()
    committer = GroupCommit(script)

    async def body() -> None:
        script.release.clear()
        first = asyncio.create_task(committer.submit("a", [rec("a1")], {}))
        await script.in_flight.wait()
        with pytest.raises(RuntimeError, match="second submission"):
            await committer.submit("a", [rec("a2")], {})  # its first is in flight
        waiting = asyncio.create_task(committer.submit("b", [rec("b1")], {}))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="second submission"):
            await committer.submit("b", [rec("b2")], {})  # its first is waiting
        assert committer.waiting == 1
        script.release.set()
        await asyncio.gather(first, waiting)
        await committer.submit("a", [rec("a2")], {})  # committed: the next may come

    asyncio.run(running(committer, body))
    assert script.groups == [["a"], ["b"], ["a"]]


def test_a_poll_whose_task_stopped_before_its_transaction_began_is_not_committed() -> None:
    script = Script()
    committer = GroupCommit(script)

    async def body() -> None:
        script.release.clear()
        first = asyncio.create_task(committer.submit("a", [rec("a")], {}))
        await script.in_flight.wait()
        stopped = asyncio.create_task(committer.submit("b", [rec("b")], {}))
        kept = asyncio.create_task(committer.submit("c", [rec("c")], {}))
        while committer.waiting < 2:
            await asyncio.sleep(0)
        stopped.cancel()
        script.release.set()
        await asyncio.gather(first, kept)
        await committer.submit("b", [rec("b")], {})  # its key is free again

    asyncio.run(running(committer, body))
    assert script.groups == [["a"], ["c"], ["b"]]


def test_exclusive_waits_for_the_transaction_in_flight_and_holds_the_next() -> None:
    script = Script()
    committer = GroupCommit(script)
    seen: list[str] = []

    async def body() -> None:
        script.release.clear()
        first = asyncio.create_task(committer.submit("a", [rec("a")], {}))
        await script.in_flight.wait()

        async def reread() -> None:
            async with committer.exclusive():
                seen.append(f"re-read after {len(script.groups)} transaction(s)")
                second = asyncio.create_task(committer.submit("b", [rec("b")], {}))
                for _ in range(20):
                    await asyncio.sleep(0)
                assert not second.done() and len(script.groups) == 1  # held
            await second

        reader = asyncio.create_task(reread())
        for _ in range(5):
            await asyncio.sleep(0)
        assert seen == []  # the transaction in flight comes first
        script.release.set()
        await asyncio.gather(first, reader)

    asyncio.run(running(committer, body))
    assert seen == ["re-read after 1 transaction(s)"]
    assert script.groups == [["a"], ["b"]]


def test_an_idle_committer_adds_no_latency_and_a_busy_one_gathers_until_a_poll_is_due() -> None:
    script = Script()
    committer = GroupCommit(script, gather_s=T(60))  # far longer than any test may wait

    async def body() -> None:
        loop = asyncio.get_running_loop()
        await committer.submit("a", [rec("a")], {})  # idle: committed at once
        # Busy now (a transaction just ended): a poll with nothing due soon is held open...
        held = asyncio.create_task(committer.submit("b", [rec("b")], {}, due=loop.time() + 3600))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not held.done() and committer.waiting == 1
        # ...and joined by the next poll, whose stream could poll again shortly: both go
        # together before that (not after the minute-long cap).
        await committer.submit("c", [rec("c")], {}, due=loop.time() + 0.05)
        await held

    asyncio.run(running(committer, body))
    assert script.groups == [["a"], ["b", "c"]]


def test_a_task_stopped_just_as_its_event_is_set_still_stops() -> None:
    # asyncio.wait_for (Python 3.11) returns normally in this race: the task would go on.
    async def body() -> None:
        event = asyncio.Event()
        waiter = asyncio.create_task(wait_for_event(event, T(60)))
        await asyncio.sleep(0)
        event.set()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(asyncio.wait_for(body(), T(10)))


def test_a_committer_stopped_as_a_poll_arrives_stops() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        committer = GroupCommit(Script(), gather_s=T(60))
        task = asyncio.create_task(committer.run())
        await committer.submit("a", [rec("a")], {})  # busy now
        held = asyncio.create_task(committer.submit("b", [rec("b")], {}, due=loop.time() + 3600))
        for _ in range(10):
            await asyncio.sleep(0)  # the committer holds b's group open
        committer._wake.set()  # a poll arrives (what submit does)...
        task.cancel()  # ...just as the connector stops
        results = await asyncio.wait_for(asyncio.gather(task, held, return_exceptions=True), T(10))
        assert all(isinstance(r, asyncio.CancelledError) for r in results)

    asyncio.run(body())


def test_a_hold_ends_before_the_first_due_less_the_commit_time() -> None:
    committer = GroupCommit(Script(), gather_s=0.035)
    assert committer.hold_until(now=10.0, opened=10.0) == 10.0  # never committed: idle
    committer._last_end = 9.9  # the last transaction ended 100 ms ago: idle
    assert committer.hold_until(now=10.0, opened=10.0) == 10.0
    committer._last_end = 9.99  # 10 ms ago: busy
    assert committer.hold_until(now=10.0, opened=10.0) == pytest.approx(10.035)  # the cap
    loop = asyncio.new_event_loop()
    try:
        done = loop.create_future()
        committer._pending.append(Submission("t", [], {}, done, due=10.03))
        commit = committer.commit_s
        assert committer.hold_until(now=10.0, opened=10.0) == pytest.approx(10.03 - 2 * commit)
        committer._pending.append(Submission("u", [], {}, done, due=10.011))
        assert committer.hold_until(now=10.0, opened=10.0) == 10.0  # too short to wait for
    finally:
        loop.close()


# -- the poll loop against a stand-in for Kafka ---------------------------------------------

#: Where the toy streams write (``toy.polled.<stream>``).
POLLED = "toy.polled."
#: How long a transaction takes the stand-in broker.
ROUND_TRIP_S = 0.005


def parse(row: Any) -> Event:
    if not isinstance(row, dict) or not isinstance(row.get("id"), int):
        raise BadMessage("bad_row", "expected an id")
    return Event("trade", row["stream"], None, {"stream": row["stream"], "id": row["id"]})


@dataclass(frozen=True)
class AfterId:
    """New rows: ids above the last one written (stored as ``{"last": id}``)."""

    def load(self, stored: Mapping[str, Any]) -> int:
        return int(stored.get("last", 0))

    def advance(self, cursor: int, rows: Sequence[Any]) -> Step:
        new = sorted((r for r in rows if r["id"] > cursor), key=lambda r: int(r["id"]))
        return Step(new, {"last": max([cursor, *(r["id"] for r in rows)])})


@dataclass(frozen=True)
class Stream:
    name: str
    channel: str = "trade"
    interval_s: float = 0.0
    rule: Incremental = field(default_factory=lambda: Incremental(parse, AfterId()))

    @property
    def topic(self) -> str:
        return f"{POLLED}{self.name}"

    @property
    def request(self) -> Request:
        return Request(self.name, self.name, False, "all")

    def rows(self, payload: Any) -> Sequence[Any]:
        return list(payload)


@dataclass(frozen=True)
class Answer:
    payload: Any
    text: str = ""
    error: BadMessage | None = None


class Exchange:
    """Each stream's answer is its last five rows; every call adds one."""

    exchange = "toy"
    settings = PollSettings(backoff_initial_s=0.01, backoff_max_s=0.05)
    rate_classes = {"all": RateClass(RateLimit(1000, 0.01), 0.0)}
    dead_letter_topic = "toy.dlq"
    state_topic = "toy.state"
    transactional_id = "toy-poller"

    def __init__(self, names: Sequence[str]) -> None:
        self.streams = [Stream(n) for n in names]
        self.made = dict.fromkeys(names, 0)
        self._lock = threading.Lock()

    def call(self, request: Request) -> Answer:
        with self._lock:
            self.made[request.name] += 1
            last = self.made[request.name]
        rows = [{"stream": request.name, "id": i} for i in range(max(1, last - 4), last + 1)]
        return Answer(rows)

    def guard_spec(self) -> None:
        return None

    def attach(self, ctx: Any) -> None: ...

    def misconfigured(self, error: Any) -> None:
        return None

    def close(self) -> None: ...


class Kafka:
    """Stands in for the broker and the transactional producer: keeps committed
    transactions only. ``fail`` picks the transaction to fail (once): after it landed
    (``landed``: a commit that timed out but succeeded) or before."""

    def __init__(self, fail: Callable[[Sequence[OutRecord]], bool], landed: bool) -> None:
        self.fail = fail
        self.landed = landed
        self.failed: list[Sequence[OutRecord]] = []
        self.transactions: list[Sequence[OutRecord]] = []
        self.state_reads = 0
        self._lock = threading.Lock()

    # Transactions
    def commit(self, batch: Sequence[OutRecord]) -> None:
        time.sleep(ROUND_TRIP_S)  # a broker takes a while: polls finishing meanwhile queue
        with self._lock:
            if not self.failed and self.fail(batch):
                self.failed.append(batch)
                if self.landed:
                    self.transactions.append(list(batch))
                raise RetriableError("Kafka did not confirm a transaction (injected)")
            self.transactions.append(list(batch))

    def start(self) -> None: ...

    def partitions(self, topic: str) -> list[int]:
        return [0]

    # read_state
    def read_state(self, settings: Any, topic: str, timeout_s: float = 30.0) -> dict[bytes, bytes]:
        with self._lock:
            self.state_reads += 1
            return {
                r.key: r.value
                for batch in self.transactions
                for r in batch
                if r.topic == topic and r.key is not None and r.value is not None
            }

    def rows(self) -> list[tuple[str, int]]:
        with self._lock:
            return [
                (data["stream"], data["id"])
                for batch in self.transactions
                for r in batch
                if r.topic.startswith(POLLED)
                for data in [json.loads(r.value or b"")["data"]]
            ]


def streams_in(batch: Sequence[OutRecord]) -> set[str]:
    return {r.topic.removeprefix(POLLED) for r in batch if r.topic.startswith(POLLED)}


def run_poller(
    kafka: Kafka,
    exchange: Exchange,
    until: Callable[[], bool],
    monkeypatch: pytest.MonkeyPatch,
) -> PollingSource:
    monkeypatch.setattr(polling, "read_state", kafka.read_state)
    monkeypatch.setattr(polling, "ensure_topics", lambda *args: None)
    source = PollingSource(exchange)

    async def main() -> None:
        ctx = RuntimeContext(
            "toy",
            Metrics(),
            HealthState(),
            asyncio.Event(),
            KafkaSettings(),
            None,
            kafka,  # type: ignore[arg-type]
        )
        task = asyncio.create_task(source.run(ctx))
        try:
            while not until():
                assert not task.done(), task.result()
                await asyncio.sleep(0.01)
        finally:
            ctx.stop.set()
            await asyncio.wait_for(task, T(10))

    asyncio.run(asyncio.wait_for(main(), T(30)))
    return source


@pytest.mark.parametrize("landed", [True, False], ids=["failed-after-landing", "failed"])
def test_polls_of_several_streams_fail_together_and_land_exactly_once(
    landed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["s1", "s2", "s3"]
    kafka = Kafka(lambda batch: len(streams_in(batch)) >= 2, landed)
    exchange = Exchange(names)

    def enough() -> bool:
        # Well past the failure, every stream has polled on and committed.
        return bool(kafka.failed) and min(exchange.made.values()) >= 40

    source = run_poller(kafka, exchange, enough, monkeypatch)
    rows = kafka.rows()
    # Every row the exchange served, once: none lost (failed), none twice (landed).
    assert sorted(rows) == sorted(
        (name, i) for name in names for i in range(1, max(i for n, i in rows if n == name) + 1)
    )
    assert len(rows) == len(set(rows))
    # The failed transaction held polls of several streams, and all of them re-read
    # state together: the start, and one re-read for the one failure.
    assert len(streams_in(kafka.failed[0])) >= 2
    assert kafka.state_reads == 2
    # Polls shared transactions (each commit holds its polls' records and cursors).
    committed = source._committer
    assert committed.polls > committed.groups
    for batch in kafka.transactions:
        cursors = {r.key for r in batch if r.topic == "toy.state" and r.key != b"epoch"}
        assert cursors == {f"cursor/{name}".encode() for name in streams_in(batch)}


def test_a_failed_state_reread_keeps_every_stream_from_polling_until_one_succeeds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = ["s1", "s2"]
    kafka = Kafka(lambda batch: len(streams_in(batch)) >= 1, landed=True)
    exchange = Exchange(names)
    real_read = kafka.read_state
    refused: list[int] = []

    def flaky_read(settings: Any, topic: str, timeout_s: float = 30.0) -> dict[bytes, bytes]:
        if kafka.failed and len(refused) < 3:  # the first three re-reads fail
            refused.append(sum(exchange.made.values()))
            raise RetriableError("Kafka not reachable (injected)")
        return real_read(settings, topic, timeout_s)

    monkeypatch.setattr(kafka, "read_state", flaky_read)
    run_poller(
        kafka,
        exchange,
        lambda: len(refused) == 3 and min(exchange.made.values()) >= 20,
        monkeypatch,
    )
    # No request went out between the failure and the first successful re-read: state
    # that may be behind Kafka is never polled on.
    assert len(set(refused)) == 1
    rows = kafka.rows()
    assert len(rows) == len(set(rows))  # the landed transaction was re-read: no duplicate
