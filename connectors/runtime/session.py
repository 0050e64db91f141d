"""One WebSocket stream connection's protocol state, sans I/O.

The model is websockets' own ``protocol.py``: this module never touches a socket, a
clock or Kafka. The streaming runtime (:mod:`connectors.runtime.streaming`) feeds it
each frame that arrived and the time (``receive(frame, now)``), asks it for the frames
to write (``data_to_send()``) and checks it (``check(now)``); everything in between is
plain data, so a connection is testable from recorded frames with no server.

What is generic here is the shape most exchange WebSockets share: requests carry an id,
answers echo it, updates are pushed without one, and an application-level ping is
answered by a pong. What an exchange writes is a :class:`Dialect`: how a frame is
parsed and how the ping/subscribe/unsubscribe requests are spelled.

Subscriptions follow a :class:`Plan` (one subscribe request per channel). A refused
subscribe is retried once after an unsubscribe (some servers refuse subscribing a
channel twice); a second refusal, or a request left unanswered past its deadline,
fails the connection (:attr:`Session.failure`, raised by :meth:`Session.check`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from connectors.runtime.errors import BadMessage, RetriableError
from connectors.runtime.records import Event


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An error answer's code (when it has a numeric one) and message."""

    code: int | None
    message: str


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to one request (pong, subscription status) or an error answer."""

    id: str | None
    method: str | None
    data: Any
    error: ErrorInfo | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class Update:
    """Pushed data: one frame's records (``events``), all of one channel.

    Not frozen: one is made per frame, and a frozen dataclass costs four times as much
    to build. Nothing changes one after the parser made it."""

    channel: str
    events: Sequence[Event]


@dataclass(frozen=True)
class Plan:
    """What one connection subscribes: the params of the one subscribe request per
    channel, and the record keys each channel's resync markers go to (so a marker lands
    in the partition of every key a consumer may hold state for)."""

    subscriptions: Mapping[str, Sequence[str]]
    keys: Mapping[str, Sequence[str]]

    def changed(self, other: Plan) -> list[str]:
        """Channels whose subscribe request differs in ``other``."""
        return [
            ch
            for ch in other.subscriptions
            if list(other.subscriptions[ch]) != list(self.subscriptions.get(ch, ()))
        ]


class Dialect(Protocol):
    """How one exchange spells its frames: pure functions, no state."""

    #: Error codes that get their own ``code`` label on ``connector_exchange_errors_total``
    #: (a small fixed set); every other code is counted as ``other``.
    known_error_codes: frozenset[int]

    def parse(self, frame: str | bytes) -> Reply | Update:
        """One frame → an answer or pushed data; raises BadMessage when unusable."""
        ...

    def is_pong(self, reply: Reply) -> bool: ...

    def ping(self, req_id: int) -> str: ...

    def subscribe(self, req_id: int, channel: str, params: Sequence[str]) -> str: ...

    def unsubscribe(self, req_id: int, channel: str) -> str: ...


@dataclass
class _Request:
    kind: str  # "subscribe", "unsubscribe" (then subscribe again), "move" (unsub, then sub)
    channel: str
    sent_at: float
    attempt: int = 1


class Session:
    """One connection: requests in flight, pings, subscription state.

    Outputs, drained by the caller: :meth:`data_to_send` (frames to write),
    :attr:`rtts` (seconds from ping to pong), :attr:`errors` (error answers to count
    and log). :meth:`receive` returns the pushed records of a frame directly: it is the
    hot path.
    """

    def __init__(self, dialect: Dialect, plan: Plan, request_timeout_s: float) -> None:
        self.dialect = dialect
        self.plan = plan
        self.request_timeout_s = request_timeout_s
        self._ids = itertools.count(1)
        self._outgoing: list[str] = []
        self._pending: dict[str, _Request] = {}
        self._pings: dict[str, float] = {}
        self._waiting: set[str] = set()
        self.rtts: list[float] = []
        self.errors: list[Reply] = []
        #: Set when the connection cannot go on (refused twice, refused change).
        self.failure: RetriableError | None = None
        #: An update arrived on this connection (it streams data, not just answers).
        self.data_seen = False

    # -- requests --------------------------------------------------------------------

    def _send(self, kind: str, channel: str, now: float, attempt: int = 1) -> None:
        req_id = next(self._ids)
        if kind == "subscribe":
            frame = self.dialect.subscribe(req_id, channel, self.plan.subscriptions[channel])
        else:
            frame = self.dialect.unsubscribe(req_id, channel)
        self._pending[str(req_id)] = _Request(kind, channel, now, attempt)
        self._outgoing.append(frame)

    def subscribe(self, now: float) -> None:
        """One subscribe request per channel of the plan, written together."""
        for channel in self.plan.subscriptions:
            self._waiting.add(channel)
            self._send("subscribe", channel, now)

    @property
    def subscribed(self) -> bool:
        """Every subscribe of the plan was answered yes."""
        return not self._waiting and self.failure is None

    def change_plan(self, plan: Plan, now: float) -> dict[str, list[str]]:
        """Move the changed channels in place: unsubscribe, then subscribe the new list.

        Returns the keys that need a resync marker (old and new keys of every changed
        channel); empty when nothing changed.
        """
        changed = self.plan.changed(plan)
        keys = {
            ch: sorted(set(self.plan.keys.get(ch, ())) | set(plan.keys.get(ch, ())))
            for ch in changed
        }
        self.plan = plan
        for channel in changed:
            self._waiting.add(channel)
            self._send("move", channel, now)
        return keys

    def ping(self, now: float) -> None:
        req_id = next(self._ids)
        self._pings[str(req_id)] = now
        self._outgoing.append(self.dialect.ping(req_id))

    def oldest_ping(self) -> float | None:
        """When the oldest unanswered ping was sent."""
        return min(self._pings.values()) if self._pings else None

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._outgoing)

    def data_to_send(self) -> list[str]:
        out, self._outgoing = self._outgoing, []
        return out

    def check(self, now: float) -> None:
        """Raise when the connection failed or a request went unanswered too long."""
        if self.failure is not None:
            raise self.failure
        for request in self._pending.values():
            if now - request.sent_at > self.request_timeout_s:
                raise RetriableError("no answer to a request in time")

    # -- frames in -------------------------------------------------------------------

    def receive(self, frame: str | bytes, now: float) -> Sequence[Event]:
        """The records of one frame (empty for answers); raises BadMessage."""
        parsed = self.dialect.parse(frame)
        if isinstance(parsed, Update):
            if parsed.channel not in self.plan.subscriptions:
                raise BadMessage(
                    "not_subscribed", f"data for {parsed.channel!r}, which is not subscribed"
                )
            self.data_seen = True
            return parsed.events
        self._answer(parsed, now)
        return ()

    def _answer(self, reply: Reply, now: float) -> None:
        if self.dialect.is_pong(reply):
            if reply.id is not None and reply.id in self._pings:
                sent = self._pings.pop(reply.id)
            elif self._pings:  # a server that does not echo ids: match the oldest ping
                oldest = min(self._pings, key=self._pings.__getitem__)
                sent = self._pings.pop(oldest)
            else:
                return
            self.rtts.append(now - sent)
            return
        request = self._pending.pop(reply.id, None) if reply.id is not None else None
        if request is None:
            if not reply.ok:
                self.errors.append(reply)
            return
        if request.kind == "unsubscribe":  # the answer does not matter: subscribe again
            self._send("subscribe", request.channel, now, attempt=2)
            return
        if not reply.ok:
            self.errors.append(reply)
        if request.kind == "move":
            if not reply.ok:
                self.failure = RetriableError(f"{request.channel} subscription change refused")
                return
            self._send("subscribe", request.channel, now, attempt=2)
            return
        if reply.ok:
            self._waiting.discard(request.channel)
        elif request.attempt == 1:
            self._send("unsubscribe", request.channel, now)
        else:
            code = reply.error.code if reply.error and reply.error.code is not None else "?"
            self.failure = RetriableError(f"{request.channel} subscription refused: code {code}")
