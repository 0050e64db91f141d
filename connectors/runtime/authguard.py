"""A persistent budget of authentication failures per credential set.

Some exchanges block the caller's IP after a handful of unauthorized requests. A
crash-looping pod with a revoked key would spend that budget one restart at a time,
so the count lives in Kafka (a compacted topic), keyed by a one-way fingerprint of the
credentials: never the credentials themselves.

Counting is pessimistic, so a crash can only make it stricter:

* before the first signed request of a process, the count is raised by one and
  committed ("unverified"); if the request succeeds, it is set back to zero ("ok");
* an unauthorized answer leaves the raised count in place ("failed"); an answer
  that says nothing about the credentials (network error, 5xx, 429) takes it back;
* at ``limit`` recorded failures the connector refuses to call the exchange with
  these credentials until an operator resets the guard (``exchange-connectors
  auth-guard reset``) or the credentials change (a new fingerprint).

The value is JSON: ``{"failures": 1, "state": "failed", "updated_ms": ...,
"detail": "HTTP 401 Unauthorized"}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from connectors.runtime.errors import AuthError
from connectors.runtime.kafka import OutRecord
from connectors.runtime.metrics import Metrics

log = logging.getLogger(__name__)

STATES = ("unverified", "ok", "failed", "reset")


def fingerprint(namespace: str, *parts: str) -> str:
    """A one-way, stable name for a credential set (not reversible, safe to log)."""
    digest = hashlib.sha256()
    digest.update(f"exchange-connectors/auth-guard/v1/{namespace}".encode())
    for part in parts:
        digest.update(b"\0" + part.encode("utf-8"))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class GuardEntry:
    failures: int = 0
    state: str = "ok"
    updated_ms: int = 0
    detail: str = ""

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "failures": self.failures,
                "state": self.state,
                "updated_ms": self.updated_ms,
                "detail": self.detail,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> GuardEntry:
        if raw is None:
            return cls()
        try:
            value = json.loads(raw)
            failures = int(value["failures"])
            state = str(value.get("state", "failed"))
        except (ValueError, KeyError, TypeError):
            # Unreadable: assume the worst rather than grant a fresh budget.
            return cls(failures=1_000_000, state="failed", detail="unreadable guard record")
        return cls(
            failures=max(0, failures),
            state=state if state in STATES else "failed",
            updated_ms=int(value.get("updated_ms", 0) or 0),
            detail=str(value.get("detail", ""))[:200],
        )


@dataclass(frozen=True)
class GuardSpec:
    """Where a connector keeps its guard and how strict it is (for the CLI)."""

    topic: str
    fingerprint: str
    limit: int


class AuthGuard:
    """Decides whether a signed request may be sent; every change is committed first.

    ``commit`` writes records durably (a Kafka transaction or a flushed send) and
    raises if it cannot; the guard only proceeds once its record is in Kafka.
    """

    def __init__(
        self,
        spec: GuardSpec,
        entry: GuardEntry,
        commit: Callable[[Sequence[OutRecord]], None],
        now_ms: Callable[[], int],
    ) -> None:
        self.spec = spec
        self.entry = entry
        self._commit = commit
        self._now_ms = now_ms
        #: A signed request succeeded in this process with these credentials.
        self.verified = False
        #: An unauthorized answer was seen in this process: no more calls until reset.
        self.failed_here = False
        self._raised = False
        self._prior = entry

    @property
    def blocked(self) -> bool:
        return self.failed_here or self.entry.failures >= self.spec.limit

    def _store(self, entry: GuardEntry) -> None:
        self._commit([record_for(self.spec, entry)])
        self.entry = entry

    def before_request(self) -> None:
        """Call before a signed request; until one succeeded, first commits the
        pessimistic count (once: a retry after an inconclusive answer reuses it)."""
        if self.blocked:
            raise AuthError("the auth guard refuses further requests with these credentials")
        if not self.verified and not self._raised:
            self._prior = self.entry
            self._store(
                GuardEntry(self.entry.failures + 1, "unverified", self._now_ms(), "first request")
            )
            self._raised = True

    def succeeded(self) -> None:
        if not self.verified:
            self.verified = True
            self._raised = False
            if self.entry.failures or self.entry.state != "ok":
                self._store(GuardEntry(0, "ok", self._now_ms(), ""))

    def inconclusive(self) -> None:
        """The request did not get an answer about the credentials (network error,
        5xx, 429): take back the pessimistic count so outages do not use the budget."""
        if self._raised and not self.verified:
            p = self._prior
            self._store(GuardEntry(p.failures, p.state, self._now_ms(), p.detail))
            self._raised = False

    def unauthorized(self, detail: str) -> None:
        failures = self.entry.failures + (0 if self._raised else 1)
        self.verified = False
        self._raised = False
        self.failed_here = True
        self._store(GuardEntry(max(1, failures), "failed", self._now_ms(), detail[:200]))

    def settle(self, error: BaseException | None) -> None:
        """Record what a signed request's answer said about the credentials: no error
        proves them, :class:`AuthError` counts, anything else (network, 5xx, 429, a
        refusal of the request itself) says nothing about them."""
        if error is None:
            self.succeeded()
        elif isinstance(error, AuthError):
            self.unauthorized(str(error))
        else:
            self.inconclusive()

    def try_reopen(self, latest: GuardEntry) -> bool:
        """After an operator reset (read back from Kafka), allow requests again."""
        if latest.state == "reset" and latest.updated_ms >= self.entry.updated_ms:
            self.entry = latest
            self.failed_here = False
            return True
        return False


def record_for(spec: GuardSpec, entry: GuardEntry) -> OutRecord:
    return OutRecord(
        topic=spec.topic,
        key=spec.fingerprint.encode(),
        value=entry.to_bytes(),
        timestamp_ms=entry.updated_ms,
        channel="auth_guard",
    )


def entry_for(state: Mapping[bytes, bytes | None], spec: GuardSpec) -> GuardEntry:
    return GuardEntry.from_bytes(state.get(spec.fingerprint.encode()))


def reset_entry(now_ms: int, by: str = "operator") -> GuardEntry:
    return GuardEntry(0, "reset", now_ms, f"reset by {by}")


def publish(guard: AuthGuard, metrics: Metrics, connector: str) -> None:
    """Export the guard's count and whether it refuses."""
    metrics.auth_guard_failures.labels(connector).set(guard.entry.failures)
    metrics.auth_guard_tripped.labels(connector).set(1 if guard.blocked else 0)


