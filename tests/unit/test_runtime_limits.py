"""Rate limiter and auth guard: pure behaviour with an injected clock."""

from __future__ import annotations

import asyncio
import heapq
import threading
from collections.abc import Coroutine, Sequence
from itertools import pairwise
from typing import Any

import pytest

from connectors.runtime.authguard import (
    AuthGuard,
    GuardRefused,
    GuardSpec,
    fingerprint,
    reset_records,
    view_of,
)
from connectors.runtime.errors import ConfigError
from connectors.runtime.ratelimit import RateLimit, RateLimiter, Share
from connectors.runtime.records import OutRecord


class FakeTime:
    """A clock that only moves when the limiter sleeps."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


class VirtualTime(FakeTime):
    """Sleepers wake in time order; the clock jumps to the next wake-up when all sleep
    (so concurrent sleeps overlap, as in real time)."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, id(future), future))
        await future

    async def run(self, *work: Coroutine[Any, Any, None]) -> None:
        tasks = [asyncio.ensure_future(w) for w in work]
        while not all(t.done() for t in tasks):
            for _ in range(10):
                await asyncio.sleep(0)
            if self._sleepers:
                wake, _, future = heapq.heappop(self._sleepers)
                self.now = max(self.now, wake)
                future.set_result(None)
        for t in tasks:
            t.result()


def starts(limiter: RateLimiter, clock: FakeTime, n: int) -> list[float]:
    async def go() -> list[float]:
        out = []
        for _ in range(n):
            async with limiter.slot():  # an instant request: the clock does not move
                out.append(clock.now)
        return out

    return asyncio.run(go())


def max_in_window(times: Sequence[float], window: float) -> int:
    return max(sum(1 for u in times if t <= u < t + window) for t in times)


def test_sliding_window_never_exceeds_the_limit_even_with_margin_zero() -> None:
    clock = FakeTime()
    limiter = RateLimiter(RateLimit(10, 0.1), margin=0.0, clock=clock, sleep=clock.sleep)
    times = starts(limiter, clock, 95)
    assert max_in_window(times, 0.1) == 10
    # ... and it is not slower than it must be: 95 requests in about 0.9 s.
    assert times[-1] - times[0] == pytest.approx(0.9, abs=0.01)


def test_margin_widens_the_window() -> None:
    clock = FakeTime()
    limiter = RateLimiter(RateLimit(1, 0.1), margin=0.2, clock=clock, sleep=clock.sleep)
    times = starts(limiter, clock, 20)
    gaps = [b - a for a, b in pairwise(times)]
    assert min(gaps) >= 0.12 - 1e-9
    assert limiter.requests_per_second == pytest.approx(1 / 0.12)


def test_a_window_starts_at_the_answer_so_a_late_arrival_cannot_collide() -> None:
    # The exchange times arrivals, which may be anywhere between our start and the
    # answer: the next request may start only a full window after the answer.
    clock = FakeTime()
    limiter = RateLimiter(RateLimit(1, 0.1), margin=0.0, clock=clock, sleep=clock.sleep)

    async def go() -> list[tuple[float, float]]:
        spans = []
        for _ in range(6):
            async with limiter.slot():
                began = clock.now
                clock.now += 0.07  # 70 ms on the way and at the exchange
            spans.append((began, clock.now))
        return spans

    spans = asyncio.run(go())
    for (_, answered), (began, _) in pairwise(spans):
        assert began - answered >= 0.1 - 1e-9


def test_a_window_starts_when_the_answer_is_in_hand_not_when_the_caller_resumes() -> None:
    # The worker thread that read the answer stamps it; the event loop may resume the
    # caller later. The next request waits a full window from the answer — no less
    # (the rule), and no more (the budget is not wasted on the caller's delay).
    clock = FakeTime()
    limiter = RateLimiter(RateLimit(1, 0.1), margin=0.0, clock=clock, sleep=clock.sleep)

    async def go() -> list[tuple[float, float]]:
        spans = []
        for _ in range(6):
            async with limiter.slot() as turn:
                began = clock.now
                clock.now += 0.03  # the request and its answer
                answered = clock.now
                stamp = threading.Thread(target=turn.answered)
                stamp.start()
                stamp.join()
                clock.now += 0.02  # the caller resumes later
                turn.answered()  # a second stamp does not move the window
            spans.append((began, answered))
        return spans

    spans = asyncio.run(go())
    for (_, answered), (began, _) in pairwise(spans):
        assert began - answered == pytest.approx(0.1 + 0.0005, abs=1e-6)


