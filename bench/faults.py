"""Fault benchmarks: each connector through a Kafka outage, the source through drops.

* :func:`run_outages` — for ``cryptomus-ws``, ``robicoin-poller`` and
  ``robicoin-orders`` in turn: a broker of its own (the embedded Tansu binary: it is
  frozen with SIGSTOP, which would stall anything else on it), the package's
  simulator and the connector, each in its own process. Once the connector is ready
  (the sink paused through its control topic, with commands waiting in Kafka), the
  broker is frozen for ``scale.outage_s`` while the connector's resident memory
  (``VmRSS``) and CPU time are read every second; then the broker is resumed (the
  sink unpaused) and the connector must recover: the sink gives exactly one result
  per command, the poller and the source are ready and write to Kafka again.
* :func:`run_drops` — the Cryptomus source with the default back-off while the
  exchange (the simulator) drops every connection ``scale.drop_every_s`` after it
  opened: the share of time it was disconnected, by its own counter
  ``connector_disconnected_seconds_total``, cross-checked with the connections the
  simulator accepted and the gaps between a drop and the next accepted connection.
  (The connection open when the run starts is dropped ``drop_every_s`` after the start.)

Every wait has a deadline and every address is loopback. A frozen broker does not act
on SIGTERM, so it is always resumed before it is stopped.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from typing import Any

import requests
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from bench import robicoin, workers
from bench.common import (
    BenchError,
    Scale,
    cpu_seconds,
    rss_mb,
    start_process,
    stop_process,
    wait_for,
)
from bench.simproc import SimProcess

CRYPTOMUS_SIM = "connectors.simulators.cryptomus.CryptomusSimulator"
#: Commands waiting in Kafka for the paused sink while the broker is frozen.
SINK_COMMANDS = 10
#: Seconds the connector runs before and after the outage before memory is read.
SETTLE_S = 2.0
#: Bound on the recovery after the broker is resumed (the sink's consumer rejoins its
#: group, then handles the commands at the exchange's 10/s).
RECOVERY_TIMEOUT_S = 120.0

Log = Callable[[str], None]


# -- reading the connector -----------------------------------------------------------------


def metrics(port: int) -> dict[str, float]:
    """Every sample of the connector's ``/metrics``, summed over labels except
    ``outcome`` (``name`` or ``name{outcome}``); empty when it does not answer."""
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except requests.RequestException:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if "outcome" in sample.labels:
                key += "{" + sample.labels["outcome"] + "}"
            out[key] = out.get(key, 0.0) + sample.value
    return out


def _progress(m: dict[str, float]) -> float:
    """Writes Kafka acknowledged: records (source) plus committed transactions (poller)."""
    return m.get("connector_records_total{produced}", 0.0) + m.get(
        "connector_transactions_total{committed}", 0.0
    )


def _pid(proc: SpawnProcess) -> int:
    if proc.pid is None:
        raise BenchError(f"{proc.name} was never started")
    return proc.pid


@contextmanager
def own_broker() -> Iterator[Any]:
    """An embedded broker only this run uses; resumed (SIGCONT) before it is stopped."""
    from connectors.testing.brokers import own_broker as started

    with started() as broker:
        yield broker


@dataclass
class Outage:
    """What one connector did while its broker was frozen."""

    before_mb: float = 0.0
    samples: list[tuple[float, float, float, bool]] = field(default_factory=list)
    cpu_s: float = 0.0
    exited: int | None = None
    gaps_before: float | None = None


def _freeze(broker: Any, proc: SpawnProcess, port: int, seconds: float) -> Outage:
    """Freeze ``broker`` for ``seconds``, reading the connector every second:
    (seconds since the freeze, VmRSS MiB, CPU s since the freeze, /readyz 200)."""
    pid = _pid(proc)
    out = Outage(before_mb=rss_mb(pid), gaps_before=metrics(port).get("connector_gaps_total", 0.0))
    cpu0 = cpu_seconds(pid)
    broker.pause()
    try:
        start = time.monotonic()
        tick = start
        while tick - start < seconds:
            tick += 1.0
            time.sleep(max(0.0, tick - time.monotonic()))
            if not proc.is_alive():
                out.exited = proc.exitcode
                break
            elapsed = time.monotonic() - start
            out.samples.append(
                (
                    round(elapsed, 1),
                    round(rss_mb(pid), 1),
                    round(cpu_seconds(pid) - cpu0, 2),
                    robicoin._ready(port),
                )
            )
        if proc.is_alive():
            out.cpu_s = cpu_seconds(pid) - cpu0
    finally:
        broker.resume()
    return out


def _summary(name: str, outage: Outage, seconds: float) -> dict[str, Any]:
    rss = [s[1] for s in outage.samples]
    return {
        "connector": name,
        "outage_s": seconds,
        "rss_before_mb": round(outage.before_mb, 1),
        "rss_peak_mb": round(max([outage.before_mb, *rss]), 1),
        "cpu_s_during_outage": round(outage.cpu_s, 2),
        "not_ready_samples": sum(1 for s in outage.samples if not s[3]),
        "exited_during_outage": outage.exited,
        "samples": [
            {"t_s": t, "rss_mb": r, "cpu_s": c, "ready": ok} for t, r, c, ok in outage.samples
        ],
    }


def _after(proc: SpawnProcess, port: int, outage: Outage, row: dict[str, Any]) -> None:
    """RSS a moment after recovery and the gap markers written since the freeze (the
    poller's incremental streams mark rows they could not fetch in time), then the
    connector's exit code after SIGTERM."""
    row["rss_after_mb"] = row["gaps_written"] = None
    if proc.is_alive():
        time.sleep(SETTLE_S)
        row["rss_after_mb"] = round(rss_mb(_pid(proc)), 1)
        gaps = metrics(port).get("connector_gaps_total", 0.0)
        row["gaps_written"] = int(gaps - (outage.gaps_before or 0.0))
    stop_process(proc)
    row["exit_code"] = proc.exitcode


# -- the source and the poller ---------------------------------------------------------------


def source_child(opts: dict[str, Any]) -> None:
    """Child process: the cryptomus-ws connector until SIGTERM (no timing hooks)."""
    from connectors.cryptomus.plugin import PLUGIN

    robicoin._run_child(PLUGIN, workers.source_config(opts))


def _source_opts(sim: SimProcess, bootstrap: str, port: int) -> dict[str, Any]:
    from connectors.simulators.cryptomus import DEFAULT_API_KEY, DEFAULT_USER_ID

    return {
        "ws_url": sim.info["ws_url"],
        "base_url": sim.info["base_url"],
        "user_id": DEFAULT_USER_ID,
        "api_key": DEFAULT_API_KEY,
        "bootstrap": bootstrap,
        "prefix": f"bench-fault-{uuid.uuid4().hex[:8]}",
        "health_port": port,
    }


def _outage_streaming(kind: str, seconds: float, log: Log) -> dict[str, Any]:
    """The source (``kind="source"``) or the poller through a frozen broker."""
    name = "cryptomus-ws" if kind == "source" else "robicoin-poller"
    port = robicoin._free_port()
    with own_broker() as broker:
        bootstrap = broker.bootstrap_servers
        if kind == "source":
            sim = SimProcess(CRYPTOMUS_SIM, updates_per_second=20.0, seed=20261202)
        else:
            sim = SimProcess(robicoin.SIMULATOR, **robicoin.SIM_ACTIVITY)
        with sim:
            if kind == "source":
                proc = start_process(source_child, _source_opts(sim, bootstrap, port), name=name)
            else:
                prefix = f"bench-fault-{uuid.uuid4().hex[:8]}"
                proc = start_process(
                    robicoin.poller_child,
                    sim.info["base_url"],
                    bootstrap,
                    prefix,
                    port,
                    None,
                    name=name,
                )
            with robicoin._stopping(proc):
                ready_s = robicoin._wait_ready(proc, port, name)
                time.sleep(SETTLE_S)
                log(f"{name} ready after {ready_s:.1f}s; Kafka frozen for {seconds:.0f}s")
                outage = _freeze(broker, proc, port, seconds)
                row = _summary(name, outage, seconds)
                resumed = time.monotonic()
                progress0 = _progress(metrics(port))
                recovered = False

                def again() -> bool:
                    if not proc.is_alive():
                        raise BenchError(f"{name} exited with code {proc.exitcode}")
                    return robicoin._ready(port) and _progress(metrics(port)) > progress0

                if outage.exited is None:
                    try:
                        wait_for(again, RECOVERY_TIMEOUT_S, f"{name} to recover", 0.2)
                        recovered = True
                    except BenchError as exc:
                        log(f"{name}: {exc}")
                row["recovered"] = recovered
                row["recovery_s"] = round(time.monotonic() - resumed, 2) if recovered else None
                row["recovery_basis"] = (
                    "/readyz 200 and Kafka writes acknowledged again "
                    "(connector_records_total produced + connector_transactions_total "
                    "committed grew after the resume)"
                )
                _after(proc, port, outage, row)
    return row


# -- the order sink ------------------------------------------------------------------------


def _control(bootstrap: str, topic: str, paused: bool) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", max_block_ms=20_000)
    try:
        change = {"paused": paused, "by": "bench", "reason": "fault benchmark"}
        producer.send(topic, value=json.dumps(change).encode(), key=b"control").get(timeout=30)
    finally:
        producer.close(timeout=5)


def _outage_sink(seconds: float, log: Log) -> dict[str, Any]:
    name = "robicoin-orders"
    port = robicoin._free_port()
    prefix = f"bench-fault-{uuid.uuid4().hex[:8]}"
    topics = {t: f"{prefix}.{t}" for t in ("commands", "results", "control")}
    with own_broker() as broker:
        bootstrap = broker.bootstrap_servers
        with SimProcess(robicoin.SIMULATOR, **robicoin.SIM_ACTIVITY) as sim:
            proc = start_process(
                robicoin.sink_child, sim.info["base_url"], bootstrap, prefix, port, None, name=name
            )
            with robicoin._stopping(proc):
                ready_s = robicoin._wait_ready(proc, port, name)
                # Paused by the operator: the commands wait in Kafka, the sink holds them.
                _control(bootstrap, topics["control"], paused=True)
                wait_for(
                    lambda: metrics(port).get("connector_paused", 0.0) == 1.0,
                    30,
                    f"{name} to pause",
                    0.2,
                )
                commands = robicoin.create_commands(prefix, SINK_COMMANDS, int(time.time() * 1000))
                producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
                try:
                    for cmd in commands:
                        producer.send(
                            topics["commands"],
                            value=json.dumps(cmd).encode(),
                            key=cmd["pair"].encode(),
                        )
                    producer.flush(timeout=30)
                finally:
                    producer.close(timeout=5)
                time.sleep(SETTLE_S)
                before = sim.call("counters")
                log(
                    f"{name} ready after {ready_s:.1f}s, paused with {SINK_COMMANDS} commands "
                    f"waiting; Kafka frozen for {seconds:.0f}s"
                )
                outage = _freeze(broker, proc, port, seconds)
                row = _summary(name, outage, seconds)
                resumed = time.monotonic()
                _control(bootstrap, topics["control"], paused=False)
                per_command, outcomes = _collect_results(
                    bootstrap, topics["results"], {c["command_id"] for c in commands}
                )
                after = sim.call("counters")
                ids = {c["command_id"] for c in commands}
                exactly_once = set(per_command) == ids and all(n == 1 for n in per_command.values())
                row.update(
                    {
                        "commands": len(commands),
                        "results": sum(per_command.values()),
                        "commands_with_a_result": len(set(per_command) & ids),
                        "duplicate_results": sum(n - 1 for n in per_command.values() if n > 1),
                        "exactly_one_result_per_command": exactly_once,
                        "outcomes": dict(sorted(outcomes.items())),
                        "creates_sent_to_exchange": after["requests_by_path"].get(
                            "/api/v1/create-order", 0
                        )
                        - before["requests_by_path"].get("/api/v1/create-order", 0),
                        "recovered": exactly_once and proc.is_alive(),
                        "recovery_s": round(time.monotonic() - resumed, 2),
                        "recovery_basis": (
                            "after the resume and the unpause: one result per command "
                            f"(read_committed) within {RECOVERY_TIMEOUT_S:.0f}s, then "
                            "3s more without a duplicate"
                        ),
                    }
                )
                _after(proc, port, outage, row)
    return row


def _collect_results(
    bootstrap: str, topic: str, ids: set[str]
) -> tuple[Counter[str], Counter[str]]:
    """Results by command id until every command has one (or the deadline), then 3 s
    more to catch duplicates; and results by outcome."""
    per_command: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    results = robicoin._Results(bootstrap, topic)
    try:
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        quiet_until: float | None = None
        while time.monotonic() < deadline:
            for _, rec in results.poll():
                value = json.loads(rec.value)
                per_command[str(value.get("command_id"))] += 1
                outcomes[str(value.get("outcome"))] += 1
            if quiet_until is None and ids <= set(per_command):
                quiet_until = time.monotonic() + 3.0
            if quiet_until is not None and time.monotonic() >= quiet_until:
                break
    finally:
        results.close()
    return per_command, outcomes


def run_outages(scale: Scale, log: Log) -> dict[str, Any]:
    """Each connector through ``scale.outage_s`` of frozen Kafka, one after the other."""
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return {
            "skipped": "KAFKA_BOOTSTRAP_SERVERS is set: the outage freezes the broker "
            "(SIGSTOP), which needs a broker process of its own (the embedded one), never "
            "a shared cluster"
        }
    rows = []
    for kind in ("source", "poller"):
        log(f"faults: {kind} through a {scale.outage_s:.0f}s Kafka outage")
        rows.append(_outage_streaming(kind, scale.outage_s, log))
    log(f"faults: order sink through a {scale.outage_s:.0f}s Kafka outage")
    rows.append(_outage_sink(scale.outage_s, log))
    return {"connectors": rows}


# -- the source while the exchange drops it ------------------------------------------------------


def run_drops(bootstrap: str, scale: Scale, log: Log) -> dict[str, Any]:
    """The source for ``scale.drop_run_s`` while every connection is dropped
    ``scale.drop_every_s`` after it was accepted (default back-off settings)."""
    name = "cryptomus-ws"
    port = robicoin._free_port()
    every, run_s = scale.drop_every_s, scale.drop_run_s
    with SimProcess(CRYPTOMUS_SIM, updates_per_second=5.0, seed=20261202) as sim:
        opts = _source_opts(sim, bootstrap, port)
        settings = workers.source_config(opts).cryptomus
        proc = start_process(source_child, opts, name=name)
        with robicoin._stopping(proc):
            ready_s = robicoin._wait_ready(proc, port, name)
            log(f"faults: {name} ready after {ready_s:.1f}s; drops for {run_s:g}s")
            m0 = metrics(port).get("connector_disconnected_seconds_total")
            accepted0 = seen = sim.call("counters")["connections_accepted"]
            start = opened = time.monotonic()
            drops = 0
            dropped_at: float | None = None
            gaps: list[float] = []
            while time.monotonic() - start < run_s:
                now = time.monotonic()
                accepted = sim.call("counters", timeout_s=10)["connections_accepted"]
                if accepted != seen:
                    seen, opened = accepted, now
                    if dropped_at is not None:
                        gaps.append(now - dropped_at)
                        dropped_at = None
                if now - opened >= every and sim.call("open_connections", timeout_s=10):
                    if sim.call("drop_connections", timeout_s=10):
                        drops += 1
                        dropped_at = now
                    opened = float("inf")
                time.sleep(0.02)
            end = time.monotonic()
            m1 = metrics(port).get("connector_disconnected_seconds_total")
            total = end - start
            if dropped_at is not None:  # still away at the end: the counter includes it
                gaps.append(end - dropped_at)
            accepted_in_run = sim.call("counters")["connections_accepted"] - accepted0
            recovered = True
            try:
                robicoin._wait_ready(proc, port, name)
                wait_for(lambda: sim.call("open_connections") == 1, 60, f"{name} to reconnect", 0.1)
            except BenchError as exc:
                log(f"faults: {exc}")
                recovered = False
            alive = proc.is_alive()
        exit_code = proc.exitcode
    disconnected = None if m0 is None or m1 is None else m1 - m0
    return {
        "connector": name,
        "run_s": round(total, 2),
        "drop_after_s": every,
        "backoff_initial_s": settings.backoff_initial_s,
        "backoff_max_s": settings.backoff_max_s,
        "healthy_after_s": settings.healthy_after_s,
        "drops": drops,
        "disconnected_s": None if disconnected is None else round(disconnected, 3),
        "disconnected_share": None if disconnected is None else round(disconnected / total, 4),
        "disconnected_basis": "connector_disconnected_seconds_total (its /metrics), "
        "end minus start of the run",
        "simulator_connections_accepted": accepted_in_run,
        "simulator_gap_s": round(sum(gaps), 3),
        "simulator_gap_share": round(sum(gaps) / total, 4),
        "simulator_gap_max_s": round(max(gaps), 3) if gaps else 0.0,
        "simulator_gap_basis": "drop -> next connection accepted, as the bench saw it polling "
        "the simulator every 20 ms (each gap up to one poll late)",
        "recovered": recovered and alive,
        "alive_at_end": alive,
        "exit_code": exit_code,
    }


def run_all(bootstrap: str, scale: Scale, log: Log) -> dict[str, Any]:
    out = {"outage": run_outages(scale, log)}
    log(f"faults: cryptomus source, connections dropped every {scale.drop_every_s:g}s")
    out["drops"] = run_drops(bootstrap, scale, log)
    return out
