"""Helpers for the deploy tests: real tools (kubectl, promtool) found or reported."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "monitoring" / "prometheus" / "exchange-connectors.rules.yml"
RULE_TESTS = DEPLOY / "monitoring" / "prometheus" / "exchange-connectors.rules.test.yml"
DASHBOARD = DEPLOY / "monitoring" / "grafana" / "exchange-connectors.json"
CONNECTORS = ("cryptomus-ws", "robicoin-poller", "robicoin-orders")
SINGLE_WRITERS = ("robicoin-poller", "robicoin-orders")


def tool(name: str) -> str:
    """The path of a required command-line tool.

    Missing in CI is a failure (``.ci/run`` installs it); on a developer machine the
    test is skipped with the package to install.
    """
    found = shutil.which(name)
    if found:
        return found
    hint = {
        "promtool": "apt-get install prometheus",
        "prometheus": "apt-get install prometheus",
        "kubectl": "apt-get install kubernetes-client",
    }.get(name, name)
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed ({hint}); .ci/run should have installed it")
    pytest.skip(f"{name} is not installed ({hint})")


def _kustomize_is_v2(kubectl: str) -> bool:
    """kubectl before 1.21 embeds kustomize 2.0.3 (Debian bookworm ships 1.20)."""
    out = subprocess.run(
        [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True
    ).stdout
    m = re.search(r'"minor":\s*"(\d+)', out)
    return bool(m) and int(m.group(1)) < 21


def _to_kustomize_v2(tree: Path) -> None:
    """Rename the two keys kustomize 2.0.3 spells differently, in a copy of deploy/.

    Directories listed under ``resources`` were ``bases`` and ``patches: [{path}]``
    was ``patchesStrategicMerge``; everything else (generators, images, namespace,
    generatorOptions) means the same in both, so the real tool still does the work.
    """
    for kfile in tree.rglob("kustomization.yaml"):
        doc = yaml.safe_load(kfile.read_text(encoding="utf-8"))
        resources = doc.pop("resources", [])
        bases = [r for r in resources if (kfile.parent / r).is_dir()]
        files = [r for r in resources if r not in bases]
        if bases:
            doc["bases"] = bases
        if files:
            doc["resources"] = files
        patches = doc.pop("patches", [])
        if patches:
            assert all(set(p) == {"path"} for p in patches), "only file patches translate"
            doc["patchesStrategicMerge"] = [p["path"] for p in patches]
        kfile.write_text(yaml.safe_dump(doc), encoding="utf-8")


def render_overlay(overlay: str, workdir: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize deploy/kubernetes/overlays/<overlay>``, parsed."""
    kubectl = tool("kubectl")
    deploy = DEPLOY
    if _kustomize_is_v2(kubectl):
        deploy = workdir / "deploy"
        if not deploy.exists():
            shutil.copytree(DEPLOY, deploy)
            _to_kustomize_v2(deploy)
    proc = subprocess.run(
        [kubectl, "kustomize", str(deploy / "kubernetes" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def metric_families(exposition: str) -> dict[str, str]:
    """``{family: type}`` from the ``# TYPE`` lines of a Prometheus text scrape."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, flags=re.MULTILINE))


def exported_names(expositions: list[str]) -> set[str]:
    """Every series name a scrape can hold: sample names plus each family's suffixes."""
    names: set[str] = set()
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
        "gauge": ("",),
    }
    for text in expositions:
        for family, kind in metric_families(text).items():
            names.update(family + s for s in suffixes.get(kind, ("",)))
            if kind == "counter" and family.endswith("_total"):
                names.add(family)
        names.update(re.findall(r"^([a-zA-Z_:][\w:]*)[{ ]", text, flags=re.MULTILINE))
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression in a Grafana dashboard (panels, rows, templating)."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard)
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            found.append(query)
    return found


def metric_names_in(expr: str) -> set[str]:
    """The connector metric names a PromQL expression (or label_values()) reads."""
    return set(re.findall(r"\b(connector_[a-z_]+)\b", expr))
