"""Configuration of the Robicoin order-command sink (``robicoin-orders``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from connectors.robicoin.config import AccountSettings, AccountShare, RateLimitSettings
from connectors.runtime.config import Secret, excerpt, positive, read_secret
from connectors.runtime.errors import ConfigError
from connectors.runtime.settings import KafkaSettings, RuntimeSettings

HMAC_SECRET_ENV = "ROBICOIN_COMMAND_HMAC_SECRET"


def _positive_decimal(text: str, where: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ConfigError(f"{where}: {excerpt(text)} is not a decimal") from None
    if not value.is_finite() or value <= 0:
        raise ConfigError(f"{where}: must be a positive decimal")
    return value


@dataclass(frozen=True)
class RiskSettings:
    #: The kill switch's starting position; the control topic can flip it at run time.
    trading_enabled: bool = True
    #: Largest order value in the quote currency (buy: amount; sell: amount x price).
    #: A decimal string; unset = no limit.
    max_notional: str | None = None
    #: Largest ``amount`` per pair, e.g. ``{btc-try: "0.5"}`` (decimal strings).
    max_amount: dict[str, str] = field(default_factory=dict)
    #: New orders per rolling minute; more are rejected (0 = no limit).
    max_orders_per_minute: int = 60

    def validate(self) -> None:
        if self.max_notional is not None:
            _positive_decimal(self.max_notional, "robicoin.risk.max_notional")
        for pair, text in self.max_amount.items():
            _positive_decimal(text, f"robicoin.risk.max_amount.{pair}")
        if self.max_orders_per_minute < 0:
            raise ConfigError("robicoin.risk.max_orders_per_minute must be >= 0")


@dataclass(frozen=True)
class CommandAuth:
    """HMAC-SHA256 over each command's canonical form, with a shared secret."""

    required: bool = False
    secret: Secret | None = None
    secret_file: str | None = None

    def __repr__(self) -> str:
        return f"CommandAuth(required={self.required}, secret=***)"

    def resolve(self) -> bytes | None:
        secret = read_secret(
            value=self.secret.reveal() if self.secret else None,
            file=self.secret_file,
            env=HMAC_SECRET_ENV,
            what="robicoin.command_auth.secret",
            required=self.required,
        )
        return secret.reveal().encode("utf-8") if secret is not None else None


@dataclass(frozen=True)
class SinkTopics:
    commands: str = "robicoin.order-commands"
    results: str = "robicoin.order-results"
    #: Compacted, keyed by command_id: pending before the exchange call, outcome after.
    ledger: str = "robicoin.order-ledger"
    dead_letter: str = "robicoin.order-commands.dead-letter"
    #: Compacted: ``{"trading_enabled": false}`` / ``{"paused": true}`` from operators.
    control: str = "robicoin.order-control"


@dataclass(frozen=True)
class ConsumerSettings:
    group_id: str = "robicoin-orders"
    max_poll_interval_ms: int = 300_000
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000

    def validate(self) -> None:
        for name in ("max_poll_interval_ms", "session_timeout_ms", "heartbeat_interval_ms"):
            positive(f"robicoin.consumer.{name}", getattr(self, name), "milliseconds")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            # kafka-python refuses this when the consumer starts.
            raise ConfigError(
                "robicoin.consumer.heartbeat_interval_ms must be shorter than session_timeout_ms"
            )


@dataclass(frozen=True)
class OrderSinkSettings(AccountSettings):
    """The sink's ``robicoin:`` section (account access as for the poller, plus orders)."""

    rate_limit: RateLimitSettings = field(
        default_factory=lambda: RateLimitSettings(share=AccountShare(slots=2, slot=1))
    )
    #: Pairs commands may name.
    pairs: list[str] = field(default_factory=lambda: ["btc-try", "eth-try", "ltc-try"])
    max_decimals: int = 8
    #: A command older than this when consumed (after an outage) is ``expired``. 0 = never.
    command_max_age_s: float = 60.0
    #: Wait this long after an ambiguous call before reading the exchange's state.
    reconcile_settle_s: float = 1.0
    #: Attempts for a call that certainly did not reach the exchange (refused, 429).
    max_send_attempts: int = 5
    risk: RiskSettings = field(default_factory=RiskSettings)
    command_auth: CommandAuth = field(default_factory=CommandAuth)
    topics: SinkTopics = field(default_factory=SinkTopics)
    consumer: ConsumerSettings = field(default_factory=ConsumerSettings)

    def validate(self) -> None:
        super().validate()
        if not self.pairs:
            raise ConfigError("robicoin.pairs: list the pairs commands may trade")
        if not 0 <= self.max_decimals <= 8:
            raise ConfigError("robicoin.max_decimals must be between 0 and 8")
        if self.command_max_age_s < 0 or self.reconcile_settle_s < 0:
            raise ConfigError("robicoin.command_max_age_s / reconcile_settle_s must be >= 0")
        if self.max_send_attempts < 1:
            raise ConfigError("robicoin.max_send_attempts must be at least 1")


@dataclass(frozen=True)
class OrderSinkConfig:
    robicoin: OrderSinkSettings = field(default_factory=OrderSinkSettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
