"""A real Prometheus (Debian's package, loopback only) scrapes the connectors running
in the demo setup, with the shipped alert rules loaded."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
import yaml

from connectors.runtime.broker import free_port
from connectors.testing import T, wait_until
from tests.deploy_helpers import (
    CONNECTORS,
    DASHBOARD,
    RULES,
    dashboard_queries,
    exported_names,
    metric_names_in,
    tool,
)

pytestmark = pytest.mark.e2e


@dataclass
class Stack:
    ports: dict[str, int]
    prometheus: str
    output: list[str] = field(default_factory=list)

    def scrape(self, name: str) -> str:
        r = requests.get(f"http://127.0.0.1:{self.ports[name]}/metrics", timeout=5)
        r.raise_for_status()
        return r.text

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = requests.get(f"{self.prometheus}/api/v1/query", params={"query": promql}, timeout=5)
        body = r.json()
        assert body["status"] == "success", (promql, body)
        return list(body["data"]["result"])


def _read_lines(proc: subprocess.Popen[str], sink: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        sink.append(line.rstrip("\n"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus_bin = tool("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    # The demo as a user runs it: embedded broker (or $KAFKA_BOOTSTRAP_SERVERS),
    # both simulators and all three connectors, each serving /metrics on loopback.
    demo = subprocess.Popen(
        [sys.executable, "-m", "connectors", "demo", "--seconds", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    output: list[str] = []
    threading.Thread(target=_read_lines, args=(demo, output), daemon=True).start()
    prom: subprocess.Popen[bytes] | None = None
    try:
        ports: dict[str, int] = {}

        def announced() -> bool:
            for line in list(output):
                m = re.match(r"\s+([\w-]+): metrics http://127\.0\.0\.1:(\d+)/metrics", line)
                if m:
                    ports[m.group(1)] = int(m.group(2))
            assert demo.poll() is None, "\n".join(output)
            return set(ports) >= set(CONNECTORS)

        wait_until(announced, T(90), "the demo to start its connectors")

        web = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "exchange-connectors",
                    "static_configs": [{"targets": [f"127.0.0.1:{ports[c]}" for c in CONNECTORS]}],
                }
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        prom = subprocess.Popen(
            [
                prometheus_bin,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{web}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{web}"

        def all_up() -> bool:
            try:
                targets = requests.get(f"{url}/api/v1/targets", timeout=2).json()
            except (requests.RequestException, ValueError):
                return False
            active = targets["data"]["activeTargets"]
            return len(active) == len(CONNECTORS) and all(t["health"] == "up" for t in active)

        wait_until(all_up, T(60), "Prometheus to scrape every connector")
        yield Stack(ports=ports, prometheus=url, output=output)
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(timeout=T(20))
        demo.send_signal(signal.SIGTERM)
        try:
            demo.wait(timeout=T(60))
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()


def _series(stack: Stack, promql: str, timeout: float) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def present() -> bool:
        found[:] = stack.query(promql)
        return bool(found)

    wait_until(present, timeout, f"Prometheus to hold {promql}", step=0.5)
    return found


@pytest.mark.parametrize(
    ("promql", "connector"),
    [
        # Lag: the sink's consumer lag, the sources' event-time lag.
        ('connector_consumer_lag{connector="robicoin-orders"}', "robicoin-orders"),
        ('connector_event_time_lag_seconds_count{connector="cryptomus-ws"}', "cryptomus-ws"),
        ('connector_event_time_lag_seconds_count{connector="robicoin-poller"}', "robicoin-poller"),
        # Reconnects, counted per reason from the start (0 until one happens).
        ('connector_reconnects_total{connector="cryptomus-ws"}', "cryptomus-ws"),
        # Rate-limit waits of both connectors that share the Robicoin account.
        ('connector_rate_limit_waits_total{connector="robicoin-poller"}', "robicoin-poller"),
        ('connector_rate_limit_wait_seconds_count{connector="robicoin-orders"}', "robicoin-orders"),
    ],
)
def test_prometheus_holds_the_series_with_the_connectors_labels(
    stack: Stack, promql: str, connector: str
) -> None:
    series = _series(stack, promql, T(60))
    for s in series:
        labels = s["metric"]
        assert labels["connector"] == connector
        assert labels["job"] == "exchange-connectors"
        assert labels["instance"] == f"127.0.0.1:{stack.ports[connector]}"
    if "reconnects" in promql:
        reasons = {s["metric"]["reason"] for s in series}
        assert {"stale", "ping_timeout", "connection_lost", "server_closed"} <= reasons
    if "consumer_lag" in promql:
        assert {s["metric"]["topic"] for s in series} == {"robicoin.order-commands"}


def test_sink_lag_drains_to_zero_in_prometheus(stack: Stack) -> None:
    """The demo feeds six commands; Prometheus sees the sink's lag end at zero."""
    wait_until(
        lambda: (
            (r := stack.query('sum(connector_consumer_lag{connector="robicoin-orders"})'))
            and float(r[0]["value"][1]) == 0
            and stack.query('sum(connector_commands_total{connector="robicoin-orders"}) >= 5')
        ),
        T(90),
        "the sink to work through the demo's commands",
        step=0.5,
    )


def test_rules_load_and_evaluate_without_errors(stack: Stack) -> None:
    expected = {
        r.get("alert") or r.get("record")
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
    }

    def evaluated() -> bool:
        body = requests.get(f"{stack.prometheus}/api/v1/rules", timeout=5).json()
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        return {r["name"] for r in rules} == expected and all(
            r["health"] == "ok" and r.get("lastEvaluation", "").startswith("2") for r in rules
        )

    wait_until(evaluated, T(30), "every rule to evaluate cleanly", step=0.5)
    # A healthy demo pages nobody.
    firing = stack.query('ALERTS{alertstate="firing", severity="page"}')
    assert firing == []


@pytest.mark.parametrize("name", CONNECTORS)
def test_promtool_check_metrics_accepts_the_exposition(stack: Stack, name: str) -> None:
    text = stack.scrape(name)
    proc = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


def test_every_dashboard_query_names_exported_metrics_and_runs(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(dashboard)
    assert queries
    exported = exported_names([stack.scrape(c) for c in CONNECTORS])
    for q in queries:
        names = metric_names_in(q)
        assert names, f"query reads no connector metric: {q}"
        missing = names - exported
        assert not missing, f"{q} names metrics nobody exports: {missing}"
    # And Prometheus runs each one (Grafana's variables filled in as Grafana would).
    for q in queries:
        if q.startswith("label_values("):
            continue
        promql = (
            q.replace("$__rate_interval", "1m")
            .replace("$__range", "5m")
            .replace("$__interval", "15s")
            .replace("$connector", ".*")
        )
        stack.query(promql)
    # The throughput panel shows real numbers for the demo's channels.
    throughput = (
        'sum by (connector, channel) (rate(connector_records_total{outcome="produced"}[1m])) > 0'
    )
    wait_until(
        lambda: (
            {s["metric"]["connector"] for s in stack.query(throughput)}
            >= {"cryptomus-ws", "robicoin-poller"}
        ),
        T(30),
        "records/s from both sources",
        step=0.5,
    )
