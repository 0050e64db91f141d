"""JSON Schemas (draft 2020-12) of the records the Robicoin poller writes, one per channel.

Each ``<channel>.json`` describes the envelope (:mod:`connectors.runtime.records`) of
one topic: a ``kind: event`` record, or (``order`` and ``transaction`` only) ``oneOf``
an event and a ``kind: gap`` marker.
"""

from __future__ import annotations

from connectors.runtime.schemas import schema_loader

SCHEMA_CHANNELS: tuple[str, ...] = (
    "ticker",
    "order",
    "balance",
    "transaction",
    "open-order",
    "order-command",
    "order-result",
)


#: The parsed schema of a channel; ``KeyError`` for an unknown one. Cached and shared.
load_schema = schema_loader(__name__, SCHEMA_CHANNELS)
