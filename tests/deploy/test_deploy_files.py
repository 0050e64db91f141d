"""The deploy files, checked with real tools: kubectl's kustomize, the Kubernetes
schemas (kubernetes-validate), promtool, and the connectors' own config loader."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from connectors.runtime import config as config_mod
from connectors.runtime.plugins import discover
from tests.deploy_helpers import (
    CONNECTORS,
    DASHBOARD,
    DEPLOY,
    ROOT,
    RULE_TESTS,
    RULES,
    SINGLE_WRITERS,
    by_kind,
    dashboard_queries,
    metric_names_in,
    render_overlay,
    tool,
)

#: The oldest Kubernetes these manifests promise to work on (policy/v1 PDBs etc.).
K8S_VERSION = "1.29.0"
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
OVERLAYS = ("production", "simulated")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    work = tmp_path_factory.mktemp("kustomize")
    return {name: render_overlay(name, work) for name in OVERLAYS}


# -- Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    checked = 0
    for obj in objects:
        if obj["kind"] in OPERATOR_KINDS:
            continue  # CRDs: checked below against their own rules
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        checked += 1
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount"} <= kinds
    assert checked >= 10
    # Every object lands in the overlay's namespace.
    assert {o["metadata"].get("namespace") for o in objects} == {
        {"production": "trading-data", "simulated": "exchange-connectors-sim"}[overlay]
    }


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", CONNECTORS)
def test_each_connector_runs_hardened_with_probes_resources_and_mounted_secrets(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, name: str
) -> None:
    objects = rendered[overlay]
    deployment = by_kind(objects, "Deployment")[name]
    pod = deployment["spec"]["template"]["spec"]
    c = _container(deployment)

    # The command picks the connector; one image for all of them.
    assert c["args"][:2] == ["run", name]
    images = {_container(d)["image"] for d in by_kind(objects, "Deployment").values()}
    assert len(images) == 1

    # Security.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]

    # Probes on the port the connector's own config serves health on.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    cm_name = volumes["config"]["configMap"]["name"]
    config_maps = by_kind(objects, "ConfigMap")
    config_text = config_maps[cm_name]["data"]["config.yaml"]
    config = yaml.safe_load(config_text)
    assert ports["metrics"] == config["runtime"]["health_port"]
    args = c["args"]
    assert args[args.index("--config") + 1] == mounts["config"] + "/config.yaml"

    # Resources: requests and limits for CPU and memory.
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])

    # Credentials come from Secrets, mounted where the config's *_file options point;
    # the ConfigMap holds no secret value at all.
    creds = volumes["credentials"]
    secret_names = (
        [creds["secret"]["secretName"]]
        if "secret" in creds
        else [s["secret"]["name"] for s in creds["projected"]["sources"]]
    )
    assert secret_names and all(s for s in secret_names)
    section = config[name.split("-")[0]]
    for key, path in section["credentials"].items():
        assert key.endswith("_file"), f"{key} in the ConfigMap: credentials belong in a Secret"
        assert path.startswith(mounts["credentials"] + "/")
    assert not re.search(r"(?im)^\s*(api_key|private_key|public_key|secret|user_id):", config_text)
    if overlay == "simulated":
        secrets = by_kind(objects, "Secret")
        for s in secret_names:
            assert s in secrets, f"{s} is mounted but the overlay does not create it"

    # Kafka's address from the overlay's ConfigMap, not baked into the image.
    env = {e["name"]: e for e in c.get("env", [])}
    ref = env["KAFKA_BOOTSTRAP_SERVERS"]["valueFrom"]["configMapKeyRef"]
    assert config_maps[ref["name"]]["data"][ref["key"]]

    # SIGTERM drains within the grace period.
    assert pod["terminationGracePeriodSeconds"] > config["runtime"].get("drain_timeout_s", 20)

    # A Service exposes the metrics port to the pods of this Deployment.
    service = by_kind(objects, "Service")[name]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_single_writer_per_api_key(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """The poller and the sink never run twice on one account, not even in a rollout."""
    objects = rendered[overlay]
    deployments = by_kind(objects, "Deployment")
    for name in SINGLE_WRITERS:
        spec = deployments[name]["spec"]
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "Recreate"}
    # Nothing scales them, and no disruption budget pins them (it would block drains).
    assert not [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    for pdb in by_kind(objects, "PodDisruptionBudget").values():
        selected = pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        assert selected not in SINGLE_WRITERS
    # The source never overlaps either (two pods would write private events twice),
    # and a budget keeps drains to one source pod at a time.
    source = deployments["cryptomus-ws"]["spec"]
    assert source["strategy"] == {"type": "Recreate"}
    pdb = by_kind(objects, "PodDisruptionBudget")["cryptomus-ws"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= (
        deployments["cryptomus-ws"]["spec"]["template"]["metadata"]["labels"].items()
    )


def test_production_overlay_brings_the_operator_objects(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    objects = rendered["production"]
    monitor = by_kind(objects, "ServiceMonitor")["exchange-connectors"]
    services = by_kind(objects, "Service")
    match = monitor["spec"]["selector"]["matchLabels"]
    exprs = monitor["spec"]["selector"]["matchExpressions"]
    selected = [
        s
        for s in services.values()
        if match.items() <= s["metadata"]["labels"].items()
        and all(s["metadata"]["labels"].get(e["key"]) in e["values"] for e in exprs)
    ]
    assert sorted(s["metadata"]["name"] for s in selected) == sorted(CONNECTORS)
    port = monitor["spec"]["endpoints"][0]["port"]
    assert all(port in [p["name"] for p in s["spec"]["ports"]] for s in selected)
    # job="exchange-connectors", which the alert rules select on.
    assert selected[0]["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "exchange-connectors"

    # The PrometheusRule holds exactly the plain rule file's groups, and promtool
    # accepts them.
    rule = by_kind(objects, "PrometheusRule")["exchange-connectors"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    extracted = tmp_path / "from-prometheusrule.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    check = subprocess.run(
        [tool("promtool"), "check", "rules", str(extracted)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr

    # The dashboard ships as a ConfigMap Grafana's sidecar picks up.
    dash = by_kind(objects, "ConfigMap")["exchange-connectors-dashboard"]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["exchange-connectors.json"]) == json.loads(DASHBOARD.read_text())


def test_prometheusrule_file_is_rendered_from_the_rule_file() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("render", DEPLOY / "monitoring" / "render.py")
    assert spec and spec.loader
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    assert (DEPLOY / "monitoring" / "prometheusrule.yaml").read_text() == render.render(), (
        "prometheusrule.yaml is stale: run python deploy/monitoring/render.py"
    )


# -- Prometheus rules -------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    proc = subprocess.run(
        [tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_has_a_unit_test_and_the_unit_tests_pass() -> None:
    alerts = {
        r["alert"]
        for g in yaml.safe_load(RULES.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for t in tests
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == fired, f"alerts without a firing test: {sorted(alerts - fired)}"
    required = {
        "ExchangeChannelNoData",
        "ExchangeReconnectStorm",
        "ExchangeRateLimitWaitsClimbing",
        "OrderSinkLagHigh",
        "AuthGuardTripped",
        "DeadLetterGrowth",
        "UnknownOrderOutcome",
    }
    assert required <= alerts
    proc = subprocess.run(
        [tool("promtool"), "test", "rules", str(RULE_TESTS)],
        capture_output=True,
        text=True,
        cwd=RULE_TESTS.parent,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_paging_alerts_and_runbooks() -> None:
    """Someone is paged for a tripped auth guard and for unknown order outcomes, and
    every alert links to a README section that exists."""
    rules = [
        r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    ]
    severity = {r["alert"]: r["labels"]["severity"] for r in rules}
    assert severity["AuthGuardTripped"] == "page"
    assert severity["UnknownOrderOutcome"] == "page"
    readme = (ROOT / "README.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", readme, flags=re.MULTILINE)
    }
    for r in rules:
        anchor = r["annotations"]["runbook"].split("#", 1)[1]
        assert anchor in anchors, f"{r['alert']}: README has no section #{anchor}"


# -- Grafana ----------------------------------------------------------------------------


def test_dashboard_is_json_with_the_panels_users_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "exchange-connectors"
    queries = dashboard_queries(dashboard)
    used = set().union(*(metric_names_in(q) for q in queries))
    for needed in (
        "connector_records_total",  # throughput by channel
        "connector_event_time_lag_seconds_bucket",  # event-time lag
        "connector_reconnects_total",
        "connector_rate_limit_waits_total",
        "connector_consumer_lag",  # sink lag
        "connector_commands_total",  # command outcomes
    ):
        assert needed in used, f"no panel reads {needed}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# -- Docker -----------------------------------------------------------------------------


def _dockerfile_final_stage() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    instructions = [tuple(ln.split(None, 1)) for ln in lines]
    last_from = max(i for i, ins in enumerate(instructions) if ins[0].upper() == "FROM")
    return [(ins[0].upper(), ins[1] if len(ins) > 1 else "") for ins in instructions[last_from:]]


def test_dockerfile_runs_one_non_root_image_that_drains_on_sigterm() -> None:
    final = _dockerfile_final_stage()
    get = {k: v for k, v in final}
    user = get["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0, "numeric non-root user (runAsNonRoot checks it)"
    assert get["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(get["ENTRYPOINT"]) == ["exchange-connectors"]
    # Only runtime dependencies: no extras installed anywhere in the file.
    whole = "\n".join(
        ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines() if not ln.startswith("#")
    )
    assert "[test]" not in whole and "[embedded]" not in whole
    assert "PYTHONDONTWRITEBYTECODE=1" in whole  # read-only root filesystem
    # Every COPY source from the build context exists and is let through .dockerignore.
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    copies = [ln.split()[1:-1] for ln in whole.splitlines() if ln.startswith("COPY ")]
    sources = [src for args in copies if not args[0].startswith("--from") for src in args]
    assert "connectors" in sources and "pyproject.toml" in sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert src.rstrip("/") in allowed, f"{src} is excluded by .dockerignore"


# -- docker compose ---------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text()))


def test_compose_file_has_the_whole_stack() -> None:
    services = _compose()["services"]
    assert set(services) >= {
        "kafka",
        "cryptomus-sim",
        "robicoin-sim",
        *CONNECTORS,
        "prometheus",
        "grafana",
    }
    kafka_env = services["kafka"]["environment"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert not any("zookeeper" in s for s in services)
    for name in CONNECTORS:
        svc = services[name]
        assert svc["read_only"] is True
        assert not svc["user"].startswith("0")
        assert svc["cap_drop"] == ["ALL"]
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / "compose" / svc["build"]["context"] / "deploy" / "Dockerfile").exists()
        assert svc["command"][:2] == ["run", name]
    # Every file a service mounts is in the repository.
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / "compose" / source).exists(), source


@pytest.mark.parametrize("name", CONNECTORS)
def test_compose_connectors_load_their_config_and_point_at_the_simulators(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real config loader accepts each connector's mounted file plus its compose
    environment, and the result talks to the simulator services, not an exchange."""
    services = _compose()["services"]
    svc = services[name]
    env = {k: str(v) for k, v in svc["environment"].items()}
    mounted = svc["volumes"][0].split(":", 1)[0]
    for key in list(os.environ):
        if key.startswith(config_mod.ENV_PREFIX) or key.startswith(("ROBICOIN_", "CRYPTOMUS_")):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = discover()[name]
    cfg = config_mod.load(plugin.config_type, DEPLOY / "compose" / mounted, env)
    assert cfg.kafka.bootstrap_servers == "kafka:9092"
    assert cfg.kafka.replication_factor == 1
    assert cfg.runtime.health_port == 8080
    sim_ports = {
        s: svc2["command"][svc2["command"].index("--port") + 1]
        for s, svc2 in services.items()
        if s.endswith("-sim")
    }
    urls = (
        [cfg.cryptomus.ws_url, cfg.cryptomus.api_url, cfg.cryptomus.scales_url]
        if name == "cryptomus-ws"
        else [cfg.robicoin.base_url]
    )
    exchange = name.split("-")[0]
    for url in urls:
        assert f"{exchange}-sim:{sim_ports[exchange + '-sim']}" in url, url
    # The Prometheus in the stack scrapes this connector.
    prom = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    targets = [
        t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert f"{name}:{cfg.runtime.health_port}" in targets
    assert prom["scrape_configs"][0]["job_name"] == "exchange-connectors"


def test_compose_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """``promtool check config`` on the compose Prometheus config, with the rule file
    at the path compose mounts it to (rewritten into a temp dir)."""
    prom = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "exchange-connectors.rules.yml").write_text(RULES.read_text())
    prom["rule_files"] = [str(rules_dir / "*.yml")]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(prom))
    proc = subprocess.run(
        [tool("promtool"), "check", "config", str(cfg)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout
