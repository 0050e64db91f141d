"""The import graph of ``connectors``: no cycle, and pure modules stay pure.

Read from the source with :mod:`ast`, nothing is imported. Every import statement
counts, wherever it stands: at the top of a module, under ``if TYPE_CHECKING:`` (a
cycle there still ties two modules together and breaks the day someone moves the
import out), and inside a function (a lazy import is still a dependency: it runs the
first time the function does). A lazy import that needs a cycle to work is a type in
the wrong module, so the rule has no exception.

For purity, what an import runs counts: importing ``a.b.c`` runs ``a/__init__``,
``a/b/__init__`` and ``a/b/c``, so a pure module's closure includes the packages it
passes through. For cycles, only the modules named count: a package ``__init__`` that
imports its own submodules is how packages work, not a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "connectors"

#: Modules that must not reach a Kafka, WebSocket or HTTP client (STYLE.md: protocol
#: code is pure; records.py and wire.py are what protocol code builds on).
PURE = (
    "connectors.runtime.wire",
    "connectors.runtime.records",
    "connectors.runtime.cursors",
    "connectors.runtime.ledger",
    "connectors.cryptomus.protocol",
    "connectors.cryptomus.signing",
    "connectors.robicoin.protocol",
    "connectors.robicoin.signing",
    "connectors.robicoin.commands",
)
#: Top-level packages a pure module may not import, directly or transitively.
IMPURE = ("kafka", "confluent_kafka", "websockets", "requests")
#: Connector configuration and plugin modules: reading a config must not need the runner.
CONFIGS = (
    "connectors.cryptomus.config",
    "connectors.robicoin.config",
    "connectors.robicoin.sink_config",
    "connectors.cryptomus.plugin",
    "connectors.robicoin.plugin",
)
RUNNER = "connectors.runtime.app"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, name: str) -> Iterator[tuple[str, int]]:
    """Every module an import statement in ``path`` names, with its line; ``from a
    import b`` yields ``a.b`` (resolved against the known modules later) and ``a``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, node.lineno
            for alias in node.names:
                yield f"{target}.{alias.name}", node.lineno


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(edges between connectors modules, every external top-level package imported)``
    per module."""
    known = modules()
    edges: dict[str, set[str]] = {m: set() for m in known}
    external: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        for target, _ in imported_names(path, name):
            if target.split(".")[0] != "connectors":
                external[name].add(target.split(".")[0])
            elif target in known and target != name:
                edges[name].add(target)
    return edges, external


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def closure(start: str, edges: dict[str, set[str]]) -> dict[str, list[str]]:
    """Every connectors module importing ``start`` runs, with one import chain to it
    (the packages passed through included)."""
    chains: dict[str, list[str]] = {start: [start]}
    todo = [start]
    while todo:
        current = todo.pop()
        parts = current.split(".")
        parents = {".".join(parts[:i]) for i in range(1, len(parts))}
        for nxt in sorted((edges.get(current, set()) | parents) & set(edges)):
            if nxt not in chains:
                chains[nxt] = [*chains[current], nxt]
                todo.append(nxt)
    return chains


def pure_modules() -> list[str]:
    sessions = [m for m in modules() if m.rpartition(".")[2] == "session"]
    return [*PURE, *sessions]


def test_the_graph_is_read_from_every_module() -> None:
    edges, _ = graph()
    assert set(PURE) <= set(edges), sorted(set(PURE) - set(edges))
    assert "connectors.runtime.kafka" in edges["connectors.runtime.app"]
    # A lazy import inside a function counts too.
    assert "connectors.runtime.demo" in edges["connectors.cli"]


def test_there_is_no_import_cycle() -> None:
    edges, _ = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", pure_modules())
def test_pure_modules_reach_no_kafka_websocket_or_http_client(name: str) -> None:
    edges, external = graph()
    chains = closure(name, edges)
    bad = [
        " -> ".join([*chain, package])
        for module, chain in sorted(chains.items())
        for package in sorted(external[module])
        if package in IMPURE
    ]
    assert not bad, f"{name} is not pure:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", CONFIGS)
def test_connector_configs_do_not_import_the_runner(name: str) -> None:
    edges, _ = graph()
    chains = closure(name, edges)
    assert RUNNER not in chains, " -> ".join(chains.get(RUNNER, []))
