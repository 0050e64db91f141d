"""A broker of one's own: for a test or benchmark that freezes Kafka (SIGSTOP), which
would stall everything else sharing the session's broker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from connectors.runtime.broker import EmbeddedBroker
from connectors.testing.waits import T


class BrokerUnavailable(RuntimeError):
    """The embedded broker is not installed (pytest callers skip)."""


@contextlib.contextmanager
def own_broker(start_timeout_s: float = 20.0) -> Iterator[EmbeddedBroker]:
    """An embedded broker on a free loopback port, stopped afterwards (resumed first: a
    frozen process does not act on SIGTERM)."""
    try:
        broker = EmbeddedBroker().start(timeout_s=T(start_timeout_s))
    except RuntimeError as exc:
        raise BrokerUnavailable(str(exc)) from exc
    try:
        yield broker
    finally:
        if broker.process is not None and broker.process.poll() is None:
            broker.resume()
        broker.stop()
