"""The settings every connector's config shares: the ``kafka:`` and ``runtime:`` sections.

Connector configs import them from here, never from the runner (:mod:`.app`) or the
producer (:mod:`.kafka`), so reading a config needs no Kafka client: kafka-python is
imported only inside :meth:`KafkaSettings.validate` (its producer's own list of
settings is the list of what ``kafka.client`` may hold), and confluent-kafka only there
too, when that backend is chosen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from connectors.runtime.config import Secret, excerpt, positive
from connectors.runtime.errors import ConfigError

#: ``kafka.producer_backend`` values; transactions always use kafka-python.
PRODUCER_BACKENDS = ("kafka-python", "confluent-kafka")
#: What kafka-python connects with (transactions always use it, so its spelling).
SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
#: Parts of a ``kafka.client`` key that mark its value as a secret.
SECRET_HINTS = ("password", "token", "secret")
# Settings the runtime owns: delivery guarantees are not negotiable per deployment.
_OWNED = {
    "bootstrap_servers",
    "acks",
    "enable_idempotence",
    "key_serializer",
    "value_serializer",
    "kafka_client",
    "transactional_id",
}

#: ``kafka.client`` keys the librdkafka backend understands: kafka-python name →
#: librdkafka name. Any other key is refused rather than dropped: a security setting
#: must never be ignored quietly.
RDKAFKA_CLIENT_KEYS = {
    "client_id": "client.id",
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
}
# OAUTHBEARER without a token provider makes librdkafka use unsecured JWTs, and
# kafka-python's token provider cannot be passed on: refused, like any unmapped key.
_RDKAFKA_SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI")


@dataclass(frozen=True)
class RuntimeSettings:
    """The ``runtime:`` section of every connector's config."""

    health_host: str = "0.0.0.0"
    health_port: int = 8080
    log_level: str = "INFO"
    log_json: bool = False
    #: How long SIGTERM waits for Kafka to acknowledge buffered records.
    drain_timeout_s: float = 20.0

    def validate(self) -> None:
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"runtime.log_level: unknown level {excerpt(self.log_level)}")
        if not 0 <= self.health_port <= 65535:
            raise ConfigError(f"runtime.health_port: {self.health_port} is not in 0..65535")
        positive("runtime.drain_timeout_s", self.drain_timeout_s)


@dataclass(frozen=True)
class KafkaSettings:
    """The ``kafka:`` section of every connector's config."""

    bootstrap_servers: str = "localhost:9092"
    #: Passed to kafka-python as they are: security_protocol, sasl_mechanism,
    #: sasl_plain_username/password, ssl_cafile/certfile/keyfile, client_id, ...
    client: dict[str, Any] = field(default_factory=dict)
    linger_ms: int = 5
    compression_type: str | None = None
    delivery_timeout_ms: int = 120_000
    request_timeout_ms: int = 30_000
    #: Unacknowledged records allowed before the source stops reading (memory bound).
    max_buffered_records: int = 20_000
    #: Stop reading when the oldest unacknowledged record is older than this.
    stall_after_s: float = 10.0
    #: Longest wait for Kafka to confirm one transaction (records, offsets, commit).
    commit_timeout_s: float = 15.0
    create_topics: bool = True
    topic_partitions: int = 3
    replication_factor: int = 1
    #: The stream producer: kafka-python, or librdkafka (``pip install
    #: 'exchange-connectors[confluent]'``). Transactions always use kafka-python.
    producer_backend: str = "kafka-python"

    def validate(self) -> None:
        from kafka import KafkaProducer  # its settings are what kafka.client may hold

        allowed = set(KafkaProducer.DEFAULT_CONFIG) - _OWNED
        for key in self.client:
            if key in _OWNED:
                raise ConfigError(
                    f"kafka.client.{key} is set by the connector and cannot be changed"
                )
            if key not in allowed:
                raise ConfigError(f"kafka.client: unknown kafka-python setting {excerpt(key)}")
            wrong_type = isinstance(self.client[key], int | float | list | tuple | dict)
            if wrong_type and any(h in key for h in SECRET_HINTS):
                raise ConfigError(
                    f"kafka.client.{key}: expected a string (quote it); "
                    "the value is a secret and is not shown"
                )
        protocol = self.client.get("security_protocol", "PLAINTEXT")
        if protocol not in SECURITY_PROTOCOLS:
            raise ConfigError(
                f"kafka.client.security_protocol: {excerpt(protocol)} is not one of "
                f"{', '.join(SECURITY_PROTOCOLS)}"
            )
        for name in ("topic_partitions", "replication_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"kafka.{name} must be at least 1")
        positive("kafka.stall_after_s", self.stall_after_s)
        positive("kafka.commit_timeout_s", self.commit_timeout_s)
        positive("kafka.delivery_timeout_ms", self.delivery_timeout_ms, "milliseconds")
        positive("kafka.request_timeout_ms", self.request_timeout_ms, "milliseconds")
        if self.linger_ms < 0:
            raise ConfigError("kafka.linger_ms must be >= 0")
        if self.max_buffered_records < 1:
            raise ConfigError("kafka.max_buffered_records must be at least 1")
        if self.stall_after_s * 1000 >= self.delivery_timeout_ms:
            raise ConfigError("kafka.stall_after_s must be shorter than delivery_timeout_ms")
        if self.producer_backend not in PRODUCER_BACKENDS:
            allowed_backends = ", ".join(repr(b) for b in PRODUCER_BACKENDS)
            raise ConfigError(
                f"kafka.producer_backend: {excerpt(self.producer_backend)} is not one of "
                f"{allowed_backends}"
            )
        if self.producer_backend == "confluent-kafka":
            require_confluent_kafka()
            check_rdkafka_client(self.client)

    def client_config(self, for_client: type | None = None) -> dict[str, Any]:
        """Connection settings for ``for_client`` (producer-only keys such as
        ``max_request_size`` are left out for the admin client and consumers)."""
        accepted = getattr(for_client, "DEFAULT_CONFIG", None)
        out: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers.split(",")}
        for key, value in self.client.items():
            if accepted is None or key in accepted:
                out[key] = value.reveal() if isinstance(value, Secret) else value
        return out

    def __repr__(self) -> str:
        shown = {
            k: ("***" if any(h in k for h in SECRET_HINTS) else v) for k, v in self.client.items()
        }
        return f"KafkaSettings(bootstrap_servers={self.bootstrap_servers!r}, client={shown!r})"


