"""The testing kit: what the tests, the benchmarks and a plugin's own tests share.

- :mod:`~connectors.testing.waits`: ``T`` (every wait scaled by ``TEST_TIMEOUT_SCALE``),
  ``wait_until``, ``unique`` names;
- :mod:`~connectors.testing.running`: a connector in a thread through the real runtime
  (``ConnectorThread``) or as a process (``start_connector``), ``ready``,
  ``metric_value``;
- :mod:`~connectors.testing.topics`: ``read_topic`` from the beginning, ``values``;
- :mod:`~connectors.testing.contract`: the plugin contract suite of streaming sources,
  :mod:`~connectors.testing.polling_contract`: of REST polling sources (both import
  pytest).
"""

from connectors.testing.running import (
    ConnectorThread,
    metric_value,
    ready,
    start_connector,
)
from connectors.testing.topics import read_topic, values
from connectors.testing.waits import TIMEOUT_SCALE, T, unique, wait_until

__all__ = [
    "TIMEOUT_SCALE",
    "ConnectorThread",
    "T",
    "metric_value",
    "read_topic",
    "ready",
    "start_connector",
    "unique",
    "values",
    "wait_until",
]
