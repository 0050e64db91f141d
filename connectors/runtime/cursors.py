"""What a polled stream is, and how its answers become records and state — pure.

No network, no Kafka, no clock: the polling runtime (:mod:`connectors.runtime.polling`)
does the I/O and hands these rules the rows of one answer and the stream's stored
state; they hand back plain data (:class:`Poll`).

A REST exchange describes each stream it polls as a :class:`PolledStream`: the request
(:class:`Request`: signed or not, which rate-limit class), how an answer's rows are
found, and one :class:`Rule` for what is new:

* :class:`Stateless`: every row of every answer is a record (a ticker).
* :class:`Incremental`: "the last N rows" answers; the exchange's :class:`CursorRule`
  says which rows were not written yet, and when rows may have been missed between two
  polls (a :class:`Gap`: the runtime then writes a ``kind: gap`` marker to every
  partition and starts a new resync epoch). State: ``cursor/<stream>``.
* :class:`Snapshot`: full answers (balances, open orders): a record when a row appears,
  changes or disappears (or every row every poll). State: ``snapshot/<stream>``, each
  row's fingerprint and its last parsed data, so a row that left can still be reported.

A row that cannot be parsed is a :class:`Dead` letter; the poll goes on.

:class:`Schedule` holds the timing rule every stream follows: polls start
``interval_s`` apart (start to start); after a failure the next attempt waits a jittered
back-off counted from the failure; a refused request waits at least one interval.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from connectors.runtime.backoff import Backoff
from connectors.runtime.errors import BadMessage
from connectors.runtime.logs import redact
from connectors.runtime.records import Event

log = logging.getLogger(__name__)


# -- rows ------------------------------------------------------------------------------


def row_text(row: Any) -> str:
    """A row as canonical JSON text (exact numbers): the dead-letter body and the
    fingerprint's input."""
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def row_fingerprint(row: Any) -> str:
    """A stable fingerprint of one raw row (canonical JSON, exact number text).

    >>> row_fingerprint({"b": "1.10", "a": 1}) == row_fingerprint({"a": 1, "b": "1.10"})
    True
    """
    return hashlib.sha256(row_text(row).encode("utf-8")).hexdigest()[:20]


def field_key(name: str) -> Callable[[Any], str]:
    """A snapshot's key function: the row's ``name`` field. Only a short plain value is
    used as it is; anything else an exchange sends there (an object, a long text that
    may echo the request) is stored by its fingerprint, never copied into the state.

    >>> field_key("currency")({"currency": "try"}), field_key("id")({"id": 18})
    ('try', '18')
    >>> field_key("id")({"id": {"x": 1}})[0]
    '?'
    """

    def key_of(row: Any) -> str:
        value = row.get(name) if isinstance(row, dict) else None
        if isinstance(value, str | int) and not isinstance(value, bool):
            text = str(value)
            if len(text) <= 64 and text.isprintable() and redact(text) == text:
                return text
        return f"?{row_fingerprint(value)}"

    return key_of


# -- what a poll produced ----------------------------------------------------------------


@dataclass(frozen=True)
class Dead:
    """A row (or a whole answer) that could not be turned into a record: dead-lettered
    with ``raw`` as its value."""

    raw: str
    error: BadMessage


@dataclass(frozen=True)
class Gap:
    """Rows may have been missed between two polls. ``reason`` is the marker's
    ``data.reason`` and the ``reason`` label of ``connector_gaps_total``; ``detail`` and
    ``extra`` complete the marker's ``data``; ``note`` is for the log."""

    reason: str
    detail: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    note: str = ""

    def data(self) -> dict[str, Any]:
        """The marker's ``data``: ``{"reason": .., "detail": .., **extra}``."""
        return {"reason": self.reason, "detail": self.detail, **self.extra}


@dataclass(frozen=True)
class Poll:
    """One answer, turned over: records (in order), dead letters, the state entries to
    write with them (only the changed ones), and a gap when rows may be missing."""

    events: Sequence[Event] = ()
    dead: Sequence[Dead] = ()
    state: Mapping[str, Any] = field(default_factory=dict)
    gap: Gap | None = None


def _parse_each(
    rows: Sequence[Any], parse: Callable[[Any], Event], text: Callable[[Any], str]
) -> tuple[list[Event], list[Dead]]:
    good: list[Event] = []
    dead: list[Dead] = []
    for raw in rows:
        try:
            good.append(parse(raw))
        except BadMessage as exc:
            dead.append(Dead(text(raw), exc))
    return good, dead


# -- rules -------------------------------------------------------------------------------


class Rule(Protocol):
    """How one stream's answers become records and state (pure)."""

    #: Whether :meth:`apply` may report a gap (its topic's partitions are then looked
    #: up at start, for the markers).
    @property
    def gaps(self) -> bool: ...

    def apply(self, stream: str, rows: Sequence[Any], state: Mapping[str, Any]) -> Poll:
        """``rows`` of one answer; ``state``: everything stored (this stream's entries
        are named after ``stream``)."""
        ...


@dataclass(frozen=True)
class Stateless:
    """Every row is a record; nothing is stored (a ticker)."""

    parse: Callable[[Any], Event]
    text: Callable[[Any], str] = row_text
    gaps: bool = False

    def apply(self, stream: str, rows: Sequence[Any], state: Mapping[str, Any]) -> Poll:
        events, dead = _parse_each(rows, self.parse, self.text)
        return Poll(events, dead)


@dataclass(frozen=True)
class Step:
    """One answer compared with the cursor: the rows not written yet (in the order to
    write them), the cursor to store (JSON), and a gap when rows may be missing."""

    new_rows: Sequence[Any]
    cursor: Any
    gap: Gap | None = None


class CursorRule(Protocol):
    """An exchange's rule for "which rows of this answer are new" (pure)."""

    def load(self, stored: Mapping[str, Any]) -> Any:
        """The cursor as stored (``{}``: none yet); raises ValueError when unreadable."""
        ...

    def advance(self, cursor: Any, rows: Sequence[Any]) -> Step: ...


@dataclass(frozen=True)
class Incremental:
    """Rows the exchange keeps adding: write each once, behind a cursor.

    The cursor is stored as ``cursor/<stream>`` with every poll's records, in the same
    transaction. An unreadable stored cursor is logged and the stream starts afresh.
    """

    parse: Callable[[Any], Event]
    cursor: CursorRule
    text: Callable[[Any], str] = row_text
    gaps: bool = True

    def apply(self, stream: str, rows: Sequence[Any], state: Mapping[str, Any]) -> Poll:
        key = f"cursor/{stream}"
        try:
            cursor = self.cursor.load(state.get(key) or {})
        except ValueError:
            log.error("%s: stored cursor unreadable; starting afresh", stream)
            cursor = self.cursor.load({})
        step = self.cursor.advance(cursor, rows)
        events, dead = _parse_each(step.new_rows, self.parse, self.text)
        return Poll(events, dead, {key: step.cursor}, step.gap)


def diff_keys(
    previous: Mapping[str, str], current: Mapping[str, str], window_full: bool = False
) -> list[tuple[str, str]]:
    """Compare two snapshots given as ``{key: row fingerprint}``.

    Returns ``(key, change)`` pairs: ``opened`` (new key), ``changed`` (same key, other
    content), ``closed`` (key gone). When the answer was a full ``last N`` window and
    keys are increasing integers (an order id), a key older than everything shown may
    merely have scrolled out of the window: it is ``out_of_window``, not ``closed``.

    >>> diff_keys({"17": "a", "18": "b"}, {"18": "c", "19": "d"})
    [('18', 'changed'), ('19', 'opened'), ('17', 'closed')]
    """
    out: list[tuple[str, str]] = []
    for key, fp in current.items():
        if key not in previous:
            out.append((key, "opened"))
        elif previous[key] != fp:
            out.append((key, "changed"))
    numeric = [int(k) for k in current if k.isdigit()]
    oldest = min(numeric) if window_full and numeric else None
    for key in previous:
        if key in current:
            continue
        scrolled = oldest is not None and key.isdigit() and int(key) < oldest
        out.append((key, "out_of_window" if scrolled else "closed"))
    return out


def _as_is(event: Event, change: str) -> Event:
    return event


