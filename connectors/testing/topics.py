"""Read what a connector wrote: a topic from its beginning, as a consumer would."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from kafka import KafkaConsumer

from connectors.runtime.kafka import assign_from_beginning


def reader(bootstrap: str, committed: bool = False, **settings: Any) -> KafkaConsumer:
    """A consumer outside any group, from the earliest offset, committing nothing: how
    a test or benchmark reads what a connector wrote (``committed``: as a transactional
    consumer would, ``read_committed``)."""
    return KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if committed else "read_uncommitted",
        **settings,
    )


def read_topic(
    bootstrap: str,
    topic: str,
    until: Callable[[list[Any]], bool] | None = None,
    timeout: float = 10.0,
    idle: float = 1.0,
    committed: bool = False,
) -> list[Any]:
    """Every record of ``topic`` from the beginning: until ``until`` holds, or until
    nothing new arrived for ``idle`` seconds (when no predicate is given).
    ``committed``: read as a transactional consumer would (``read_committed``)."""
    consumer = reader(bootstrap, committed)
    try:
        deadline = time.monotonic() + timeout
        if not assign_from_beginning(consumer, [topic], timeout):
            return []
        out: list[Any] = []
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            for recs in batch.values():
                out.extend(recs)
            if batch:
                last_new = time.monotonic()
            if until is not None:
                if until(out):
                    return out
            elif time.monotonic() - last_new > idle:
                return out
        if until is not None:
            raise AssertionError(
                f"{topic}: condition not met after {timeout:.1f}s ({len(out)} records)"
            )
        return out
    finally:
        consumer.close()


def values(recs: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in recs]


def strings_in(value: Any) -> Iterator[str]:
    """Every string in a decoded record value (to find an exchange's decimal text)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings_in(v)
