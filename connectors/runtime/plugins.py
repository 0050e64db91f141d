"""Connector plugins, found through the ``exchange_connectors.plugins`` entry-point group.

A third party adds an exchange by shipping a package whose entry point names a
:class:`ConnectorPlugin`; nothing in this repository changes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Literal, Protocol

from connectors.runtime.errors import ConfigError

if TYPE_CHECKING:
    from connectors.runtime.authguard import GuardSpec
    from connectors.runtime.context import RuntimeContext

GROUP = "exchange_connectors.plugins"


class Connector(Protocol):
    """What the runtime needs from a connector instance."""

    def topics(self) -> dict[str, dict[str, str]]:
        """Every topic written, with topic configs for creation (e.g. compaction)."""

    async def run(self, ctx: RuntimeContext) -> None:
        """Run until ``ctx.stop`` is set; raise FatalError when it cannot go on."""


@dataclass(frozen=True)
class DemoPart:
    """What a plugin contributes to ``exchange-connectors demo``."""

    config: Any
    #: Called once the connector runs (e.g. feed sample commands); may be None.
    on_started: Callable[[], None] | None = None


@dataclass(frozen=True)
class ConnectorPlugin:
    name: str
    exchange: str
    kind: Literal["source", "sink"]
    summary: str
    config_type: type[Any]
    create: Callable[[Any], Connector]
    #: ``simulate <exchange>``: run the exchange simulator in the foreground.
    simulate: Callable[[str, int, float], None] | None = None
    #: ``demo``: start a simulator on ``stack`` and return a config pointing at it.
    demo: Callable[[str, contextlib.ExitStack], DemoPart] | None = None
    example_config: str | None = None
    #: Where the connector keeps its auth-failure guard (``auth-guard`` CLI); may be None.
    auth_guard: Callable[[Any], GuardSpec | None] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def discover() -> dict[str, ConnectorPlugin]:
    found: dict[str, ConnectorPlugin] = {}
    for ep in entry_points(group=GROUP):
        plugin = ep.load()
        if not isinstance(plugin, ConnectorPlugin):
            raise ConfigError(f"entry point {ep.name!r} does not name a ConnectorPlugin")
        found[plugin.name] = plugin
    return dict(sorted(found.items()))


def get(name: str) -> ConnectorPlugin:
    plugins = discover()
    if name not in plugins:
        known = ", ".join(plugins) or "none installed"
        raise ConfigError(f"no connector named {name!r} (installed: {known})")
    return plugins[name]


async def run_in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Blocking I/O (requests, kafka admin) goes to a worker thread, never the loop."""
    return await asyncio.to_thread(fn, *args)
