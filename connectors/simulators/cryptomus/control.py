"""What tests and benchmarks use to look inside the Cryptomus simulator and to break it.

:class:`CryptomusControl` runs on the simulator's event loop (its state takes no
locks); from another thread go through :class:`~connectors.simulators.harness.Harness`,
whose ``control`` runs each call in that loop::

    with Harness(CryptomusSimulator(seed=7)) as sim:
        sim.control.drop_connections()
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

from connectors.simulators.cryptomus.market import MarketSpec
from connectors.simulators.cryptomus.rules import DEFAULT_USER_ID, Exchange, Session
from connectors.simulators.harness import check_non_negative


class Link(Protocol):
    """One open WebSocket connection, as the control reaches it."""

    @property
    def session(self) -> Session: ...

    def abort(self) -> bool:
        """Drop the TCP connection without a close frame; False if it was already going."""
        ...

    async def send(self, text: str) -> bool:
        """Send ``text`` as is (after any frame being sent); False if it closed first."""
        ...


class Knobs:
    """The settings a test may turn while the simulator runs.

    ``changed`` is replaced (and the old one set) on every change, so every waiting
    emitter and idle watchdog wakes up and re-reads the settings.
    """

    def __init__(self, idle_timeout_s: float, updates_per_second: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.updates_per_second = updates_per_second
        self.paused = False
        self.changed = asyncio.Event()

    def renew(self) -> None:
        """A fresh event for a (re)started server's loop."""
        self.changed = asyncio.Event()

    def notify(self) -> None:
        old, self.changed = self.changed, asyncio.Event()
        old.set()


class CryptomusControl:
    """Counters and logs of what the clients did and were sent, and the faults a test
    injects. Every method that is not ``async`` must be called from the simulator's loop."""

    def __init__(self, exchange: Exchange, knobs: Knobs, links: Mapping[int, Link]) -> None:
        self._exchange = exchange
        self._knobs = knobs
        self._links = links

    # ---- what the clients did and were sent ------------------------------------------

    @property
    def accounts(self) -> dict[str, str]:
        return dict(self._exchange.accounts)

    def counters(self) -> dict[str, Any]:
        """Plain-dict snapshot of every counter (``updates_sent`` is type → count)."""
        return self._exchange.counters.snapshot()

    def sent_frames(self, type: str | None = None) -> list[str]:
        """Raw text of the logged update frames, optionally of one type (``"depth"``)."""
        return [raw for _, kind, raw in self._exchange.sent_log if type is None or kind == type]

    def sent_log(self) -> list[tuple[int, str, str]]:
        """The bounded log itself: ``(connection_id, type, raw_text)``."""
        return list(self._exchange.sent_log)

    def active_subscriptions(self) -> list[dict[str, list[str]]]:
        """One dict per open connection (by connection id): type → sorted params."""
        return [
            {kind: sub.params() for kind, sub in sorted(link.session.subscriptions.items())}
            for _, link in sorted(self._links.items())
        ]

    def connection_requests(self) -> list[tuple[int, str | None, Any]]:
        """Every parsed client request in order: ``(connection_id, method, params)``.

        ``method`` is None and ``params`` whatever was sent when the request was badly
        shaped; text that was not JSON is not a request and is not listed.
        """
        return list(self._exchange.requests)

    def open_connections(self) -> int:
        return len(self._links)

    async def wait_for_connections(self, n: int, timeout: float) -> int:
        """Wait until at least ``n`` connections were accepted in total; return the count."""
        counters = self._exchange.counters
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while counters.connections_accepted < n:
            if loop.time() >= deadline:
                raise TimeoutError(
                    f"{counters.connections_accepted} connections accepted, wanted {n}"
                )
            await asyncio.sleep(0.01)
        return counters.connections_accepted

    # ---- changing the exchange -------------------------------------------------------

    def issue_token(self, user_id: str = DEFAULT_USER_ID) -> str:
        """Mint a WebSocket token without the REST call (counts as issued)."""
        return self._exchange.issue_token(user_id)

    def list_market(self, spec: MarketSpec) -> None:
        """List a new market while running (a new listing, as exchanges do)."""
        self._exchange.market.list_market(spec)

    def set_idle_timeout(self, seconds: float) -> None:
        """Change the idle close delay for every connection (``math.inf`` disables it)."""
        check_non_negative("idle timeout", seconds)
        self._knobs.idle_timeout_s = seconds
        self._knobs.notify()

    def set_updates_per_second(self, rate: float) -> None:
        """Updates per second per subscribed type on each connection (0 = none)."""
        check_non_negative("updates_per_second", rate)
        self._knobs.updates_per_second = rate
        self._knobs.notify()

    def pause_updates(self) -> None:
        """Stop the update generators (depth snapshots on subscribe are still sent)."""
        self._knobs.paused = True
        self._knobs.notify()

    def resume_updates(self) -> None:
        self._knobs.paused = False
        self._knobs.notify()

    # ---- faults ----------------------------------------------------------------------

    def drop_connections(self) -> int:
        """Abort every open connection's transport (no close frame); return how many."""
        dropped = sum(1 for link in list(self._links.values()) if link.abort())
        self._exchange.counters.dropped_by_test += dropped
        return dropped

    async def inject_raw(self, text: str) -> int:
        """Send ``text`` verbatim to every open connection; return how many got it."""
        delivered = 0
        for link in list(self._links.values()):
            if await link.send(text):
                delivered += 1
        return delivered
