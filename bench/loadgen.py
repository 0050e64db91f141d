"""The Cryptomus load generator: a burst of update frames on the simulator's one connection.

Only the benchmark needs it, so it lives here and not in the simulator. It runs where the
simulator runs (the :class:`~bench.simproc.SimProcess` child, on the simulator's loop:
``sim.call(send_burst, frames, rate)``) and uses the same frame builders and bookkeeping
as the simulator's own periodic emitter.
"""

from __future__ import annotations

import asyncio
import time

from websockets.exceptions import ConnectionClosed

from connectors.simulators.cryptomus.rules import UPDATE_TYPES
from connectors.simulators.cryptomus.server import CryptomusSimulator
from connectors.simulators.harness import Harness

#: ``(send_time_ns, type, records)`` per frame sent.
Sent = list[tuple[int, str, int]]


def send_burst(
    harness: Harness[CryptomusSimulator],
    count: int,
    rate: float | None = None,
    timeout: float = 600.0,
) -> Sent:
    """Send ``count`` update frames on the one open connection; see :func:`_burst`."""
    result: Sent = harness.call(_burst, harness.simulator, count, rate, timeout=timeout)
    return result


async def _burst(sim: CryptomusSimulator, count: int, rate: float | None, timeout: float) -> Sent:
    """Send ``count`` update frames on the one open connection, within ``timeout`` s.

    Frames are built first (the same builders as the periodic emitter, round-robin
    over the connection's subscribed types and keys), then sent at ``rate`` frames/s
    (``None``: as fast as the client reads them; TCP back-pressure slows the loop).
    Returns ``(send_time_ns, type, records)`` per frame in send order, where
    ``send_time_ns`` is ``time.monotonic_ns()`` just before the frame was handed to
    the socket and ``records`` is the number of events in it (trades per trade frame).
    The list is shorter than ``count`` when the client closed the connection.
    """
    if count < 0 or (rate is not None and rate <= 0):
        raise ValueError("count must be >= 0 and rate > 0 (or None)")
    if len(sim.connections) != 1:
        raise RuntimeError(f"need exactly one open connection, have {len(sim.connections)}")
    conn = next(iter(sim.connections.values()))
    subscriptions = conn.session.subscriptions
    kinds = [k for k in UPDATE_TYPES if k in subscriptions and subscriptions[k].keys]
    if not kinds:
        raise RuntimeError("the connection has no subscriptions")
    frames = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        frames.append((kind, sim.next_update(conn, kind)))
    sent: Sent = []
    clock = time.monotonic_ns
    async with asyncio.timeout(timeout):
        start = clock()
        interval_ns = 0 if rate is None else 1e9 / rate
        async with conn.send_lock:
            for i, (kind, frame) in enumerate(frames):
                if interval_ns:
                    due = start + int(i * interval_ns)
                    now = clock()
                    if due > now + 200_000:  # sleep only when >0.2 ms early: batch the rest
                        await asyncio.sleep((due - now) / 1e9)
                stamp = clock()
                try:
                    await sim.send_update(conn, kind, frame)
                except ConnectionClosed:
                    break  # the client went away: the caller sees a short list
                sent.append((stamp, kind, frame[1] or 1))
    return sent
