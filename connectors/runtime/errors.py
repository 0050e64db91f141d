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
                             (its reason: one of DEAD_LETTER_REASONS)

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


#: Every reason a dead letter can carry, with what it means: the ``error.reason`` header
#: of a dead letter and the ``reason`` label of ``connector_dead_letters_total``. Users
#: alert and filter on these values, so they are one closed set, defined here once:
#: :class:`BadMessage` refuses any other, and the README's dead-letter table lists
#: exactly these (a test compares them). A new reason is added here first.
DEAD_LETTER_REASONS: dict[str, str] = {
    # Any connector.
    "invalid_json": "not JSON; for a command also JSON that two parsers could read "
    "differently (duplicate keys, an unpaired surrogate escape, nesting deeper than 16)",
    # Streaming sources: WebSocket frames.
    "invalid_frame": "a frame that is JSON but not a frame: not an object, neither data "
    "nor error, an id that is neither a string nor a number",
    "unknown_method": "a frame naming a method the connector does not know",
    "invalid_payload": "an update whose data does not fit its channel: a field missing "
    "or not of its type, a decimal or a time that is not one",
    "not_subscribed": "an update of a channel the connection did not subscribe",
    # Polling sources: REST answers.
    "too_large": "an answer longer than the client reads (its first bytes are kept)",
    "bad_answer": "an answer that is JSON but not the documented shape (no `data` list)",
    "bad_row": "a row of an answer that is not an object",
    "bad_field": "a row whose text or integer field is missing or not of its type",
    "bad_decimal": "a row whose decimal field is missing or not a decimal",
    "bad_time": "a row whose time field is missing or not a time",
    # Command sinks: a command without a usable command_id (with one: a rejected result).
    "empty": "a command record without a value",
    "invalid_utf8": "a command record whose value is not UTF-8",
    "not_an_object": "a command that is JSON but not an object",
    "invalid_command_id": "a command without a usable `command_id`",
}


class BadMessage(ConnectorError):
    """An inbound message cannot be turned into a record.

    ``reason`` is one of :data:`DEAD_LETTER_REASONS` (a short fixed code, safe as a
    metric label and a Kafka header); any other is a bug and raises ``ValueError``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in DEAD_LETTER_REASONS:
            raise ValueError(
                f"unknown dead-letter reason {reason!r}: add it to DEAD_LETTER_REASONS"
            )
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
