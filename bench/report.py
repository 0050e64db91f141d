"""Turn the results into the markdown table (README) and the latency plot (PNG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

X = "\u00d7"  # multiplication sign
NONE = "\u2013"  # en dash: no value

TARGETS: dict[str, Any] = {
    # Issue 14: the source's maximum sustained rate over the raw producer of its own
    # backend, measured in the same run.
    "source_vs_producer": {"kafka-python": 0.8, "confluent-kafka": 0.6},
    # Issue 14: a third of the CPU per 10k records at 1k msg/s it measured on 2026-12-02
    # (6.27 / 3.13 s); absolute, so it only holds on a machine like that one.
    "cpu_per_10k_at_1k": {"kafka-python": 6.27 / 3, "confluent-kafka": 3.13 / 3},
    "cpu_per_10k_at_1k_baseline": {"kafka-python": 6.27, "confluent-kafka": 3.13},
    "p99_at_1k_ms": 10.0,
    "rss_at_5k_mb": 150.0,
    "sink_per_s": 9.5,
    "poller_budget_ratio": 0.95,
    "poller_cores": 0.3,
    "rdkafka_speedup": 3.0,
}
#: The two peers in the tables.
TUNED = "tuned peer, msgspec + aiokafka"
NAIVE = "naive peer (aiokafka)"
#: The tuned peer in the headline table.
PEER = "Tuned peer (websockets + msgspec + aiokafka, sends not awaited)"


def _n(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


#: The value of a row whose fixed rate this scale does not run (the smoke scale).
NO_RUN = "no {rate:,} frames/s run at this scale"


def _ok(good: bool | None) -> str:
    return NONE if good is None else ("met" if good else "**missed**")


def _loss(row: dict[str, Any]) -> str:
    """Overloaded runs end with the connector closing the socket: frames in flight are
    not read (and resync markers say so); that is back-pressure, not silent loss."""
    if row["zero_loss"]:
        return "yes"
    return "pushed back" if row.get("connector_disconnected") else "**no**"


def _rate_row(name: str, row: dict[str, Any]) -> str:
    lat = row["latency"]
    offered = row["offered_frames_per_s"]
    return (
        f"| {name} | {_n(offered) if offered else 'unthrottled'} "
        f"| {_n(row['achieved_send_frames_per_s'])} | {_n(row['delivered_records_per_s'])} "
        f"| {_n(lat['p50_ms'], 2)} | {_n(lat['p99_ms'], 2)} | {_n(lat['p999_ms'], 2)} "
        f"| {_loss(row)} | {_n(row['cpu_s_per_10k_records'], 2)} "
        f"| {_n(row['peak_rss_mb'])} |"
    )


def _at(rows: list[dict[str, Any]], rate: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["offered_frames_per_s"] == rate), None)


def _runs(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Every run of a source backend or of the tuned peer: fixed rates, unthrottled,
    the search for the maximum sustained rate."""
    return [*section["rates"], section["saturation"], *section["max_sustained"]["tried"]]


def _rps(row: dict[str, Any]) -> float:
    return float(row["delivered_records_per_s"])


def _ratio(top: dict[str, Any] | None, bottom: dict[str, Any] | None) -> str:
    """Two maximum sustained runs' delivered rates over each other, with both rates."""
    if not top or not bottom or not _rps(bottom):
        return "not both sustained at any tried rate"
    return f"{_rps(top) / _rps(bottom):.2f} {X} ({_n(_rps(top))} of {_n(_rps(bottom))} records/s)"