def test_requests_in_flight_fill_the_window_whatever_their_arrival() -> None:
    clock = VirtualTime(1_000_000.0)
    limiter = RateLimiter(RateLimit(3, 0.1), margin=0.0, clock=clock, sleep=clock.sleep)
    spans: list[tuple[float, float]] = []

    async def caller(duration: float) -> None:
        for _ in range(8):
            async with limiter.slot():
                began = clock.now
                await clock.sleep(duration)
            spans.append((began, clock.now))

    asyncio.run(clock.run(*(caller(d) for d in (0.01, 0.05, 0.13, 0.02, 0.2))))
    assert len(spans) == 40
    # Worst cases for the exchange's count: every request arriving at its start, or at
    # its answer. Either way no window of 100 ms holds more than 3 arrivals.
    assert max_in_window([b for b, _ in spans], 0.1) <= 3
    assert max_in_window([e for _, e in spans], 0.1) <= 3


def test_waits_are_reported() -> None:
    clock = FakeTime()
    waits: list[float] = []
    limiter = RateLimiter(
        RateLimit(1, 0.1), margin=0.2, on_wait=waits.append, clock=clock, sleep=clock.sleep
    )
    starts(limiter, clock, 5)
    assert len(waits) == 4  # the first request goes at once
    assert all(w == pytest.approx(0.12, abs=0.001) for w in waits)


def test_two_sharing_processes_never_start_within_one_window() -> None:
    """Poller and sink on one account: separate limiters, same wall clock."""
    clock = VirtualTime(start=1_000_000.037)
    a = RateLimiter(
        RateLimit(1, 0.1), margin=0.2, share=Share(2, 0), clock=clock, sleep=clock.sleep
    )
    b = RateLimiter(
        RateLimit(1, 0.1), margin=0.2, share=Share(2, 1), clock=clock, sleep=clock.sleep
    )
    times: list[tuple[float, str]] = []

    async def run(limiter: RateLimiter, name: str) -> None:
        for _ in range(30):
            async with limiter.slot():
                times.append((clock.now, name))

    async def both() -> None:
        await clock.run(run(a, "a"), run(b, "b"))

    asyncio.run(both())
    stamps = sorted(t for t, _ in times)
    gaps = [y - x for x, y in pairwise(stamps)]
    assert min(gaps) >= 0.1 + 0.01 - 1e-9  # window plus half the margin
    assert {n for _, n in times} == {"a", "b"}
    # Each got its half of the budget: 30 requests in about 30 slot pairs.
    assert stamps[-1] - stamps[0] < 30 * 2 * 0.12 + 0.25


def test_invalid_shares_and_limits_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        Share(2, 2)
    with pytest.raises(ConfigError):
        RateLimit(0, 0.1)
    with pytest.raises(ConfigError):
        RateLimiter(RateLimit(1, 0.1), margin=2.0)


# -- auth guard --------------------------------------------------------------------------

SPEC = GuardSpec("guard-topic", fingerprint("test", "key", "id", "private"), limit=2)


class Store:
    """Stands in for the Kafka topic: what the guards committed, by key."""

    def __init__(self) -> None:
        self.records: list[OutRecord] = []

    def commit(self, batch: Sequence[OutRecord]) -> None:
        self.records.extend(batch)

    def state(self) -> dict[bytes, bytes | None]:
        return {r.key: r.value for r in self.records if r.key is not None}

    def failures(self) -> int:
        return view_of(self.state(), SPEC).failures


def guard_from(
    store: Store, writer: str = "poller", now: int = 1, spec: GuardSpec = SPEC
) -> AuthGuard:
    return AuthGuard(spec, writer, store.state(), store.state, store.commit, lambda: now)


def test_fingerprints_are_stable_and_do_not_contain_the_credentials() -> None:
    one = fingerprint("robicoin", "pub", "42", "very-secret-private-key")
    assert one == fingerprint("robicoin", "pub", "42", "very-secret-private-key")
    assert one != fingerprint("robicoin", "pub", "42", "other-private-key")
    assert one != fingerprint("robicoin", "pu", "b42", "very-secret-private-key")
    assert "secret" not in one and len(one) == 16


def test_the_count_is_committed_before_the_first_request() -> None:
    store = Store()
    guard = guard_from(store)
    guard.before_request()
    # A crash right now (after the request left) still counts as one failure.
    assert store.failures() == 1
    guard.succeeded()
    assert store.failures() == 0
    guard.before_request()  # verified: nothing more to write
    assert len(store.records) == 2


def test_crash_loop_with_bad_credentials_stops_at_the_limit() -> None:
    store = Store()
    attempts = 0
    for _restart in range(6):
        guard = guard_from(store)
        if guard.blocked:
            continue
        guard.before_request()
        attempts += 1
        guard.unauthorized("HTTP 401")
    assert attempts == SPEC.limit
    assert store.failures() == SPEC.limit


def test_crashes_before_any_answer_also_use_the_budget() -> None:
    store = Store()
    for _restart in range(5):
        guard = guard_from(store)
        if not guard.blocked:
            guard.before_request()  # ... and the process dies before the answer
    assert guard_from(store).blocked


