"""The Robicoin simulator: the REST API v1, strict about every documented rule, on loopback.

``market`` (prices, ticker windows, resting orders, accounts and their history),
``rules`` (IP block, rate limits, routing, form, auth, endpoint checks), ``server``
(the threaded HTTP server and the activity thread) and ``control`` (what tests read and
break). Run it with :class:`~connectors.simulators.harness.Harness`, or ``with`` it.
"""

from connectors.simulators.robicoin.control import RobicoinControl
from connectors.simulators.robicoin.market import PAIRS, TICKER_WINDOWS
from connectors.simulators.robicoin.rules import (
    DEFAULT_PRIVATE_KEY,
    DEFAULT_PUBLIC_ID,
    DEFAULT_PUBLIC_KEY,
    LoggedResponse,
    encode_json,
)
from connectors.simulators.robicoin.server import RobicoinSimulator

__all__ = [
    "DEFAULT_PRIVATE_KEY",
    "DEFAULT_PUBLIC_ID",
    "DEFAULT_PUBLIC_KEY",
    "PAIRS",
    "TICKER_WINDOWS",
    "LoggedResponse",
    "RobicoinControl",
    "RobicoinSimulator",
    "encode_json",
]