def problems(results: dict[str, Any]) -> list[str]:
    """What is broken, as opposed to slow: lost or duplicated records, failed runs.

    A connector that closes the connection because Kafka is behind (back-pressure)
    loses nothing it acknowledged and marks the gap with resync markers; that is slow,
    not broken. Anything else that does not add up is a problem (exit code 1).
    """
    found: list[str] = []
    crypto = results.get("cryptomus") or {}
    runs: list[dict[str, Any]] = []
    for sec in crypto.get("backends", {}).values():
        runs += _runs(sec)
        lim = sec["producer_limit"]
        if lim["failed"] or lim["records_in_kafka"] != lim["records"]:
            found.append(
                f"raw producer {lim['backend']}: {lim['records_in_kafka']} of "
                f"{lim['records']} records in Kafka, {lim['failed']} failed"
            )
    runs += crypto.get("naive", [])
    if crypto.get("tuned"):
        runs += _runs(crypto["tuned"])
    for run in runs:
        if run["exit_code"] != 0:
            found.append(f"{run['label']}: exit code {run['exit_code']}: {run['error']}")
        elif run["records_in_kafka"] != run["records_sent_by_connector"]:
            found.append(
                f"{run['label']}: sent {run['records_sent_by_connector']} records, "
                f"{run['records_in_kafka']} in Kafka"
            )
        elif not run["connector_disconnected"] and run["drained_in_time"] and not run["zero_loss"]:
            found.append(f"{run['label']}: {run['frames_without_ack']} frames without an ack")
    return found + fault_problems(results.get("faults") or {})


