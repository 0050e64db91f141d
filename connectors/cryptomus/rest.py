"""The three REST calls the stream needs: WebSocket token, market list, symbol scales.

Blocking (``requests``); the source runs them in a worker thread. Each call has one
deadline (``timeout_s``: connect and the whole answer) and reads at most
``max_body_bytes``; past either it is a retriable error. Statuses mean what
:func:`connectors.runtime.http.status_outcome` says: network errors, 5xx and 429 are
retriable, 401/403 (and 404 "user not found" on the token call) refuse the credentials.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlencode

import requests

from connectors.cryptomus import protocol
from connectors.cryptomus.signing import sign
from connectors.runtime.config import Secret
from connectors.runtime.errors import BadMessage, RetriableError
from connectors.runtime.http import (
    DeadlineExceeded,
    fetch,
    install,
    raise_for_outcome,
    status_outcome,
)

TOKEN_PATH = "/v2/user-api/exchange/account/web-socket/token"
MARKETS_PATH = "/v2/user-api/exchange/markets"
SCALES_PATH = "/api/v2/symbol-scales"
#: Longest answer read; the market list of a large exchange is well under this.
MAX_BODY_BYTES = 4 * 1024 * 1024


#: The token call also answers 404 when the user id is unknown ("user not found").
TOKEN_AUTH_STATUSES = (401, 403, 404)
_T = TypeVar("_T")


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
        parse: Callable[[bytes], _T],
        auth_call: bool = False,
    ) -> _T:
        """One GET, its answer parsed; an answer of the wrong shape is retriable."""
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
            outcome = status_outcome(status, TOKEN_AUTH_STATUSES if auth_call else (401, 403))
            raise_for_outcome(what, status, outcome)
            if response.truncated:
                outcome = "retriable"
                raise RetriableError(f"{what}: answer larger than {self.max_body_bytes} bytes")
        finally:
            if self.on_answer is not None:
                self.on_answer(endpoint, outcome, time.monotonic() - started)
        try:
            return parse(response.body)
        except BadMessage as exc:
            # Of a token answer only the reason: nothing of a token goes into an error.
            detail = exc.reason if parse is protocol.parse_token else str(exc)
            raise RetriableError(f"{what}: {detail}") from None

    def ws_token(self) -> str:
        """A fresh one-time token (valid 5 minutes or until the first connection)."""
        url, headers = self.api_url + TOKEN_PATH, self._signed_headers()
        return self._get("web-socket token", "ws_token", url, headers, protocol.parse_token, True)

    def markets(self) -> list[protocol.Market]:
        url, headers = self.api_url + MARKETS_PATH, self._signed_headers()
        return self._get("market list", "markets", url, headers, protocol.parse_markets)

    def scales(self, symbol: str) -> dict[int, str]:
        url = f"{self.scales_url}{SCALES_PATH}?{urlencode({'symbol': symbol})}"
        headers = {"Accept": "application/json"}
        return self._get(
            f"symbol scales of {symbol}", "scales", url, headers, protocol.parse_scales
        )
