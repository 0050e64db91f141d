"""``exchange-connectors demo``: broker + simulators + every connector, live counts.

Each plugin with a demo starts its own simulator and returns a config that points
at it; all connectors then run in this one process and event loop, exactly as
``run`` would run each of them. A plain kafka-python consumer counts what really
landed in Kafka per topic: the numbers shown are read back from the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from kafka import KafkaConsumer

from connectors.runtime.app import RunResult, run_connector
from connectors.runtime.broker import kafka_broker
from connectors.runtime.kafka import assign_from_beginning
from connectors.runtime.plugins import ConnectorPlugin, DemoPart, discover


class TopicCounter(threading.Thread):
    """Counts records per topic by reading them back from the broker."""

    def __init__(self, bootstrap: str, topics: Sequence[str]) -> None:
        super().__init__(name="demo-counter", daemon=True)
        self.bootstrap = bootstrap
        self.topics = list(topics)
        self.counts: Counter[str] = Counter()
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        try:
            # The connectors create their topics as they start: wait for them.
            assign_from_beginning(consumer, self.topics, timeout_s=30)
            while not self._stop_event.is_set():
                for tp, batch in consumer.poll(timeout_ms=200).items():
                    with self._lock:
                        self.counts[tp.topic] += len(batch)
        finally:
            consumer.close()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {t: self.counts.get(t, 0) for t in self.topics}

    def stop(self) -> None:
        self._stop_event.set()


def _line(elapsed: float, counts: dict[str, int]) -> str:
    shown = "  ".join(f"{t}={n}" for t, n in counts.items() if n)
    return f"[{elapsed:5.1f}s] {sum(counts.values()):>7} records  {shown}"


async def _demo(
    parts: list[tuple[ConnectorPlugin, DemoPart]], seconds: float, bootstrap: str
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    topics: list[str] = []
    for plugin, part in parts:
        topics.extend(plugin.create(part.config).topics())
    started: list[asyncio.Future[RunResult]] = [loop.create_future() for _ in parts]
    tasks = [
        asyncio.create_task(
            run_connector(plugin, part.config, stop, install_signals=False, started=fut)
        )
        for (plugin, part), fut in zip(parts, started, strict=True)
    ]
    ports = [(await fut).health_port for fut in started]
    for (plugin, _), port in zip(parts, ports, strict=True):
        print(
            f"  {plugin.name}: metrics http://127.0.0.1:{port}/metrics  "
            f"ready http://127.0.0.1:{port}/readyz"
        )
    for _, part in parts:
        if part.on_started is not None:
            await asyncio.to_thread(part.on_started)
    counter = TopicCounter(bootstrap, topics)
    counter.start()
    began = time.monotonic()
    tty = sys.stdout.isatty()
    last_print = 0.0
    while not stop.is_set() and not all(t.done() for t in tasks):
        elapsed = time.monotonic() - began
        if seconds and elapsed >= seconds:
            break
        if tty or elapsed - last_print >= 5:
            line = _line(elapsed, counter.snapshot())
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            last_print = elapsed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)
    if tty:
        print()
    stop.set()
    results = await asyncio.gather(*tasks)
    await asyncio.sleep(1.5)  # let the counter read the last acknowledged records
    counter.stop()
    counts = counter.snapshot()
    print("\nSummary (records read back from Kafka):")
    width = max((len(t) for t in counts), default=10)
    for topic, n in counts.items():
        print(f"  {topic:<{width}}  {n:>8}")
    print(f"  {'total':<{width}}  {sum(counts.values()):>8}")
    print("Metrics were served at:")
    for (plugin, _), port in zip(parts, ports, strict=True):
        print(f"  {plugin.name}: http://127.0.0.1:{port}/metrics")
    codes = [r.exit_code for r in results]
    for (plugin, _), r in zip(parts, results, strict=True):
        if r.exit_code:
            print(f"  {plugin.name} exited with {r.exit_code}: {r.error}")
    return max(codes, default=0)


def run_demo(seconds: float = 30.0, only: Sequence[str] | None = None) -> int:
    chosen = [p for p in discover().values() if p.demo is not None and (not only or p.name in only)]
    if not chosen:
        print("no connector with a demo is installed")
        return 2
    with contextlib.ExitStack() as stack:
        print("Starting a Kafka-protocol broker ...", flush=True)
        bootstrap = stack.enter_context(kafka_broker())
        print(f"  broker: {bootstrap}")
        parts: list[tuple[ConnectorPlugin, DemoPart]] = []
        for plugin in chosen:
            assert plugin.demo is not None
            part = plugin.demo(bootstrap, stack)
            parts.append((plugin, part))
            print(f"  {plugin.name}: simulator started")
        duration: Any = f"{seconds:g}s" if seconds else "until Ctrl-C"
        print(f"Running {len(parts)} connector(s) for {duration} ...", flush=True)
        return asyncio.run(_demo(parts, seconds, bootstrap))
