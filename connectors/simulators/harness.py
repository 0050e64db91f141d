"""Run a simulator beside the code that drives it, or in the foreground.

Two kinds of simulator plug in, told apart by their ``start``:

* an **asyncio** one (``async def start/stop``): its state belongs to its event loop and
  takes no locks. :class:`Harness` gives it a loop of its own in a daemon thread, and
  every call from outside (``harness.control.drop_connections()``) runs inside that loop
  while the caller waits for the answer;
* a **threaded** one (plain ``start/stop``): it serves from its own threads and guards
  its state with a lock, so :class:`Harness` only starts and stops it and hands its
  ``control`` out as it is.

Either way a caller writes the same thing::

    with Harness(CryptomusSimulator(seed=7)) as sim:
        connect(sim.ws_url)
        sim.control.drop_connections()

:func:`serve_in_foreground` is ``exchange-connectors simulate``: start, print how to reach
the simulator, serve until Ctrl-C or SIGTERM, stop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import signal
import threading
from collections.abc import Callable, Coroutine, Iterable
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar, cast

__all__ = ["Harness", "OnLoop", "Simulator", "check_non_negative", "serve_in_foreground"]

_T = TypeVar("_T")


class Simulator(Protocol):
    """What the harness needs of a simulator (its ``start``/``stop`` are sync or async)."""

    @property
    def name(self) -> str:
        """Short lowercase name (``"cryptomus"``): names the harness's threads."""
        ...

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the free one port 0 picked)."""
        ...

    @property
    def base_url(self) -> str: ...

    @property
    def control(self) -> object:
        """The test-control API: counters, logs, fault injection."""
        ...

    def banner(self) -> Iterable[str]:
        """Lines ``simulate`` prints once the simulator listens."""
        ...

    def start(self) -> object: ...

    def stop(self) -> object: ...


_S = TypeVar("_S", bound=Simulator)


def check_non_negative(name: str, value: float) -> None:
    """Rates, delays and timeouts: ``math.inf`` is fine, NaN and negatives are not."""
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


class Harness(Generic[_S]):
    """``simulator`` started in the background for synchronous callers (tests, bench, demo).

    ``control`` is the simulator's test-control API, usable from any thread: for an
    asyncio simulator an :class:`OnLoop` view that runs each call in the simulator's
    loop, for a threaded one the object itself. Every wait for the loop is bounded by
    ``call_timeout`` seconds (see :meth:`call`).
    """

    def __init__(self, simulator: _S, *, call_timeout: float = 10.0) -> None:
        self._simulator = simulator
        self._call_timeout = call_timeout
        self._in_loop = inspect.iscoroutinefunction(simulator.start)
        self._running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- what callers reach ----------------------------------------------------------

    @property
    def simulator(self) -> _S:
        """The simulator object; only while it runs (an asyncio one's state is its loop's:
        go through :attr:`control` or :meth:`call` from other threads)."""
        if not self._running:
            raise RuntimeError(f"{self._simulator.name} simulator not running")
        return self._simulator

    @property
    def control(self) -> Any:
        control = self.simulator.control
        return OnLoop(self, control) if self._in_loop else control

    @property
    def port(self) -> int:
        return self.simulator.port

    @property
    def base_url(self) -> str:
        return self.simulator.base_url

    @property
    def ws_url(self) -> str:
        url = getattr(self.simulator, "ws_url", None)
        if not isinstance(url, str):
            raise AttributeError(f"the {self._simulator.name} simulator serves no WebSocket")
        return url

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> Harness[_S]:
        if self._running:
            raise RuntimeError(f"{self._simulator.name} simulator already started")
        if not self._in_loop:
            self._simulator.start()
            self._running = True
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=loop.run_forever, name=f"{self._simulator.name}-simulator", daemon=True
        )
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._submit(cast(Coroutine[Any, Any, object], self._simulator.start()))
        except BaseException:
            self._shutdown_loop()
            raise
        self._running = True
        return self

    def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        if not self._in_loop:
            self._simulator.stop()
            return
        try:
            self._submit(cast(Coroutine[Any, Any, object], self._simulator.stop()))
        finally:
            self._shutdown_loop()

    def __enter__(self) -> Harness[_S]:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- running code where the simulator's state lives ------------------------------

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` where the simulator's state lives, and its result.

        For an asyncio simulator it runs in the simulator's loop (a coroutine is awaited
        there) and the caller waits at most ``call_timeout`` seconds, plus the call's own
        ``timeout`` keyword when it has one (``wait_for_connections(2, timeout=5)``);
        past that the call is cancelled and :class:`TimeoutError` raised. For a
        threaded simulator it runs right here.
        """
        if not self._in_loop:
            return fn(*args, **kwargs)
        own = kwargs.get("timeout")
        limit = self._call_timeout + (own if isinstance(own, int | float) else 0.0)

        async def run() -> Any:
            result = fn(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return self._submit(run(), limit)

    def _submit(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError(f"{self._simulator.name} simulator not running")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self._call_timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=self._call_timeout)
        if not thread.is_alive():
            loop.close()


class OnLoop:
    """An asyncio simulator's control object, seen from another thread.

    A method call runs in the simulator's loop through :meth:`Harness.call` (coroutine
    methods awaited there), so ``sim.control.inject_raw(text)`` is a plain blocking call;
    any other attribute is read in the loop too. One generic view instead of a
    forwarding method per control call.
    """

    def __init__(self, harness: Harness[Any], target: object) -> None:
        self._harness = harness
        self._target = target

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if inspect.isfunction(inspect.getattr_static(type(self._target), name, None)):
            method = getattr(self._target, name)
            return lambda *args, **kwargs: self._harness.call(method, *args, **kwargs)
        return self._harness.call(getattr, self._target, name)

    def __dir__(self) -> Iterable[str]:
        return [name for name in dir(self._target) if not name.startswith("_")]


def serve_in_foreground(simulator: Simulator) -> None:
    """``exchange-connectors simulate``: serve until Ctrl-C or SIGTERM, then stop.

    The banner is printed once the port is bound, so ``--port 0`` shows the port it got.
    Signal handlers are installed only on the main thread (elsewhere Python cannot) and
    the previous ones are put back afterwards.
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        with Harness(simulator):
            for line in simulator.banner():
                print(line, flush=True)
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: not installed from Python, nothing to restore
                signal.signal(sig, handler)
