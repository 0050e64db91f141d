"""A third exchange, built only for the tests, through the generic streaming runtime.

Toyex (``tests/toyex/``) writes a dialect, a plan and a URL: no loop, no reconnect, no
Kafka code. Reconnects, markers, dead letters, metrics and health below all come from
:mod:`connectors.runtime.streaming`.
"""

from __future__ import annotations

import pytest

from connectors.testing.contract import StreamingContract
from tests.toyex.harness import ToyHarness

pytestmark = pytest.mark.e2e


class TestToyexContract(StreamingContract):
    harness = ToyHarness()
