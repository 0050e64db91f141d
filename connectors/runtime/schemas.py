"""Loading the JSON Schemas a connector package ships, one file per channel."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from typing import Any


def schema_loader(package: str, channels: Sequence[str]) -> Callable[[str], dict[str, Any]]:
    """``load_schema(channel)`` for the ``<channel>.json`` files in ``package``.

    The loader raises ``KeyError`` for an unknown channel. Results are cached and
    shared: do not modify them (deep-copy first if needed).
    """
    known = tuple(channels)

    @cache
    def load(channel: str) -> dict[str, Any]:
        text = resources.files(package).joinpath(f"{channel}.json").read_text(encoding="utf-8")
        schema: dict[str, Any] = json.loads(text)
        return schema

    def load_schema(channel: str) -> dict[str, Any]:
        if channel not in known:
            raise KeyError(f"no schema for channel {channel!r} (known: {', '.join(known)})")
        return load(channel)

    return load_schema
