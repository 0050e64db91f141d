"""A package simulator in its own process, driven over a pipe.

The load generator must not share a GIL with the connector it loads, so the simulator
runs under a :class:`~connectors.simulators.harness.Harness` in a spawned child. Each
:meth:`SimProcess.call` names a method of the simulator's ``control`` (forwarded there by
name), or passes a module-level function (``bench.loadgen.send_burst``) that the child
calls with the harness.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from bench.common import SPAWN, BenchError
from connectors.simulators.harness import Harness


def _serve(conn: Connection, cls_path: str, options: dict[str, Any]) -> None:
    module, _, name = cls_path.rpartition(".")
    sim = Harness(getattr(importlib.import_module(module), name)(**options)).start()
    info = {"base_url": sim.base_url, "port": sim.port}
    if hasattr(sim.simulator, "ws_url"):
        info["ws_url"] = sim.ws_url
    conn.send(("ready", info))
    try:
        while True:
            try:
                method, args, kwargs = conn.recv()
            except EOFError:
                return
            if method == "__stop__":
                return
            try:
                if callable(method):
                    conn.send(("ok", method(sim, *args, **kwargs)))
                    continue
                attr = getattr(sim.control, method)
                conn.send(("ok", attr(*args, **kwargs) if callable(attr) else attr))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        sim.stop()


class SimProcess:
    """``SimProcess("connectors.simulators.cryptomus.CryptomusSimulator", seed=1)``."""

    def __init__(self, cls_path: str, **options: Any) -> None:
        self._cls_path = cls_path
        self._options = options
        self.info: dict[str, Any] = {}

    def start(self, timeout_s: float = 30.0) -> SimProcess:
        self._conn, child = SPAWN.Pipe()
        self.process = SPAWN.Process(
            target=_serve, args=(child, self._cls_path, self._options), daemon=True
        )
        self.process.start()
        if not self._conn.poll(timeout_s):
            self.stop()
            raise BenchError(f"{self._cls_path} did not start in {timeout_s}s")
        _, self.info = self._conn.recv()
        return self

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def call(
        self,
        method: str | Callable[..., Any],
        *args: Any,
        timeout_s: float = 600.0,
        **kwargs: Any,
    ) -> Any:
        """``control.<method>(*args, **kwargs)`` in the child, or ``method(harness, ...)``
        for a module-level function (sent by reference, so the child imports it)."""
        name = method if isinstance(method, str) else method.__qualname__
        self._conn.send((method, args, kwargs))
        if not self._conn.poll(timeout_s):
            raise BenchError(f"simulator call {name} did not answer in {timeout_s}s")
        status, value = self._conn.recv()
        if status != "ok":
            raise BenchError(f"simulator call {name} failed: {value}")
        return value

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(("__stop__", (), {}))
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
