"""JSON Schemas (draft 2020-12) of the records the Cryptomus source writes, one per channel.

Each ``<channel>.json`` describes the envelope (:mod:`connectors.runtime.records`) of
one topic: ``oneOf`` a ``kind: event`` record and a ``kind: resync`` marker.
"""

from __future__ import annotations

from connectors.runtime.schemas import schema_loader

SCHEMA_CHANNELS: tuple[str, ...] = (
    "lastprice",
    "depth",
    "ticker",
    "trade",
    "order",
    "balance",
    "deal",
)


#: The parsed schema of a channel; ``KeyError`` for an unknown one. Cached and shared.
load_schema = schema_loader(__name__, SCHEMA_CHANNELS)
