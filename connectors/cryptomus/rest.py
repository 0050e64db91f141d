"""The three REST calls the stream needs: WebSocket token, market list, symbol scales.

Blocking (``requests``); the source runs them in a worker thread. Each call has one
deadline (``timeout_s``: connect and the whole answer) and reads at most
``max_body_bytes``; past either it is a retriable error. Status handling lives in
:func:`check_status`: network errors, 5xx and 429 are retriable, 401/403 (and 404
"user not found" on the token call) mean the credentials are refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import urlencode

import requests

from connectors.cryptomus import protocol
from connectors.cryptomus.signing import sign
from connectors.runtime.config import Secret
from connectors.runtime.errors import AuthError, BadMessage, FatalError, RetriableError
from connectors.runtime.http import DeadlineExceeded, fetch, install

TOKEN_PATH = "/v2/user-api/exchange/account/web-socket/token"
MARKETS_PATH = "/v2/user-api/exchange/markets"
SCALES_PATH = "/api/v2/symbol-scales"
#: Longest answer read; the market list of a large exchange is well under this.
MAX_BODY_BYTES = 4 * 1024 * 1024


def check_status(what: str, status: int, auth_call: bool = False) -> None:
    """The one place that decides what an HTTP status means for the caller."""
    if status < 300:
        return
    if status == 429 or status >= 500:
        raise RetriableError(f"{what}: HTTP {status}")
    if status in (401, 403) or (auth_call and status == 404):
        raise AuthError(f"{what}: the exchange refused the credentials (HTTP {status})")
    raise FatalError(f"{what}: HTTP {status}")


def _outcome(status: int, auth_call: bool) -> str:
    """The ``outcome`` label of ``connector_requests_total`` for an HTTP status."""
    if status < 300:
        return "ok"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "retriable"
    if status in (401, 403) or (auth_call and status == 404):
        return "unauthorized"
    return "rejected"


class CryptomusRest:
    def __init__(
        self,
        api_url: str,
        scales_url: str,
        user_id: Secret,
        api_key: Secret,
        timeout_s: float = 10.0,
        session: requests.Session | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        on_answer: Callable[[str, str, float], None] | None = None,
    ) -> None:
        """``on_answer(endpoint, outcome, seconds)`` is told about every call, failed
        ones included (endpoint ``ws_token``, ``markets`` or ``scales``)."""
        self.api_url = api_url.rstrip("/")
        self.scales_url = scales_url.rstrip("/")
        self._user_id = user_id
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self.on_answer = on_answer
        self.session = install(session or requests.Session())

    def _signed_headers(self, body: bytes = b"") -> dict[str, str]:
        return {
            "userId": self._user_id.reveal(),
            "sign": sign(body, self._api_key.reveal()),
            "Accept": "application/json",
        }

    def _get(
        self,
        what: str,
        endpoint: str,
        url: str,
        headers: dict[str, str],
        auth_call: bool = False,
    ) -> bytes:
        started = time.monotonic()
        outcome = "retriable"
        try:
            try:
                response = fetch(
                    self.session,
                    "GET",
                    url,
                    headers=headers,
                    deadline_s=self.timeout_s,
                    max_body_bytes=self.max_body_bytes,
                )
            except DeadlineExceeded as exc:
                raise RetriableError(f"{what}: {exc}") from None
            except requests.RequestException as exc:
                # The exception text may hold the URL; never the headers. Keep only its type.
                raise RetriableError(f"{what}: {type(exc).__name__}") from None
            status = response.status_code
            outcome = _outcome(status, auth_call)
            check_status(what, status, auth_call)
            if response.truncated:
                outcome = "retriable"
                raise RetriableError(f"{what}: answer larger than {self.max_body_bytes} bytes")
            return response.body
        finally:
            if self.on_answer is not None:
                self.on_answer(endpoint, outcome, time.monotonic() - started)

    def ws_token(self) -> str:
        """A fresh one-time token (valid 5 minutes or until the first connection)."""
        body = self._get(
            "web-socket token",
            "ws_token",
            self.api_url + TOKEN_PATH,
            self._signed_headers(),
            auth_call=True,
        )
        try:
            return protocol.parse_token(body)
        except BadMessage as exc:
            raise RetriableError(f"web-socket token: {exc.reason}") from None

    def markets(self) -> list[protocol.Market]:
        body = self._get(
            "market list", "markets", self.api_url + MARKETS_PATH, self._signed_headers()
        )
        try:
            return protocol.parse_markets(body)
        except BadMessage as exc:
            raise RetriableError(f"market list: {exc}") from None

    def scales(self, symbol: str) -> dict[int, str]:
        url = f"{self.scales_url}{SCALES_PATH}?{urlencode({'symbol': symbol})}"
        body = self._get(
            f"symbol scales of {symbol}", "scales", url, {"Accept": "application/json"}
        )
        try:
            return protocol.parse_scales(body)
        except BadMessage as exc:
            raise RetriableError(f"symbol scales of {symbol}: {exc}") from None
