"""Cryptomus as a streaming exchange: its dialect, its plan, its connection URL.

Everything about the connection's lifecycle (supervision, back-off, markers,
back-pressure, dead letters, metrics) is the runtime's
(:mod:`connectors.runtime.streaming`); this module says only what is Cryptomus:
frames are parsed by :mod:`connectors.cryptomus.protocol`, each connection needs a
one-time token from the REST API, and the plan (one subscribe per data type) comes
from the market list and the depth scale indices.
"""

from __future__ import annotations

from functools import partial

import requests

from connectors.cryptomus import protocol
from connectors.cryptomus.config import CryptomusConfig
from connectors.cryptomus.rest import CryptomusRest
from connectors.runtime.context import RuntimeContext
from connectors.runtime.logs import register_secret
from connectors.runtime.session import Plan


class CryptomusStream:
    """The :class:`~connectors.runtime.streaming.StreamExchange` of Cryptomus."""

    exchange = protocol.EXCHANGE
    dialect = protocol.DIALECT

    def __init__(self, config: CryptomusConfig, session: requests.Session | None = None) -> None:
        s = self.source = config.cryptomus
        user_id, api_key = s.credentials.resolve()
        register_secret(user_id.reveal())
        register_secret(api_key.reveal())
        self.rest = CryptomusRest(
            s.api_url, s.scales_url, user_id, api_key, s.http_timeout_s, session
        )
        self.settings = s.stream
        self.topics = {ch: s.topics.for_channel(ch) for ch in s.channels}
        self.dead_letter_topic = s.topics.dead_letter

    def attach(self, ctx: RuntimeContext) -> None:
        self.rest.on_answer = partial(ctx.metrics.observe_request, ctx.name)

    def connect_url(self) -> str:
        token = self.rest.ws_token()
        register_secret(token)
        separator = "&" if "?" in self.source.ws_url else "?"
        return f"{self.source.ws_url}{separator}token={token}"

    def load_plan(self) -> Plan:
        """Market list (expands/validates markets) and depth scale indices → params."""
        s = self.source
        markets = self.rest.markets()
        listed = {m.symbol for m in markets}
        chosen = s.market_list or sorted(listed)
        scales: dict[str, list[int]] = {}
        if "depth" in s.channels:
            if s.depth_scale_indices:
                scales = {m: list(s.depth_scale_indices) for m in chosen}
            else:
                scales = {m: sorted(self.rest.scales(m)) for m in chosen if m in listed}
        subscriptions = protocol.plan_subscriptions(
            s.channels, s.market_list, markets, scales, s.balance_currencies or None
        )
        keys = {ch: protocol.marker_keys(ch, p, markets) for ch, p in subscriptions.items()}
        return Plan(subscriptions, keys)
