"""Configuration of the Robicoin REST poller (the ``robicoin:`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from connectors.robicoin.client import Credentials
from connectors.robicoin.protocol import TICKER_WINDOWS
from connectors.runtime.authguard import fingerprint
from connectors.runtime.config import Secret, excerpt, positive, read_secrets
from connectors.runtime.errors import ConfigError
from connectors.runtime.settings import KafkaSettings, RuntimeSettings

PUBLIC_KEY_ENV = "ROBICOIN_PUBLIC_KEY"
PUBLIC_ID_ENV = "ROBICOIN_PUBLIC_ID"
PRIVATE_KEY_ENV = "ROBICOIN_PRIVATE_KEY"


@dataclass(frozen=True)
class CredentialSettings:
    """Prefer ``$ROBICOIN_PUBLIC_KEY``/``_PUBLIC_ID``/``_PRIVATE_KEY`` or mounted files."""

    public_key: Secret | None = None
    public_key_file: str | None = None
    public_id: Secret | None = None
    public_id_file: str | None = None
    private_key: Secret | None = None
    private_key_file: str | None = None

    def __repr__(self) -> str:
        return "CredentialSettings(***)"

    def resolve(self, required: bool = True) -> Credentials | None:
        envs = {
            "public_key": PUBLIC_KEY_ENV,
            "public_id": PUBLIC_ID_ENV,
            "private_key": PRIVATE_KEY_ENV,
        }
        parts = read_secrets(self, "robicoin.credentials", envs, required)
        if any(p is None for p in parts):
            return None
        key, pid, private = (p.reveal() for p in parts if p is not None)
        return Credentials(key, pid, private)


def credential_fingerprint(creds: Credentials) -> str:
    """Names the credential set in the auth guard and the default transactional id."""
    return fingerprint("robicoin", creds.public_key, creds.public_id, creds.private_key)


@dataclass(frozen=True)
class Limit:
    count: int
    window_s: float


@dataclass(frozen=True)
class AccountShare:
    """This connector's slots of the account's shared "1 request per 100 ms" budget.

    The poller and the order sink of one account must use different ``slot`` values of
    the same ``slots``; a poller running alone can take ``slots: 1``.
    """

    slots: int = 2
    slot: int = 0

    def validate(self) -> None:
        if self.slots < 1 or not 0 <= self.slot < self.slots:
            raise ConfigError(
                f"robicoin.rate_limit.share: slot must be in 0..{self.slots - 1} "
                f"(got slot {self.slot} of {self.slots})"
            )


OWN_MARGIN = 0.02
SHARED_MARGIN = 0.2


@dataclass(frozen=True)
class RateLimitSettings:
    #: Fraction added to every window. Unset: 0.02 for a budget this process owns
    #: (windows start at each answer, so only the exchange's clock rounding needs room)
    #: and 0.2 when time slots are shared with other processes (arrival jitter).
    margin: float | None = None
    ticker: Limit = field(default_factory=lambda: Limit(10, 0.1))
    other: Limit = field(default_factory=lambda: Limit(1, 0.1))
    share: AccountShare = field(default_factory=AccountShare)

    def validate(self) -> None:
        if self.margin is not None and self.margin < 0:
            # Less than the exchange's window would exceed its limit.
            raise ConfigError("robicoin.rate_limit.margin must be >= 0")

    def margin_for(self, shared: bool) -> float:
        if self.margin is not None:
            return self.margin
        return SHARED_MARGIN if shared else OWN_MARGIN


@dataclass(frozen=True)
class AuthGuardSettings:
    #: Recorded failures (including unconfirmed first attempts) before refusing.
    limit: int = 2
    topic: str = "robicoin.auth-guard"
    #: While refusing, re-read the guard this often to notice an operator reset.
    recheck_s: float = 5.0

    def validate(self) -> None:
        positive("robicoin.auth_guard.recheck_s", self.recheck_s)
        if not 1 <= self.limit <= 5:
            raise ConfigError(
                "robicoin.auth_guard.limit must be between 1 and 5 (the exchange blocks "
                "the IP at 10 unauthorized requests)"
            )


@dataclass(frozen=True)
class StreamSettings:
    enabled: bool = True
    #: Seconds between polls; 0 = as fast as the rate limit allows.
    interval_s: float = 2.0


@dataclass(frozen=True)
class TickerStream(StreamSettings):
    interval_s: float = 1.0
    #: ``24h`` (GET /ticker) and/or the calendar windows 1min, 1hour, 1day, 1month.
    windows: list[str] = field(default_factory=lambda: ["24h"])


@dataclass(frozen=True)
class SnapshotStream(StreamSettings):
    #: ``changes``: a record only when a row changed; ``every_poll``: every row every poll.
    emit: Literal["changes", "every_poll"] = "changes"


@dataclass(frozen=True)
class Streams:
    ticker: TickerStream = field(default_factory=TickerStream)
    order: StreamSettings = field(default_factory=StreamSettings)
    balance: SnapshotStream = field(default_factory=lambda: SnapshotStream(interval_s=5.0))
    transaction: StreamSettings = field(default_factory=lambda: StreamSettings(interval_s=1.0))
    open_order: SnapshotStream = field(default_factory=SnapshotStream)


@dataclass(frozen=True)
class Topics:
    ticker: str = "robicoin.ticker"
    order: str = "robicoin.orders"
    balance: str = "robicoin.balances"
    transaction: str = "robicoin.transactions"
    open_order: str = "robicoin.open-orders"
    dead_letter: str = "robicoin.dead-letter"
    #: Compacted: cursors and last snapshots, written in the same transactions.
    state: str = "robicoin.poller-state"


@dataclass(frozen=True)
class AccountSettings:
    """What every Robicoin connector needs to call the exchange for one account."""

    base_url: str = "https://www.robicoin.com/api/v1"
    #: Zone of the exchange's zone-less ``created_at``/``updated_at`` text.
    timezone: str = "Europe/Istanbul"
    credentials: CredentialSettings = field(default_factory=CredentialSettings)
    request_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    rate_limit: RateLimitSettings = field(default_factory=RateLimitSettings)
    auth_guard: AuthGuardSettings = field(default_factory=AuthGuardSettings)
    #: Kafka transactional id; one per account. Default: <connector>-<fingerprint>.
    transactional_id: str | None = None

    def validate(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"robicoin.timezone: unknown zone {excerpt(self.timezone)}") from None
        positive("robicoin.request_timeout_s", self.request_timeout_s)
        positive("robicoin.connect_timeout_s", self.connect_timeout_s)
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError("robicoin.base_url must be an http(s) URL")
        for name in ("ticker", "other"):
            if getattr(self.rate_limit, name).count < 1:
                # A budget of no requests could never send anything.
                raise ConfigError(f"robicoin.rate_limit.{name}.count must be at least 1")
        if self.rate_limit.ticker.count > 10 or self.rate_limit.ticker.window_s < 0.1:
            raise ConfigError("robicoin.rate_limit.ticker: the exchange allows 10 per 100 ms")
        if self.rate_limit.other.count > 1 or self.rate_limit.other.window_s < 0.1:
            raise ConfigError("robicoin.rate_limit.other: the exchange allows 1 per 100 ms")
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError("robicoin.backoff_*: need 0 < initial <= max")


@dataclass(frozen=True)
class RobicoinSettings(AccountSettings):
    """The poller's ``robicoin:`` section."""

    streams: Streams = field(default_factory=Streams)
    topics: Topics = field(default_factory=Topics)

    def validate(self) -> None:
        super().validate()
        bad = [w for w in self.streams.ticker.windows if w not in TICKER_WINDOWS]
        if bad or (self.streams.ticker.enabled and not self.streams.ticker.windows):
            raise ConfigError(
                f"robicoin.streams.ticker.windows: choose from {', '.join(TICKER_WINDOWS)}"
            )
        for name in self.stream_names():
            if getattr(self.streams, name).interval_s < 0:
                raise ConfigError(f"robicoin.streams.{name}.interval_s must be >= 0")
        if not any(getattr(self.streams, n).enabled for n in self.stream_names()):
            raise ConfigError("robicoin.streams: enable at least one stream")

    @staticmethod
    def stream_names() -> tuple[str, ...]:
        return ("ticker", "order", "balance", "transaction", "open_order")

    @property
    def private_streams(self) -> list[str]:
        return [
            n
            for n in ("order", "balance", "transaction", "open_order")
            if getattr(self.streams, n).enabled
        ]


@dataclass(frozen=True)
class RobicoinConfig:
    robicoin: RobicoinSettings = field(default_factory=RobicoinSettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
