"""Robicoin benchmarks: the REST poller's request budget and the order sink's command rate.

Both run the real connector through the real runtime in a spawned process, against the
package's strict simulator in another, with the broker given by the caller:

* :func:`run_poller` — every stream polled as fast as the rate limiter allows
  (``interval_s: 0``, the documented limits, the whole account budget). What counts is
  what the *simulator* saw (requests, 429s) and what landed in Kafka.
* :func:`run_sink` — order commands queued faster than the exchange's 10 orders/s, so
  the sink is the bottleneck; command → result latency and the rate it sustained.

Child targets are top-level functions (``spawn`` pickles them by name) and take only
plain values; each builds its config itself. Try them by hand against the embedded
broker: ``python -m bench.robicoin [poller|sink|both] [smoke|full]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from multiprocessing.context import SpawnProcess
from typing import Any

import requests
from kafka import KafkaProducer, TopicPartition

from bench.common import (
    FULL,
    SMOKE,
    BenchError,
    Scale,
    cpu_seconds,
    latency_summary,
    peak_rss_mb,
    read_back,
    start_process,
    stop_process,
    wait_for,
)
from bench.simproc import SimProcess
from connectors.testing.topics import reader

SIMULATOR = "connectors.simulators.robicoin.RobicoinSimulator"
#: Account activity of the simulated exchange (its default rates, a fixed seed): new
#: transactions and market orders per second, so the incremental streams have news.
SIM_ACTIVITY = {"transactions_per_second": 2.0, "market_orders_per_second": 4.0, "seed": 7}
#: Every ticker window the exchange has: five ticker streams share the ticker budget.
TICKER_WINDOWS = ["24h", "1min", "1hour", "1day", "1month"]
#: Spec, "Limits": every non-ticker path (create-order, delete-order) allows
#: 1 request per 100 ms per account.
ORDER_LIMIT_PER_S = 10.0
ORDER_LIMIT_SOURCE = "shared/spec/robicoin-rest.md, Limits: every other path 1 request / 100 ms"
#: The sink's consumer: a short poll interval because some embedded brokers (Tansu)
#: hold every group join for about ``max_poll_interval_ms``; long enough for a batch
#: of 20 commands (``max_poll_records``) at the exchange's rate plus two Kafka
#: transactions each.
SINK_MAX_POLL_INTERVAL_MS = 6_000
READY_TIMEOUT_S = 60.0

Log = Callable[[str], None]


def _prefix(kind: str) -> str:
    return f"bench-rc-{kind}-{uuid.uuid4().hex[:8]}"


def _free_port() -> int:
    from connectors.runtime.broker import free_port

    return free_port("127.0.0.1")


def _ready(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _wait_ready(proc: SpawnProcess, port: int, what: str) -> float:
    """Wait for ``/readyz``; returns the seconds it took. A dead child fails at once."""
    started = time.monotonic()

    def check() -> bool:
        if not proc.is_alive():
            raise BenchError(f"{what} exited with code {proc.exitcode} before it was ready")
        return _ready(port)

    wait_for(check, READY_TIMEOUT_S, f"{what} /readyz", interval_s=0.1)
    return time.monotonic() - started


def _credentials() -> Any:
    from connectors.testing.robicoin import credentials

    return credentials()


def _run_child(plugin: Any, config: Any) -> None:
    from connectors.runtime.app import run_connector
    from connectors.runtime.logs import setup_logging

    setup_logging("WARNING")
    result = asyncio.run(run_connector(plugin, config))
    sys.exit(result.exit_code)


def _pid(proc: SpawnProcess) -> int:
    if proc.pid is None:
        raise BenchError(f"{proc.name} was never started")
    return proc.pid


@contextlib.contextmanager
def _stopping(proc: SpawnProcess) -> Iterator[SpawnProcess]:
    try:
        yield proc
    finally:
        stop_process(proc)


def _status_counts(before: dict[str, Any], after: dict[str, Any]) -> dict[int, int]:
    b, a = before["responses_by_status"], after["responses_by_status"]
    return {s: a[s] - b.get(s, 0) for s in sorted(a) if a[s] - b.get(s, 0)}


def _errors(statuses: dict[int, int]) -> tuple[int, int]:
    """(429s, other non-2xx) from a status → count map."""
    other = sum(n for s, n in statuses.items() if not 200 <= s < 300 and s != 429)
    return statuses.get(429, 0), other


# -- the poller --------------------------------------------------------------------------


def poller_config(
    base_url: str, bootstrap: str, prefix: str, health_port: int, margin: float | None
) -> Any:
    """The poller as a user after throughput configures it: every stream every time the
    limiter allows (``interval_s: 0``), all ticker windows, the documented limits
    (10 per 100 ms ticker, 1 per 100 ms the rest) and the account's whole budget
    (``share.slots: 1``: no order sink on this account)."""
    from connectors.robicoin import config as rc
    from connectors.runtime.settings import KafkaSettings, RuntimeSettings

    return rc.RobicoinConfig(
        robicoin=rc.RobicoinSettings(
            base_url=base_url,
            credentials=_credentials(),
            streams=rc.Streams(
                ticker=rc.TickerStream(interval_s=0.0, windows=list(TICKER_WINDOWS)),
                order=rc.StreamSettings(interval_s=0.0),
                balance=rc.SnapshotStream(interval_s=0.0),
                transaction=rc.StreamSettings(interval_s=0.0),
                open_order=rc.SnapshotStream(interval_s=0.0),
            ),
            topics=rc.Topics(
                ticker=f"{prefix}.ticker",
                order=f"{prefix}.orders",
                balance=f"{prefix}.balances",
                transaction=f"{prefix}.transactions",
                open_order=f"{prefix}.open-orders",
                dead_letter=f"{prefix}.dead-letter",
                state=f"{prefix}.state",
            ),
            rate_limit=rc.RateLimitSettings(
                margin=margin,
                ticker=rc.Limit(10, 0.1),
                other=rc.Limit(1, 0.1),
                share=rc.AccountShare(slots=1, slot=0),
            ),
            auth_guard=rc.AuthGuardSettings(topic=f"{prefix}.guard"),
            transactional_id=f"{prefix}-poller",
        ),
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        runtime=RuntimeSettings(
            health_host="127.0.0.1", health_port=health_port, log_level="WARNING"
        ),
    )


def poller_child(
    base_url: str, bootstrap: str, prefix: str, health_port: int, margin: float | None
) -> None:
    """Child process: the robicoin-poller until SIGTERM."""
    from connectors.robicoin.plugin import PLUGIN

    _run_child(PLUGIN, poller_config(base_url, bootstrap, prefix, health_port, margin))


def _effective_margin(margin: float | None) -> float:
    """The margin the connector applies to a budget it owns alone (``share.slots: 1``)."""
    from connectors.robicoin.config import RateLimitSettings

    return RateLimitSettings(margin=margin).margin_for(shared=False)


def _poller_budget(margin: float | None) -> dict[str, float]:
    """Requests/s the poller's two limiters allow, computed by the runtime's own class
    (an upper bound: each window starts at the previous answer, so latency adds)."""
    from connectors.runtime.ratelimit import RateLimit, RateLimiter

    m = _effective_margin(margin)
    ticker = RateLimiter(RateLimit(10, 0.1), margin=m).requests_per_second
    other = RateLimiter(RateLimit(1, 0.1), margin=m).requests_per_second
    return {"ticker": ticker, "other": other}


def _klass(path: str) -> str:
    """The exchange's limit class of a path (``ticker``, ``ticker/1min``, ``balance``)."""
    return "ticker" if path == "ticker" or path.startswith("ticker/") else "other"


