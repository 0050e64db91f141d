"""Cryptomus WebSocket source: limits, latency at fixed rates, saturation, two peers.

One simulator process serves every run (updates off: it sends only what a run asks
for, with :func:`bench.loadgen.send_burst`). Each run gets a fresh connector
process and fresh topics, so its CPU and peak RSS are its own. A run:

1. start the connector (or a peer), wait until it subscribed the four public
   channels and every record written so far (resync markers, depth snapshots) is
   acknowledged;
2. the simulator sends N frames at the offered rate, noting each frame's send time;
3. wait until every event is acknowledged (or the drain limit passes), read the CPU
   time and peak RSS of the connector process, stop it (SIGTERM: it drains);
4. read the topics back with an independent consumer: every record the connector
   sent must be in Kafka, and it must have sent one event per trade / update.

The naive peer runs the fixed rates only; the tuned peer runs as the source does (fixed
rates, unthrottled, the maximum sustained rate) and lands in ``out["tuned"]``.

Added latency of a frame = broker acknowledgement of its last record minus the moment
the simulator handed the frame to its socket (both ``CLOCK_MONOTONIC``).
"""

from __future__ import annotations

import contextlib
import queue
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import workers
from bench.common import (
    SPAWN,
    BenchError,
    Scale,
    cpu_seconds,
    latency_summary,
    peak_rss_mb,
    read_back,
    start_process,
    wait_for,
)
from bench.loadgen import send_burst
from bench.profile import Sampler
from bench.simproc import SimProcess
from connectors.simulators.cryptomus import DEFAULT_API_KEY, DEFAULT_USER_ID

SIM = "connectors.simulators.cryptomus.CryptomusSimulator"
#: A fixed rate is "sustained" when the simulator kept to it (no TCP back-pressure),
#: nothing was lost, and no backlog built up (p99 added latency under this bound).
SUSTAINED_SEND_RATIO = 0.97
SUSTAINED_P99_MS = 100.0

Log = Callable[[str], None]


