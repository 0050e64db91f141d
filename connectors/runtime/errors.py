"""One exception tree, grouped by what the caller does about it.

::

    ConnectorError
    ├── ConfigError          bad configuration: stop at start-up, exit 2
    ├── RetriableError       transient (network, 5xx, 429, timeouts): back off, try again
    ├── RejectedError        the exchange refused this one request (a 4xx): do not
    │                        repeat it; report it and go on
    ├── FatalError           cannot go on (auth refused, terminal producer failure):
    │   │                    become not-ready, flush what can be flushed, exit non-zero
    │   └── AuthError        the exchange refused our credentials
    └── BadMessage           one inbound message is unusable: dead-letter it, count it, go on

Every error message is written so that it never contains a secret: callers pass
reasons and field names, never header values or tokens.
"""

from __future__ import annotations


class ConnectorError(Exception):
    """Base of every error raised on purpose by this package."""

    retriable = False


class ConfigError(ConnectorError):
    """The configuration is invalid; nothing was started."""


class RetriableError(ConnectorError):
    """A transient failure: the same call may succeed after a back-off."""

    retriable = True


class RejectedError(ConnectorError):
    """The exchange answered this request with a definite "no"; repeating it won't help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class FatalError(ConnectorError):
    """The connector cannot continue and must exit non-zero."""


class AuthError(FatalError):
    """The exchange rejected the credentials (never includes them)."""


class BadMessage(ConnectorError):
    """An inbound message cannot be turned into a record.

    ``reason`` is a short fixed code (``invalid_json``, ``unknown_method``,
    ``invalid_payload``, ...) safe to use as a metric label and a Kafka header.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