def run_poller(
    bootstrap: str, scale: Scale, log: Log, *, margin: float | None = None
) -> dict[str, Any]:
    """The poller for ``scale.poller_seconds`` at its full budget.

    ``margin`` is the limiter's margin on every window; ``None`` keeps the connector's
    default for a budget it owns alone.
    """
    prefix = _prefix("poll")
    port = _free_port()
    budget = _poller_budget(margin)
    budget_rps = budget["ticker"] + budget["other"]
    wall = time.monotonic()
    with SimProcess(SIMULATOR, **SIM_ACTIVITY) as sim:
        base_url = sim.info["base_url"]
        proc = start_process(
            poller_child, base_url, bootstrap, prefix, port, margin, name="robicoin-poller"
        )
        with _stopping(proc):
            ready_s = _wait_ready(proc, port, "robicoin-poller")
            log(f"poller ready after {ready_s:.1f}s; polling for {scale.poller_seconds:.0f}s")
            before = sim.call("counters")
            cpu0 = cpu_seconds(_pid(proc))
            sim_cpu0 = cpu_seconds(sim.pid)
            t0 = time.time()
            time.sleep(scale.poller_seconds)
            after = sim.call("counters")
            t1 = time.time()
            cpu1 = cpu_seconds(_pid(proc))
            sim_cpu1 = cpu_seconds(sim.pid)
            rss = peak_rss_mb(_pid(proc))
            alive = proc.is_alive()
        exit_code = proc.exitcode
        total = sim.call("counters")
    seconds = t1 - t0
    by_path = {
        p.removeprefix("/api/v1/"): n - before["requests_by_path"].get(p, 0)
        for p, n in sorted(after["requests_by_path"].items())
    }
    by_class = Counter[str]()
    for path, n in by_path.items():
        by_class[_klass(path)] += n
    requests_n = after["requests"] - before["requests"]
    http_429, other_errors = _errors(_status_counts(before, after))
    topics = [
        f"{prefix}.{t}" for t in ("ticker", "orders", "balances", "transactions", "open-orders")
    ]
    back = read_back(bootstrap, [*topics, f"{prefix}.dead-letter"], 10**9, 60.0, keep=10**7)
    lo, hi = int(t0 * 1000), int(t1 * 1000)
    in_window = Counter(
        r.topic for r in back.records if r.topic in topics and lo <= r.timestamp < hi
    )
    records_total = sum(back.counts[t] for t in topics)
    records_window = sum(in_window.values())
    rps = requests_n / seconds
    return {
        "budget_rps": round(budget_rps, 2),
        "budget_by_class_rps": {k: round(v, 2) for k, v in budget.items()},
        "documented_limit_rps": {"ticker": 100.0, "other": 10.0},
        "margin": _effective_margin(margin),
        "requests": requests_n,
        "requests_per_s": round(rps, 2),
        "budget_ratio": round(rps / budget_rps, 3),
        "requests_by_class_per_s": {k: round(v / seconds, 2) for k, v in sorted(by_class.items())},
        "budget_ratio_by_class": {
            k: round(by_class[k] / seconds / budget[k], 3) for k in ("ticker", "other")
        },
        "requests_by_endpoint": by_path,
        "http_429": http_429,
        "http_other_errors": other_errors,
        "http_429_whole_run": total["responses_by_status"].get(429, 0),
        "records": records_window,
        "records_per_s": round(records_window / seconds, 1),
        "records_by_topic": {t.removeprefix(prefix + "."): in_window[t] for t in topics},
        "records_whole_run": records_total,
        "dead_letters": back.counts[f"{prefix}.dead-letter"],
        "seconds": round(seconds, 2),
        "ready_s": round(ready_s, 2),
        "cpu_s": round(cpu1, 2),
        "cpu_s_measured_window": round(cpu1 - cpu0, 2),
        "cpu_util_measured_window": round((cpu1 - cpu0) / seconds, 3),
        "peak_rss_mb": round(rss, 1),
        "simulator_cpu_s_measured_window": round(sim_cpu1 - sim_cpu0, 2),
        "alive_at_end": alive,
        "exit_code": exit_code,
        "wall_s": round(time.monotonic() - wall, 1),
        "simulator_activity": dict(SIM_ACTIVITY),
        "records_basis": "record timestamps (poll time) inside the measured window, read back",
    }


