"""HTTP calls with one total deadline and a bounded answer, on top of ``requests``.

``requests`` (urllib3) bounds each socket operation only: an answer that trickles in one
byte every 100 ms, or never ends, keeps a call open for ever. :func:`fetch` gives a call
one deadline for everything (connect, send, headers, the whole body) and reads at most
``max_body_bytes`` of the body.

How: the session gets an adapter whose connections tell a watchdog thread which socket
the current call uses; when the deadline passes, the watchdog shuts that socket down,
which wakes the blocked read at once. The connection is then discarded, never reused.
The body is streamed and read in chunks, so a huge answer is cut at the limit.

The exchange clients decide what the outcome means (a deadline after the request was
sent may mean "executed": :attr:`DeadlineExceeded.sent`).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
import weakref
from collections.abc import Collection, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from requests.utils import get_encoding_from_headers, get_netrc_auth
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from connectors.runtime.errors import AuthError, FatalError, RetriableError

#: Bytes read from the socket per step while streaming an answer.
CHUNK_BYTES = 64 * 1024
#: The watchdog thread ends after this long with nothing to watch (a new call restarts it).
WATCHDOG_IDLE_S = 30.0


class DeadlineExceeded(Exception):
    """The call did not complete within its deadline. ``sent``: the request (or part of
    it) had gone out, so the server may have acted on it."""

    def __init__(self, deadline_s: float, sent: bool) -> None:
        super().__init__(f"no complete answer within the {deadline_s:g}s deadline")
        self.deadline_s = deadline_s
        self.sent = sent


@dataclass(frozen=True)
class Fetched:
    """A whole answer (or its first ``max_body_bytes`` when ``truncated``)."""

    status_code: int
    headers: Mapping[str, str]
    body: bytes
    truncated: bool
    elapsed_s: float

    @property
    def text(self) -> str:
        encoding = get_encoding_from_headers(self.headers) or "utf-8"
        try:
            return self.body.decode(encoding, errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")


# -- the watchdog ------------------------------------------------------------------------


class _Call:
    """One call in flight: its deadline and the connections it has used."""

    def __init__(self, expires: float) -> None:
        self.expires = expires
        self.sent = False
        self.expired = False
        self.done = False
        self._conns: list[Any] = []
        self._lock = threading.Lock()

    def attach(self, conn: Any) -> None:
        with self._lock:
            if conn not in self._conns:
                self._conns.append(conn)
            if self.expired:
                _shut(conn)

    def expire(self) -> None:
        with self._lock:
            if self.done:
                return
            self.expired = True
            for conn in self._conns:
                _shut(conn)

    def finish(self) -> None:
        with self._lock:
            self.done = True
            self._conns.clear()


def _shut(conn: Any) -> None:
    """Wake whatever blocks on this connection's socket (the socket stays open until its
    owner closes it, so the descriptor cannot be reused under anyone's feet)."""
    sock = getattr(conn, "sock", None) or getattr(conn, "_deadline_raw", None)
    if sock is None:
        return
    with contextlib.suppress(OSError, ValueError):
        # The plain socket method: SSLSocket.shutdown would also drop its TLS state
        # under a reader in another thread.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watchdog:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Call]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, call: _Call) -> None:
        with self._cond:
            heapq.heappush(self._heap, (call.expires, next(self._seq), call))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-deadline", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cond:
                now = time.monotonic()
                if not self._heap:
                    if now - idle_since > WATCHDOG_IDLE_S:
                        self._thread = None
                        return
                    self._cond.wait(WATCHDOG_IDLE_S)
                    continue
                expires, _, call = self._heap[0]
                if call.done:
                    heapq.heappop(self._heap)
                    idle_since = now
                    continue
                if expires > now:
                    self._cond.wait(expires - now)
                    continue
                heapq.heappop(self._heap)
                idle_since = now
            call.expire()


_WATCHDOG = _Watchdog()
_current = threading.local()


def _call() -> _Call | None:
    return getattr(_current, "call", None)


# -- connections that report to the watchdog ---------------------------------------------


class _Reporting:
    """Mixed into urllib3's connections: every socket a call uses is known to its watchdog
    entry, and the call learns when its request starts going out."""

    _deadline_raw: socket.socket | None = None

    def _new_conn(self) -> socket.socket:
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        self._deadline_raw = sock
        call = _call()
        if call is not None:
            call.attach(self)
        return sock

    def send(self, data: Any) -> None:
        if getattr(self, "sock", None) is None:
            self.connect()  # type: ignore[attr-defined]
        call = _call()
        if call is not None:
            call.attach(self)
            call.sent = True
        super().send(data)  # type: ignore[misc]


class _Conn(_Reporting, HTTPConnection):
    pass


