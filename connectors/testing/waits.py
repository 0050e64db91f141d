"""One timeout scale for every wait in tests and benchmarks, and the wait itself."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable

#: Every wait in the tests is multiplied by this (slow or shared machines: raise it).
TIMEOUT_SCALE = float(os.environ.get("TEST_TIMEOUT_SCALE", "1"))


def T(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    what: str,
    step: float = 0.05,
    error: type[Exception] = AssertionError,
) -> None:
    """Poll ``predicate`` every ``step`` seconds; raise ``error`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(step)
