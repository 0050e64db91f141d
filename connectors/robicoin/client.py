"""Blocking Robicoin HTTP client: signs, sends, and turns every answer into a result or
one of the runtime's errors (run it in a worker thread).

The session, base URL and clock are injected; :func:`protocol.classify` decides what
an answer means. The client never retries on its own: the caller owns rate limits,
back-off and the authentication guard, and decides whether a request that may have
reached the exchange (``RequestFailed.maybe_executed``) can be repeated at all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn

import requests

from connectors.robicoin import protocol
from connectors.robicoin.protocol import Endpoint, Verdict
from connectors.robicoin.signing import auth_fields
from connectors.runtime.context import RuntimeContext
from connectors.runtime.errors import (
    AuthError,
    BadMessage,
    FatalError,
    RejectedError,
    RetriableError,
)
from connectors.runtime.http import DeadlineExceeded, Fetched, fetch, install
from connectors.runtime.logs import MASK, redact

log = logging.getLogger(__name__)

#: Local clock this far from the server's ``Date`` header → sign with server time.
MAX_CLOCK_SKEW_S = 2.0
#: Longest answer body read; a longer one comes back cut, as a ``too_large`` bad message.
MAX_BODY_BYTES = 4 * 1024 * 1024


class RequestFailed(RetriableError):
    """A transient failure. ``maybe_executed``: the request may have reached the exchange
    (read timeout, the call's deadline passed after sending, reset after sending, 5xx),
    so a non-idempotent call must not be repeated blindly."""

    def __init__(self, message: str, *, maybe_executed: bool, rate_limited: bool = False) -> None:
        super().__init__(message)
        self.maybe_executed = maybe_executed
        self.rate_limited = rate_limited


class NotFoundError(RejectedError):
    """404/405: a wrong base URL for polls; for delete-order, open-order decides."""


@dataclass(frozen=True)
class Credentials:
    public_key: str
    public_id: str
    private_key: str

    def __repr__(self) -> str:
        return "Credentials(***)"


@dataclass(frozen=True)
class Answer:
    """A 2xx answer. ``error`` is set (and ``payload`` None) when its body is not JSON:
    the caller dead-letters ``text``."""

    payload: Any
    text: str
    elapsed_s: float
    error: BadMessage | None = None


class RobicoinClient:
    def __init__(
        self,
        base_url: str,
        credentials: Credentials | None,
        *,
        session: requests.Session | None = None,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        on_answer: Callable[[Endpoint, str, float], None] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        """``timeout_s`` is the whole call's deadline: connect, send, and the complete
        answer (at most ``max_body_bytes`` of it); ``connect_timeout_s`` bounds the
        connect alone."""
        self.base_url = base_url.rstrip("/")
        self._credentials = credentials
        self._session = install(session or requests.Session())
        self._deadline_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._max_body_bytes = max_body_bytes
        self._clock = clock
        self._on_answer = on_answer
        self.clock_offset_s = 0.0

    def close(self) -> None:
        self._session.close()

    def _now_s(self) -> int:
        return int(self._clock() + self.clock_offset_s)

    def _learn_clock(self, response: Fetched) -> None:
        date = response.headers.get("Date")
        if not date:
            return
        try:
            server = parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        skew = server - self._clock()
        # The header has one-second resolution: only act on a clear difference.
        if abs(skew) > MAX_CLOCK_SKEW_S:
            if abs(skew - self.clock_offset_s) > MAX_CLOCK_SKEW_S:
                log.warning("local clock is %.0fs off the exchange's; signing with its time", skew)
            self.clock_offset_s = skew
        else:
            self.clock_offset_s = 0.0

    def call(self, endpoint: Endpoint, fields: Mapping[str, str] | None = None) -> Answer:
        """Send one request; returns the decoded answer or raises.

        Raises :class:`RequestFailed` (retriable), :class:`AuthError` (stop calling
        with these credentials), :class:`RejectedError` (a definite no for this
        request; :class:`NotFoundError` for 404/405) or :class:`FatalError` (signed
        request without credentials). A 2xx answer that is not JSON comes back with
        ``error`` set.
        """
        url = f"{self.base_url}/{endpoint.path}"
        started = time.monotonic()
        signature: str | None = None
        try:
            if endpoint.signed:
                if self._credentials is None:
                    raise FatalError(f"{endpoint.name} needs credentials and none are configured")
                c = self._credentials
                body = auth_fields(c.public_key, c.public_id, c.private_key, self._now_s())
                body.update(fields or {})
                signature = body["hash"]
                response = self._fetch("POST", url, body)
            else:
                response = self._fetch("GET", url, None)
        except DeadlineExceeded as exc:
            self._report(endpoint, "retriable", started)
            # Cut after the request went out: the exchange may have acted on it.
            raise RequestFailed(f"{endpoint.name}: {exc}", maybe_executed=exc.sent) from None
        except requests.ConnectTimeout as exc:
            self._report(endpoint, "retriable", started)
            raise RequestFailed(
                f"{endpoint.name}: connect timeout ({type(exc).__name__})", maybe_executed=False
            ) from None
        except requests.ConnectionError as exc:
            self._report(endpoint, "retriable", started)
            # A refused connection never carried the request; a reset after sending may have.
            sent = not _connect_refused(exc)
            raise RequestFailed(
                f"{endpoint.name}: connection error ({type(exc).__name__})", maybe_executed=sent
            ) from None
        except requests.Timeout:
            self._report(endpoint, "retriable", started)
            raise RequestFailed(f"{endpoint.name}: read timeout", maybe_executed=True) from None
        except requests.RequestException as exc:
            self._report(endpoint, "retriable", started)
            raise RequestFailed(
                f"{endpoint.name}: request failed ({type(exc).__name__})", maybe_executed=True
            ) from None
        elapsed = time.monotonic() - started
        self._learn_clock(response)
        # An answer may echo the request: mask this request's signature before anything
        # (a dead letter, a log line, a parsed row) holds it. Registered secrets are
        # masked where text leaves as diagnostics (logs, errors, dead letters), never
        # in data: a short numeric public id would corrupt prices.
        text = response.text if signature is None else response.text.replace(signature, MASK)
        status = response.status_code
        if response.truncated and status < 300:
            # Not JSON we can trust, and not worth holding: the caller dead-letters the
            # prefix (the poller) or reads the exchange's state (a create-order).
            self._report(endpoint, "ok", started)
            detail = f"{endpoint.name}: answer larger than {self._max_body_bytes} bytes"
            return Answer(None, text, elapsed, BadMessage("too_large", detail))
        verdict = protocol.classify(endpoint, status, text)
        self._report(endpoint, verdict.value, started)
        if verdict is not Verdict.OK:
            self._refuse(endpoint, verdict, status, text)
        try:
            payload = protocol.decode(text)
        except BadMessage:
            bad = BadMessage("invalid_json", f"{endpoint.name}: answer is not JSON")
            return Answer(None, text, elapsed, bad)
        return Answer(payload, text, elapsed)

    @staticmethod
    def _refuse(endpoint: Endpoint, verdict: Verdict, status: int, text: str) -> NoReturn:
        """Raise what an answer that is not OK means (its message read only here)."""
        message = redact(protocol.error_message(text))
        if verdict is Verdict.RATE_LIMITED:
            raise RequestFailed(
                f"{endpoint.name}: HTTP 429 {message}", maybe_executed=False, rate_limited=True
            )
        if verdict is Verdict.RETRIABLE:
            raise RequestFailed(f"{endpoint.name}: HTTP {status} {message}", maybe_executed=True)
        if verdict is Verdict.UNAUTHORIZED:
            raise AuthError(f"{endpoint.name}: HTTP {status} {message}")
        if verdict is Verdict.NOT_FOUND:
            raise NotFoundError(status, message)
        raise RejectedError(status, message)

    def _fetch(self, method: str, url: str, body: Mapping[str, str] | None) -> Fetched:
        return fetch(
            self._session,
            method,
            url,
            data=body,
            deadline_s=self._deadline_s,
            connect_timeout_s=self._connect_timeout_s,
            max_body_bytes=self._max_body_bytes,
        )

    def _report(self, endpoint: Endpoint, outcome: str, started: float) -> None:
        if self._on_answer is not None:
            self._on_answer(endpoint, outcome, time.monotonic() - started)


def _connect_refused(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return True
        if "NewConnectionError" in type(current).__name__:
            return True
        nxt = current.__cause__ or current.__context__
        if nxt is None and current.args and isinstance(current.args[0], BaseException):
            nxt = current.args[0]
        current = nxt
    return False


def connector_client(
    ctx: RuntimeContext,
    settings: Any,
    credentials: Credentials | None,
    session: requests.Session | None = None,
    clock: Callable[[], float] = time.time,
) -> RobicoinClient:
    """The client of a running connector (poller or sink): ``settings`` is its
    ``robicoin:`` section (``base_url``, ``request_timeout_s``, ``connect_timeout_s``);
    every answer is counted in ``connector_requests_total`` by endpoint family."""

    def on_answer(endpoint: Endpoint, outcome: str, elapsed: float) -> None:
        ctx.metrics.observe_request(ctx.name, endpoint.family, outcome, elapsed)

    return RobicoinClient(
        settings.base_url,
        credentials,
        session=session,
        timeout_s=settings.request_timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
        clock=clock,
        on_answer=on_answer,
    )