def test_answers_without_a_verdict_give_the_count_back() -> None:
    store = Store()
    for _ in range(5):
        guard = guard_from(store)
        guard.before_request()
        guard.inconclusive()  # 503 / network error: says nothing about the credentials
    assert store.failures() == 0
    assert not guard_from(store).blocked


def test_a_failure_after_success_is_counted_and_stops_this_process() -> None:
    store = Store()
    guard = guard_from(store)
    guard.before_request()
    guard.succeeded()
    guard.unauthorized("HTTP 401 (key revoked)")
    assert guard.blocked
    assert store.failures() == 1
    with pytest.raises(GuardRefused):
        guard.before_request()


def test_a_success_does_not_forget_earlier_failures() -> None:
    """The exchange's own count does not forget them either (spec: 10 unauthorized
    attempts block the IP); only an operator reset does."""
    store = Store()
    guard = guard_from(store)
    guard.before_request()
    guard.unauthorized("HTTP 401")
    again = guard_from(store)
    again.before_request()
    again.succeeded()
    assert store.failures() == 1
    assert guard_from(store, writer="sink").view.failures == 1


def test_an_operator_reset_reopens_the_guard() -> None:
    store = Store()
    for _ in range(2):
        guard = guard_from(store)
        guard.before_request()
        guard.unauthorized("HTTP 401")
    assert guard.blocked
    store.commit(reset_records(SPEC, view_of(store.state(), SPEC), now_ms=5))
    guard.refresh()
    assert not guard.blocked
    assert not guard_from(store).blocked
    assert store.failures() == 0


def test_an_unreadable_guard_record_is_treated_as_tripped() -> None:
    store = Store()
    store.commit([OutRecord(SPEC.topic, b"not json", SPEC.writer_key("x"))])
    assert guard_from(store).blocked
    legacy = Store()
    legacy.commit([OutRecord(SPEC.topic, b"{", SPEC.head_key)])
    assert guard_from(legacy).blocked


def test_a_count_written_by_an_earlier_version_still_counts() -> None:
    store = Store()
    old = b'{"failures":2,"state":"failed","updated_ms":1,"detail":"HTTP 401"}'
    store.commit([OutRecord(SPEC.topic, old, SPEC.head_key)])
    assert guard_from(store).blocked
    store.commit(reset_records(SPEC, view_of(store.state(), SPEC), now_ms=5))
    assert not guard_from(store).blocked


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 5])
def test_a_sink_with_a_stale_view_cannot_lower_the_shared_count(limit: int) -> None:
    """Issue 12 §9: an idle sink read the count at start; the poller then crash-looped
    until the guard refused; a command reached the sink; the poller restarted again.
    Every request here is unauthorized (wrong credentials)."""
    spec = GuardSpec(SPEC.topic, SPEC.fingerprint, limit)
    store = Store()
    sent = 0

    def attempt(guard: AuthGuard) -> None:
        nonlocal sent
        try:
            guard.before_request()
        except GuardRefused:
            return
        sent += 1
        guard.unauthorized("HTTP 401")

    sink = guard_from(store, "sink", spec=spec)  # started idle: its view is old now
    for _restart in range(limit + 3):
        poller = guard_from(store, "poller", spec=spec)
        if not poller.blocked:
            attempt(poller)
    attempt(sink)
    for _restart in range(3):
        attempt(guard_from(store, "poller", spec=spec))
        attempt(guard_from(store, "sink", spec=spec))
    assert sent == limit
    assert view_of(store.state(), spec).failures == limit


def test_two_processes_reserving_at_once_never_both_spend_the_last_request() -> None:
    """Both read the count (limit - 1) before either reserves, and both reserve before
    either reads again: at most one may send, since the two do not both fit."""
    store = Store()
    first = guard_from(store, "poller")
    first.before_request()
    first.unauthorized("HTTP 401")  # count 1 of 2
    lock = threading.Lock()
    read_together = threading.Barrier(2, timeout=10)
    reserved_together = threading.Barrier(2, timeout=10)

    def make(writer: str) -> AuthGuard:
        reads = 0
        commits = 0

        def read() -> dict[bytes, bytes | None]:
            nonlocal reads
            reads += 1
            with lock:
                state = store.state()
            if reads == 1:
                read_together.wait()
            return state

        def commit(batch: Sequence[OutRecord]) -> None:
            nonlocal commits
            commits += 1
            with lock:
                store.commit(batch)
            if commits == 1:
                reserved_together.wait()

        return AuthGuard(SPEC, writer, store.state(), read, commit, lambda: 2)

    sent: list[str] = []

    def attempt(guard: AuthGuard) -> None:
        try:
            guard.before_request()
        except GuardRefused:
            return
        sent.append(guard.writer)

    guards = [make("poller-2"), make("sink")]
    threads = [threading.Thread(target=attempt, args=(g,)) for g in guards]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(sent) <= 1
    # The one that refused took its reservation back; a sender's is still counted.
    assert store.failures() == 1 + len(sent) <= SPEC.limit
