"""Configuration of the Cryptomus WebSocket source (the ``cryptomus:`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from connectors.cryptomus.protocol import CHANNELS
from connectors.runtime.config import Secret, positive, read_secrets
from connectors.runtime.errors import ConfigError
from connectors.runtime.settings import KafkaSettings, RuntimeSettings, StreamSettings

USER_ID_ENV = "CRYPTOMUS_USER_ID"
API_KEY_ENV = "CRYPTOMUS_API_KEY"
#: The server closes a connection that sent nothing for this long (spec: 60 s).
IDLE_LIMIT_S = 60


@dataclass(frozen=True)
class Credentials:
    """Prefer ``$CRYPTOMUS_USER_ID``/``$CRYPTOMUS_API_KEY`` or mounted files."""

    user_id: Secret | None = None
    user_id_file: str | None = None
    api_key: Secret | None = None
    api_key_file: str | None = None

    def __repr__(self) -> str:
        return "Credentials(***)"

    def resolve(self) -> tuple[Secret, Secret]:
        envs = {"user_id": USER_ID_ENV, "api_key": API_KEY_ENV}
        user, key = read_secrets(self, "cryptomus.credentials", envs)
        assert user is not None and key is not None
        return user, key


@dataclass(frozen=True)
class Topics:
    lastprice: str = "cryptomus.lastprice"
    depth: str = "cryptomus.depth"
    ticker: str = "cryptomus.tickers"
    trade: str = "cryptomus.trades"
    order: str = "cryptomus.orders"
    balance: str = "cryptomus.balances"
    deal: str = "cryptomus.deals"
    dead_letter: str = "cryptomus.dead-letter"

    def for_channel(self, channel: str) -> str:
        return str(getattr(self, channel))


@dataclass(frozen=True)
class CryptomusSettings:
    ws_url: str = "wss://api-ws.cryptomus.com/ws"
    #: Token and market-list endpoints.
    api_url: str = "https://api.cryptomus.com"
    #: Symbol-scales endpoint (depth scale indices).
    scales_url: str = "https://exchange-ws.cryptomus.com"
    #: ``all`` or a list of market symbols such as ``BTC_USDT``.
    markets: str | list[str] = "all"
    channels: list[str] = field(default_factory=lambda: ["lastprice", "depth", "ticker", "trade"])
    #: Depth scale indices for every market; empty = every index the exchange lists.
    depth_scale_indices: list[int] = field(default_factory=list)
    #: Currencies for the balance channel; empty = base currencies of ``markets``.
    balance_currencies: list[str] = field(default_factory=list)
    ping_interval_s: float = 50.0
    ping_timeout_s: float = 10.0
    #: Reconnect when nothing at all (not even a pong) arrives for this long.
    stale_after_s: float = 120.0
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 10.0
    http_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: A connection that lasted this long resets the back-off.
    healthy_after_s: float = 30.0
    max_frame_bytes: int = 4 * 1024 * 1024
    #: Re-read the market list (and scales) this often; a changed subscription is
    #: unsubscribed and subscribed again in place, with resync markers. 0 = never.
    market_refresh_s: float = 3600.0
    credentials: Credentials = field(default_factory=Credentials)
    topics: Topics = field(default_factory=Topics)

    def validate(self) -> None:
        self.stream.validate("cryptomus", idle_limit_s=IDLE_LIMIT_S)
        positive("cryptomus.http_timeout_s", self.http_timeout_s)
        unknown = [c for c in self.channels if c not in CHANNELS]
        if unknown:
            raise ConfigError(
                f"cryptomus.channels: unknown {', '.join(unknown)} (known: {', '.join(CHANNELS)})"
            )
        if not self.channels:
            raise ConfigError("cryptomus.channels: at least one channel is needed")
        if isinstance(self.markets, str) and self.markets != "all":
            raise ConfigError("cryptomus.markets: 'all' or a list of symbols")
        if isinstance(self.markets, list) and not self.markets:
            raise ConfigError("cryptomus.markets: the list is empty")
        if self.market_refresh_s < 0:
            raise ConfigError("cryptomus.market_refresh_s: 0 (never) or a positive number")

    @property
    def stream(self) -> StreamSettings:
        """The streaming runtime's settings (the same keys; the plan is the market list)."""
        same: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in fields(StreamSettings) if hasattr(self, f.name)
        }
        return StreamSettings(**same, plan_refresh_s=self.market_refresh_s)

    @property
    def market_list(self) -> list[str] | None:
        return None if isinstance(self.markets, str) else list(self.markets)


@dataclass(frozen=True)
class CryptomusConfig:
    cryptomus: CryptomusSettings = field(default_factory=CryptomusSettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