@dataclass(frozen=True)
class Snapshot:
    """Full answers: write what changed since the last one.

    Stored as ``snapshot/<stream>``: ``{key: {"fp": fingerprint, "data": parsed data or
    None}}``, written only when it changed. A row that cannot be parsed is dead-lettered
    once per version (fingerprint). ``mark`` turns a row and its change (``opened``,
    ``changed``, ``closed``, ``out_of_window``, ``unchanged``) into the record (default:
    the row as it is); ``vanished`` rebuilds a row that left from its last data (None:
    a row that left is not reported). ``window``: answers are the last ``window`` rows,
    so keys older than every key shown may only have scrolled out (:func:`diff_keys`).
    """

    parse: Callable[[Any], Event]
    key_of: Callable[[Any], str]
    every_poll: bool = False
    window: int | None = None
    mark: Callable[[Event, str], Event] = _as_is
    vanished: Callable[[Mapping[str, Any]], Event] | None = None
    text: Callable[[Any], str] = row_text
    fingerprint: Callable[[Any], str] = row_fingerprint
    gaps: bool = False

    def apply(self, stream: str, rows: Sequence[Any], state: Mapping[str, Any]) -> Poll:
        key = f"snapshot/{stream}"
        previous: Mapping[str, Any] = state.get(key) or {}
        current: dict[str, Any] = {}
        parsed: dict[str, Event] = {}
        dead: list[Dead] = []
        for raw in rows:
            k = self.key_of(raw)
            fp = self.fingerprint(raw)
            try:
                parsed[k] = self.parse(raw)
                current[k] = {"fp": fp, "data": parsed[k].data}
            except BadMessage as exc:
                current[k] = {"fp": fp, "data": None}
                if previous.get(k, {}).get("fp") != fp:  # dead-letter each version once
                    dead.append(Dead(self.text(raw), exc))
        changes = diff_keys(
            {k: v["fp"] for k, v in previous.items()},
            {k: v["fp"] for k, v in current.items()},
            window_full=self.window is not None and len(rows) >= self.window,
        )
        events: list[Event] = []
        reported: set[str] = set()
        for k, change in changes:
            reported.add(k)
            if k in parsed:
                row = parsed[k]
            elif change in ("closed", "out_of_window") and previous[k].get("data"):
                if self.vanished is None:
                    continue  # e.g. a wallet that disappeared: nothing to report
                row = self.vanished(previous[k]["data"])
            else:
                continue
            events.append(self.mark(row, change))
        if self.every_poll:
            for k, row in parsed.items():
                if k not in reported:
                    events.append(self.mark(row, "unchanged"))
        return Poll(events, dead, {key: current} if current != previous else {})


# -- streams -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What one poll of a stream sends.

    ``name``: the request's short name (the ``source`` header of its dead letters);
    ``target``: the exchange's own description of the call (a path, an endpoint object),
    handed back to the exchange's ``call``; ``signed``: it carries the credentials, so it
    goes through the auth guard; ``rate_class``: the rate-limit class it counts against.
    """

    name: str
    target: Any
    signed: bool
    rate_class: str


class PolledStream(Protocol):
    """One stream an exchange polls.

    ``name`` names its task, logs and state entries (``ticker:24h``, ``open_order``);
    ``channel`` its records' channel and schema (``open-order``); ``topic`` where they go.
    """

    @property
    def name(self) -> str: ...

    @property
    def channel(self) -> str: ...

    @property
    def topic(self) -> str: ...

    @property
    def interval_s(self) -> float: ...

    @property
    def request(self) -> Request: ...

    @property
    def rule(self) -> Rule: ...

    def rows(self, payload: Any) -> Sequence[Any]:
        """The rows of a decoded answer; raises BadMessage when the answer is not of the
        documented shape (then it is dead-lettered whole, and does not count as the
        exchange being there)."""
        ...


# -- timing ------------------------------------------------------------------------------


@dataclass
class Schedule:
    """When one stream polls next. Each method returns a delay; the caller counts it
    from the poll's start (:meth:`polled`, :meth:`refused`) or from now
    (:meth:`failed`)."""

    interval_s: float
    backoff: Backoff

    def polled(self) -> float:
        """A poll went through (its records committed, or the guard refused it): the
        next starts ``interval_s`` after this one started, and back-off starts over."""
        self.backoff.reset()
        return self.interval_s

    def failed(self) -> float:
        """No usable answer (network, 5xx, 429) or a failed transaction: try again after
        a growing, jittered delay from now."""
        return self.backoff.next_delay()

    def refused(self) -> float:
        """The exchange refused the request (a 4xx): not sooner than the interval, and
        backing off while it keeps refusing."""
        return max(self.interval_s, self.backoff.next_delay())

    @staticmethod
    def wait(start: float, delay: float, now: float) -> float:
        """Seconds still to wait at ``now`` for ``delay`` counted from ``start``."""
        return max(0.0, start + delay - now)
