"""Kafka connector plugins for crypto exchanges.

The :mod:`connectors.runtime` package is exchange-agnostic (Kafka delivery, metrics,
health, config, backoff, CLI); each exchange lives in its own subpackage and plugs in
through the ``exchange_connectors.plugins`` entry-point group.
"""

__version__ = "0.1.0"
