"""The guarded request path and the auth-guard reset watcher, for every connector that
signs requests (the polling runtime's stream tasks; an order sink's worker thread).

One exchange call, in this order::

    guard reservation ─ until a signed request succeeded in this process: re-read every
      │                 writer's count, refuse at the limit, else commit +1 (Kafka)
    rate-limit slot   ─ the request's class; its window lasts until after the answer
      │
    the call          ─ the exchange's client classifies the answer: a value, or
      │                 AuthError / RetriableError / RejectedError
    guard record      ─ success proves the credentials; AuthError counts (and stops
                        this process's signed calls); anything else takes the
                        reservation back. Metrics follow.

Unsigned calls (no credentials in them) only take the rate-limit slot.
:class:`GuardedCalls` has two front-ends over the same steps: :meth:`GuardedCalls.call`
for asyncio code (signed calls one at a time: if the key is revoked, exactly one request
learns it, and none is on its way behind it) and :meth:`GuardedCalls.call_blocking` for
a connector that runs in one worker thread.

:class:`ResetWatcher`: while the guard refuses, re-read the guard topic every
``recheck_s`` to notice an operator reset (``exchange-connectors auth-guard reset``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from connectors.runtime.authguard import (
    AuthGuard,
    GuardRefused,
    GuardSpec,
    publish,
    reopen_if_reset,
    report_blocked,
)
from connectors.runtime.context import RuntimeContext
from connectors.runtime.errors import AuthError, RejectedError, RetriableError
from connectors.runtime.metrics import Metrics
from connectors.runtime.ratelimit import RateLimiter, Turn
from connectors.runtime.state import read_state

log = logging.getLogger(__name__)
T = TypeVar("T")

#: What an exchange call raises when it has an answer (or none at all): the guard
#: records these. Anything else (a bug, a missing credential) propagates unrecorded,
#: and a reservation it leaves counts, as a crash's would.
ANSWER_ERRORS = (AuthError, RetriableError, RejectedError)


def guard_reader(
    ctx: RuntimeContext, spec: GuardSpec
) -> Callable[[], Mapping[bytes, bytes | None]]:
    """Blocking: reads the guard topic to its end (committed records only)."""
    return functools.partial(read_state, ctx.kafka, spec.topic)


def open_guard(
    ctx: RuntimeContext, spec: GuardSpec, writer: str, now_ms: Callable[[], int]
) -> AuthGuard:
    """Blocking: the guard of ``spec``'s credentials as Kafka holds it; ``writer`` is this
    process's transactional id (its own record), changes are committed through
    ``ctx.transactions``."""
    read = guard_reader(ctx, spec)
    return AuthGuard(spec, writer, read(), read, ctx.transactions.commit, now_ms)


def _answered(call: Callable[[], T], turn: Turn) -> T:
    """``call()`` in its worker thread; its rate-limit window starts as soon as it
    returns or raises (the answer is in: no need to wait for the event loop)."""
    try:
        return call()
    finally:
        turn.answered()


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """How one call of :meth:`GuardedCalls.call` ended.

    ``value``: the answer. ``error``: what the exchange call raised, already recorded
    by the guard (a transient failure or a refusal of this request). ``refused``:
    nothing was sent (the guard refuses), or the credentials were refused (recorded,
    reported; no more signed calls until an operator reset). ``sent_at``: when the rate
    limiter let the request go (event-loop time; None when nothing was sent).
    """

    value: T | None = None
    error: RetriableError | RejectedError | None = None
    refused: bool = False
    sent_at: float | None = field(default=None, compare=False)


class GuardedCalls:
    """Exchange calls through the rate limiter and, when signed, the auth guard.

    ``guard`` may be None (no credentials: only unsigned calls) and may be set later
    (it is read from Kafka once the connector runs). ``note`` ends the log line that
    explains a refusal (e.g. "Commands wait in Kafka.").
    """

    def __init__(
        self, guard: AuthGuard | None, metrics: Metrics, connector: str, note: str = ""
    ) -> None:
        self.guard = guard
        self.metrics = metrics
        self.connector = connector
        self.note = note
        self._signed = asyncio.Lock()

    @property
    def blocked(self) -> bool:
        return self.guard is not None and self.guard.blocked

    # -- the steps (blocking: call from a worker thread) -------------------------------

    def admit(self, guard: AuthGuard) -> None:
        """Before a signed request: reserve, or raise :class:`GuardRefused` (reported)."""
        try:
            guard.before_request()
        except GuardRefused:
            # Another process with these credentials spent the budget.
            report_blocked(guard, self.metrics, self.connector, self.note)
            raise

    def record(self, guard: AuthGuard, error: BaseException | None) -> None:
        """After a signed request: what its answer said about the credentials."""
        # Any answer that is not an auth failure (even a malformed body) proves the
        # credentials were accepted.
        guard.settle(error)
        publish(guard, self.metrics, self.connector)
        if isinstance(error, AuthError) and not isinstance(error, GuardRefused):
            self.metrics.auth_failures.labels(self.connector).inc()
            report_blocked(guard, self.metrics, self.connector, self.note)

    # -- asyncio -----------------------------------------------------------------------

    async def call(
        self, limiter: RateLimiter, call: Callable[[], T], *, signed: bool
    ) -> Outcome[T]:
        """One call (``call`` runs in a worker thread). Exchange failures come back in
        the :class:`Outcome`; what raises is the guard's own Kafka work
        (RetriableError: its transaction failed) and, for an unsigned call, AuthError
        (a public request refused: a configuration matter)."""
        guard = self.guard
        loop = asyncio.get_running_loop()
        if not signed or guard is None:
            async with limiter.slot() as turn:
                sent_at = loop.time()
                try:
                    answer = await asyncio.to_thread(_answered, call, turn)
                except (RetriableError, RejectedError) as exc:
                    return Outcome(error=exc, sent_at=sent_at)
                return Outcome(answer, sent_at=sent_at)
        async with self._signed:
            if guard.blocked:
                return Outcome(refused=True)
            try:
                await asyncio.to_thread(self.admit, guard)
            except GuardRefused:
                return Outcome(refused=True)
            value: T | None = None
            error: Exception | None = None
            async with limiter.slot() as turn:
                sent_at = loop.time()
                try:
                    value = await asyncio.to_thread(_answered, call, turn)
                except ANSWER_ERRORS as exc:
                    error = exc
            await asyncio.to_thread(self.record, guard, error)
            if isinstance(error, AuthError):
                return Outcome(refused=True, sent_at=sent_at)
            if isinstance(error, RetriableError | RejectedError):
                return Outcome(error=error, sent_at=sent_at)
            return Outcome(value, sent_at=sent_at)

    # -- blocking ----------------------------------------------------------------------

    def call_blocking(
        self,
        limiter: RateLimiter,
        call: Callable[[], T],
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """One signed call from a worker thread (one thread: calls are serial anyway).

        Raises :class:`GuardRefused` when the guard refuses (nothing sent; reported);
        otherwise whatever ``call`` raised, after the guard recorded it (an AuthError
        also counted in ``connector_auth_failures_total`` and reported).
        """
        guard = self.guard
        if guard is None:
            with limiter.slot_blocking(sleep):
                return call()
        self.admit(guard)
        try:
            with limiter.slot_blocking(sleep):
                value = call()
        except ANSWER_ERRORS as exc:
            self.record(guard, exc)
            raise
        self.record(guard, None)
        return value


class ResetWatcher:
    """While the guard refuses, look for an operator reset in Kafka."""

    def __init__(
        self,
        guard: AuthGuard,
        read: Callable[[], Mapping[bytes, bytes | None]],
        metrics: Metrics,
        connector: str,
        recheck_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.guard = guard
        self._read = read
        self.metrics = metrics
        self.connector = connector
        self.recheck_s = recheck_s
        self._monotonic = monotonic
        self._last_look: float | None = None

    def look(self) -> bool:
        """Blocking: re-read the guard topic if the guard refuses; True when an operator
        reset reopened it."""
        if not self.guard.blocked:
            return False
        try:
            state = self._read()
        except RetriableError as exc:
            log.warning("cannot re-read the auth guard: %s", exc)
            return False
        return reopen_if_reset(self.guard, state, self.metrics, self.connector)

    def look_if_due(self) -> bool:
        """Blocking, for a loop that calls it often: :meth:`look` at most once per
        ``recheck_s`` (the first call looks at once)."""
        now = self._monotonic()
        if self._last_look is not None and now - self._last_look < self.recheck_s:
            return False
        self._last_look = now
        return self.look()

    async def run(self, reopened: asyncio.Event) -> None:
        """Every ``recheck_s``, while the guard refuses: look; set ``reopened`` on a reset."""
        while True:
            await asyncio.sleep(self.recheck_s)
            if self.guard.blocked and await asyncio.to_thread(self.look):
                reopened.set()