class CryptomusBench:
    def __init__(self, bootstrap: str, scale: Scale, log: Log) -> None:
        self.bootstrap = bootstrap
        self.scale = scale
        self.log = log
        self.sim = SimProcess(SIM, updates_per_second=0, seed=20261121, log_maxlen=1000)
        self.sample: list[Any] = []
        self.profile: dict[str, Any] | None = None

    def __enter__(self) -> CryptomusBench:
        self.sim.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.sim.stop()

    def _opts(self, prefix: str, **extra: Any) -> dict[str, Any]:
        return {
            "ws_url": self.sim.info["ws_url"],
            "base_url": self.sim.info["base_url"],
            "user_id": DEFAULT_USER_ID,
            "api_key": DEFAULT_API_KEY,
            "bootstrap": self.bootstrap,
            "prefix": prefix,
            **extra,
        }

    def _wait_subscribed(self, proc: Any) -> None:
        def subscribed() -> bool:
            if not proc.is_alive():
                raise BenchError(f"{proc.name} exited with code {proc.exitcode}")
            subs = self.sim.call("active_subscriptions")
            return len(subs) == 1 and all(ch in subs[0] for ch in workers.CHANNELS)

        wait_for(subscribed, 60, f"{proc.name} to subscribe", 0.1)

    # -- one run -------------------------------------------------------------------------

    def run(
        self,
        label: str,
        rate: float | None,
        frames: int,
        target: Callable[..., None] = workers.source_worker,
        kafka: dict[str, Any] | None = None,
        keep: int = 0,
        profile: Path | None = None,
    ) -> dict[str, Any]:
        prefix = f"bench.{uuid.uuid4().hex[:8]}"
        opts = self._opts(prefix, kafka=kafka or {})
        counters = SPAWN.Array("q", workers.N_COUNTERS, lock=False)
        out = SPAWN.Queue()
        proc = start_process(target, opts, counters, out, name=label)
        try:
            self._wait_subscribed(proc)
            # Markers and depth snapshots first: the burst starts on a quiet connector.
            wait_for(
                lambda: (
                    counters[workers.EVENTS_SENT] >= len(workers.MARKETS)
                    and counters[workers.RECORDS_ACKED] == counters[workers.RECORDS_SENT]
                    and counters[workers.EVENTS_ACKED] == counters[workers.EVENTS_SENT]
                ),
                30,
                f"{label}: start-up records acknowledged",
            )
            pre = counters[workers.EVENTS_SENT]
            assert proc.pid is not None
            cpu0 = cpu_seconds(proc.pid)
            sampler = Sampler(proc.pid, profile) if profile else None
            sent = self.sim.call(send_burst, frames, rate, timeout_s=900)
            send_s = (sent[-1][0] - sent[0][0]) / 1e9 if len(sent) > 1 else 0.0
            expected = sum(n for _, _, n in sent)
            disconnected = len(sent) < frames
            deadline = time.monotonic() + self.scale.drain_limit_s
            settled_since = None
            while counters[workers.EVENTS_ACKED] < pre + expected and time.monotonic() < deadline:
                if counters[workers.FAILED] or not proc.is_alive():
                    break
                if disconnected:  # frames still in the socket at the close are gone
                    now = time.monotonic()
                    if counters[workers.RECORDS_ACKED] != counters[workers.RECORDS_SENT]:
                        settled_since = None
                    elif settled_since is None:
                        settled_since = now
                    elif now - settled_since > 1.0:
                        break
                time.sleep(0.01)
            drained = counters[workers.EVENTS_ACKED] >= pre + expected
            cpu = cpu_seconds(proc.pid) - cpu0
            self.profile = sampler.stop() if sampler else None
            rss = peak_rss_mb(proc.pid)
            proc.terminate()
            try:
                result = out.get(timeout=120)
            except queue.Empty:
                raise BenchError(f"{label}: the worker reported nothing") from None
        finally:
            if proc.is_alive():
                proc.join(10)
            if proc.is_alive():
                proc.kill()
        records_sent = counters[workers.RECORDS_SENT]
        acks = result["acks"][pre : pre + expected]
        latencies: list[float] = []
        missing = 0
        i = 0
        for send_ns, _kind, n in sent:
            batch = acks[i : i + n]
            i += n
            if len(batch) < n or not all(batch):
                missing += 1
                continue
            latencies.append((max(batch) - send_ns) / 1e6)
        topics = [f"{prefix}.{ch}" for ch in workers.CHANNELS]
        back = read_back(self.bootstrap, topics, records_sent, timeout_s=120, keep=keep, idle_s=5.0)
        in_kafka = sum(back.counts.values())
        if keep:
            self.sample = back.records
        offered = rate if rate is not None else None
        send_rate = len(sent) / send_s if send_s else 0.0
        first_send = sent[0][0] if sent else 0
        acked_list = [a for a in acks if a]
        last_ack = max(acked_list) if acked_list else first_send
        span_s = (last_ack - first_send) / 1e9 if acked_list else 0.0
        # What the connector really took in (less than sent when it closed the socket).
        handled = counters[workers.EVENTS_SENT] - pre
        delivered = len(acked_list)
        lat = latency_summary(latencies)
        out_of = frames
        zero_loss = (
            not disconnected
            and result["exit_code"] == 0
            and drained
            and missing == 0
            and counters[workers.EVENTS_SENT] == pre + expected
            and in_kafka == records_sent
        )
        row = {
            "label": label,
            "offered_frames_per_s": offered,
            "frames": out_of,
            "records": expected,
            "records_per_frame": round(expected / max(out_of, 1), 3),
            "achieved_send_frames_per_s": round(send_rate, 1),
            "records_handled_by_connector": handled,
            "delivered_records_per_s": round(delivered / span_s, 1) if span_s else 0.0,
            "latency": lat,
            "frames_without_ack": missing,
            "records_sent_by_connector": records_sent,
            "records_in_kafka": in_kafka,
            "zero_loss": zero_loss,
            "drained_in_time": drained,
            "connector_disconnected": disconnected,
            "exit_code": result["exit_code"],
            "error": result["error"],
            "cpu_s": round(cpu, 3),
            "cpu_s_per_10k_records": round(cpu / handled * 10_000, 3) if handled else None,
            "peak_rss_mb": round(rss, 1),
        }
        if offered:
            row["sustained"] = (
                zero_loss
                and send_rate >= SUSTAINED_SEND_RATIO * offered
                and lat["p99_ms"] <= SUSTAINED_P99_MS
            )
        self.log(
            f"  {label}: {len(sent)} frames / {expected} records, sent at {send_rate:,.0f}/s, "
            f"delivered {row['delivered_records_per_s']:,.0f} rec/s, p50 {lat['p50_ms']} ms, "
            f"p99 {lat['p99_ms']} ms, zero loss {zero_loss}, CPU {cpu:.2f}s, RSS {rss:.0f} MB"
            + (" (the connector closed the connection: back-pressure)" if disconnected else "")
        )
        return row

    # -- limits -----------------------------------------------------------------------------

    def ws_limit(self) -> dict[str, Any]:
        frames = self.scale.burst_frames
        counters = SPAWN.Array("q", workers.N_COUNTERS, lock=False)
        out = SPAWN.Queue()
        opts = self._opts("-", skip=len(workers.MARKETS))
        proc = start_process(workers.ws_receiver, opts, frames, counters, out, name="ws-limit")
        try:
            self._wait_subscribed(proc)
            wait_for(
                lambda: counters[workers.EVENTS_ACKED] >= len(workers.MARKETS), 30, "snapshots"
            )
            sent = self.sim.call(send_burst, frames, None, timeout_s=900)
            result = out.get(timeout=300)
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        records = sum(n for _, _, n in sent)
        span = (result["last_ns"] - sent[0][0]) / 1e9
        row = {
            "frames": frames,
            "frames_per_s": round(frames / span, 1),
            "records_per_frame": round(records / frames, 3),
            "records_per_s_equivalent": round(records / span, 1),
            "mean_frame_bytes": round(result["bytes"] / max(result["frames"], 1), 1),
        }
        self.log(f"  raw WebSocket: {row['frames_per_s']:,.0f} frames/s")
        return row

    def producer_limit(self, backend: str = "kafka-python") -> dict[str, Any]:
        if not self.sample:
            raise BenchError("no sample records: run a connector run with keep= first")
        from connectors.runtime.kafka import ensure_topics
        from connectors.runtime.settings import KafkaSettings

        n = self.scale.producer_records
        prefix = f"bench.{uuid.uuid4().hex[:8]}"
        records = []
        for i in range(n):
            rec = self.sample[i % len(self.sample)]
            channel = rec.topic.rsplit(".", 1)[1]
            records.append((f"{prefix}.{channel}", rec.key, rec.value, list(rec.headers)))
        topics = sorted({r[0] for r in records})
        ensure_topics(KafkaSettings(bootstrap_servers=self.bootstrap), topics)
        out = SPAWN.Queue()
        proc = start_process(
            workers.producer_limit, self.bootstrap, records, backend, out, name="producer"
        )
        try:
            result = out.get(timeout=600)
        finally:
            proc.join(10)
        back = read_back(self.bootstrap, topics, n, timeout_s=120, idle_s=5.0)
        in_kafka = sum(back.counts.values())
        mean_bytes = sum(len(r[2]) + len(r[1] or b"") for r in records) / n
        row = {
            "backend": backend,
            "records": n,
            "mean_record_bytes": round(mean_bytes, 1),
            "records_per_s": round(result["acked"] / result["seconds"], 1),
            "failed": result["failed"],
            "records_in_kafka": in_kafka,
            "cpu_s_per_10k_records": round(result["cpu_s_in_loop"] / n * 10_000, 3),
        }
        self.log(f"  raw producer ({backend}): {row['records_per_s']:,.0f} records/s")
        return row

    # -- searches ---------------------------------------------------------------------------

    def max_sustained(
        self, label: str, fixed: list[dict[str, Any]], saturation_frames_per_s: float, **kw: Any
    ) -> dict[str, Any]:
        """Bisect between the fastest fixed rate that was sustained and the slowest one
        that was not (or the unthrottled rate), ``ladder_steps`` times."""
        passed = [r["offered_frames_per_s"] for r in fixed if r.get("sustained")]
        failed = [r["offered_frames_per_s"] for r in fixed if not r.get("sustained")]
        lo = max(passed, default=0.0)
        hi = min([f for f in failed if f > lo] or [max(saturation_frames_per_s, lo * 2)])
        best = max((r for r in fixed if r.get("sustained")), key=_offered, default=None)
        tried: list[dict[str, Any]] = []
        for _ in range(self.scale.ladder_steps):
            rate = round((lo + hi) / 2, -1)
            if rate <= lo or rate >= hi:
                break
            frames = max(100, int(rate * self.scale.seconds_per_rate))
            row = self.run(f"{label} @{rate:,.0f}/s", rate, frames, **kw)
            tried.append(row)
            if row.get("sustained"):
                lo, best = rate, row
            else:
                hi = rate
        return {"found": best is not None, "run": best, "tried": tried, "bounds": [lo, hi]}


