"""Configuration of the Cryptomus WebSocket source (the ``cryptomus:`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field

from connectors.cryptomus.protocol import CHANNELS
from connectors.runtime.app import RuntimeSettings
from connectors.runtime.config import Secret, positive, read_secret
from connectors.runtime.errors import ConfigError
from connectors.runtime.kafka import KafkaSettings

USER_ID_ENV = "CRYPTOMUS_USER_ID"
API_KEY_ENV = "CRYPTOMUS_API_KEY"


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
        user = read_secret(
            value=self.user_id.reveal() if self.user_id else None,
            file=self.user_id_file,
            env=USER_ID_ENV,
            what="cryptomus.credentials.user_id",
        )
        key = read_secret(
            value=self.api_key.reveal() if self.api_key else None,
            file=self.api_key_file,
            env=API_KEY_ENV,
            what="cryptomus.credentials.api_key",
        )
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
        for name in ("ping_timeout_s", "connect_timeout_s", "request_timeout_s", "http_timeout_s"):
            positive(f"cryptomus.{name}", getattr(self, name))
        positive("cryptomus.max_frame_bytes", self.max_frame_bytes, "bytes")
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
        if not 0 < self.ping_interval_s < 60:
            raise ConfigError(
                "cryptomus.ping_interval_s must be under the server's 60 s idle limit"
            )
        if self.stale_after_s <= self.ping_interval_s:
            raise ConfigError("cryptomus.stale_after_s must be longer than ping_interval_s")
        if self.market_refresh_s < 0:
            raise ConfigError("cryptomus.market_refresh_s: 0 (never) or a positive number")
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError("cryptomus.backoff_*: need 0 < initial <= max")

    @property
    def market_list(self) -> list[str] | None:
        return None if isinstance(self.markets, str) else list(self.markets)


@dataclass(frozen=True)
class CryptomusConfig:
    cryptomus: CryptomusSettings = field(default_factory=CryptomusSettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
