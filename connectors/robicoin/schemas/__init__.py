"""JSON Schemas (draft 2020-12) of the records the Robicoin poller writes, one per channel.

Each ``<channel>.json`` describes the envelope (:mod:`connectors.runtime.records`) of
one topic: a ``kind: event`` record, or (``order`` and ``transaction`` only) ``oneOf``
an event and a ``kind: gap`` marker.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

SCHEMA_CHANNELS: tuple[str, ...] = (
    "ticker",
    "order",
    "balance",
    "transaction",
    "open-order",
    "order-command",
    "order-result",
)


@cache
def _load(channel: str) -> dict[str, Any]:
    text = resources.files(__name__).joinpath(f"{channel}.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def load_schema(channel: str) -> dict[str, Any]:
    """The parsed schema of ``channel``; raises ``KeyError`` for an unknown channel.

    The result is cached and shared: do not modify it (deep-copy it first if needed).
    """
    if channel not in SCHEMA_CHANNELS:
        raise KeyError(f"no schema for channel {channel!r} (known: {', '.join(SCHEMA_CHANNELS)})")
    return _load(channel)
