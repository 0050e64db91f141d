"""The command sink's pure rules: outcomes, the ledger, operator control, risk limits.

Pure: no Kafka, no network, no clock (callers pass ``now``). The lifecycle around
these (consumer, transactions, exchange calls) is :mod:`connectors.runtime.sink`.

**The ledger** is a compacted topic keyed by ``command_id``, one JSON object per
command (sorted keys, no whitespace). ``pending`` is committed before the exchange
is called, the outcome after; a command whose entry is final is never sent again::

    {"action":"create","amount":"0.5","pair":"btc-usd","pending_at_ms":1750953177042,
     "price":"2150000.5","side":"sell","state":"pending"}
    {"action":"create","amount":"0.5","decided_at_ms":1750953178001,"outcome":"accepted",
     "pair":"btc-usd","pending_at_ms":1750953177042,"price":"2150000.5","side":"sell",
     "state":"final"}

``state``, ``action``, ``pending_at_ms`` (the exchange's clock), ``outcome`` and
``decided_at_ms`` are the runtime's; the other fields are what the exchange's handler
says about the command (:class:`Facts`) and what its outcome taught (``learned``).
An entry that cannot be read counts as decided (``unknown``): never sent again.

What a command can end as (:class:`Outcome`) and how: :class:`Decision`; a call whose
effect is unknown: :class:`Ambiguous` (the runtime then asks for a reconciliation and
never sends the command again); a command that must not be sent at all:
:class:`CommandRefused`.
"""

from __future__ import annotations

import collections
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import Any, Protocol

from connectors.runtime.records import OutRecord

log = logging.getLogger(__name__)

PENDING = "pending"
FINAL = "final"
#: What a reconciliation found (the ``found`` label of ``connector_reconciliations_total``).
FOUND = ("found", "not_found", "undecided")
#: What an unreadable ledger entry stands for: decided, so never sent again.
UNREADABLE: Mapping[str, Any] = {"state": FINAL, "outcome": "unknown"}


