"""The Toyex harness of the plugin contract suite."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from connectors.runtime.settings import KafkaSettings, RuntimeSettings, StreamSettings
from connectors.testing.contract import canonical
from tests.toyex.plugin import PLUGIN, ToyConfig, ToySettings
from tests.toyex.simulator import ToySimulator


class ToyHarness:
    plugin = PLUGIN

    @contextlib.contextmanager
    def simulator(self) -> Iterator[ToySimulator]:
        with ToySimulator(frames_per_second=40.0) as sim:
            yield sim

    def config(self, sim: ToySimulator, bootstrap: str, prefix: str, **kafka: Any) -> ToyConfig:
        return ToyConfig(
            toyex=ToySettings(
                url=sim.url,
                topic_prefix=prefix,
                stream=StreamSettings(backoff_initial_s=0.05, backoff_max_s=0.5, ping_interval_s=1),
            ),
            kafka=KafkaSettings(bootstrap_servers=bootstrap, **kafka),
            runtime=RuntimeSettings(health_host="127.0.0.1", health_port=0, drain_timeout_s=10),
        )

    def topics(self, config: ToyConfig) -> Mapping[str, str]:
        return {ch: f"{config.toyex.topic_prefix}.{ch}" for ch in config.toyex.channels}

    def dead_letter_topic(self, config: ToyConfig) -> str:
        return f"{config.toyex.topic_prefix}.dead-letter"

    def schema(self, channel: str) -> Mapping[str, Any] | None:
        return None

    def sent_frames(self, sim: ToySimulator) -> list[str]:
        with sim._lock:
            return list(sim.sent_text)

    def expected_events(self, sim: ToySimulator) -> Counter[tuple[str, str, str]]:
        out: Counter[tuple[str, str, str]] = Counter()
        for text in self.sent_frames(sim):
            frame = json.loads(text, parse_float=str, parse_int=str)
            if frame["channel"] == "quotes":
                items = [{"bid": frame["bid"], "ask": frame["ask"]}]
            else:
                items = [{"price": t["px"], "quantity": t["qty"]} for t in frame["trades"]]
            for data in items:
                out[(frame["channel"], frame["symbol"], canonical(data))] += 1
        return out

    def drop(self, sim: ToySimulator) -> None:
        assert sim.drop() >= 1

    def inject(self, sim: ToySimulator, frame: str | bytes) -> None:
        assert sim.inject(frame) >= 1

    def pause(self, sim: ToySimulator, paused: bool) -> None:
        sim.paused = paused

    def open_connections(self, sim: ToySimulator) -> int:
        return len(sim._conns)
