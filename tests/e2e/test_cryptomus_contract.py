"""Cryptomus runs the plugin contract suite (``connectors.testing.contract``)."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from connectors.cryptomus import protocol
from connectors.cryptomus.config import CryptomusConfig
from connectors.cryptomus.plugin import PLUGIN
from connectors.cryptomus.schemas import load_schema
from connectors.runtime.session import Update
from connectors.simulators.cryptomus import CryptomusSimulator
from connectors.simulators.harness import Harness
from connectors.testing.contract import StreamingContract, canonical
from tests.cryptomus_helpers import make_config

pytestmark = pytest.mark.e2e

Sim = Harness[CryptomusSimulator]


class CryptomusHarness:
    plugin = PLUGIN

    @contextlib.contextmanager
    def simulator(self) -> Iterator[Sim]:
        with Harness(CryptomusSimulator(updates_per_second=20.0, seed=11)) as sim:
            yield sim

    def config(self, sim: Sim, bootstrap: str, prefix: str, **kafka: Any) -> CryptomusConfig:
        return make_config(sim, bootstrap, prefix=prefix, kafka=kafka)

    def topics(self, config: CryptomusConfig) -> Mapping[str, str]:
        s = config.cryptomus
        return {ch: s.topics.for_channel(ch) for ch in s.channels}

    def dead_letter_topic(self, config: CryptomusConfig) -> str:
        return config.cryptomus.topics.dead_letter

    def schema(self, channel: str) -> Mapping[str, Any]:
        return load_schema(channel)

    def sent_frames(self, sim: Sim) -> list[str]:
        return list(sim.control.sent_frames())

    def expected_events(self, sim: Sim) -> Counter[tuple[str, str, str]]:
        out: Counter[tuple[str, str, str]] = Counter()
        for frame in self.sent_frames(sim):
            update = protocol.parse_frame(frame)
            assert isinstance(update, Update)
            for e in update.events:
                out[(e.channel, e.key, canonical(json.loads(json.dumps(e.data))))] += 1
        return out

    def drop(self, sim: Sim) -> None:
        assert sim.control.drop_connections() >= 1

    def inject(self, sim: Sim, frame: str | bytes) -> None:
        assert sim.control.inject_raw(frame) >= 1

    def pause(self, sim: Sim, paused: bool) -> None:
        if paused:
            sim.control.pause_updates()
        else:
            sim.control.resume_updates()

    def open_connections(self, sim: Sim) -> int:
        return int(sim.control.open_connections())


class TestCryptomusContract(StreamingContract):
    harness = CryptomusHarness()