class Outcome(StrEnum):
    """How a command ended (every result says one; ``connector_commands_total``'s label)."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    FAILED = "failed"
    EXPIRED = "expired"
    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"


class Command(Protocol):
    """What the runtime reads of a parsed command (the handler's own type)."""

    @property
    def command_id(self) -> str: ...

    @property
    def action(self) -> str:
        """A small fixed set (a metric label), e.g. ``create`` / ``delete``."""
        ...

    @property
    def created_at_ms(self) -> int: ...

    @property
    def expires_at_ms(self) -> int | None: ...


class CommandRefused(Exception):
    """A command with a usable ``command_id`` that must not be sent: it gets a
    ``rejected`` result. ``trusted`` False (unsigned, a bad signature): nothing in it
    can be believed, not even its id, so it must not claim that id in the ledger."""

    def __init__(
        self, reason: str, detail: str, command_id: str | None, *, trusted: bool = True
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.command_id = command_id
        self.trusted = trusted


@dataclass(frozen=True)
class Decision:
    """How one command ended, before the handler shapes it into a result record.

    ``reconciled``: decided by reading the exchange's state; ``found``: what that read
    found (one of :data:`FOUND`, counted), None when there was none; ``exchange_ms``:
    time spent in exchange calls; ``learned``: what the exchange told about the order
    (e.g. its id), written into the ledger entry with the outcome.
    """

    outcome: str
    reason: str | None = None
    message: str | None = None
    reconciled: bool = False
    attempts: int = 0
    exchange_ms: int | None = None
    learned: Mapping[str, Any] = field(default_factory=dict)
    found: str | None = None

    def __post_init__(self) -> None:
        # Plain text from here on (labels, JSON), whichever way it was given.
        object.__setattr__(self, "outcome", Outcome(self.outcome).value)
        if self.found is not None and self.found not in FOUND:
            raise ValueError(f"found: expected one of {FOUND}, got {self.found!r}")


@dataclass(frozen=True)
class Ambiguous:
    """The exchange may or may not have acted (a timeout or reset after sending, a
    5xx, an answer of no known shape). The runtime never sends the command again; it
    asks the handler to reconcile. ``why`` is for people."""

    attempts: int
    exchange_ms: int | None
    why: str


def expired(cmd: Command, now_ms: int, max_age_ms: int | None) -> str | None:
    """Why ``cmd`` must not be sent at ``now_ms``, or None.

    ``expires_at_passed``: ``now_ms >= expires_at``. ``too_old``: created more than
    ``max_age_ms`` ago. ``created_in_future``: ``created_at`` more than ``max_age_ms``
    ahead of ``now_ms`` (a skewed or forged clock would otherwise escape ``too_old``).
    """
    if max_age_ms is not None and max_age_ms < 0:
        raise ValueError("max_age_ms must be >= 0")
    if cmd.expires_at_ms is not None and now_ms >= cmd.expires_at_ms:
        return "expires_at_passed"
    if max_age_ms is not None:
        if now_ms - cmd.created_at_ms > max_age_ms:
            return "too_old"
        if cmd.created_at_ms - now_ms > max_age_ms:
            return "created_in_future"
    return None


# -- the ledger ------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What the ledger records about one command, besides the runtime's fields.

    ``identity`` (e.g. the market): written with ``pending``; an outcome keeps the
    values already there. ``shape`` (e.g. side, amount, price): what a reconciliation
    matches orders on; written with ``pending`` and again with the outcome, so a decided
    entry always shows it. ``at_pending`` (e.g. the id of the order a delete names):
    written with ``pending`` only; the outcome adds what it ``learned``.
    """

    identity: Mapping[str, Any] = field(default_factory=dict)
    shape: Mapping[str, Any] = field(default_factory=dict)
    at_pending: Mapping[str, Any] = field(default_factory=dict)


def encode(entry: Mapping[str, Any]) -> bytes:
    return json.dumps(entry, separators=(",", ":"), sort_keys=True).encode()


def decode(raw: bytes) -> dict[str, Any]:
    """One entry; :data:`UNREADABLE` when it is not a JSON object."""
    try:
        value = json.loads(raw)
    except ValueError:
        return dict(UNREADABLE)
    return value if isinstance(value, dict) else dict(UNREADABLE)


def record(topic: str, command_id: str, entry: Mapping[str, Any], now_ms: int) -> OutRecord:
    """The ledger record of one entry (key = command_id)."""
    return OutRecord(
        topic=topic,
        key=command_id.encode(),
        value=encode(entry),
        timestamp_ms=now_ms,
        channel="ledger",
    )


class Ledger:
    """The ledger as read from Kafka plus what this process committed since."""

    def __init__(self, entries: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._entries: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (entries or {}).items()}

    @classmethod
    def read(cls, state: Mapping[bytes, bytes | None]) -> Ledger:
        """From the compacted topic's latest values (a None value is a deleted entry)."""
        return cls({k.decode(): decode(v) for k, v in state.items() if v is not None})

    def get(self, command_id: str) -> Mapping[str, Any] | None:
        return self._entries.get(command_id)

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, command_id: str, entry: Mapping[str, Any]) -> None:
        """Call once ``entry`` is committed."""
        self._entries[command_id] = dict(entry)

    def pending_ids(self) -> list[str]:
        """Commands an earlier run may or may not have sent."""
        return [k for k, v in self._entries.items() if v.get("state") == PENDING]

    @staticmethod
    def pending(cmd: Command, facts: Facts, pending_at_ms: int) -> dict[str, Any]:
        """The entry committed before the exchange is called."""
        return {
            "state": PENDING,
            "action": cmd.action,
            **facts.identity,
            **facts.shape,
            **facts.at_pending,
            "pending_at_ms": pending_at_ms,
        }

    def final(
        self,
        command_id: str,
        cmd: Command | None,
        facts: Facts | None,
        decision: Decision,
        decided_at_ms: int,
    ) -> dict[str, Any]:
        """The entry committed with the result: what was there, plus the outcome."""
        entry = dict(self._entries.get(command_id) or {})
        entry.update(state=FINAL, outcome=decision.outcome, decided_at_ms=decided_at_ms)
        if cmd is not None:
            entry.setdefault("action", cmd.action)
        if facts is not None:
            for name, value in facts.identity.items():
                entry.setdefault(name, value)
            entry.update(facts.shape)
        entry.update(decision.learned)
        return entry

    def claimed(self, command_id: str, action: str, facts: Facts, since_ms: int) -> int:
        """Commands other than ``command_id`` accepted since ``since_ms`` with the same
        action, identity and shape: orders a reconciliation finds may be theirs."""
        want = {"action": action, **facts.identity, **facts.shape}
        return sum(
            1
            for cid, e in self._entries.items()
            if cid != command_id
            and e.get("state") == FINAL
            and e.get("outcome") == Outcome.ACCEPTED
            and all(e.get(k) == v for k, v in want.items())
            and int(e.get("decided_at_ms") or 0) >= since_ms
        )


# -- operator control ------------------------------------------------------------------


@dataclass
class Control:
    """The control topic's state (compacted, latest value wins): the kill switch
    (``trading_enabled: false`` refuses every command that adds exposure) and
    ``paused: true`` (take no commands; they wait in Kafka)."""

    trading_enabled: bool = True
    paused: bool = False

    def apply(self, changes: Iterable[Mapping[str, Any]]) -> None:
        """Each change in order; fields that are not booleans are ignored::

        {"trading_enabled": false, "reason": "incident 42", "by": "alice"}
        """
        for change in changes:
            who = str(change.get("by", "?"))[:60]
            why = str(change.get("reason", ""))[:200]
            trading = change.get("trading_enabled")
            if isinstance(trading, bool):
                if trading != self.trading_enabled:
                    log.warning(
                        "kill switch: trading %s by %s (%s)",
                        "enabled" if trading else "DISABLED",
                        who,
                        why,
                    )
                self.trading_enabled = trading
            paused = change.get("paused")
            if isinstance(paused, bool):
                if paused != self.paused:
                    log.warning("sink %s by %s (%s)", "paused" if paused else "resumed", who, why)
                self.paused = paused


# -- risk limits -----------------------------------------------------------------------


@dataclass(frozen=True)
class Exposure:
    """What a command adds to the account's risk: ``notional`` in the quote currency,
    ``amount`` as the command says it, on ``market``."""

    market: str
    amount: Decimal
    notional: Decimal


@dataclass(frozen=True)
class RiskLimits:
    """``max_notional`` per order, ``max_amount`` per market, and at most
    ``max_per_minute`` new exposures in any rolling minute (0 = no limit)."""

    max_notional: Decimal | None = None
    max_amount: Mapping[str, Decimal] = field(default_factory=dict)
    max_per_minute: int = 0


class Risk:
    """Checks each new exposure against :class:`RiskLimits`; counts the ones let through."""

    def __init__(self, limits: RiskLimits) -> None:
        self.limits = limits
        self._recent: collections.deque[float] = collections.deque()

    def check(self, exposure: Exposure, now_s: float) -> Decision | None:
        """A ``rejected`` decision, or None (then this one counts, at ``now_s`` on a
        monotonic clock)."""
        lim = self.limits
        if lim.max_notional is not None and exposure.notional > lim.max_notional:
            return Decision(
                Outcome.REJECTED,
                "risk_max_notional",
                f"order value {exposure.notional} above {lim.max_notional}",
            )
        cap = lim.max_amount.get(exposure.market)
        if cap is not None and exposure.amount > cap:
            return Decision(
                Outcome.REJECTED, "risk_max_amount", f"amount above {cap} for {exposure.market}"
            )
        while self._recent and now_s - self._recent[0] > 60:
            self._recent.popleft()
        if lim.max_per_minute and len(self._recent) >= lim.max_per_minute:
            return Decision(
                Outcome.REJECTED,
                "risk_rate",
                f"more than {lim.max_per_minute} new orders in a minute",
            )
        self._recent.append(now_s)
        return None
