"""A connector run in a thread through the real runtime, or as a real process; its
health and metrics endpoints read back."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from typing import Any

import requests

from connectors.runtime.app import RunResult, run_connector
from connectors.runtime.plugins import ConnectorPlugin
from connectors.testing.waits import T


class ConnectorThread:
    """Runs one connector through the real runtime in its own event loop thread."""

    def __init__(self, plugin: ConnectorPlugin, config: Any) -> None:
        self.plugin = plugin
        self.config = config
        self.result: RunResult | None = None
        self.health_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"conn-{plugin.name}", daemon=True)

    def _main(self) -> None:
        async def go() -> RunResult:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            started: asyncio.Future[RunResult] = self._loop.create_future()
            task = asyncio.create_task(
                run_connector(self.plugin, self.config, self._stop, False, started)
            )
            self.health_port = (await started).health_port
            self._started.set()
            return await task

        self.result = asyncio.run(go())
        self._started.set()

    def start(self) -> ConnectorThread:
        self._thread.start()
        assert self._started.wait(T(20)), "connector did not start"
        return self

    def stop(self, timeout: float = 30.0) -> RunResult:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(T(timeout))
        assert not self._thread.is_alive(), "connector did not stop"
        assert self.result is not None
        return self.result

    def __enter__(self) -> ConnectorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._thread.is_alive():
            self.stop()


def start_connector(
    connector: str, config: str | os.PathLike[str], env: dict[str, str], capture: bool = True
) -> subprocess.Popen[str]:
    """``exchange-connectors run`` as a real process (stdout+stderr piped when ``capture``)."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "connectors", "run", connector, "--config", os.fspath(config)],
        env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
        stdout=out,
        stderr=subprocess.STDOUT if capture else subprocess.DEVNULL,
        text=True,
    )


def ready(port: int) -> bool:
    """``/readyz`` answers 200 on ``port``."""
    try:
        return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples (Prometheus text) whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^(\w+)(\{([^}]*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total
