"""Turn the results into the markdown table (README) and the latency plot (PNG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

X = "\u00d7"  # multiplication sign
NONE = "\u2013"  # en dash: no value

TARGETS = {
    "source_vs_producer": 0.8,
    "p99_at_1k_ms": 10.0,
    "rss_at_5k_mb": 150.0,
    "sink_per_s": 9.5,
    "poller_budget_ratio": 0.9,
    "rdkafka_speedup": 3.0,
}


def _n(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


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
        runs += [*sec["rates"], sec["saturation"], *sec["max_sustained"]["tried"]]
        lim = sec["producer_limit"]
        if lim["failed"] or lim["records_in_kafka"] != lim["records"]:
            found.append(
                f"raw producer {lim['backend']}: {lim['records_in_kafka']} of "
                f"{lim['records']} records in Kafka, {lim['failed']} failed"
            )
    runs += crypto.get("naive", [])
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
        ws = crypto["ws_limit"]
        rows.append(
            (
                "Limit: raw WebSocket receive (simulator → client, no processing)",
                f"{_n(ws['frames_per_s'])} frames/s "
                f"(≈ {_n(ws['records_per_s_equivalent'])} records/s)",
                "",
                "",
            )
        )
        base = crypto["backends"].get("kafka-python")
        for backend, sec in crypto["backends"].items():
            lim = sec["producer_limit"]
            rows.append(
                (
                    f"Limit: raw producer, {backend} (acks=all, idempotent, same records)",
                    f"{_n(lim['records_per_s'])} records/s",
                    "",
                    "",
                )
            )
            lower = min(lim["records_per_s"], ws["records_per_s_equivalent"])
            best = sec["max_sustained"]["run"]
            if best:
                ratio = best["delivered_records_per_s"] / lower
                rows.append(
                    (
                        f"Cryptomus source ({backend}): max sustained, zero loss",
                        f"{_n(best['delivered_records_per_s'])} records/s "
                        f"({_n(best['offered_frames_per_s'])} frames/s); "
                        f"{ratio:.2f} {X} the lower limit",
                        f"≥ {TARGETS['source_vs_producer']} {X} producer limit",
                        _ok(best["delivered_records_per_s"] >= 0.8 * lim["records_per_s"]),
                    )
                )
            else:
                rows.append(
                    (
                        f"Cryptomus source ({backend}): max sustained, zero loss",
                        "no tried rate was sustained",
                        f"≥ {TARGETS['source_vs_producer']} {X} producer limit",
                        _ok(False),
                    )
                )
            sat = sec["saturation"]
            rows.append(
                (
                    f"Cryptomus source ({backend}): unthrottled throughput",
                    f"{_n(sat['delivered_records_per_s'])} records/s, "
                    f"{_n(sat['cpu_s_per_10k_records'], 2)} CPU s per 10k records",
                    "",
                    "",
                )
            )
            first = _at(sec["rates"], 1000)
            if first:
                p99 = first["latency"]["p99_ms"]
                rows.append(
                    (
                        f"Cryptomus source ({backend}): p99 added latency at 1k msg/s",
                        f"{_n(p99, 2)} ms",
                        f"≤ {TARGETS['p99_at_1k_ms']:.0f} ms",
                        _ok(p99 <= TARGETS["p99_at_1k_ms"]),
                    )
                )
            five = _at(sec["rates"], 5000)
            if five:
                rss = five["peak_rss_mb"]
                rows.append(
                    (
                        f"Cryptomus source ({backend}): peak RSS at 5k msg/s",
                        f"{_n(rss)} MB",
                        f"≤ {TARGETS['rss_at_5k_mb']:.0f} MB",
                        _ok(rss <= TARGETS["rss_at_5k_mb"]),
                    )
                )
            if backend != "kafka-python" and base and base["max_sustained"]["run"] and best:
                speedup = (
                    best["delivered_records_per_s"]
                    / base["max_sustained"]["run"]["delivered_records_per_s"]
                )
                rows.append(
                    (
                        f"Cryptomus source: {backend} vs kafka-python (max sustained)",
                        f"{speedup:.2f} {X}",
                        f"≥ {TARGETS['rdkafka_speedup']:.0f} {X}",
                        _ok(speedup >= TARGETS["rdkafka_speedup"]),
                    )
                )
    poller = results.get("poller")
    if poller:
        rows.append(
            (
                "Robicoin poller: requests/s against its budget",
                f"{_n(poller['requests_per_s'], 2)} of {_n(poller['budget_rps'], 2)} req/s "
                f"({poller['budget_ratio']:.0%}), {_n(poller['http_429'])} {X} 429, "
                f"{_n(poller['records_per_s'], 1)} records/s",
                f"≥ {TARGETS['poller_budget_ratio']:.0%} of budget, 0 {X} 429",
                _ok(
                    poller["budget_ratio"] >= TARGETS["poller_budget_ratio"]
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
        for row in crypto.get("naive", []):
            lines.append(_rate_row("naive peer (aiokafka)", row))
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
    if crypto.get("naive"):
        series["naive peer (aiokafka)"] = crypto["naive"]
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
