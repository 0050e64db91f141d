"""The three REST calls the stream needs: WebSocket token, market list, symbol scales.

Blocking (``requests``); the source runs them in a worker thread. Status handling
lives in :func:`check_status`: network errors, 5xx and 429 are retriable, 401/403
(and 404 "user not found" on the token call) mean the credentials are refused.
"""

from __future__ import annotations

from urllib.parse import urlencode

import requests

from connectors.cryptomus import protocol
from connectors.cryptomus.signing import sign
from connectors.runtime.config import Secret
from connectors.runtime.errors import AuthError, BadMessage, FatalError, RetriableError

TOKEN_PATH = "/v2/user-api/exchange/account/web-socket/token"
MARKETS_PATH = "/v2/user-api/exchange/markets"
SCALES_PATH = "/api/v2/symbol-scales"


def check_status(what: str, status: int, auth_call: bool = False) -> None:
    """The one place that decides what an HTTP status means for the caller."""
    if status < 300:
        return
    if status == 429 or status >= 500:
        raise RetriableError(f"{what}: HTTP {status}")
    if status in (401, 403) or (auth_call and status == 404):
        raise AuthError(f"{what}: the exchange refused the credentials (HTTP {status})")
    raise FatalError(f"{what}: HTTP {status}")


class CryptomusRest:
    def __init__(
        self,
        api_url: str,
        scales_url: str,
        user_id: Secret,
        api_key: Secret,
        timeout_s: float = 10.0,
        session: requests.Session | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.scales_url = scales_url.rstrip("/")
        self._user_id = user_id
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.session = session or requests.Session()

    def _signed_headers(self, body: bytes = b"") -> dict[str, str]:
        return {
            "userId": self._user_id.reveal(),
            "sign": sign(body, self._api_key.reveal()),
            "Accept": "application/json",
        }

    def _get(self, what: str, url: str, headers: dict[str, str], auth_call: bool = False) -> bytes:
        try:
            response = self.session.get(url, headers=headers, timeout=self.timeout_s)
        except requests.RequestException as exc:
            # The exception text may hold the URL; never the headers. Keep only its type.
            raise RetriableError(f"{what}: {type(exc).__name__}") from None
        check_status(what, response.status_code, auth_call)
        return response.content

    def ws_token(self) -> str:
        """A fresh one-time token (valid 5 minutes or until the first connection)."""
        body = self._get(
            "web-socket token", self.api_url + TOKEN_PATH, self._signed_headers(), auth_call=True
        )
        try:
            return protocol.parse_token(body)
        except BadMessage as exc:
            raise RetriableError(f"web-socket token: {exc.reason}") from None

    def markets(self) -> list[protocol.Market]:
        body = self._get("market list", self.api_url + MARKETS_PATH, self._signed_headers())
        try:
            return protocol.parse_markets(body)
        except BadMessage as exc:
            raise RetriableError(f"market list: {exc}") from None

    def scales(self, symbol: str) -> dict[int, str]:
        url = f"{self.scales_url}{SCALES_PATH}?{urlencode({'symbol': symbol})}"
        body = self._get(f"symbol scales of {symbol}", url, {"Accept": "application/json"})
        try:
            return protocol.parse_scales(body)
        except BadMessage as exc:
            raise RetriableError(f"symbol scales of {symbol}: {exc}") from None