def require_confluent_kafka() -> None:
    """The librdkafka backend's package is installed, or a ConfigError naming the extra."""
    try:
        import confluent_kafka  # noqa: F401
    except ImportError as exc:
        if exc.name != "confluent_kafka":
            raise
        raise ConfigError(
            "kafka.producer_backend confluent-kafka needs the confluent-kafka package: "
            "pip install 'exchange-connectors[confluent]'"
        ) from None


def check_rdkafka_client(client: Mapping[str, Any]) -> None:
    """Refuse ``kafka.client`` keys the librdkafka backend cannot honour (names only,
    no values)."""
    for key in client:
        if key not in RDKAFKA_CLIENT_KEYS:
            supported = ", ".join(sorted(RDKAFKA_CLIENT_KEYS))
            raise ConfigError(
                f"kafka.client.{key} is not supported with kafka.producer_backend "
                f"confluent-kafka (supported: {supported})"
            )
    protocol = str(client.get("security_protocol", "PLAINTEXT")).upper()
    mechanism = client.get("sasl_mechanism")
    if protocol.startswith("SASL_") and mechanism is None:
        # librdkafka would silently fall back to GSSAPI; kafka-python refuses too.
        raise ConfigError("kafka.client.sasl_mechanism is required with a SASL security_protocol")
    if mechanism is not None and str(mechanism).upper() not in _RDKAFKA_SASL_MECHANISMS:
        raise ConfigError(
            f"kafka.client.sasl_mechanism {mechanism!r} is not supported with "
            f"kafka.producer_backend confluent-kafka "
            f"(one of {', '.join(_RDKAFKA_SASL_MECHANISMS)})"
        )


@dataclass(frozen=True)
class StreamSettings:
    """The timing and limits of one streaming source (from the exchange's config)."""

    ping_interval_s: float = 50.0
    ping_timeout_s: float = 10.0
    #: Reconnect when nothing at all (not even a pong) arrives for this long.
    stale_after_s: float = 120.0
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: A connection that lasted this long resets the back-off (as does one that streamed).
    healthy_after_s: float = 30.0
    max_frame_bytes: int = 4 * 1024 * 1024
    #: Re-read the plan this often; 0 = never.
    plan_refresh_s: float = 3600.0

    def validate(self, prefix: str, idle_limit_s: float | None = None) -> None:
        """``prefix`` names the config section in errors; ``idle_limit_s`` is how long
        the server lets a connection sit without a message (pings must come sooner)."""
        for name in ("ping_timeout_s", "connect_timeout_s", "request_timeout_s"):
            positive(f"{prefix}.{name}", getattr(self, name))
        positive(f"{prefix}.max_frame_bytes", self.max_frame_bytes, "bytes")
        if idle_limit_s is not None and not 0 < self.ping_interval_s < idle_limit_s:
            raise ConfigError(
                f"{prefix}.ping_interval_s must be under the server's {idle_limit_s:g} s idle limit"
            )
        positive(f"{prefix}.ping_interval_s", self.ping_interval_s)
        if self.stale_after_s <= self.ping_interval_s:
            raise ConfigError(f"{prefix}.stale_after_s must be longer than ping_interval_s")
        if self.backoff_initial_s <= 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ConfigError(f"{prefix}.backoff_*: need 0 < initial <= max")


def demo_sections(bootstrap: str) -> dict[str, Any]:
    """The ``kafka:`` and ``runtime:`` sections of a connector in ``demo``: the demo's
    broker, health and metrics on a free loopback port."""
    return {
        "kafka": KafkaSettings(bootstrap_servers=bootstrap),
        "runtime": RuntimeSettings(health_host="127.0.0.1", health_port=0),
    }