# -- the order sink ----------------------------------------------------------------------

#: pair → (reference price, tick, buy amount in TRY, sell amount in coin): decimal text.
_MARKETS: dict[str, tuple[str, str, str, str]] = {
    "btc-try": ("3456789.12", "0.01", "1500.00", "0.0005"),
    "eth-try": ("123456.78", "0.01", "900.00", "0.01"),
    "ltc-try": ("3456.78", "0.01", "350.00", "0.5"),
    "usdt-try": ("41.2345", "0.0001", "1000.00", "25"),
}


def sink_config(
    base_url: str, bootstrap: str, prefix: str, health_port: int, margin: float | None
) -> Any:
    """The order sink as a user after the most orders the exchange allows configures it:
    the documented 1 request / 100 ms, the account's whole budget (``share.slots: 1``:
    no poller on this account), the per-minute risk cap at the exchange's own 600/min
    (the default 60 would reject from the 61st order of a minute), and a command age
    limit that a queue of a few hundred commands cannot outlive."""
    from connectors.robicoin.config import AccountShare, AuthGuardSettings, Limit
    from connectors.robicoin.config import RateLimitSettings as Limits
    from connectors.robicoin.sink_config import (
        ConsumerSettings,
        OrderSinkConfig,
        OrderSinkSettings,
        RiskSettings,
    )
    from connectors.runtime.settings import KafkaSettings, RuntimeSettings
    from connectors.testing.robicoin import sink_topics

    return OrderSinkConfig(
        robicoin=OrderSinkSettings(
            base_url=base_url,
            credentials=_credentials(),
            rate_limit=Limits(margin=margin, other=Limit(1, 0.1), share=AccountShare(1, 0)),
            pairs=list(_MARKETS),
            command_max_age_s=300.0,
            risk=RiskSettings(max_orders_per_minute=int(ORDER_LIMIT_PER_S * 60)),
            topics=sink_topics(prefix),
            consumer=ConsumerSettings(
                group_id=f"{prefix}-orders",
                max_poll_interval_ms=SINK_MAX_POLL_INTERVAL_MS,
                session_timeout_ms=6_000,
                heartbeat_interval_ms=1_000,
            ),
            auth_guard=AuthGuardSettings(topic=f"{prefix}.guard"),
            transactional_id=f"{prefix}-orders",
        ),
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        runtime=RuntimeSettings(
            health_host="127.0.0.1", health_port=health_port, log_level="WARNING"
        ),
    )