def fault_problems(faults: dict[str, Any]) -> list[str]:
    """A connector that did not come back after a fault, a sink that did not give
    exactly one result per command (or sent an order twice), an unclean exit."""
    found: list[str] = []
    for row in (faults.get("outage") or {}).get("connectors", []):
        name = row["connector"]
        if row["exited_during_outage"] is not None:
            found.append(f"{name} exited during the Kafka outage ({row['exited_during_outage']})")
        if not row["recovered"]:
            found.append(f"{name} did not recover after the Kafka outage")
        if "commands" in row:
            if not row["exactly_one_result_per_command"]:
                found.append(
                    f"{name}: {row['results']} results for {row['commands']} commands "
                    f"({row['commands_with_a_result']} with a result, "
                    f"{row['duplicate_results']} duplicates) after the Kafka outage"
                )
            if row["creates_sent_to_exchange"] > row["commands"]:
                found.append(
                    f"{name}: {row['creates_sent_to_exchange']} create-order requests "
                    f"for {row['commands']} commands"
                )
        if row["exit_code"] != 0:
            found.append(f"{name}: exit code {row['exit_code']} after SIGTERM (outage run)")
    drops = faults.get("drops")
    if drops:
        if not drops["recovered"]:
            found.append(f"{drops['connector']} did not reconnect after the last drop")
        if drops["disconnected_s"] is None:
            found.append(f"{drops['connector']}: no connector_disconnected_seconds_total")
        if drops["exit_code"] != 0:
            found.append(f"{drops['connector']}: exit code {drops['exit_code']} (drop run)")
    return found


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measure, value, target, verdict) for the headline table."""
    rows: list[tuple[str, str, str, str]] = []
    crypto = results.get("cryptomus")
    if crypto:
        rows += _source_rows(crypto)
    poller = results.get("poller")
    if poller:
        ratio, cores = poller["budget_ratio"], poller.get("cpu_util_measured_window")
        on = f" on {_n(cores, 2)} of a core" if cores is not None else ""
        rows.append(
            (
                "Robicoin poller: share of its request budget used, and its CPU",
                f"{_n(poller['requests_per_s'], 2)} of {_n(poller['budget_rps'], 2)} req/s "
                f"({ratio:.0%}){on}, {_n(poller['http_429'])} {X} 429, "
                f"{_n(poller['records_per_s'], 1)} records/s",
                f"≥ {TARGETS['poller_budget_ratio']:.0%} of budget at "
                f"≤ {TARGETS['poller_cores']} core, 0 {X} 429",
                _ok(
                    None
                    if cores is None
                    else ratio >= TARGETS["poller_budget_ratio"]
                    and cores <= TARGETS["poller_cores"]
                    and poller["http_429"] == 0
                ),
            )
        )
    sink = results.get("sink")
    if sink:
        lat = sink["latency"]
        rows.append(
            (
                "Robicoin order sink: commands/s against the 10/s limit",
                f"{_n(sink['commands_per_s'], 2)} commands/s, {_n(sink['http_429'])} {X} 429; "
                f"command → result p50 {_n(lat['p50_ms'])} ms, p99 {_n(lat['p99_ms'])} ms",
                f"≥ {TARGETS['sink_per_s']} commands/s, 0 {X} 429",
                _ok(sink["commands_per_s"] >= TARGETS["sink_per_s"] and sink["http_429"] == 0),
            )
        )
    return rows


def _source_rows(crypto: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """The Cryptomus rows: limits, each backend of the source, the tuned peer."""
    ws = crypto["ws_limit"]
    rows = [
        (
            "Limit: raw WebSocket receive (simulator → client, no processing)",
            f"{_n(ws['frames_per_s'])} frames/s (≈ {_n(ws['records_per_s_equivalent'])} records/s)",
            "",
            "",
        )
    ]
    backends: dict[str, dict[str, Any]] = crypto["backends"]
    base = backends.get("kafka-python")
    for backend, sec in backends.items():
        name = f"Cryptomus source ({backend})"
        lim = sec["producer_limit"]
        rows.append(
            (
                f"Limit: raw producer, {backend} (acks=all, idempotent, same records)",
                f"{_n(lim['records_per_s'])} records/s",
                "",
                "",
            )
        )
        want = TARGETS["source_vs_producer"].get(backend)
        target = f"≥ {want} {X} raw {backend} producer" if want else ""
        best = sec["max_sustained"]["run"]
        if best and lim["records_per_s"]:
            ratio = _rps(best) / lim["records_per_s"]
            rows.append(
                (
                    f"{name}: max sustained, zero loss, ÷ raw producer",
                    f"{_n(_rps(best))} records/s ({_n(best['offered_frames_per_s'])} "
                    f"frames/s); {ratio:.2f} {X} the producer's {_n(lim['records_per_s'])}",
                    target,
                    _ok(ratio >= want) if want else "",
                )
            )
        else:
            rows.append(
                (
                    f"{name}: max sustained, zero loss, ÷ raw producer",
                    "no tried rate was sustained" if not best else "no raw producer rate",
                    target,
                    _ok(False if not best else None) if want else "",
                )
            )
        sat = sec["saturation"]
        rows.append(
            (
                f"{name}: unthrottled throughput",
                f"{_n(_rps(sat))} records/s, "
                f"{_n(sat['cpu_s_per_10k_records'], 2)} CPU s per 10k records",
                "",
                "",
            )
        )
        first = _at(sec["rates"], 1000)
        cap = TARGETS["cpu_per_10k_at_1k"].get(backend)
        was = TARGETS["cpu_per_10k_at_1k_baseline"].get(backend)
        cpu = first["cpu_s_per_10k_records"] if first else None
        rows.append(
            (
                f"{name}: CPU s per 10k records at 1k msg/s",
                _n(cpu, 2) if first else NO_RUN.format(rate=1000),
                f"≤ {cap:.2f} (⅓ of {was})" if cap else "",
                _ok(None if cpu is None else cpu <= cap) if cap else "",
            )
        )
        p99 = first["latency"]["p99_ms"] if first else None
        rows.append(
            (
                f"{name}: p99 added latency at 1k msg/s",
                f"{_n(p99, 2)} ms" if first else NO_RUN.format(rate=1000),
                f"≤ {TARGETS['p99_at_1k_ms']:.0f} ms",
                _ok(None if p99 is None else p99 <= TARGETS["p99_at_1k_ms"]),
            )
        )
        five = _at(sec["rates"], 5000)
        rss = five["peak_rss_mb"] if five else None
        rows.append(
            (
                f"{name}: peak RSS at 5k msg/s",
                f"{_n(rss)} MB" if five else NO_RUN.format(rate=5000),
                f"≤ {TARGETS['rss_at_5k_mb']:.0f} MB",
                _ok(None if rss is None else rss <= TARGETS["rss_at_5k_mb"]),
            )
        )
        if backend != "kafka-python" and base:
            base_best = base["max_sustained"]["run"]
            speedup = _rps(best) / _rps(base_best) if best and base_best else None
            rows.append(
                (
                    f"Cryptomus source: {backend} ÷ kafka-python (max sustained)",
                    _ratio(best, base_best),
                    f"≥ {TARGETS['rdkafka_speedup']:.0f} {X}",
                    _ok(None if speedup is None else speedup >= TARGETS["rdkafka_speedup"]),
                )
            )
    tuned = crypto.get("tuned")
    if not tuned:
        why = "not run (aiokafka or msgspec is not installed)" if "tuned" in crypto else "not run"
        rows.append((PEER, why, "", ""))
        return rows
    peer = tuned["max_sustained"]["run"]
    rows.append(
        (
            f"{PEER}: max sustained, zero loss",
            f"{_n(_rps(peer))} records/s ({_n(peer['offered_frames_per_s'])} frames/s)"
            if peer
            else "no tried rate was sustained",
            "",
            "",
        )
    )
    sat = tuned["saturation"]
    rows.append(
        (
            f"{PEER}: unthrottled throughput",
            f"{_n(_rps(sat))} records/s, "
            f"{_n(sat['cpu_s_per_10k_records'], 2)} CPU s per 10k records",
            "",
            "",
        )
    )
    for backend, sec in backends.items():
        best = sec["max_sustained"]["run"]
        rows.append(
            (
                f"Cryptomus source ({backend}) ÷ tuned peer (max sustained)",
                _ratio(best, peer),
                "",
                "",
            )
        )
    return rows


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    m = meta["machine"]
    lines = [
        f"Measured {meta['date']} with `{meta['command']}` ({meta['scale']} scale, "
        f"{meta['wall_s']:.0f} s) on {m['cores']} cores of {m['cpu']}, "
        f"{m['memory_gib']} GiB, Python {m['python']}, broker: {meta['broker']}.",
    ]
    summary = summary_rows(results)
    if summary:
        lines += ["", "| Measure | Result | Target | |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary]
    crypto = results.get("cryptomus")
    if crypto:
        lines += [
            "",
            "Added latency (frame sent by the simulator → record acknowledged by the broker):",
            "",
            "| Pipeline | Offered frames/s | Sent frames/s | Delivered records/s | p50 ms "
            "| p99 ms | p99.9 ms | Zero loss | CPU s / 10k records | Peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for backend, sec in crypto["backends"].items():
            for row in sec["rates"]:
                lines.append(_rate_row(f"source, {backend}", row))
            lines.append(_rate_row(f"source, {backend}", sec["saturation"]))
            if sec["max_sustained"]["run"]:
                lines.append(
                    _rate_row(f"source, {backend} (max sustained)", sec["max_sustained"]["run"])
                )
        tuned = crypto.get("tuned")
        if tuned:
            for row in [*tuned["rates"], tuned["saturation"]]:
                lines.append(_rate_row(TUNED, row))
            if tuned["max_sustained"]["run"]:
                lines.append(_rate_row(f"{TUNED} (max sustained)", tuned["max_sustained"]["run"]))
        for row in crypto.get("naive", []):
            lines.append(_rate_row(NAIVE, row))
    faults = results.get("faults")
    if faults:
        lines += fault_lines(faults)
    profile = results.get("profile")
    if profile:
        for backend, prof in profile["backends"].items():
            if not prof.get("samples"):
                continue
            lines += [
                "",
                f"Where the source's CPU goes, {backend} ({profile['how']}, "
                f"{prof['samples']:,} samples):",
                "",
                "| Share of busy samples | Where |",
                "|---|---|",
            ]
            lines += [f"| {share:.0%} | thread `{t}` |" for t, share in prof["threads"].items()]
            lines += [f"| {share:.0%} | {stage} |" for stage, share in prof["stages"].items()]
            lines += [f"| {share:.0%} | self: `{where}` |" for where, share in prof["top_self"][:8]]
    return "\n".join(lines) + "\n"


def fault_lines(faults: dict[str, Any]) -> list[str]:
    """The Kafka-outage table and the connection-drop line."""
    lines: list[str] = []
    outage = faults.get("outage") or {}
    if outage.get("skipped"):
        lines += ["", f"Kafka outage: skipped ({outage['skipped']})."]
    rows = outage.get("connectors", [])
    if rows:
        lines += [
            "",
            f"Each connector while its broker is frozen (SIGSTOP) for "
            f"{rows[0]['outage_s']:.0f} s, then resumed:",
            "",
            "| Connector | RSS before MB | RSS peak in outage MB | RSS after MB "
            "| CPU s during outage | Recovered | Recovery s | Gap markers |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            recovered = _n(bool(row["recovered"]))
            if "commands" in row:
                recovered += (
                    f" ({row['commands_with_a_result']} of {row['commands']} commands with "
                    f"one result, {row['duplicate_results']} duplicates)"
                )
            lines.append(
                f"| {row['connector']} | {_n(row['rss_before_mb'], 1)} "
                f"| {_n(row['rss_peak_mb'], 1)} | {_n(row['rss_after_mb'], 1)} "
                f"| {_n(row['cpu_s_during_outage'], 1)} | {recovered} "
                f"| {_n(row['recovery_s'], 1)} | {_n(row.get('gaps_written'))} |"
            )
    drops = faults.get("drops")
    if drops:
        share = drops["disconnected_share"]
        lines += [
            "",
            f"Cryptomus source while the exchange drops every connection "
            f"{drops['drop_after_s']:g} s after it opened ({drops['run_s']:.0f} s, back-off "
            f"{drops['backoff_initial_s']:g}-{drops['backoff_max_s']:g} s): disconnected "
            f"{_n(None if share is None else share * 100, 1)} % of the time "
            f"({_n(drops['disconnected_s'], 2)} s, its own counter); the simulator dropped "
            f"{drops['drops']} connections and accepted {drops['simulator_connections_accepted']}"
            f", {_n(drops['simulator_gap_s'], 2)} s from drops to the next connection "
            f"(longest {_n(drops['simulator_gap_max_s'], 2)} s); "
            f"reconnected at the end: {_n(bool(drops['recovered']))}.",
        ]
    return lines


def render(folder: Path) -> str:
    """The table again from saved results (``python -m bench.report bench/results``)."""
    import json

    results: dict[str, Any] = {}
    for path in sorted(folder.glob("*.json")):
        results.update(json.loads(path.read_text()))
    return markdown(results)


def plot(results: dict[str, Any], path: Path) -> bool:
    """Latency (p50 and p99) against offered rate, one line pair per pipeline."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    crypto = results.get("cryptomus")
    if not crypto:
        return False
    series: dict[str, list[dict[str, Any]]] = {
        f"source ({b})": s["rates"] for b, s in crypto["backends"].items()
    }
    if crypto.get("tuned"):
        series["tuned peer (msgspec + aiokafka)"] = crypto["tuned"]["rates"]
    if crypto.get("naive"):
        series[NAIVE] = crypto["naive"]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for name, rows in series.items():
        xs = [r["offered_frames_per_s"] for r in rows]
        for key, style in (("p50_ms", "-o"), ("p99_ms", "--s")):
            ys = [max(r["latency"][key], 0.01) for r in rows]
            ax.plot(xs, ys, style, label=f"{name} {key.split('_')[0]}")
    ax.set_xlabel("offered rate (frames/s)")
    ax.set_ylabel("added latency (ms, log scale)")
    ax.set_yscale("log")
    ax.axhline(10, color="grey", linewidth=0.8, linestyle=":")
    ax.set_title("Cryptomus frame sent → broker ack")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


if __name__ == "__main__":
    import sys

    print(render(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")), end="")
