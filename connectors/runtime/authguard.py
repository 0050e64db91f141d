"""A persistent budget of authentication failures per credential set.

Some exchanges block the caller's IP after a handful of unauthorized requests. A
crash-looping pod with a revoked key would spend that budget one restart at a time,
and two connectors with the same key (the poller and the order sink) spend it
together, so the count lives in Kafka (a compacted topic), keyed by a one-way
fingerprint of the credentials: never the credentials themselves.

Each process writes only its own record (key ``<fingerprint>/<writer>``, the writer
being its transactional id, which Kafka fences to one live instance), so no write can
lose another process's count. The guard's count is the sum over every writer of:

* ``failures``: unauthorized answers; they only grow until an operator reset;
* ``unverified``: signed requests whose answer was never seen (a crash mid-request).
  Counted as failures until the same writer gets a successful answer, which proves
  the credentials and clears them.

Before a signed request in a process that has not yet seen one succeed, the guard
re-reads every writer's record, refuses at ``limit``, else commits ``unverified + 1``
and reads again: if a concurrent reservation pushed the sum over the limit it takes
its own back and refuses. Of two processes reserving at once, the later reader sees
both reservations, so at most ``limit`` such requests can ever be unauthorized. An
answer that says nothing about the credentials (network error, 5xx, 429) takes the
reservation back; a success clears it; a 401/403 turns it into a failure and this
process stops calling until an operator reset.

A process whose credentials were already accepted sends without reserving: if the key
is revoked while it runs, its one in-flight request learns it and is counted.

An operator reset (``exchange-connectors auth-guard reset``) writes a new generation
under the bare fingerprint key and deletes the writers' records; only records of the
current generation count. Records written by versions that kept a single record under
the bare fingerprint (``{"failures": 1, "state": "failed", ...}``) still count.

Values are JSON: ``{"generation": 0, "failures": 1, "unverified": 0, "updated_ms": ...,
"detail": "HTTP 401 Unauthorized"}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from connectors.runtime.errors import AuthError, RetriableError
from connectors.runtime.metrics import Metrics
from connectors.runtime.records import OutRecord

log = logging.getLogger(__name__)

#: What an unreadable record counts as: assume the worst rather than grant a budget.
UNREADABLE = 1_000_000


def fingerprint(namespace: str, *parts: str) -> str:
    """A one-way, stable name for a credential set (not reversible, safe to log)."""
    digest = hashlib.sha256()
    digest.update(f"exchange-connectors/auth-guard/v1/{namespace}".encode())
    for part in parts:
        digest.update(b"\0" + part.encode("utf-8"))
    return digest.hexdigest()[:16]


class GuardRefused(AuthError):
    """The guard refuses to send a signed request (no request was made)."""


@dataclass(frozen=True)
class WriterEntry:
    """One process's own record: what its requests cost in one generation."""

    generation: int = 0
    failures: int = 0
    unverified: int = 0
    updated_ms: int = 0
    detail: str = ""

    @property
    def counted(self) -> int:
        return self.failures + self.unverified

    def to_bytes(self) -> bytes:
        return _dumps(
            {
                "generation": self.generation,
                "failures": self.failures,
                "unverified": self.unverified,
                "updated_ms": self.updated_ms,
                "detail": self.detail,
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes, generation: int) -> WriterEntry:
        try:
            value = json.loads(raw)
            return cls(
                generation=int(value["generation"]),
                failures=max(0, int(value["failures"])),
                unverified=max(0, int(value.get("unverified", 0))),
                updated_ms=int(value.get("updated_ms", 0) or 0),
                detail=str(value.get("detail", ""))[:200],
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(generation, UNREADABLE, 0, 0, "unreadable guard record")


@dataclass(frozen=True)
class GuardView:
    """Every record of one credential set, as read from Kafka."""

    generation: int = 0
    #: Failures kept by an older version in the bare fingerprint's record.
    legacy: int = 0
    #: Writers' records of this generation (older generations no longer count).
    writers: Mapping[str, WriterEntry] = field(default_factory=dict)
    reset_ms: int = 0
    reset_detail: str = ""

    @property
    def failures(self) -> int:
        """What counts against the limit: failures plus unanswered requests."""
        return self.legacy + sum(w.counted for w in self.writers.values())

    @property
    def detail(self) -> str:
        latest = max(self.writers.values(), key=lambda w: w.updated_ms, default=None)
        if latest is not None and latest.detail:
            return latest.detail
        return "recorded by an earlier version" if self.legacy else self.reset_detail

    @property
    def updated_ms(self) -> int:
        return max([self.reset_ms, *(w.updated_ms for w in self.writers.values())])

    def mine(self, writer: str) -> WriterEntry:
        return self.writers.get(writer) or WriterEntry(self.generation)

    def with_writer(self, writer: str, entry: WriterEntry) -> GuardView:
        return replace(self, writers={**self.writers, writer: entry})


@dataclass(frozen=True)
class GuardSpec:
    """Where a connector keeps its guard and how strict it is (for the CLI)."""

    topic: str
    fingerprint: str
    limit: int

    @property
    def head_key(self) -> bytes:
        return self.fingerprint.encode()

    def writer_key(self, writer: str) -> bytes:
        return f"{self.fingerprint}/{writer}".encode()


def view_of(state: Mapping[bytes, bytes | None], spec: GuardSpec) -> GuardView:
    """The guard of ``spec``'s credentials, from the guard topic's latest values."""
    generation, legacy, reset_ms, reset_detail = 0, 0, 0, ""
    head = state.get(spec.head_key)
    if head is not None:
        try:
            value = json.loads(head)
            if "generation" in value:  # an operator reset
                generation = int(value["generation"])
                reset_ms = int(value.get("updated_ms", 0) or 0)
                reset_detail = str(value.get("detail", ""))[:200]
            elif value.get("state") != "reset":  # an earlier version's single record
                legacy = max(0, int(value["failures"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            legacy = UNREADABLE
    prefix = spec.head_key + b"/"
    writers: dict[str, WriterEntry] = {}
    for key, raw in state.items():
        if raw is None or not key.startswith(prefix):
            continue
        entry = WriterEntry.from_bytes(raw, generation)
        if entry.generation == generation:
            writers[key[len(prefix) :].decode("utf-8", "replace")] = entry
    return GuardView(generation, legacy, writers, reset_ms, reset_detail)


class AuthGuard:
    """Decides whether a signed request may be sent; every change is committed first.

    ``read`` returns the guard topic's latest values (read to its end, committed
    records only); ``commit`` writes records durably (a Kafka transaction) and raises
    if it cannot. The guard only proceeds once its record is in Kafka.
    """

    def __init__(
        self,
        spec: GuardSpec,
        writer: str,
        state: Mapping[bytes, bytes | None],
        read: Callable[[], Mapping[bytes, bytes | None]],
        commit: Callable[[Sequence[OutRecord]], None],
        now_ms: Callable[[], int],
    ) -> None:
        self.spec = spec
        self.writer = writer
        self._read = read
        self._commit = commit
        self._now_ms = now_ms
        self.view = view_of(state, spec)
        #: A signed request succeeded in this process with these credentials.
        self.verified = False
        #: An unauthorized answer was seen in this process: no more calls until reset.
        self.failed_here = False
        self._failed_generation = -1
        #: This process committed a reservation for a request not yet answered.
        self._reserved = False

    @property
    def blocked(self) -> bool:
        return self.failed_here or self.view.failures >= self.spec.limit

    def refresh(self, state: Mapping[bytes, bytes | None] | None = None) -> None:
        """Adopt what Kafka holds (read it now unless ``state`` is given)."""
        view = view_of(self._read() if state is None else state, self.spec)
        if view.generation != self.view.generation:
            self._reserved = False  # it was counted in a generation that no longer counts
        if self.failed_here and view.generation > self._failed_generation:
            self.failed_here = False  # an operator reset since this process failed
        self.view = view

    def _write_own(self, entry: WriterEntry) -> None:
        self._commit([writer_record(self.spec, self.writer, entry)])
        self.view = self.view.with_writer(self.writer, entry)

    def _mine(self, **change: Any) -> WriterEntry:
        return replace(self.view.mine(self.writer), updated_ms=self._now_ms(), **change)

    def before_request(self) -> None:
        """Call before every signed request. Raises :class:`GuardRefused` when the
        guard refuses; until a request succeeded in this process, first re-reads
        every writer's count and commits a reservation for this request."""
        if self.failed_here:
            raise GuardRefused("the auth guard refuses: these credentials failed here")
        if self.verified:
            return
        self.refresh()
        if self.blocked:
            raise GuardRefused("the auth guard refuses further requests with these credentials")
        if self._reserved:  # a retry after an answer that said nothing: still reserved
            return
        mine = self.view.mine(self.writer)
        self._write_own(self._mine(unverified=mine.unverified + 1, detail="request in flight"))
        self._reserved = True
        generation = self.view.generation
        self.refresh()
        if self.view.generation != generation:
            raise RetriableError("the auth guard was reset while reserving; trying again")
        if self.view.failures > self.spec.limit:
            # Another process reserved at the same time and the two do not both fit.
            self._release()
            raise GuardRefused("the auth guard refuses: another process used the last budget")

    def _release(self) -> None:
        if self._reserved:
            mine = self.view.mine(self.writer)
            self._write_own(self._mine(unverified=max(0, mine.unverified - 1), detail=""))
            self._reserved = False

    def succeeded(self) -> None:
        """The credentials were accepted: requests whose answer this writer never saw
        were made with working credentials too, so they no longer count."""
        if self.verified:
            return
        self.verified = True
        self._reserved = False
        if self.view.mine(self.writer).unverified:
            self._write_own(self._mine(unverified=0, detail="credentials accepted"))

    def inconclusive(self) -> None:
        """The request got no answer about the credentials (network error, 5xx, 429):
        take back its reservation so outages do not use the budget."""
        if not self.verified:
            self._release()

    def unauthorized(self, detail: str) -> None:
        mine = self.view.mine(self.writer)
        unverified = max(0, mine.unverified - 1) if self._reserved else mine.unverified
        self._write_own(
            self._mine(failures=mine.failures + 1, unverified=unverified, detail=detail[:200])
        )
        self.verified = False
        self._reserved = False
        self.failed_here = True
        self._failed_generation = self.view.generation

    def settle(self, error: BaseException | None) -> None:
        """Record what a signed request's answer said about the credentials: no error
        proves them, :class:`AuthError` counts, anything else (network, 5xx, 429, a
        refusal of the request itself) says nothing about them."""
        if error is None:
            self.succeeded()
        elif isinstance(error, GuardRefused):
            return
        elif isinstance(error, AuthError):
            self.unauthorized(str(error))
        else:
            self.inconclusive()


def writer_record(spec: GuardSpec, writer: str, entry: WriterEntry) -> OutRecord:
    return OutRecord(
        topic=spec.topic,
        key=spec.writer_key(writer),
        value=entry.to_bytes(),
        timestamp_ms=entry.updated_ms,
        channel="auth_guard",
    )


def reset_records(
    spec: GuardSpec, view: GuardView, now_ms: int, by: str = "operator"
) -> list[OutRecord]:
    """An operator reset: a new generation, and the old writers' records deleted."""
    head = _dumps(
        {
            "generation": view.generation + 1,
            "state": "reset",
            "failures": 0,  # what versions before generations read
            "updated_ms": now_ms,
            "detail": f"reset by {by}"[:200],
        }
    )
    out = [OutRecord(spec.topic, head, spec.head_key, timestamp_ms=now_ms, channel="auth_guard")]
    out += [
        OutRecord(spec.topic, None, spec.writer_key(w), timestamp_ms=now_ms, channel="auth_guard")
        for w in sorted(view.writers)
    ]
    return out


def _dumps(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def publish(guard: AuthGuard, metrics: Metrics, connector: str) -> None:
    """Export the guard's count and whether it refuses."""
    metrics.auth_guard_failures.labels(connector).set(guard.view.failures)
    metrics.auth_guard_tripped.labels(connector).set(1 if guard.blocked else 0)


def report_blocked(guard: AuthGuard, metrics: Metrics, connector: str, note: str = "") -> None:
    """Say, once per refusal, why nothing is sent and what an operator can do."""
    publish(guard, metrics, connector)
    v = guard.view
    log.error(
        "%s: not calling the exchange: %d authentication failure(s) recorded for "
        "credentials %s (limit %d; last: %s).%s Fix the credentials, or reset with "
        "'exchange-connectors auth-guard reset %s --config FILE'.",
        connector,
        v.failures,
        guard.spec.fingerprint,
        guard.spec.limit,
        v.detail or "-",
        f" {note}" if note else "",
        connector,
    )


def reopen_if_reset(
    guard: AuthGuard, state: Mapping[bytes, bytes | None], metrics: Metrics, connector: str
) -> bool:
    """Given the guard topic as read from Kafka, reopen after an operator reset."""
    was_blocked = guard.blocked
    guard.refresh(state)
    publish(guard, metrics, connector)
    if not (was_blocked and not guard.blocked):
        return False
    log.warning("%s: auth guard reset by an operator; calling again", connector)
    return True


def describe(view: GuardView, spec: GuardSpec) -> dict[str, Any]:
    return {
        "fingerprint": spec.fingerprint,
        "topic": spec.topic,
        "failures": view.failures,
        "limit": spec.limit,
        "blocked": view.failures >= spec.limit,
        "generation": view.generation,
        "updated_ms": view.updated_ms,
        "detail": view.detail,
        "writers": {
            name: {"failures": w.failures, "unverified": w.unverified, "detail": w.detail}
            for name, w in sorted(view.writers.items())
        },
        **({"earlier_version_failures": view.legacy} if view.legacy else {}),
    }
