"""Client-side rate limiting that stays inside an exchange's documented limits.

An exchange publishes limits such as "at most 1 request per 100 ms" per account. Two
ways to stay inside one, chosen per endpoint class:

* **Sliding window** (the budget belongs to one process): a request starts only when
  fewer than ``count`` requests started in the last ``window_s * (1 + margin)``.
* **Time slots** (the budget is shared by several processes on one account, e.g. a
  poller and an order sink): wall-clock time is cut into slots of
  ``window_s * (1 + margin)``; slot ``k`` belongs to participant ``k mod slots``, which
  may start at most ``count`` requests, and only in the first half of the slot's
  margin. Two participants therefore start requests at least
  ``window_s * (1 + margin / 2)`` apart without talking to each other; the rest of the
  margin absorbs network jitter and clock skew between hosts (keep them NTP-synced).
  Plain rate shares (each side at half the rate) would not do: both could fire within
  the same window.

The exchange measures *arrival* times, and a request may arrive any time between our
start and our reading its answer (thread scheduling, GIL, network). So a request made
through :meth:`RateLimiter.slot` (sliding window) occupies the window from its start
until ``window`` after its *completion*: a request still in flight counts as inside
every window. Whatever the delays, two arrivals can then never share a window
beyond ``count``: the later request started only after the earlier one's answer came
back, and that answer left the exchange after its arrival. The margin only covers
rounding of the exchange's own clock there. The window starts when the answer is in
hand: :meth:`Turn.answered`, called by the thread that read it, or else when the
``slot`` block ends. Time slots are shared between processes
that cannot see each other's completions, so there the margin absorbs the jitter.
Every wait is reported through ``on_wait`` (metrics) with the seconds waited.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from connectors.runtime.errors import ConfigError


@dataclass(frozen=True)
class RateLimit:
    """At most ``count`` requests in any window of ``window_s`` seconds (the exchange's rule)."""

    count: int
    window_s: float

    def __post_init__(self) -> None:
        if self.count < 1 or self.window_s <= 0:
            raise ConfigError(f"invalid rate limit {self.count} per {self.window_s}s")


@dataclass(frozen=True)
class Share:
    """This process uses slot ``slot`` of every ``slots`` consecutive time slots."""

    slots: int = 1
    slot: int = 0

    def __post_init__(self) -> None:
        if self.slots < 1 or not 0 <= self.slot < self.slots:
            raise ConfigError(
                f"rate share: slot must be in 0..{self.slots - 1} (got slot {self.slot} "
                f"of {self.slots})"
            )


#: How often a full window of in-flight requests is re-checked.
_IN_FLIGHT_POLL_S = 0.001


class Turn:
    """One request's place in a sliding window (what :meth:`RateLimiter.slot` yields).

    ``waited``: the seconds it waited for its turn. :meth:`answered` (from any thread)
    says its answer is in: its window starts then, not when the ``slot`` block exits.
    """

    __slots__ = ("_id", "_limiter", "waited")

    def __init__(self, limiter: RateLimiter, request_id: int, waited: float) -> None:
        self._limiter = limiter
        self._id = request_id
        self.waited = waited

    def answered(self) -> None:
        self._limiter._done(self._id)


class RateLimiter:
    """Wrap every request of one endpoint class in :meth:`slot` (or :meth:`slot_blocking`)."""

    def __init__(
        self,
        limit: RateLimit,
        *,
        margin: float = 0.2,
        share: Share = Share(),
        on_wait: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not 0.0 <= margin <= 1.0:
            raise ConfigError(f"rate limit margin must be between 0 and 1 (got {margin})")
        self.limit = limit
        self.margin = margin
        self.share = share
        self._on_wait = on_wait
        self._clock = clock
        self._sleep = sleep
        self._period = limit.window_s * (1.0 + margin)
        #: Sliding window: request id -> the time its window starts (inf: in flight).
        self._anchors: dict[int, float] = {}
        self._ids = itertools.count()
        self._slot_index = -1
        self._slot_used = 0
        self._lock = asyncio.Lock()
        self._thread_lock = threading.Lock()
        #: Guards ``_anchors``: a request's answer may be stamped from a worker thread.
        self._anchor_lock = threading.Lock()

    @property
    def requests_per_second(self) -> float:
        """The most this limiter lets through, on average."""
        return self.limit.count / self._period / self.share.slots

    def delay(self, now: float) -> float:
        """Seconds to wait before a request may start at ``now`` (0 = go). Pure."""
        if self.share.slots == 1:
            cutoff = now - self._period
            with self._anchor_lock:
                anchors = list(self._anchors.values())
            busy = sorted(a for a in anchors if a > cutoff)
            excess = len(busy) - self.limit.count
            if excess < 0:
                return 0.0
            if math.isinf(busy[excess]):
                return _IN_FLIGHT_POLL_S  # the window is full of requests still in flight
            return busy[excess] + self._period - now
        index = math.floor(now / self._period)
        offset = now - index * self._period
        start_window = self.limit.window_s * self.margin / 2
        mine = index % self.share.slots == self.share.slot
        fresh = index != self._slot_index or self._slot_used < self.limit.count
        if mine and offset <= start_window and fresh:
            return 0.0
        # The next slot that is ours and not used up.
        ahead = (self.share.slot - index) % self.share.slots
        if ahead == 0:
            ahead = self.share.slots
        return (index + ahead) * self._period - now

    def _record(self, now: float) -> int:
        if self.share.slots == 1:
            cutoff = now - self._period
            request_id = next(self._ids)
            with self._anchor_lock:
                for old in [k for k, a in self._anchors.items() if a <= cutoff]:
                    del self._anchors[old]
                self._anchors[request_id] = math.inf  # in flight until _done
            return request_id
        index = math.floor(now / self._period)
        if index != self._slot_index:
            self._slot_index, self._slot_used = index, 0
        self._slot_used += 1
        return -1

    def _done(self, request_id: int) -> None:
        """The request's answer is in (or it failed): its window starts now (the first
        call counts; any thread)."""
        now = self._clock()
        with self._anchor_lock:
            if self._anchors.get(request_id) == math.inf:
                self._anchors[request_id] = now

    async def _wait_turn(self) -> tuple[int, float]:
        waited = 0.0
        async with self._lock:
            while True:
                now = self._clock()
                pause = self.delay(now)
                if pause <= 0.0:
                    request_id = self._record(now)
                    break
                # Land a hair inside the slot rather than on its edge.
                pause += 0.0005
                waited += pause
                await self._sleep(pause)
        if waited > 0.0 and self._on_wait is not None:
            self._on_wait(waited)
        return request_id, waited

    def _wait_turn_blocking(self, sleep: Callable[[float], None]) -> tuple[int, float]:
        waited = 0.0
        with self._thread_lock:
            while True:
                now = self._clock()
                pause = self.delay(now)
                if pause <= 0.0:
                    request_id = self._record(now)
                    break
                pause += 0.0005
                waited += pause
                sleep(pause)
        if waited > 0.0 and self._on_wait is not None:
            self._on_wait(waited)
        return request_id, waited

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Turn]:
        """``async with limiter.slot() as turn: <one request>`` — waits for a turn; the
        request's window starts at ``turn.answered()`` or, at the latest, when the
        block exits."""
        request_id, waited = await self._wait_turn()
        try:
            yield Turn(self, request_id, waited)
        finally:
            self._done(request_id)

    @contextlib.contextmanager
    def slot_blocking(self, sleep: Callable[[float], None] = time.sleep) -> Iterator[float]:
        """:meth:`slot` for code that runs in a worker thread."""
        request_id, waited = self._wait_turn_blocking(sleep)
        try:
            yield waited
        finally:
            self._done(request_id)