def report_blocked(guard: AuthGuard, metrics: Metrics, connector: str, note: str = "") -> None:
    """Say, once per refusal, why nothing is sent and what an operator can do."""
    publish(guard, metrics, connector)
    e = guard.entry
    log.error(
        "%s: not calling the exchange: %d authentication failure(s) recorded for "
        "credentials %s (limit %d; last: %s).%s Fix the credentials, or reset with "
        "'exchange-connectors auth-guard reset %s --config FILE'.",
        connector,
        e.failures,
        guard.spec.fingerprint,
        guard.spec.limit,
        e.detail or "-",
        f" {note}" if note else "",
        connector,
    )


def reopen_if_reset(
    guard: AuthGuard, state: Mapping[bytes, bytes | None], metrics: Metrics, connector: str
) -> bool:
    """Given the guard topic as read from Kafka, reopen after an operator reset."""
    if not guard.try_reopen(entry_for(state, guard.spec)):
        return False
    log.warning("%s: auth guard reset by an operator; calling again", connector)
    publish(guard, metrics, connector)
    return True


def describe(entry: GuardEntry, spec: GuardSpec) -> dict[str, Any]:
    return {
        "fingerprint": spec.fingerprint,
        "topic": spec.topic,
        "failures": entry.failures,
        "limit": spec.limit,
        "state": entry.state,
        "blocked": entry.failures >= spec.limit,
        "updated_ms": entry.updated_ms,
        "detail": entry.detail,
    }
