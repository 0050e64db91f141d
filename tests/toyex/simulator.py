"""The Toyex server: a WebSocket on 127.0.0.1, port 0, run in a background thread.

Requests (client → server), answered with the same id::

    {"op":"subscribe","id":1,"channel":"quotes","symbols":["AAA","BBB"]} → {"op":"ack","id":1}
    {"op":"unsubscribe","id":2,"channel":"quotes"}                      → {"op":"ack","id":2}
    {"op":"ping","id":3}                                                 → {"op":"pong","id":3}

Pushed data, decimals as JSON numbers (the exact text must survive)::

    {"op":"data","channel":"quotes","symbol":"AAA","ts":1700000000123,
     "bid":0.00000001,"ask":12345678901234567890.123456789}
    {"op":"data","channel":"trades","symbol":"BBB","ts":1700000000456,
     "trades":[{"px":1e-8,"qty":2.50}, ...]}

Subscribing a channel twice is refused (``{"op":"nack","id":..,"code":7}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

from websockets.asyncio.server import ServerConnection, serve

SYMBOLS = ("AAA", "BBB", "CCC")
CHANNELS = ("quotes", "trades")
#: Literals a float would not keep (tiny, huge, trailing zeros, exponents).
PRICES = ("0.00000001", "12345678901234567890.123456789", "2.50", "1E-8", "107100.010")


class ToySimulator:
    def __init__(self, frames_per_second: float = 50.0) -> None:
        self.frames_per_second = frames_per_second
        self.sent: list[dict[str, Any]] = []  # every data frame written, decoded as text
        self.sent_text: list[str] = []
        self.connections_accepted = 0
        self.subscribes: list[str] = []
        self.paused = False
        self._conns: set[ServerConnection] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="toyex", daemon=True)
        self.port = 0
        self._n = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/stream"

    # -- control (from the test's thread) ------------------------------------------------

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def drop(self) -> int:
        """Close every connection (the server's side) and say how many there were."""

        async def go() -> int:
            conns = list(self._conns)
            for ws in conns:
                await ws.close(1001, "going away")
            return len(conns)

        return int(self._call(go()))

    def inject(self, frame: str | bytes) -> int:
        """Write ``frame`` as it is to every connection."""

        async def go() -> int:
            for ws in list(self._conns):
                await ws.send(frame)
            return len(self._conns)

        return int(self._call(go()))

    def data_frames(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.sent)

    # -- server --------------------------------------------------------------------------

    def _frame(self, channel: str, symbol: str) -> str:
        self._n += 1
        ts = 1_700_000_000_000 + self._n
        price = PRICES[self._n % len(PRICES)]
        if channel == "quotes":
            other = PRICES[(self._n + 1) % len(PRICES)]
            return (
                f'{{"op":"data","channel":"quotes","symbol":"{symbol}","ts":{ts},'
                f'"bid":{price},"ask":{other}}}'
            )
        return (
            f'{{"op":"data","channel":"trades","symbol":"{symbol}","ts":{ts},'
            f'"trades":[{{"px":{price},"qty":{self._n}.0}},{{"px":{price},"qty":0.5}}]}}'
        )

    async def _handler(self, ws: ServerConnection) -> None:
        with self._lock:
            self.connections_accepted += 1
        subscribed: dict[str, list[str]] = {}
        self._conns.add(ws)

        async def push() -> None:
            i = 0
            while True:
                await asyncio.sleep(1 / self.frames_per_second)
                if self.paused or not subscribed:
                    continue
                channels = sorted(subscribed)
                channel = channels[i % len(channels)]
                symbols = subscribed[channel]
                text = self._frame(channel, symbols[i % len(symbols)])
                i += 1
                with self._lock:
                    self.sent.append(json.loads(text, parse_float=str, parse_int=str))
                    self.sent_text.append(text)
                await ws.send(text)

        pusher = asyncio.create_task(push())
        try:
            async for message in ws:
                request = json.loads(message)
                op, req_id = request.get("op"), request.get("id")
                if op == "ping":
                    await ws.send(json.dumps({"op": "pong", "id": req_id}))
                elif op == "subscribe":
                    channel = request["channel"]
                    self.subscribes.append(channel)
                    if channel in subscribed or channel not in CHANNELS:
                        await ws.send(json.dumps({"op": "nack", "id": req_id, "code": 7}))
                    else:
                        subscribed[channel] = list(request["symbols"])
                        await ws.send(json.dumps({"op": "ack", "id": req_id}))
                elif op == "unsubscribe":
                    subscribed.pop(request["channel"], None)
                    await ws.send(json.dumps({"op": "ack", "id": req_id}))
        except Exception:  # a closed connection: nothing to answer
            pass
        finally:
            pusher.cancel()
            self._conns.discard(ws)

    def _main(self) -> None:
        async def go() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with serve(self._handler, "127.0.0.1", 0) as server:
                self.port = server.sockets[0].getsockname()[1]
                self._ready.set()
                await self._stop.wait()

        asyncio.run(go())

    def __enter__(self) -> ToySimulator:
        self._thread.start()
        assert self._ready.wait(10), "toyex simulator did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@contextlib.contextmanager
def running(frames_per_second: float = 50.0) -> Iterator[ToySimulator]:
    with ToySimulator(frames_per_second) as sim:
        yield sim