class _TlsConn(_Reporting, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Conn


class _TlsPool(HTTPSConnectionPool):
    ConnectionCls = _TlsConn


class DeadlineAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose pools use the reporting connections above."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TlsPool}

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = {"http": _Pool, "https": _TlsPool}
        return manager


def install(session: requests.Session) -> requests.Session:
    """Mount the deadline adapter on ``session`` (once); returns the session."""
    for prefix in ("http://", "https://"):
        if not isinstance(session.adapters.get(prefix), DeadlineAdapter):
            session.mount(prefix, DeadlineAdapter())
    return session


# -- the environment, read once per URL -----------------------------------------------------


class _NoNetrcEntry(AuthBase):
    """No credentials for this URL in ``~/.netrc`` (already looked up): leaves the
    request as it is, and keeps ``requests`` from reading the file again."""

    def __call__(self, r: Any) -> Any:
        return r


@dataclass(frozen=True)
class _Environment:
    """What ``Session.request`` reads from the process environment on every call for a
    URL (proxies and their exclusions, the CA bundle, ``~/.netrc`` credentials)."""

    proxies: MutableMapping[str, str]
    verify: Any
    cert: Any
    auth: Any


#: Per session, per URL: the environment does not change under a running connector,
#: and reading it (every variable, twice, and ``~/.netrc``) was a fifth of a call's CPU.
_ENVIRONMENTS: weakref.WeakKeyDictionary[requests.Session, dict[str, _Environment]] = (
    weakref.WeakKeyDictionary()
)
#: URLs remembered per session (a connector calls a handful; more are read each time).
_MAX_URLS = 64


def _environment(session: requests.Session, url: str) -> _Environment:
    known = _ENVIRONMENTS.get(session)
    if known is None:
        known = _ENVIRONMENTS.setdefault(session, {})
    env = known.get(url)
    if env is not None:
        return env
    prepared_url = requests.Request("GET", url).prepare().url or url  # as requests does
    settings = session.merge_environment_settings(prepared_url, {}, True, None, None)
    auth = None  # the session's own, or none (requests reads no .netrc then)
    if session.trust_env and session.auth is None:
        auth = get_netrc_auth(url) or _NO_NETRC_ENTRY
    env = _Environment(settings["proxies"], settings["verify"], settings["cert"], auth)
    if len(known) < _MAX_URLS:
        known[url] = env
    return env


_NO_NETRC_ENTRY = _NoNetrcEntry()


# -- the call ------------------------------------------------------------------------------


def fetch(
    session: requests.Session,
    method: str,
    url: str,
    *,
    deadline_s: float,
    max_body_bytes: int,
    connect_timeout_s: float | None = None,
    headers: Mapping[str, str] | None = None,
    data: Mapping[str, str] | bytes | None = None,
) -> Fetched:
    """One request and its whole answer within ``deadline_s`` seconds.

    Raises :class:`DeadlineExceeded` when the deadline passes, or the ``requests``
    exception of a failure that came first (refused, reset, ...). A body longer than
    ``max_body_bytes`` is cut there and comes back with ``truncated`` set.
    """
    install(session)
    started = time.monotonic()
    call = _Call(started + deadline_s)
    connect = min(connect_timeout_s or deadline_s, deadline_s)
    _current.call = call
    _WATCHDOG.watch(call)
    try:
        try:
            # What ``session.request`` does, with the environment read once per URL.
            env = _environment(session, url)
            prepared = session.prepare_request(
                requests.Request(method, url, headers=dict(headers or {}), data=data, auth=env.auth)
            )
            response = session.send(
                prepared,
                timeout=(connect, deadline_s),
                stream=True,
                allow_redirects=True,
                proxies=env.proxies,
                verify=env.verify,
                cert=env.cert,
            )
            try:
                body, truncated = _read(response, call, max_body_bytes, deadline_s)
            finally:
                response.close()
        except requests.RequestException:
            if call.expired or time.monotonic() >= call.expires:
                raise DeadlineExceeded(deadline_s, call.sent) from None
            raise
        # A body that "ended" because the watchdog cut the socket is not an answer.
        if call.expired:
            raise DeadlineExceeded(deadline_s, call.sent)
        return Fetched(
            response.status_code,
            response.headers,
            body,
            truncated,
            time.monotonic() - started,
        )
    finally:
        call.finish()
        _current.call = None


def _read(
    response: requests.Response, call: _Call, limit: int, deadline_s: float
) -> tuple[bytes, bool]:
    parts: list[bytes] = []
    size = 0
    for chunk in response.iter_content(CHUNK_BYTES):
        if call.expired or time.monotonic() >= call.expires:
            raise DeadlineExceeded(deadline_s, call.sent)
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(parts)[:limit], True
    return b"".join(parts), False


def status_outcome(status: int, auth_statuses: Collection[int] = (401, 403)) -> str:
    """What an HTTP status means, as the ``outcome`` label of ``connector_requests_total``:
    ``ok``; ``rate_limited`` (429) and ``retriable`` (5xx) are worth another try later;
    ``unauthorized`` (``auth_statuses``) refuses the credentials; ``rejected`` is any
    other definite no."""
    if status < 300:
        return "ok"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "retriable"
    if status in auth_statuses:
        return "unauthorized"
    return "rejected"


def raise_for_outcome(what: str, status: int, outcome: str) -> None:
    """What the caller does with a :func:`status_outcome`: nothing for ``ok``, otherwise
    RetriableError, AuthError or FatalError."""
    if outcome == "ok":
        return
    if outcome in ("rate_limited", "retriable"):
        raise RetriableError(f"{what}: HTTP {status}")
    if outcome == "unauthorized":
        raise AuthError(f"{what}: the exchange refused the credentials (HTTP {status})")
    raise FatalError(f"{what}: HTTP {status}")