def sink_child(
    base_url: str, bootstrap: str, prefix: str, health_port: int, margin: float | None
) -> None:
    """Child process: the robicoin-orders sink until SIGTERM."""
    from connectors.robicoin.plugin import ORDERS_PLUGIN

    _run_child(ORDERS_PLUGIN, sink_config(base_url, bootstrap, prefix, health_port, margin))


def create_commands(prefix: str, n: int, now_ms: int) -> list[dict[str, Any]]:
    """``n`` create commands over four pairs, buys and sells alternating, each with a
    limit price a few percent off the market and one tick apart from every other, so
    the simulator's record of created orders identifies each (no order id comes back)."""
    pairs = list(_MARKETS)
    out = []
    for i in range(n):
        pair = pairs[i % len(pairs)]
        ref, tick, buy_try, sell_qty = (Decimal(x) for x in _MARKETS[pair])
        side = "buy" if (i // len(pairs)) % 2 == 0 else "sell"
        offset = Decimal(i) * Decimal(tick)
        if side == "buy":
            price = (ref * Decimal("0.97")).quantize(tick) - offset
        else:
            price = (ref * Decimal("1.03")).quantize(tick) + offset
        out.append(
            {
                "command_id": f"{prefix}-c{i:05d}",
                "action": "create",
                "pair": pair,
                "side": side,
                "amount": str(buy_try if side == "buy" else sell_qty),
                "price": str(price),
                "created_at": now_ms,
            }
        )
    return out


def _order_key(fields: dict[str, Any]) -> tuple[str, str, str, str]:
    """Identifies a create: (pair, side, amount, price) as the exchange received it."""
    pair = fields.get("pair", fields.get("type"))
    return (str(pair), str(fields["side"]), str(fields["amount"]), str(fields["price"]))


class _Results:
    """Reads the results topic as a downstream service would (``read_committed``)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = reader(bootstrap, committed=True, fetch_max_wait_ms=50)
        parts: set[int] | None = None
        deadline = time.monotonic() + 20
        while not parts and time.monotonic() < deadline:
            parts = self._consumer.partitions_for_topic(topic)
            if not parts:
                time.sleep(0.1)
        if not parts:
            self._consumer.close()
            raise BenchError(f"results topic {topic} has no partitions")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning(*tps)

    def poll(self) -> list[tuple[int, Any]]:
        """New result records, each with the wall time (ns) this consumer got it."""
        batch = self._consumer.poll(timeout_ms=100)
        seen = time.time_ns()
        return [(seen, rec) for recs in batch.values() for rec in recs]

    def close(self) -> None:
        self._consumer.close()


def run_sink(
    bootstrap: str, scale: Scale, log: Log, *, margin: float | None = None
) -> dict[str, Any]:
    """``scale.sink_commands`` order commands, queued at once, through the sink.

    Four in five are creates; the rest delete orders this run created (their
    ``data_id`` read from the simulator once the create went through, as a bot reading
    the open-order topic would), so deletes queue behind the creates not yet done.
    """
    n = scale.sink_commands
    if n < 2:
        raise BenchError("run_sink needs at least 2 commands")
    n_delete = n // 5
    n_probe = max(2, min(10, n // 20))
    prefix = _prefix("sink")
    port = _free_port()
    wall = time.monotonic()
    deadline_s = 30.0 + n * 0.5
    with SimProcess(SIMULATOR, **SIM_ACTIVITY) as sim:
        base_url = sim.info["base_url"]
        proc = start_process(
            sink_child, base_url, bootstrap, prefix, port, margin, name="robicoin-orders"
        )
        with _stopping(proc):
            ready_s = _wait_ready(proc, port, "robicoin-orders")
            log(f"sink ready after {ready_s:.1f}s; sending {n} commands")
            results = _Results(bootstrap, f"{prefix}.results")
            producer = KafkaProducer(
                bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_block_ms=10_000
            )
            try:
                producer.partitions_for(f"{prefix}.commands")  # metadata before timing
                before = sim.call("counters")
                sim_cpu0 = cpu_seconds(sim.pid)
                run = _drive(
                    sim, producer, results, f"{prefix}.commands", prefix, n, n_delete, deadline_s
                )
                after = sim.call("counters")
                sim_cpu = cpu_seconds(sim.pid) - sim_cpu0
                unloaded = _probe(producer, results, f"{prefix}.commands", prefix, n_probe)
            finally:
                producer.close(timeout=5)
                results.close()
            cpu = cpu_seconds(_pid(proc))
            rss = peak_rss_mb(_pid(proc))
            alive = proc.is_alive()
        exit_code = proc.exitcode
    statuses = _status_counts(before, after)
    http_429, other_errors = _errors(statuses)
    got = run["results"]
    first_sent, first_seen, last_seen = (
        run["first_sent_ns"],
        run["first_seen_ns"],
        run["last_seen_ns"],
    )
    steady = (len(got) - 1) / ((last_seen - first_seen) / 1e9) if len(got) > 1 else 0.0
    overall = len(got) / ((last_seen - first_sent) / 1e9) if got else 0.0
    by_action: dict[str, list[float]] = {}
    decided: list[float] = []
    for cid, (seen_ns, ts_ms, _, _, action) in got.items():
        sent_ns = run["sent_ns"][cid]
        by_action.setdefault(action, []).append((seen_ns - sent_ns) / 1e6)
        decided.append(ts_ms - sent_ns / 1e6)
    outcomes = Counter(r[2] for r in got.values())
    reasons = Counter(f"{r[2]}:{r[3]}" for r in got.values() if r[3])
    return {
        "commands": run["sent"],
        "creates": run["creates"],
        "deletes": run["deletes"],
        "results": len(got),
        "missing_results": run["sent"] - len(got),
        "commands_per_s": round(steady, 2),
        "commands_per_s_overall": round(overall, 2),
        "rate_basis": (
            "commands_per_s: (results - 1) / (last result seen - first result seen); "
            "overall: results / (last result seen - first command sent)"
        ),
        "limit_per_s": ORDER_LIMIT_PER_S,
        "limit_source": ORDER_LIMIT_SOURCE,
        "configured_budget_per_s": round(ORDER_LIMIT_PER_S / (1 + _effective_margin(margin)), 2),
        "margin": _effective_margin(margin),
        "ratio_to_limit": round(steady / ORDER_LIMIT_PER_S, 3),
        "latency": latency_summary(v for vs in by_action.values() for v in vs),
        "latency_basis": (
            "KafkaProducer.send() call (bench wall clock) -> result record returned by "
            "the bench's read_committed consumer poll (bench wall clock)"
        ),
        "latency_by_action": {k: latency_summary(v) for k, v in by_action.items() if v},
        "latency_to_result_timestamp": latency_summary(decided),
        "latency_in_sink": latency_summary(
            v["in_sink"] for v in run["latency_ms"].values() if v["in_sink"] is not None
        ),
        "latency_exchange": latency_summary(
            v["exchange"] for v in run["latency_ms"].values() if v["exchange"] is not None
        ),
        "latency_unloaded": latency_summary(unloaded),
        "latency_note": (
            "all commands are queued at once, so `latency` is mostly queueing (a command's "
            "place in the queue / the sink's rate); in_sink and exchange come from each "
            "result's latency_ms (received -> decided, and time in exchange calls); "
            "unloaded: one create at a time, sent after the previous result, on the same "
            "basis as `latency`"
        ),
        "http_429": http_429,
        "http_other_errors": other_errors,
        "http_statuses": {str(k): v for k, v in statuses.items()},
        "requests_by_endpoint": {
            p.removeprefix("/api/v1/"): v - before["requests_by_path"].get(p, 0)
            for p, v in sorted(after["requests_by_path"].items())
            if v - before["requests_by_path"].get(p, 0)
        },
        "orders_created_on_exchange": after["orders_created"] - before["orders_created"],
        "orders_deleted_on_exchange": after["orders_deleted"] - before["orders_deleted"],
        "outcomes": dict(sorted(outcomes.items())),
        "reasons": dict(sorted(reasons.items())),
        "feed_s": round(run["feed_s"], 3),
        "ready_s": round(ready_s, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_mb": round(rss, 1),
        "simulator_cpu_s": round(sim_cpu, 2),
        "alive_at_end": alive,
        "exit_code": exit_code,
        "consumer_max_poll_interval_ms": SINK_MAX_POLL_INTERVAL_MS,
        "wall_s": round(time.monotonic() - wall, 1),
    }


def _drive(
    sim: SimProcess,
    producer: KafkaProducer,
    results: _Results,
    topic: str,
    prefix: str,
    n: int,
    n_delete: int,
    deadline_s: float,
) -> dict[str, Any]:
    """Queue the creates at once, feed deletes as their orders appear on the exchange,
    and read results until one per command arrived or ``deadline_s`` passed."""
    creates = create_commands(prefix, n - n_delete, int(time.time() * 1000))
    # Deletes cancel every second order of the first part of the run.
    targets = {_order_key(c): c["pair"] for c in creates[: 2 * n_delete : 2]}
    sent_ns: dict[str, int] = {}

    def send(cmd: dict[str, Any]) -> None:
        sent_ns[cmd["command_id"]] = time.time_ns()
        producer.send(topic, value=json.dumps(cmd).encode(), key=cmd["pair"].encode())

    started = time.monotonic()
    for cmd in creates:
        send(cmd)
    producer.flush(timeout=30)
    feed_s = time.monotonic() - started
    got: dict[str, tuple[int, int, str, str | None, str]] = {}
    in_sink: dict[str, dict[str, int | None]] = {}
    first_seen = last_seen = 0
    deletes = 0
    next_lookup = 0.0
    end = started + deadline_s
    while len(got) < len(creates) + n_delete and time.monotonic() < end:
        if deletes < n_delete and time.monotonic() >= next_lookup:
            next_lookup = time.monotonic() + 0.25
            for row in sim.call("orders_created", timeout_s=10):
                key = _order_key(row)
                if key in targets and deletes < n_delete:
                    pair = targets.pop(key)
                    send(
                        {
                            "command_id": f"{prefix}-d{deletes:05d}",
                            "action": "delete",
                            "pair": pair,
                            "data_id": int(row["data_id"]),
                            "created_at": int(time.time() * 1000),
                        }
                    )
                    deletes += 1
            producer.flush(timeout=30)
        for seen_ns, rec in results.poll():
            value = json.loads(rec.value)
            cid = value.get("command_id")
            if cid not in sent_ns or cid in got:
                continue
            got[cid] = (
                seen_ns,
                rec.timestamp,
                value["outcome"],
                value.get("reason"),
                value.get("action") or "none",
            )
            in_sink[cid] = value["latency_ms"]
            first_seen = first_seen or seen_ns
            last_seen = seen_ns
    return {
        "sent": len(sent_ns),
        "creates": len(creates),
        "deletes": deletes,
        "sent_ns": sent_ns,
        "first_sent_ns": min(sent_ns.values()),
        "first_seen_ns": first_seen,
        "last_seen_ns": last_seen,
        "results": got,
        "latency_ms": in_sink,
        "feed_s": feed_s,
    }


def _probe(
    producer: KafkaProducer, results: _Results, topic: str, prefix: str, n: int
) -> list[float]:
    """Latency without a queue: ``n`` creates, each sent once the previous one's result
    arrived and never faster than 2/s, so the sink is idle when each arrives."""
    latencies: list[float] = []
    creates = create_commands(f"{prefix}-p", n, int(time.time() * 1000))
    for cmd in creates:
        sent = time.time_ns()
        producer.send(topic, value=json.dumps(cmd).encode(), key=cmd["pair"].encode())
        producer.flush(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = [seen for seen, rec in results.poll() if rec.key == cmd["command_id"].encode()]
            if found:
                latencies.append((found[0] - sent) / 1e6)
                break
        time.sleep(max(0.0, 0.5 - (time.time_ns() - sent) / 1e9))
    return latencies


# -- by hand -----------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    """``python -m bench.robicoin [poller|sink|both] [smoke|full]`` on the embedded broker
    (or ``$KAFKA_BOOTSTRAP_SERVERS``); prints each result as JSON."""
    import bench.robicoin as me  # child targets must be named bench.robicoin.*
    from connectors.runtime.broker import kafka_broker

    which = argv[0] if argv else "both"
    scale = FULL if len(argv) > 1 and argv[1] == "full" else SMOKE

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    with kafka_broker() as bootstrap:
        for name, fn in (("poller", me.run_poller), ("sink", me.run_sink)):
            if which not in (name, "both"):
                continue
            started = time.monotonic()
            log(f"robicoin {name} at {scale.name} scale ...")
            out = fn(bootstrap, scale, log)
            log(f"robicoin {name}: {time.monotonic() - started:.1f}s")
            print(json.dumps({name: out}, indent=2), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