def _offered(row: dict[str, Any]) -> float:
    return float(row["offered_frames_per_s"] or 0.0)


def _importable(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def tuned_runs(bench: CryptomusBench, scale: Scale, log: Log) -> dict[str, Any]:
    """The tuned peer as the source is measured: fixed rates, unthrottled, the
    maximum sustained rate (no producer limit: it is the source's, per backend)."""
    target = workers.tuned_peer
    log("tuned peer (websockets + msgspec + aiokafka, sends not awaited): fixed rates")
    rates = [
        bench.run(f"tuned @{rate:,}/s", rate, int(rate * scale.seconds_per_rate), target=target)
        for rate in scale.rates
    ]
    log("tuned peer: saturation")
    sat = bench.run("tuned unthrottled", None, scale.burst_frames, target=target)
    sat_fps = sat["delivered_records_per_s"] / max(sat["records_per_frame"], 1e-9)
    log("tuned peer: maximum sustained rate")
    best = bench.max_sustained("tuned", rates, sat_fps, target=target)
    return {"rates": rates, "saturation": sat, "max_sustained": best}


def run_all(
    bootstrap: str, scale: Scale, log: Log, backends: list[str], profile: bool = True
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    out: dict[str, Any] = {"backends": {}}
    profiles: dict[str, Any] = {}
    with CryptomusBench(bootstrap, scale, log) as bench, tempfile.TemporaryDirectory() as tmp:
        log("cryptomus: raw WebSocket receive limit")
        out["ws_limit"] = bench.ws_limit()
        for backend in backends:
            kafka = {} if backend == "kafka-python" else {"producer_backend": backend}
            section: dict[str, Any] = {"rates": []}
            log(f"cryptomus source ({backend}): fixed rates")
            for i, rate in enumerate(scale.rates):
                frames = int(rate * scale.seconds_per_rate)
                section["rates"].append(
                    bench.run(
                        f"source/{backend} @{rate:,}/s",
                        rate,
                        frames,
                        kafka=kafka,
                        keep=20_000 if i == 0 and not bench.sample else 0,
                    )
                )
            log(f"cryptomus: raw producer limit ({backend})")
            section["producer_limit"] = bench.producer_limit(backend)
            log(f"cryptomus source ({backend}): saturation")
            sat = bench.run(
                f"source/{backend} unthrottled",
                None,
                scale.burst_frames,
                kafka=kafka,
                profile=Path(tmp) / f"{backend}.txt" if profile else None,
            )
            section["saturation"] = sat
            if bench.profile:
                profiles[backend] = bench.profile
            sat_fps = sat["delivered_records_per_s"] / max(sat["records_per_frame"], 1e-9)
            log(f"cryptomus source ({backend}): maximum sustained rate")
            section["max_sustained"] = bench.max_sustained(
                f"source/{backend}", section["rates"], sat_fps, kafka=kafka
            )
            out["backends"][backend] = section
        log("naive peer (websockets + json + aiokafka send_and_wait): fixed rates")
        naive: list[dict[str, Any]] = []
        with contextlib.suppress(ImportError):
            import aiokafka  # noqa: F401

            for rate in scale.rates:
                frames = int(rate * scale.seconds_per_rate)
                naive.append(
                    bench.run(f"naive @{rate:,}/s", rate, frames, target=workers.naive_peer)
                )
        out["naive"] = naive
        out["tuned"] = None
        if _importable("aiokafka", "msgspec"):
            out["tuned"] = tuned_runs(bench, scale, log)
        else:
            log("tuned peer: skipped (aiokafka or msgspec is not installed)")
    return out, (
        {"how": "py-spy record --nonblocking --threads, unthrottled run", "backends": profiles}
        if profiles
        else None
    )
