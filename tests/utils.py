"""Test helpers: one timeout scale, a connector running in a thread, a Kafka reader."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import requests
from kafka import KafkaConsumer, TopicPartition

from connectors.runtime.app import RunResult, run_connector
from connectors.runtime.plugins import ConnectorPlugin

#: Every wait in the tests is multiplied by this (slow or shared machines: raise it).
TIMEOUT_SCALE = float(os.environ.get("TEST_TIMEOUT_SCALE", "1"))


def T(seconds: float) -> float:
    return seconds * TIMEOUT_SCALE


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(step)


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


def read_topic(
    bootstrap: str,
    topic: str,
    until: Callable[[list[Any]], bool] | None = None,
    timeout: float = 10.0,
    idle: float = 1.0,
    committed: bool = False,
) -> list[Any]:
    """Every record of ``topic`` from the beginning: until ``until`` holds, or until
    nothing new arrived for ``idle`` seconds (when no predicate is given).
    ``committed``: read as a transactional consumer would (``read_committed``)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if committed else "read_uncommitted",
    )
    try:
        deadline = time.monotonic() + timeout
        parts = None
        while not parts:
            parts = consumer.partitions_for_topic(topic)
            if not parts:
                if time.monotonic() > deadline:
                    return []
                time.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            for recs in batch.values():
                out.extend(recs)
            if batch:
                last_new = time.monotonic()
            if until is not None:
                if until(out):
                    return out
            elif time.monotonic() - last_new > idle:
                return out
        if until is not None:
            raise AssertionError(
                f"{topic}: condition not met after {timeout:.1f}s ({len(out)} records)"
            )
        return out
    finally:
        consumer.close()


def values(recs: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(r.value) for r in recs]


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
