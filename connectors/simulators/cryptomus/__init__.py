"""The Cryptomus simulator: WebSocket streams and the REST calls they need, on loopback.

``market`` (prices, books, orders, wallets and their update frames), ``rules`` (tokens,
signatures, request rules), ``server`` (the one port that serves both) and ``control``
(what tests read and break). Run it with :class:`~connectors.simulators.harness.Harness`.
"""

from connectors.simulators.cryptomus.control import CryptomusControl
from connectors.simulators.cryptomus.market import DEFAULT_MARKETS, MarketSpec
from connectors.simulators.cryptomus.rules import (
    DEFAULT_API_KEY,
    DEFAULT_USER_ID,
    MARKETS_PATHS,
    SCALES_PATH,
    TOKEN_PATH,
    WS_PATH,
)
from connectors.simulators.cryptomus.server import CryptomusSimulator

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_MARKETS",
    "DEFAULT_USER_ID",
    "MARKETS_PATHS",
    "SCALES_PATH",
    "TOKEN_PATH",
    "WS_PATH",
    "CryptomusControl",
    "CryptomusSimulator",
    "MarketSpec",
]
